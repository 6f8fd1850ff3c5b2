"""FP8 weights and FP8 latent KV cache against bf16, on the ``bench`` preset (random weights).

    python tools/bench_fp8.py [--dir DIR] [--prompts 32] [--prompt-len 32] [--tokens 64]
                              [--batch 8] [--decode-tokens 32] [--rounds 2]

Writes (once) ``DIR/bf16`` = ``pdserve checkpoint make-random DIR/bf16 --preset bench`` and
``DIR/fp8`` = the same with ``--fp8``, then prints, in one run:

1. resident weight bytes of the model loaded from each (FP8 kept FP8) — all parameters and
   the FP8-stored projections alone;
2. accuracy of FP8 weights (bf16 KV cache) and of the FP8 KV cache (bf16 weights) against
   bf16 weights + bf16 cache: the bf16 model greedily continues every prompt by ``--tokens``
   tokens; each variant then replays prompt + continuation through the paged cache (prefill,
   then one decode step per token, teacher-forced) and its logits at the continuation
   positions are compared: max and mean |Δlogit|, greedy (argmax) agreement;
3. KV bytes per token, FP8 against bf16;
4. decode tokens/s of bf16 weights, FP8 weights, and bf16 weights + FP8 cache through
   ``LLM.generate`` (``--batch`` prompts x ``--decode-tokens`` new tokens), interleaved over
   ``--rounds`` so machine noise hits every variant alike; the best round counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.checkpoint.loader import iter_checkpoint_tensors, load_config
from engine.checkpoint.random_ckpt import make_random_checkpoint
from engine.llm import LLM
from engine.model.attention import AttentionMetadata
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.model.fp8 import FP8, is_fp8_checkpoint
from engine.model.kv_cache_fp8 import fp8_row_bytes
from engine.sampling_params import SamplingParams


def make_checkpoints(root: str, preset: str = "bench", seed: int = 0, **overrides) -> tuple[str, str]:
    """``root/bf16`` and ``root/fp8`` (same random weights, the second in DeepSeek's FP8 layout); kept if present."""
    paths = os.path.join(root, "bf16"), os.path.join(root, "fp8")
    for path, fp8 in zip(paths, (False, True)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            make_random_checkpoint(path, preset, seed=seed, fp8=fp8, **overrides)
    return paths


def load_model(path: str, dtype: torch.dtype = torch.bfloat16, fp8: bool | None = None) -> DeepseekV3ForCausalLM:
    """The model of a checkpoint; ``fp8=None``: FP8 checkpoints keep their weights FP8 (the engine's default)."""
    cfg = load_config(path)
    fp8 = is_fp8_checkpoint(cfg) if fp8 is None else fp8
    model = DeepseekV3ForCausalLM(cfg, dtype=dtype, fp8=fp8)
    model.load_weights(iter_checkpoint_tensors(path, cfg, dtype, progress=False, keep_fp8=fp8))
    return model.eval()


def resident_bytes(model: torch.nn.Module, projections: set[str]) -> tuple[int, int]:
    """(bytes of every parameter, bytes of the ``projections`` named, their FP8 scales included); storages counted once."""
    seen, total, proj = set(), 0, 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
        if name.replace("_scale_inv", "") in projections:
            proj += p.numel() * p.element_size()
    return total, proj


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def greedy_continuations(path: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The bf16 engine's greedy continuation of every prompt."""
    llm = LLM(path, weights="dequantize", kv_cache_memory_gb=0.5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


@torch.inference_mode()
def replay_logits(model: DeepseekV3ForCausalLM, prompts: list[list[int]], conts: list[list[int]],
                  kv_cache_dtype: str = "auto", block_size: int = 16) -> torch.Tensor:
    """Logits [B, len(cont), V] of the model at each continuation position, through the paged cache.

    Step 0 prefills every prompt; step t then decodes token t-1 of each continuation (teacher
    forcing), so every continuation logit comes from the absorbed decode path over cached rows.
    """
    cfg = model.cfg
    b, n = len(prompts), len(conts[0])
    lens = [len(p) + n for p in prompts]
    blocks_per = [-(-x // block_size) for x in lens]
    tables, start = [], 0
    for k in blocks_per:
        tables.append(list(range(start, start + k)))
        start += k
    if kv_cache_dtype == "fp8":
        shape, dtype = (start, block_size, fp8_row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim)), torch.uint8
    else:
        shape, dtype = (start, block_size, cfg.kv_cache_width), model.dtype
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_cache_layers)]
    out = torch.empty(b, n, cfg.vocab_size)
    ids = [t for p in prompts for t in p]
    pos = [i for p in prompts for i in range(len(p))]
    meta = AttentionMetadata.paged([len(p) for p in prompts], [len(p) for p in prompts], tables, block_size,
                                   caches, torch.device("cpu"))
    hidden = model(torch.tensor(ids), torch.tensor(pos), meta)
    last = torch.cumsum(torch.tensor([len(p) for p in prompts]), 0) - 1
    out[:, 0] = model.compute_logits(hidden[last])
    for t in range(1, n):
        ctx = [len(p) + t for p in prompts]
        meta = AttentionMetadata.paged([1] * b, ctx, tables, block_size, caches, torch.device("cpu"))
        hidden = model(torch.tensor([c[t - 1] for c in conts]), torch.tensor([c - 1 for c in ctx]), meta)
        out[:, t] = model.compute_logits(hidden)
    return out


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """max / mean |Δlogit|, the logit spread (std) of the reference, and argmax agreement."""
    d = (ref - got).abs()
    return {"max_dlogit": d.max().item(), "mean_dlogit": d.mean().item(), "logit_std": ref.std().item(),
            "greedy_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def decode_speed(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    """Output tokens/s of one batched greedy generation."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "pdserve-bench-fp8"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    src, fp8 = make_checkpoints(args.dir)
    cfg = load_config(src)

    ref_model, fp8_model = load_model(src), load_model(fp8)
    stored_fp8 = {n for n, p in fp8_model.named_parameters() if p.dtype == FP8}
    (ref_total, ref_proj), (q_total, q_proj) = resident_bytes(ref_model, stored_fp8), resident_bytes(fp8_model, stored_fp8)
    print(f"resident weight bytes: bf16 {ref_total / 2**20:.1f} MiB, FP8 {q_total / 2**20:.1f} MiB "
          f"({q_total / ref_total:.3f}); projections: bf16 {ref_proj / 2**20:.1f} MiB, "
          f"FP8+scales {q_proj / 2**20:.1f} MiB ({q_proj / ref_proj:.3f})")

    prompts = random_prompts(cfg.vocab_size, args.prompts, args.prompt_len)
    conts = greedy_continuations(src, prompts, args.tokens)
    base = replay_logits(ref_model, prompts, conts)
    for label, logits in (("FP8 weights, bf16 KV", replay_logits(fp8_model, prompts, conts)),
                          ("bf16 weights, FP8 KV", replay_logits(ref_model, prompts, conts, "fp8"))):
        m = compare(base, logits)
        print(f"{label}: {args.prompts} prompts x {args.tokens} tokens: max |dlogit| {m['max_dlogit']:.3f}, "
              f"mean |dlogit| {m['mean_dlogit']:.4f} (logit std {m['logit_std']:.3f}), "
              f"greedy agreement {m['greedy_agreement']:.4f}")

    layers = ref_model.num_cache_layers
    per_layer_fp8, per_layer_bf16 = fp8_row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim), cfg.kv_cache_width * 2
    print(f"KV bytes/token/layer: FP8 {per_layer_fp8} vs bf16 {per_layer_bf16} ({per_layer_fp8 / per_layer_bf16:.3f}); "
          f"x {layers} cache layers: {per_layer_fp8 * layers} vs {per_layer_bf16 * layers}")
    del ref_model, fp8_model

    engines = {"bf16 weights": LLM(src, kv_cache_memory_gb=0.5),
               "FP8 weights": LLM(fp8, kv_cache_memory_gb=0.5),
               "bf16 weights + FP8 KV": LLM(src, kv_cache_memory_gb=0.5, kv_cache_dtype="fp8")}
    batch = random_prompts(cfg.vocab_size, args.batch, args.prompt_len, seed=1)
    best = {k: 0.0 for k in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            best[name] = max(best[name], decode_speed(llm, batch, args.decode_tokens))
    print(f"decode, batch {args.batch} x {args.decode_tokens} tokens (prompt {args.prompt_len}), "
          f"{torch.get_num_threads()} threads, best of {args.rounds}: "
          + ", ".join(f"{k} {v:.1f} tok/s" for k, v in best.items()))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Teach a checkpoint's MTP layer to draft a second token from its own output; the main model stays frozen.

    .venv/bin/python tools/tune_mtp.py --model models/pdserve-mini --minutes 10 --seed 0

Speculative decoding with ``k > 1`` runs the MTP layer again on its own output hidden state
(``engine/spec_decode.py``, ``MTPProposer``), as vLLM and SGLang do with DeepSeek-V3's single MTP
layer. DeepSeek-V3's training objective (``tools/train_tiny.py``) only shows the layer the main
model's hidden state, so a chained second draft is a guess: on the bundled model it was accepted
2% of the time. This tool trains the MTP layer's own weights (``enorm``, ``hnorm``, ``eh_proj``, its
decoder block, its head norm) to agree with the frozen main model at both draft positions, the
way a chained draft runs:

* pass 1, as the proposer's first pass: row ``t`` reads the main hidden state at ``t`` and token
  ``t+1``; target: the main model's distribution at ``t+1`` (its choice of token ``t+2``);
* pass 2, chained: row ``t+1`` reads pass 1's output at ``t`` and token ``t+2``, and attends pass 1's
  rows before it plus its own row, exactly the cache rows a chained draft attends; target: the main
  model's distribution at ``t+2``.

The loss is the cross-entropy against the main model's full distribution (distillation, soft
targets), the sum of both passes. The main model's weights, the embeddings and the output heads
(the MTP layer's stored copies included) are not trained, so every main-model output is
bit-identical after tuning: greedy output with or without MTP is unchanged, only how often drafts
are accepted moves. The tool checks that on the written file (every tensor outside the MTP layer's
trained ones equal, bit for bit) before replacing the checkpoint's shards. Agreement with the main
model on the held-out files (``tools/train_tiny.py``'s split) is printed before and after and kept
in ``train_stats.json`` under ``mtp_tune`` when the checkpoint has one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import engine.model.deepseek_v3 as dsv3  # noqa: E402
from engine.checkpoint.loader import iter_checkpoint_tensors, load_config  # noqa: E402
from engine.checkpoint.tokenizer import default_corpus_files  # noqa: E402
from engine.checkpoint.writer import save_checkpoint  # noqa: E402
from engine.model.attention import AttentionMetadata  # noqa: E402
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
from train_tiny import encode_files, hf_tensors, log, split_files, windows  # noqa: E402

FROZEN_IN_MTP = ("embed_tokens.", "shared_head.head.")  # copies of the main model's embedding and head


def trainable(name: str) -> bool:
    """The MTP layer's own weights; its embedding / head copies and every router's bias stay."""
    return name.startswith("mtp.") and not any(f in name for f in FROZEN_IN_MTP) \
        and not name.endswith("e_score_correction_bias")


class ChainedAttention:
    """Stands in for ``mla_attention`` in the MTP layer: records pass 1's latent rows, then attends
    pass 2's queries over pass 1's rows before their position plus their own row."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.rows1: torch.Tensor | None = None  # [B, S, R+Dr] pass 1's rows
        self.chained = False
        self.inner = dsv3.mla_attention

    def __call__(self, q_nope, q_pe, latent, k_pe, w, meta, layer_idx):
        if layer_idx != self.layer_idx:
            return self.inner(q_nope, q_pe, latent, k_pe, w, meta, layer_idx)
        b = len(meta.spans)
        rows = torch.cat([latent, k_pe], dim=-1)
        if not self.chained:
            self.rows1 = rows.view(b, -1, rows.shape[-1])
            return self.inner(q_nope, q_pe, latent, k_pe, w, meta, layer_idx)
        heads, nope, r = w.w_uk.shape
        dv = w.w_uv.shape[1]

        def keys_values(c):  # [B, L, R+Dr] -> K [B, L, H, Dn+Dr], V [B, L, H, Dv]
            kv = (c[..., :r] @ w.kv_b.t()).view(*c.shape[:2], heads, nope + dv)
            pe = c[..., None, r:].expand(*c.shape[:2], heads, c.shape[-1] - r)
            return torch.cat([kv[..., :nope], pe], dim=-1), kv[..., nope:]

        k1, v1 = keys_values(self.rows1)  # pass 1: positions 0..S-1
        ko, vo = keys_values(rows.view(b, -1, rows.shape[-1]))  # chained row i sits at position i + 1
        q = torch.cat([q_nope, q_pe], dim=-1).view(b, -1, heads, nope + q_pe.shape[-1])
        n_q, s = q.shape[1], k1.shape[1]
        s1 = torch.einsum("bqhd,bshd->bhqs", q, k1) * w.scale
        before = torch.arange(s)[None, :] <= torch.arange(n_q)[:, None]  # key j < position i + 1
        s1 = s1.masked_fill(~before.to(s1.device), float("-inf"))
        so = torch.einsum("bqhd,bqhd->bhq", q, ko)[..., None] * w.scale
        p = torch.softmax(torch.cat([s1, so], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.einsum("bhqs,bshd->bqhd", p[..., :s], v1) + p[..., s].permute(0, 2, 1)[..., None] * vo
        return out.reshape(b * n_q, heads * dv)


def passes(model, attn: ChainedAttention, batch: torch.Tensor, seq_len: int):
    """batch [B, seq_len+2] -> (main logits [B, S, V], pass-1 MTP logits [B, S, V], chained [B, S-2, V])."""
    b, s = batch.shape[0], seq_len
    inp = batch[:, :s].reshape(-1)
    pos = torch.arange(s).repeat(b)
    meta = AttentionMetadata.no_cache([s] * b)
    with torch.no_grad():
        h = model(inp, pos, meta)
        main = model.compute_logits(h).view(b, s, -1)
    attn.chained = False
    h1 = model.mtp_forward(0, batch[:, 1:s + 1].reshape(-1), h, pos, meta)  # row t: token t+1 -> t+2
    logits1 = model.mtp[0].logits(h1).view(b, s, -1)
    # chained rows for t = 0..S-3 at positions t+1, reading pass 1's output at t and token t+2
    hc = h1.view(b, s, -1)[:, :s - 2].reshape(b * (s - 2), -1)
    attn.chained = True
    h2 = model.mtp_forward(0, batch[:, 2:s].reshape(-1), hc, torch.arange(1, s - 1).repeat(b),
                           AttentionMetadata.no_cache([s - 2] * b))
    attn.chained = False
    logits2 = model.mtp[0].logits(h2).view(b, s - 2, -1)
    return main, logits1, logits2


def soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return -(teacher.float().softmax(-1) * student.float().log_softmax(-1)).sum(-1).mean()


def losses(main, l1, l2):
    # pass 1 at t against main at t+1; chained row t against main at t+2
    return soft_ce(l1[:, :-1], main[:, 1:]), soft_ce(l2, main[:, 2:])


@torch.no_grad()
def agreement(model, attn, data: torch.Tensor, seq_len: int, autocast: bool) -> dict:
    """Argmax agreement with the main model: first draft, chained second draft, and the second where the
    first agreed and the main model's choice was the text's next token (what a chained draft is fed)."""
    model.eval()
    a1 = a2 = a2c = n1 = n2 = n2c = 0
    for i in range(0, data.shape[0], 8):
        chunk = data[i:i + 8]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            main, l1, l2 = passes(model, attn, chunk, seq_len)
        g = main.argmax(-1)  # main's choice of token t+1 at t
        d1, d2 = l1.argmax(-1), l2.argmax(-1)
        ok1 = d1[:, :-1] == g[:, 1:]  # [B, S-1]
        ok2 = d2 == g[:, 2:]  # [B, S-2]
        fed = ok1[:, :-1] & (g[:, 1:-1] == chunk[:, 2:seq_len])  # first draft right and equal to the token fed
        a1 += int(ok1.sum()); n1 += ok1.numel()
        a2 += int(ok2.sum()); n2 += ok2.numel()
        a2c += int((ok2 & fed).sum()); n2c += int(fed.sum())
    model.train()
    return dict(first=a1 / n1, chained=a2 / n2, chained_given_first=a2c / max(n2c, 1), tokens=n1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (DeepseekV3, one MTP layer)")
    ap.add_argument("--out", default=None, help="write the tuned checkpoint here (default: in place)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=0, help="step budget (0 = time-bounded only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens for the agreement figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from engine.dtype_choice import auto_dtype

    t_start = time.time()
    autocast = auto_dtype("cpu").dtype == "bfloat16"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(args.model)
    if cfg.num_nextn_predict_layers < 1:
        sys.exit(f"{args.model}: no MTP layer (num_nextn_predict_layers = 0)")
    model = DeepseekV3ForCausalLM(cfg, dtype=torch.float32, with_mtp=True)
    model.load_weights(iter_checkpoint_tensors(args.model, cfg, None, progress=False))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"model {args.model}: training {sum(p.numel() for p in params) / 1e6:.2f}M MTP parameters of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M; bf16 autocast {autocast}")

    attn = ChainedAttention(cfg.num_hidden_layers)
    dsv3.mla_attention = attn
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    train_files, held_files = split_files(default_corpus_files())
    train_w = windows(encode_files(tok, train_files), args.seq_len)
    held_w = windows(encode_files(tok, held_files), args.seq_len)[:max(1, args.eval_tokens // args.seq_len)]
    order = torch.randperm(train_w.shape[0], generator=torch.Generator().manual_seed(args.seed + 2))
    before = agreement(model, attn, held_w, args.seq_len, autocast)
    log(f"held-out agreement before: first draft {before['first']:.3f}, chained {before['chained']:.3f} "
        f"(given the first: {before['chained_given_first']:.3f})")

    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    budget_s, t0, step = args.minutes * 60, time.time(), 0
    ema = None
    while (not args.steps or step < args.steps) and time.time() - t0 < budget_s:
        done = max(step / args.steps if args.steps else 0.0, (time.time() - t0) / budget_s)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = order[(step * args.batch + torch.arange(args.batch)) % order.numel()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            l1, l2 = losses(*passes(model, attn, train_w[idx], args.seq_len))
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        l1, l2 = float(l1.detach()), float(l2.detach())
        ema = (l1, l2) if ema is None else (0.9 * ema[0] + 0.1 * l1, 0.9 * ema[1] + 0.1 * l2)
        if step % args.log_every == 0:
            log(f"step {step} | pass 1 {ema[0]:.3f} | chained {ema[1]:.3f} | lr {lr:.2e} | "
                f"{time.time() - t0:.0f}s")
    train_s = time.time() - t0
    after = agreement(model, attn, held_w, args.seq_len, autocast)
    log(f"held-out agreement after {step} steps ({train_s / 60:.1f} min): first draft {after['first']:.3f}, "
        f"chained {after['chained']:.3f} (given the first: {after['chained_given_first']:.3f})")
    dsv3.mla_attention = attn.inner

    record = dict(steps=step, minutes=args.minutes, train_minutes=round(train_s / 60, 2), seed=args.seed, lr=args.lr,
                  batch=args.batch, seq_len=args.seq_len, held_out_before=before, held_out_after=after,
                  wall_minutes=round((time.time() - t_start) / 60, 2),
                  machine=f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}, "
                          f"bf16 autocast {autocast}")
    write(args, cfg, model, record)


def stored_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's shards, by name, as stored."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def write(args, cfg, model, record: dict) -> None:
    """The tuned checkpoint: new shards in a scratch directory, checked against the old, then moved in."""
    out = args.out or args.model
    if out != args.model:
        shutil.copytree(args.model, out, dirs_exist_ok=False)
    old = stored_tensors(args.model)
    tensors = hf_tensors(model, torch.bfloat16)
    changed = []
    for name, t in tensors.items():
        t = t.to(old[name].dtype)
        tensors[name] = t
        if not torch.equal(t, old[name]):
            changed.append(name)
    layer = f"model.layers.{cfg.num_hidden_layers}."
    wrong = [n for n in changed if not n.startswith(layer) or any(f in n for f in FROZEN_IN_MTP)]
    if wrong:
        raise SystemExit(f"refusing to write: tensors outside the MTP layer's trained ones changed: {wrong[:5]}")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        shards = save_checkpoint(tmp, cfg, tensors)
        for f in os.listdir(out):
            if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                os.remove(os.path.join(out, f))
        for f in os.listdir(tmp):
            if f.endswith(".safetensors") or f == "model.safetensors.index.json":
                os.replace(os.path.join(tmp, f), os.path.join(out, f))
    log(f"wrote {out}: {len(changed)} MTP tensors changed, {len(tensors) - len(changed)} unchanged "
        f"({', '.join(shards)})")
    stats_path = os.path.join(out, "train_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
        if "mtp_tune" in stats:  # an earlier run tuned this layer: this one continues from it
            record["continues"] = stats["mtp_tune"]
        stats["mtp_tune"] = record
        with open(stats_path, "w") as f:
            json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main()

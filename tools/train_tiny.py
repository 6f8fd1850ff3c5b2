#!/usr/bin/env python
"""Train pdserve's default model: a small DeepSeek-V3 (MLA, DeepSeekMoE, MTP) on the Python stdlib.

    .venv/bin/python tools/train_tiny.py --out models/pdserve-mini --minutes 25 --seed 0

Steps, all on CPU:

1. Corpus: the standard library's ``.py`` files (``default_corpus_files()``, sorted by path).
   Every 50th file (index % 50 == 49) is held out; the rest is training text.
2. Tokenizer: a byte-level BPE (``train_bpe_tokenizer``: DeepSeek special tokens, chat
   template, bos 0, eos 1) trained on the training files only.
3. Model: pdserve's own ``DeepseekV3ForCausalLM`` with one MTP layer, parameters made
   trainable, fp32 master weights and bf16 autocast where the CPU runs bf16 fast (the
   ``dtype=auto`` rule of ``engine.dtype_choice``; fp32 elsewhere). Loss per DeepSeek-V3:
   ``CE(next token) + lambda * CE(MTP: token t+2 from main hidden at t and emb(t+1))``;
   in training the MTP module shares the main embedding and output head (as in the
   report), the checkpoint stores copies in the official layout.
   Auxiliary-loss-free balancing: after each step every router's
   ``e_score_correction_bias`` moves by ``gamma * sign(mean_load - load)``.
4. AdamW, linear warmup then cosine decay. Training stops after ``--steps`` or
   ``--minutes`` (whichever comes first; the schedule follows whichever is further along,
   so with ``--steps`` alone the run is fully deterministic for a seed).
5. Evaluation on held-out tokens (loss vs a train-unigram baseline, MTP agreement and
   accuracy), greedy completions through ``engine.LLM``, then the bf16 checkpoint
   (``save_checkpoint``), tokenizer files and a model card (README.md) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.checkpoint.random_ckpt import preset_config  # noqa: E402
from engine.checkpoint.schema import checkpoint_schema  # noqa: E402
from engine.checkpoint.tokenizer import BOS_ID, EOS_ID, default_corpus_files, train_bpe_tokenizer  # noqa: E402
from engine.checkpoint.writer import save_checkpoint  # noqa: E402
from engine.model.attention import AttentionMetadata  # noqa: E402
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402
from engine.model.moe import Gate  # noqa: E402

MODEL = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32,
    v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
    moe_intermediate_size=256, num_nextn_predict_layers=1, max_position_embeddings=4096,
    tie_word_embeddings=False, routed_scaling_factor=2.5,
)
HELDOUT_EVERY = 50
PROMPTS = ["def fibonacci(n):", "import os\n"]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- data
def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    train = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, held


def encode_files(tok, files: list[str]) -> torch.Tensor:
    """bos + tokens + eos per file, concatenated in file order."""
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(BOS_ID)
        out.extend(enc.ids)
        out.append(EOS_ID)
    return torch.tensor(out, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [N, seq_len + 2] windows (input, next-token and t+2 targets)."""
    w = seq_len + 2
    n = (stream.numel() - 2) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(w)[None, :]
    return stream[idx]


# ---------------------------------------------------------------- model
def init_weights(model: DeepseekV3ForCausalLM, gen: torch.Generator) -> None:
    n_layers = model.cfg.num_hidden_layers + len(model.mtp)
    out_scale = (2 * n_layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mtp.") and (".embed_tokens." in name or ".shared_head.head." in name):
                continue  # shared with the main model during training
            if name.endswith("e_score_correction_bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                fan_in = p.shape[-1]
                std = fan_in ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
                    std *= out_scale
                if name == "lm_head.weight":
                    std *= 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def share_mtp_tensors(model: DeepseekV3ForCausalLM) -> None:
    for m in model.mtp:
        m.embed_tokens.weight = model.embed_tokens.weight
        m.shared_head.head.weight = model.lm_head.weight


class LoadTracker:
    """Counts router choices of every MoE gate during a forward (for bias balancing)."""

    def __init__(self, model):
        self.gates = [m for m in model.modules() if isinstance(m, Gate) and m.e_score_correction_bias is not None]
        self.loads = {id(g): torch.zeros(g.cfg.n_routed_experts) for g in self.gates}
        for g in self.gates:
            g.register_forward_hook(self._hook)

    def _hook(self, gate, inputs, output):
        ids = output[0]
        self.loads[id(gate)] += torch.bincount(ids.flatten(), minlength=gate.cfg.n_routed_experts).float()

    def update(self, gamma: float) -> float:
        """Apply the sign update; returns the worst max/mean load ratio among layers."""
        worst = 0.0
        with torch.no_grad():
            for g in self.gates:
                load = self.loads[id(g)]
                if load.sum() > 0:
                    g.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
                    worst = max(worst, float(load.max() / load.mean()))
                load.zero_()
        return worst


def forward_losses(model, batch: torch.Tensor, seq_len: int):
    """batch [B, seq_len+2] -> (main CE, MTP CE, main logits? no) averaged over tokens."""
    b = batch.shape[0]
    inp = batch[:, :seq_len].reshape(-1)
    nxt = batch[:, 1:seq_len + 1].reshape(-1)
    nxt2 = batch[:, 2:seq_len + 2].reshape(-1)
    pos = torch.arange(seq_len).repeat(b)
    meta = AttentionMetadata.no_cache([seq_len] * b)
    h = model(inp, pos, meta)
    logits = model.compute_logits(h)
    main = F.cross_entropy(logits.float(), nxt)
    hm = model.mtp_forward(0, nxt, h, pos, meta)
    mtp_logits = model.mtp[0].logits(hm)
    mtp = F.cross_entropy(mtp_logits.float(), nxt2)
    return main, mtp, logits, mtp_logits


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch: int, autocast: bool = True) -> dict:
    model.eval()
    tot_main = tot_mtp = 0.0
    agree = mtp_correct = main_correct = n = n_agree = 0
    for i in range(0, data.shape[0], batch):
        chunk = data[i:i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            main, mtp, logits, mtp_logits = forward_losses(model, chunk, seq_len)
        cnt = chunk.shape[0] * seq_len
        tot_main += float(main) * cnt
        tot_mtp += float(mtp) * cnt
        n += cnt
        lg = logits.view(chunk.shape[0], seq_len, -1).argmax(-1)  # main's guess for t+1
        mg = mtp_logits.view(chunk.shape[0], seq_len, -1).argmax(-1)  # MTP's guess for t+2 (from t)
        # main at t+1 (true prefix up to t+1) predicts t+2: compare with MTP at t
        agree += int((mg[:, :-1] == lg[:, 1:]).sum())
        n_agree += chunk.shape[0] * (seq_len - 1)
        mtp_correct += int((mg == chunk[:, 2:seq_len + 2]).sum())
        main_correct += int((lg == chunk[:, 1:seq_len + 1]).sum())
    model.train()
    return dict(loss=tot_main / n, mtp_loss=tot_mtp / n, mtp_agreement=agree / n_agree,
                mtp_accuracy=mtp_correct / n, main_accuracy=main_correct / n, tokens=n)


def unigram_baseline(train_stream: torch.Tensor, held_targets: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1.0  # add-one for unseen tokens
    logp = (counts / counts.sum()).log()
    return float(-logp[held_targets].mean())


# ---------------------------------------------------------------- checkpoint
def hf_tensors(model: DeepseekV3ForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint_schema(cfg), read back through the model's own name mapping."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name, spec in checkpoint_schema(cfg).items():
        target = model._param_for(name, params)
        if target is None:
            raise RuntimeError(f"{name}: no parameter")
        param, index = target
        t = param.detach() if index is None else param.detach()[index]
        assert tuple(t.shape) == spec.shape, (name, t.shape, spec.shape)
        keep_fp32 = name.endswith("e_score_correction_bias")
        out[name] = t.to(torch.float32 if keep_fp32 else dtype).contiguous().clone()
    return out


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget (evaluation not counted)")
    ap.add_argument("--steps", type=int, default=0, help="step budget (0 = time-bounded only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=MODEL["vocab_size"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--bias-gamma", type=float, default=5e-3,
                    help="bias step per optimizer step (DeepSeek-V3 used 1e-3 over far more steps)")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens evaluated at the end")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; use 1 when other processes share the cores (2 threads on a "
                         "contended 2-core machine ran >10x slower)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: re-evaluate the checkpoint in --out (its train_stats.json holds the "
                         "training numbers) and rewrite the model card")
    args = ap.parse_args()

    t_start = time.time()
    from engine.dtype_choice import auto_dtype

    bf16 = auto_dtype("cpu").dtype == "bfloat16"  # bf16 autocast only where the CPU runs bf16 fast
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out
    if args.eval_only:
        return finish_eval_only(args, t_start)
    if os.path.exists(out) and os.listdir(out):
        if not args.force:
            sys.exit(f"{out}: not empty (pass --force to replace it)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)

    # -- corpus and tokenizer
    files = default_corpus_files()
    train_files, held_files = split_files(files)
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    log(f"corpus: {len(files)} stdlib .py files, {corpus_bytes / 1e6:.1f} MB; "
        f"train {len(train_files)} files, held-out {len(held_files)} (every {HELDOUT_EVERY}th)")
    t0 = time.time()
    tok = train_bpe_tokenizer(train_files, args.vocab, out, model_max_length=MODEL["max_position_embeddings"])
    train_stream = encode_files(tok, train_files)
    held_stream = encode_files(tok, held_files)
    log(f"tokenizer: byte-level BPE, vocab {args.vocab}, trained + encoded in {time.time() - t0:.1f}s; "
        f"train {train_stream.numel():,} tokens, held-out {held_stream.numel():,} tokens "
        f"({corpus_bytes / (train_stream.numel() + held_stream.numel()):.2f} bytes/token)")

    # -- model
    cfg = preset_config("tiny", **{**MODEL, "vocab_size": args.vocab})
    model = DeepseekV3ForCausalLM(cfg, dtype=torch.float32, with_mtp=True)
    gen = torch.Generator().manual_seed(args.seed)
    init_weights(model, gen)
    share_mtp_tensors(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("e_score_correction_bias"))
    n_params = sum(p.numel() for p in model.parameters())
    n_ckpt = sum(math.prod(s.shape) for s in checkpoint_schema(cfg).values())
    log(f"model: {n_params / 1e6:.2f}M trainable-graph params ({n_ckpt / 1e6:.2f}M in the checkpoint, "
        f"MTP embed/head stored as copies)")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2
             and not n.endswith("embed_tokens.weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    tracker = LoadTracker(model)

    train_w = windows(train_stream, args.seq_len)
    held_w = windows(held_stream, args.seq_len)
    order = torch.randperm(train_w.shape[0], generator=torch.Generator().manual_seed(args.seed + 1))
    log(f"data: {train_w.shape[0]} train windows of {args.seq_len}(+2) tokens, batch {args.batch} "
        f"= {args.batch * args.seq_len} tokens/step")

    # -- train
    budget_s = args.minutes * 60
    step, seen, cursor, epoch = 0, 0, 0, 0
    t_train = time.time()
    ema_main = ema_mtp = None
    model.train()
    while True:
        elapsed = time.time() - t_train
        progress = max(elapsed / budget_s if budget_s > 0 else 0.0, step / args.steps if args.steps else 0.0)
        if progress >= 1.0:
            break
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        if cursor + args.batch > order.numel():
            cursor, epoch = 0, epoch + 1
            order = torch.randperm(train_w.shape[0], generator=torch.Generator().manual_seed(args.seed + 1 + epoch))
        batch = train_w[order[cursor:cursor + args.batch]]
        cursor += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            main, mtp, _, _ = forward_losses(model, batch, args.seq_len)
            loss = main + args.mtp_lambda * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imbalance = tracker.update(args.bias_gamma)
        step += 1
        seen += batch.numel() - 2 * batch.shape[0]
        main, mtp = float(main), float(mtp)
        ema_main = main if ema_main is None else 0.9 * ema_main + 0.1 * main
        ema_mtp = mtp if ema_mtp is None else 0.9 * ema_mtp + 0.1 * mtp
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            log(f"step {step:5d} | {seen / el:7.0f} tok/s | lr {lr:.2e} | loss {float(main):.3f} (ema {ema_main:.3f}) "
                f"| mtp {float(mtp):.3f} (ema {ema_mtp:.3f}) | max/mean expert load {imbalance:.2f} "
                f"| {el / 60:.1f} min")
    train_s = time.time() - t_train
    log(f"trained {step} steps, {seen:,} tokens ({seen / train_w.numel():.2f} epochs of train windows) "
        f"in {train_s / 60:.1f} min, {seen / train_s:.0f} tok/s")

    # -- save (bf16, official layout, MTP embed/head as copies)
    tensors = hf_tensors(model, torch.bfloat16)
    save_checkpoint(out, cfg, tensors)
    log(f"saved {out}: {dir_size(out) / 1e6:.2f} MB")
    del tensors, model, opt
    stats = dict(
        seed=args.seed, steps=step, tokens_seen=seen, train_minutes=round(train_s / 60, 2),
        tokens_per_s=round(seen / train_s), autocast="bf16" if bf16 else "none (fp32)", train_tokens=train_stream.numel(), heldout_tokens_total=held_stream.numel(),
        final_train_loss_ema=ema_main, final_mtp_loss_ema=ema_mtp, args=vars(args),
        machine=f"{platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}",
        pre_eval_wall_minutes=round((time.time() - t_start) / 60, 2),
    )
    with open(os.path.join(out, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    finish(out, cfg, args, stats, files, train_files, held_files, train_stream, held_w, train_w[order], t_start)


def finish_eval_only(args, t_start: float) -> None:
    from tokenizers import Tokenizer

    from engine.checkpoint.loader import load_config

    out = args.out
    with open(os.path.join(out, "train_stats.json")) as f:
        stats = json.load(f)
    train_args = argparse.Namespace(**stats["args"])
    train_args.eval_tokens = args.eval_tokens
    cfg = load_config(out)
    files = default_corpus_files()
    train_files, held_files = split_files(files)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    train_stream = encode_files(tok, train_files)
    held_stream = encode_files(tok, held_files)
    train_w = windows(train_stream, train_args.seq_len)
    order = torch.randperm(train_w.shape[0], generator=torch.Generator().manual_seed(train_args.seed + 1))
    finish(out, cfg, train_args, stats, files, train_files, held_files, train_stream,
           windows(held_stream, train_args.seq_len), train_w[order], t_start)


def finish(out, cfg, args, stats, files, train_files, held_files, train_stream, held_w, train_sample_w,
           t_start: float) -> None:
    """Evaluate the saved checkpoint, generate through the engine, write stats and the model card."""
    t_finish = time.time()
    size = dir_size(out)

    # -- evaluate the saved bf16 checkpoint through the normal loader
    from engine.checkpoint.loader import iter_checkpoint_tensors
    ev = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16, with_mtp=True)
    ev.load_weights(iter_checkpoint_tensors(out, cfg, None, progress=False))
    n_eval = max(1, min(held_w.shape[0], args.eval_tokens // args.seq_len))
    held_eval = held_w[:n_eval]
    t0 = time.time()
    res = evaluate(ev, held_eval, args.seq_len, 8, autocast=False)
    uni = unigram_baseline(train_stream, held_eval[:, 1:args.seq_len + 1].reshape(-1), cfg.vocab_size)
    tr = evaluate(ev, train_sample_w[:n_eval], args.seq_len, 8, autocast=False)
    log(f"held-out ({res['tokens']:,} tokens, bf16 checkpoint): loss {res['loss']:.3f} nats/token "
        f"(unigram {uni:.3f}, uniform {math.log(cfg.vocab_size):.3f}); next-token acc {res['main_accuracy']:.3f}; "
        f"MTP loss {res['mtp_loss']:.3f}, MTP t+2 acc {res['mtp_accuracy']:.3f}, "
        f"MTP agreement with main {res['mtp_agreement']:.3f}  [{time.time() - t0:.0f}s]")
    log(f"train sample ({tr['tokens']:,} tokens): loss {tr['loss']:.3f}, MTP loss {tr['mtp_loss']:.3f}")

    # -- greedy completions through the engine
    from engine import LLM, SamplingParams
    llm = LLM(out, dtype="bfloat16")
    comps = {}
    for p in PROMPTS:
        o = llm.generate([p], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0]
        comps[p] = o.text
        log(f"greedy {p!r} -> {o.text!r}")

    stats.update(heldout_eval=res, unigram_baseline=uni, uniform_baseline=math.log(cfg.vocab_size),
                 train_sample=tr, checkpoint_bytes=size, completions=comps,
                 eval_minutes=round((time.time() - t_finish) / 60, 2))
    stats["wall_minutes"] = round(stats["pre_eval_wall_minutes"] + stats["eval_minutes"], 2)
    with open(os.path.join(out, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    write_card(out, cfg, args, stats, files, train_files, held_files)
    log(f"done in {stats['wall_minutes']:.1f} min wall; model card {os.path.join(out, 'README.md')}")


def _tune_run(out: str, m: dict) -> str:
    """One tools/tune_mtp.py run of the model card: its command and what it trained."""
    cmd = f".venv/bin/python tools/tune_mtp.py --model {out} --steps {m['steps']} --minutes {m['minutes']:g} --seed {m['seed']}"
    if m["lr"] != 1e-3:
        cmd += f" --lr {m['lr']:g}"
    machine = f" ({m['machine']})" if "machine" in m else ""
    return (f"`{cmd}`: {m['steps']} steps of {m['batch']} × {m['seq_len']} tokens, lr {m['lr']:g}, "
            f"{m['train_minutes']} min on a 2-core CPU{machine}")


def write_card(out, cfg, args, s, files, train_files, held_files) -> None:
    r = s["heldout_eval"]
    cmd = f".venv/bin/python tools/train_tiny.py --out {args.out} --minutes {args.minutes:g} --seed {args.seed}"
    if args.steps:
        cmd += f" --steps {args.steps}"
    if args.threads != 2:
        cmd += f" --threads {args.threads}"
    comp = "\n".join(f"**`{p!r}`** →\n\n```python\n{p}{t}\n```\n" for p, t in s["completions"].items())
    tune = ""
    if "mtp_tune" in s:  # tools/tune_mtp.py ran on this checkpoint after training (each run continuing the last)
        runs = [s["mtp_tune"]]
        while "continues" in runs[0]:
            runs.insert(0, runs[0]["continues"])
        steps = "\n".join(f"{i}. {_tune_run(args.out, m)}" for i, m in enumerate(runs, 1))
        b = runs[0]["held_out_before"]
        head = " | ".join(["draft", "before"] + [f"after run {i}" for i in range(1, len(runs) + 1)])
        rows = "\n".join(
            f"| {label} | {b[key]:.3f} | " + " | ".join(f"**{m['held_out_after'][key]:.3f}**" if m is runs[-1]
                                                      else f"{m['held_out_after'][key]:.3f}" for m in runs) + " |"
            for key, label in (("first", "first (from the main hidden state)"),
                               ("chained", "second, chained (from the MTP layer's own output)"),
                               ("chained_given_first", "second, where the first was right and fed")))
        tune = f"""
## MTP tuned for chained drafting

After training, `tools/tune_mtp.py` trained the MTP layer's own weights to agree with the frozen main model at
both positions of a chained draft (the second draft reads the MTP layer's own output, as `MTPProposer` runs
it), {"in one run" if len(runs) == 1 else f"in {len(runs)} runs, each continuing from the last"}:

{steps}

The main model's weights are bit-identical, so greedy output with or without MTP is unchanged. Held-out
agreement with the main model's greedy choice ({b['tokens']:,} tokens):

| {head} |
|---|{"---:|" * (len(runs) + 1)}
{rows}

The MTP rows of the evaluation above are of the tuned layer.
"""
    notes = f"""* Quality: held-out loss is about half the unigram baseline's ({r['loss']:.2f} vs {s['unigram_baseline']:.2f} nats/token) and the
  MTP head agrees with the main model {100 * r['mtp_agreement']:.0f}% of the time. Greedy text is still low quality: it
  looks like Python but loops after a few lines (see above). This is a {s['tokens_seen'] / 1e6:.1f}M-token,
  {s['train_minutes']:.0f}-minute CPU run."""
    if s.get("note"):
        notes += f"\n* {s['note'][0].upper()}{s['note'][1:]}."
    card = f"""# pdserve-mini

pdserve's default model: a small **DeepSeek-V3-architecture** model (MLA, DeepSeekMoE with
sigmoid group-limited routing and aux-loss-free bias balancing, one **MTP** layer trained
jointly) trained from scratch on the Python standard library's source on a 2-core CPU.
It is a test/demo model: it writes Python-looking text, nothing more. Official Hugging Face
DeepSeek-V3 layout (MTP at layer {cfg.num_hidden_layers} with its own `embed_tokens` /
`shared_head.head` copies), bf16 safetensors ({s['checkpoint_bytes'] / 1e6:.1f} MB), loads in pdserve
and in `transformers` (`DeepseekV3ForCausalLM`).

```python
from engine import LLM, SamplingParams
llm = LLM("models/pdserve-mini")
print(llm.generate(["def fibonacci(n):"], SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].text)
```

## Config

| field | value |
|---|---|
| vocab | {cfg.vocab_size} (byte-level BPE, DeepSeek special tokens, bos 0 / eos 1, chat template) |
| hidden / layers | {cfg.hidden_size} / {cfg.num_hidden_layers} (first {cfg.first_k_dense_replace} dense, intermediate {cfg.intermediate_size}) |
| attention | MLA, {cfg.num_attention_heads} heads, q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, nope {cfg.qk_nope_head_dim} + rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim} |
| MoE | {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups / top-{cfg.topk_group}), {cfg.n_shared_experts} shared, moe_intermediate {cfg.moe_intermediate_size}, routed_scaling {cfg.routed_scaling_factor} |
| MTP | {cfg.num_nextn_predict_layers} layer (predicts t+2) |
| positions | max {cfg.max_position_embeddings} (trained on {args.seq_len}-token windows), rope theta {cfg.rope_theta:g}, no YaRN |
| tie_word_embeddings | {cfg.tie_word_embeddings} |

## Training

* Corpus: the `.py` files of this machine's Python standard library (`default_corpus_files()`:
  no site-packages, no test dirs), sorted by path: {len(files)} files. Every {HELDOUT_EVERY}th file
  (index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}) is held out ({len(held_files)} files,
  {s['heldout_tokens_total']:,} tokens); the tokenizer and model see only the other {len(train_files)}
  ({s['train_tokens']:,} tokens). Files are joined as `bos + text + eos`.
* Command: `{cmd}`
* Objective: CE(next token) + {args.mtp_lambda} · CE(MTP, token t+2 from main hidden at t and
  embedding of t+1); the MTP module shares embedding and output head with the main model in
  training (stored as copies). Aux-loss-free balancing: `e_score_correction_bias += {args.bias_gamma:g} · sign(mean_load − load)` per step.
* AdamW (β 0.9/0.95, wd {args.weight_decay}), lr {args.lr:g}, {args.warmup} warmup steps, cosine to
  {args.min_lr_ratio:g}× over the time budget; grad clip 1.0; fp32 master weights, autocast {s.get('autocast', 'bf16')};
  batch {args.batch} × {args.seq_len} tokens; seed {args.seed}.
* Steps: {s['steps']}, tokens seen: {s['tokens_seen']:,} ({s['tokens_per_s']} tok/s), training time
  {s['train_minutes']} min, whole run {s['wall_minutes']} min wall on a 2-core CPU ({s['machine']}).
* Final training loss (EMA): {s['final_train_loss_ema']:.3f} nats/token, MTP {s['final_mtp_loss_ema']:.3f}.

## Evaluation (bf16 checkpoint, held-out files, {r['tokens']:,} tokens)

| metric | value |
|---|---|
| held-out loss | **{r['loss']:.3f} nats/token** |
| unigram baseline (train-set unigram on the same held-out tokens) | {s['unigram_baseline']:.3f} |
| uniform baseline ln({cfg.vocab_size}) | {s['uniform_baseline']:.3f} |
| next-token accuracy (greedy) | {r['main_accuracy']:.3f} |
| MTP loss (t+2) | {r['mtp_loss']:.3f} |
| MTP t+2 accuracy vs true token | {r['mtp_accuracy']:.3f} |
| **MTP agreement** (MTP argmax for t+2 from t == main argmax at t+1 given the true prefix) | **{r['mtp_agreement']:.3f}** |
| train-sample loss (same number of tokens) | {s['train_sample']['loss']:.3f} |

MTP agreement is the acceptance rate a one-token MTP draft would get against the main model's
greedy choice when the previous draft was right.
{tune}
## Greedy completions (`engine.LLM`, temperature 0, 48 tokens)

{comp}
## Reproduce

`{cmd}` rewrites this directory (add `--force` if it exists). The data order, init and
tokenizer are fixed by the seed; with `--minutes` the stopping step depends on the machine's
speed, with `--steps N` (and a large `--minutes`) the run is deterministic. Numbers above are
in `train_stats.json`.

## Notes

{notes}
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


if __name__ == "__main__":
    main()

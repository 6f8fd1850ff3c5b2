"""``pdserve checkpoint``: make, convert and inspect checkpoints in the official DeepSeek layout.

    pdserve checkpoint make-random OUT --preset tiny|bench [--fp8] [--seed N] [--dtype bfloat16|float32]
    pdserve checkpoint quantize-fp8 SRC DST
    pdserve checkpoint inspect DIR

torch and the engine are imported inside the handlers only; a CheckpointError
(or a bad argument) becomes a CLIError, printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse

from serving.cli import CLIError

DTYPE_NAMES = ("bfloat16", "float32")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="make, convert and inspect checkpoints")
    sub = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make-random", help="write a random-weight checkpoint (with tokenizer)")
    make.add_argument("out", metavar="OUT", help="directory to create (must not hold a checkpoint)")
    # Checked by the handler against engine.checkpoint.random_ckpt.PRESETS (importing it here would import torch).
    make.add_argument("--preset", required=True, help="model size: tiny (tests) or bench (benchmarks)")
    make.add_argument("--fp8", action="store_true", help="store projections in DeepSeek's block FP8 layout")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    make.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="dtype of unquantized tensors")
    make.set_defaults(func=_make_random)

    quant = sub.add_parser("quantize-fp8", help="convert a bf16/fp32 checkpoint to DeepSeek's FP8 layout")
    quant.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    quant.add_argument("dst", metavar="DST", help="directory to write (must not hold a checkpoint)")
    quant.set_defaults(func=_quantize_fp8)

    inspect = sub.add_parser("inspect", help="summarize and validate a checkpoint without loading it")
    inspect.add_argument("dir", metavar="DIR", help="checkpoint directory")
    inspect.set_defaults(func=_inspect)


def _make_random(args: argparse.Namespace) -> int:
    import torch

    from engine.checkpoint.loader import CheckpointError
    from engine.checkpoint.random_ckpt import PRESETS, make_random_checkpoint

    if args.preset not in PRESETS:
        raise CLIError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    try:
        cfg = make_random_checkpoint(args.out, args.preset, seed=args.seed, fp8=args.fp8,
                                     dtype=getattr(torch, args.dtype))
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    kind = "fp8" if cfg.quantization else args.dtype
    print(f"wrote {args.preset} checkpoint ({kind}, seed {args.seed}) to {args.out}")
    return 0


def _quantize_fp8(args: argparse.Namespace) -> int:
    from engine.checkpoint.loader import CheckpointError
    from engine.checkpoint.quantize import quantize_checkpoint_fp8

    try:
        quantize_checkpoint_fp8(args.src, args.dst)
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    print(f"wrote FP8 checkpoint to {args.dst}")
    return 0


def _quantization(q: dict | None) -> str:
    if q is None:
        return "none"
    return f"{q['quant_method']} {q.get('fmt', 'e4m3')}, blocks {q.get('weight_block_size', [128, 128])}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def _auto_dtype() -> str:
    """What ``--dtype auto`` computes in here, and why (``engine.dtype_choice``)."""
    from engine.dtype_choice import auto_dtype

    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    choice = auto_dtype(device)
    return f"{choice.dtype} ({choice.reason})"


def _inspect(args: argparse.Namespace) -> int:
    from engine.checkpoint.loader import CheckpointError, check_checkpoint, load_config, mtp_layers_to_load, read_index

    try:
        cfg = load_config(args.dir)
        index = read_index(args.dir)
        has_mtp = mtp_layers_to_load(index, cfg)
        schema = check_checkpoint(index, cfg, include_mtp=has_mtp)
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    kv_bytes = cfg.kv_cache_width * cfg.num_hidden_layers * 2
    lines = [
        f"checkpoint      {args.dir}",
        f"architecture    {cfg.architecture}",
        f"hidden size     {cfg.hidden_size}, {cfg.num_hidden_layers} layers "
        f"({cfg.first_k_dense_replace} dense), {cfg.num_attention_heads} heads",
        f"attention       MLA q_lora_rank={cfg.q_lora_rank} kv_lora_rank={cfg.kv_lora_rank} "
        f"qk_nope={cfg.qk_nope_head_dim} qk_rope={cfg.qk_rope_head_dim} v={cfg.v_head_dim}",
        f"experts         {cfg.n_routed_experts} routed (top {cfg.num_experts_per_tok}, "
        f"{cfg.n_group} groups / top {cfg.topk_group}), {cfg.n_shared_experts} shared, "
        f"moe_intermediate_size={cfg.moe_intermediate_size}",
        f"vocab           {cfg.vocab_size}, max positions {cfg.max_position_embeddings}",
        f"quantization    {_quantization(cfg.quantization)}",
        f"tensors         {len(index.tensors)} stored ({len(schema)} in the schema), "
        f"{len(index.files)} file(s), {_gb(index.total_bytes)}",
        f"MTP             {'present' if has_mtp else 'absent'} "
        f"({cfg.num_nextn_predict_layers} layer(s) in config.json)",
        f"KV cache        {kv_bytes} bytes/token in bf16 ((kv_lora_rank + qk_rope_head_dim) x layers x 2)",
        f"dtype auto      {_auto_dtype()} on this machine",
    ]
    print("\n".join(lines))
    return 0


"""Offline throughput: pdserve's LLM.generate vs transformers' generate, side by side in one run.

    .venv/bin/python tools/bench_offline.py [--model DIR] [--num-prompts 64] [--input-len 256] [--output-len 128]
        [--split-batch 32] [--ab-bf16-dot]

Without --model, a random checkpoint of the ``bench`` preset is made in a temporary directory.
Prints output tokens/s of both and their ratio, then the decode-step split at batch
``--split-batch`` (model forward vs everything else: scheduling, input preparation,
sampling, bookkeeping); with --ab-bf16-dot, that step in bf16 with the CPU kernel's AVX512-BF16 products on
and off, alternated step by step in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time

import torch


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def bench_pdserve(model: str, prompts, output_len: int, dtype: str) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=len(prompts), max_num_batched_tokens=4096, kv_cache_memory_gb=2.0)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return len(prompts) * output_len / elapsed


def bench_transformers(model: str, prompts, output_len: int, dtype: str) -> float:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        elapsed = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + output_len
    return len(prompts) * output_len / elapsed


def _decoding_engine(model: str, prompts, dtype: str, steps: int):
    """An engine with ``prompts`` prefilled and one decode step taken, with tokens left for ``steps`` more."""
    from engine import SamplingParams
    from engine.args import EngineArgs
    from engine.engine import LLMEngine

    eng = LLMEngine(EngineArgs(model=model, dtype=dtype, max_num_seqs=len(prompts), max_num_batched_tokens=16384,
                               kv_cache_memory_gb=2.0))
    params = SamplingParams(temperature=0, max_tokens=steps + 10, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"s{i}", p, params)
    eng.step()  # the whole batch's prefill
    eng.step()
    return eng


def bf16_dot_ab(model: str, prompts, steps: int) -> tuple[float, float] | None:
    """Median decode step (ms) in bf16 with the CPU kernel's AVX512-BF16 products on and off, steps alternated
    in one process; None where this CPU has no such products."""
    from engine.kernels import cpu_gemm

    eng = _decoding_engine(model, prompts, "bfloat16", 2 * steps)
    if not cpu_gemm.bf16_dot():
        return None
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(2 * steps):
            on = i % 2 == 0
            cpu_gemm.set_bf16_dot(on)
            t0 = time.perf_counter()
            eng.step()
            times[on].append(time.perf_counter() - t0)
    finally:
        cpu_gemm.set_bf16_dot(True)
    return 1000 * statistics.median(times[True]), 1000 * statistics.median(times[False])


def decode_step_split(model: str, prompts, dtype: str, steps: int, profile: int = 0) -> tuple[float, float, float]:
    """(step ms, forward ms, share of the step outside the forward) over pure-decode steps; ``profile``:
    also print torch.profiler's ops (self CPU time, that many rows) over those steps."""
    eng = _decoding_engine(model, prompts, dtype, steps)
    eng.timings.__init__()
    with contextlib.ExitStack() as stack:
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            prof = stack.enter_context(torch_profile(activities=[ProfilerActivity.CPU]))
        for _ in range(steps):
            eng.step()
    if profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    t = eng.timings
    return 1000 * t.total_seconds / t.steps, 1000 * t.forward_seconds / t.steps, 1 - t.forward_seconds / t.total_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: bf16 where this machine runs it fast, else fp32 (engine.dtype_choice)")
    ap.add_argument("--split-batch", type=int, default=32)
    ap.add_argument("--split-steps", type=int, default=30)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="print torch.profiler's top ROWS ops (self CPU time) of the decode-step split")
    ap.add_argument("--ab-bf16-dot", action="store_true",
                    help="also time the decode step at batch --split-batch in bf16 with the CPU kernel's AVX512-BF16 "
                         "products on and off, steps alternated in one process")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = None
    model = args.model
    if model is None:
        from engine.checkpoint.random_ckpt import make_random_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model = tmp.name + "/bench"
        make_random_checkpoint(model, "bench", seed=args.seed)
    from engine.model.config import ModelConfig

    vocab = ModelConfig.from_dir(model).vocab_size
    prompts = _prompts(args.num_prompts, args.input_len, vocab, args.seed)
    if args.dtype == "auto":
        from engine import dtype_choice

        args.dtype = dtype_choice.resolve("auto", "cpu").dtype
    print(f"workload: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")
    ours = bench_pdserve(model, prompts, args.output_len, args.dtype)
    print(f"pdserve LLM.generate      : {ours:8.1f} output tok/s")
    if not args.skip_transformers:
        ref = bench_transformers(model, prompts, args.output_len, args.dtype)
        print(f"transformers generate     : {ref:8.1f} output tok/s")
        print(f"ratio pdserve/transformers: {ours / ref:8.2f}x")
    step, fwd, other = decode_step_split(model, prompts[: args.split_batch], args.dtype, args.split_steps,
                                        args.profile)
    print(f"decode step at batch {args.split_batch}: {step:.1f} ms/step, model forward {fwd:.1f} ms, "
          f"everything else {100 * other:.1f}% of the step")
    if args.ab_bf16_dot:
        ab = bf16_dot_ab(model, prompts[: args.split_batch], args.split_steps)
        if ab is None:
            print("AVX512-BF16 products: not on this CPU (or turned off), nothing to compare")
        else:
            print(f"bf16 decode step at batch {args.split_batch}, AVX512-BF16 products on / off (steps alternated, "
                  f"medians of {args.split_steps}): {ab[0]:.2f} / {ab[1]:.2f} ms = {ab[0] / ab[1]:.2f}x")


if __name__ == "__main__":
    main()

"""Decode throughput of one instance DP1/EP1 vs DP2 + EP2 (lock-step DP attention), side by side.

Both run the same requests on the ``bench`` preset (random weights, fp32) through real engines
(``engine.multirank``: one process per rank over gloo on this machine; no Ray, no router): the
DP2 instance splits the requests over its two replicas, which step in lock-step and meet in
every MoE layer's all_to_all. Printed per layout: decode tokens/s (generated tokens after each
request's first one, over the decode window), steps, and the MoE all_to_all bytes each rank
sent per step (dispatch + combine, rows to other ranks only).

    .venv/bin/python tools/bench_parallel.py [--requests 16 --input-len 256 --output-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_description  # noqa: E402  (tools/machine.py)




def _engine_args(model: str, args) -> dict:
    return dict(model=model, dtype="float32", block_size=64, kv_cache_memory_gb=0.25, max_num_seqs=args.requests,
                max_num_batched_tokens=2048)


def _run_leader(engine, prompts: dict[str, list[int]], max_tokens: int, lockstep: bool) -> dict:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    first: set[str] = set()
    t_decode = None
    tokens = steps = 0
    dispatchers = [m.dispatcher for m in engine.runner.model.moe_layers().values()]
    sent0 = sum(d.bytes_sent for d in dispatchers)
    while True:
        idle = not engine.has_unfinished()
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            if out.request_id not in first:
                first.add(out.request_id)
                n -= 1
            tokens += n
        steps += 1
        if t_decode is None and len(first) == len(prompts):
            t_decode = time.perf_counter()
            tokens = 0
        if idle and (not lockstep or not engine.executor.busy_elsewhere):
            break
    return {"tokens": tokens, "seconds": time.perf_counter() - (t_decode or time.perf_counter()), "steps": steps,
            "a2a_bytes": sum(d.bytes_sent for d in dispatchers) - sent0}


def _rank(rank: int, model: str, init: str, prompts: dict, args_ns: dict, out_dir: str) -> None:
    import torch

    from engine.args import EngineArgs
    from engine.engine import LLMEngine
    from engine.model.parallel import ParallelLayout
    from engine.multirank import MultiRankExecutor, RankSpec, init_rank

    torch.set_num_threads(1)
    args = argparse.Namespace(**args_ns)
    spec = RankSpec(ParallelLayout(dp=2, ep=2), rank, init, timeout_s=600)
    groups = init_rank(spec, "cpu")
    engine = LLMEngine(EngineArgs(**_engine_args(model, args)),
                       lambda a, cfg, outbox: MultiRankExecutor(a, cfg, outbox, groups))
    mine = {rid: p for i, (rid, p) in enumerate(prompts.items()) if i % 2 == rank}
    result = _run_leader(engine, mine, args.output_len, lockstep=True)
    engine.executor.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    from engine.checkpoint.random_ckpt import make_random_checkpoint
    from engine.engine import LLMEngine
    from engine.args import EngineArgs

    tmp = tempfile.mkdtemp(prefix="pdserve-parbench-")
    model = os.path.join(tmp, args.preset)
    make_random_checkpoint(model, args.preset)
    rng = random.Random(args.seed)
    prompts = {f"r{i}": [rng.randrange(3, 16000) for _ in range(args.input_len)] for i in range(args.requests)}

    # DP1/EP1: one process, two threads (the two cores the DP2 instance gets as two processes)
    torch.set_num_threads(2)
    engine = LLMEngine(EngineArgs(**_engine_args(model, args)))
    one = _run_leader(engine, prompts, args.output_len, lockstep=False)
    del engine

    mp.start_processes(_rank, args=(model, "file://" + os.path.join(tmp, "rendezvous"), prompts, vars(args), tmp),
                       nprocs=2, start_method="spawn", join=True)
    ranks = []
    for r in range(2):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    two = {"tokens": sum(r["tokens"] for r in ranks), "seconds": max(r["seconds"] for r in ranks),
           "steps": max(r["steps"] for r in ranks), "a2a_bytes": sum(r["a2a_bytes"] for r in ranks)}
    print(f"decode instance, {args.preset} preset (fp32, random weights), {args.requests} requests x "
          f"{args.input_len} in / {args.output_len} out, greedy; CPU: {cpu_description()}")
    print(f"{'layout':<22} {'decode tok/s':>12} {'steps':>6} {'all_to_all bytes/step/rank':>27}")
    for name, r, world in (("DP1/EP1 (1 process)", one, 1), ("DP2+EP2 (2 processes)", two, 2)):
        tps = r["tokens"] / r["seconds"] if r["seconds"] else float("nan")
        print(f"{name:<22} {tps:>12.1f} {r['steps']:>6} {r['a2a_bytes'] / max(r['steps'], 1) / world:>27,.0f}")
    ratio = (two["tokens"] / two["seconds"]) / (one["tokens"] / one["seconds"])
    print(f"DP2+EP2 / DP1: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

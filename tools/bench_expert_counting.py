"""What expert-load counting costs a decode step: the same decode steps with counting on and off,
interleaved, side by side in one run.

One engine on the ``bench`` preset (fp32, random weights) holds ``--batch`` sequences in decode;
each measured pair runs one decode step with ``MoE.count_load`` on and one with it off (the order
alternates), for ``--pairs`` pairs; the printed overhead is median(on) / median(off) - 1. Also
printed: the time of one report read (``RankExperts.counts``, what the router's health probe adds
once per interval, not per step) against the step.

    .venv/bin/python tools/bench_expert_counting.py [--batch 32 --pairs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_description  # noqa: E402  (tools/machine.py)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    import torch

    from engine.args import EngineArgs
    from engine.checkpoint.random_ckpt import make_random_checkpoint
    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    model = os.path.join(tempfile.mkdtemp(prefix="pdserve-countbench-"), args.preset)
    make_random_checkpoint(model, args.preset)
    engine = LLMEngine(EngineArgs(model=model, dtype="float32", block_size=64, kv_cache_memory_gb=0.5,
                                  max_num_seqs=args.batch, max_num_batched_tokens=args.batch * args.prompt_len))
    steps_needed = 2 * args.pairs + 8
    params = SamplingParams(temperature=0, max_tokens=steps_needed + 4, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [(7 * i + j) % 16000 + 3 for j in range(args.prompt_len)], params)
    moes = list(engine.runner.model.moe_layers().values())

    def step(count: bool) -> float:
        for m in moes:
            m.count_load = count
        t0 = time.perf_counter()
        engine.step()
        return time.perf_counter() - t0

    while any(len(r.output_token_ids) == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill done, every sequence decoding
    for _ in range(4):
        step(True)  # warm-up
    on, off = [], []
    for i in range(args.pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        for count in order:
            (on if count else off).append(step(count))
    experts = engine.runner.experts
    reads = []
    for _ in range(50):
        t0 = time.perf_counter()
        experts.counts()
        reads.append(time.perf_counter() - t0)
    m_on, m_off, m_read = statistics.median(on), statistics.median(off), statistics.median(reads)
    print(f"{args.preset} preset (fp32), decode batch {args.batch}, {len(moes)} MoE layers, "
          f"torch threads {torch.get_num_threads()}; CPU: {cpu_description()}")
    print(f"decode step, counting on : median {m_on * 1e3:.3f} ms over {len(on)} steps")
    print(f"decode step, counting off: median {m_off * 1e3:.3f} ms over {len(off)} steps")
    print(f"counting overhead: {100 * (m_on / m_off - 1):+.2f}% of a decode step")
    print(f"one report read (RankExperts.counts, once per health interval): {m_read * 1e6:.0f} us "
          f"= {100 * m_read / m_off:.2f}% of one step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

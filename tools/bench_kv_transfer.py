"""KV hand-off: whole-request vs layer-wise streaming, side by side through the router.

One Ray cluster, one decode worker and two prefill workers that differ only in
``kv_transfer`` (``whole``: every layer's rows after the prompt; ``layerwise``: layer
i's rows while layer i+1 computes). Two routers (``PDClient``), one per prefill
worker, share the decode worker; requests alternate between them, one at a time, so
both modes see the same machine state. For each prompt length it prints, per mode:

* TTFT through the router (request sent → first token streamed back, median);
* hand-off: prefill done (on the prefill worker) → sequence running on the decode
  worker (``PrefillResult.finished_at`` → ``TransferReport.done_at``, median);
* bytes moved per request.

Checkpoint: the ``bench`` preset (random weights) with its context raised to fit
4,096-token prompts. Ray needs a loopback-only network here (docs/DISAGGREGATION.md):

    unshare -n sh -c 'ip link set lo up && .venv/bin/python tools/bench_kv_transfer.py'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_description  # noqa: E402  (tools/machine.py)


def _checkpoint(out_dir: str, max_positions: int) -> str:
    from engine.checkpoint.random_ckpt import make_random_checkpoint

    path = os.path.join(out_dir, "bench")
    make_random_checkpoint(path, "bench")
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = max_positions
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path




async def _ttft(client, prompt: list[int], max_tokens: int) -> float:
    """Request sent → first token back through the router."""
    from engine.outputs import GenerateRequest
    from engine.sampling_params import SamplingParams

    rid = f"bench-{random.getrandbits(48):x}"
    req = GenerateRequest(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    ttft = None
    async for _ in client.generate(req):
        if ttft is None:
            ttft = time.perf_counter() - t0
    return ttft


def _sample(metric, name: str, **labels) -> float:
    """The value of one sample of a prometheus_client metric (0 when absent)."""
    return next((smp.value for m in metric.collect() for smp in m.samples
                 if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items())), 0.0)


def _handoff(client) -> tuple[float, float]:
    """(sum, count) of the router's hand-off stage histogram."""
    stage = client.metrics.stage
    return (_sample(stage, "pdserve_router_stage_seconds_sum", stage="handoff"),
            _sample(stage, "pdserve_router_stage_seconds_count", stage="handoff"))


async def _run(args, names: dict[str, str]) -> dict:
    from router.pd_flow import PDClient, RouterConfig

    clients = {}
    for mode, prefill in names.items():
        c = PDClient([prefill], ["decode-0"], RouterConfig(poll_wait_s=0.05, prefill_timeout_s=600))
        await c.start()
        clients[mode] = c
    rng = random.Random(args.seed)
    results: dict = {}
    for length in args.lengths:
        per = {mode: {"ttft": [], "handoff": [], "bytes": []} for mode in names}
        for i in range(args.warmup + args.repeats):
            for mode in (names if i % 2 == 0 else list(reversed(list(names)))):  # alternate who goes first
                c = clients[mode]
                prompt = [rng.randrange(3, 16000) for _ in range(length)]  # no prefix-cache hits
                s0, n0 = _handoff(c)
                b0 = _sample(c.metrics.transfer_bytes, "pdserve_router_kv_transfer_bytes_total")
                ttft = await _ttft(c, prompt, args.max_tokens)
                s1, n1 = _handoff(c)
                if i >= args.warmup:
                    per[mode]["ttft"].append(ttft)
                    per[mode]["handoff"].append((s1 - s0) / max(n1 - n0, 1))
                    per[mode]["bytes"].append(_sample(c.metrics.transfer_bytes, "pdserve_router_kv_transfer_bytes_total") - b0)
        results[length] = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per.items()}
    for c in clients.values():
        await c.shutdown()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens of the prefill workers")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from deploy.worker import actor_classes

    tmp = tempfile.mkdtemp(prefix="pdserve-kvbench-")
    model = _checkpoint(tmp, max(args.lengths) + args.max_tokens + 64)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 1024 * 1024, log_to_driver=False, namespace="pdserve")
    common = {"model": model, "dtype": args.dtype, "kv_cache_memory_gb": 0.5, "block_size": 64}
    classes = actor_classes()
    names = {"whole": "prefill-0", "layerwise": "prefill-1"}
    actors = [classes["prefill"].options(name=name, namespace="pdserve", num_cpus=0, max_concurrency=100).remote(
        name, {**common, "role": "prefill", "kv_transfer": mode, "max_num_batched_tokens": args.chunk})
        for mode, name in names.items()]
    actors.append(classes["decode"].options(name="decode-0", namespace="pdserve", num_cpus=0,
                                            max_concurrency=100).remote("decode-0", {**common, "role": "decode"}))
    ray.get([a.info.remote() for a in actors], timeout=600)
    try:
        results = asyncio.run(_run(args, names))
    finally:
        ray.shutdown()
    print(f"KV hand-off, bench preset ({args.dtype}), 1 prefill + 1 decode worker, Ray object store, "
          f"prefill chunk {args.chunk}; medians of {args.repeats}; CPU: {cpu_description()}")
    print(f"{'prompt':>7} {'mode':<10} {'TTFT ms':>9} {'hand-off ms':>12} {'MB moved':>9}   "
          f"{'TTFT layerwise/whole':>20} {'hand-off layerwise/whole':>25}")
    for length, per in results.items():
        for mode, r in per.items():
            ratio = ""
            if mode == "layerwise":
                ratio = (f"{r['ttft'] / per['whole']['ttft']:>20.3f} "
                         f"{r['handoff'] / max(per['whole']['handoff'], 1e-9):>25.3f}")
            print(f"{length:>7} {mode:<10} {r['ttft'] * 1e3:>9.1f} {r['handoff'] * 1e3:>12.1f} "
                  f"{r['bytes'] / 2**20:>9.1f}   {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

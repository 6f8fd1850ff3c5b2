"""Decode interference: ITL of steady streams while a burst of long prompts arrives.

Runs the same load against two deployments with the same two CPU cores:

* ``colocated``: ``pdserve serve`` (the dev server: one engine, prefill and decode in
  the same steps), pinned to cores 0-1 with 2 torch threads;
* ``pd``: ``pdserve up`` with one prefill worker pinned to core 0 and one decode
  worker pinned to core 1 (1 torch thread each), router in its own process.

Load, in order: ``--streams`` clients each stream requests of a short prompt
(``--short-len`` tokens) and ``--gen`` generated tokens back to back; after
``--warmup`` seconds, ``--burst`` requests with ``--long-len``-token prompts and
``max_tokens`` 1 arrive at once; the run ends ``--tail`` seconds after the last burst
request finished. Inter-token latency (ITL) samples are the gaps between successive
tokens of a stream; a chunk that carries k tokens (counted with ``logprobs: 0``)
contributes k samples of gap / k.
Reported per deployment: ITL p50/p99 *before* the burst and *during* it (from the
burst's arrival until its last request finished), and the burst's TTFT p50/max.

Ray needs a loopback-only network here (see docs/DISAGGREGATION.md):

    unshare -n sh -c 'ip link set lo up && .venv/bin/python tools/bench_interference.py'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from machine import free_port  # tools/machine.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _start(cmd: list[str], ready: str, env: dict, log_path: str, timeout: float = 600) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            if ready in f.read():
                return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    with open(log_path) as f:
        raise RuntimeError(f"{' '.join(cmd[3:6])} did not start:\n{f.read()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _stream(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
                  ) -> list[tuple[float, int]]:
    """(arrival time, tokens) per chunk of one streamed completion; the first entry is the request start."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logprobs": 0}
    events = [(time.monotonic(), 0)]
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            n = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in chunk.get("choices", []))
            if n:
                events.append((time.monotonic(), n))
    return events


async def _load(url: str, model: str, args: argparse.Namespace, vocab: int) -> dict:
    rng = random.Random(0)
    itl: list[tuple[float, float]] = []  # (time, gap per token)
    stop = asyncio.Event()
    burst_window: list[float] = []

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    async def steady(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            events = await _stream(client, url, model, prompt(args.short_len), args.gen)
            for (t0, _), (t1, k) in zip(events[1:], events[2:]):
                itl.extend([(t1, (t1 - t0) / k)] * k)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=100)) as client:
        await _stream(client, url, model, prompt(args.long_len), 2)  # warm both paths once
        tasks = [asyncio.ensure_future(steady(client)) for _ in range(args.streams)]
        await asyncio.sleep(args.warmup)
        burst_start = time.monotonic()
        results = await asyncio.gather(*(_stream(client, url, model, prompt(args.long_len), 1)
                                         for _ in range(args.burst)))
        burst_end = time.monotonic()
        burst_window = [burst_start, burst_end]
        await asyncio.sleep(args.tail)
        stop.set()
        await asyncio.gather(*tasks)
    ttft = [ev[1][0] - ev[0][0] for ev in results]
    before = [g for t, g in itl if burst_start - args.warmup * 0.6 <= t < burst_start]
    during = [g for t, g in itl if burst_window[0] <= t <= burst_window[1]]
    ms = 1000.0
    return {"itl_before_p50_ms": _pct(before, 50) * ms, "itl_before_p99_ms": _pct(before, 99) * ms,
            "itl_burst_p50_ms": _pct(during, 50) * ms, "itl_burst_p99_ms": _pct(during, 99) * ms,
            "itl_burst_max_ms": max(during, default=float("nan")) * ms,
            "samples_before": len(before), "samples_burst": len(during),
            "burst_seconds": burst_end - burst_start, "burst_ttft_p50_s": statistics.median(ttft),
            "burst_ttft_max_s": max(ttft)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint dir (default: a random `bench`-preset checkpoint)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--burst", type=int, default=4)
    p.add_argument("--long-len", type=int, default=1024)
    p.add_argument("--warmup", type=float, default=8.0)
    p.add_argument("--tail", type=float, default=2.0)
    p.add_argument("--modes", default="colocated,pd")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="pdbench-")
    model = args.model
    if model is None:
        from engine.checkpoint.random_ckpt import make_random_checkpoint

        model = os.path.join(work, "bench")
        make_random_checkpoint(model, "bench", seed=0)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PDSERVE_STATE_DIR": work, "PYTHONPATH": ROOT}
    engine = {"dtype": "bfloat16", "kv_cache_memory_gb": 0.25, "max_num_batched_tokens": 2048}
    results = {}
    for mode in args.modes.split(","):
        port = free_port()
        if mode == "colocated":
            cmd = ["taskset", "-c", "0,1", sys.executable, "-m", "serving.cli", "serve", "--model", model,
                   "--port", str(port), "--log-level", "warning"]
            for k, v in engine.items():
                cmd += ["--" + k.replace("_", "-"), str(v)]
            proc = _start(cmd, "pdserve: serving", {**env, "OMP_NUM_THREADS": "2"}, os.path.join(work, f"{mode}.log"))
        else:
            cfg = os.path.join(work, "pd.yaml")
            with open(cfg, "w") as f:
                json.dump({"model": model, "engine": engine, "ray": {"num_cpus": 2, "object_store_memory_mb": 256},
                           "router": {"host": "127.0.0.1", "port": port},
                           "pools": {"prefill": {"instances": 1, "resources": {"cpu_affinity": [0]}},
                                     "decode": {"instances": 1, "resources": {"cpu_affinity": [1]}}}}, f)
            cmd = ["taskset", "-c", "0,1", sys.executable, "-m", "serving.cli", "up", "--config", cfg,
                   "--log-level", "warning"]
            proc = _start(cmd, "pdserve: router at", env, os.path.join(work, f"{mode}.log"))
        try:
            url = f"http://127.0.0.1:{port}"
            name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            results[mode] = asyncio.run(_load(url, name, args, vocab))
        finally:
            _stop(proc)
        print(mode, json.dumps(results[mode], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"{'mode':<10} {'ITL p50/p99 before (ms)':>24} {'ITL p50/p99 burst (ms)':>24} {'burst TTFT p50/max (s)':>24}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['itl_before_p50_ms']:>11.1f} /{r['itl_before_p99_ms']:>10.1f} "
              f"{r['itl_burst_p50_ms']:>11.1f} /{r['itl_burst_p99_ms']:>10.1f} "
              f"{r['burst_ttft_p50_s']:>11.2f} /{r['burst_ttft_max_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Live expert rebalancing on the local parallel deployment, with a skewed workload: balancedness and
throughput before and after, for both pools.

Starts ``pdserve up`` on a copy of ``deploy/examples/local-cpu.yaml`` (prefill TP2+SP+EP2, decode
DP2+EP2 with 2 redundant experts; automatic rebalancing off so the script decides when), sends a
skewed workload — prompts that repeat a few tokens, so every MoE layer routes nearly all tokens to
the same few experts — and prints, per pool, the observed balancedness (mean over max tokens per EP
rank, mean over layers; from ``GET /expert_load``) and throughput, then ``POST /admin/rebalance``,
then the same workload and figures again. Loopback only; run it in a network namespace of its own:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python tools/demo_rebalance.py'

Throughput: decode tokens/s = tokens after each request's first, over the time from the first
request's first token to the last request's last token; prefill = mean TTFT of the round; the
median of ``--rounds`` rounds each side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_description, free_port  # noqa: E402  (tools/machine.py)




async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0]["text"]:
                    times.append(time.perf_counter())
    return {"start": t0, "times": times}


async def _round(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        results = await asyncio.gather(*(_one(client, url, model, p, max_tokens) for p in prompts))
    first = min(r["times"][0] for r in results)
    last = max(r["times"][-1] for r in results)
    # streamed chunks, not tokens: count tokens with usage-free arithmetic (ignore_eos: max_tokens each)
    decode_tokens = len(prompts) * (max_tokens - 1)
    return {"decode_tok_s": decode_tokens / (last - first),
            "ttft_s": sum(r["times"][0] - r["start"] for r in results) / len(results)}


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def _balance(url: str) -> dict:
    pools = httpx.get(url + "/expert_load", timeout=30).json()["pools"]
    return {role: (p["balancedness_mean"], [i["version"] for i in p["instances"].values()]) for role, p in pools.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "deploy/examples/local-cpu.yaml"))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--hot-tokens", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds before and after (the median is printed)")
    args = ap.parse_args()

    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    model = cfg["model"]
    if not os.path.isabs(model):
        model = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(args.config)), model))
    port = free_port()
    cfg.update(model=model)
    cfg["router"].update(port=port, eplb={"auto": False, "interval_s": 1.0, "window": 600, "min_tokens": 100})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deploy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        state = os.path.join(tmp, "up.json")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        up = subprocess.Popen([sys.executable, "-m", "serving.cli", "up", "--config", path, "--state-file", state],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while not os.path.exists(state):
                if up.poll() is not None or time.monotonic() > deadline:
                    print(up.stdout.read())
                    raise SystemExit("pdserve up did not start")
                time.sleep(1)
            served = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            while not all(p["instances"] for p in httpx.get(url + "/expert_load", timeout=30).json()["pools"].values()):
                time.sleep(0.5)  # the router's first report of each pool is its baseline: wait for it
            hot = args.hot_tokens
            # a distinct first token per request (no prefix-cache hits), then one hot token repeated
            prompts = [[100 + i] + [hot[i % len(hot)]] * (args.prompt_len - 1) for i in range(args.requests)]
            asyncio.run(_round(url, served, prompts, args.output_len))  # warm-up: fills the load window
            time.sleep(3)  # two health rounds: the last counts reach the router
            before = _balance(url)
            detail = httpx.get(url + "/expert_load?detail=true", timeout=30).json()["pools"]
            if os.environ.get("DEMO_DUMP"):
                with open(os.environ["DEMO_DUMP"], "w") as f:
                    json.dump({"detail": detail, "pools": httpx.get(url + "/pools", timeout=30).json()}, f)
            r0 = _median([asyncio.run(_round(url, served, prompts, args.output_len)) for _ in range(args.rounds)])
            t0 = time.perf_counter()
            res = httpx.post(url + "/admin/rebalance", json={}, timeout=600).json()
            took = time.perf_counter() - t0
            asyncio.run(_round(url, served, prompts, args.output_len))  # fills the new placement's window
            time.sleep(3)
            after = _balance(url)
            r1 = _median([asyncio.run(_round(url, served, prompts, args.output_len)) for _ in range(args.rounds)])
        finally:
            subprocess.run([sys.executable, "-m", "serving.cli", "down", "--state-file", state], cwd=ROOT, env=env,
                           capture_output=True, timeout=120)
            up.wait(timeout=120)

    print(f"CPU: {cpu_description()}")
    print(f"deployment: {os.path.relpath(args.config, ROOT)} (float32); workload: {args.requests} requests, "
          f"prompts of {args.prompt_len} x one of tokens {hot}, {args.output_len} tokens out, greedy")
    print(f"POST /admin/rebalance took {took:.2f} s")
    for role, summary in res["pools"].items():
        if summary.get("why"):
            print(f"  {role}: {summary['outcome']}: {summary['why']}")
        for name, inst in summary.get("instances", {}).items():
            if inst.get("why"):
                print(f"  {name}: {inst['outcome']}: {inst['why']}")
            print(f"  {name}: {inst['outcome']}; slots moved {inst.get('slots_moved')}, "
                  f"bytes {inst.get('moved_bytes', 0)}, longest layer pause {inst.get('max_layer_pause_s', 0)} s, "
                  f"predicted balancedness {inst.get('predicted_balancedness_before')} -> "
                  f"{inst.get('predicted_balancedness_after')}")
    for role, p in detail.items():
        for name, inst in p["instances"].items():
            print(f"  {name} before: tokens per logical expert, layer 0: {inst['logical_load'][0]}; "
                  f"per slot: {inst['physical_load'][0]}")
    print()
    print("| pool | balancedness before | after | placement version |")
    print("|---|---|---|---|")
    for role in ("prefill", "decode"):
        print(f"| {role} | {before[role][0]} | {after[role][0]} | {before[role][1]} -> {after[role][1]} |")
    print()
    print("| | before | after | after / before |")
    print("|---|---|---|---|")
    print(f"| decode tok/s (all requests) | {r0['decode_tok_s']:.1f} | {r1['decode_tok_s']:.1f} | "
          f"{r1['decode_tok_s'] / r0['decode_tok_s']:.2f} |")
    print(f"| mean TTFT, s (prefill pool) | {r0['ttft_s']:.3f} | {r1['ttft_s']:.3f} | {r1['ttft_s'] / r0['ttft_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

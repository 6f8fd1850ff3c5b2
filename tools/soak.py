"""Load and soak test of a running pdserve endpoint (dev server or PD router), then a burst.

    .venv/bin/python tools/soak.py --base-url http://127.0.0.1:8000 [--requests 2000 --concurrency 64
        --warmup 200 --max-tokens 4:48 --burst 384 --server-pid PID --json report.json]

Phases, each a pass/fail criterion:

1. **warm-up** (``--warmup`` requests, same mix), then the server drains: the RSS baseline.
2. **soak**: ``--requests`` streaming requests, ``--concurrency`` at a time, seeded mix of
   completions and chat, prompts of 1 to ~400 tokens (slices of a Python source file: the
   bundled model's domain), ``max_tokens`` drawn from ``--max-tokens``, ``n = 2`` for
   ``--n2-share`` of them (``n`` stays <= 2 so ``concurrency`` requests fit the dev server's
   admission limit of ``2 * max_num_seqs`` sequences when ``concurrency <= max_num_seqs``),
   stop strings for ``--stop-share``, and ``--cancel-share`` cancelled by the client after a
   few chunks. Every other stream must be well-formed and complete: status 200, JSON events
   of one id, then ``data: [DONE]``; each choice ends once with ``stop`` or ``length``; the
   tokens each choice streamed (counted from per-token logprobs) add up to
   ``usage.completion_tokens``, a ``length`` choice has exactly ``max_tokens`` of them, a
   ``stop`` one at most that. Criteria: 0 lost (no answer, timeout, cut stream), 0 errors.
3. **drain**: KV blocks in use (``pdserve_kv_blocks_used``) and running/waiting requests back
   to 0; RSS (of each ``--server-pid`` and its child processes, e.g. ``pdserve serve``'s engine
   process, via psutil when the server runs on this host, else
   ``process_resident_memory_bytes`` from ``/metrics``) at most ``--max-rss-growth`` above
   the baseline, for every process watched.
4. **burst**: ``--burst`` requests at once (default ``6 * concurrency``, above the admission
   limit). Criteria: some are answered 429, each with ``Retry-After``; none times out or
   fails otherwise; every admitted stream completes; the p99 time to first token of the
   admitted ones is at most ``--burst-ttft-bound`` seconds, by default twice the soak's p99
   end-to-end latency: an admitted request waits at most for the running ones to finish,
   then for its own prefill. Then the server drains again.

Prints a report (and ``--json``); exits 1 if any criterion failed. Against a PD router the
RSS read from ``/metrics`` is the router's own process (give ``--server-pid`` once per
process to watch the router and each worker); KV and queue gauges are whatever the router's ``/metrics`` exposes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from typing import Any

import httpx

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
STOP_SETS = (["\n\n"], ["return", ":"], ["def "], ["\n"])


# ---- the workload ------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """One request of the mix."""

    path: str
    body: dict[str, Any]
    max_tokens: int
    n: int
    cancel_after: int | None  # content chunks to read before the client closes; None = read to the end


def _source_text() -> str:
    import inspect
    import json as json_module

    return inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)


def make_specs(count: int, seed: int, args: argparse.Namespace, source: str) -> list[Spec]:
    rng = random.Random(seed)
    low, high = args.max_tokens
    specs = []
    for _ in range(count):
        start = rng.randrange(0, len(source) - 1600)
        prompt = source[start:start + rng.choice((4, 40, 200, 600, 1500))] or "def"
        max_tokens = rng.randint(low, high)
        n = 2 if rng.random() < args.n2_share else 1
        body: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "stream": True,
                                "stream_options": {"include_usage": True}, "temperature": rng.choice((0.0, 0.8)),
                                "seed": rng.randrange(2**31)}
        if rng.random() < args.stop_share:
            body["stop"] = rng.choice(STOP_SETS)
        if rng.random() < 0.6:
            path = COMPLETIONS
            body.update(prompt=prompt, logprobs=0)
        else:
            path = CHAT
            body.update(messages=[{"role": "user", "content": prompt}], logprobs=True, top_logprobs=0)
        cancel = rng.randint(1, 3) if rng.random() < args.cancel_share else None
        specs.append(Spec(path, body, max_tokens, n, cancel))
    return specs


# ---- one streaming request, checked ---------------------------------------------------
@dataclasses.dataclass
class Outcome:
    status: int | None = None  # None: no answer
    ok: bool = False
    cancelled: bool = False
    problem: str | None = None  # why it is not ok (None when ok or cancelled)
    retry_after: str | None = None
    ttft: float | None = None
    e2e: float | None = None


def _choice_tokens(path: str, choice: dict[str, Any]) -> int:
    lp = choice.get("logprobs")
    if not lp:
        return 0
    return len(lp["tokens"]) if path == COMPLETIONS else len(lp["content"])


def _has_content(path: str, choice: dict[str, Any]) -> bool:
    return bool(choice.get("text") if path == COMPLETIONS else choice.get("delta", {}).get("content"))


def check_events(spec: Spec, events: list[str]) -> str | None:
    """What is wrong with a complete stream of ``spec`` (None: nothing)."""
    if not events or events[-1] != "[DONE]":
        return "the stream does not end with [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"error event: {next(c for c in chunks if 'error' in c)}"
    if len({c["id"] for c in chunks}) != 1:
        return "events of more than one id"
    tokens = [0] * spec.n
    finishes: dict[int, list[str]] = {k: [] for k in range(spec.n)}
    usage = None
    for c in chunks:
        if c.get("usage") is not None and not c["choices"]:
            usage = c["usage"]
        for choice in c["choices"]:
            k = choice["index"]
            if k not in finishes:
                return f"choice index {k} outside [0, {spec.n})"
            tokens[k] += _choice_tokens(spec.path, choice)
            if choice.get("finish_reason") is not None:
                finishes[k].append(choice["finish_reason"])
    for k, reasons in finishes.items():
        if len(reasons) != 1 or reasons[0] not in ("stop", "length"):
            return f"choice {k} finished with {reasons}"
        if reasons[0] == "length" and tokens[k] != spec.max_tokens:
            return f"choice {k} stopped for length after {tokens[k]} tokens, max_tokens {spec.max_tokens}"
        if tokens[k] > spec.max_tokens:
            return f"choice {k} streamed {tokens[k]} tokens, max_tokens {spec.max_tokens}"
    if usage is None:
        return "no usage chunk"
    if usage["completion_tokens"] != sum(tokens) or usage["prompt_tokens"] <= 0:
        return f"usage {usage} does not match the {sum(tokens)} tokens streamed"
    return None


async def run_one(client: httpx.AsyncClient, spec: Spec, timeout: float) -> Outcome:
    out = Outcome()
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", spec.path, json=spec.body) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    out.retry_after = r.headers.get("retry-after")
                    out.problem = f"status {r.status_code}: {r.text[:200]}"
                    return out
                events, content_chunks = [], 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: "):])
                    if events[-1] == "[DONE]":
                        break
                    chunk = json.loads(events[-1])
                    if any(_has_content(spec.path, ch) for ch in chunk.get("choices", [])):
                        content_chunks += 1
                        if out.ttft is None:
                            out.ttft = time.monotonic() - start
                        if spec.cancel_after is not None and content_chunks >= spec.cancel_after:
                            out.cancelled = True
                            return out  # leaving the block closes the connection mid-stream
        out.e2e = time.monotonic() - start  # also a stream that ended before its cancel point: checked whole
        out.problem = check_events(spec, events)
        out.ok = out.problem is None
    except TimeoutError:
        out.problem = f"no complete answer within {timeout:.0f} s"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out.problem = f"{type(e).__name__}: {e}"
    return out


async def run_phase(client: httpx.AsyncClient, specs: list[Spec], concurrency: int, timeout: float) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(spec: Spec) -> Outcome:
        async with gate:
            return await run_one(client, spec, timeout)

    return await asyncio.gather(*(gated(s) for s in specs))


# ---- the server's side -----------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition (the gauges this tool reads)."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+|NaN)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


class Server:
    def __init__(self, client: httpx.AsyncClient, pids: list[int]):
        self.client = client
        self.processes = []
        if pids:
            import psutil

            roots = [psutil.Process(pid) for pid in pids]  # and their children: the dev server's engine process
            self.processes = list({p.pid: p for r in roots for p in (r, *r.children(recursive=True))}.values())

    async def metrics(self) -> dict[str, float]:
        r = await self.client.get("/metrics")
        r.raise_for_status()
        return parse_metrics(r.text)

    async def rss(self) -> dict[str, float | None]:
        """RSS per watched process (``--server-pid``), else the server's own from ``/metrics``."""
        if self.processes:
            return {str(p.pid): float(p.memory_info().rss) for p in self.processes}
        return {"server": (await self.metrics()).get("process_resident_memory_bytes")}

    async def drained(self, timeout: float) -> tuple[bool, dict[str, float]]:
        """Wait (bounded) for KV blocks in use and running/waiting requests to reach 0."""
        deadline = time.monotonic() + timeout
        names = ("pdserve_kv_blocks_used", "pdserve_num_requests_running", "pdserve_num_requests_waiting")
        while True:
            m = await self.metrics()
            if all(m.get(name, 0.0) == 0.0 for name in names):
                return True, {name: m.get(name) for name in names}
            if time.monotonic() > deadline:
                return False, {name: m.get(name) for name in names}
            await asyncio.sleep(0.5)


# ---- the report -----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _phase_summary(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    return {
        "requests": len(outcomes), "completed": len(ok), "cancelled": sum(o.cancelled for o in outcomes),
        "lost": sum(1 for o in outcomes if o.status is None or (o.status == 200 and not o.ok and not o.cancelled)),
        "errors": sum(1 for o in outcomes if o.status is not None and o.status != 200),
        "status_429": sum(o.status == 429 for o in outcomes), "seconds": round(seconds, 1),
        "ttft_p50_s": percentile([o.ttft for o in ok if o.ttft is not None], 50),
        "ttft_p99_s": percentile([o.ttft for o in ok if o.ttft is not None], 99),
        "e2e_p50_s": percentile([o.e2e for o in ok], 50), "e2e_p99_s": percentile([o.e2e for o in ok], 99),
        "problems": sorted({o.problem for o in outcomes if o.problem and o.status != 429})[:10],
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency, args.burst) + 8, max_keepalive_connections=None)
    report: dict[str, Any] = {"base_url": args.base_url, "criteria": {}}
    criteria = report["criteria"]
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=args.timeout) as client:
        server = Server(client, args.server_pid)
        source = _source_text()
        t0 = time.monotonic()
        warm = await run_phase(client, make_specs(args.warmup, args.seed + 1, args, source), args.concurrency,
                               args.timeout)
        report["warmup"] = _phase_summary(warm, time.monotonic() - t0)
        await server.drained(args.drain_timeout)
        rss_base = await server.rss()

        t0 = time.monotonic()
        outcomes = await run_phase(client, make_specs(args.requests, args.seed, args, source), args.concurrency,
                                   args.timeout)
        main = report["soak"] = _phase_summary(outcomes, time.monotonic() - t0)
        criteria["soak: 0 lost"] = main["lost"] == 0
        criteria["soak: 0 errors (cancelled apart)"] = main["errors"] == 0 and main["completed"] + main["cancelled"] \
            == main["requests"]
        drained, gauges = await server.drained(args.drain_timeout)
        report["after_soak"] = gauges
        criteria["soak: KV blocks and queues back to 0"] = drained
        rss_after = await server.rss()
        growth = {k: (rss_after[k] / rss_base[k] - 1.0) if rss_base.get(k) and rss_after.get(k) else None
                  for k in rss_after}
        report["rss"] = {"after_warmup_bytes": rss_base, "after_soak_bytes": rss_after,
                         "growth": {k: None if g is None else round(g, 4) for k, g in growth.items()},
                         "source": "psutil" if args.server_pid else "/metrics process_resident_memory_bytes"}
        criteria[f"soak: RSS growth <= {args.max_rss_growth:.0%} after warm-up"] = \
            all(g is not None and g <= args.max_rss_growth for g in growth.values())

        no_cancel = argparse.Namespace(**{**vars(args), "cancel_share": 0.0})
        burst_specs = make_specs(args.burst, args.seed + 2, no_cancel, source)
        t0 = time.monotonic()
        burst = await run_phase(client, burst_specs, args.burst, args.timeout)
        b = report["burst"] = _phase_summary(burst, time.monotonic() - t0)
        admitted = [o for o in burst if o.status == 200]
        bound = args.burst_ttft_bound
        if bound is None:
            bound = args.burst_ttft_factor * (main["e2e_p99_s"] or 0.0)
        b["ttft_bound_s"] = round(bound, 3)
        b["admitted"] = len(admitted)
        criteria["burst: some answered 429"] = b["status_429"] > 0
        criteria["burst: every 429 has Retry-After"] = all(o.retry_after for o in burst if o.status == 429)
        criteria["burst: no other error, no timeout, admitted streams complete"] = (
            b["status_429"] + b["completed"] == b["requests"])
        criteria["burst: p99 TTFT of admitted <= bound"] = (b["ttft_p99_s"] is not None and b["ttft_p99_s"] <= bound)
        drained, gauges = await server.drained(args.drain_timeout)
        report["after_burst"] = gauges
        criteria["burst: KV blocks and queues back to 0"] = drained
    report["passed"] = all(criteria.values())
    return report


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def print_report(report: dict[str, Any]) -> None:
    for phase in ("warmup", "soak", "burst"):
        p = report[phase]
        line = ", ".join(f"{k} {v}" for k, v in p.items() if k != "problems" and v is not None)
        print(f"{phase}: {line}")
        for problem in p["problems"]:
            print(f"  problem: {problem}")
    print(f"rss: {report['rss']}")
    print(f"after soak: {report['after_soak']}; after burst: {report['after_burst']}")
    for name, ok in report["criteria"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    print("PASS" if report["passed"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (no /v1)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-tokens", type=_range, default=(4, 48), help="LOW:HIGH, drawn uniformly")
    p.add_argument("--n2-share", type=float, default=0.2, help="share of requests with n=2")
    p.add_argument("--stop-share", type=float, default=0.3, help="share of requests with stop strings")
    p.add_argument("--cancel-share", type=float, default=0.1, help="share the client cancels mid-stream")
    p.add_argument("--burst", type=int, default=None, help="requests sent at once after the soak (default 6 x C)")
    p.add_argument("--burst-ttft-bound", type=float, default=None,
                   help="seconds (default: --burst-ttft-factor x the soak's p99 end-to-end latency)")
    p.add_argument("--burst-ttft-factor", type=float, default=2.0)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--server-pid", type=int, action="append", default=[],
                   help="read RSS of this process with psutil (on this host); repeat for several, e.g. PD workers")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take in all")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"))
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if args.burst is None:
        args.burst = 6 * args.concurrency
    report = asyncio.run(soak(args))
    report["command"] = " ".join(["tools/soak.py", *(argv if argv is not None else sys.argv[1:])])
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

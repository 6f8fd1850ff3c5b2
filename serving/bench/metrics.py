"""Throughput and latency statistics of one run (one endpoint at one concurrency or rate).

Definitions (those of vLLM's ``vllm bench serve``, except where noted):

* duration: from the first request sent to the last response finished;
* requests/s: successful requests / duration; output tok/s: their output tokens /
  duration; total tok/s: their prompt + output tokens / duration;
* TTFT: request sent -> first chunk with non-empty content (vLLM takes the first chunk
  with any ``choices``; the two differ only when a server sends an empty first delta);
* TPOT: per request, (E2E - TTFT) / (output tokens - 1), requests with one token skipped;
* ITL: every gap between consecutive content chunks, pooled over all requests (a chunk
  carrying several tokens counts once, as in vLLM);
* E2E: request sent -> ``data: [DONE]``.

Percentiles are numpy's linear interpolation; latencies are reported in milliseconds
over the successful requests only. Failed requests are counted by error kind.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

import numpy as np

from serving.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean and percentiles in ms; None when there are no values."""
    v = np.asarray(list(values_s), dtype=float) * 1000.0
    if v.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """The per-request (per-gap for ITL) latency samples in seconds, successful requests only."""
    ok = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [g for r in ok for g in r.itl_s],
        "e2el": [r.e2e_s for r in ok if r.e2e_s is not None],
    }


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    samples = latency_samples(records)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(collections.Counter(r.error for r in records if not r.ok).items())),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **{f"{name}_ms": stats_ms(samples[name]) for name in LATENCIES},
    }

"""Prometheus metrics for the API surfaces, in their own ``CollectorRegistry``.

Names are prefixed ``pdserve_``. Per-request metrics carry a ``protocol`` label
("http" here; the gRPC server shares the same ``ServingMetrics`` with "grpc"):

* histograms ``time_to_first_token_seconds``, ``inter_token_latency_seconds`` (time
  between successive outputs of a request), ``e2e_request_latency_seconds``,
  ``request_queue_time_seconds`` (from the engine's ``RequestMetrics`` when it reports
  them), ``request_prompt_tokens``, ``request_generation_tokens``;
* counters ``request_success_total{finish_reason}`` (one per finished completion,
  so a request with ``n=4`` counts four), ``prompt_tokens_total``, ``generation_tokens_total``.

Engine-wide values are read from ``EngineClient.stats()`` at scrape time: counters
``num_preemptions_total``, ``prefix_cache_queries_total``, ``prefix_cache_hits_total``
(tokens), with MTP speculative decoding ``spec_decode_num_drafts_total``,
``spec_decode_num_draft_tokens_total``, ``spec_decode_num_accepted_tokens_total`` and
``spec_decode_num_accepted_tokens_per_pos_total{position}``; gauges ``num_requests_running``,
``num_requests_waiting``, ``kv_cache_usage_perc`` (a fraction in [0, 1], as vLLM's),
``kv_blocks_used`` and ``kv_blocks`` (all blocks). ``requests_rejected_total{protocol,reason}`` counts
requests turned away before reaching the engine's queue (``overloaded``: the 429s).
The standard ``process_*`` metrics (``process_resident_memory_bytes``, CPU seconds, open
files) describe the serving process, so a soak run can watch its memory from outside.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from engine.outputs import EngineStats

logger = logging.getLogger(__name__)

PREFIX = "pdserve_"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what prometheus_client itself answers a plain scrape with

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


def _spec_decode_metrics(s: EngineStats) -> Iterator[Metric]:
    yield CounterMetricFamily(PREFIX + "spec_decode_num_drafts", "Verify passes that checked MTP drafts.",
                              value=s.spec_drafts)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_draft_tokens", "MTP draft tokens verified.",
                              value=s.spec_draft_tokens)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens", "MTP draft tokens accepted.",
                              value=s.spec_accepted_tokens)
    per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                  "MTP draft tokens accepted, by draft position (0 = first).", labels=["position"])
    for pos, n in enumerate(s.spec_accepted_per_position):
        per_pos.add_metric([str(pos)], n)
    yield per_pos


class EngineStatsCollector:
    """Exposes ``EngineStats`` as Prometheus metrics, read fresh at every scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # a failing engine must not take /metrics down with it
            logger.exception("EngineClient.stats() failed; engine metrics omitted from this scrape")
            return
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Requests preempted by the scheduler.",
                                  value=s.num_preemptions)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits)
        if s.spec_drafts:
            yield from _spec_decode_metrics(s)
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests currently scheduled.", value=s.num_running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.",
                                value=s.num_waiting)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                value=s.kv_usage)
        yield GaugeMetricFamily(PREFIX + "kv_blocks_used", "KV cache blocks held by requests.",
                                value=s.kv_blocks_used)
        yield GaugeMetricFamily(PREFIX + "kv_blocks", "KV cache blocks in all (used or free).", value=s.kv_blocks_total)


class ServingMetrics:
    """All metrics of one server process; pass ``stats`` (``client.stats``) to expose engine values."""

    def __init__(self, stats: Callable[[], EngineStats] | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, ("protocol",)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.",
                              p, registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between successive outputs of a request.",
                             p, registry=r, buckets=_ITL_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last output.",
                             p, registry=r, buckets=_E2E_BUCKETS)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time a request waited before scheduling.",
                               p, registry=r, buckets=_E2E_BUCKETS)
        self.prompt_tokens_hist = Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens per request.",
                                            p, registry=r, buckets=_TOKEN_BUCKETS)
        self.generation_tokens_hist = Histogram(PREFIX + "request_generation_tokens",
                                                "Generated tokens per request (all completions).",
                                                p, registry=r, buckets=_TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Finished completions by finish reason.",
                               ("protocol", "finish_reason"), registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", p, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", p, registry=r)
        self.rejected = Counter(PREFIX + "requests_rejected", "Requests turned away before the engine queue.",
                                ("protocol", "reason"), registry=r)
        ProcessCollector(registry=r)
        if stats is not None:
            r.register(EngineStatsCollector(stats))

    def observe_first_token(self, protocol: str, seconds: float) -> None:
        self.ttft.labels(protocol).observe(seconds)

    def observe_inter_token(self, protocol: str, seconds: float) -> None:
        self.itl.labels(protocol).observe(seconds)

    def observe_finished(self, protocol: str, *, prompt_tokens: int, generation_tokens: int, e2e_seconds: float,
                         queue_seconds: float | None, finish_reasons: list[str]) -> None:
        """Record one engine request that ended (finished, or aborted when its client left)."""
        self.e2e.labels(protocol).observe(e2e_seconds)
        if queue_seconds is not None:
            self.queue.labels(protocol).observe(queue_seconds)
        self.prompt_tokens_hist.labels(protocol).observe(prompt_tokens)
        self.generation_tokens_hist.labels(protocol).observe(generation_tokens)
        self.prompt_tokens.labels(protocol).inc(prompt_tokens)
        self.generation_tokens.labels(protocol).inc(generation_tokens)
        for reason in finish_reasons:
            self.success.labels(protocol, reason).inc()

    def observe_rejected(self, protocol: str, reason: str) -> None:
        self.rejected.labels(protocol, reason).inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)

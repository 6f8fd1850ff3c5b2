"""Router metrics, exposed in the same ``/metrics`` exposition as serving's.

Names (prefix ``pdserve_router_``):

* ``stage_seconds{stage}`` histogram, stages in lifecycle order: ``queue`` (arrival →
  prefill call: decode reservation, worker choice), ``prefill`` (the prefill call:
  prompt → first token; the decode worker pulls the rows meanwhile), ``handoff``
  (prompt done on the prefill worker → sequence running on the decode worker: the
  rows not sent yet, the control message, joining the engine), ``decode`` (→ last token);
* ``kv_transfer_bytes_total`` counter and ``kv_transfer_seconds`` histogram (first
  pull → last piece, as the decode worker measured it);
* ``retries_total{cause}``: ``prefill_lost`` (prefill worker died/unresponsive,
  request sent to another), ``decode_lost`` (decode worker died mid-stream, request
  resumed), ``transfer_<cause>`` (hand-off failed, prefilled again);
* ``failures_total{cause}``: requests ended with an error: ``overloaded`` (429: past the
  router's admission limit), ``no_prefill_worker``, ``no_decode_worker``, ``decode_full``,
  ``retries_exhausted``, ``resumes_exhausted``;
* ``requests_total{outcome}``: ``finished`` | ``aborted`` | ``failed``;
* gauges ``workers{pool}`` and ``healthy_workers{pool}``, read at scrape time.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

PREFIX = "pdserve_router_"
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                  300.0, 900.0)


class _PoolGauges:
    def __init__(self, pools: Callable[[], dict[str, tuple[int, int]]]):
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(PREFIX + "workers", "Workers configured per pool.", labels=["pool"])
        healthy = GaugeMetricFamily(PREFIX + "healthy_workers", "Workers in rotation per pool.", labels=["pool"])
        for pool, (total, up) in sorted(self._pools().items()):
            workers.add_metric([pool], total)
            healthy.add_metric([pool], up)
        yield workers
        yield healthy


class RouterMetrics:
    """Created unregistered; ``attach(registry)`` adds them to a serving registry."""

    def __init__(self, pools: Callable[[], dict[str, tuple[int, int]]]):
        self.stage = Histogram(PREFIX + "stage_seconds", "Time per PD lifecycle stage.", ("stage",),
                               registry=None, buckets=_STAGE_BUCKETS)
        self.transfer_bytes = Counter(PREFIX + "kv_transfer_bytes", "KV payload bytes handed from prefill to decode.",
                                      registry=None)
        self.transfer_seconds = Histogram(PREFIX + "kv_transfer_seconds", "Time to fetch one KV payload.",
                                          registry=None, buckets=_STAGE_BUCKETS)
        self.retries = Counter(PREFIX + "retries", "Requests retried or resumed, by cause.", ("cause",), registry=None)
        self.failures = Counter(PREFIX + "failures", "Requests ended with an error, by cause.", ("cause",),
                                registry=None)
        self.requests = Counter(PREFIX + "requests", "Requests by outcome.", ("outcome",), registry=None)
        self.pool_gauges = _PoolGauges(pools)

    def attach(self, registry: CollectorRegistry) -> None:
        for collector in (self.stage, self.transfer_bytes, self.transfer_seconds, self.retries, self.failures,
                          self.requests, self.pool_gauges):
            registry.register(collector)

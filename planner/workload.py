"""The load a deployment must serve: request rate, length distributions, prefix-cache hits.

Lengths are log-normal, given by mean and coefficient of variation (cv 0 = every
request the same length). From them come the numbers the step simulation needs:

* prefill: new (uncached) tokens per request, and the context each new token attends to
  on average, weighted by tokens: a prompt of S tokens with a cached prefix h*S has
  (1-h)*S new tokens attending to S*(1+h)/2 tokens on average, so per new token the
  mean context is E[S^2]/E[S] * (1+h)/2 (long prompts dominate);
* decode: the KV length of a running sequence at a random decode step (each output
  token is one step): E[I] + E[O^2]/(2 E[O]) for independent input I and output O,
  its spread (for attention imbalance across data-parallel ranks), and concurrency by
  Little's law.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

_N = NormalDist()


@dataclasses.dataclass(frozen=True)
class Lengths:
    mean: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        if self.mean <= 0 or self.cv < 0:
            raise ValueError(f"lengths need mean > 0 and cv >= 0, got mean={self.mean}, cv={self.cv}")

    @property
    def _sigma2(self) -> float:
        return math.log1p(self.cv * self.cv)

    def moment(self, n: int) -> float:
        """E[X^n] of the log-normal with this mean and cv."""
        mu = math.log(self.mean) - self._sigma2 / 2
        return math.exp(n * mu + n * n * self._sigma2 / 2)

    def quantile(self, p: float) -> float:
        if self.cv == 0:
            return self.mean
        mu = math.log(self.mean) - self._sigma2 / 2
        return math.exp(mu + math.sqrt(self._sigma2) * _N.inv_cdf(p))


@dataclasses.dataclass(frozen=True)
class Load:
    input: Lengths
    output: Lengths
    cache_hit: float = 0.0  # fraction of input tokens found in the prefix cache
    request_rate: float = 0.0  # requests/s the deployment must sustain (0: capacity only)

    def __post_init__(self) -> None:
        if not 0 <= self.cache_hit < 1:
            raise ValueError(f"cache hit rate must be in [0, 1), got {self.cache_hit}")
        if self.request_rate < 0:
            raise ValueError(f"request rate must be >= 0, got {self.request_rate}")

    # ---- prefill ----------------------------------------------------------------------
    @property
    def new_tokens_per_request(self) -> float:
        return self.input.mean * (1 - self.cache_hit)

    @property
    def prefill_context_per_new_token(self) -> float:
        return self.input.moment(2) / self.input.mean * (1 + self.cache_hit) / 2

    # ---- decode -----------------------------------------------------------------------
    @property
    def decode_kv_mean(self) -> float:
        """KV length of a sequence at a random decode step (output-token weighted)."""
        return self.input.mean + self.output.moment(2) / (2 * self.output.mean)

    @property
    def decode_kv_cv(self) -> float:
        i1, i2 = self.input.mean, self.input.moment(2)
        o1, o2, o3 = self.output.mean, self.output.moment(2), self.output.moment(3)
        second = i2 + i1 * o2 / o1 + o3 / (3 * o1)  # E[(I + U*O)^2] weighted by O, U ~ uniform(0, 1)
        mean = self.decode_kv_mean
        return math.sqrt(max(second - mean * mean, 0.0)) / mean

    def decode_kv_quantile_over_mean(self, p: float) -> float:
        """A high quantile of one sequence's KV length relative to the mean (log-normal fit)."""
        return Lengths(self.decode_kv_mean, self.decode_kv_cv).quantile(p) / self.decode_kv_mean

    # ---- rates --------------------------------------------------------------------------
    @property
    def input_token_rate(self) -> float:
        return self.request_rate * self.input.mean

    @property
    def output_token_rate(self) -> float:
        return self.request_rate * self.output.mean


def expected_max_z(n: int) -> float:
    """About how many standard deviations the largest of n normal draws sits above the mean."""
    if n <= 1:
        return 0.0
    return _N.inv_cdf(1 - 1 / (n + 1))


def dp_imbalance(requests_per_rank: float, ranks: int, cv: float, top_over_mean: float, balanced: bool) -> float:
    """Most-loaded / mean attention work over the data-parallel ranks that step together.

    Every rank waits for the slowest at each layer's all_to_all. Without a balancer each
    rank's load is a sum of ``requests_per_rank`` random lengths. A load-aware balancer
    (DeepSeek's prefill and decode load balancers; pdserve's router ranks by KV in use)
    places each request on the least-loaded rank, which bounds the excess by about what
    the longest request (``top_over_mean`` times the mean) carries above an average one.
    """
    if ranks <= 1 or requests_per_rank <= 0:
        return 1.0
    if balanced:
        return 1.0 + max(top_over_mean - 1.0, 0.0) / requests_per_rank
    return 1.0 + expected_max_z(ranks) * cv / math.sqrt(requests_per_rank)

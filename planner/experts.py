"""Expert load skew: how much more work the busiest EP rank (or expert) gets than the mean.

Expert popularity is modelled as log-normal with a given coefficient of variation
(deterministic quantiles in a fixed shuffled order, so results repeat). Placement:

* without EPLB, physical slot i holds logical expert i mod E (redundant slots are plain
  copies of the first experts), ``slots/ep`` consecutive slots per rank;
* with EPLB, each redundant slot replicates the expert with the highest load per replica
  (DeepSeek's EPLB does the same), then replicas go heaviest-first to the least-loaded
  rank that has a free slot.

On top of that structural skew, a finite batch adds counting noise: a rank expecting
m token copies gets about m + z*sqrt(m), z growing with the number of ranks.
"""

from __future__ import annotations

import functools
import math
import random

from planner.workload import Lengths, expected_max_z

DEFAULT_POPULARITY_CV = 1.0


@functools.lru_cache(maxsize=64)
def popularity(n_experts: int, cv: float) -> tuple[float, ...]:
    """Mean-1 expert loads, log-normal quantiles in a fixed shuffled order."""
    if cv == 0:
        return (1.0,) * n_experts
    dist = Lengths(1.0, cv)
    loads = [dist.quantile((i + 0.5) / n_experts) for i in range(n_experts)]
    random.Random(0).shuffle(loads)
    mean = sum(loads) / n_experts
    return tuple(x / mean for x in loads)


@functools.lru_cache(maxsize=256)
def placement(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool) -> tuple[tuple[float, ...], ...]:
    """Per rank, the expected load (mean-1 per logical expert) of each physical slot it holds."""
    slots = n_experts + redundant
    if slots % ep:
        raise ValueError(f"{n_experts} experts + {redundant} redundant do not divide over ep={ep}")
    per_rank = slots // ep
    pop = popularity(n_experts, cv)
    if not eplb:
        copies = [1] * n_experts
        for s in range(n_experts, slots):
            copies[s % n_experts] += 1
        slot_load = [pop[s % n_experts] / copies[s % n_experts] for s in range(slots)]
        return tuple(tuple(slot_load[r * per_rank:(r + 1) * per_rank]) for r in range(ep))
    copies = [1] * n_experts
    for _ in range(redundant):
        e = max(range(n_experts), key=lambda i: pop[i] / copies[i])
        copies[e] += 1
    replicas = sorted((pop[e] / copies[e] for e in range(n_experts) for _ in range(copies[e])), reverse=True)
    ranks: list[list[float]] = [[] for _ in range(ep)]
    totals = [0.0] * ep
    for load in replicas:
        r = min((i for i in range(ep) if len(ranks[i]) < per_rank), key=lambda i: totals[i])
        ranks[r].append(load)
        totals[r] += load
    return tuple(tuple(r) for r in ranks)


def rank_skew(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, copies_per_rank: float) -> float:
    """Busiest rank's token copies / the mean, for ``copies_per_rank`` copies on average."""
    if ep <= 1:
        return 1.0
    totals = [sum(r) for r in placement(n_experts, redundant, ep, cv, eplb)]
    mean = sum(totals) / ep
    return expected_max_poisson([copies_per_rank * t / mean for t in totals]) / copies_per_rank


def expert_rows_max(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, tokens_per_rank: float,
                    top_k: int) -> float:
    """Expected rows of the busiest expert slot on the busiest rank (what a padded expert kernel pays for).

    A token picks ``top_k`` distinct experts, so one slot's rows are binomial over the tokens
    of every rank of the EP group.
    """
    ranks = placement(n_experts, redundant, max(ep, 1), cv, eplb)
    totals = [sum(r) for r in ranks]
    busiest = ranks[max(range(len(ranks)), key=lambda i: totals[i])]
    tokens = max(int(round(tokens_per_rank * max(ep, 1))), 1)  # every rank's tokens may pick this slot
    scale = tokens_per_rank * top_k / (sum(totals) / len(ranks))  # copies per unit of slot load
    return expected_max_binomial(tokens, [min(scale * load / tokens, 1.0) for load in busiest])


def expected_max_binomial(trials: int, probs: list[float]) -> float:
    """E[max] of independent Binomial(trials, p) counts, summing P(max > m); Poisson-normal when large."""
    means = [trials * p for p in probs]
    top = max(means, default=0.0)
    if top <= 0:
        return 0.0
    if trials > 2000:
        return expected_max_poisson(means)
    total = 0.0
    pmfs = [(1 - p) ** trials for p in probs]
    cdfs = list(pmfs)
    for m in range(trials):
        total += 1.0 - math.prod(cdfs)
        for i, p in enumerate(probs):
            if p < 1:
                pmfs[i] *= (trials - m) / (m + 1) * p / (1 - p)
                cdfs[i] = min(cdfs[i] + pmfs[i], 1.0)
        if math.prod(cdfs) > 1 - 1e-9:
            break
    return total


def expected_max_poisson(means: list[float]) -> float:
    """E[max] of independent Poisson counts: exact sum of P(max > m) for small means, normal beyond."""
    top = max(means, default=0.0)
    if top <= 0:
        return 0.0
    if top > 200:  # z * sqrt(m) above the largest mean, z from how many are near it
        near = sum(1 for m in means if m > top - 3 * math.sqrt(top))
        return top + expected_max_z(near) * math.sqrt(top)
    total, m, limit = 0.0, 0, int(top + 12 * math.sqrt(top) + 12)
    pmfs = [math.exp(-lam) for lam in means]  # P(X = 0)
    cdfs = list(pmfs)
    while m < limit:
        below = math.prod(cdfs)  # P(max <= m)
        total += 1.0 - below
        m += 1
        for i, lam in enumerate(means):
            pmfs[i] *= lam / m
            cdfs[i] += pmfs[i]
    return total

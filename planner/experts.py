"""Expert load skew: how much more work the busiest EP rank (or node) gets than the mean.

Expert popularity is modelled as log-normal with a given coefficient of variation:
deterministic quantiles, dealt to the experts in a shuffled order. Which expert (and so
which group) gets which quantile is one draw; the skews below use ``DRAWS`` seeded draws,
so a result repeats and does not hang on one lucky order.

Placement follows DeepSeek's EPLB (``rebalance_experts``; pdserve's ``engine/eplb.py``
with ``policy="auto"`` picks the same way):

* without EPLB, physical slot i holds logical expert i mod E (redundant slots are plain
  copies of the first experts), ``slots/ep`` consecutive slots per rank;
* **global** EPLB (the expert groups do not divide over the nodes, or one node): each
  redundant slot replicates the expert with the highest load per replica, then replicas
  go heaviest-first to the least-loaded rank that has a free slot;
* **hierarchical** EPLB (``n_group % nodes == 0``, e.g. prefill EP32 on 4 nodes, 8
  groups): whole expert groups go to nodes first (the partition whose heaviest node is
  lightest), then each node replicates and packs its own experts on its own ranks. A
  group's experts never leave their node, so group-limited routing (``topk_group`` of
  ``n_group`` groups) reaches fewer nodes, but the node imbalance of the group loads stays.

On top of that structural skew, one step's tokens are a finite sample: a rank expecting
m token copies gets a Poisson count (a multinomial over the ranks, counted per rank),
and the busiest of them sits about z*sqrt(m) above its mean (``expected_max_poisson``),
taken over the rank loads sorted and averaged over the draws (the typical load profile).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import random

from planner.workload import Lengths, expected_max_z

DEFAULT_POPULARITY_CV = 1.0
DRAWS = 16  # popularity draws every skew is averaged over
MAX_PARTITIONS = 1024  # group -> node partitions searched exhaustively (above: greedy)


@functools.lru_cache(maxsize=256)
def popularity(n_experts: int, cv: float, draw: int = 0) -> tuple[float, ...]:
    """Mean-1 expert loads: log-normal quantiles in the order of seeded draw ``draw``."""
    if cv == 0:
        return (1.0,) * n_experts
    dist = Lengths(1.0, cv)
    loads = [dist.quantile((i + 0.5) / n_experts) for i in range(n_experts)]
    random.Random(draw).shuffle(loads)
    mean = sum(loads) / n_experts
    return tuple(x / mean for x in loads)


def eplb_policy(n_experts: int, groups: int, nodes: int, eplb: bool) -> str:
    """``none``, ``global`` or ``hierarchical``: DeepSeek's rule (hierarchical when groups divide over nodes)."""
    if not eplb:
        return "none"
    if nodes > 1 and groups > 1 and groups % nodes == 0 and n_experts % groups == 0:
        return "hierarchical"
    return "global"


@dataclasses.dataclass(frozen=True)
class Placement:
    ranks: tuple[tuple[float, ...], ...]  # per rank (node by node, contiguous), the expected load of each slot
    experts: tuple[tuple[int, ...], ...]  # the logical expert in each of those slots
    nodes: int
    policy: str

    @property
    def rank_loads(self) -> list[float]:
        return [sum(r) for r in self.ranks]

    @property
    def node_loads(self) -> list[float]:
        per = len(self.ranks) // self.nodes
        loads = self.rank_loads
        return [sum(loads[n * per:(n + 1) * per]) for n in range(self.nodes)]


def _replicate(loads: dict[int, float], extra: int) -> list[tuple[float, int]]:
    """(load, expert) of every replica after giving ``extra`` replicas, one at a time, to the largest load per replica."""
    copies = dict.fromkeys(loads, 1)
    heap = [(-x, e) for e, x in loads.items()]
    heapq.heapify(heap)
    for _ in range(extra):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        heapq.heappush(heap, (-loads[e] / copies[e], e))
    return [(loads[e] / copies[e], e) for e in loads for _ in range(copies[e])]


def _pack(replicas: list[tuple[float, int]], ranks: int) -> list[list[tuple[float, int]]]:
    """Heaviest replica first onto the least-loaded rank with a free slot (equal slots per rank)."""
    per_rank = len(replicas) // ranks
    out: list[list[tuple[float, int]]] = [[] for _ in range(ranks)]
    heap = [(0.0, r) for r in range(ranks)]
    for rep in sorted(replicas, reverse=True):
        total, r = heapq.heappop(heap)
        out[r].append(rep)
        if len(out[r]) < per_rank:
            heapq.heappush(heap, (total + rep[0], r))
    return out


def _group_partitions(groups: int, nodes: int):
    """Every way to split ``groups`` groups into ``nodes`` unordered sets of equal size."""
    size = groups // nodes

    def rec(left: tuple[int, ...]):
        if not left:
            yield ()
            return
        first = left[0]
        for rest in itertools.combinations(left[1:], size - 1):
            remaining = tuple(g for g in left[1:] if g not in rest)
            for tail in rec(remaining):
                yield ((first, *rest),) + tail

    return rec(tuple(range(groups)))


def _n_partitions(groups: int, nodes: int) -> int:
    size = groups // nodes
    return math.factorial(groups) // (math.factorial(size) ** nodes * math.factorial(nodes))


def _groups_to_nodes(group_loads: list[float], nodes: int) -> list[tuple[int, ...]]:
    """The partition of groups over nodes whose heaviest node is lightest (greedy beyond MAX_PARTITIONS)."""
    groups = len(group_loads)
    if _n_partitions(groups, nodes) <= MAX_PARTITIONS:
        return list(min(_group_partitions(groups, nodes),
                        key=lambda p: max(sum(group_loads[g] for g in part) for part in p)))
    size = groups // nodes
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for g in sorted(range(groups), key=lambda g: -group_loads[g]):
        n = min((i for i in range(nodes) if len(parts[i]) < size), key=lambda i: sum(group_loads[x] for x in parts[i]))
        parts[n].append(g)
    return [tuple(p) for p in parts]


@functools.lru_cache(maxsize=1024)
def placement(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, nodes: int = 1, groups: int = 1,
              draw: int = 0) -> Placement:
    """Per rank, the expected load (mean-1 per logical expert) of each physical slot it holds."""
    slots = n_experts + redundant
    if slots % ep:
        raise ValueError(f"{n_experts} experts + {redundant} redundant do not divide over ep={ep}")
    nodes = nodes if nodes >= 1 and ep % nodes == 0 else 1
    per_rank = slots // ep
    pop = popularity(n_experts, cv, draw)
    policy = eplb_policy(n_experts, groups, nodes, eplb)
    if policy == "hierarchical" and slots % nodes:
        policy = "global"
    if policy == "none":
        copies = [1] * n_experts
        for s in range(n_experts, slots):
            copies[s % n_experts] += 1
        slot = [(pop[s % n_experts] / copies[s % n_experts], s % n_experts) for s in range(slots)]
        ranks = [slot[r * per_rank:(r + 1) * per_rank] for r in range(ep)]
    elif policy == "global":
        ranks = _pack(_replicate(dict(enumerate(pop)), redundant), ep)
    else:  # experts are grouped contiguously (group g = experts g*E/G ... (g+1)*E/G - 1), as the gate groups them
        per_group = n_experts // groups
        group_loads = [sum(pop[g * per_group:(g + 1) * per_group]) for g in range(groups)]
        ranks = []
        for part in _groups_to_nodes(group_loads, nodes):
            loads = {e: pop[e] for g in part for e in range(g * per_group, (g + 1) * per_group)}
            ranks += _pack(_replicate(loads, slots // nodes - len(loads)), ep // nodes)
    return Placement(tuple(tuple(x for x, _ in r) for r in ranks), tuple(tuple(e for _, e in r) for r in ranks),
                     nodes, policy)


@functools.lru_cache(maxsize=1024)
def load_profile(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, nodes: int = 1,
                 groups: int = 1) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean-1 rank loads and node loads, each sorted heaviest first and averaged over the popularity draws."""
    draws = DRAWS if cv > 0 else 1
    ranks: list[float] = []
    nodes_out: list[float] = []
    for draw in range(draws):
        p = placement(n_experts, redundant, ep, cv, eplb, nodes, groups, draw)
        for acc, loads in ((ranks, p.rank_loads), (nodes_out, p.node_loads)):
            mean = sum(loads) / len(loads)
            profile = sorted((x / mean / draws for x in loads), reverse=True)
            if not acc:
                acc.extend(profile)
            else:
                for i, x in enumerate(profile):
                    acc[i] += x
    return tuple(ranks), tuple(nodes_out)


@functools.lru_cache(maxsize=8192)
def skews(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, copies_per_rank: float, nodes: int = 1,
          groups: int = 1) -> tuple[float, float]:
    """(busiest rank, busiest node) token copies over the mean, for ``copies_per_rank`` copies per rank.

    The expected maximum of Poisson counts (one step's tokens) around the placement's
    expected loads, sorted and averaged over the popularity draws (``load_profile``).
    """
    if ep <= 1:
        return 1.0, 1.0
    ranks, node_loads = load_profile(n_experts, redundant, ep, cv, eplb, nodes, groups)
    per_node = copies_per_rank * ep / len(node_loads)
    return (expected_max_poisson([copies_per_rank * x for x in ranks]) / copies_per_rank,
            expected_max_poisson([per_node * x for x in node_loads]) / per_node)


def rank_skew(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, copies_per_rank: float,
              nodes: int = 1, groups: int = 1) -> float:
    """Busiest rank's token copies / the mean, for ``copies_per_rank`` copies on average."""
    return skews(n_experts, redundant, ep, cv, eplb, copies_per_rank, nodes, groups)[0]


def expert_rows_max(n_experts: int, redundant: int, ep: int, cv: float, eplb: bool, tokens_per_rank: float,
                    top_k: int) -> float:
    """Expected rows of the busiest expert slot on the busiest rank (what a padded expert kernel pays for).

    A token picks ``top_k`` distinct experts, so one slot's rows are binomial over the tokens
    of every rank of the EP group. (Used for single-node CPU instances: popularity draw 0.)
    """
    ranks = placement(n_experts, redundant, max(ep, 1), cv, eplb).ranks
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

"""Expert-parallel load balancer (EPLB): how many replicas each expert gets and where they live.

Input: the predicted load of every logical expert in every MoE layer (``weight [L, E]``, e.g.
tokens routed to it over the last minutes, see ``engine/expert_load.py``) and the instance's
shape: ``num_physical`` expert slots in all (``E`` + redundant), ``num_groups`` expert groups
(V3: ``n_group``), ``num_nodes`` nodes of ``num_ranks // num_nodes`` ranks each.

Output, per layer (DeepSeek's EPLB contract, ``rebalance_experts``, so callers can switch):

* ``phy2log [L, P]``: the logical expert held by each physical slot. Slot ``s`` lives on rank
  ``s // slots_per_rank``; node ``n`` is ranks ``n * ranks_per_node ...`` (contiguous).
* ``log2phy [L, E, X]``: the slots of each logical expert, ascending, padded with -1
  (``X`` = the largest replica count of any expert in any layer).
* ``logcnt [L, E]``: the number of replicas of each logical expert (>= 1; sums to ``P``).

A token routed to expert ``e`` goes to one of its replicas, evenly (``ExpertPlacement``), so a
slot's load is ``weight[e] / logcnt[e]`` and a rank's load is the sum over its slots.

Policies (both choose replica counts, then pack the replicas onto ranks, layer by layer):

* ``hierarchical`` (``auto`` picks it when ``num_groups % num_nodes == 0``: prefill, EP32): whole
  expert groups go to nodes (``num_groups // num_nodes`` per node), so group-limited routing
  reaches at most ``topk_group`` nodes; each node's ``P // num_nodes`` slots are shared among
  its own experts and packed onto its ranks. A group's experts never leave their node.
* ``global`` (otherwise: decode, EP144/EP320): one pool of ``P`` slots for all experts, packed onto
  all ranks, ignoring groups and nodes (the hierarchical steps with one group and one node).

The steps, per node (the whole instance for ``global``):

1. replica counts: the next replica goes to the expert with the largest ``load / replicas``,
   which minimises the largest per-replica load (DeepSeek's rule; exact for that objective);
2. greedy packing: heaviest replica first onto the lightest rank with a free slot (DeepSeek's);
3. swap refinement: while swapping a replica of the heaviest rank with a lighter one of another
   rank lowers the heaviest without making the other as heavy, do the best such swap;
4. replica-count search: the smallest largest replica is not always what packs best (more
   top-level replicas than ranks force two onto one rank), so move one replica at a time from
   a donor expert to an expert on the heaviest rank while the greedy packing's largest rank
   load (then the number of ranks at it) drops. Both tie rules of step 1 and the searched
   counts are packed (2-3) and the best kept. With one slot per rank steps 2-4 have nothing to
   do (step 1 is then optimal) and slots follow a canonical order (first replicas by expert id,
   then the extra ones), which moves few slots when the load changes.

Hierarchical, group -> node: DeepSeek packs groups greedily by group load. We solve every set of
groups a node can get (28 sets for V3's 8 groups on 4 nodes) with steps 1-4 and take the
partition whose worst node is lightest (the greedy one is among them; beyond
``MAX_PARTITIONS`` partitions we fall back to the greedy one). The result is never worse than
steps 1-2 alone, which is what DeepSeek's EPLB computes (``refine=False`` gives those).

Placement stability (``previous=``): a live rollout moves the weights of every slot whose
expert changes. Given the placement in use, per layer, with target = ``(1 + tolerance) x`` the
freshly balanced largest rank load: (a) the fresh placement, and for ``hierarchical`` also one
balanced inside the current group -> node split, are relabelled (nodes, ranks, slot order within
a rank: free) to keep the most slots, then replicas are swapped back into their old slots while
no rank exceeds the target; (b) the current placement is repaired (swaps, re-assigned redundant
slots) until every rank is within the target. The candidate with the fewest changed slots wins;
``Placement.changed_slots`` reports them. ``tolerance=0`` never gives up balance; the same load
twice gives zero changes.

Everything here is numpy on the CPU; torch tensors are accepted and returned as torch tensors.
No torch.distributed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from engine import eplb_moves
from engine.expert_load import balancedness

POLICIES = ("auto", "hierarchical", "global")


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass
class Placement:
    """A balanced placement and what it is predicted to do (all numpy)."""

    phy2log: np.ndarray  # [L, P] int64
    log2phy: np.ndarray  # [L, E, X] int64, -1 padded
    logcnt: np.ndarray  # [L, E] int64
    policy: str  # "hierarchical" | "global"
    rank_load: np.ndarray  # [L, R] float64: predicted load of every rank under ``weight``
    changed_slots: np.ndarray | None = None  # [L] int64 vs ``previous`` (None without one)

    @property
    def balancedness(self) -> np.ndarray:
        """[L] mean rank load / max rank load (1.0 = perfect)."""
        return balancedness(self.rank_load)

    @property
    def max_over_mean(self) -> np.ndarray:
        """[L] max rank load / mean rank load (1.0 = perfect)."""
        return _max_over_mean(self.rank_load)

    def replicas(self, layer: int) -> list[list[int]]:
        """Physical slots of every logical expert of one layer (``ExpertPlacement.replicas``)."""
        return [row[:n].tolist() for row, n in zip(self.log2phy[layer], self.logcnt[layer])]


def plan_placement(
    weight,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    *,
    policy: str = "auto",
    previous=None,
    tolerance: float = 0.0,
    refine: bool = True,
) -> Placement:
    """Replicate and place the experts of every layer; see the module docstring.

    weight [L, E] (any real dtype; numpy or torch): predicted load per logical expert.
    num_physical: slots in all (E + redundant), a multiple of ``num_ranks``.
    num_groups: expert groups (divides E); num_nodes divides num_ranks.
    policy: "auto" (hierarchical when ``num_groups % num_nodes == 0``, else global),
        "hierarchical" or "global".
    previous [L, P]: the placement in use (``phy2log``); the result then keeps as many slots as it
        can at no more than ``(1 + tolerance) x`` the balanced largest rank load, per layer, and
        reports ``changed_slots``.
    refine: False runs steps 1-2 only (what DeepSeek's EPLB computes), for comparison.
    """
    w = _as_numpy(weight).astype(np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {w.shape}")
    shape = _Shape.check(w.shape[1], num_physical, num_groups, num_nodes, num_ranks)
    policy = shape.resolve(policy)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weight must be finite and >= 0")
    groups, nodes = (num_groups, num_nodes) if policy == "hierarchical" else (1, 1)
    phy2log = _place(w, shape, groups, nodes, refine)
    changed = None
    if previous is not None:
        prev = _as_numpy(previous).astype(np.int64)
        if prev.shape != phy2log.shape:
            raise ValueError(f"previous phy2log has shape {prev.shape}, expected {phy2log.shape}")
        if prev.min() < 0 or prev.max() >= shape.num_logical:
            raise ValueError("previous phy2log holds an expert id out of range")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        phy2log = _stabilise(w, phy2log, prev, shape, groups, nodes, tolerance, refine)
        changed = changed_slots(prev, phy2log)
    log2phy, logcnt = log2phy_from_phy2log(phy2log, shape.num_logical)
    return Placement(phy2log, log2phy, logcnt, policy, predicted_rank_load(w, phy2log, num_ranks), changed)


def rebalance_experts(
    weight,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    previous=None,
    tolerance: float = 0.0,
):
    """DeepSeek EPLB's entry point, same arguments and results: (phy2log, log2phy, logcnt).

    Torch in, torch (int64, CPU) out; numpy in, numpy out. See ``plan_placement`` for the
    keyword-only extras and for the rank loads and changed-slot counts.
    """
    p = plan_placement(weight, num_replicas, num_groups, num_nodes, num_gpus,
                       policy=policy, previous=previous, tolerance=tolerance)
    if _is_torch(weight):
        import torch

        return torch.from_numpy(p.phy2log), torch.from_numpy(p.log2phy), torch.from_numpy(p.logcnt)
    return p.phy2log, p.log2phy, p.logcnt


def predicted_rank_load(weight, phy2log, num_ranks: int) -> np.ndarray:
    """[L, R] load of every rank if each expert's load splits evenly over its replicas."""
    w = _as_numpy(weight).astype(np.float64)
    p2l = _as_numpy(phy2log).astype(np.int64)
    cnt = _counts(p2l, w.shape[1])
    per_slot = np.take_along_axis(w / np.maximum(cnt, 1), p2l, axis=1)  # [L, P]
    return per_slot.reshape(p2l.shape[0], num_ranks, -1).sum(-1)


def changed_slots(old_phy2log, new_phy2log) -> np.ndarray:
    """[L] slots whose expert differs: the expert weights a rollout has to move, per layer."""
    return (_as_numpy(old_phy2log) != _as_numpy(new_phy2log)).sum(-1).astype(np.int64)


def log2phy_from_phy2log(phy2log, num_logical: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy [L, E, X] slots ascending, -1 padded; logcnt [L, E]) of a placement."""
    p2l = _as_numpy(phy2log).astype(np.int64)
    layers, num_phys = p2l.shape
    cnt = _counts(p2l, num_logical)
    width = max(int(cnt.max()), 1)
    order = np.argsort(p2l, axis=1, kind="stable")  # slots grouped by expert, ascending within
    experts = np.take_along_axis(p2l, order, axis=1)
    start = np.cumsum(cnt, axis=1) - cnt  # first position of each expert in ``order``
    rank = np.arange(num_phys)[None, :] - np.take_along_axis(start, experts, axis=1)
    log2phy = np.full((layers, num_logical, width), -1, dtype=np.int64)
    log2phy[np.arange(layers)[:, None], experts, rank] = order
    return log2phy, cnt


# ----------------------------------------------------------------------------- shape


@dataclasses.dataclass(frozen=True)
class _Shape:
    num_logical: int
    num_physical: int
    num_groups: int
    num_nodes: int
    num_ranks: int

    @classmethod
    def check(cls, num_logical, num_physical, num_groups, num_nodes, num_ranks) -> "_Shape":
        if min(num_logical, num_physical, num_groups, num_nodes, num_ranks) < 1:
            raise ValueError("experts, slots, groups, nodes and ranks must be >= 1")
        if num_physical < num_logical:
            raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} experts")
        if num_physical % num_ranks:
            raise ValueError(f"{num_physical} physical slots do not divide over {num_ranks} ranks")
        if num_ranks % num_nodes:
            raise ValueError(f"{num_ranks} ranks do not divide over {num_nodes} nodes")
        if num_logical % num_groups:
            raise ValueError(f"{num_logical} experts do not divide into {num_groups} groups")
        return cls(num_logical, num_physical, num_groups, num_nodes, num_ranks)

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def resolve(self, policy: str) -> str:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        fits = self.num_groups % self.num_nodes == 0
        if policy == "auto":
            return "hierarchical" if fits else "global"
        if policy == "hierarchical" and not fits:
            raise ValueError(f"hierarchical policy needs num_groups ({self.num_groups}) "
                             f"divisible by num_nodes ({self.num_nodes})")
        return policy


# ----------------------------------------------------------------------------- balancing

MAX_PARTITIONS = 1024  # enumerate group -> node partitions up to this many (V3, 8 groups: <= 105)


def _place(w: np.ndarray, shape: _Shape, groups: int, nodes: int, refine: bool) -> np.ndarray:
    """phy2log [L, P] of the freshly balanced placement (groups = nodes = 1: global policy)."""
    layers, experts = w.shape
    group_size = experts // groups
    per_node = groups // nodes
    slots, ranks = shape.num_physical // nodes, shape.num_ranks // nodes  # per node
    parts = _partitions(groups, nodes) if refine and nodes > 1 else None
    if parts is None:
        # whole groups onto nodes, balanced by group load (DeepSeek's step 1)
        group_load = w.reshape(layers, groups, group_size).sum(-1)  # [L, G]
        group_node, _ = _pack(group_load, nodes, refine)
        node_groups = np.argsort(group_node, axis=1, kind="stable").reshape(layers, nodes, per_node)
        return _place_partition(w, shape, node_groups, refine)
    # every way to split the groups over the nodes: a node's result depends only on its own
    # groups, so solve each distinct set of groups ("combo") once and take, per layer, the
    # partition whose worst node is lightest (the one balanced by group load is among them)
    combos = sorted({c for p in parts for c in p})
    index = {c: i for i, c in enumerate(combos)}
    combo_groups = np.broadcast_to(np.array(combos), (layers, len(combos), per_node))
    combo_experts = _experts_of(combo_groups, group_size)  # [L, C, E/N]
    combo_w = _gather_rows(w, combo_experts)  # [L*C, E/N]
    part_combos = np.array([[index[c] for c in p] for p in parts])  # [parts, N]
    combo_local, flat_max = _fill(combo_w, slots, ranks, refine, improve=np.zeros(len(combo_w), dtype=bool))
    # the replica-count search (slow) only where it can change the answer: combos at or
    # above the best partition's value, in a partition whose lower bound is below it
    combo_max = flat_max.reshape(layers, -1)  # a view: updates to flat_max show here
    best_val = combo_max[:, part_combos].max(-1).min(axis=1, keepdims=True)  # [L, 1]
    bound = _node_bound(combo_w, slots, ranks).reshape(layers, -1)
    hopeful = bound[:, part_combos].max(-1) < best_val * (1 - 1e-9)  # [L, parts]
    in_hopeful = np.zeros_like(combo_max, dtype=bool)
    rows, cols = np.nonzero(hopeful)
    in_hopeful[rows[:, None], part_combos[cols]] = True
    redo = (in_hopeful & (combo_max >= best_val * (1 - 1e-9))).ravel()
    if redo.any():
        r_local, r_max = _fill(combo_w[redo], slots, ranks, refine, improve=np.ones(int(redo.sum()), dtype=bool))
        take = r_max < flat_max[redo]
        idx = np.flatnonzero(redo)[take]
        combo_local[idx] = r_local[take]
        flat_max[idx] = r_max[take]
    part_max = combo_max[:, part_combos].max(-1)  # [L, parts]
    best = part_combos[part_max.argmin(axis=1)]  # [L, N]: the combo each node gets
    r = np.arange(layers)[:, None]
    local = combo_local.reshape(layers, len(combos), slots)[r, best]
    node_experts = combo_experts[r, best]
    return np.take_along_axis(node_experts, local, axis=2).reshape(layers, shape.num_physical)


def _place_partition(w: np.ndarray, shape: _Shape, node_groups: np.ndarray, refine: bool) -> np.ndarray:
    """phy2log [L, P] with the groups of node n given: node_groups [L, N, G/N]."""
    layers, nodes, _ = node_groups.shape
    node_experts = _experts_of(node_groups, w.shape[1] // (nodes * node_groups.shape[2]))  # [L, N, E/N]
    node_w = _gather_rows(w, node_experts)
    slots, ranks = shape.num_physical // nodes, shape.num_ranks // nodes
    local, top = _fill(node_w, slots, ranks, refine, improve=np.full(len(node_w), nodes == 1))
    if nodes > 1 and refine:  # the replica-count search only for each layer's heaviest node(s)
        worst = (top.reshape(layers, nodes) >= top.reshape(layers, nodes).max(1, keepdims=True) * (1 - 1e-9)).ravel()
        r_local, r_top = _fill(node_w[worst], slots, ranks, refine, improve=np.ones(int(worst.sum()), dtype=bool))
        take = np.flatnonzero(worst)[r_top < top[worst]]
        local[take] = r_local[r_top < top[worst]]
    local = local.reshape(layers, nodes, -1)
    return np.take_along_axis(node_experts, local, axis=2).reshape(layers, shape.num_physical)


def _gather_rows(w: np.ndarray, node_experts: np.ndarray) -> np.ndarray:
    """w [L, E], node_experts [L, S, n] -> [L*S, n] the loads of each node's experts."""
    layers, sets, n = node_experts.shape
    return np.take_along_axis(w, node_experts.reshape(layers, -1), axis=1).reshape(layers * sets, n)


def _node_bound(node_w: np.ndarray, slots: int, ranks: int) -> np.ndarray:
    """[B] a lower bound on a node's largest rank load: mean rank load, smallest largest replica."""
    return np.maximum(node_w.sum(1) / ranks, (node_w / _replicate(node_w, slots)).max(1))


def _partitions(groups: int, nodes: int) -> list[tuple[tuple[int, ...], ...]] | None:
    """All splits of range(groups) into ``nodes`` equal sets (sets sorted), or None if too many."""
    size = groups // nodes
    count = math.factorial(groups) // (math.factorial(size) ** nodes * math.factorial(nodes))
    if count > MAX_PARTITIONS:
        return None

    def split(rest: tuple[int, ...]):
        if not rest:
            yield ()
            return
        for others in itertools.combinations(rest[1:], size - 1):
            block = (rest[0], *others)
            for tail in split(tuple(g for g in rest if g not in block)):
                yield (block, *tail)

    return list(split(tuple(range(groups))))


def _experts_of(node_groups: np.ndarray, group_size: int) -> np.ndarray:
    """[L, S, g] group ids -> [L, S, g * group_size] their expert ids, ascending per group."""
    e = node_groups[..., None] * group_size + np.arange(group_size)
    return e.reshape(*node_groups.shape[:2], -1)


def _fill(node_w: np.ndarray, slots: int, ranks: int, refine: bool, improve: np.ndarray):
    """Replicate and pack the experts of each (candidate) node onto its ranks.

    node_w [B, n]: the loads of a node's experts; the node has ``slots`` slots on ``ranks``
    ranks. Returns (local [B, slots]: index into the node's experts of each slot, rank by rank,
    a rank's slots by expert id; rank_max [B]: the node's largest rank load).

    Without ``refine``: steps 1-2 only (greedy counts, greedy packing). With it, the greedy
    counts under both tie rules are packed with swap refinement and the better kept; rows in
    ``improve [B]`` also try the counts found by ``_improve_counts``.
    """
    rows, n = node_w.shape
    if not refine:
        count = _replicate(node_w, slots, split_heaviest=False)
        item, item_rank, top = _pack_counts(node_w, count, ranks, refine=False)
    else:
        count = _replicate(node_w, slots, split_heaviest=True)
        item, item_rank, top = _pack_counts(node_w, count, ranks, refine=True)
        other = _replicate(node_w, slots, split_heaviest=False)
        differ = np.flatnonzero((other != count).any(axis=1))  # the tie rule mattered
        if differ.size:
            o_item, o_rank, o_top = _pack_counts(node_w[differ], other[differ], ranks, refine=True)
            take = o_top < top[differ]
            t = differ[take]
            count[t], item[t], item_rank[t], top[t] = other[t], o_item[take], o_rank[take], o_top[take]
        sel = np.flatnonzero(improve) if slots > ranks else np.zeros(0, dtype=np.int64)
        if sel.size:  # (one slot per rank: the greedy counts are already optimal)
            better = _improve_counts(node_w[sel], count[sel], ranks)
            b_item, b_rank, b_top = _pack_counts(node_w[sel], better, ranks, refine=True)
            take = b_top < top[sel]
            t = sel[take]
            item[t], item_rank[t], top[t] = b_item[take], b_rank[take], b_top[take]
    if slots == ranks:
        # one slot per rank: any order balances the same, so use a canonical one that moves
        # little when the load changes: each expert's first replica in expert order, then the
        # extra replicas (with no redundancy: the identity)
        extra = np.zeros_like(item, dtype=bool)
        extra[:, 1:] = item[:, 1:] == item[:, :-1]
        item_rank = np.argsort(np.argsort(extra * n + item, axis=1, kind="stable"), axis=1)
    order = np.argsort(item_rank * n + item, axis=1, kind="stable")
    return np.take_along_axis(item, order, axis=1), top


def _pack_counts(node_w: np.ndarray, count: np.ndarray, ranks: int, refine: bool):
    """Pack the replicas given by ``count [B, n]`` -> (item [B, slots]: local expert of each
    replica, item_rank [B, slots], rank_max [B])."""
    item = _expand(count)
    item_rank, rank_load = _pack(np.take_along_axis(node_w / count, item, axis=1), ranks, refine)
    return item, item_rank, rank_load.max(axis=1)


def _improve_counts(node_w: np.ndarray, count: np.ndarray, ranks: int, rounds: int = 32) -> np.ndarray:
    """Local search over replica counts, judged by the packing they allow.

    The smallest largest per-replica load is not always the best start for packing: with k
    slots per rank, more large replicas than ranks force two onto one rank (e.g. a node whose
    two hottest experts both sit at the top level), where giving one expert a replica fewer and
    the other one more packs better. Per row, each round tries moving one replica from a donor
    (an expert with >= 2 replicas) to an expert on the heaviest rank, packs every candidate
    greedily, and keeps the best if it lowers (largest rank load, ranks at that load). Rows
    stop when nothing improves or they reach max(mean rank load, greedy largest replica).
    """
    rows, n = node_w.shape
    slots = int(count[0].sum())
    count = count.copy()
    item, item_rank, load = _greedy_pack(node_w, count, ranks)
    best = _score(load)
    bound = _node_bound(node_w, slots, ranks)
    active = np.flatnonzero(best[0] > bound * (1 + 1e-6))
    donors_max = min(n, 8)
    for _ in range(rounds):
        if not active.size:
            break
        a = active
        c, w_a = count[a], node_w[a]
        heavy = load[a].argmax(axis=1)
        receivers = np.where(item_rank[a] == heavy[:, None], item[a], -1)  # [A, slots]: experts on it
        receivers = np.sort(receivers, axis=1)[:, -(slots // ranks):]  # [A, k] (each rank has k)
        harm = np.where(c > 1, w_a / np.maximum(c - 1, 1), np.inf)  # per-replica load once a donor
        donors = np.argsort(harm, axis=1, kind="stable")[:, :donors_max]  # [A, D]
        x = np.repeat(receivers, donors_max, axis=1)  # [A, k*D]
        y = np.tile(donors, (1, receivers.shape[1]))
        ok = (x != y) & np.isfinite(np.take_along_axis(harm, y, axis=1))
        cand = np.repeat(c[:, None, :], x.shape[1], axis=1)  # [A, C, n]
        ai, ci = np.meshgrid(np.arange(a.size), np.arange(x.shape[1]), indexing="ij")
        cand[ai, ci, x] += 1
        cand[ai, ci, y] -= 1
        cand[~ok] = c[np.nonzero(~ok)[0]]  # invalid candidates: unchanged (never better)
        flat = cand.reshape(-1, n)
        c_item, c_rank, c_load = _greedy_pack(np.repeat(w_a, x.shape[1], axis=0), flat, ranks)
        c_max, c_at = _score(c_load)
        c_max, c_at = c_max.reshape(a.size, -1), c_at.reshape(a.size, -1)
        pick = _lex_argmin(c_max, c_at)
        pm, pa = c_max[np.arange(a.size), pick], c_at[np.arange(a.size), pick]
        eps = 1e-12 * best[0][a]
        improved = (pm < best[0][a] - eps) | ((pm <= best[0][a] + eps) & (pa < best[1][a]))
        src = np.arange(a.size) * x.shape[1] + pick
        rows_i = a[improved]
        count[rows_i] = flat[src[improved]]
        item[rows_i], item_rank[rows_i], load[rows_i] = c_item[src[improved]], c_rank[src[improved]], c_load[src[improved]]
        best[0][rows_i], best[1][rows_i] = pm[improved], pa[improved]
        active = rows_i[best[0][rows_i] > bound[rows_i] * (1 + 1e-6)]
    return count


def _greedy_pack(node_w: np.ndarray, count: np.ndarray, ranks: int):
    """(item [B, slots], item_rank [B, slots], rank_load [B, ranks]) of the greedy packing."""
    item = _expand(count)
    item_rank, load = _pack(np.take_along_axis(node_w / count, item, axis=1), ranks, refine=False)
    return item, item_rank, load


def _score(load: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest rank load [B], how many ranks are within 1e-9 of it [B])."""
    top = load.max(axis=1)
    return top, (load >= top[:, None] * (1 - 1e-9)).sum(axis=1)


def _lex_argmin(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per row of [A, C], the column smallest by (first, then second)."""
    low = first.min(axis=1, keepdims=True)
    tied = first <= low + 1e-12 * np.abs(low)
    return np.where(tied, second, np.iinfo(np.int64).max).argmin(axis=1)


def _replicate(w: np.ndarray, num_slots: int, split_heaviest: bool = True) -> np.ndarray:
    """[B, n] loads -> [B, n] replica counts (>= 1, sum num_slots) minimising max(load / count).

    Greedy: the next replica goes to the expert with the largest per-replica load; that makes
    the largest per-replica load as small as it can be. Ties (equal per-replica loads) decide
    which items the packing gets, and no rule is best for every packing: ``split_heaviest``
    gives the replica to the expert with the most replicas (fewer items at the top level),
    otherwise to the one with the fewest (finer grains of the lighter expert); then the lower
    id. When only zero loads are left, the fewest replicas first, so idle experts share.
    """
    rows, n = w.shape
    count = np.ones((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for _ in range(num_slots - n):
        per = w / count
        top = per.max(axis=1, keepdims=True)
        rank = np.where((top > 0) & split_heaviest, -count, count)
        pick = np.where(per >= top, rank, np.iinfo(np.int64).max).argmin(axis=1)
        count[r, pick] += 1
    return count


def _expand(count: np.ndarray) -> np.ndarray:
    """[B, n] counts (same row sums) -> [B, sum]: each index repeated count times, ascending."""
    rows, n = count.shape
    return np.repeat(np.tile(np.arange(n), rows), count.ravel()).reshape(rows, -1)


def _pack(item_w: np.ndarray, num_bins: int, refine: bool):
    """[B, n] item loads -> ([B, n] bin of each item, [B, num_bins] bin loads); n / num_bins
    items per bin.

    Greedy: heaviest item first, into the lightest bin with room (ties: the lower bin); then,
    if ``refine``, swap refinement (``_refine``). Two replicas of one expert may share a rank:
    that rank then serves twice the share, which can be what balances best.
    """
    rows, n = item_w.shape
    per_bin = n // num_bins
    r = np.arange(rows)
    order = np.argsort(-item_w, axis=1, kind="stable")
    bins = np.empty((rows, n), dtype=np.int64)
    if per_bin == 1:
        bins[r[:, None], order] = np.arange(n)
        load = np.take_along_axis(item_w, np.argsort(bins, axis=1), axis=1)
        return bins, load
    load = np.zeros((rows, num_bins))
    fill = np.zeros((rows, num_bins), dtype=np.int64)
    for t in range(n):
        item = order[:, t]
        b = np.where(fill >= per_bin, np.inf, load).argmin(axis=1)
        bins[r, item] = b
        load[r, b] += item_w[r, item]
        fill[r, b] += 1
    if refine:
        bins, load = _refine(item_w, bins, num_bins)
    return bins, load


def _refine(item_w: np.ndarray, bins: np.ndarray, num_bins: int):
    """Swap refinement of B packings at once -> (bins, bin loads).

    Per row, while some swap of an item a of the heaviest bin h with a lighter item b of another
    bin j gives max(new h, new j) < old h, do the swap with the smallest max(new h, new j).
    Each swap lowers the row's sorted bin loads lexicographically, so this ends; the largest
    bin load never rises. Rows stop once they reach the lower bound max(mean bin load, largest
    item).
    """
    rows, n = item_w.shape
    per_bin = n // num_bins
    members = np.argsort(bins, axis=1, kind="stable").reshape(rows, num_bins, per_bin)
    val = np.take_along_axis(item_w, members.reshape(rows, n), axis=1).reshape(members.shape)
    load = val.sum(-1)  # [B, m]
    eps = 1e-9 * np.maximum(load.max(axis=1), 1e-30)
    bound = np.maximum(load.mean(axis=1), item_w.max(axis=1)) + eps
    active = np.flatnonzero(load.max(axis=1) > bound)
    for _ in range(16 * n):
        if not active.size:
            break
        a_ = np.arange(active.size)
        v, ld, e = val[active], load[active], eps[active]
        h = ld.argmax(axis=1)
        vh, lh = v[a_, h], ld[a_, h]  # [b, k], [b]
        d = vh[:, None, :, None] - v[:, :, None, :]  # [b, m, k_h, k_j]: a - b
        worst = np.maximum(lh[:, None, None, None] - d, ld[:, :, None, None] + d)
        ok = (d > e[:, None, None, None]) & (worst < (lh - e)[:, None, None, None])
        ok[a_, h] = False
        flat = np.where(ok, worst, np.inf).reshape(active.size, -1)
        pick = flat.argmin(axis=1)
        found = np.isfinite(flat[a_, pick])
        j, ia, ib = np.unravel_index(pick[found], ok.shape[1:])
        rw, hw = active[found], h[found]
        for arr in (val, members):
            arr[rw, hw, ia], arr[rw, j, ib] = arr[rw, j, ib], arr[rw, hw, ia].copy()
        load[rw, hw] = val[rw, hw].sum(-1)
        load[rw, j] = val[rw, j].sum(-1)
        still = found.copy()
        still[found] = load[rw].max(axis=1) > bound[rw]
        active = active[still]
    out = np.empty_like(bins)
    np.put_along_axis(out, members.reshape(rows, n),
                      np.repeat(np.arange(num_bins), per_bin)[None, :].repeat(rows, 0), axis=1)
    return out, load


# ----------------------------------------------------------------------------- stability


def _stabilise(w, fresh, prev, shape: _Shape, groups: int, nodes: int, tolerance: float,
               refine: bool) -> np.ndarray:
    """Per layer, the candidate with the fewest changed slots within tolerance (see docstring)."""
    k = shape.slots_per_rank
    ranks_per_node = shape.num_ranks // nodes
    group_size = shape.num_logical // groups
    valid = np.array([eplb_moves.valid_layer(p, shape.num_logical, group_size, k * ranks_per_node) for p in prev])
    starts = [fresh]
    if nodes > 1 and valid.all():
        # hierarchical: also balance inside the nodes the current placement has (no group moves)
        present = np.zeros((len(prev), nodes, groups), dtype=bool)  # [L, N, G]
        layer_i, node_i, _ = np.indices((len(prev), nodes, prev.shape[1] // nodes))
        present[layer_i, node_i, prev.reshape(len(prev), nodes, -1) // group_size] = True
        if (present.sum(-1) == groups // nodes).all():
            node_groups = np.argsort(~present, axis=2, kind="stable")[:, :, : groups // nodes]
            starts.append(_place_partition(w, shape, node_groups, refine))
    out = np.empty_like(fresh)
    for layer in range(w.shape[0]):
        wl = w[layer]
        best_max = eplb_moves.rank_load(wl, fresh[layer], k).max()
        target = best_max * (1.0 + tolerance) + 1e-12 * max(best_max, 1.0)
        best, best_changes = None, prev.shape[1] + 1
        for start in starts:
            if eplb_moves.rank_load(wl, start[layer], k).max() > target:
                continue
            cand = eplb_moves.restore(wl, eplb_moves.relabel(start[layer], prev[layer], k, ranks_per_node, nodes),
                            prev[layer], k, ranks_per_node, target)
            changes = int((cand != prev[layer]).sum())
            if changes < best_changes:
                best, best_changes = cand, changes
        if best_changes and valid[layer]:
            cand = eplb_moves.repair(wl, prev[layer], k, ranks_per_node, target, budget=best_changes - 1)
            if cand is not None:
                best = cand
        out[layer] = best
    return out


def _counts(p2l: np.ndarray, num_logical: int) -> np.ndarray:
    layers = p2l.shape[0]
    flat = (p2l + num_logical * np.arange(layers)[:, None]).ravel()
    return np.bincount(flat, minlength=layers * num_logical).reshape(layers, num_logical)


def _max_over_mean(rank_load: np.ndarray) -> np.ndarray:
    mean = rank_load.mean(axis=-1)
    return np.where(mean > 0, rank_load.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_numpy(x) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)

"""Placement stability for EPLB (``engine.eplb``, ``previous=``): per MoE layer, keep as many
physical slots of the placement in use as the balance target allows, since a live rollout copies the
weights of every slot whose expert changes.

* ``relabel``: rename a freshly balanced placement's nodes, ranks and slot order (free: the same
  loads per rank) to keep the most slots of the old one (assignment by ``_match``);
* ``restore``: swap replicas back into their old slots while no rank exceeds the target;
* ``repair``: start from the old placement and fix it (swaps, re-assigned redundant slots) until
  every rank is within the target, within a budget of changed slots.

``engine.eplb._stabilise`` tries these and keeps the candidate with the fewest changed slots.
One layer at a time, numpy only.
"""

from __future__ import annotations

import numpy as np


def valid_layer(p2l: np.ndarray, num_logical: int, group_size: int, slots_per_node: int) -> bool:
    """Every expert held, and (hierarchical) each group inside one node."""
    if p2l.min() < 0 or p2l.max() >= num_logical or np.bincount(p2l, minlength=num_logical).min() < 1:
        return False
    node_of_slot = np.arange(p2l.size) // slots_per_node
    group = p2l // group_size
    lo = np.full(group.max() + 1, np.iinfo(np.int64).max)
    hi = np.full(group.max() + 1, -1)
    np.minimum.at(lo, group, node_of_slot)
    np.maximum.at(hi, group, node_of_slot)
    return bool((lo[group] == hi[group]).all())


def rank_load(wl: np.ndarray, p2l: np.ndarray, k: int) -> np.ndarray:
    cnt = np.bincount(p2l, minlength=wl.size)
    return (wl[p2l] / cnt[p2l]).reshape(-1, k).sum(-1)


def relabel(fresh: np.ndarray, prev: np.ndarray, k: int, ranks_per_node: int, nodes: int) -> np.ndarray:
    """The fresh placement of one layer with its nodes, ranks and slots renamed to keep the most
    slots of ``prev``; the same loads per rank, so the same balance."""
    new_bins = fresh.reshape(nodes, ranks_per_node, k)
    old_bins = prev.reshape(nodes, ranks_per_node, k)
    keep = np.zeros((nodes, nodes))
    perms = {}
    for a in range(nodes):
        for b in range(nodes):
            score = _overlap(new_bins[a], old_bins[b])  # [R/N new, R/N old]
            perms[a, b] = _match(score)
            keep[a, b] = score[np.arange(ranks_per_node), perms[a, b]].sum()
    node_to = _match(keep)
    out = np.empty_like(old_bins)
    for a in range(nodes):
        b = node_to[a]
        for i, j in enumerate(perms[a, b]):
            out[b, j] = _order_like(new_bins[a, i], old_bins[b, j])
    return out.reshape(-1)


def _overlap(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """[m, m] how many of new bin i's items old bin j holds (multiset intersection); bins [m, k]."""
    k = new.shape[1]
    occurrence = ((new[:, :, None] == new[:, None, :]) & np.tri(k, k, -1, dtype=bool)).sum(-1)  # earlier copies
    held = (old[None, :, None, :] == new[:, None, :, None]).sum(-1)  # [m_new, m_old, k]: copies in old
    return (held > occurrence[:, None, :]).sum(-1)


def _match(score: np.ndarray) -> np.ndarray:
    """perm with perm[i] = column of row i, a maximum-weight assignment (greedy + 2-opt swaps)."""
    m = score.shape[0]
    perm = np.full(m, -1)
    taken = np.zeros(m, dtype=bool)
    flat = np.argsort(-score, axis=None, kind="stable")
    rows, cols = np.unravel_index(flat, score.shape)
    positive = score[rows, cols] > 0
    for i, j in zip(rows[positive], cols[positive]):
        if perm[i] < 0 and not taken[j]:
            perm[i], taken[j] = j, True
    free = iter(np.flatnonzero(~taken))
    for i in np.flatnonzero(perm < 0):
        perm[i] = next(free)
    idx = np.arange(m)
    for _ in range(4 * m):
        now = score[idx, perm]
        gain = score[:, perm] + score[:, perm].T - now[:, None] - now[None, :]  # swap i <-> i'
        i, i2 = np.unravel_index(gain.argmax(), gain.shape)
        if gain[i, i2] <= 0:
            break
        perm[i], perm[i2] = perm[i2], perm[i]
    return perm


def _order_like(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """new's items reordered so that items also in old keep old's positions."""
    out = np.full_like(old, -1)
    rest = []
    used = np.zeros(old.size, dtype=bool)
    for e in new:
        spot = np.flatnonzero((old == e) & ~used)
        if spot.size:
            out[spot[0]] = e
            used[spot[0]] = True
        else:
            rest.append(e)
    out[out < 0] = rest
    return out


def restore(wl, cur, prev, k: int, ranks_per_node: int, target: float) -> np.ndarray:
    """Swap replicas of ``cur`` (one layer) between ranks of a node to put experts back in the
    slots ``prev`` had them in, while every rank stays <= target. Replica counts do not change.

    For each slot s whose expert differs from prev[s] = y, look for a slot t holding a replica
    of y that is not in place either (same node), preferring one where the swap also puts
    cur[s] back in place; swap if both ranks stay within target (same rank: always).
    """
    cur = cur.copy()
    cnt = np.bincount(cur, minlength=wl.size)
    per = wl / np.maximum(cnt, 1)
    load = per[cur].reshape(-1, k).sum(-1)
    slot_rank = np.arange(cur.size) // k
    node_of = slot_rank // ranks_per_node
    for _ in range(3):
        moved = False
        for s in np.flatnonzero(cur != prev):
            y, x, r = prev[s], cur[s], slot_rank[s]
            if x == y:
                continue
            t = np.flatnonzero((cur == y) & (prev != y) & (node_of == node_of[s]))
            if not t.size:
                continue
            t = t[np.argsort(prev[t] != x, kind="stable")]  # double gain first
            for u in t:
                r2 = slot_rank[u]
                if r2 != r and (load[r] - per[x] + per[y] > target or load[r2] - per[y] + per[x] > target):
                    continue
                cur[s], cur[u] = y, x
                if r2 != r:
                    load[r] += per[y] - per[x]
                    load[r2] += per[x] - per[y]
                moved = True
                break
        if not moved:
            break
    return cur


def repair(wl, prev, k: int, ranks_per_node: int, target: float, budget: int) -> np.ndarray | None:
    """Fewest changes to ``prev`` (one layer) that bring every rank to <= target, or None if
    that takes more than ``budget`` changed slots.

    Greedy, by excess removed per changed slot (excess = sum over ranks of the load above
    target), moves touching the (up to) 4 heaviest ranks above target: (a) swap a replica there
    with one of another rank of its node (2 slots); (b) hand the slot of a redundant replica in
    that node (its expert keeps >= 1) to an expert held there (1 slot). Gives up early when even
    the best move's rate cannot remove the excess within the budget.
    """
    p2l = prev.copy()
    num_logical, slots = wl.size, p2l.size
    slot_rank = np.arange(slots) // k
    slot_node = slot_rank // ranks_per_node
    changed = np.zeros(slots, dtype=bool)
    for _ in range(4 * budget + 4):
        cnt = np.bincount(p2l, minlength=num_logical)
        per = wl[p2l] / cnt[p2l]  # [P] per-slot load
        load = per.reshape(-1, k).sum(-1)  # [R]
        over = np.maximum(load - target, 0.0)
        excess = over.sum()
        if excess <= 0:
            return p2l
        left = budget - int(changed.sum())
        if left <= 0:
            return None
        heavy = np.argsort(-load)[:4]
        heavy = heavy[load[heavy] > target]
        s = np.flatnonzero(np.isin(slot_rank, heavy))  # slots on the heavy ranks
        moves = []  # (gain per changed slot, kind, slot, other)

        # (a) swap slot s (heavy rank) with slot t (same node, other rank): d moves from s's rank
        rs, rt = slot_rank[s][:, None], slot_rank[None, :]
        d = per[s][:, None] - per[None, :]  # [S, P]
        removed = (over[rs] + over[rt] - np.maximum(load[rs] - d - target, 0)
                   - np.maximum(load[rt] + d - target, 0))
        cost = (~changed[s])[:, None].astype(float) + ~changed[None, :]
        ok = (slot_node[s][:, None] == slot_node[None, :]) & (rs != rt) & (d > 0)
        gain = np.where(ok, removed / np.maximum(cost, 1e-9), 0.0)
        i, j = np.unravel_index(gain.argmax(), gain.shape)
        moves.append((gain[i, j], "swap", s[i], j))

        # (b) slot t of a redundant replica of e (same node) now serves x, an expert on a heavy rank
        xs = np.unique(p2l[s])
        donors = np.flatnonzero((cnt[p2l] > 1) & np.isin(slot_node, slot_node[s]))
        if donors.size:
            e = p2l[donors]
            held = np.zeros((num_logical, load.size))  # [E, R] replicas of each expert per rank
            np.add.at(held, (p2l, slot_rank), 1.0)
            ce, cx = cnt[e].astype(float), cnt[xs].astype(float)
            de = held[e] * (wl[e] / (ce - 1) - wl[e] / ce)[:, None]  # [D, R] e's replicas heavier
            de[np.arange(donors.size), slot_rank[donors]] -= wl[e] / (ce - 1)  # t stops serving e
            dx = held[xs] * (wl[xs] / (cx + 1) - wl[xs] / cx)[:, None]  # [X, R] x's replicas lighter
            new = load + de[:, None, :] + dx[None, :, :]  # [D, X, R]
            new[np.arange(donors.size)[:, None], np.arange(xs.size), slot_rank[donors][:, None]] += wl[xs] / (cx + 1)
            x_node = slot_node[s[(p2l[s][None, :] == xs[:, None]).argmax(axis=1)]]
            ok = (slot_node[donors][:, None] == x_node[None, :]) & (e[:, None] != xs[None, :])
            removed = excess - np.maximum(new - target, 0).sum(-1)
            gain = np.where(ok, removed / np.maximum((~changed[donors]).astype(float), 1e-9)[:, None], 0.0)
            i, j = np.unravel_index(gain.argmax(), gain.shape)
            moves.append((gain[i, j], "give", donors[i], xs[j]))

        rate, kind, a, b = max(moves, key=lambda m: m[0])
        if rate <= 1e-12 * max(target, 1.0) or excess / rate > left:
            return None
        if kind == "swap":
            p2l[a], p2l[b] = p2l[b], p2l[a]
            changed[[a, b]] = True
        else:
            p2l[a] = b
            changed[a] = True
        changed &= p2l != prev
    return None


# ----------------------------------------------------------------------------- helpers

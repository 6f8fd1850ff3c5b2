"""EPLB (engine/eplb.py) and expert-load statistics (engine/expert_load.py): placement
invariants on DeepSeek-V3 and tiny shapes, hand-checked and brute-forced small cases, placement
stability, the sliding window."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os

import numpy as np
import pytest
import torch

from engine.eplb import changed_slots, log2phy_from_phy2log, plan_placement, predicted_rank_load, rebalance_experts
from engine.expert_load import ExpertLoadWindow, balancedness, load_report

# (experts, physical slots, groups, nodes, ranks)
SHAPES = {
    "tiny-8x2": (8, 10, 2, 1, 2),
    "tiny-16x2": (16, 18, 4, 2, 2),
    "tiny-16x4": (16, 20, 4, 2, 4),
    "readme": (12, 16, 4, 2, 8),
    "ep32-prefill": (256, 288, 8, 4, 32),
    "ep144-decode": (256, 288, 8, 18, 144),
    "ep320-decode": (256, 320, 8, 40, 320),
}
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def skewed(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """Zipf-like loads with a different hot set per layer, plus lognormal noise."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, experts + 1) ** 1.1 * rng.lognormal(0, 0.3, (layers, experts))
    return np.rint(1e5 * rng.permuted(w, axis=1))


def check_invariants(p, w, num_physical, num_groups, num_nodes, num_ranks, policy):
    layers, experts = w.shape
    k = num_physical // num_ranks
    assert p.phy2log.shape == (layers, num_physical) and p.phy2log.dtype == np.int64
    assert p.phy2log.min() >= 0 and p.phy2log.max() < experts
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(1) == num_physical).all()
    for layer in range(layers):
        assert (np.bincount(p.phy2log[layer], minlength=experts) == p.logcnt[layer]).all()
        slots = []
        for e in range(experts):
            row = p.log2phy[layer, e]
            n = p.logcnt[layer, e]
            assert (row[n:] == -1).all() and (np.diff(row[:n]) > 0).all()
            assert (p.phy2log[layer, row[:n]] == e).all()
            slots += row[:n].tolist()
        assert sorted(slots) == list(range(num_physical))
    # rank r holds slots r*k ... r*k+k-1: the predicted rank loads are exactly those sums
    per_slot = w / p.logcnt
    expected = np.take_along_axis(per_slot, p.phy2log, axis=1).reshape(layers, num_ranks, k).sum(-1)
    np.testing.assert_allclose(p.rank_load, expected)
    np.testing.assert_allclose(p.rank_load.sum(1), w.sum(1))
    if policy == "hierarchical":
        group_size = experts // num_groups
        slots_per_node = num_physical // num_nodes
        node = np.arange(num_physical) // slots_per_node
        for layer in range(layers):
            group = p.phy2log[layer] // group_size
            for g in range(num_groups):
                assert len(set(node[group == g])) == 1, f"group {g} spans nodes in layer {layer}"


@pytest.mark.parametrize("name", SHAPES)
def test_invariants_both_policies(name):
    experts, phys, groups, nodes, ranks = SHAPES[name]
    w = skewed(3, experts, seed=len(name))
    for policy in ("hierarchical", "global"):
        if policy == "hierarchical" and groups % nodes:
            with pytest.raises(ValueError):
                plan_placement(w, phys, groups, nodes, ranks, policy=policy)
            continue
        p = plan_placement(w, phys, groups, nodes, ranks, policy=policy)
        assert p.policy == policy
        check_invariants(p, w, phys, groups, nodes, ranks, policy)
        # never worse than the unbalanced identity placement: slot s holds expert s mod E, or
        # under the hierarchical rule, node n holds groups in order and repeats its own first experts
        node_slots, node_experts = (phys // nodes, experts // nodes) if policy == "hierarchical" else (phys, experts)
        slot = np.arange(phys)
        identity = np.tile(slot // node_slots * node_experts + slot % node_slots % node_experts, (3, 1))
        assert (p.balancedness >= balancedness(predicted_rank_load(w, identity, ranks)) - 1e-12).all()
    auto = plan_placement(w, phys, groups, nodes, ranks)
    assert auto.policy == ("hierarchical" if groups % nodes == 0 else "global")


def test_hand_computed_global_case():
    # expert 0 carries 6, three others 1 each; 6 slots on 3 ranks: expert 0 gets 3 replicas of 2,
    # and every rank pairs one of them with a light expert: 3 per rank, perfectly balanced
    p = plan_placement(np.array([[6.0, 1.0, 1.0, 1.0]]), 6, 1, 1, 3)
    assert p.logcnt.tolist() == [[3, 1, 1, 1]]
    assert p.rank_load.tolist() == [[3.0, 3.0, 3.0]]
    ranks = p.phy2log[0].reshape(3, 2)
    assert all(0 in r and len(set(r)) == 2 for r in ranks.tolist())
    assert p.log2phy.shape == (1, 4, 3) and p.balancedness.tolist() == [1.0]


def _brute_force_readme(w: np.ndarray) -> float:
    """Smallest possible max rank load of the README shape under the hierarchical rule: every
    split of the 4 groups over 2 nodes, every replica count, sorted pairing (optimal for 2/rank)."""
    groups = w.reshape(4, 3)
    best = np.inf
    for a in [(0, 1), (0, 2), (0, 3)]:
        worst = 0.0
        for node in (a, tuple(g for g in range(4) if g not in a)):
            ws = groups[list(node)].ravel()
            node_best = np.inf
            for extra in itertools.combinations_with_replacement(range(6), 2):
                c = np.ones(6, dtype=int)
                for e in extra:
                    c[e] += 1
                items = np.sort(np.repeat(ws / c, c))
                node_best = min(node_best, (items + items[::-1]).max())
            worst = max(worst, node_best)
        best = min(best, worst)
    return best


def test_readme_example_reaches_the_optimum():
    p = plan_placement(README_WEIGHT, 16, 4, 2, 8)
    assert p.policy == "hierarchical"
    for layer in range(2):
        assert p.rank_load[layer].max() == pytest.approx(_brute_force_readme(README_WEIGHT[layer].astype(float)))
    # DeepSeek's published placement (README) for the same input, as a reference point
    deepseek = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                         [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
    theirs = predicted_rank_load(README_WEIGHT, deepseek, 8).max(1)
    assert (p.rank_load.max(1) <= theirs + 1e-9).all() and p.rank_load[0].max() < theirs[0]


@pytest.mark.parametrize("name", ["tiny-16x4", "ep32-prefill", "ep144-decode"])
def test_refinement_never_worse_than_greedy_steps(name):
    experts, phys, groups, nodes, ranks = SHAPES[name]
    w = skewed(4, experts, seed=7)
    ours = plan_placement(w, phys, groups, nodes, ranks)
    greedy = plan_placement(w, phys, groups, nodes, ranks, refine=False)
    assert (ours.rank_load.max(1) <= greedy.rank_load.max(1) * (1 + 1e-12)).all()


def test_refinement_helps_where_greedy_packing_is_stuck():
    # EP32 prefill with very hot experts: greedy counts force two top-level replicas onto one
    # rank; the count search and swaps must find a clearly better placement on some layer
    experts, phys, groups, nodes, ranks = SHAPES["ep32-prefill"]
    rng = np.random.default_rng(0)
    w = np.stack([rng.permutation(1e5 / np.arange(1, experts + 1)) for _ in range(6)]).round()
    ours = plan_placement(w, phys, groups, nodes, ranks).rank_load.max(1)
    greedy = plan_placement(w, phys, groups, nodes, ranks, refine=False).rank_load.max(1)
    assert (ours <= greedy + 1e-9).all() and (ours < greedy * 0.97).any()


def test_torch_in_torch_out_and_deepseek_contract():
    w = torch.tensor(README_WEIGHT)
    phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in (phy2log, log2phy, logcnt))
    assert phy2log.shape == (2, 16) and logcnt.shape == (2, 12) and log2phy.shape[:2] == (2, 12)
    assert log2phy.shape[2] == int(logcnt.max())
    n_phy2log, n_log2phy, n_logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert isinstance(n_phy2log, np.ndarray)
    assert (phy2log.numpy() == n_phy2log).all() and (log2phy.numpy() == n_log2phy).all()
    again, cnt = log2phy_from_phy2log(n_phy2log, 12)
    assert (again == n_log2phy).all() and (cnt == n_logcnt).all()


@pytest.mark.parametrize("args, match", [
    ((np.ones((1, 12)), 10, 4, 2, 8), "cannot hold"),
    ((np.ones((1, 12)), 18, 4, 2, 8), "do not divide over 8 ranks"),
    ((np.ones((1, 12)), 16, 5, 1, 8), "do not divide into 5 groups"),
    ((np.ones((1, 12)), 16, 4, 3, 8), "do not divide over 3 nodes"),
    ((np.ones(12), 16, 4, 2, 8), "layers, experts"),
    ((-np.ones((1, 12)), 16, 4, 2, 8), ">= 0"),
])
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(*args)


def test_zero_load_spreads_spare_slots():
    p = plan_placement(np.zeros((1, 8)), 12, 1, 1, 4)
    assert p.logcnt.max() == 1 + 1 and (p.logcnt == 2).sum() == 4  # four idle experts get one each
    assert p.balancedness.tolist() == [1.0]


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize("name", ["tiny-16x4", "ep32-prefill", "ep144-decode", "ep320-decode"])
def test_stability_keeps_every_slot_when_the_load_is_unchanged(name):
    experts, phys, groups, nodes, ranks = SHAPES[name]
    w = skewed(2, experts, seed=3)
    first = plan_placement(w, phys, groups, nodes, ranks)
    again = plan_placement(w, phys, groups, nodes, ranks, previous=first.phy2log)
    assert again.changed_slots.tolist() == [0, 0] and (again.phy2log == first.phy2log).all()


def test_stability_sees_through_relabelled_ranks_and_slots():
    # the previous placement is the fresh one with its ranks shuffled and each rank's slots
    # reversed: same loads, so nothing needs to move
    experts, phys, groups, nodes, ranks = SHAPES["ep144-decode"]
    w = skewed(2, experts, seed=4)
    fresh = plan_placement(w, phys, groups, nodes, ranks, policy="global").phy2log
    rng = np.random.default_rng(0)
    previous = fresh.reshape(2, ranks, -1)[:, rng.permutation(ranks), ::-1].reshape(2, phys)
    p = plan_placement(w, phys, groups, nodes, ranks, previous=previous)
    assert p.changed_slots.tolist() == [0, 0]
    np.testing.assert_allclose(p.rank_load.max(1), predicted_rank_load(w, fresh, ranks).max(1))


@pytest.mark.parametrize("name", ["ep32-prefill", "ep144-decode", "ep320-decode"])
def test_stability_moves_fewer_slots_at_no_or_bounded_cost(name):
    experts, phys, groups, nodes, ranks = SHAPES[name]
    w = skewed(3, experts, seed=5)
    drifted = w * np.random.default_rng(6).lognormal(0, 0.2, w.shape)
    old = plan_placement(w, phys, groups, nodes, ranks).phy2log
    fresh = plan_placement(drifted, phys, groups, nodes, ranks)
    exact = plan_placement(drifted, phys, groups, nodes, ranks, previous=old)
    loose = plan_placement(drifted, phys, groups, nodes, ranks, previous=old, tolerance=0.05)
    for p in (exact, loose):
        check_invariants(p, drifted, phys, groups, nodes, ranks, p.policy)
        assert (p.changed_slots == changed_slots(old, p.phy2log)).all()
    assert (exact.rank_load.max(1) <= fresh.rank_load.max(1) * (1 + 1e-9)).all()
    assert (loose.rank_load.max(1) <= fresh.rank_load.max(1) * 1.05 * (1 + 1e-9)).all()
    fresh_changes = changed_slots(old, fresh.phy2log)
    assert exact.changed_slots.sum() < fresh_changes.sum() / 2
    assert (loose.changed_slots <= exact.changed_slots).all()


def test_stability_rejects_a_previous_placement_of_another_shape():
    with pytest.raises(ValueError, match="previous"):
        plan_placement(README_WEIGHT, 16, 4, 2, 8, previous=np.zeros((2, 12), dtype=np.int64))


# ----------------------------------------------------------------------------- expert_load


def _window(window=3, **kw):
    # 2 layers, 4 experts, 6 slots on 3 ranks; expert 0 has replicas in slots 0 and 3
    phy2log = np.array([[0, 1, 0, 2, 3, 1], [3, 2, 1, 0, 0, 2]])
    return ExpertLoadWindow(phy2log, num_logical=4, num_ranks=3, window=window, **kw)


def test_window_sums_maps_to_logical_and_merges_ranks():
    win = _window()
    # rank 0 holds slots 0, 1; rank 2 holds slots 4, 5 (rank 1 silent); both report into one interval
    assert win.add_report(load_report(np.array([[5, 1], [2, 0]]), slots=[0, 1], rank=0, version=0))
    assert win.add_report(json.loads(json.dumps(load_report([[3, 4], [6, 7]], slots=[4, 5], rank=2))))
    assert win.physical_load.sum() == 0  # the open interval is not visible yet
    win.advance()
    assert win.physical_load.tolist() == [[5, 1, 0, 0, 3, 4], [2, 0, 0, 0, 6, 7]]
    # layer 0: expert 0 <- slot 0 (5), expert 1 <- slots 1, 5 (1 + 4), expert 3 <- slot 4 (3)
    assert win.logical_load.tolist() == [[5, 5, 0, 3], [6, 0, 7, 2]]
    # rank loads layer 0: [6, 0, 7] -> mean 13/3 over max 7
    np.testing.assert_allclose(win.balancedness(), [13 / 3 / 7, 15 / 3 / 13])
    assert win.rank_load().tolist() == [[6, 0, 7], [2, 0, 13]]


def test_window_expires_old_intervals():
    win = _window(window=3)
    full = np.ones((2, 6), dtype=np.int64)
    for i in range(1, 6):  # interval i adds i per slot
        win.add(full * i)
        win.advance()
        kept = range(max(1, i - 2), i + 1)
        assert (win.physical_load == sum(kept)).all(), i
        assert win.logical_load[0].tolist() == [2 * sum(kept), 2 * sum(kept), sum(kept), sum(kept)]
    assert win.intervals == 5 and win.physical_intervals == 3


def test_window_ema_and_time_based_intervals():
    win = _window(window=4, ema_decay=0.5, interval_s=10.0, now=100.0)
    c = np.zeros((2, 6), dtype=np.int64)
    c[0, 1] = 8
    win.add(c, now=101.0)
    win.add(c, now=109.0)  # same interval
    assert win.intervals == 0
    win.add(np.zeros((2, 6)), now=112.0)  # the first interval closed: ema = its counts
    assert win.intervals == 1 and win.ema[0, 1] == 16.0
    assert win.advance_to(145.0) == 3  # three more intervals, all empty: 16 -> 8 -> 4 -> 2
    assert win.ema[0, 1] == 2.0 and win.logical_load[0, 1] == 16
    win.advance_to(151.0)  # the window (4 intervals) no longer holds the first one
    assert win.logical_load.sum() == 0


def test_window_placement_change_and_stale_reports():
    win = _window()
    win.add(np.ones((2, 6)), version=0)
    win.advance()
    win.set_placement(np.array([[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 0, 1]]))
    assert win.version == 1 and win.physical_load.sum() == 0 and win.logical_load.sum() == 12
    assert not win.add(np.ones((2, 6)), version=0) and win.dropped_reports == 1
    assert win.add(np.ones((2, 6)), version=1)
    win.advance()
    assert win.logical_load[0].tolist() == [2 + 2, 2 + 1, 1 + 1, 1 + 2]
    out = json.loads(json.dumps(win.to_dict()))
    assert out["version"] == 1 and out["dropped_reports"] == 1 and len(out["balancedness"]) == 2
    assert out["logical_load"] == win.logical_load.tolist()
    assert "logical_load" not in win.to_dict(detail=False)


def test_window_rejects_bad_input():
    win = _window()
    with pytest.raises(ValueError):
        win.add(np.ones((2, 5)))
    with pytest.raises(ValueError):
        win.add(np.ones((2, 2)), slots=[1, 1])
    with pytest.raises(ValueError):
        win.add(np.ones((2, 1)), slots=[6])
    with pytest.raises(ValueError):
        win.set_placement(np.full((2, 6), 4))


def test_balancedness_definition():
    assert balancedness([[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]).tolist() == [1.0, 0.25, 1.0]


# ----------------------------------------------------------------------------- the bench script


def test_bench_script_runs_against_a_stand_in_for_deepseeks_file(tmp_path, capsys):
    # a stand-in with DeepSeek's signature that computes DeepSeek's steps (our refine=False)
    stand_in = tmp_path / "eplb.py"
    stand_in.write_text(
        "import torch\n"
        "from engine.eplb import plan_placement\n"
        "def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):\n"
        "    p = plan_placement(weight, num_replicas, num_groups, num_nodes, num_gpus, refine=False)\n"
        "    return torch.from_numpy(p.phy2log), torch.from_numpy(p.log2phy), torch.from_numpy(p.logcnt)\n")
    spec = importlib.util.spec_from_file_location(
        "bench_eplb", os.path.join(os.path.dirname(__file__), "..", "tools", "bench_eplb.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--deepseek-eplb", str(stand_in), "--layers", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours <= DeepSeek on every case and every layer" in out
    assert sum(line.startswith("| EP320 |") for line in out.splitlines()) == 2 and "| routed | EP144 | global |" in out


def test_balancer_and_statistics_do_not_import_torch():
    # the router and the serving layer use them without torch
    import subprocess
    import sys

    code = "import sys, engine.eplb, engine.expert_load; assert 'torch' not in sys.modules"
    root = os.path.join(os.path.dirname(__file__), "..")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

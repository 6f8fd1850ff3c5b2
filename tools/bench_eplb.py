"""Our EPLB (engine/eplb.py) against DeepSeek's, side by side, on the same loads in one run.

    python tools/bench_eplb.py --deepseek-eplb PATH/eplb.py [--layers 61] [--seed 0]
                               [--tolerance 0.01] [--repeats 3]

DeepSeek's balancer (github.com/deepseek-ai/EPLB, ``eplb.py``) is loaded at run time from the
given path and is never part of this repository; without ``--deepseek-eplb`` only our figures
are printed. Prints markdown tables:

1. balance: max/mean rank load (1.0 = perfect; mean over layers, and the worst layer) of
   DeepSeek's placement and ours, for DeepSeek's README example and, for EP32 prefill
   (4 nodes x 8 GPUs, 288 slots, hierarchical), EP144 decode (18 x 8, 288 slots, global) and
   EP320 decode (40 x 8, 320 slots, global), on synthetic loads over 256 experts:
   ``zipf`` (Zipf s=1 over experts, a different order per layer), ``hot`` (lognormal base,
   4 experts per layer 10-30x hotter), ``routed`` (tokens routed as V3 does: group-limited
   top-8 of 8 groups, top-4 groups, over per-layer expert popularity). Also the identity
   placement (no balancing), a lower bound (max of mean rank load and the smallest possible
   largest replica; not always reachable) and the layers where ours is worse than DeepSeek's.
2. rollout: the ``routed`` load drifts (each expert x lognormal(0, 0.2)); slots whose expert
   changes from the placement made for the old load (weights a live rollout moves), and
   max/mean, for DeepSeek's fresh placement, ours fresh, and ours with ``previous=`` at
   tolerance 0 and ``--tolerance``.
3. wall time for each shape x ``--layers`` layers (best of ``--repeats``, interleaved).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.eplb import _replicate, changed_slots, plan_placement, predicted_rank_load  # noqa: E402

EXPERTS, GROUPS = 256, 8
SHAPES = {  # name: (physical slots, nodes, ranks)
    "EP32": (288, 4, 32),
    "EP144": (288, 18, 144),
    "EP320": (320, 40, 320),
}
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


# ----------------------------------------------------------------------------- loads


def zipf_load(rng, layers: int) -> np.ndarray:
    base = 1e5 / np.arange(1, EXPERTS + 1)
    return np.rint(np.stack([rng.permutation(base) for _ in range(layers)]))


def hot_load(rng, layers: int) -> np.ndarray:
    w = rng.lognormal(0.0, 0.5, (layers, EXPERTS)) * 1000
    for layer in range(layers):
        hot = rng.choice(EXPERTS, 4, replace=False)
        w[layer, hot] *= rng.uniform(10, 30, 4)
    return np.rint(w)


def routed_load(rng, layers: int, tokens: int = 4096, top_k: int = 8, topk_group: int = 4) -> np.ndarray:
    """Tokens per expert when V3's group-limited top-k routes ``tokens`` tokens per layer."""
    out = np.zeros((layers, EXPERTS))
    for layer in range(layers):
        popularity = rng.normal(0, 0.6, EXPERTS) + np.repeat(rng.normal(0, 0.3, GROUPS), EXPERTS // GROUPS)
        scores = popularity + rng.gumbel(0, 1, (tokens, EXPERTS))  # [T, E]
        top2 = np.sort(scores.reshape(tokens, GROUPS, -1), axis=2)[:, :, -2:].sum(-1)  # [T, G]
        groups = np.argsort(-top2, axis=1)[:, :topk_group]
        mask = np.zeros((tokens, GROUPS), dtype=bool)
        np.put_along_axis(mask, groups, True, axis=1)
        scores = np.where(np.repeat(mask, EXPERTS // GROUPS, axis=1), scores, -np.inf)
        chosen = np.argpartition(-scores, top_k, axis=1)[:, :top_k]
        out[layer] = np.bincount(chosen.ravel(), minlength=EXPERTS)
    return out


# ----------------------------------------------------------------------------- helpers


def load_deepseek(path: str):
    spec = importlib.util.spec_from_file_location("deepseek_eplb", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rebalance_experts


def max_over_mean(w, phy2log, ranks) -> np.ndarray:
    load = predicted_rank_load(w, phy2log, ranks)
    return load.max(1) / load.mean(1)


def lower_bound(w, slots, ranks) -> np.ndarray:
    """[L] max(mean rank load, smallest possible largest replica) / mean rank load (global rule)."""
    mean = w.sum(1) / ranks
    return np.maximum(mean, (w / _replicate(w, slots)).max(1)) / mean


def identity(layers, experts, slots, groups, nodes, hierarchical) -> np.ndarray:
    node_slots, node_experts = (slots // nodes, experts // nodes) if hierarchical else (slots, experts)
    s = np.arange(slots)
    return np.tile(s // node_slots * node_experts + s % node_slots % node_experts, (layers, 1))


def run_deepseek(fn, w, slots, groups, nodes, ranks):
    import torch

    return fn(torch.from_numpy(w.astype(np.float64)), slots, groups, nodes, ranks)[0].numpy()


def fmt(x: float) -> str:
    return f"{x:.4f}"


# ----------------------------------------------------------------------------- sections


def balance_table(cases, deepseek) -> bool:
    print("\n### Balance: max/mean rank load (1.0 = perfect), mean over layers [worst layer]; "
          "mean/max (balancedness), mean over layers\n")
    cols = ["case", "shape", "policy", "identity", "lower bound (global rule)"]
    cols += ["DeepSeek", "ours", "ours/DeepSeek", "layers ours worse", "mean/max DeepSeek", "mean/max ours"] \
        if deepseek else ["ours", "mean/max ours"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    ok = True
    for name, shape_name, w, (slots, groups, nodes, ranks) in cases:
        ours = plan_placement(w, slots, groups, nodes, ranks)
        hier = ours.policy == "hierarchical"
        ident = max_over_mean(w, identity(len(w), w.shape[1], slots, groups, nodes, hier), ranks)
        lb = lower_bound(w, slots, ranks)
        row = [name, shape_name, ours.policy, f"{fmt(ident.mean())} [{fmt(ident.max())}]",
               f"{fmt(lb.mean())} [{fmt(lb.max())}]"]
        mine = ours.max_over_mean
        if deepseek:
            theirs = max_over_mean(w, run_deepseek(deepseek, w, slots, groups, nodes, ranks), ranks)
            worse = int((mine > theirs * (1 + 1e-9)).sum())
            ok &= worse == 0 and mine.mean() <= theirs.mean() * (1 + 1e-12)
            row += [f"{fmt(theirs.mean())} [{fmt(theirs.max())}]", f"{fmt(mine.mean())} [{fmt(mine.max())}]",
                    fmt(mine.mean() / theirs.mean()), f"{worse} / {len(w)}", fmt((1 / theirs).mean())]
        else:
            row += [f"{fmt(mine.mean())} [{fmt(mine.max())}]"]
        row += [fmt(ours.balancedness.mean())]
        print("| " + " | ".join(row) + " |", flush=True)
    return ok


def rollout_table(rng, layers, tolerance, deepseek):
    print("\n### Rollout: `routed` load drifts (x lognormal(0, 0.2) per expert); slots changed per "
          "layer vs the placement for the old load (of " + ", ".join(f"{s} {v[0]}" for s, v in SHAPES.items())
          + " slots), and max/mean\n")
    cols = ["shape"]
    if deepseek:
        cols += ["DeepSeek fresh: changed", "max/mean"]
    cols += ["ours fresh: changed", "max/mean", "ours previous=, tol 0: changed", "max/mean",
             f"ours previous=, tol {tolerance}: changed", "max/mean"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for shape_name, (slots, nodes, ranks) in SHAPES.items():
        old_w = routed_load(rng, layers)
        new_w = old_w * rng.lognormal(0, 0.2, old_w.shape)
        row = [shape_name]
        if deepseek:
            before = run_deepseek(deepseek, old_w, slots, GROUPS, nodes, ranks)
            after = run_deepseek(deepseek, new_w, slots, GROUPS, nodes, ranks)
            row += [f"{changed_slots(before, after).mean():.1f}", fmt(max_over_mean(new_w, after, ranks).mean())]
        before = plan_placement(old_w, slots, GROUPS, nodes, ranks).phy2log
        fresh = plan_placement(new_w, slots, GROUPS, nodes, ranks)
        row += [f"{changed_slots(before, fresh.phy2log).mean():.1f}", fmt(fresh.max_over_mean.mean())]
        for tol in (0.0, tolerance):
            p = plan_placement(new_w, slots, GROUPS, nodes, ranks, previous=before, tolerance=tol)
            row += [f"{p.changed_slots.mean():.1f}", fmt(p.max_over_mean.mean())]
        print("| " + " | ".join(row) + " |", flush=True)


def timing_table(rng, layers, repeats, deepseek):
    print(f"\n### Wall time, {layers} layers, `routed` load (best of {repeats}, interleaved), seconds\n")
    cols = ["shape"] + (["DeepSeek"] if deepseek else []) + ["ours", "ours previous= (tol 0)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for shape_name, (slots, nodes, ranks) in SHAPES.items():
        w = routed_load(rng, layers)
        drifted = w * rng.lognormal(0, 0.2, w.shape)
        previous = plan_placement(w, slots, GROUPS, nodes, ranks).phy2log
        runs = {}
        if deepseek:
            runs["deepseek"] = lambda: run_deepseek(deepseek, drifted, slots, GROUPS, nodes, ranks)
        runs["ours"] = lambda: plan_placement(drifted, slots, GROUPS, nodes, ranks)
        runs["stable"] = lambda: plan_placement(drifted, slots, GROUPS, nodes, ranks, previous=previous)
        best = {k: float("inf") for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
        print("| " + " | ".join([shape_name] + [f"{best[k]:.3f}" for k in runs]) + " |", flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepseek-eplb", metavar="PATH", help="DeepSeek's eplb.py (github.com/deepseek-ai/EPLB)")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    deepseek = load_deepseek(args.deepseek_eplb) if args.deepseek_eplb else None
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}; layers {args.layers}; "
          f"seed {args.seed}")
    if deepseek is None:
        print("DeepSeek's EPLB not given (--deepseek-eplb PATH/eplb.py): printing ours only.")

    rng = np.random.default_rng(args.seed)
    cases = [("README example", "12 experts, 16 slots, 2 nodes x 4", README_WEIGHT.astype(np.float64), (16, 4, 2, 8))]
    loads = {"zipf": zipf_load(rng, args.layers), "hot": hot_load(rng, args.layers),
             "routed": routed_load(rng, args.layers)}
    for load_name, w in loads.items():
        for shape_name, (slots, nodes, ranks) in SHAPES.items():
            cases.append((load_name, shape_name, w, (slots, GROUPS, nodes, ranks)))
    ok = balance_table(cases, deepseek)
    rollout_table(rng, args.layers, args.tolerance, deepseek)
    timing_table(rng, args.layers, args.repeats, deepseek)
    if deepseek:
        print("\n" + ("ours <= DeepSeek on every case and every layer" if ok else "OURS IS WORSE SOMEWHERE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

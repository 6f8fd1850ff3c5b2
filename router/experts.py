"""Expert-load statistics and live expert rebalancing, driven by the router.

**Statistics.** Every DP replica leader's load report (``WorkerLoad.experts``, read by the
registry's health loop every ``health_interval_s``) carries its replica's *cumulative*
expert-load counts. ``ExpertBalancer.observe`` turns successive reports into deltas (a new
incarnation starts from zero; the first report seen is only a baseline) and adds them to the
instance's ``ExpertLoadWindow`` (``engine.expert_load``: the last ``window`` intervals of
``interval_s``). An instance's view is the sum over its replicas; a pool's balancedness per
layer is its worst instance's (mean / max tokens per EP rank over the window).

**Rebalancing** (``rebalance(pool)``; automatic when ``auto`` and the pool's mean
balancedness over layers stays below ``threshold``, at most once per ``min_gap_s``; or
``POST /admin/rebalance``). The pool's logical load over the window goes through
``engine.eplb.plan_placement`` with each instance's current placement as ``previous`` (few
slots move); an instance whose predicted balancedness would not gain ``min_gain`` is left
alone. Then per instance, on every replica leader (each relays to its ranks):

1. ``stage_experts(version, phy2log)``: every rank reads the experts it will hold, in the
   background, while serving goes on; ``rollout_status`` until all have (``stage_timeout_s``);
2. ``switch_experts(version)``: one MoE layer per step boundary, on all ranks of the instance
   at the same step (``engine.multirank``); ``rollout_status`` until the last has switched.

A staging failure or timeout, or a leader lost, aborts the rollout before any layer switches:
the old placement keeps serving. Outputs never change: all replicas of an expert hold the
same weights.

Metrics (``pdserve_`` prefix): ``expert_balancedness{pool,layer}`` (gauge),
``expert_tokens_total{pool,layer}`` (token copies routed, as observed), and
``eplb_rebalances_total{pool,outcome}`` (``started``/``finished``/``failed``),
``eplb_moved_bytes_total{pool}``, ``eplb_layer_pause_seconds{pool}`` (histogram: the copy
time of one layer's switch, the longest over a replica's ranks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Iterator

import numpy as np
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from deploy.contract import ROLES, WorkerLoad
from engine.eplb import plan_placement, predicted_rank_load
from engine.expert_load import ExpertCounts, ExpertLoadWindow, ExpertShape, RolloutState, balancedness

log = logging.getLogger("pdserve.router")

_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclasses.dataclass
class EPLBConfig:
    """``router.eplb`` in the pools YAML."""

    auto: bool = True  # rebalance by itself when balancedness drops (statistics are always on)
    threshold: float = 0.8  # ... below this mean (over layers) of mean/max tokens per EP rank
    interval_s: float = 2.0  # one interval of the load window
    window: int = 30  # intervals in the window (the load a placement is computed from)
    min_gap_s: float = 60.0  # between two automatic rebalances of a pool
    min_tokens: int = 2000  # token copies per MoE layer in the window before deciding anything
    min_gain: float = 0.02  # predicted balancedness gain an instance needs to be rolled out
    tolerance: float = 0.05  # engine.eplb: keep slots in place while within (1 + tolerance) of the best
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # nodes per instance, per pool (default 1)
    stage_timeout_s: float = 300.0
    switch_timeout_s: float = 120.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "EPLBConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(names)}")
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v, want = d[f.name], f.type
            ok = (isinstance(v, bool) if want == "bool" else isinstance(v, dict) if want.startswith("dict")
                  else isinstance(v, int) and not isinstance(v, bool) if want == "int"
                  else isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok:
                raise ValueError(f"{f.name}: must be {'a mapping' if want.startswith('dict') else want}, "
                                 f"got {type(v).__name__}")
        cfg = cls(**d)
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"threshold: must lie in (0, 1], got {cfg.threshold}")
        if cfg.interval_s <= 0 or cfg.window < 1 or cfg.min_gap_s < 0:
            raise ValueError("interval_s must be > 0, window >= 1, min_gap_s >= 0")
        if any(role not in ROLES or int(n) < 1 for role, n in cfg.nodes.items()):
            raise ValueError(f"nodes: a count >= 1 per pool of {list(ROLES)}, got {cfg.nodes}")
        return cfg


class RebalanceError(Exception):
    """A rebalance could not start (bad pool, one already running): the caller's error."""


@dataclasses.dataclass
class _Instance:
    name: str
    role: str
    shape: ExpertShape
    window: ExpertLoadWindow
    placements: dict[int, np.ndarray]  # version -> phy2log [L, S] (0: start-up; the ones rolled out here)
    last: dict[str, tuple[float, ExpertCounts]] = dataclasses.field(default_factory=dict)  # leader -> report
    routed: np.ndarray | None = None  # [L] token copies observed, all time
    unknown: set[int] = dataclasses.field(default_factory=set)  # placement versions reported but not known here

    @property
    def phy2log(self) -> np.ndarray:
        return self.placements[self.window.version]


class ExpertBalancer:
    def __init__(self, registry: Any, config: EPLBConfig | None = None):
        self.registry = registry
        self.config = config or EPLBConfig()
        self.instances: dict[str, _Instance] = {}
        self.last_rebalance: dict[str, dict[str, Any]] = {}
        self._locks = {role: asyncio.Lock() for role in ROLES}
        self._last_auto = {role: 0.0 for role in ROLES}
        self._task: asyncio.Task | None = None
        self.rebalances = Counter("pdserve_eplb_rebalances", "Expert rebalances per pool, by outcome.",
                                  ("pool", "outcome"), registry=None)
        self.moved_bytes = Counter("pdserve_eplb_moved_bytes", "Expert weight bytes staged for rebalances.",
                                   ("pool",), registry=None)
        self.layer_pause = Histogram("pdserve_eplb_layer_pause_seconds",
                                     "Time one layer's placement switch held a step (slowest rank).", ("pool",),
                                     registry=None, buckets=_PAUSE_BUCKETS)

    # ---- statistics ------------------------------------------------------------------------
    def observe(self, worker: Any, load: WorkerLoad) -> None:
        """A leader's load report (the registry's health loop): fold its expert counts in."""
        counts, info = load.experts, worker.info
        if counts is None or info is None or info.experts is None:
            return
        inst = self.instances.get(info.instance)
        if inst is None or inst.shape != info.experts:
            shape = info.experts
            default = shape.default_phy2log()
            inst = self.instances[info.instance] = _Instance(
                info.instance, worker.role, shape,
                ExpertLoadWindow(default, shape.num_logical, shape.num_ranks, window=self.config.window,
                                 interval_s=self.config.interval_s), {0: default})
            inst.routed = np.zeros(shape.num_layers, dtype=np.int64)
        prev = inst.last.get(worker.name)
        inst.last[worker.name] = (load.started_at, counts)
        if prev is None:  # the first report seen: a baseline (what came before is history)
            return
        restarted = prev[0] != load.started_at
        before = None if restarted else prev[1]
        logical = counts.logical - (0 if before is None else before.logical)
        # the window follows a replica onto a newer placement (every layer switched), or back to the start-up
        # one when it restarted; a report still made under the previous one is counted logically only
        back_to_start = restarted and counts.version == 0 != inst.window.version
        if counts.version >= 0 and (counts.version > inst.window.version or back_to_start):
            if counts.version in inst.placements:
                inst.window.set_placement(inst.placements[counts.version], counts.version)
            elif counts.version not in inst.unknown:  # rolled out by an earlier router: count logical load only
                inst.unknown.add(counts.version)
                log.warning("%s reports placement %d, unknown here", worker.name, counts.version)
        if counts.version >= 0 and before is not None and before.version == counts.version:
            physical = counts.physical - before.physical
        else:  # a new placement (or incarnation): its per-slot counts started with it
            physical = counts.physical
        inst.window.add(physical, version=counts.version, logical=logical)  # mid-switch (-1): logical only
        inst.routed += logical.sum(axis=1)

    def _pool(self, role: str) -> list[_Instance]:
        return [i for i in self.instances.values() if i.role == role]

    def pool_balancedness(self, role: str) -> np.ndarray | None:
        """[L] the worst instance's balancedness per layer over the window, NaN for a layer no token went
        through (e.g. the MTP layer without speculative decoding); None: no statistics yet."""
        views = []
        for i in self._pool(role):
            if i.window.physical_intervals:
                b = i.window.balancedness()
                views.append(np.where(i.window.physical_load.sum(axis=1) > 0, b, np.nan))
        if not views:
            return None
        return np.fmin.reduce(np.stack(views))  # the smallest, ignoring NaN (NaN where every instance has NaN)

    def pool_balancedness_mean(self, role: str) -> float | None:
        """The mean over the layers tokens went through (None: no tokens observed)."""
        b = self.pool_balancedness(role)
        if b is None or np.isnan(b).all():
            return None
        return float(np.nanmean(b))

    def view(self, detail: bool = False) -> dict[str, Any]:
        """The ``GET /expert_load`` JSON."""
        now = time.monotonic()
        out: dict[str, Any] = {"auto": self.config.auto, "threshold": self.config.threshold,
                               "window_s": self.config.window * self.config.interval_s, "pools": {}}
        for role in ROLES:
            insts = self._pool(role)
            for i in insts:
                i.window.advance_to(now)
            b = self.pool_balancedness(role)
            mean = self.pool_balancedness_mean(role)
            out["pools"][role] = {
                "balancedness": None if b is None else [None if np.isnan(v) else round(float(v), 4) for v in b],
                "balancedness_mean": None if mean is None else round(mean, 4),
                "last_rebalance": self.last_rebalance.get(role),
                "instances": {i.name: {"version": i.window.version, "num_ranks": i.shape.num_ranks,
                                       "routed_tokens": int(i.routed.sum()),
                                       **i.window.to_dict(detail=detail)} for i in insts},
            }
        return out

    # ---- rebalancing -----------------------------------------------------------------------
    async def rebalance(self, role: str, *, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        """Plan and roll out a new placement for every instance of pool ``role``; the summary."""
        if role not in ROLES:
            raise RebalanceError(f"pool: one of {list(ROLES)}, got {role!r}")
        lock = self._locks[role]
        if lock.locked():
            raise RebalanceError(f"a rebalance of the {role} pool is in progress")
        async with lock:
            t0 = time.monotonic()
            summary = await self._rebalance(role, force, reason)
            summary.update(pool=role, reason=reason, seconds=round(time.monotonic() - t0, 3), at=time.time())
            if summary["outcome"] != "skipped" or role not in self.last_rebalance:
                self.last_rebalance[role] = summary
            return summary

    async def _rebalance(self, role: str, force: bool, reason: str) -> dict[str, Any]:
        await self.registry.pool_info(role)
        insts = self._pool(role)
        for i in insts:
            i.window.advance_to()
        if not insts:
            return {"outcome": "skipped", "why": "no expert statistics from this pool yet (or no MoE layers)"}
        weight = sum(i.window.logical_load.astype(np.float64) for i in insts)
        per_layer = weight.sum(axis=1)
        used = per_layer[per_layer > 0]  # layers no token went through (MTP without drafting) do not count
        if not used.size or used.min() < (1 if force else self.config.min_tokens):
            return {"outcome": "skipped", "why": f"too few tokens routed in the window ({int(weight.sum())})"}
        results = {}
        for inst in insts:
            results[inst.name] = await self._rebalance_instance(inst, weight, force)
        outcomes = {r["outcome"] for r in results.values()}
        outcome = "failed" if "failed" in outcomes else "finished" if "finished" in outcomes else "skipped"
        return {"outcome": outcome, "instances": results}

    async def _rebalance_instance(self, inst: _Instance, weight: np.ndarray, force: bool) -> dict[str, Any]:
        shape, cfg = inst.shape, self.config
        if shape.num_ranks < 2:
            return {"outcome": "skipped", "why": "one EP rank: nothing to balance"}
        leaders = [w for w in self.registry.workers[inst.role] if w.info is not None and w.info.instance == inst.name]
        if not leaders or not all(w.healthy and w.handle is not None for w in leaders):
            return {"outcome": "skipped", "why": "not every replica of the instance is in rotation"}
        nodes = int(cfg.nodes.get(inst.role, 1))
        current = inst.phy2log
        plan = plan_placement(weight, shape.num_slots, shape.num_groups, nodes, shape.num_ranks, previous=current,
                              tolerance=cfg.tolerance)
        used = weight.sum(axis=1) > 0
        before = balancedness(predicted_rank_load(weight, current, shape.num_ranks))[used]
        after = plan.balancedness[used]
        summary: dict[str, Any] = {
            "predicted_balancedness_before": round(float(before.mean()), 4),
            "predicted_balancedness_after": round(float(after.mean()), 4),
            "observed_balancedness": round(float(inst.window.balancedness()[used].mean()), 4),
            "policy": plan.policy, "slots_moved": int(plan.changed_slots.sum()),
            "layers_changed": int((plan.changed_slots > 0).sum())}
        # the gain is judged against what was observed too: the replica rule sends a token to a copy on
        # its own rank first, so replicas are not always used evenly as the prediction assumes
        observed = inst.window.balancedness()[used] if inst.window.physical_intervals else before
        gain = after.mean() - min(before.mean(), observed.mean())
        if not summary["slots_moved"] or (not force and gain < cfg.min_gain):
            return {"outcome": "skipped", "why": "the current placement is as good", **summary}
        version = max(inst.placements) + 1
        inst.placements[version] = plan.phy2log
        self.rebalances.labels(inst.role, "started").inc()
        try:
            states = await self._rollout(leaders, version, plan.phy2log.tolist())
        except Exception as e:
            self.rebalances.labels(inst.role, "failed").inc()
            log.warning("expert rollout %d of %s failed: %s", version, inst.name, e)
            await asyncio.gather(*(self._call(w, "abort_rollout", 10.0) for w in leaders), return_exceptions=True)
            return {"outcome": "failed", "version": version, "error": str(e)[:500], **summary}
        self.rebalances.labels(inst.role, "finished").inc()
        moved = sum(s.staged_bytes for s in states)
        self.moved_bytes.labels(inst.role).inc(moved)
        pauses = np.max([s.pauses_s for s in states], axis=0)  # per layer, the slowest replica
        for p in pauses:
            self.layer_pause.labels(inst.role).observe(float(p))
        log.info("%s: expert placement %d in (%d slots moved, %d bytes)", inst.name, version, summary["slots_moved"],
                 moved)
        return {"outcome": "finished", "version": version, "moved_bytes": moved,
                "max_layer_pause_s": round(float(pauses.max()), 6), **summary}

    async def _rollout(self, leaders: list, version: int, phy2log: list[list[int]]) -> list[RolloutState]:
        cfg = self.config
        await asyncio.gather(*(self._call(w, "stage_experts", 30.0, version, phy2log) for w in leaders))
        await self._wait(leaders, cfg.stage_timeout_s, "staging",
                         lambda s: s.error is None and s.version == version and s.staged)
        await asyncio.gather(*(self._call(w, "switch_experts", 30.0, version) for w in leaders))
        return await self._wait(leaders, cfg.switch_timeout_s, "switching", lambda s: s.installed_version == version)

    async def _wait(self, leaders: list, timeout_s: float, what: str, done) -> list[RolloutState]:
        deadline = time.monotonic() + timeout_s
        while True:
            states: list[RolloutState] = await asyncio.gather(*(self._call(w, "rollout_status", 30.0) for w in leaders))
            failed = [f"{w.name}: {s.error}" for w, s in zip(leaders, states) if s.error]
            if failed:
                raise RuntimeError(f"{what} failed: {'; '.join(failed)}")
            if all(done(s) for s in states):
                return states
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not finish within {timeout_s:g} s")
            await asyncio.sleep(0.05)

    async def _call(self, w: Any, method: str, timeout: float, *args: Any) -> Any:
        """One rollout call; its failure fails the rollout, not the worker (the health loop judges that)."""
        if w.handle is None:
            raise RuntimeError(f"{w.name} is not in rotation")
        try:
            return await asyncio.wait_for(getattr(w.handle, method).remote(*args), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{w.name}: {method} got no answer within {timeout:g} s") from None
        except Exception as e:
            cause = getattr(e, "cause", None) or e
            raise RuntimeError(f"{w.name}: {method}: {type(cause).__name__}: {cause}") from None

    # ---- automatic ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._auto_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _auto_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            for role in ROLES:
                try:
                    await self.registry.pool_info(role)  # a re-created worker's facts, for observe()
                    if self.config.auto:
                        await self.check(role)
                except Exception:  # never let the loop die; the next round tries again
                    log.exception("automatic rebalance of the %s pool failed", role)

    async def check(self, role: str) -> dict[str, Any] | None:
        """One automatic decision for a pool: rebalance when its window is full enough and it is unbalanced."""
        now = time.monotonic()
        if now - self._last_auto[role] < self.config.min_gap_s or self._locks[role].locked():
            return None
        insts = self._pool(role)
        for i in insts:
            i.window.advance_to(now)
        mean = self.pool_balancedness_mean(role)
        if mean is None or mean >= self.config.threshold:
            return None
        routed = sum(i.window.logical_load.sum(axis=1) for i in insts)
        if routed[routed > 0].min() < self.config.min_tokens:
            return None
        self._last_auto[role] = now
        log.info("%s pool balancedness %.3f < %.3f: rebalancing", role, mean, self.config.threshold)
        return await self.rebalance(role, reason=f"auto: balancedness {mean:.3f} < {self.config.threshold}")

    # ---- metrics -----------------------------------------------------------------------------
    def attach(self, registry: Any) -> None:
        for collector in (self.rebalances, self.moved_bytes, self.layer_pause, _ExpertGauges(self)):
            registry.register(collector)


class _ExpertGauges:
    def __init__(self, balancer: ExpertBalancer):
        self._b = balancer

    def collect(self) -> Iterator[Metric]:
        bal = GaugeMetricFamily("pdserve_expert_balancedness",
                                "Mean over max tokens per EP rank over the load window, per MoE layer (1 = even).",
                                labels=["pool", "layer"])
        tokens = CounterMetricFamily("pdserve_expert_tokens", "Token copies routed to experts, per MoE layer.",
                                     labels=["pool", "layer"])
        now = time.monotonic()
        for role in ROLES:
            insts = self._b._pool(role)
            for i in insts:
                i.window.advance_to(now)
            b = self._b.pool_balancedness(role)
            if b is not None:
                for layer, v in enumerate(b):
                    if not np.isnan(v):  # no token went through this layer
                        bal.add_metric([role, str(layer)], float(v))
            if insts:
                for layer, n in enumerate(np.sum([i.routed for i in insts], axis=0)):
                    tokens.add_metric([role, str(layer)], float(n))
        yield bal
        yield tokens

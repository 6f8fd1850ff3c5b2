"""Expert load statistics for EPLB: a sliding window over tokens routed to each expert slot.

Flow: every rank's MoE layers count the tokens they route to each physical slot it holds
(``counts [L, n_local]``, ints); at the end of a step or an interval the rank sends
``load_report(counts, slots, ...)`` (a small JSON-able dict). The collector (the router, or
rank 0) keeps one ``ExpertLoadWindow``:

* ``add`` / ``add_report`` add counts into the *open* interval (reports of many ranks merge by
  addition; a report made under another placement version is dropped and counted);
* ``advance()`` closes the open interval into a ring of the last ``window`` intervals (fixed-size
  arrays; the window sums are kept by adding the new interval and subtracting the one that falls
  out: no per-step loop over experts). With ``interval_s`` the window advances by itself on
  ``add``/``advance_to(now)``, one interval per ``interval_s`` elapsed, so old load expires with
  time even when no tokens arrive.

Views (closed intervals only):

* ``physical_load [L, P]``: tokens per slot over the window, since the last placement change;
* ``logical_load [L, E]``: tokens per logical expert over the window (mapped through the
  ``phy2log`` in force when the counts arrived, so it survives a placement change): the
  ``weight`` input of ``engine.eplb.plan_placement``;
* ``ema [L, E]``: exponential moving average of the per-interval logical counts;
* ``balancedness() [L]``: mean rank load / max rank load of the observed physical load
  (1.0 = perfect; 1 / num_ranks = everything on one rank).

The messages of live rebalancing (``engine.rebalance``, ``deploy.contract``, ``router.experts``)
are here too: ``ExpertShape`` (what an instance's MoE layers look like), ``ExpertCounts``
(a DP replica's cumulative counts, in its worker's load report) and ``RolloutState``.

Torch-free (numpy); counts may be numpy arrays, torch CPU tensors or nested lists.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExpertShape:
    """An instance's MoE layers as the balancer sees them."""

    num_layers: int  # MoE layers, main then MTP (``DeepseekV3ForCausalLM.moe_layers`` order)
    num_logical: int  # routed experts E
    num_slots: int  # physical slots S = E + redundant, S / ep per EP rank
    num_ranks: int  # EP ranks the slots are spread over
    num_groups: int  # expert groups (V3: n_group)

    def default_phy2log(self) -> np.ndarray:
        """[L, S] the start-up placement (``ExpertPlacement.default``: slot s holds expert s % E)."""
        return np.tile(np.arange(self.num_slots, dtype=np.int64) % self.num_logical, (self.num_layers, 1))


@dataclasses.dataclass
class ExpertCounts:
    """Token copies a DP replica routed (its ranks summed), cumulative over the worker's life."""

    version: int  # placement version installed on every layer (0: start-up); -1 while switching
    logical: np.ndarray  # [L, E] int64 per logical expert, since start
    physical: np.ndarray  # [L, S] int64 per slot, since ``version`` was installed (meaningless at -1)


@dataclasses.dataclass
class RolloutState:
    """Where a rollout stands on one DP replica (every rank of it)."""

    version: int  # the rollout's version (-1: none staged or switching)
    installed_version: int  # the placement in force on every layer (-1 mid-switch)
    staged: bool = False  # every rank has read the new weights
    error: str | None = None  # staging failed on some rank (the old placement keeps serving)
    staged_bytes: int = 0  # expert weights read, summed over the replica's ranks
    layers_switched: int = 0
    num_layers: int = 0
    pauses_s: list[float] = dataclasses.field(default_factory=list)  # per layer switched: the copy's time


def balancedness(rank_load) -> np.ndarray:
    """[..., R] rank loads -> [...] mean / max over ranks (1.0 when nothing was routed)."""
    load = np.asarray(rank_load, dtype=np.float64)
    top = load.max(axis=-1)
    return np.where(top > 0, load.mean(axis=-1) / np.where(top > 0, top, 1.0), 1.0)


def rank_load(physical_load, num_ranks: int) -> np.ndarray:
    """[L, P] load per slot -> [L, R] load per rank (slot s is on rank s // (P // R))."""
    load = np.asarray(physical_load)
    return load.reshape(load.shape[0], num_ranks, -1).sum(-1)


def load_report(counts, slots=None, *, rank: int | None = None, version: int | None = None) -> dict:
    """A rank's report: ``counts [L, n]`` tokens per slot for the physical ``slots [n]`` it holds
    (None: all slots, n = P), made under placement ``version``. JSON-able."""
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts must be [layers, slots], got shape {c.shape}")
    return {
        "rank": rank,
        "version": version,
        "slots": None if slots is None else np.asarray(slots, dtype=np.int64).tolist(),
        "counts": c.astype(np.int64).tolist(),
    }


class ExpertLoadWindow:
    """The last ``window`` intervals of expert load; see the module docstring."""

    def __init__(self, phy2log, num_logical: int, num_ranks: int, *, window: int = 16,
                 ema_decay: float = 0.8, interval_s: float | None = None, version: int = 0,
                 now: float | None = None):
        p2l = np.asarray(phy2log, dtype=np.int64)
        if p2l.ndim != 2 or p2l.shape[1] % num_ranks:
            raise ValueError(f"phy2log must be [layers, slots] with slots divisible by {num_ranks} ranks")
        if window < 1 or not 0.0 <= ema_decay < 1.0:
            raise ValueError("window must be >= 1 and 0 <= ema_decay < 1")
        self.num_layers, self.num_physical = p2l.shape
        self.num_logical, self.num_ranks, self.window = num_logical, num_ranks, window
        self.ema_decay, self.interval_s = ema_decay, interval_s
        L, P, E = self.num_layers, self.num_physical, num_logical
        self._phys_ring = np.zeros((window, L, P), dtype=np.int64)
        self._log_ring = np.zeros((window, L, E), dtype=np.int64)
        self._phys_sum = np.zeros((L, P), dtype=np.int64)
        self._log_sum = np.zeros((L, E), dtype=np.int64)
        self._open_phys = np.zeros((L, P), dtype=np.int64)
        self._open_log = np.zeros((L, E), dtype=np.int64)
        self._ema = np.zeros((L, E), dtype=np.float64)
        self._head = 0  # ring position the next closed interval goes to
        self.intervals = 0  # closed intervals so far (all time)
        self.dropped_reports = 0
        self._started = time.monotonic() if now is None else now
        self.set_placement(p2l, version)

    # -- placement

    def set_placement(self, phy2log, version: int | None = None) -> None:
        """A new placement is in force: physical views restart (slots now hold other experts);
        the logical window, the EMA and the open interval's logical counts are kept."""
        p2l = np.asarray(phy2log, dtype=np.int64)
        if p2l.shape != (self.num_layers, self.num_physical):
            raise ValueError(f"phy2log has shape {p2l.shape}, expected {(self.num_layers, self.num_physical)}")
        if p2l.min() < 0 or p2l.max() >= self.num_logical:
            raise ValueError("phy2log holds an expert id out of range")
        self.phy2log = p2l
        self.version = (getattr(self, "version", -1) + 1) if version is None else version
        self._flat = p2l + self.num_logical * np.arange(self.num_layers)[:, None]  # [L, P] into [L*E]
        self._phys_ring[:] = 0
        self._phys_sum[:] = 0
        self._open_phys[:] = 0
        self.physical_intervals = 0  # closed intervals under this placement (capped at window)

    # -- input

    def add(self, counts, slots=None, *, version: int | None = None, now: float | None = None,
            logical=None) -> bool:
        """Add ``counts [L, n]`` tokens for physical ``slots [n]`` (None: all P slots) to the open
        interval. False (and dropped) if made under another placement ``version``; with ``logical
        [L, E]`` (the same tokens per logical expert, as the ranks counted them) those are kept even
        then, since they do not depend on the placement."""
        if self.interval_s is not None:
            self.advance_to(now)
        if logical is not None:
            lg = np.asarray(logical, dtype=np.int64)
            if lg.shape != (self.num_layers, self.num_logical):
                raise ValueError(f"logical counts have shape {lg.shape}, expected {(self.num_layers, self.num_logical)}")
            self._open_log += lg
        if version is not None and version != self.version:
            self.dropped_reports += 1
            return False
        c = np.asarray(counts, dtype=np.int64)
        if slots is None:
            if c.shape != (self.num_layers, self.num_physical):
                raise ValueError(f"counts has shape {c.shape}, expected {(self.num_layers, self.num_physical)}")
            self._open_phys += c
            flat = self._flat
        else:
            s = np.asarray(slots, dtype=np.int64)
            if c.shape != (self.num_layers, s.size) or np.unique(s).size != s.size:
                raise ValueError(f"counts [layers, n] must match {s.size} distinct slots, got {c.shape}")
            if s.size and (s.min() < 0 or s.max() >= self.num_physical):
                raise ValueError("slot id out of range")
            self._open_phys[:, s] += c
            flat = self._flat[:, s]
        if logical is not None:
            return True
        per_expert = np.bincount(flat.ravel(), weights=c.ravel(), minlength=self.num_layers * self.num_logical)
        self._open_log += np.rint(per_expert).astype(np.int64).reshape(self.num_layers, self.num_logical)
        return True

    def add_report(self, report: dict, now: float | None = None) -> bool:
        """Add one ``load_report`` dict (of any rank)."""
        return self.add(report["counts"], report.get("slots"), version=report.get("version"), now=now)

    # -- time

    def advance(self) -> None:
        """Close the open interval: it enters the window, the oldest one leaves."""
        h = self._head
        self._phys_sum += self._open_phys - self._phys_ring[h]
        self._log_sum += self._open_log - self._log_ring[h]
        self._phys_ring[h] = self._open_phys
        self._log_ring[h] = self._open_log
        d = self.ema_decay if self.intervals else 0.0
        self._ema = d * self._ema + (1.0 - d) * self._open_log
        self._open_phys[:] = 0
        self._open_log[:] = 0
        self._head = (h + 1) % self.window
        self.intervals += 1
        self.physical_intervals = min(self.physical_intervals + 1, self.window)

    def advance_to(self, now: float | None = None) -> int:
        """With ``interval_s``: close every interval that ended by ``now`` (monotonic seconds);
        returns how many closed."""
        if self.interval_s is None:
            raise ValueError("advance_to needs interval_s")
        now = time.monotonic() if now is None else now
        due = int((now - self._started) // self.interval_s) - self.intervals
        for _ in range(max(due, 0)):
            self.advance()
        return max(due, 0)

    # -- views

    @property
    def physical_load(self) -> np.ndarray:
        """[L, P] tokens per slot over the window (since the last placement change)."""
        return self._phys_sum.copy()

    @property
    def logical_load(self) -> np.ndarray:
        """[L, E] tokens per logical expert over the window."""
        return self._log_sum.copy()

    @property
    def ema(self) -> np.ndarray:
        """[L, E] exponential moving average of the per-interval logical counts."""
        return self._ema.copy()

    def rank_load(self) -> np.ndarray:
        """[L, R] observed tokens per rank over the window."""
        return rank_load(self._phys_sum, self.num_ranks)

    def balancedness(self) -> np.ndarray:
        """[L] observed mean rank load / max rank load over the window (1.0 = perfect)."""
        return balancedness(self.rank_load())

    def to_dict(self, detail: bool = True) -> dict:
        """JSON-able view: summary numbers, and with ``detail`` the per-layer arrays as lists."""
        b = self.balancedness()
        out = {
            "version": self.version,
            "window": self.window,
            "interval_s": self.interval_s,
            "intervals": self.intervals,
            "physical_intervals": self.physical_intervals,
            "dropped_reports": self.dropped_reports,
            "balancedness_mean": float(b.mean()) if b.size else 1.0,
            "balancedness_min": float(b.min()) if b.size else 1.0,
            "balancedness": b.tolist(),
        }
        if detail:
            out["logical_load"] = self._log_sum.tolist()
            out["ema"] = self._ema.tolist()
            out["physical_load"] = self._phys_sum.tolist()
        return out

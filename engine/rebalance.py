"""One rank's experts: cumulative load counters, and live rebalancing (stage, then switch layer by layer).

**Counting.** Every MoE layer counts the token copies this rank routes to each physical slot
(``MoE.read_expert_load``); ``RankExperts.counts()`` folds them into cumulative per-rank totals
(``[L, E]`` per logical expert since start, ``[L, S]`` per slot since the layer's placement was
installed), which the executor sums over a DP replica's ranks into an ``ExpertCounts``. The
router turns successive reports into deltas (``router.experts``), so a report read twice or
lost is never counted wrong.

**Rollout.** The router decides a new placement for a pool (``engine.eplb``) and rolls it out
to every rank of every instance in two phases, so that serving never stops for more than one
step per layer:

1. **stage** (``RankExperts.stage``, a background thread): for every MoE layer, the slots of
   this rank whose logical expert changes get their new expert's weights read into host
   memory (from the checkpoint: each rank reads only the experts it will hold, as at start-up;
   the old placement keeps serving meanwhile). ``staged_version`` tells when it is done;
   a failure leaves ``error`` set and the old placement untouched.
2. **switch** (``RankExperts.install_next``, between two steps, one layer at a time, on every
   rank of the instance at the same step — ``engine.multirank`` agrees on the step): the staged
   weights are copied into their slots and the layer's ``phy2log`` is replaced in one assignment
   (``MoE.install_placement``). Outputs do not change: every replica of an expert holds the
   same weights, so which slot a token goes to never changes its result.

MoE layers are numbered here in ``DeepseekV3ForCausalLM.moe_layers()`` order (main layers,
then the MTP layers), the order of the ``phy2log`` rows the router sends.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from engine.checkpoint.loader import iter_checkpoint_tensors
from engine.expert_load import ExpertShape

log = logging.getLogger("pdserve.engine")

_PROJ = ("gate_proj", "up_proj", "down_proj")


def read_expert_weights(path: str, model, layer: int, slots: dict[int, int], keep_fp8: bool,
                        dtype: torch.dtype) -> dict[int, dict[str, torch.Tensor]]:
    """{physical slot: the tensors of the logical expert it will hold} for checkpoint MoE layer ``layer``,
    in ``Experts.slot_weights`` layout (``w13`` = gate rows then up rows, ``w2``; FP8: their scales)."""
    suffixes = ("weight", "weight_scale_inv") if keep_fp8 else ("weight",)
    want = {f"model.layers.{layer}.mlp.experts.{e}.{p}.{k}" for e in set(slots.values()) for p in _PROJ
            for k in suffixes}
    got = dict(iter_checkpoint_tensors(path, model.cfg, dtype, include_mtp=len(model.mtp) > 0, progress=False,
                                       keep_fp8=keep_fp8, select=lambda name: name in want))
    out = {}
    for slot, e in slots.items():
        p = f"model.layers.{layer}.mlp.experts.{e}."
        w = {"w13": torch.cat([got[p + "gate_proj.weight"], got[p + "up_proj.weight"]]), "w2": got[p + "down_proj.weight"]}
        if keep_fp8:
            w["w13_scale_inv"] = torch.cat([got[p + "gate_proj.weight_scale_inv"], got[p + "up_proj.weight_scale_inv"]])
            w["w2_scale_inv"] = got[p + "down_proj.weight_scale_inv"]
        out[slot] = w
    return out


class RankExperts:
    """One rank's side of counting and rollouts (see the module docstring)."""

    def __init__(self, model, checkpoint: str, dtype: torch.dtype, keep_fp8: bool):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.keep_fp8 = keep_fp8
        moe = model.moe_layers()
        self.layers = list(moe)  # checkpoint layer index of each MoE layer, in order
        self.moes = list(moe.values())
        L = len(self.moes)
        E = self.moes[0].placement.num_logical if L else 0
        S = self.moes[0].placement.num_slots if L else 0
        self._logical = torch.zeros(L, E, dtype=torch.long)
        self._physical = torch.zeros(L, S, dtype=torch.long)
        self.installed_version = 0  # the placement on every layer (0 = the start-up one); -1 mid-switch
        self.staged_version = -1  # the version whose weights are ready (-1: none)
        self.version = -1  # the rollout in progress (staging or switching), -1: none
        self.error: str | None = None
        self.staged_bytes = 0
        self.switching = False
        self.pauses_s: list[float] = []
        self._phy2log: list[list[int]] | None = None
        self._staged: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self._next = 0  # the next layer to switch
        self._thread: threading.Thread | None = None

    @property
    def num_layers(self) -> int:
        return len(self.moes)

    def shape(self) -> ExpertShape | None:
        if not self.moes:
            return None
        p = self.moes[0].placement
        return ExpertShape(self.num_layers, p.num_logical, p.num_slots, p.ep_size, self.model.cfg.n_group)

    def phy2log(self) -> np.ndarray:
        """[L, S] the placement in force on every layer."""
        return np.stack([moe.placement.phy2log.cpu().numpy() for moe in self.moes])

    # -- counting

    def counts(self) -> torch.Tensor:
        """[L, E + S] int64: this rank's cumulative logical counts, then its per-slot counts since each
        layer's placement was installed (``counts_split`` cuts it)."""
        for i, moe in enumerate(self.moes):
            load = moe.read_expert_load(reset=True)
            self._logical[i] += load.logical
            self._physical[i] += load.physical
        return torch.cat([self._logical, self._physical], dim=1)

    def counts_split(self, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        e = self._logical.shape[1]
        arr = counts.cpu().numpy()
        return arr[:, :e], arr[:, e:]

    # -- staging

    def stage(self, version: int, phy2log: list[list[int]]) -> None:
        """Start reading the new placement's weights for this rank (returns at once)."""
        if self.switching:
            raise RuntimeError(f"placement {self.version} is being switched; stage after it is done")
        if len(phy2log) != self.num_layers:
            raise ValueError(f"phy2log: {len(phy2log)} layers given, the model has {self.num_layers} MoE layers")
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a rollout is already being staged here")
        new = [moe.placement.with_phy2log(row) for moe, row in zip(self.moes, phy2log)]  # checked before the thread
        self.version, self.staged_version, self.error, self.staged_bytes = version, -1, None, 0
        self._phy2log, self._staged, self._next, self.pauses_s = [list(r) for r in phy2log], {}, 0, []
        self._thread = threading.Thread(target=self._stage, args=(version, new), name="pdserve-expert-stager",
                                        daemon=True)
        self._thread.start()

    def _stage(self, version: int, new: list) -> None:
        try:
            staged, nbytes = {}, 0
            for i, (layer, moe, placement) in enumerate(zip(self.layers, self.moes, new)):
                first, old_local, new_local = placement.local_start, moe.placement.local_logical, placement.local_logical
                changed = {first + j: e for j, (o, e) in enumerate(zip(old_local, new_local)) if o != e}
                if changed:
                    staged[i] = read_expert_weights(self.checkpoint, self.model, layer, changed, self.keep_fp8,
                                                    self.dtype)
                    nbytes += sum(t.numel() * t.element_size() for w in staged[i].values() for t in w.values())
            if self.version == version:  # not dropped meanwhile
                self._staged, self.staged_bytes, self.staged_version = staged, nbytes, version
        except Exception as e:  # the old placement keeps serving; the router sees the error
            log.exception("staging expert placement %d failed", version)
            self.error = f"{type(e).__name__}: {e}"

    def is_staged(self, version: int) -> bool:
        return self.staged_version == version and self.error is None

    # -- switching

    def begin_switch(self, version: int) -> None:
        if not self.is_staged(version):
            raise RuntimeError(f"placement {version} is not staged here"
                               + (f" (staging failed: {self.error})" if self.error else ""))
        self.switching = True

    def switch_code(self) -> int:
        """Positive while switching: names (version, next layer), for ranks to agree on a step."""
        return (self.version << 16 | self._next) + 1 if self.switching else 0

    def install_next(self) -> float:
        """Switch the next MoE layer to the staged placement (between steps); the seconds it took."""
        if not (self.switching or self.is_staged(self.version)):  # a follower is told by its leader
            raise RuntimeError("no staged placement to switch to")
        self.switching = True
        t0 = time.perf_counter()
        i = self._next
        self.counts()  # fold the old placement's per-slot counts in first
        self.moes[i].install_placement(self._phy2log[i], self._staged.pop(i, {}))
        self._physical[i] = 0
        self._next += 1
        self.installed_version = -1
        if self._next == self.num_layers:
            self.installed_version, self.switching = self.version, False
            self.version, self.staged_version, self._phy2log = -1, -1, None
        pause = time.perf_counter() - t0
        self.pauses_s.append(pause)
        return pause

    def drop(self) -> None:
        """Forget a rollout before its first layer switched (aborted); the installed placement stays.
        Once a layer has switched the rollout is not dropped: every layer is staged, the switch
        finishes, and the ranks never end up on different placements."""
        if self.switching and self._next > 0:
            return
        self.switching = False
        self.version, self.staged_version, self._staged, self._phy2log = -1, -1, {}, None

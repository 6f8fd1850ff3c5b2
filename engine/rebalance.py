"""Live expert rebalancing on one rank: stage a new placement in the background, switch layer by layer.

The router decides a new placement for a pool (``engine.eplb``) and rolls it out to every rank
of every instance in two phases, so that serving never stops for more than one step per layer:

1. **stage** (``ExpertStager.stage``, a background thread): for every MoE layer, the slots of
   this rank whose logical expert changes get their new expert's weights read into host
   memory (from the checkpoint: each rank reads only the experts it will hold, as at start-up;
   the old placement keeps serving meanwhile). ``staged_version`` tells when it is done;
   a failure leaves ``error`` set and the old placement untouched.
2. **switch** (``ExpertStager.install(layer)``, between two steps, on every rank of the
   instance at the same step — ``engine.multirank`` agrees on the step): the staged weights
   are copied into their slots and the layer's ``phy2log`` is replaced in one assignment
   (``MoE.install_placement``). Outputs do not change: every replica of an expert holds the
   same weights, so which slot a token goes to never changes its result.

MoE layers are numbered here in ``DeepseekV3ForCausalLM.moe_layers()`` order (main layers,
then the MTP layers), the order of the ``phy2log`` rows the router sends.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from engine.checkpoint.loader import iter_checkpoint_tensors

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


class ExpertStager:
    """One rank's side of a rollout (see the module docstring)."""

    def __init__(self, model, checkpoint: str, dtype: torch.dtype, keep_fp8: bool):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.keep_fp8 = keep_fp8
        self.layers = list(model.moe_layers())  # checkpoint layer index of each MoE layer, in order
        self.version = 0  # the placement version installed on every layer (0 = the default one)
        self.staged_version = -1  # the version whose weights are ready (-1: none)
        self.error: str | None = None
        self.staged_bytes = 0
        self._phy2log: list[list[int]] | None = None
        self._staged: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self._installed: set[int] = set()
        self._thread: threading.Thread | None = None

    def phy2log(self) -> list[list[int]]:
        """The current placement of every MoE layer."""
        return [moe.placement.phy2log.tolist() for moe in self.model.moe_layers().values()]

    def stage(self, version: int, phy2log: list[list[int]]) -> None:
        """Start reading the new placement's weights for this rank (returns at once)."""
        if len(phy2log) != len(self.layers):
            raise ValueError(f"phy2log: {len(phy2log)} layers given, the model has {len(self.layers)} MoE layers")
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a rollout is already being staged here")
        self.staged_version, self.error, self.staged_bytes = -1, None, 0
        self._phy2log, self._staged, self._installed = [list(row) for row in phy2log], {}, set()
        self._thread = threading.Thread(target=self._stage, args=(version,), name="pdserve-expert-stager", daemon=True)
        self._thread.start()

    def _stage(self, version: int) -> None:
        try:
            moes = list(self.model.moe_layers().values())
            for i, (layer, moe) in enumerate(zip(self.layers, moes)):
                new = moe.placement.with_phy2log(self._phy2log[i])
                first, old_local, new_local = new.local_start, moe.placement.local_logical, new.local_logical
                changed = {first + j: e for j, (o, e) in enumerate(zip(old_local, new_local)) if o != e}
                if changed:
                    self._staged[i] = read_expert_weights(self.checkpoint, self.model, layer, changed,
                                                          self.keep_fp8, self.dtype)
                    self.staged_bytes += sum(t.numel() * t.element_size() for w in self._staged[i].values()
                                             for t in w.values())
            self.staged_version = version
        except Exception as e:  # the old placement keeps serving; the router sees the error
            log.exception("staging expert placement %d failed", version)
            self.error = f"{type(e).__name__}: {e}"

    def install(self, index: int) -> float:
        """Switch MoE layer ``index`` (moe_layers order) to the staged placement; the seconds it took."""
        if self._phy2log is None or self.staged_version < 0:
            raise RuntimeError("no staged placement to install")
        t0 = time.perf_counter()
        moe = list(self.model.moe_layers().values())[index]
        moe.install_placement(self._phy2log[index], self._staged.pop(index, {}))
        self._installed.add(index)
        if len(self._installed) == len(self.layers):
            self.version = self.staged_version
        return time.perf_counter() - t0

    def drop(self) -> None:
        """Forget a staged rollout (interrupted); the installed placement stays."""
        self._staged, self._phy2log, self.staged_version = {}, None, -1

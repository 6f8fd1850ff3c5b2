"""An engine instance's parallel layout, its torch.distributed groups, and a rank's place in them.

An instance is ``dp`` attention replicas × ``tp`` ranks each (``world = tp × dp``
ranks, one process each, all in one default process group: gloo on CPU, NCCL on
CUDA, ``backend_for(device)``). Instance rank ``r`` is

    DP replica  d = r // tp        TP rank  r % tp        TP group = ranks [d*tp, (d+1)*tp)

* **TP group** (the ranks of one DP replica): attention heads, the dense MLP and the
  vocabulary are split over it; with ``sp`` the tokens around the norms and the MoE
  are split over it too (``engine/model/token_split.py``). All ranks of a TP group
  run the same step (same ids, positions, block tables) and each keeps the whole
  latent cache rows of its replica's tokens.
* **DP replicas** run different requests with their own tokens and their own cache.
  They meet only in the MoE: with ``ep > 1`` every rank of the instance joins every
  MoE layer's all-to-all, so a replica with no work in a step runs a *dummy step*
  (``DeepseekV3ForCausalLM.dummy_forward``: the same passes with zero tokens).
* **EP group**: ``ep == world`` (routed experts spread over every rank, EP rank =
  instance rank, ``(n_routed_experts + num_redundant_experts) / ep`` physical slots
  each; see ``engine/model/placement.py``) or ``ep == 1`` (every rank holds every
  routed expert; replicas never communicate). Shared experts are whole on every rank.

``init_parallel(layout)`` is called by every rank after
``torch.distributed.init_process_group`` (the default group = this instance) and
returns the rank's ``ParallelContext``; the model is built from it. The
layout is what the pools YAML states per pool (``deploy.config``: tp, sp, dp, ep,
num_redundant_experts), validated here.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from engine.model.config import ModelConfig
from engine.model.layers import ParallelGroup
from engine.model.token_split import TokenSplit


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    sp: bool = False
    dp: int = 1
    ep: int = 1
    num_redundant_experts: int = 0

    def __post_init__(self):
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"tp: tp ({self.tp}) and dp ({self.dp}) must be >= 1")
        if self.sp and self.tp == 1:
            raise ValueError("sp: sequence parallelism splits a TP group; it needs tp > 1")
        if self.ep not in (1, self.world):
            raise ValueError(f"ep: experts are spread over every rank of an instance, so ep must be 1 or "
                             f"tp × dp = {self.world}, got {self.ep}")
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts: must be >= 0, got {self.num_redundant_experts}")
        if self.num_redundant_experts and self.ep == 1:
            raise ValueError("num_redundant_experts: redundant experts need expert parallelism (ep > 1)")

    @property
    def world(self) -> int:
        return self.tp * self.dp

    def num_slots(self, cfg: ModelConfig) -> int:
        """Physical expert slots of one MoE layer, over the whole instance."""
        return cfg.n_routed_experts + self.num_redundant_experts

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ValueError when ``cfg`` cannot be split this way."""
        need = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size}
        if not all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
            need["intermediate_size"] = cfg.intermediate_size  # the dense MLP layers
        for what, n in need.items():
            if n % self.tp:
                raise ValueError(f"{what} ({n}) is not divisible by tp={self.tp}")
        if cfg.n_routed_experts and self.num_slots(cfg) % self.ep:
            raise ValueError(f"{cfg.n_routed_experts} routed + {self.num_redundant_experts} redundant experts "
                             f"do not divide evenly over ep={self.ep} ranks")


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """One rank's view of its instance: its groups, and which replica it serves."""

    layout: ParallelLayout
    rank: int  # instance rank
    tp: ParallelGroup
    ep: ParallelGroup

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls(ParallelLayout(), 0, ParallelGroup.single(), ParallelGroup.single())

    @property
    def dp_rank(self) -> int:
        return self.rank // self.layout.tp

    @property
    def sp(self) -> bool:
        return self.layout.sp

    @property
    def is_single(self) -> bool:
        return self.layout.world == 1

    def split(self, num_tokens: int) -> TokenSplit:
        """The token layout of a step of ``num_tokens`` tokens in this rank's TP group."""
        return TokenSplit(self.tp, self.layout.sp, num_tokens)


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for ranks computing on ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_parallel(layout: ParallelLayout, timeout: datetime.timedelta | None = None) -> ParallelContext:
    """This rank's context; every rank of the instance calls it (in the same order as any other
    ``new_group``) after ``torch.distributed.init_process_group`` with ``world_size == layout.world``.
    ``timeout``: how long a collective of the TP and EP groups may wait (``new_group`` does not take
    the default group's: without it a hung peer blocks for the backend's default, 30 minutes)."""
    if layout.world == 1:
        return ParallelContext.single()
    if not dist.is_initialized():
        raise RuntimeError(f"init_parallel: a layout of {layout.world} ranks needs torch.distributed "
                           f"initialized first (init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != layout.world:
        raise ValueError(f"init_parallel: the process group has {world} ranks, the layout tp={layout.tp} × "
                         f"dp={layout.dp} needs {layout.world}")
    tp = ParallelGroup.single()
    if layout.tp > 1:
        for d in range(layout.dp):  # every rank creates every group, in the same order
            ranks = tuple(range(d * layout.tp, (d + 1) * layout.tp))
            group = dist.new_group(list(ranks), timeout=timeout)
            if rank in ranks:
                tp = ParallelGroup(rank % layout.tp, layout.tp, group, ranks)
    ep = ParallelGroup.single()
    if layout.ep > 1:
        ep = ParallelGroup(rank, world, dist.new_group(list(range(world)), timeout=timeout), tuple(range(world)))
    return ParallelContext(layout, rank, tp, ep)

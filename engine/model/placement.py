"""Where each routed expert of one MoE layer lives: DeepSeek EPLB's ``phy2log`` representation.

``phy2log[s]`` is the logical expert held by physical slot ``s``; there are
``S = n_routed_experts + num_redundant_experts`` slots, contiguous per EP rank:
EP rank ``r`` holds slots ``[r*S/ep, (r+1)*S/ep)``. Derived from it:
``logcnt[e]`` (how many slots hold expert ``e``, >= 1) and ``log2phy[e, :logcnt[e]]``
(those slots, ascending; -1 after them).

**Replica rule** (deterministic, the same on every rank): a copy of token ``i``
(``i`` = the token's index among the sending rank's MoE tokens this step) routed to
logical expert ``e`` goes to

1. the lowest slot of ``e`` on the sending rank itself, if the rank holds one
   (no communication for that copy), else
2. slot ``log2phy[e, i % logcnt[e]]`` (replicas take turns by token index).

**Default placement** (no load statistics yet): ``phy2log[s] = s % E`` — every
expert once in order, then the redundant slots replicate experts 0, 1, ...
round-robin; those land on other ranks than the originals whenever
``R <= E`` and ``ep >= 2``.

A placement object is immutable; ``MoE.install_placement`` replaces a layer's
object in one assignment (between steps), so a step sees either the old or the
new placement, never a mix. Every rank of the EP group must hold the same
``phy2log`` for a layer: senders pick slots on other ranks from it.
"""

from __future__ import annotations

import torch


class ExpertPlacement:
    def __init__(self, phy2log: torch.Tensor | list[int], num_logical: int, ep_size: int = 1, ep_rank: int = 0,
                 device: torch.device | str | None = None):
        phy2log = torch.as_tensor(phy2log, dtype=torch.long, device=device)
        slots = phy2log.numel()
        if phy2log.dim() != 1 or slots % ep_size:
            raise ValueError(f"phy2log: {list(phy2log.shape)} slots do not divide evenly over ep={ep_size} ranks")
        if slots and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical):
            raise ValueError(f"phy2log: logical expert ids must lie in [0, {num_logical})")
        logcnt = torch.bincount(phy2log, minlength=num_logical)  # [E]
        if bool((logcnt == 0).any()):
            missing = (logcnt == 0).nonzero().flatten().tolist()
            raise ValueError(f"phy2log: logical experts {missing} have no slot")
        self.phy2log = phy2log  # [S]
        self.num_logical = num_logical
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.slots_per_rank = slots // ep_size
        self.logcnt = logcnt  # [E]
        order = torch.argsort(phy2log, stable=True)  # slots grouped by expert, ascending inside
        starts = torch.cumsum(logcnt, 0) - logcnt  # [E]
        width = int(logcnt.max())
        rank_in_expert = torch.arange(slots, device=phy2log.device) - starts[phy2log[order]]
        self.log2phy = torch.full((num_logical, width), -1, dtype=torch.long, device=phy2log.device)  # [E, W]
        self.log2phy[phy2log[order], rank_in_expert] = order
        first = self.local_start
        local = torch.arange(first, first + self.slots_per_rank, device=phy2log.device)
        none = torch.full((num_logical,), slots, dtype=torch.long, device=phy2log.device)
        lowest = none.scatter_reduce(0, phy2log[local], local, reduce="amin")  # [E] lowest local slot, or S
        self._local_choice = torch.where(lowest < slots, lowest, -1)  # [E]
        self._identity = ep_size == 1 and slots == num_logical and bool(
            (phy2log == torch.arange(slots, device=phy2log.device)).all())
        self._single = width == 1  # one slot per expert: a table lookup, no token-index rule

    @classmethod
    def default(cls, num_logical: int, num_redundant: int = 0, ep_size: int = 1, ep_rank: int = 0,
                device: torch.device | str | None = None) -> "ExpertPlacement":
        """``phy2log[s] = s % E``: the module docstring's default."""
        return cls(torch.arange(num_logical + num_redundant, device=device) % num_logical, num_logical, ep_size,
                   ep_rank, device)

    def with_phy2log(self, phy2log: torch.Tensor | list[int]) -> "ExpertPlacement":
        """A new placement on the same ranks (the slot count must stay)."""
        new = ExpertPlacement(phy2log, self.num_logical, self.ep_size, self.ep_rank, self.phy2log.device)
        if new.num_slots != self.num_slots:
            raise ValueError(f"phy2log: {new.num_slots} slots, this layer has {self.num_slots}")
        return new

    @property
    def num_slots(self) -> int:
        return self.phy2log.numel()

    @property
    def local_start(self) -> int:
        return self.ep_rank * self.slots_per_rank

    @property
    def local_logical(self) -> list[int]:
        """The logical expert of each of this rank's slots, in slot order."""
        return self.phy2log[self.local_start:self.local_start + self.slots_per_rank].tolist()

    def physical_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [N, k] logical -> [N, k] physical slots, by the replica rule."""
        if self._identity:
            return topk_ids
        if self._single:
            return self.log2phy[topk_ids, 0]
        local = self._local_choice[topk_ids]  # [N, k]
        token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]  # [N, 1]
        remote = self.log2phy[topk_ids, token % self.logcnt[topk_ids]]  # [N, k]
        return torch.where(local >= 0, local, remote)

    def logical_counts(self, physical_counts: torch.Tensor) -> torch.Tensor:
        """Per-slot counts [S] -> per-logical-expert counts [E]."""
        out = torch.zeros(self.num_logical, dtype=physical_counts.dtype, device=physical_counts.device)
        return out.index_add_(0, self.phy2log, physical_counts)

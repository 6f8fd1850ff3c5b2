"""Where a step's tokens live inside one TP group: the sequence-parallel and MoE token split.

Every TP rank of a DP replica gets the same step, ``T`` tokens. Attention runs on
all ``T`` tokens on every TP rank (its own heads). Everything else follows one
ownership rule:

    TP rank i owns tokens [i*P, (i+1)*P) ∩ [0, T),   P = ceil(T / tp)

(the step padded to ``P * tp`` rows; when ``T < tp`` the last ranks own none, and
a step with ``T = 0`` owns nothing anywhere).

* **MoE, always**: the gate, the shared experts and the dispatch to the routed
  experts run on each rank's owned tokens only, so no token is routed ``tp``
  times and each token copy is counted once in the expert-load counters.
* **With SP** the residual stream itself is split this way (``[P, D]`` per rank):
  o_proj's partial sums are reduce-scattered into the owners' rows instead of
  all-reduced; the residual add, both norms and the MoE run on the owned rows;
  the normed rows are all-gathered before the attention (and before a dense
  MLP, whose row-parallel output is reduce-scattered again). The embedding's
  partial sums are reduce-scattered too, and the final norm's output is
  all-gathered, so ``forward`` returns ``[T, D]`` on every TP rank. Padding rows
  are zeros and stay zeros (the MoE never sees them).
* **Without SP** the residual is replicated (``[T, D]`` on every TP rank):
  partial sums are all-reduced, and each rank passes only its owned rows through
  the MoE, whose outputs are all-gathered back to ``[T, D]``.

The *residual layout* below means ``[P, D]`` (SP) or ``[T, D]`` (no SP). With
``tp == 1`` every method returns its input: no collective, no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.layers import ParallelGroup


class TokenSplit:
    """One step's token layout in a TP group (built per forward pass)."""

    def __init__(self, tp: ParallelGroup, sp: bool, num_tokens: int):
        self.tp = tp
        self.sp = sp and tp.size > 1
        self.num_tokens = num_tokens
        self.per_rank = -(-num_tokens // tp.size)  # P
        self.start = tp.rank * self.per_rank
        self.num_owned = max(0, min(self.per_rank, num_tokens - self.start))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """[T, D] partial sums -> the summed residual layout (SP: reduce-scatter; else all-reduce)."""
        if self.tp.size == 1:
            return partial
        if not self.sp:
            return self.tp.all_reduce(partial)
        pad = self.per_rank * self.tp.size - self.num_tokens
        return self.tp.reduce_scatter(F.pad(partial, (0, 0, 0, pad)))  # [P, D]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Residual layout -> [T, D] on every rank (SP: all-gather; else as is)."""
        if not self.sp:
            return x
        return self.tp.all_gather(x)[: self.num_tokens]

    def scatter(self, full: torch.Tensor) -> torch.Tensor:
        """[T, D], the same on every rank -> residual layout (SP: this rank's rows, zero-padded; no collective)."""
        if not self.sp:
            return full
        return F.pad(full[self.start:self.start + self.num_owned], (0, 0, 0, self.per_rank - self.num_owned))

    def owned(self, x: torch.Tensor) -> torch.Tensor:
        """Residual layout -> this rank's owned rows [N, D] (the MoE's input)."""
        if self.tp.size == 1:
            return x
        if self.sp:
            return x[: self.num_owned]
        return x[self.start:self.start + self.num_owned]

    def from_owned(self, y: torch.Tensor) -> torch.Tensor:
        """[N, D] outputs for the owned rows -> residual layout (no SP: all-gathered over the TP group)."""
        if self.tp.size == 1:
            return y
        y = F.pad(y, (0, 0, 0, self.per_rank - self.num_owned))  # [P, D]
        if self.sp:
            return y
        return self.tp.all_gather(y)[: self.num_tokens]

"""Moving token copies to their expert slots and the expert outputs back (``MoEDispatcher``).

Input: this rank's MoE tokens ``x [N, D]`` with their physical slots ``[N, k]``
(``ExpertPlacement.physical_ids``) and routing weights ``[N, k]``.

* **One EP rank** (``ep.size == 1``, every slot local): the ``N*k`` copies are
  sorted by slot (stable) and handed to the experts; no collective.
* **EP** (``ep.size > 1``): copies sorted by slot are also sorted by destination
  rank (slots are contiguous per rank). Per layer:
  1. exchange counts: an all-to-all of this rank's per-slot counts ``[S]`` gives
     each rank ``[ep, S/ep]``: how many rows every source sends to each of its slots;
  2. an all-to-all of the rows with variable splits; the received rows come
     grouped by source, each group sorted by local slot, and are regrouped by local
     slot (a stable sort) for the experts;
  3. after the experts, the inverse permutation and the reverse all-to-all bring
     every copy's output back to its sender, in the sender's sorted order.

``combine`` multiplies each returned copy by its routing weight (fp32) and sums
the ``k`` copies of each token into its original row: output ``[N, D]`` in the
input's token order and dtype. The weights never leave the sending rank.
A rank with ``N = 0`` (an idle DP replica, a TP rank that owns no token) still
takes part in both all-to-alls with empty splits.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.model.layers import ParallelGroup


@dataclasses.dataclass
class DispatchHandle:
    order: torch.Tensor  # [N*k] sorted position -> flat (token, choice) index
    weights: torch.Tensor  # [N*k] routing weights in sorted order (fp32)
    num_tokens: int
    k: int  # copies per token
    slot_counts: torch.Tensor  # [S] this rank's copies per physical slot (int64): the expert-load sample
    send_counts: list[int] | None = None  # EP: rows sent to each rank
    recv_counts: list[int] | None = None  # EP: rows received from each rank
    regroup: torch.Tensor | None = None  # EP: received row order -> by local slot


class MoEDispatcher:
    def __init__(self, ep: ParallelGroup):
        self.ep = ep
        self.bytes_sent = 0  # EP: bytes of rows this rank sent to other ranks (dispatch + combine), cumulative

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor,
                 num_slots: int) -> tuple[torch.Tensor, list[int], DispatchHandle]:
        """x [N, D], phys/weights [N, k] -> (rows for this rank's experts [M, D] grouped by local slot,
        rows per local slot, handle)."""
        k = phys.shape[1]
        flat = phys.flatten()  # [N*k]
        order = flat.argsort(stable=True)
        slot_counts = torch.bincount(flat, minlength=num_slots)  # [S]
        rows = x.index_select(0, order // k)  # [N*k, D] sorted by slot (index_select: ~4x faster than x[...] on CPU)
        handle = DispatchHandle(order, weights.flatten()[order].float(), x.shape[0], k, slot_counts)
        if self.ep.size == 1:
            return rows, slot_counts.tolist(), handle
        ep, per_rank = self.ep.size, num_slots // self.ep.size
        recv_slot_counts = self.ep.all_to_all(slot_counts, [per_rank] * ep, [per_rank] * ep).view(ep, per_rank)
        handle.send_counts = slot_counts.view(ep, per_rank).sum(1).tolist()
        handle.recv_counts = recv_slot_counts.sum(1).tolist()
        received = self.ep.all_to_all(rows, handle.send_counts, handle.recv_counts)  # [M, D] by source, then slot
        local_slot = torch.arange(per_rank, device=x.device).repeat(ep)  # [ep * per_rank]
        slot_of_row = torch.repeat_interleave(local_slot, recv_slot_counts.flatten())  # [M]
        handle.regroup = slot_of_row.argsort(stable=True)
        self.bytes_sent += self._remote_rows(handle.send_counts) * rows.shape[1] * rows.element_size()
        return received[handle.regroup], recv_slot_counts.sum(0).tolist(), handle

    def _remote_rows(self, counts: list[int]) -> int:
        return sum(counts) - counts[self.ep.rank]

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """y [M, D] expert outputs in dispatch order -> [N, D] weighted sum per token (``y`` is consumed:
        an fp32 ``y`` is weighted in place)."""
        if handle.regroup is not None:
            back = torch.empty_like(y)
            back[handle.regroup] = y  # [M, D] in arrival order
            y = self.ep.all_to_all(back, handle.recv_counts, handle.send_counts)  # [N*k, D] in sorted order
            self.bytes_sent += self._remote_rows(handle.recv_counts) * back.shape[1] * back.element_size()
        out = torch.zeros(handle.num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.order // handle.k, y.float().mul_(handle.weights[:, None]))
        return out.to(y.dtype)

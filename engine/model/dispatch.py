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

  When every EP rank knows a bound on any rank's tokens in this pass (``max_tokens``: lock-step
  DP replicas agree on it before each step, ``engine.multirank``) and the padded buffers stay
  small (``PADDED_MAX_BYTES``), steps 1 and 2 are one all-to-all, as DeepEP's low-latency
  kernels do: each destination gets a fixed block of ``1 + max_tokens * k`` rows, the first
  carrying the per-slot counts (int32 in the row's bytes), then the rows, zero-padded. The
  received rows are the same in the same order; a decode step makes 2 collectives per MoE
  layer instead of 3.

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


PADDED_MAX_BYTES = 4 << 20  # the largest padded exchange (all destinations) worth saving a collective for


def padded_fits(ep: int, max_tokens: int, k: int, slots_per_rank: int, row_bytes: int) -> bool:
    """Whether a dispatch of at most ``max_tokens`` tokens per rank (``k`` copies each, rows of
    ``row_bytes``) sends counts and rows in one padded exchange (``planner`` models the same rule)."""
    return (row_bytes % 4 == 0 and slots_per_rank * 4 <= row_bytes
            and ep * (1 + max_tokens * k) * row_bytes <= PADDED_MAX_BYTES)


class MoEDispatcher:
    def __init__(self, ep: ParallelGroup):
        self.ep = ep
        self.bytes_sent = 0  # EP: bytes of rows this rank sent to other ranks (dispatch + combine), cumulative
        self.max_tokens: int | None = None  # this pass's bound on any EP rank's tokens, if all ranks know one

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
        handle.send_counts = slot_counts.view(ep, per_rank).sum(1).tolist()
        if self._padded_fits(k, per_rank, rows):
            received, recv_slot_counts = self._exchange_padded(rows, slot_counts.view(ep, per_rank), handle)
        else:
            recv_slot_counts = self.ep.all_to_all(slot_counts, [per_rank] * ep, [per_rank] * ep).view(ep, per_rank)
            handle.recv_counts = recv_slot_counts.sum(1).tolist()
            received = self.ep.all_to_all(rows, handle.send_counts, handle.recv_counts)  # [M, D] by source, then slot
        local_slot = torch.arange(per_rank, device=x.device).repeat(ep)  # [ep * per_rank]
        slot_of_row = torch.repeat_interleave(local_slot, recv_slot_counts.flatten())  # [M]
        handle.regroup = slot_of_row.argsort(stable=True)
        self.bytes_sent += self._remote_rows(handle.send_counts) * rows.shape[1] * rows.element_size()
        return received[handle.regroup], recv_slot_counts.sum(0).tolist(), handle

    def _padded_fits(self, k: int, per_rank: int, rows: torch.Tensor) -> bool:
        """Whether this pass takes the one-exchange dispatch (the same answer on every EP rank)."""
        return self.max_tokens is not None and padded_fits(self.ep.size, self.max_tokens, k, per_rank,
                                                           rows.shape[1] * rows.element_size())

    def _exchange_padded(self, rows: torch.Tensor, per_dest: torch.Tensor,
                         handle: DispatchHandle) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts and rows in one all-to-all of fixed blocks (see the module docstring); returns the
        received rows [M, D] (by source, then slot) and the per-source slot counts [ep, per_rank]."""
        ep, per_rank = per_dest.shape
        cap = self.max_tokens * handle.k  # copies one rank may send to one destination, at most
        if rows.shape[0] > cap:
            raise AssertionError(f"dispatch: {handle.num_tokens} tokens exceed the agreed bound ({self.max_tokens})")
        send = rows.new_zeros(ep, 1 + cap, rows.shape[1])
        send[:, 0].view(torch.int32)[:, :per_rank] = per_dest.to(torch.int32)
        sent = per_dest.sum(1)  # [ep] rows to each destination
        dest = torch.repeat_interleave(torch.arange(ep, device=rows.device), sent)  # [N*k] sorted
        first = torch.cumsum(sent, 0) - sent  # each destination's first row
        send[dest, 1 + torch.arange(rows.shape[0], device=rows.device) - first[dest]] = rows
        blocks = [1 + cap] * ep
        got = self.ep.all_to_all(send.view(ep * (1 + cap), -1), blocks, blocks).view(ep, 1 + cap, -1)
        recv_slot_counts = got[:, 0].view(torch.int32)[:, :per_rank].long()  # [ep, per_rank]
        recv = recv_slot_counts.sum(1)
        handle.recv_counts = recv.tolist()
        keep = torch.arange(cap, device=rows.device)[None, :] < recv[:, None]  # [ep, cap]
        return got[:, 1:][keep], recv_slot_counts

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

"""DeepSeekMoE: the router, the routed experts behind a dispatcher, the shared experts.

Routing (fp32, as the reference):

* V3 (``scoring_func=sigmoid``, ``topk_method=noaux_tc``): scores = sigmoid(logits);
  ``e_score_correction_bias`` is added *for selection only*; experts are chosen
  inside the ``topk_group`` best of ``n_group`` groups (a group's score = sum of its
  two best biased scores); weights are the unbiased scores of the chosen experts,
  normalised if ``norm_topk_prob``, then × ``routed_scaling_factor``.
* V2 (``softmax``): ``greedy`` top-k or ``group_limited_greedy`` (group score = its
  best expert); weights normalised when ``top_k > 1 and norm_topk_prob``, else
  × ``routed_scaling_factor`` (DeepSeek-V2's own rule).

The experts sit behind ``MoEDispatcher``: ``dispatch`` groups token copies by
physical expert, ``combine`` scatters the expert outputs back, weighted. An
``ExpertPlacement`` maps logical experts to physical replicas; EPLB replaces it
between steps. With one rank every expert is local and the placement is the
identity.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.config import ModelConfig
from engine.model.fp8 import FP8, fp8_linear, scale_shape
from engine.model.layers import ParallelGroup, _param


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = _param((e, cfg.hidden_size), torch.float32, None)
        self.e_score_correction_bias = (
            _param((e,), torch.float32, None) if cfg.topk_method == "noaux_tc" else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight)  # [T, E]
        k, groups = cfg.num_experts_per_tok, cfg.n_group
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias if self.e_score_correction_bias is not None else scores
            if groups > 1:
                group_scores = choice.view(-1, groups, choice.shape[-1] // groups).topk(2, dim=-1)[0].sum(-1)
                choice = _mask_groups(choice, group_scores, cfg.topk_group, float("-inf"))
            ids = choice.topk(k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return ids, weights * cfg.routed_scaling_factor
        scores = logits.softmax(-1)
        if cfg.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, groups, scores.shape[-1] // groups).amax(-1)
            scores = _mask_groups(scores, group_scores, cfg.topk_group, 0.0)
        weights, ids = scores.topk(k, dim=-1, sorted=False)
        if k > 1 and cfg.norm_topk_prob:
            return ids, weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


def _mask_groups(scores: torch.Tensor, group_scores: torch.Tensor, keep: int, fill: float) -> torch.Tensor:
    """Keep the experts of the ``keep`` best groups; scores [T, E], group_scores [T, G]."""
    t, g = group_scores.shape
    top = group_scores.topk(keep, dim=-1, sorted=False)[1]  # [T, keep]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, g, scores.shape[-1] // g).reshape(t, -1)
    return scores.masked_fill(~expert_mask, fill)


@dataclasses.dataclass
class ExpertPlacement:
    """Logical expert -> physical replicas, and which physical experts this rank holds.

    ``replicas[e]`` lists the physical slots serving logical expert ``e``; a token
    routed to ``e`` goes to one of them (chosen by token index, spreading load).
    """

    replicas: list[list[int]]
    local_slots: list[int]

    @classmethod
    def identity(cls, num_experts: int) -> "ExpertPlacement":
        return cls(replicas=[[e] for e in range(num_experts)], local_slots=list(range(num_experts)))

    def physical_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        if all(len(r) == 1 for r in self.replicas):
            table = torch.tensor([r[0] for r in self.replicas], device=topk_ids.device)
            return table[topk_ids]
        width = max(len(r) for r in self.replicas)
        table = torch.tensor([[r[i % len(r)] for i in range(width)] for r in self.replicas], device=topk_ids.device)
        counts = torch.tensor([len(r) for r in self.replicas], device=topk_ids.device)
        token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]
        return table[topk_ids, token % counts[topk_ids]]


@dataclasses.dataclass
class DispatchHandle:
    order: torch.Tensor  # [T*k] sorted position -> flat (token, choice) index
    counts: list[int]  # tokens per local physical expert, in local order
    weights: torch.Tensor  # [T*k] routing weights in sorted order
    num_tokens: int


class MoEDispatcher:
    """Groups token copies by physical expert (local: a sort; EP: an all-to-all comes here)."""

    def __init__(self, placement: ExpertPlacement, ep: ParallelGroup):
        self.placement = placement
        self.ep = ep

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """x [T, D] -> (tokens sorted by expert [T*k, D], handle)."""
        phys = self.placement.physical_ids(topk_ids).flatten()  # [T*k]
        order = phys.argsort(stable=True)
        counts = torch.bincount(phys, minlength=len(self.placement.local_slots)).tolist()
        k = topk_ids.shape[1]
        return x[order // k], DispatchHandle(order, counts, topk_weights.flatten()[order], x.shape[0])

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """y [T*k, D] expert outputs in dispatch order -> [T, D] weighted sum per token."""
        k = handle.order.shape[0] // handle.num_tokens
        out = torch.zeros(handle.num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.order // k, y.float() * handle.weights[:, None])
        return out.to(y.dtype)


class Experts(nn.Module):
    """Local routed experts, stacked: w13 = [gate; up] and w2 (down), one slice per physical slot.

    ``fp8=True`` keeps them as DeepSeek's FP8 checkpoints store them: e4m3 ``w13``/``w2`` with
    fp32 block scales ``w13_scale_inv [E, 2*ceil(I/128), ceil(H/128)]`` (gate's blocks, then
    up's, so any intermediate size stacks) and ``w2_scale_inv [E, ceil(H/128), ceil(I/128)]``.
    """

    def __init__(self, num_local: int, hidden: int, inter: int, dtype: torch.dtype, fp8: bool = False):
        super().__init__()
        self.inter = inter
        self.fp8 = fp8
        if not fp8:
            self.w13 = _param((num_local, 2 * inter, hidden), dtype, None)
            self.w2 = _param((num_local, hidden, inter), dtype, None)
            return
        self.w13 = _param((num_local, 2 * inter, hidden), FP8, None)
        self.w2 = _param((num_local, hidden, inter), FP8, None)
        gate_blocks, hidden_blocks = scale_shape(inter, hidden)
        self.w13_scale_inv = _param((num_local, 2 * gate_blocks, hidden_blocks), torch.float32, None)
        self.w2_scale_inv = _param((num_local, *scale_shape(hidden, inter)), torch.float32, None)

    # Below this many rows per expert, all experts run as one padded bmm: many tiny per-expert
    # matmuls are far slower on CPU (measured 8x at decode batch 32 on the bench preset).
    PADDED_MAX_ROWS = 64

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, D] sorted by expert, counts[e] rows each -> [N, D]."""
        if not self.fp8 and 0 < max(counts) <= self.PADDED_MAX_ROWS:
            return self._padded(x, counts)
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                if self.fp8:
                    out[rows] = self._fp8_expert(x[rows], e)
                else:
                    gate, up = F.linear(x[rows], self.w13[e]).chunk(2, dim=-1)
                    out[rows] = F.linear(F.silu(gate) * up, self.w2[e])
                start += n
        return out

    def _padded(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert at once: rows scattered into [E, max_rows, D], two bmm, gathered back."""
        c = torch.tensor(counts, device=x.device)  # [E]
        expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), c)  # [N]
        slot = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(c, 0) - c)[expert]  # [N]
        buf = x.new_zeros(len(counts), max(counts), x.shape[1])  # [E, M, D]
        buf[expert, slot] = x
        gate, up = torch.bmm(buf, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, M, I] each
        y = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))  # [E, M, D]
        return y[expert, slot]

    def _fp8_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        i, half = self.inter, self.w13_scale_inv.shape[1] // 2
        gate = fp8_linear(x, self.w13[e, :i], self.w13_scale_inv[e, :half])
        up = fp8_linear(x, self.w13[e, i:], self.w13_scale_inv[e, half:])
        return fp8_linear(F.silu(gate) * up, self.w2[e], self.w2_scale_inv[e])

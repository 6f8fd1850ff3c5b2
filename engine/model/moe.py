"""DeepSeekMoE: the router, the routed experts behind a dispatcher, the shared experts, the load counters.

Routing (fp32, as the reference):

* V3 (``scoring_func=sigmoid``, ``topk_method=noaux_tc``): scores = sigmoid(logits);
  ``e_score_correction_bias`` is added *for selection only*; experts are chosen
  inside the ``topk_group`` best of ``n_group`` groups (a group's score = sum of its
  two best biased scores); weights are the unbiased scores of the chosen experts,
  normalised if ``norm_topk_prob``, then × ``routed_scaling_factor``.
* V2 (``softmax``): ``greedy`` top-k or ``group_limited_greedy`` (group score = its
  best expert); weights normalised when ``top_k > 1 and norm_topk_prob``, else
  × ``routed_scaling_factor`` (DeepSeek-V2's own rule).

A ``MoE`` layer works on *this rank's MoE tokens* only (its owned rows, see
``engine/model/token_split.py``): gate → physical slots by the layer's
``ExpertPlacement`` (``engine/model/placement.py``, replica rule there) →
``MoEDispatcher`` (``engine/model/dispatch.py``: a sort with one EP rank, two
all-to-alls with several) → the routed experts of this rank's slots → combine,
weighted, back in token order; plus the shared experts, held whole by every rank
and run on its own tokens. The outputs go back to the residual layout.

**Expert load**: each layer counts the token copies this rank routes to every
physical slot (``bincount`` of the dispatch, int64 ``[S]``, on by default;
``count_load = False`` turns it off). ``read_expert_load()`` returns and resets
them with the per-logical-expert counts (through ``phy2log``); summed over the
EP group they are the layer's load. A placement switch folds the physical counts
into the logical ones first, so logical counts span switches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu_gemm
from engine.model.config import ModelConfig
from engine.model.dispatch import MoEDispatcher
from engine.model.fp8 import FP8, fp8_linear, scale_shape
from engine.model.layers import (MLP, Kernel, ParallelGroup, _param, kernel_copy, kernel_fits, linear, pack_weight,
                                 packed_matmul, pad_rows, records_grad)
from engine.model.placement import ExpertPlacement
from engine.model.token_split import TokenSplit


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.n_routed_experts
        self.weight = _param((e, cfg.hidden_size), torch.float32, None)
        self.e_score_correction_bias = (
            _param((e,), torch.float32, None) if cfg.topk_method == "noaux_tc" else None
        )
        self.kernel: Kernel | None = None  # as _Linear's (layers.py)
        self.kernel_weight: torch.Tensor | None = None  # as _Linear's
        self.route: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # use_cpu_route()

    def use_cpu_route(self, on: bool) -> None:
        """The sigmoid routing below in one call of pdserve's CPU kernel (``cpu_gemm.route``) where ``on``
        (its module loaded) and this router scores with a sigmoid."""
        cfg = self.cfg
        size = cfg.n_routed_experts // cfg.n_group
        fits = (cfg.scoring_func == "sigmoid" and (cfg.n_group == 1 or size >= 2)
                and cfg.num_experts_per_tok <= cfg.topk_group * size)  # what cpu_gemm.route checks
        self.route = cpu_gemm.route if on and fits else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        cfg = self.cfg
        logits = linear(x.float(), self.weight, kernel=self.kernel, kernel_weight=self.kernel_weight)  # [T, E]
        k, groups = cfg.num_experts_per_tok, cfg.n_group
        if self.route is not None and logits.device.type == "cpu":
            return self.route(logits, self.e_score_correction_bias, groups, cfg.topk_group, k, cfg.norm_topk_prob,
                              cfg.routed_scaling_factor)
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
    expert_mask = group_mask.unsqueeze(-1).expand(t, g, scores.shape[-1] // g).reshape(t, scores.shape[-1])
    return scores.masked_fill(~expert_mask, fill)


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
        self.kernel: Kernel | None = None  # use_cpu_kernel(): engine/kernels/cpu_gemm.py's, for few rows per expert
        # what the kernel reads: layers.kernel_copy() of w13 / w2 (a bf16 copy, or the weights themselves)
        self.w13_kernel: torch.Tensor | None = None
        self.w2_kernel: torch.Tensor | None = None
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # pack(): each slot's (w13, w2), oneDNN's
        if not fp8:
            self.w13 = _param((num_local, 2 * inter, hidden), dtype, None)
            self.w2 = _param((num_local, hidden, inter), dtype, None)
            return
        self.w13 = _param((num_local, 2 * inter, hidden), FP8, None)
        self.w2 = _param((num_local, hidden, inter), FP8, None)
        gate_blocks, hidden_blocks = scale_shape(inter, hidden)
        self.w13_scale_inv = _param((num_local, 2 * gate_blocks, hidden_blocks), torch.float32, None)
        self.w2_scale_inv = _param((num_local, *scale_shape(hidden, inter)), torch.float32, None)

    @property
    def num_slots(self) -> int:
        return self.w13.shape[0]

    def slot_weights(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of one local slot's tensors (``w13``, ``w2``; FP8: and their ``*_scale_inv``)."""
        return {name: p[slot] for name, p in self.named_parameters()}

    def check_slot_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``weights`` has exactly one slot's tensors, in shape and dtype."""
        want = {name: p[0] for name, p in self.named_parameters()}
        if set(weights) != set(want):
            raise ValueError(f"expert slot weights: need {sorted(want)}, got {sorted(weights)}")
        for name, t in weights.items():
            if tuple(t.shape) != tuple(want[name].shape) or t.dtype != want[name].dtype:
                raise ValueError(f"expert slot weights: {name} is {t.dtype} {list(t.shape)}, the slot holds "
                                 f"{want[name].dtype} {list(want[name].shape)}")

    def set_slot(self, slot: int, weights: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.named_parameters():
            p.data[slot].copy_(weights[name])
        if self.packed is not None:
            self.packed[slot] = self._pack_slot(slot)
        if self.kernel is not None and self.w13_kernel.data_ptr() != self.w13.data_ptr():  # copies: bf16, column tiles
            cols = self.w13_kernel.dim() == 4
            new13, new2 = (kernel_copy(cpu_gemm.col_layout(w.data[slot:slot + 1])[0] if cols else w.data[slot])
                           for w in (self.w13, self.w2))
            if new13.dtype == self.w13_kernel.dtype and new2.dtype == self.w2_kernel.dtype:
                self.w13_kernel[slot].copy_(new13)
                self.w2_kernel[slot].copy_(new2)
            else:  # bf16 copies, and the new weights are not bf16 values: fp32 ones from now on
                self.w13_kernel, self.w2_kernel = self._kernel_copies()

    # Below this many rows per expert, all experts run as one padded bmm: many tiny per-expert
    # matmuls are far slower on CPU (measured 8x at decode batch 32 on the bench preset) -- unless
    # at most half the slots have rows: the bmm would still read every slot's weights, and a decode
    # step of a few tokens is bound by reading weights (bench preset, fp32, 1-2 tokens: 4-5x faster looped,
    # side by side on an AMD EPYC with AVX2).
    PADDED_MAX_ROWS = 64
    # With pdserve's CPU kernel (fp32, AVX2 + FMA), up to this many rows per expert: it reads each active
    # expert's weights once and pads nothing; above it MKL's bmm/sgemm win (engine/kernels/cpu_gemm.py).
    GROUPED_MAX_ROWS = 16
    # A prefill's experts one by one on the CPU: each expert's rows padded with zeros to a multiple of this.
    # oneDNN builds a primitive for every new row count (~0.4 ms for a bench-preset expert GEMM in bf16, where
    # the GEMM itself takes ~1 ms) and a prefill's counts are new at almost every step and expert: unpadded, a
    # server's prefills kept getting faster as its primitive cache filled (7 x 256 tokens, bench preset, bf16:
    # 870 -> 691 ms over 7 steps in one process; 2-core AMD EPYC with AVX512-BF16, no AMX). Padding costs at most ROWS_BUCKET - 1 rows of each expert's work.
    ROWS_BUCKET = 32
    # A bf16 step through the kernel's AVX512-BF16 products (cpu_gemm.bf16_dot()): whole, up to this many tokens
    # (bench preset, decode batch 32, ~4 rows per expert: the step 0.92x as long as with the dispatcher's path
    # around the kernel's GEMMs, interleaved A/B on a 2-core AMD EPYC with AVX512-BF16); prefill-sized steps
    # keep torch's matmuls.
    DOT_WHOLE_MAX_TOKENS = 64

    def pack(self) -> int:
        """Hold oneDNN-prepacked copies of every slot's fp32 ``w13`` / ``w2`` (CPU) beside them, for a prefill's
        experts (many rows each); returns the bytes they take (0 where none applies: other dtypes and devices).
        The experts' GEMMs at 64-512 rows run 1.3-1.8x faster on them than on F.linear's MKL sgemm (bench preset's
        32 experts from DRAM, fp32, 2-core AMD EPYC with AVX512-BF16, no AMX); in bf16 (F.linear is oneDNN
        already) only 1.02-1.2x, not worth a second copy of every expert."""
        self.packed = None
        if self.fp8 or self.w13.dtype != torch.float32 or self.w13.device.type != "cpu":
            return 0
        packed = [self._pack_slot(slot) for slot in range(self.num_slots)]
        if any(w is None for pair in packed for w in pair):  # this torch build has no prepacked matmul
            return 0
        self.packed = packed
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    def _pack_slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_weight(self.w13.data[slot], min_numel=0), pack_weight(self.w2.data[slot], min_numel=0)

    @property
    def kernel_fits(self) -> bool:
        """Whether ``engine.kernels.cpu_gemm`` takes these experts: fp32 weights on the CPU, or bf16 ones, which
        it reads as they are (a bf16 model's inputs widened to fp32 for it, its outputs rounded back). In bf16
        it reads only the experts a step routes to, where the padded ``bmm`` reads them all."""
        return not self.fp8 and kernel_fits(self.w13) and kernel_fits(self.w2)

    def use_cpu_kernel(self, kernel: Kernel | None) -> bool:
        """Route few-rows-per-expert batches through ``kernel`` (``engine.kernels.cpu_gemm.kernel()``;
        None: torch's matmuls) where it applies; returns whether it does."""
        self.kernel = kernel if self.kernel_fits else None
        self.w13_kernel, self.w2_kernel = (None, None) if self.kernel is None else self._kernel_copies()
        return self.cpu_kernel

    def whole_step(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                   load: torch.Tensor | None) -> torch.Tensor | None:
        """A step of at most GROUPED_MAX_ROWS tokens (so as many rows per expert; DOT_WHOLE_MAX_TOKENS in bf16
        by AVX512-BF16) on a rank holding every slot it routes to, in one kernel call: gather, both GEMMs,
        SiLU, weighted sum (``cpu_gemm.moe_experts``; ``load`` += copies per slot). None where the kernel does
        not take it (the caller dispatches)."""
        dot = x.dtype == torch.bfloat16 and cpu_gemm.bf16_dot()
        if self.kernel is None or not 0 < x.shape[0] <= (self.DOT_WHOLE_MAX_TOKENS if dot else self.GROUPED_MAX_ROWS):
            return None
        return cpu_gemm.moe_experts(x, slots, weights, self.w13_kernel, self.w2_kernel, load)

    def _kernel_copies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kernel_copy`` of w13 and w2 (bf16 both, or the weights themselves, detached: tensors, not second
        registrations of the parameters); fp32 experts in column tiles while the kernel's tiles are on
        (``cpu_gemm.col_layout``: 0.54x the time of the grouped GEMM's tiles at 4 rows, 0.93x at 1, weights from
        DRAM, the 2-core AMD EPYC of ``layers.KERNEL_COL_MAX_ROWS``; capped at AVX2 there, 32 experts' w13:
        0.84x at 2 rows each, 0.47x at 4, 0.59x at 8), bf16 both or fp32 both."""
        w13, w2 = self.w13.detach(), self.w2.detach()
        if w13.dtype == torch.float32 and cpu_gemm.col_fits(w13) and cpu_gemm.col_fits(w2):
            w13, w2 = cpu_gemm.col_layout(w13), cpu_gemm.col_layout(w2)
        c13, c2 = kernel_copy(w13), kernel_copy(w2)
        if c13.dtype != c2.dtype:  # one stack of bf16 values, the other not: both fp32
            return w13, w2
        return c13, c2

    @property
    def cpu_kernel(self) -> bool:
        return self.kernel is not None

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, D] sorted by expert, counts[e] rows each -> [N, D]."""
        most = max(counts)
        if self.kernel is not None and 0 < most <= self.GROUPED_MAX_ROWS:
            gate, up = self.kernel(x.float(), self.w13_kernel, counts).chunk(2, dim=-1)  # fp32 between the GEMMs
            return self.kernel(F.silu(gate) * up, self.w2_kernel, counts).to(x.dtype)
        active = sum(1 for n in counts if n)
        if not self.fp8 and 0 < most <= self.PADDED_MAX_ROWS and 2 * active > len(counts):
            return self._padded(x, counts)
        out = torch.empty_like(x)
        bucket = self.ROWS_BUCKET if x.device.type == "cpu" else 1
        packed = self.packed if self.packed is not None and x.dtype == torch.float32 \
            and not records_grad(x, self.w13) else None
        mm = F.linear if packed is None else packed_matmul  # (rows, weight or its prepacked copy)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                if self.fp8:
                    out[rows] = self._fp8_expert(x[rows], e)
                else:
                    xe = pad_rows(x[rows], bucket)  # zero rows up to the bucket: a shape oneDNN has seen (below)
                    w13, w2 = (self.w13[e], self.w2[e]) if packed is None else packed[e]
                    gate, up = mm(xe, w13).chunk(2, dim=-1)
                    out[rows] = mm(F.silu(gate) * up, w2)[:n]
                start += n
        return out

    def _padded(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert at once: rows scattered into [E, max_rows, D], two bmm, gathered back."""
        c = torch.tensor(counts, device=x.device)  # [E]
        expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), c)  # [N]
        slot = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(c, 0) - c)[expert]  # [N]
        width = max(counts)
        flat = expert * width + slot  # [N] row of each input in the padded buffer
        buf = x.new_zeros(len(counts) * width, x.shape[1]).index_copy_(0, flat, x).view(len(counts), width, -1)
        gate, up = torch.bmm(buf, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, M, I] each
        y = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))  # [E, M, D]
        return y.view(-1, y.shape[-1]).index_select(0, flat)

    def _fp8_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        i, half = self.inter, self.w13_scale_inv.shape[1] // 2
        gate = fp8_linear(x, self.w13[e, :i], self.w13_scale_inv[e, :half])
        up = fp8_linear(x, self.w13[e, i:], self.w13_scale_inv[e, half:])
        return fp8_linear(F.silu(gate) * up, self.w2[e], self.w2_scale_inv[e])


@dataclasses.dataclass
class ExpertLoad:
    """Token copies this rank routed, since the last read."""

    physical: torch.Tensor  # [S] int64 per physical slot of the current placement (since the last read or switch)
    logical: torch.Tensor  # [E] int64 per logical expert (since the last read, across switches)


class MoE(nn.Module):
    """One DeepSeekMoE layer on this rank's MoE tokens (module docstring)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, ep: ParallelGroup, num_redundant_experts: int = 0,
                 fp8: bool = False):
        super().__init__()
        self.gate = Gate(cfg)
        self.placement = ExpertPlacement.default(cfg.n_routed_experts, num_redundant_experts, ep.size, ep.rank)
        self.dispatcher = MoEDispatcher(ep)
        self.experts = Experts(self.placement.slots_per_rank, cfg.hidden_size, cfg.moe_intermediate_size, dtype,
                               fp8)
        self.shared_experts = (  # whole on every rank: ParallelGroup.single()
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, ParallelGroup.single(), fp8)
            if cfg.n_shared_experts else None
        )
        self.count_load = True
        self._physical_load = torch.zeros(self.placement.num_slots, dtype=torch.long)  # [S]
        self._logical_carry = torch.zeros(cfg.n_routed_experts, dtype=torch.long)  # [E]

    def forward(self, h: torch.Tensor, tokens: TokenSplit | None = None) -> torch.Tensor:
        """h in the residual layout (``[T, D]`` without ``tokens``) -> the MoE output, same layout."""
        x = h if tokens is None else tokens.owned(h)  # [N, D] this rank's MoE tokens
        topk_ids, topk_weights = self.gate(x)  # [N, k], [N, k]
        placement = self.placement
        phys = placement.physical_ids(topk_ids)  # [N, k]
        out = None
        if self.dispatcher.ep.size == 1:  # every slot here: a small step's experts in one kernel call
            load = self._physical_load if self.count_load else None
            out = self.experts.whole_step(x, phys, topk_weights, load)
        if out is None:
            rows, counts, handle = self.dispatcher.dispatch(x, phys, topk_weights, placement.num_slots)
            if self.count_load:
                self._physical_load += handle.slot_counts
            out = self.dispatcher.combine(self.experts(rows, counts), handle)  # [N, D]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out if tokens is None else tokens.from_owned(out)

    def read_expert_load(self, reset: bool = True) -> ExpertLoad:
        physical = self._physical_load.clone()
        load = ExpertLoad(physical, self._logical_carry + self.placement.logical_counts(physical))
        if reset:
            self._physical_load.zero_()
            self._logical_carry.zero_()
        return load

    def install_placement(self, phy2log: torch.Tensor | list[int],
                          slot_weights: Mapping[int, Mapping[str, torch.Tensor]]) -> list[int]:
        """Switch this layer to a new ``phy2log`` (between steps; the same on every EP rank).

        ``slot_weights`` maps physical slot ids *of this rank* to the tensors of the logical
        expert they hold under the new placement (``Experts.slot_weights`` layout); every local
        slot whose logical expert changes must be given, others may be. Everything is checked
        before anything is written; then the weights are copied into their slots and the new
        placement replaces the old one. Returns the local slots written.
        """
        new = self.placement.with_phy2log(phy2log)
        first, per_rank = new.local_start, new.slots_per_rank
        outside = [s for s in slot_weights if not first <= s < first + per_rank]
        if outside:
            raise ValueError(f"install_placement: slots {outside} are not on this rank (slots {first}..{first + per_rank - 1})")
        old_local, new_local = self.placement.local_logical, new.local_logical
        changed = [first + j for j in range(per_rank) if old_local[j] != new_local[j]]
        missing = [s for s in changed if s not in slot_weights]
        if missing:
            raise ValueError(f"install_placement: slots {missing} change expert but no weights were given")
        device = self.experts.w13.device
        staged = {s: {n: t.to(device) for n, t in w.items()} for s, w in slot_weights.items()}
        for w in staged.values():
            self.experts.check_slot_weights(w)
        self._logical_carry += self.placement.logical_counts(self._physical_load)
        self._physical_load.zero_()
        for s, w in staged.items():
            self.experts.set_slot(s - first, w)
        self.placement = new
        return sorted(staged)

"""Parallel building blocks: the rank groups and their collectives, linear layers, embeddings, RMSNorm, MLP.

Every parameter carries ``shard_dim`` (``None`` = replicated): the dimension
along which a checkpoint tensor is cut, and ``num_shards`` / ``shard_rank``: into
how many equal pieces and which one this rank keeps (1 / 0 for a layer built with
a group of one, e.g. the shared experts, which every rank holds whole). Read by
``DeepseekV3ForCausalLM.load_weights``, these attributes are the whole
tensor-parallel plan.

Row-parallel layers (``RowParallelLinear``, ``VocabParallelEmbedding``) return
*partial sums*: the caller reduces them, with an all-reduce or, under sequence
parallelism, a reduce-scatter (``engine/model/token_split.py``). With
``ParallelGroup.single()`` (world size 1) every layer is a plain layer and no
collective runs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.dtype_choice import auto_dtype, cpu_flags
from engine.kernels import cpu_gemm
from engine.model.fp8 import FP8, dequant_tile, fp8_linear, scale_shape


@dataclasses.dataclass(frozen=True)
class ParallelGroup:
    """A rank's place in one torch.distributed group (a TP group or the EP group).

    ``rank`` is the rank inside the group, ``ranks`` the members' ranks in the default
    group, in group order. Every collective is a no-op (returns its input) when ``size == 1``.
    """

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup
    ranks: tuple[int, ...] = (0,)

    @classmethod
    def single(cls) -> "ParallelGroup":
        return cls()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, ...] on every rank -> [size * n, ...], rank 0's rows first."""
        if self.size == 1:
            return x
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])
        dist.all_gather_single(out, x.contiguous(), group=self.group)
        return out

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, m] on every rank -> [n, size * m], rank 0's columns first."""
        if self.size == 1:
            return x
        n, m = x.shape
        return self.all_gather(x).view(self.size, n, m).transpose(0, 1).reshape(n, self.size * m)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x [size * n, ...] partial sums -> [n, ...]: rank i gets rows [i*n, (i+1)*n) summed over the group."""
        if self.size == 1:
            return x
        out = x.new_empty(x.shape[0] // self.size, *x.shape[1:])
        dist.reduce_scatter_single(out, x.contiguous(), group=self.group)
        return out

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts), ...] -> [sum(recv_counts), ...]: the first send_counts[0] rows go to rank 0, ...;
        the result holds rank 0's rows for this rank first. Counts must agree pairwise (exchange them first)."""
        if self.size == 1:
            return x
        out = x.new_empty(sum(recv_counts), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank ``src``'s tensor into ``x`` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, group=self.group, group_src=src)
        return x

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the parallel size {self.size}")
        return n // self.size


# oneDNN's prepacked fp32 matmul (the kernel torch.compile's CPU backend uses for frozen weights):
# 2-4x faster than F.linear's MKL sgemm for a few rows (fp32, measured side by side on an AMD EPYC with AVX2,
# no AVX-512/AMX; bench preset, 8 rows: head 19.7 -> 4.8 ms). Up to PACKED_MAX_ROWS rows every row count goes
# as it is (in bf16 F.linear is oneDNN too: more rows go there); each call costs ~40 us of its own, more than a
# small matmul takes: weights under PACKED_MIN_NUMEL take no packed copy for those rows (the kernel keeps their few
# rows, _by_kernel). Each row count makes oneDNN a primitive per weight shape (~0.57 MB at the bench preset's
# sizes), so smaller weights stay off this path: with fp32 ones from 2^18 on it too, the decode row counts 17-256
# grew the engine by 408 MB for the three shapes that added (2026-12-03 midday, taken out again).
PACKED_MAX_ROWS = 256
PACKED_MIN_NUMEL = 2**19
# fp32 weights from PACKED_BUCKETED_MIN_NUMEL (the bench preset's q_a_proj and shared experts) hold a packed copy for
# a prefill's rows only (above PACKED_MAX_ROWS, bucketed below: a few primitives each), which F.linear's MKL sgemm
# ran slower: prepacked / F.linear 0.82x the time for q_a_proj (384 x 1024) at 2048 rows, 0.84x and 0.61x for the
# shared experts' 256 x 1024 and 1024 x 256 (fp32, 2-core AMD EPYC with AVX-512 and AVX512-BF16, no AMX).
PACKED_BUCKETED_MIN_NUMEL = 2**18
# Above PACKED_MAX_ROWS an fp32 input takes the prepacked copy too, its rows padded with zeros up to a multiple of
# PACKED_ROW_BUCKET (up to PACKED_BUCKET_MAX_ROWS rows, the default per-step token budget; F.linear above): oneDNN
# runs these at ~195 GFLOP/s against MKL's ~146 (bench preset o_proj at 2048 rows) and a prefill step of 8 x 256
# tokens took 0.865x the time, of 8 x 200 (1600 rows padded to 1792) 0.897x (alternated in one engine; fp32,
# 2-core AMD EPYC with AVX512-BF16, no AMX). oneDNN keeps a primitive per row count, a few MB each at these
# sizes, so the row counts are bucketed: the bench preset's engine grew 191 MB over 43 prefill sizes from 300 to
# 2048 tokens and not at all over 43 more (F.linear: +55 MB, +19 MB); taking every row count (8beb7e8, reverted)
# grew the soak test's engine 66% after its warm-up.
# Not where autograd records (tools/tune_mtp.py trains through linear): oneDNN's op has no backward.
PACKED_ROW_BUCKET = 256
PACKED_BUCKET_MAX_ROWS = 2048


def pack_weight(weight: torch.Tensor, min_numel: int | None = None) -> torch.Tensor | None:
    """oneDNN's prepacked copy of a 2-D fp32 or bf16 CPU weight ``[out, in]``, or None where it does not pay
    (weights under ``min_numel``, by default PACKED_BUCKETED_MIN_NUMEL in fp32 and PACKED_MIN_NUMEL in bf16; bf16
    without bf16 matrix instructions) or this torch build or machine has no such kernel (non-CPU devices, other
    dtypes). In bf16 on a CPU with AMX (bench preset, 8 rows, weights from DRAM) it reads the weights ~1.3-1.6x
    faster than ``F.linear``, which lays them out for AMX on every call."""
    if weight.dtype == torch.bfloat16 and auto_dtype("cpu").dtype != "bfloat16":
        return None
    if min_numel is None:
        min_numel = PACKED_BUCKETED_MIN_NUMEL if weight.dtype == torch.float32 else PACKED_MIN_NUMEL
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2 \
            or weight.numel() < min_numel:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)  # 8: the batch the layout is tuned for
    except (AttributeError, RuntimeError):
        return None


# pdserve's CPU kernel (engine/kernels/cpu_gemm.py, fp32, AVX2 + FMA) up to this many rows: it streams the
# weight at the memory's bandwidth. Measured side by side on a 2-core AMD EPYC (AVX2 + FMA, no AVX-512 /
# AVX512-BF16 / AMX), fp32, the bench preset's attention projections and shared experts (87 MB, from
# DRAM): 1 row 3.96 ms vs prepacked oneDNN 6.56 ms, 8 rows 5.17 vs 8.66 ms, 32 rows 16.7 vs 15.4 ms
# (so above 16 rows oneDNN).
KERNEL_MAX_ROWS = 16
# On a CPU with AVX-512, oneDNN's prepacked fp32 matmul (its AVX-512 kernels) is the faster one from 3 rows where
# the kernel would read the fp32 weight itself: there such a weight takes the kernel up to this many rows only
# (where its kernel copy is not in column tiles, KERNEL_COL_MAX_ROWS: those run fp32 rows faster than either).
# 2-core AMD EPYC with AVX-512 and AVX512-BF16, no AMX, fp32: the bench preset's head, o_proj, q_b_proj and dense
# MLP (232 MB from DRAM) kernel / oneDNN 0.62x the time at 2 rows, 1.09x at 3, 1.71x at 4, 1.49x at 8, 1.64x at
# 16; the decode step of transformers' fp32 save of the bench preset 0.80x at batch 4, 0.89x at batch 8 (steps
# alternated in one engine). Where the kernel reads a bf16 copy (kernel_copy: half the bytes) it keeps up to
# KERNEL_MAX_ROWS: the bench preset's own (bf16-valued) checkpoint took 1.04-1.05x as long with this limit.
KERNEL_OVER_PACKED_MAX_ROWS = 2 if "avx512f" in (cpu_flags() or ()) else KERNEL_MAX_ROWS
# In bf16 (a bf16 model) the kernel's AVX512-BF16 products (cpu_gemm.bf16_dot()) take the prepacked weights'
# matmuls too, up to this many rows: one weight row streamed at a time, 0.5-0.9x oneDNN's time at 1 row and
# about even at 4-8 (bench preset projections and head in bf16, side by side on a 2-core AMD EPYC with
# AVX512-BF16, no AMX; 16 rows instead of 4 made the decode step 1.05x longer at batch 8, steps alternated).
# Batch-1 decode and its speculative verification (k + 1 rows) are this size.
DOT_MAX_ROWS = 4

# An fp32 weight's kernel copy is in column tiles (``linear_kernel_weight``), which take fp32 rows up to this
# many: outer products with 8 rows per weight vector (AVX-512) or 3 (AVX2), no sums across lanes. 2-core AMD EPYC
# with AVX-512 and AVX512-BF16, no AMX, fp32 weights from DRAM, side by side in one process, column tiles /
# prepacked oneDNN: the bench preset's head (67 MB) 0.71x the time at 1 row, 0.65x at 8, 0.84x at 16, 0.93x at 32,
# 0.99x at 48; its o_proj 0.71x at 8, 0.92x at 32, 1.01x at 40; the grouped_gemm tiles 0.93x at 1 row, 0.52x at 8.
# The same machine capped at AVX2 (PDSERVE_CPU_MAX_ISA=avx2, ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), the
# head, o_proj and dense MLP (268 MB), column tiles / the faster of oneDNN and the grouped_gemm tiles: 0.86x at 1
# row, 0.64x at 4 and 8, 0.88x at 16, 0.72x at 32
KERNEL_COL_MAX_ROWS = 32

Kernel = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]  # engine.kernels.cpu_gemm.grouped_gemm


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           kernel: Kernel | None = None, kernel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight)``; for inputs of few rows through ``kernel`` (``cpu_gemm.grouped_gemm``, where
    the weight fits it; reading ``kernel_weight``, ``kernel_copy(weight)``, where given) or ``packed``
    (``pack_weight(weight)``: up to PACKED_MAX_ROWS rows for weights from PACKED_MIN_NUMEL; in fp32 also a prefill's
    rows, padded to a PACKED_ROW_BUCKET multiple). A ``kernel_weight`` in column tiles (``linear_kernel_weight``)
    takes fp32 inputs of up to KERNEL_COL_MAX_ROWS."""
    if _by_columns(x, kernel, kernel_weight):
        return cpu_gemm.head_gemm(x[:, None], kernel_weight)[:, 0]
    if _by_kernel(x, weight, packed, kernel, kernel_weight):
        return kernel(x, (weight if kernel_weight is None else kernel_weight)[None], [x.shape[0]])
    rows = x.shape[0] if x.dim() == 2 else 0
    few = rows <= PACKED_MAX_ROWS
    if packed is not None and x.dtype == weight.dtype and 0 < rows and (
            (few and weight.numel() >= PACKED_MIN_NUMEL)
            or (not few and x.dtype == torch.float32 and rows <= PACKED_BUCKET_MAX_ROWS
                and not records_grad(x, weight))):
        if rows > PACKED_MAX_ROWS:
            x = pad_rows(x, PACKED_ROW_BUCKET)
        return packed_matmul(x, packed)[:rows]
    return F.linear(x, weight)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x [N, in]`` times the weight ``packed`` holds (``pack_weight``), transposed: ``[N, out]``. oneDNN keeps a
    primitive for every row count it meets, so callers bring few distinct counts (pad_rows)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def records_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd records a product of ``x`` and ``weight`` (oneDNN's prepacked op has no backward)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x [N, ...]`` with zero rows appended up to a multiple of ``multiple`` (x itself when N is one): a row count
    oneDNN has built its primitive for."""
    extra = -x.shape[0] % multiple
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra)) if extra else x


def _by_columns(x: torch.Tensor, kernel: Kernel | None, kernel_weight: torch.Tensor | None) -> bool:
    """Whether ``linear`` runs ``x`` through the kernel's column tiles: ``kernel_weight`` in that layout (4-D),
    fp32 rows, at most KERNEL_COL_MAX_ROWS of them."""
    return (kernel is not None and kernel_weight is not None and kernel_weight.dim() == 4 and x.dim() == 2
            and x.dtype == torch.float32 and 0 < x.shape[0] <= KERNEL_COL_MAX_ROWS)


def _by_kernel(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, kernel: Kernel | None,
               kernel_weight: torch.Tensor | None = None) -> bool:
    """Whether ``linear`` runs ``x`` through ``kernel`` (reading ``kernel_weight``, else ``weight``), up to
    KERNEL_MAX_ROWS rows. A weight without a prepacked copy, or under PACKED_MIN_NUMEL, always. fp32: up to
    KERNEL_OVER_PACKED_MAX_ROWS rows unless the kernel reads a bf16 copy. bf16: up to DOT_MAX_ROWS rows by
    AVX512-BF16; without it (x widened to fp32 in the kernel) AMX streams the large ones faster. Never a
    ``kernel_weight`` in column tiles (``_by_columns``)."""
    rows = x.shape[0]
    if kernel is None or x.dim() != 2 or x.dtype != weight.dtype or not 0 < rows <= KERNEL_MAX_ROWS:
        return False
    if kernel_weight is not None and kernel_weight.dim() == 4:
        return False
    if packed is None or weight.numel() < PACKED_MIN_NUMEL:  # too small for oneDNN's per-call cost at few rows
        return True
    if x.dtype == torch.float32:
        return rows <= KERNEL_OVER_PACKED_MAX_ROWS or (kernel_weight is not None
                                                        and kernel_weight.dtype == torch.bfloat16)
    return rows <= DOT_MAX_ROWS and cpu_gemm.bf16_dot()


def kernel_copy(weight: torch.Tensor) -> torch.Tensor:
    """What pdserve's CPU kernel reads for an fp32 ``weight``: a bf16 copy when every value is exactly a
    bf16 (a bf16 checkpoint run in fp32), else ``weight`` itself. The kernel widens each bf16 to the same
    fp32 value in a register, so its products are the fp32 weight's bit for bit, from half the bytes: a
    decode step is bound by reading weights. Costs half the weight's size in memory beside it.
    ``PDSERVE_CPU_KERNEL_BF16=0``: always ``weight``."""
    if os.environ.get("PDSERVE_CPU_KERNEL_BF16", "1") == "0" or weight.dtype != torch.float32:
        return weight
    w = weight.detach()
    if torch.any(w.view(torch.int32) & 0xFFFF):  # bits below bf16's mantissa: not a bf16 value
        return weight
    return w.to(torch.bfloat16, memory_format=torch.contiguous_format)


def linear_kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """What the CPU kernel reads for a projection's, head's or router's ``weight [out, in]``: an fp32 weight in
    column tiles (``cpu_gemm.col_layout``, ``[1, out/32, in, 32]``, bf16 where every value is one) while the
    kernel's column tiles are on, else ``kernel_copy(weight)`` (the weight itself detached: a tensor, not a second registration
    of the parameter under the module's ``kernel_weight``)."""
    if weight.dtype == torch.float32 and weight.dim() == 2 and cpu_gemm.col_fits(weight[None]):
        return kernel_copy(cpu_gemm.col_layout(weight[None]))
    return kernel_copy(weight).detach()


def kernel_fits(weight: torch.Tensor) -> bool:
    """Whether ``cpu_gemm.grouped_gemm`` takes this weight (``[..., out, in]``): fp32 or bf16 (read as it is)
    on the CPU, rows a multiple of 8 values long."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.shape[-1] % 8 == 0


def _param(shape: tuple[int, ...], dtype: torch.dtype, shard_dim: int | None,
           group: ParallelGroup | None = None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.shard_dim = shard_dim  # type: ignore[attr-defined]
    p.num_shards = group.size if group is not None and shard_dim is not None else 1  # type: ignore[attr-defined]
    p.shard_rank = group.rank if group is not None and shard_dim is not None else 0  # type: ignore[attr-defined]
    return p


class _Linear(nn.Module):
    """``weight [out, in]`` in the model dtype, or (``fp8=True``) DeepSeek's block FP8 pair:
    ``weight`` float8_e4m3fn and ``weight_scale_inv`` fp32 ``[ceil(out/128), ceil(in/128)]``,
    both kept as loaded and cut along the same ``shard_dim`` (see ``engine/model/fp8.py``)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, shard_dim: int | None, fp8: bool,
                 tp: ParallelGroup | None = None):
        super().__init__()
        self.fp8 = fp8
        self.packed: torch.Tensor | None = None  # pack_weights(): oneDNN's copy of ``weight`` (CPU, fp32 or bf16)
        self.kernel: Kernel | None = None  # use_cpu_kernels(): pdserve's CPU kernel for few rows
        self.kernel_weight: torch.Tensor | None = None  # use_cpu_kernels(): kernel_copy(weight)
        if not fp8:
            self.weight = _param(shape, dtype, shard_dim, tp)
            return
        if tp is not None and tp.size > 1 and shape[shard_dim] % 128:
            raise ValueError(f"FP8 weight shard {shape} is not a whole number of 128-wide blocks along dim {shard_dim}")
        self.weight = _param(shape, FP8, shard_dim, tp)
        self.weight_scale_inv = _param(scale_shape(*shape), torch.float32, shard_dim, tp)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return linear(x, self.weight, self.packed, self.kernel, self.kernel_weight)
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense tensor (FP8: dequantized now, not kept)."""
        if not self.fp8:
            return self.weight
        return dequant_tile(self.weight, self.weight_scale_inv, 0, self.weight.shape[0], dtype)


class ReplicatedLinear(_Linear):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp8: bool = False):
        super().__init__((out_features, in_features), dtype, None, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)


class ColumnParallelLinear(_Linear):
    """Output features split over ranks; each rank returns its slice (no collective)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, tp: ParallelGroup,
                 fp8: bool = False):
        super().__init__((tp.split(out_features, "output features"), in_features), dtype, 0, fp8, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)


class RowParallelLinear(_Linear):
    """Input features split over ranks; returns this rank's partial sum [..., out] (the caller reduces it)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, tp: ParallelGroup,
                 fp8: bool = False):
        super().__init__((out_features, tp.split(in_features, "input features")), dtype, 1, fp8, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split over ranks; ids outside this rank's rows give zero rows.

    Returns partial sums [T, D] (the caller reduces them); with one rank, the embedding itself.
    """

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.part = tp.split(vocab_size, "vocab_size")
        self.weight = _param((self.part, dim), dtype, 0, tp)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.tp.rank * self.part
        outside = (local < 0) | (local >= self.part)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, D]
        return out.masked_fill(outside.unsqueeze(-1), 0)


class ParallelLMHead(nn.Module):
    """Vocabulary rows split over ranks; logits all-gathered to the full vocabulary, in fp32, on every rank."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.weight = _param((tp.split(vocab_size, "vocab_size"), dim), dtype, 0, tp)
        self.packed: torch.Tensor | None = None  # as _Linear's
        self.kernel: Kernel | None = None  # as _Linear's
        self.kernel_weight: torch.Tensor | None = None  # as _Linear's

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = linear(h, self.weight, self.packed, self.kernel, self.kernel_weight)
        return self.tp.all_gather_last_dim(out).float()  # [N, V]

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """``forward(h).argmax(-1)`` [N]: on one rank, where ``linear`` would take the kernel, by its
        ``gemm_argmax`` without the logits (the MTP drafts at batch 1, bundled model in bf16: norm, head and argmax
        58-62 -> 43-51 us, side by side on a 2-core AMD EPYC with AVX512-BF16, no AMX)."""
        if self.tp.size == 1 and _by_kernel(h, self.weight, self.packed, self.kernel, self.kernel_weight):
            return cpu_gemm.gemm_argmax(h, self.weight if self.kernel_weight is None else self.kernel_weight)
        return self.forward(h).argmax(-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, None)
        # pdserve's CPU kernel's RMSNorm (``cpu_gemm.rms_norm``), set by the model's ``use_cpu_kernels``
        self.kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16):
            # one call: ~17 us where ATen's chain of six takes ~110 in a decode step (side by side, 2-core AMD
            # EPYC, AVX2 + FMA, no AVX512-BF16 / AMX, fp32); a bf16 model's rounded as the formula below rounds
            return self.kernel(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.device.type == "cpu":
            # one ATen op: on the CPU in fp32 bit for bit the formula below (tests/test_cpu_kernels.py) and
            # ~half its time at decode sizes (bf16 rounds between the steps below, which the fused op does
            # not, and CUDA's is not checked: both keep the formula)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SiLU-gated MLP, intermediate dimension split over ``tp``: returns partial sums when ``tp.size > 1``.

    Built with ``ParallelGroup.single()`` it is a whole MLP on every rank (the shared experts).
    """

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, tp: ParallelGroup, fp8: bool = False):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter, dtype, tp, fp8)
        self.up_proj = ColumnParallelLinear(hidden, inter, dtype, tp, fp8)
        self.down_proj = RowParallelLinear(inter, hidden, dtype, tp, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

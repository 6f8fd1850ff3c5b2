"""Parallel building blocks: linear layers, embeddings, RMSNorm.

Every parameter carries ``shard_dim`` (``None`` = replicated): the dimension
along which a checkpoint tensor is cut for tensor-parallel rank ``r`` of ``n``.
That attribute, read by ``DeepseekV3ForCausalLM.load_weights``, is the whole TP
sharding plan. With ``ParallelGroup.single()`` (world size 1) these are plain
layers; collectives are skipped.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.model.fp8 import FP8, dequant_tile, fp8_linear, scale_shape


@dataclasses.dataclass(frozen=True)
class ParallelGroup:
    """A rank's place in one torch.distributed group (tensor parallel or expert parallel)."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup

    @classmethod
    def single(cls) -> "ParallelGroup":
        return cls()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the parallel size {self.size}")
        return n // self.size


def _param(shape: tuple[int, ...], dtype: torch.dtype, shard_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.shard_dim = shard_dim  # type: ignore[attr-defined]
    return p


class _Linear(nn.Module):
    """``weight [out, in]`` in the model dtype, or (``fp8=True``) DeepSeek's block FP8 pair:
    ``weight`` float8_e4m3fn and ``weight_scale_inv`` fp32 ``[ceil(out/128), ceil(in/128)]``,
    both kept as loaded and cut along the same ``shard_dim`` (see ``engine/model/fp8.py``)."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, shard_dim: int | None, fp8: bool,
                 tp_size: int = 1):
        super().__init__()
        self.fp8 = fp8
        if not fp8:
            self.weight = _param(shape, dtype, shard_dim)
            return
        if tp_size > 1 and shape[shard_dim] % 128:
            raise ValueError(f"FP8 weight shard {shape} is not a whole number of 128-wide blocks along dim {shard_dim}")
        self.weight = _param(shape, FP8, shard_dim)
        self.weight_scale_inv = _param(scale_shape(*shape), torch.float32, shard_dim)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return F.linear(x, self.weight)
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
        super().__init__((tp.split(out_features, "output features"), in_features), dtype, 0, fp8, tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)


class RowParallelLinear(_Linear):
    """Input features split over ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, tp: ParallelGroup,
                 fp8: bool = False):
        super().__init__((out_features, tp.split(in_features, "input features")), dtype, 1, fp8, tp.size)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self._matmul(x))


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split over ranks; out-of-range ids contribute zeros before the all-reduce."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.part = tp.split(vocab_size, "vocab_size")
        self.weight = _param((self.part, dim), dtype, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        start = self.tp.rank * self.part
        local = ids - start
        outside = (local < 0) | (local >= self.part)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Vocabulary rows split over ranks; logits gathered to the full vocabulary, in fp32."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.weight = _param((tp.split(vocab_size, "vocab_size"), dim), dtype, 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last_dim(F.linear(h, self.weight)).float()  # [N, V]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), dtype, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

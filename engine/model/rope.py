"""Rotary position embedding with DeepSeek's YaRN scaling.

Only the decoupled rope part of queries and keys (``qk_rope_head_dim``) is
rotated. DeepSeek checkpoints rotate interleaved pairs ``(x0, x1), (x2, x3)…``;
the rotated result is written de-interleaved (evens then odds), as transformers
does. Queries and cached keys use the same layout, so dot products equal the
reference's complex-multiply form exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from engine.model.config import ModelConfig, YarnConfig


def _yarn_inv_freq(dim: int, base: float, yarn: YarnConfig) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        dim = cfg.qk_rope_head_dim
        if cfg.yarn is None:
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            factor = 1.0
        else:
            inv_freq = _yarn_inv_freq(dim, cfg.rope_theta, cfg.yarn)
            factor = cfg.yarn.attention_factor
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, dim/2]
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)
        self.interleave = cfg.rope_interleave
        # every layer's q and k of a step rotate by the same positions tensor: its rows are looked up
        # once (the key holds the tensor, so its id cannot be reused while cached)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # pdserve's CPU kernel's rotation (``cpu_gemm.rope``: the formula below, rounded the same, in one call
        # instead of ~10), set by the model's ``use_cpu_kernels``
        self.kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor] | None = None

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None or self._rows[0] is not positions:
            self._rows = (positions, self.cos[positions], self.sin[positions])
        return self._rows[1], self._rows[2]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, ..., dim] rotated by positions [T]; returns the same shape and dtype."""
        cos, sin = self._cos_sin(positions)
        if self.kernel is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            return self.kernel(x, cos, sin, self.interleave)
        shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (self.cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)  # [T, 1.., dim/2]
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

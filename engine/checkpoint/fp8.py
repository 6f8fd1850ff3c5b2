"""Block-wise FP8 (e4m3) weights as DeepSeek publishes them.

A 2-D weight ``w[out, in]`` is cut into 128x128 blocks (the last row/column of
blocks may be smaller). Each block ``b`` gets one fp32 ``scale_inv[b] =
amax(|w_b|) / 448`` (448 = largest finite e4m3 value) and is stored as
``float8_e4m3fn(w_b / scale_inv[b])``; dequantization is ``w_fp8 * scale_inv``
block by block. This is the formula of DeepSeek-V3's ``README_WEIGHTS.md``
("zero-padded to 128 before calculating the scale, padding removed after").

CPU fp8 tensors support casts, indexing and views but no arithmetic, so every
computation here runs in float32.
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _expand_scales(scale_inv: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] -> [rows, cols]: each scale repeated over its block."""
    return scale_inv.repeat_interleave(BLOCK, dim=0)[:rows].repeat_interleave(BLOCK, dim=1)[:, :cols]


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w[out, in] (any float dtype) -> (w_fp8[out, in] float8_e4m3fn, scale_inv[ceil(out/128), ceil(in/128)] fp32)."""
    if w.dim() != 2:
        raise ValueError(f"block fp8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    rb, cb = _blocks(rows), _blocks(cols)
    padded = torch.zeros(rb * BLOCK, cb * BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w.to(torch.float32)
    # [rb, 128, cb, 128] -> per-block amax [rb, cb]
    amax = padded.view(rb, BLOCK, cb, BLOCK).abs().amax(dim=(1, 3))
    # An all-zero block quantizes to zeros under any scale; 1.0 keeps the division finite.
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = w.to(torch.float32) / _expand_scales(scale_inv, rows, cols)
    # amax / (amax / 448) can round a hair above 448; saturate explicitly instead of relying on
    # the cast's overflow behaviour (e4m3fn has no infinity).
    w_fp8 = q.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return w_fp8, scale_inv


def dequantize_block_fp8(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(w_fp8[out, in], scale_inv[ceil(out/128), ceil(in/128)]) -> w[out, in] in ``dtype`` (product taken in fp32)."""
    if w_fp8.dim() != 2:
        raise ValueError(f"block fp8 dequantization needs a 2-D weight, got shape {tuple(w_fp8.shape)}")
    rows, cols = w_fp8.shape
    expected = (_blocks(rows), _blocks(cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight shape "
            f"{(rows, cols)} (expected {expected} for 128x128 blocks)"
        )
    scales = _expand_scales(scale_inv.to(torch.float32), rows, cols)
    return (w_fp8.to(torch.float32) * scales).to(dtype)

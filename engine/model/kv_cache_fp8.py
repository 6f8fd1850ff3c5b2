"""The latent KV cache rows in both layouts: the model dtype, or FP8 as FlashMLA stores it.

FP8 row of one token in one layer (``kv_cache_dtype="fp8"``), bytes, in this order::

    [ latent as e4m3: R | fp32 scales: 4 * ceil(R/128) | rope key as bf16: 2 * Dr ]

one scale per 128 latent values (``scale = amax / 448``, 1 for an all-zero group); the
rope key is not quantized. DeepSeek-V3 (R = 512, Dr = 64): 512 + 16 + 128 = 656 bytes
against 1152 in bf16 — FlashMLA's FP8 layout. Other ranks keep the same order with
``ceil(R/128)`` scales (the last group shorter when R is not a multiple of 128).

The cache of a layer is ``uint8 [num_blocks, block_size, row_bytes]``; any other dtype
is the plain layout ``[num_blocks, block_size, R + Dr]``. ``write_rows``/``read_rows``
take and give plain ``[.., R + Dr]`` rows whatever the layout, so attention, prefix
caching and the MTP layers (more cache layers) do not see the difference; the KV
hand-off payload carries the packed bytes as they are.
"""

from __future__ import annotations

import torch

from engine.checkpoint.fp8 import BLOCK, E4M3_MAX

FP8 = torch.float8_e4m3fn


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.uint8


def fp8_row_bytes(rank: int, rope: int) -> int:
    """Bytes of one packed token row: R fp8 + ceil(R/128) fp32 scales + Dr bf16."""
    return rank + 4 * -(-rank // BLOCK) + 2 * rope


def pack_rows(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Plain rows [..., R + Dr] -> packed uint8 [..., fp8_row_bytes(R, Dr)]."""
    latent, k_pe = rows[..., :rank].float(), rows[..., rank:]
    groups = -(-rank // BLOCK)
    padded = torch.nn.functional.pad(latent, (0, groups * BLOCK - rank)).unflatten(-1, (groups, BLOCK))
    amax = padded.abs().amax(-1)  # [..., G]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (padded / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).flatten(-2)[..., :rank]
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8),
                      k_pe.to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)


def unpack_rows(packed: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed uint8 [..., row_bytes] -> plain rows [..., R + Dr] in ``dtype`` (latent = fp8 * scale, in fp32)."""
    groups = -(-rank // BLOCK)
    q = packed[..., :rank].contiguous().view(FP8).float()
    scale = packed[..., rank:rank + 4 * groups].contiguous().view(torch.float32)  # [..., G]
    k_pe = packed[..., rank + 4 * groups:].contiguous().view(torch.bfloat16)
    latent = q * scale.repeat_interleave(BLOCK, dim=-1)[..., :rank]
    return torch.cat([latent.to(dtype), k_pe.to(dtype)], dim=-1)


def write_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, rank: int) -> None:
    """Store plain rows [T, R + Dr] at cache rows ``slots`` [T] (packed when the cache is FP8)."""
    flat = cache.view(-1, cache.shape[-1])
    flat.index_copy_(0, slots, pack_rows(rows, rank) if is_fp8_cache(cache) else rows.to(cache.dtype))


def read_rows(cache: torch.Tensor, slots: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain rows [*slots.shape, R + Dr] at cache rows ``slots``: unpacked to ``dtype`` from an FP8
    cache; from a plain cache, as stored (the callers cast)."""
    flat = cache.view(-1, cache.shape[-1])
    # index_select copies whole rows (~1.8x faster than advanced indexing on CPU)
    rows = flat.index_select(0, slots.reshape(-1)).view(*slots.shape, flat.shape[-1])
    if not is_fp8_cache(cache):
        return rows
    return unpack_rows(rows, rank, dtype)


def convert_rows(rows: torch.Tensor, rank: int, cache: torch.Tensor) -> torch.Tensor:
    """Rows of a KV payload (either layout) in ``cache``'s layout, so FP8 and plain engines can hand off to each other."""
    if is_fp8_cache(cache) == (rows.dtype == torch.uint8):
        return rows.to(cache.dtype)
    if is_fp8_cache(cache):
        return pack_rows(rows, rank)
    return unpack_rows(rows, rank, cache.dtype)


def payload_width_ok(rows: torch.Tensor, rank: int, rope: int) -> bool:
    """Whether KV payload rows [L, T, W] have the width of a plain (R + Dr) or packed FP8 row."""
    return rows.shape[-1] == (fp8_row_bytes(rank, rope) if rows.dtype == torch.uint8 else rank + rope)

"""Block-scaled FP8 linear layers: e4m3 weights with DeepSeek's 128x128 ``weight_scale_inv``.

A quantized linear keeps exactly what the checkpoint stores: ``weight`` float8_e4m3fn
``[out, in]`` and ``weight_scale_inv`` fp32 ``[ceil(out/128), ceil(in/128)]``; no bf16
copy of the weight stays resident. ``fp8_linear`` picks the GEMM at run time:

* **CUDA** — activations quantized per 1x128 group (``act_quant``: fp32 scales,
  optionally powers of two), then a block-scaled FP8 GEMM with fp32 accumulation:
  ``torch._scaled_mm`` with block-wise scales when the installed torch accepts them
  (probed once against the reference), else the Triton kernel of
  ``engine.kernels.fp8_gemm_triton``.
* **CPU** (and CUDA without either) — no fp8 arithmetic exists, so the weight is
  dequantized tile by tile (``TILE_ROWS`` output rows at a time) to the activation
  dtype and multiplied with the ordinary matmul. Each tile is bit-identical to
  ``dequantize_block_fp8(weight, scale_inv, dtype)`` (product taken in fp32, rounded
  once), so the layer computes what the dequantize-on-load model computes while
  holding at most one tile of dequantized weight. Activations stay unquantized here:
  quantizing them would add error and buys no speed on a CPU.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from engine.checkpoint.fp8 import (
    BLOCK,
    E4M3_MAX,
    dequantize_block_fp8,
    quantize_block_fp8,
)
from engine.model.config import ModelConfig

FP8 = torch.float8_e4m3fn
# Output rows dequantized at once on the CPU path (a multiple of 128): at most
# TILE_ROWS x in_features numbers of dequantized weight exist at a time.
TILE_ROWS = 512
# Forces the GEMM on CUDA: "scaled_mm", "triton" or "dequant" (benchmarks and tests).
BACKEND_ENV = "PDSERVE_FP8_GEMM"


def is_fp8_checkpoint(cfg: ModelConfig) -> bool:
    """True for DeepSeek's block FP8 layout (``quant_method: fp8``, 128x128 blocks)."""
    q = cfg.quantization
    if not q or q.get("quant_method") != "fp8":
        return False
    block = list(q.get("weight_block_size") or [BLOCK, BLOCK])
    if block != [BLOCK, BLOCK]:
        raise ValueError(f"quantization_config.weight_block_size {block}: only [128, 128] is supported")
    return True


def scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return -(-out_features // BLOCK), -(-in_features // BLOCK)


def act_quant(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K] e4m3, scale [..., ceil(K/128)] fp32) with x ≈ x_fp8 * scale per 1x128 group.

    ``scale = amax / 448`` per group (1 for an all-zero group); ``pow2_scale`` rounds it up to
    a power of two, so that ``x_fp8 * scale`` is exact in any float format.
    """
    k = x.shape[-1]
    groups = -(-k // BLOCK)
    xf = F.pad(x.float(), (0, groups * BLOCK - k)).unflatten(-1, (groups, BLOCK))  # [..., G, 128]
    amax = xf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xf / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.flatten(-2)[..., :k], scale


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """The fp32 value of each of the 256 e4m3 codes."""
    return torch.arange(256, dtype=torch.uint8).view(FP8).to(torch.float32).to(device)


def _to_float32(w: torch.Tensor) -> torch.Tensor:
    """e4m3 -> fp32, exactly as ``.to(torch.float32)``: a 256-entry table gather, ~3x faster than the cast on CPU."""
    codes = w.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _e4m3_values(w.device).index_select(0, codes).view(w.shape)


def dequant_tile(weight: torch.Tensor, scale_inv: torch.Tensor, row0: int, row1: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Rows ``row0:row1`` (row0 a multiple of 128) of the dequantized weight, as ``dequantize_block_fp8`` gives them."""
    w = _to_float32(weight[row0:row1])  # [r, K]
    rows, k = w.shape
    s = scale_inv[row0 // BLOCK: -(-row1 // BLOCK)].repeat_interleave(BLOCK, dim=0)[:rows]  # [r, kb]
    if k % BLOCK == 0:  # broadcast the scales over each 128-column group instead of expanding them
        return (w.view(rows, -1, BLOCK) * s.unsqueeze(-1)).view(rows, k).to(dtype)
    return (w * s.repeat_interleave(BLOCK, dim=1)[:, :k]).to(dtype)


def _dequant_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out_features = weight.shape[0]
    if out_features <= TILE_ROWS:
        return F.linear(x, dequant_tile(weight, scale_inv, 0, out_features, x.dtype))
    out = x.new_empty(*x.shape[:-1], out_features)
    for r in range(0, out_features, TILE_ROWS):
        end = min(r + TILE_ROWS, out_features)
        out[..., r:end] = F.linear(x, dequant_tile(weight, scale_inv, r, end, x.dtype))
    return out


def _scaled_mm_blockwise(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """torch._scaled_mm with 1x128 activation and 128x128 weight scales (CUDA, recent torch)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = act_quant(x2)
    # cuBLAS wants the activation scales outer-dim-major and the weight column-major.
    xs = xs.t().contiguous().t()
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale_inv.t(), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    from engine.kernels.fp8_gemm_triton import act_quant_triton, fp8_gemm_triton

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xq, xs = act_quant_triton(x2)
    out = fp8_gemm_triton(xq, xs, weight, scale_inv, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def _scaled_mm_blockwise_works(device: str) -> bool:
    """Whether this torch runs block-scaled ``_scaled_mm`` on ``device`` and matches the dequantized reference."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(256, 256, generator=g) / 16
    wq, ws = quantize_block_fp8(w)
    x = torch.randn(32, 256, generator=g).to(torch.bfloat16)
    xq, xs = act_quant(x)
    want = (xq.float() * xs.repeat_interleave(BLOCK, 1)) @ dequantize_block_fp8(wq, ws).t()
    try:
        got = _scaled_mm_blockwise(x.to(device), wq.to(device), ws.to(device)).float().cpu()
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def gemm_backend(device: torch.device) -> str:
    """The FP8 GEMM ``fp8_linear`` runs on ``device``: "scaled_mm", "triton" or "dequant"."""
    if device.type != "cuda":
        return "dequant"
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in ("scaled_mm", "triton", "dequant"):
            raise ValueError(f"{BACKEND_ENV}={forced!r}: choose scaled_mm, triton or dequant")
        return forced
    if _scaled_mm_blockwise_works(str(device)):
        return "scaled_mm"
    return "triton" if _triton_available() else "dequant"


_GEMMS = {"scaled_mm": _scaled_mm_blockwise, "triton": _triton_linear, "dequant": _dequant_linear}


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(weight).T`` for x [..., in] in bf16/fp32 -> [..., out] in x's dtype."""
    backend = gemm_backend(x.device)
    if backend == "scaled_mm" and (weight.shape[0] % BLOCK or weight.shape[1] % BLOCK):
        backend = "triton" if _triton_available() else "dequant"  # cuBLAS block scaling needs whole blocks
    return _GEMMS[backend](x, weight, scale_inv)

"""Triton kernels for DeepSeek-style block FP8: 1x128 activation quantization and a
block-scaled FP8 GEMM (fp32 accumulation).

``fp8_gemm_triton(a, a_s, b, b_s)`` computes ``C[m, n] = sum_k A[m, k] B[n, k]`` with
``A = a_fp8 * a_s`` (one scale per row per 128 columns) and ``B = b_fp8 * b_s`` (one
scale per 128x128 block): each program owns a ``BLOCK_M x BLOCK_N`` tile of C and walks K
in steps of 128, so every step sees one activation scale per row and one weight scale per
column; the fp8 dot product is taken in fp32 and scaled before it is accumulated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.checkpoint.fp8 import BLOCK


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value, ties to even, so the fp8 cast after it is exact.

    Done by hand because Triton's CPU interpreter rounds some casts wrongly (124.3 -> 64);
    on a GPU it equals the hardware's round-to-nearest-even conversion.
    """
    exp = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    quantum = tl.exp2((tl.maximum(exp, -6) - 3).to(tl.float32))  # e4m3: 3 mantissa bits, min normal 2^-6
    v = y / quantum
    r = tl.floor(v + 0.5)
    r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
    return r * quantum


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, GROUPS, POW2: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    y = _round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0))
    tl.store(y_ptr + row * K + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * GROUPS + group, scale)


def act_quant_triton(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] contiguous -> (x_fp8 [M, K], scale [M, ceil(K/128)] fp32); same contract as ``engine.model.fp8.act_quant``."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"act_quant_triton needs a contiguous 2-D tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    groups = triton.cdiv(k, BLOCK)
    y = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    _act_quant_kernel[(m, groups)](x, y, s, k, groups, POW2=pow2_scale, BLOCK_K=BLOCK)
    return y, s


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, K_GROUPS,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n[None, :] * K + offs_k[:, None]  # [BK, BN] (B is [N, K] row-major)
    a_s_ptrs = a_s_ptr + offs_m * K_GROUPS
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * K_GROUPS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(K_GROUPS):
        k_ok = offs_k < K - i * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs, mask=m_ok, other=0.0)
        b_s = tl.load(b_s_ptrs, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        a_s_ptrs += 1
        b_s_ptrs += 1
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm_triton(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, block_m: int = 64, block_n: int = 128) -> torch.Tensor:
    """a [M, K] e4m3 with a_s [M, ceil(K/128)], b [N, K] e4m3 with b_s [ceil(N/128), ceil(K/128)] -> [M, N].

    ``block_n`` must divide 128 (each output tile column sees one weight scale per K step).
    """
    m, k = a.shape
    n = b.shape[0]
    groups = triton.cdiv(k, BLOCK)
    if b.shape[1] != k or tuple(a_s.shape) != (m, groups) or tuple(b_s.shape) != (triton.cdiv(n, BLOCK), groups):
        raise ValueError(f"fp8_gemm_triton: shapes a {tuple(a.shape)}, a_s {tuple(a_s.shape)}, "
                         f"b {tuple(b.shape)}, b_s {tuple(b_s.shape)} do not fit")
    if BLOCK % block_n:
        raise ValueError(f"block_n ({block_n}) must divide {BLOCK}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](a.contiguous(), b.contiguous(), c, a_s.contiguous(), b_s.contiguous(), m, n, k, groups,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK)
    return c

"""The CPU kernel's MLA prefill attention (``cpu_gemm.mla_prefill``, engine/kernels/cpu_gemm.cpp): the naive
pass's causal attention read from the projections' views, in fp32 (AVX2 + FMA, every CPU the kernel builds on; AVX-512
where the CPU has it) and in bf16 (the AVX512-BF16 products, only on a CPU with them).

It must equal the fp32 attention on the same values (to fp32 rounding, or to bf16's precision) at every tail its
blocks have (query blocks of 16 or 32, key blocks of 64, a chunk after cached context), with keys past a query's
position weighing nothing; the naive pass must take it where it fits and give torch's result.
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu_gemm
from engine.model.attention import MLAWeights, _naive
from kernel_marks import WIDTHS, avx512_code, needs_avx512, needs_dot, needs_kernel

SHAPES = [(1, 1, 2), (5, 5, 3), (17, 17, 2), (33, 33, 4), (7, 100, 2), (64, 64, 16), (100, 300, 8), (65, 130, 1)]


def _reference(q_nope, q_pe, k_nope, k_pe, v, scale):
    """MLA's expanded attention in fp32 on the same values, query i at position L - Q + i."""
    (n_q, heads, _), n_k = q_nope.shape, k_nope.shape[0]
    q = torch.cat([q_nope, q_pe], -1).float().transpose(0, 1)  # [H, Q, D]
    k = torch.cat([k_nope, k_pe[:, None].expand(n_k, heads, -1)], -1).float().transpose(0, 1)  # [H, L, D]
    s = q @ k.transpose(1, 2) * scale
    s.masked_fill_(torch.arange(n_k)[None, :] > (torch.arange(n_q) + n_k - n_q)[:, None], float("-inf"))
    return (torch.softmax(s, -1) @ v.float().transpose(0, 1)).transpose(0, 1)  # [Q, H, Dv]


def _check(dtype, queries, keys, heads, atol):
    """On the views the naive pass has (k_nope and v interleaved per head in kv_b's output, q_nope and q_pe
    slices of one tensor, k_pe a slice of the latent rows)."""
    torch.manual_seed(queries * 1000 + keys + heads)
    nope, rope, dv = 32, 16, 64
    kv = torch.randn(keys, heads, nope + dv).to(dtype)
    q = torch.randn(queries, heads, nope + rope).to(dtype)
    latent = torch.randn(keys, 48 + rope).to(dtype)

    def run():
        return cpu_gemm.mla_prefill(q[..., :nope], q[..., nope:], kv[..., :nope], latent[:, 48:], kv[..., nope:], 0.3)

    got = run()
    assert got.dtype == dtype and got.shape == (queries, heads, dv)
    want = _reference(q[..., :nope], q[..., nope:], kv[..., :nope], latent[:, 48:], kv[..., nope:], 0.3)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=atol * want.abs().max().item())
    if queries > 1:  # the last key (and value) only the last query sees: the others bit for bit the same
        kv[-1] += 100
        latent[-1] += 100
        again = run()
        assert torch.equal(again[:-1], got[:-1]) and not torch.equal(again[-1], got[-1])


@needs_kernel
@pytest.mark.parametrize("queries, keys, heads", SHAPES)
@pytest.mark.parametrize("avx512", WIDTHS)
def test_fp32_prefill_attention_of_strided_views(queries, keys, heads, avx512):
    """In 8 lanes (AVX2 + FMA, 16-query items) and, on a CPU with AVX-512, in 16 (32-query items, lane masks on
    the diagonal)."""
    with avx512_code(avx512):
        _check(torch.float32, queries, keys, heads, atol=1e-5)


@needs_avx512
@pytest.mark.parametrize("queries, keys, heads", [(33, 33, 4), (45, 300, 3), (100, 130, 2)])
def test_fp32_prefill_attention_is_the_same_in_8_and_16_lanes(queries, keys, heads):
    """Per lane the two widths do the same arithmetic in the same order: bit for bit the same result."""
    torch.manual_seed(queries + keys)
    kv, q, k_pe = torch.randn(keys, heads, 96), torch.randn(queries, heads, 48), torch.randn(keys, 16)
    outs = []
    for avx512 in (False, True):
        with avx512_code(avx512):
            outs.append(cpu_gemm.mla_prefill(q[..., :32], q[..., 32:], kv[..., :32], k_pe, kv[..., 32:], 0.3))
    assert torch.equal(outs[0], outs[1])


@needs_dot
@pytest.mark.parametrize("queries, keys, heads", SHAPES)
def test_bf16_prefill_attention_of_strided_views(bf16_dot, queries, keys, heads):
    _check(torch.bfloat16, queries, keys, heads, atol=1.5e-2)


@needs_kernel
@pytest.mark.parametrize("queries, keys, dv, taken", [(40, 40, 64, True), (9, 70, 64, True), (9, 70, 48, False),
                                                     (3, cpu_gemm.FP32_PREFILL_MAX_KEYS, 32, True),
                                                     (3, cpu_gemm.FP32_PREFILL_MAX_KEYS + 1, 32, False)])
def test_the_naive_pass_takes_it_where_it_fits(queries, keys, dv, taken):
    """``_naive`` with the model's kernel on runs ``mla_prefill`` (fp32) and gives torch's fused attention's
    result; with values not a multiple of 32 wide, or more keys than it is faster for, it keeps torch's."""
    cpu_gemm.load()
    torch.manual_seed(queries + keys)
    heads, nope, rope, rank = 2, 32, 16, 64
    weight = torch.randn(heads * (nope + dv), rank) / 8
    ctx = torch.randn(keys, rank + rope)
    q_nope, q_pe = torch.randn(queries, heads, nope), torch.randn(queries, heads, rope)
    plain = MLAWeights.from_kv_b_proj(weight, heads, nope, dv, 0.2)
    calls = []

    def counted(*args):
        calls.append(1)
        return cpu_gemm.mla_prefill(*args)

    fast = MLAWeights.from_kv_b_proj(weight, heads, nope, dv, 0.2, prefill_attention=counted)
    assert cpu_gemm.prefill_fits(q_nope, q_pe, dv, keys) == taken
    torch.testing.assert_close(_naive(q_nope, q_pe, ctx, fast), _naive(q_nope, q_pe, ctx, plain), rtol=1e-4, atol=1e-5)
    assert bool(calls) == taken

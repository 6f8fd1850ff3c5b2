"""The Triton FP8 kernels against the torch reference: on CPU under TRITON_INTERPRET=1 (small
shapes), and the CUDA dispatch of ``fp8_linear`` where a GPU is present."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must be set before the kernels are decorated (module import); CPU tensors run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from engine.checkpoint.fp8 import dequantize_block_fp8, quantize_block_fp8
from engine.kernels.fp8_gemm_triton import act_quant_triton, fp8_gemm_triton
from engine.model.fp8 import BACKEND_ENV, act_quant, fp8_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_interpreter = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA and TRITON_INTERPRET is not 1 (triton was imported before this module set it)")


def _reference_gemm(aq, a_s, wq, w_s):
    """fp32 ``(aq * a_s) @ dequant(wq, w_s).T`` — the block-scaled GEMM's definition."""
    k = aq.shape[1]
    a = aq.float() * a_s.repeat_interleave(128, 1)[:, :k]
    return a @ dequantize_block_fp8(wq, w_s).t()


@needs_interpreter
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_kernel_equals_torch(pow2):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 300, generator=g) * torch.logspace(-2, 2, 300)).to(torch.bfloat16)
    x[2, :128] = 0
    q, s = act_quant_triton(x.to(DEVICE), pow2_scale=pow2)
    rq, rs = act_quant(x, pow2_scale=pow2)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))  # bit for bit, round-to-nearest-even


@needs_interpreter
@pytest.mark.parametrize("m,n,k,out_dtype", [(5, 200, 300, torch.float32), (33, 256, 128, torch.bfloat16),
                                             (1, 128, 384, torch.float32)])
def test_block_gemm_kernel_equals_reference(m, n, k, out_dtype):
    g = torch.Generator().manual_seed(1)
    wq, w_s = quantize_block_fp8(torch.randn(n, k, generator=g) / 10)
    aq, a_s = act_quant(torch.randn(m, k, generator=g))
    want = _reference_gemm(aq, a_s, wq, w_s)
    got = fp8_gemm_triton(aq.to(DEVICE), a_s.to(DEVICE), wq.to(DEVICE), w_s.to(DEVICE), out_dtype,
                          block_m=16, block_n=64).cpu()
    assert got.dtype == out_dtype and got.shape == (m, n)
    tol = 1e-4 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_gemm_rejects_mismatched_scales():
    wq, w_s = quantize_block_fp8(torch.randn(128, 256))
    aq, a_s = act_quant(torch.randn(4, 256))
    with pytest.raises(ValueError, match="do not fit"):
        fp8_gemm_triton(aq, a_s[:, :1], wq, w_s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the run-time GEMM choice of fp8_linear")
@pytest.mark.parametrize("backend", ["triton", "scaled_mm", "dequant"])
def test_cuda_fp8_linear_backends_agree(backend, monkeypatch):
    from engine.model.fp8 import _scaled_mm_blockwise_works

    if backend == "scaled_mm" and not _scaled_mm_blockwise_works("cuda"):
        pytest.skip("this torch has no block-wise torch._scaled_mm on this GPU")
    monkeypatch.setenv(BACKEND_ENV, backend)
    g = torch.Generator().manual_seed(2)
    wq, w_s = quantize_block_fp8(torch.randn(512, 1024, generator=g) / 30)
    x = torch.randn(64, 1024, generator=g).to(torch.bfloat16)
    want = x.float() @ dequantize_block_fp8(wq, w_s).t()
    got = fp8_linear(x.cuda(), wq.cuda(), w_s.cuda()).float().cpu()
    # the FP8 GEMMs also quantize activations (1x128, e4m3): relative error ~2^-4 per product, averaged
    assert (got - want).abs().mean() < 0.03 * want.abs().mean()

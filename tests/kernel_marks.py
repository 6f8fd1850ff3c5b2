"""What this machine's CPU lets the kernel tests run: pdserve's CPU kernel (engine/kernels/cpu_gemm.cpp) builds
with x86 AVX2 + FMA and a C++ compiler; its AVX512-BF16 products need a CPU with AVX512-BF16, the AVX-512 code of
its fp32 paths (column tiles and prefill attention in 16 lanes, decode attention with the heads in the lanes) a CPU
with AVX-512F and BW."""

from __future__ import annotations

import contextlib
import shutil

import pytest

from engine.dtype_choice import cpu_flags

FLAGS = cpu_flags() or set()
CAN_BUILD = {"avx2", "fma"} <= FLAGS and shutil.which("c++") is not None
HAS_DOT = CAN_BUILD and "avx512_bf16" in FLAGS
HAS_AVX512 = CAN_BUILD and {"avx512f", "avx512bw"} <= FLAGS
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel needs x86 AVX2 + FMA and a C++ compiler")
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="the AVX512-BF16 products need a CPU with AVX512-BF16")
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the kernel's AVX-512 code needs a CPU with AVX-512")
# a test's parameter: the kernel's fp32 paths in 8 lanes (AVX2), and in 16 where the CPU has AVX-512
WIDTHS = [False, pytest.param(True, marks=needs_avx512, id="avx512")]


@contextlib.contextmanager
def avx512_code(on: bool):
    """The kernel (loaded) with its AVX-512 code on or off inside the block (off where the CPU has none)."""
    from engine.kernels import cpu_gemm

    cpu_gemm.load()
    was = cpu_gemm.set_avx512(on) if HAS_AVX512 else False
    try:
        yield
    finally:
        if HAS_AVX512:
            cpu_gemm.set_avx512(was)

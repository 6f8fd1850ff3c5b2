"""What this machine's CPU lets the kernel tests run: pdserve's CPU kernel (engine/kernels/cpu_gemm.cpp) builds
with x86 AVX2 + FMA and a C++ compiler; its AVX512-BF16 products need a CPU with AVX512-BF16, its column tiles
(head_gemm's fp32 layout) AVX-512."""

from __future__ import annotations

import shutil

import pytest

from engine.dtype_choice import cpu_flags

FLAGS = cpu_flags() or set()
CAN_BUILD = {"avx2", "fma"} <= FLAGS and shutil.which("c++") is not None
HAS_DOT = CAN_BUILD and "avx512_bf16" in FLAGS
HAS_COL = CAN_BUILD and {"avx512f", "avx512bw"} <= FLAGS
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="the CPU kernel needs x86 AVX2 + FMA and a C++ compiler")
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="the AVX512-BF16 products need a CPU with AVX512-BF16")
needs_col = pytest.mark.skipif(not HAS_COL, reason="head_gemm's column tiles need a CPU with AVX-512")

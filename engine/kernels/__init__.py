"""Kernels of pdserve's own. ``fp8_gemm_triton``: GPU (Triton); import it only where Triton is
installed; on CPU it runs under ``TRITON_INTERPRET=1`` for correctness checks on small shapes.
``cpu_gemm``: the CPU kernel for decode-sized matmuls (C++, AVX2 + FMA), built on first use; see its docstring."""

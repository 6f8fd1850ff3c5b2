"""glibc malloc settings for a CPU engine: keep freed memory for reuse instead of giving it back.

A CPU forward allocates and frees tensors of tens of MB every step (a prefill chunk's activations,
the MoE dispatch's token copies). glibc serves blocks that large with ``mmap`` and unmaps them on
``free``, so the next step's tensors start on fresh pages and pay a page fault every 4 KiB
(tens of ms per step). Raising ``M_MMAP_THRESHOLD`` (1 GiB) and ``M_TRIM_THRESHOLD`` (2 GiB) keeps
those blocks in malloc's heaps, where the next step mostly reuses them: what tcmalloc, preloaded,
does for vLLM's CPU backend, in-process and without a preload. Not all of them: torch allocates with
``posix_memalign``, and glibc's aligned allocations can still extend the heap instead of reusing a
freed block (a step-like pattern of 32, 8, 23, 32 and 11 MiB tensors: ~1/4 of the page faults of
glibc's default, ``tests/test_cpu_memory.py``). Measured side by side on a 2-core AMD EPYC
(AVX2 + FMA, no AVX-512 / AVX512-BF16 / AMX), fp32, bench preset: a prefill step of 8 x 256 tokens 2.0-2.2 s with these
settings vs 2.4-3.1 s without (two runs each, alternating). The cost: memory the process has used once
stays with it (its peak), as with a caching allocator.

``PDSERVE_MALLOC_TUNING=0`` leaves malloc as it is; a C library without ``mallopt`` (not glibc)
is left as it is too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_done: list[bool] = []  # once per process


def keep_freed_memory() -> bool:
    """Apply the settings (once per process); whether they are in force."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("PDSERVE_MALLOC_TUNING", "1") == "0":
        log.info("malloc left as it is: PDSERVE_MALLOC_TUNING=0")
    else:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):  # no C library by that name, or one without mallopt
            ok = False
        if ok:
            log.info("malloc keeps freed blocks for reuse (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB)")
        else:
            log.info("malloc left as it is: this C library has no glibc mallopt")
    _done.append(ok)
    return ok

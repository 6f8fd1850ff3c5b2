"""``dtype=auto``: the compute dtype the machine runs fast.

* CUDA: bfloat16.
* CPU: bfloat16 only where the CPU has bf16 matrix instructions (x86 AMX-BF16 or AVX512-BF16),
  else float32. A CPU without them (e.g. AVX2 only) runs a bf16 matmul one to two orders of
  magnitude slower than fp32 (measured 0.3 vs 77 GFLOP/s on a 2-core AVX2 EPYC), because torch
  converts each tile. Where the ISA cannot be read or is not x86 (e.g. Arm with or without its
  BF16 extension), a one-off micro-benchmark decides: a 128x256 @ 256x256 matmul in each dtype,
  best of 3 after a warm-up (8 matmuls: about 0.3 s where bf16 is slowest, 0.3 GFLOP/s, far less
  elsewhere), bf16 when it is at least as fast as fp32 (``BF16_MIN_SPEEDUP``).

The choice and its reason are logged once and reported by ``/version`` and
``pdserve checkpoint inspect``. ``--dtype bfloat16`` / ``float32`` skip the rule. The FP8 paths
compute in the model dtype, so they follow it; ``tools/train_tiny.py`` uses bf16 autocast only
where this rule picks bf16.

``PDSERVE_CPU_MAX_ISA=avx2`` makes pdserve take the CPU for one with nothing past AVX2 + FMA: ``cpu_flags()``
drops the AVX-512 and AMX flags, so this rule, the CPU kernel's AVX-512 / AVX512-BF16 paths and the row
limits chosen by ISA all act as on such a CPU. With torch's and oneDNN's own caps (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``) an AVX-512 machine stands in for an AVX2-only one; ``tools/bench_serving.py
--max-cpu-isa avx2`` sets all three for every server it starts. Other values are ignored with a warning, as
torch does with an unknown ``ATEN_CPU_CAPABILITY``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

log = logging.getLogger("pdserve.engine")

BF16_MIN_SPEEDUP = 1.0  # the micro-benchmark picks bf16 when fp32 time / bf16 time >= this
_X86_BF16 = ("amx_bf16", "avx512_bf16")
MAX_ISA_ENV = "PDSERVE_CPU_MAX_ISA"
_ABOVE_AVX2 = ("avx512", "amx")  # prefixes of the x86 flags an "avx2" cap drops


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bfloat16" | "float32"
    reason: str


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags`` / Arm ``Features`` of /proc/cpuinfo), less those above
    ``max_isa()``; None where unreadable."""
    flags = _proc_flags()
    if flags is None or max_isa() is None:
        return None if flags is None else set(flags)
    return {f for f in flags if not f.startswith(_ABOVE_AVX2)}


def max_isa() -> str | None:
    """``"avx2"`` where ``PDSERVE_CPU_MAX_ISA`` caps the ISA pdserve uses, else None."""
    value = os.environ.get(MAX_ISA_ENV, "").strip().lower()
    if value in ("", "avx2"):
        return value or None
    _warn_max_isa(value)
    return None


@functools.lru_cache(maxsize=None)
def _warn_max_isa(value: str) -> None:
    log.warning("ignoring %s=%s: the one cap known is avx2", MAX_ISA_ENV, value)


@functools.lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def choose_cpu_dtype(flags: set[str] | None, benchmark=None) -> DtypeChoice:
    """The rule for a CPU with ``flags``; ``benchmark()`` -> fp32 time / bf16 time, run only when in doubt."""
    if flags is not None and "avx2" in flags:  # x86: the ISA decides
        fast = [f for f in _X86_BF16 if f in flags]
        if fast:
            return DtypeChoice("bfloat16", f"CPU has {' and '.join(f.upper() for f in fast)}")
        return DtypeChoice("float32", "CPU has no AMX-BF16 or AVX512-BF16: bf16 matmuls are slow here")
    speedup = (benchmark or _bf16_speedup)()
    dtype = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return DtypeChoice(dtype, f"CPU ISA not x86 or unreadable; measured bf16 matmul at {speedup:.2f}x fp32's speed")


def _bf16_speedup() -> float:
    import torch

    def best(dtype) -> float:
        a = torch.randn(128, 256).to(dtype)
        b = torch.randn(256, 256).to(dtype)
        a @ b  # warm-up
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            t.append(time.perf_counter() - t0)
        return min(t)

    return best(torch.float32) / best(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def auto_dtype(device_type: str) -> DtypeChoice:
    """``dtype=auto`` on a device of this type (``"cuda"`` or ``"cpu"``), decided once per process."""
    choice = (DtypeChoice("bfloat16", "CUDA device") if device_type == "cuda"
              else choose_cpu_dtype(cpu_flags()))
    if device_type != "cuda" and max_isa():
        choice = DtypeChoice(choice.dtype, f"{choice.reason} ({MAX_ISA_ENV}={max_isa()})")
    log.info("dtype auto -> %s (%s)", choice.dtype, choice.reason)
    return choice


def resolve(name: str, device_type: str) -> DtypeChoice:
    """The dtype ``name`` (auto | bfloat16 | float32) means on this device, with why."""
    if name == "auto":
        return auto_dtype(device_type)
    return DtypeChoice(name, "asked for")

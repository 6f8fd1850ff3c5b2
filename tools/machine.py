"""What the benchmark scripts share: the CPU line they print next to their numbers (model, cores and
the ISA extensions that decide fp32/bf16 speed: AVX2, AVX-512, AVX512-BF16, AMX) and a free
loopback port for the servers they start."""

from __future__ import annotations

import os
import platform
import socket


def cpu_description() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {', '.join(isa) or 'no AVX2'})"


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

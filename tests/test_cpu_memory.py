"""engine/cpu_memory.py: with the settings, the large temporaries of a step (several sizes, some alive
together, as a prefill makes them) mostly reuse pages that earlier steps mapped; without them
(PDSERVE_MALLOC_TUNING=0) glibc unmaps blocks that large on free and every page faults again. Each
case runs in its own process: the settings are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from engine import cpu_memory
print("ON" if cpu_memory.keep_freed_memory() else "OFF")
MIB = 1 << 18  # float32 elements
def step():
    a = torch.empty(32 * MIB).fill_(1.0)
    b = torch.empty(8 * MIB).fill_(1.0)
    c = torch.empty(23 * MIB).fill_(1.0)
    del a
    d = torch.empty(32 * MIB).fill_(1.0)
    del b, c
    e = torch.empty(11 * MIB).fill_(1.0)
    return d.sum() + e.sum()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_STEP = (32 + 8 + 23 + 32 + 11) * 256  # 4 KiB pages the step's tensors span


def _run(tuning: str) -> tuple[str, int]:
    env = {**os.environ, "PDSERVE_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    state, faults = out.stdout.split()
    return state, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux page-fault counts")
def test_a_steps_large_temporaries_mostly_reuse_mapped_pages():
    state, tuned = _run("1")
    if state == "OFF":
        pytest.skip("this C library has no glibc mallopt")
    state, plain = _run("0")
    assert state == "OFF"
    assert plain > 2 * PAGES_PER_STEP, plain  # glibc's default: blocks this large come and go with mmap
    assert tuned < plain / 2, (tuned, plain)  # measured ~1/4 on the dev machine

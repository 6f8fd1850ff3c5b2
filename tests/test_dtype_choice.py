"""``dtype=auto`` by the hardware (engine/dtype_choice.py): the rule for each kind of CPU, what the
engine and the dev server's ``/version`` report, that an explicit dtype still wins, and that
``PDSERVE_CPU_MAX_ISA=avx2`` makes pdserve (its rule and its kernel) and the vLLM launcher act as on a CPU
without AVX-512."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from kernel_marks import needs_kernel

from engine import dtype_choice
from engine.dtype_choice import auto_dtype, choose_cpu_dtype, cpu_flags, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZEN4 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                  "avx512_vnni", "vaes"})


def _never():
    raise AssertionError("the micro-benchmark ran although the ISA decides")


@pytest.mark.parametrize("flags,want", [
    ({"avx2", "fma"}, "float32"),  # the AVX2-only EPYC of the issue: bf16 ~250x slower
    ({"avx2", "avx512f"}, "float32"),  # AVX-512 without its BF16 extension converts too
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),
])
def test_x86_isa_decides(flags, want):
    choice = choose_cpu_dtype(flags, benchmark=_never)
    assert choice.dtype == want and choice.reason


@pytest.mark.parametrize("speedup,want", [(0.02, "float32"), (0.99, "float32"), (1.0, "bfloat16"), (1.8, "bfloat16")])
def test_other_cpus_are_measured(speedup, want):
    for flags in (None, {"fp", "asimd", "bf16"}):  # unreadable, Arm
        choice = choose_cpu_dtype(flags, benchmark=lambda: speedup)
        assert choice.dtype == want and f"{speedup:.2f}x" in choice.reason


def test_the_real_micro_benchmark_agrees_with_the_isa():
    flags = cpu_flags()
    measured = choose_cpu_dtype(None)  # as if the ISA were unreadable
    if flags is not None and "avx2" in flags and not {"amx_bf16", "avx512_bf16"} & flags:
        assert measured.dtype == "float32", measured  # bf16 converts tile by tile here: far slower


def test_engine_and_version_report_the_choice(tiny_checkpoint):
    import asyncio

    import torch
    from fastapi.testclient import TestClient

    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine
    from engine.tokenizer import load_tokenizer
    from serving.openai_api import build_app

    want = choose_cpu_dtype(cpu_flags())
    assert auto_dtype("cpu") == want and auto_dtype("cuda").dtype == "bfloat16"
    assert resolve("bfloat16", "cpu").dtype == "bfloat16" and resolve("float32", "cuda").dtype == "float32"
    engine = AsyncEngine(EngineArgs(model=tiny_checkpoint, device="cpu", num_kv_blocks=16))

    async def run():
        await engine.start()
        try:
            assert engine.engine.runner.dtype == getattr(torch, want.dtype)
            app = build_app(engine, load_tokenizer(tiny_checkpoint))
            with TestClient(app) as client:
                return client.get("/version").json()
        finally:
            await engine.shutdown()

    body = asyncio.run(run())
    assert body["dtype"] == want.dtype and body["dtype_reason"] == want.reason


@pytest.fixture
def zen4(monkeypatch):
    """This process reads ZEN4's flags from /proc/cpuinfo; ``auto_dtype``'s answer is forgotten around the test."""
    monkeypatch.setattr(dtype_choice, "_proc_flags", lambda: ZEN4)
    monkeypatch.delenv(dtype_choice.MAX_ISA_ENV, raising=False)
    auto_dtype.cache_clear()
    dtype_choice._warn_max_isa.cache_clear()
    yield monkeypatch
    auto_dtype.cache_clear()


def test_an_avx2_cap_takes_the_cpu_for_one_without_avx512(zen4):
    assert cpu_flags() == ZEN4 and auto_dtype("cpu").dtype == "bfloat16"
    auto_dtype.cache_clear()
    zen4.setenv("PDSERVE_CPU_MAX_ISA", "AVX2")
    assert cpu_flags() == {"fpu", "sse4_2", "avx", "avx2", "fma", "vaes"}
    choice = auto_dtype("cpu")
    assert choice.dtype == "float32" and choice.reason.endswith("(PDSERVE_CPU_MAX_ISA=avx2)")
    assert resolve("bfloat16", "cpu").dtype == "bfloat16"  # an explicit dtype still wins


def test_an_unknown_cap_is_ignored_with_a_warning(zen4, caplog):
    zen4.setenv("PDSERVE_CPU_MAX_ISA", "sse2")
    with caplog.at_level(logging.WARNING, logger="pdserve.engine"):
        assert cpu_flags() == ZEN4 and cpu_flags() == ZEN4
    assert [r.getMessage() for r in caplog.records] == ["ignoring PDSERVE_CPU_MAX_ISA=sse2: the one cap known is avx2"]


def _python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[-1]


@needs_kernel
def test_the_cap_keeps_the_cpu_kernel_to_avx2():
    code = ("from engine.kernels import cpu_gemm; m = cpu_gemm.load(); "
            "print(f'{m.avx512_enabled():d}{m.bf16_dot_enabled():d}{m.col_tiles_enabled():d}')")
    real = cpu_flags() or set()
    assert _python(code) == f"{int({'avx512f', 'avx512bw'} <= real)}{int('avx512_bf16' in real)}1"
    assert _python(code, PDSERVE_CPU_MAX_ISA="avx2") == "001"  # the column tiles, in AVX2 code


def test_the_cap_tells_vllm_the_cpu_has_no_avx512():
    """tools/peers/vllm_launch.py answers torch's ISA probes (which vLLM asks) for an AVX2-only CPU, and leaves
    them be without the cap."""
    import torch

    code = ("import sys, torch; sys.path.insert(0, 'tools/peers'); import vllm_launch; "
            "print(','.join(f'{n}={int(getattr(torch.cpu, n)())}' for n in vllm_launch._PROBES_ABOVE_AVX2))")
    capped = dict(p.split("=") for p in _python(code, PDSERVE_CPU_MAX_ISA="avx2").split(","))
    assert len(capped) == 5 and set(capped.values()) == {"0"}
    assert _python(code) == ",".join(f"{n}={int(getattr(torch.cpu, n)())}" for n in capped)

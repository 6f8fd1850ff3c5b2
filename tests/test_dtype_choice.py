"""``dtype=auto`` by the hardware (engine/dtype_choice.py): the rule for each kind of CPU, what the
engine and the dev server's ``/version`` report, and that an explicit dtype still wins."""

from __future__ import annotations

import pytest

from engine.dtype_choice import auto_dtype, choose_cpu_dtype, cpu_flags, resolve


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

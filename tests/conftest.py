"""Shared fixtures: small random checkpoints in the official DeepSeek layout.

Session-scoped and shared between tests: treat the directories as read-only
(copy them with ``shutil.copytree`` before breaking or extending one).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The ``tiny`` preset, bf16, seed 0, with its tokenizer (about 1 MB)."""
    from engine.checkpoint.random_ckpt import make_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_random_checkpoint(path, "tiny", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint(tmp_path_factory) -> str:
    """The ``tiny`` preset, seed 0, in DeepSeek's block-FP8 layout."""
    from engine.checkpoint.random_ckpt import make_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    make_random_checkpoint(path, "tiny", seed=0, fp8=True)
    return str(path)


@pytest.fixture(scope="session")
def bench_fp8_tool():
    """``tools/bench_fp8.py`` as a module: its measurement functions are what the FP8 tests assert on."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "bench_fp8", os.path.join(os.path.dirname(__file__), "..", "tools", "bench_fp8.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bf16_dot(on: bool):
    """The CPU kernel loaded, its AVX512-BF16 products set ``on`` for the test (refused on a CPU without them),
    the setting restored after."""
    from engine.kernels import cpu_gemm

    cpu_gemm.load()
    was = cpu_gemm.set_bf16_dot(on)
    yield
    cpu_gemm.set_bf16_dot(was)


@pytest.fixture
def widened_bf16():
    """bf16 rows widened to fp32 in the CPU kernel (its AVX512-BF16 products off, where the CPU has them)."""
    yield from _bf16_dot(False)


@pytest.fixture
def bf16_dot():
    """The CPU kernel's AVX512-BF16 products on (a test that takes it needs a CPU with AVX512-BF16)."""
    yield from _bf16_dot(True)

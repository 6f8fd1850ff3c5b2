"""Converting a bf16/fp32 checkpoint to DeepSeek-V3's published FP8 layout.

Every tensor the schema marks ``fp8`` (the attention and MLP/expert projections)
is stored float8_e4m3fn with a fp32 ``<module>.weight_scale_inv`` of 128x128
block scales beside it. Everything else keeps its source dtype, as in
DeepSeek-V3's own FP8 release: ``embed_tokens``, ``lm_head``, all norms, the
router ``mlp.gate.weight`` and its ``e_score_correction_bias``, and the MTP
layer's ``eh_proj``, ``enorm``/``hnorm``, ``embed_tokens`` and ``shared_head``.
config.json gains DeepSeek's ``quantization_config``; tokenizer and other side
files are copied unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Iterator

import torch

from engine.checkpoint.fp8 import quantize_block_fp8
from engine.checkpoint.loader import INDEX_NAME, CheckpointError, iter_checkpoint_tensors, load_config, scale_name
from engine.checkpoint.schema import TensorSpec, checkpoint_schema
from engine.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, save_checkpoint
from engine.model.config import ModelConfig

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def fp8_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with DeepSeek's FP8 ``quantization_config``."""
    return dataclasses.replace(cfg, quantization=dict(FP8_QUANTIZATION_CONFIG))


def quantize_tensors(
    schema: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` pairs in the FP8 layout: each fp8 weight is followed by its ``weight_scale_inv``."""
    for name, tensor in tensors:
        spec = schema.get(name)
        if spec is not None and spec.fp8:
            w_fp8, scale_inv = quantize_block_fp8(tensor)
            yield name, w_fp8
            yield scale_name(name), scale_inv
        else:
            yield name, tensor


def _copy_side_files(src_dir: str, dst_dir: str) -> None:
    """Copy tokenizer and other non-weight files (everything but weights, index and config.json)."""
    for entry in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, entry)
        if (not os.path.isfile(path) or entry.startswith(".") or entry.endswith(".safetensors")
                or entry in (INDEX_NAME, "config.json")):
            continue
        shutil.copy2(path, os.path.join(dst_dir, entry))


def quantize_checkpoint_fp8(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> ModelConfig:
    """Write the FP8 version of the checkpoint at ``src_dir`` into ``dst_dir``; returns its config.

    Reads and writes one shard at a time. Raises CheckpointError for a broken or already quantized source.
    """
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    cfg = load_config(src_dir)
    if cfg.quantization is not None:
        raise CheckpointError(f"{os.path.join(src_dir, 'config.json')}: already quantized "
                              f"({cfg.quantization.get('quant_method')})")
    schema = checkpoint_schema(cfg)
    source = iter_checkpoint_tensors(src_dir, cfg, None, progress=progress)
    qcfg = fp8_config(cfg)
    save_checkpoint(dst_dir, qcfg, quantize_tensors(schema, source), max_shard_bytes)
    _copy_side_files(src_dir, dst_dir)
    return qcfg

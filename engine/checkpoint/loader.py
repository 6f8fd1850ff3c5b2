"""Reading checkpoints in the official Hugging Face DeepSeek layout.

A checkpoint directory holds ``config.json`` and either one ``model.safetensors``
or shards listed in ``model.safetensors.index.json`` (``weight_map``: tensor name
-> shard file). FP8 checkpoints store each quantized weight as float8_e4m3fn with
a fp32 ``<module>.weight_scale_inv`` beside it; the loader dequantizes those pairs.

Loading first reads only the safetensors headers and checks them against
``checkpoint_schema(cfg)``, so a broken checkpoint fails before any data is read,
with one ``CheckpointError`` naming the file and the tensor. Tensors are then read
lazily shard by shard and yielded one at a time: memory holds one tensor (plus the
memory-mapped shard), never the whole model.

Two departures from the schema are tolerated, as vLLM tolerates them:

* MTP layers that config.json declares (``num_nextn_predict_layers``) but the checkpoint
  does not store at all -- transformers' ``save_pretrained`` drops them, and so do many
  published DeepSeek-derived checkpoints. ``mtp_layers_to_load`` decides: the model is
  built without them, with one warning; speculative decoding with MTP then fails at
  start-up naming the missing layer. A partly stored MTP layer is still an error.
* Tensors config.json does not account for: one warning lists them, or with
  ``strict=True`` (``--strict-load``) they are an error. ``rotary_emb.inv_freq``
  buffers (derived, written by old exporters) are skipped silently.

A rank of a parallel instance passes ``select`` (``DeepseekV3ForCausalLM.checkpoint_filter``):
names it answers False for are never read, and a ``TensorSlice`` answer reads only
that slice of the tensor (safetensors reads lazily), so a rank reads its own TP
slices and its own experts and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from engine.checkpoint.fp8 import BLOCK, dequantize_block_fp8
from engine.checkpoint.schema import TensorSpec, checkpoint_schema, scale_inv_shape
from engine.model.config import ConfigError, ModelConfig

log = logging.getLogger("pdserve.checkpoint")

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(Exception):
    """A checkpoint pdserve cannot load; the message names the file and, where it applies, the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    """Elements ``[start, start + length)`` along ``dim`` of a stored tensor."""

    dim: int
    start: int
    length: int

    def index(self) -> tuple[slice, ...]:
        return (slice(None),) * self.dim + (slice(self.start, self.start + self.length),)

    def scale_slice(self, full: int) -> "TensorSlice | None":
        """The same rows of the 128x128 block scales, or None when the slice cuts through a block."""
        end = self.start + self.length
        if self.start % BLOCK or (end % BLOCK and end != full):
            return None
        return TensorSlice(self.dim, self.start // BLOCK, -(-end // BLOCK) - self.start // BLOCK)


Selection = Callable[[str], "bool | TensorSlice"]


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    file: str  # path of the safetensors file holding it
    dtype: str  # safetensors dtype name: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CheckpointIndex:
    """What a checkpoint directory stores, from the safetensors headers alone."""

    path: str
    source: str  # the file that lists the tensors: the index JSON, or model.safetensors
    files: tuple[str, ...]  # safetensors files, in shard order
    tensors: dict[str, StoredTensor]

    @property
    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def scale_name(weight_name: str) -> str:
    """``x.weight`` -> ``x.weight_scale_inv`` (DeepSeek's name for a weight's block scales)."""
    return weight_name + "_scale_inv"


def is_fp8_dtype(dtype: str) -> bool:
    return dtype.startswith("F8_")


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json; errors as CheckpointError."""
    path = os.fspath(path)
    _require_dir(path)
    try:
        return ModelConfig.from_dir(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _read_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) for every tensor of a safetensors file, reading only its header."""
    try:
        with safe_open(file, framework="pt") as f:
            return {
                name: (s.get_dtype(), tuple(s.get_shape()))
                for name in f.keys()
                for s in (f.get_slice(name),)
            }
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from e


def _read_weight_map(index_file: str) -> dict[str, str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: not readable JSON ({e})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: no 'weight_map' object of tensor name -> shard file")
    return weight_map


def read_index(path: str | os.PathLike) -> CheckpointIndex:
    """List the tensors of a checkpoint directory (names, dtypes, shapes, files) without reading their data."""
    path = os.fspath(path)
    _require_dir(path)
    index_file = os.path.join(path, INDEX_NAME)
    single_file = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(index_file):
        weight_map = _read_weight_map(index_file)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise CheckpointError(f"{index_file}: shard file {shard!r} is missing from {path}")
        headers = {shard: _read_header(os.path.join(path, shard)) for shard in shards}
        tensors = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{os.path.join(path, shard)}: does not hold tensor {name!r} "
                                      f"that {INDEX_NAME} places there")
            tensors[name] = StoredTensor(os.path.join(path, shard), *headers[shard][name])
        return CheckpointIndex(path, index_file, tuple(os.path.join(path, s) for s in shards), tensors)
    if os.path.isfile(single_file):
        tensors = {name: StoredTensor(single_file, *info) for name, info in _read_header(single_file).items()}
        return CheckpointIndex(path, single_file, (single_file,), tensors)
    raise CheckpointError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")


def _is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= cfg.num_hidden_layers


def _check_missing(index: CheckpointIndex, schema: dict[str, TensorSpec], cfg: ModelConfig) -> None:
    missing = [name for name in schema if name not in index.tensors]
    if not missing:
        return
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    hint = ""
    if all(_is_mtp_tensor(n, cfg) for n in missing):
        hint = (f"; config.json declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} "
                f"(load with include_mtp=False to skip the MTP layers)")
    raise CheckpointError(f"{index.source}: missing tensor {missing[0]!r}{more}{hint}")


# Buffers some exporters write that are derived from config.json, never weights.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def unused_tensors(index: CheckpointIndex, cfg: ModelConfig) -> list[str]:
    """Stored tensors that config.json does not account for (neither a schema tensor, MTP layers included,
    nor its FP8 ``weight_scale_inv``), in storage order; derived rotary buffers are not counted."""
    known = set(checkpoint_schema(cfg, include_mtp=True))
    known |= {scale_name(n) for n in known}
    return [n for n in index.tensors if n not in known and not n.endswith(_DERIVED_SUFFIXES)]


def _report_unused(index: CheckpointIndex, cfg: ModelConfig, strict: bool) -> None:
    unused = unused_tensors(index, cfg)
    if not unused:
        return
    listed = ", ".join(unused[:8]) + (f", ... ({len(unused) - 8} more)" if len(unused) > 8 else "")
    if strict:
        raise CheckpointError(f"{index.source}: {len(unused)} tensor(s) the model does not use: {listed} "
                              f"(strict load; drop strict_load / --strict-load to load without them)")
    log.warning("%s: ignoring %d tensor(s) the model does not use: %s", index.source, len(unused), listed)


def mtp_layers_to_load(index: CheckpointIndex, cfg: ModelConfig, required: bool = False) -> bool:
    """Whether to build and load the MTP layers config.json declares.

    True when the checkpoint stores them (a partly stored layer counts, so the loader then names its
    missing tensors). False when config.json declares none, or when the checkpoint stores none of their
    tensors: then one warning, unless ``required`` (MTP speculative decoding), where either case is a
    ``CheckpointError`` naming the missing layer.
    """
    if cfg.num_nextn_predict_layers == 0:
        if required:
            raise CheckpointError(f"{index.path}: speculative decoding with MTP needs an MTP layer, but config.json "
                                  f"declares num_nextn_predict_layers = 0")
        return False
    mtp = [n for n in checkpoint_schema(cfg, include_mtp=True) if _is_mtp_tensor(n, cfg)]
    if any(n in index.tensors for n in mtp):
        return True
    first = cfg.num_hidden_layers
    layers = ", ".join(f"model.layers.{first + k}" for k in range(cfg.num_nextn_predict_layers))
    what = (f"config.json declares num_nextn_predict_layers={cfg.num_nextn_predict_layers}, but {index.source} "
            f"stores no tensor of MTP layer {layers} (e.g. {mtp[0]!r}; transformers' save_pretrained drops it)")
    if required:
        raise CheckpointError(f"speculative decoding with MTP needs MTP layer {layers}: {what}; "
                              f"serve without speculative decoding or use a checkpoint that ships the layer")
    log.warning("%s: loading without MTP (no speculative decoding with MTP on this checkpoint)", what)
    return False


def _check_tensor(index: CheckpointIndex, name: str, spec: TensorSpec) -> None:
    stored = index.tensors[name]
    if stored.shape != spec.shape:
        raise CheckpointError(f"{stored.file}: tensor {name!r} has shape {list(stored.shape)}, "
                              f"expected {list(spec.shape)} from config.json")
    if not is_fp8_dtype(stored.dtype):
        return
    if len(spec.shape) != 2:
        raise CheckpointError(f"{stored.file}: tensor {name!r} is stored {stored.dtype}, "
                              f"but only 2-D weights can carry block scales")
    scale = index.tensors.get(scale_name(name))
    if scale is None:
        raise CheckpointError(f"{stored.file}: tensor {name!r} is stored {stored.dtype} "
                              f"without its block scales {scale_name(name)!r}")
    if scale.shape != scale_inv_shape(spec.shape):
        raise CheckpointError(f"{scale.file}: tensor {scale_name(name)!r} has shape {list(scale.shape)}, "
                              f"expected {list(scale_inv_shape(spec.shape))} for weight shape {list(spec.shape)}")


def check_checkpoint(index: CheckpointIndex, cfg: ModelConfig, include_mtp: bool = True,
                     strict: bool = False) -> dict[str, TensorSpec]:
    """Check the stored tensors against the schema of ``cfg``; returns that schema. Raises CheckpointError.

    Stored tensors config.json does not account for are logged once, or with ``strict`` raise.
    """
    schema = checkpoint_schema(cfg, include_mtp)
    _check_missing(index, schema, cfg)
    for name, spec in schema.items():
        _check_tensor(index, name, spec)
    _report_unused(index, cfg, strict)
    return schema


def _open(file: str):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from e


def _get(handle, file: str, name: str, part: TensorSlice | None = None) -> torch.Tensor:
    try:
        return handle.get_tensor(name) if part is None else handle.get_slice(name)[part.index()]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e


def _materialize(handle, index: CheckpointIndex, name: str, dtype: torch.dtype | None, keep_fp8: bool,
                 part: TensorSlice | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """One schema tensor (or its ``part``) from the open shard, cast to ``dtype`` (None: as stored); an FP8
    pair is dequantized, or with ``keep_fp8`` yielded raw: the e4m3 weight, then its fp32 ``weight_scale_inv``."""
    stored = index.tensors[name]
    if not is_fp8_dtype(stored.dtype):
        tensor = _get(handle, stored.file, name, part)
        yield name, tensor if dtype is None else tensor.to(dtype)
        return
    scale = index.tensors[scale_name(name)]
    scale_part = part.scale_slice(stored.shape[part.dim]) if part is not None else None
    whole_then_cut = part is not None and scale_part is None  # a slice through a 128-block: read whole, cut after
    tensor = _get(handle, stored.file, name, None if whole_then_cut else part)
    if scale.file == stored.file:
        scale_inv = _get(handle, scale.file, scale_name(name), scale_part)
    else:  # the scale landed in the next shard
        with _open(scale.file) as other:
            scale_inv = _get(other, scale.file, scale_name(name), scale_part)
    if keep_fp8:
        yield name, tensor
        yield scale_name(name), scale_inv.to(torch.float32)
        return
    tensor = dequantize_block_fp8(tensor, scale_inv, dtype or torch.float32)
    yield name, tensor[part.index()] if whole_then_cut else tensor


def iter_checkpoint_tensors(
    path: str | os.PathLike,
    cfg: ModelConfig,
    dtype: torch.dtype | None,
    include_mtp: bool = True,
    progress: bool = True,
    keep_fp8: bool = False,
    strict: bool = False,
    select: Selection | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of ``checkpoint_schema(cfg, include_mtp)``, shard by shard.

    Tensors come cast to ``dtype``; FP8 weights are dequantized block-wise (product in
    fp32, then cast). ``dtype=None`` keeps each tensor's stored dtype (FP8 weights come
    out float32). ``keep_fp8=True`` yields FP8 weights as stored instead, each followed by its
    fp32 ``<name>_scale_inv``. ``select(name)``: False skips the tensor unread, a
    ``TensorSlice`` yields only that slice (an FP8 pair: the weight's slice and the scales of
    its blocks), True the whole tensor. The whole checkpoint is validated before the first
    tensor is yielded (``strict``: stored tensors the model does not use are an error, not a warning).
    """
    index = read_index(path)
    schema = check_checkpoint(index, cfg, include_mtp, strict)
    by_file: dict[str, list[tuple[str, TensorSlice | None]]] = {f: [] for f in index.files}
    for name in schema:
        choice = True if select is None else select(name)
        if choice is not False:
            by_file[index.tensors[name].file].append((name, choice if isinstance(choice, TensorSlice) else None))
    total = sum(len(names) for names in by_file.values())
    with tqdm(total=total, desc="loading checkpoint", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for file, names in by_file.items():
            if not names:
                continue
            with _open(file) as handle:
                for name, part in names:
                    yield from _materialize(handle, index, name, dtype, keep_fp8, part)
                    bar.update(1)

"""Writing checkpoints in the Hugging Face layout.

One ``model.safetensors`` when everything fits in one shard; otherwise
``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``). Every
shard carries the metadata ``{"format": "pt"}`` that transformers expects.
Tensors may come as a dict or as a stream of ``(name, tensor)`` pairs; a stream
is written shard by shard, so memory holds at most one shard.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save_file

from engine.checkpoint.loader import INDEX_NAME, SINGLE_NAME, CheckpointError
from engine.model.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"
EMBED_NAME = "model.embed_tokens.weight"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shard_tensors: list[list[str]] = []  # names per flushed shard
        self.total_bytes = 0

    def _partial(self, i: int) -> str:
        return os.path.join(self.out_dir, f".model-{i + 1:05d}.safetensors.partial")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        # safetensors stores dense row-major data and refuses views that share memory.
        self.current[name] = tensor.detach().contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def abort(self) -> None:
        """Remove the shards written so far, including one interrupted mid-write."""
        for i in range(len(self.shard_tensors) + 1):
            if os.path.exists(self._partial(i)):
                os.remove(self._partial(i))

    def flush(self) -> None:
        if not self.current:
            return
        save_file(self.current, self._partial(len(self.shard_tensors)), metadata={"format": "pt"})
        self.shard_tensors.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        """Rename the shards to their final names, write the index when sharded; returns the shard file names."""
        self.flush()
        n = len(self.shard_tensors)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            final = os.path.join(self.out_dir, name)
            os.replace(self._partial(i), final)
            os.chmod(final, 0o644)  # safetensors creates owner-only files; servers may read as another user
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self.shard_tensors) for t in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        return names


def _refuse_existing(out_dir: str) -> None:
    existing = glob.glob(os.path.join(out_dir, "*.safetensors")) + glob.glob(os.path.join(out_dir, "config.json"))
    if existing:
        raise CheckpointError(f"{out_dir}: already holds a checkpoint ({os.path.basename(sorted(existing)[0])}); "
                              f"write into an empty directory")


def save_checkpoint(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``config.json`` (``cfg.to_hf_dict()``) and the tensors into ``out_dir``; returns the shard file names.

    Tensors are stored in their own dtype, in the order given. ``out_dir`` is created
    if needed and must not already hold a checkpoint.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _refuse_existing(out_dir)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    writer = _ShardWriter(out_dir, max_shard_bytes)
    dtypes: dict[str, torch.dtype] = {}
    try:
        for name, tensor in items:
            if name in dtypes:
                raise ValueError(f"tensor {name!r} given twice")
            dtypes[name] = tensor.dtype
            writer.add(name, tensor)
        if not dtypes:
            raise ValueError("no tensors to write")
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    hf = cfg.to_hf_dict()
    if EMBED_NAME in dtypes:  # the dtype transformers loads an unquantized model in
        hf["torch_dtype"] = str(dtypes[EMBED_NAME]).removeprefix("torch.")
    # config.json last: a directory with a config.json is a complete checkpoint.
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    return shards

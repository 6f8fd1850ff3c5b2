"""Random-weight checkpoints in the official layout, for tests and benchmarks.

``make_random_checkpoint(out_dir, preset)`` writes a complete Hugging Face
checkpoint directory: config.json, safetensors weights (optionally in
DeepSeek's FP8 layout) and a BPE tokenizer trained on the standard library.

Values are chosen so a forward pass stays well-conditioned and greedy decoding
is not degenerate: projections ~ N(0, 1/fan_in) (unit-variance outputs for
unit-variance inputs), embeddings ~ N(0, 1), norm weights 1 + N(0, 0.05^2),
router bias ~ N(0, 0.01^2). The MTP layer's ``embed_tokens`` and
``shared_head.head`` are copies of the main embedding and ``lm_head``, as in
DeepSeek-V3 (the MTP module shares them). Everything is drawn from one seeded
``torch.Generator`` in schema order, so a seed fixes every byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from engine.checkpoint.quantize import fp8_config, quantize_tensors
from engine.checkpoint.schema import TensorSpec, checkpoint_schema
from engine.checkpoint.tokenizer import BOS_ID, EOS_ID, default_corpus_files, train_bpe_tokenizer
from engine.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, save_checkpoint
from engine.model.config import ModelConfig

_V3_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "moe_layer_freq": 1,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The benchmark model of the issue: every DeepSeek-V3 feature at ~210M parameters.
    "bench": {
        **_V3_COMMON,
        "vocab_size": 16384,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": 32,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 256,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 4096,
    },
    # The smallest model that still has a dense layer, MoE layers with grouped routing,
    # a shared expert, q LoRA and an MTP layer.
    "tiny": {
        **_V3_COMMON,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "num_nextn_predict_layers": 1,
        "max_position_embeddings": 2048,
    },
}

# MTP tensors that are copies of main-model ones (DeepSeek-V3's MTP module shares them).
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
# Kept fp32 whatever the checkpoint dtype, as in DeepSeek-V3's release.
_FP32_SUFFIXES = ("e_score_correction_bias",)


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with config.json fields overridden (e.g. ``hidden_size=256``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict({**PRESETS[preset], **overrides}, source=f"preset {preset!r}")


def _draw(name: str, spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """A random fp32 tensor for one schema entry."""
    noise = torch.randn(spec.shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.01 * noise
    if len(spec.shape) == 1:  # RMSNorm weights
        return 1.0 + 0.05 * noise
    if name.endswith("embed_tokens.weight"):
        return noise
    return noise * spec.shape[1] ** -0.5  # [out, in] projection: std 1/sqrt(fan_in)


def _main_source(mtp_suffix: str, cfg: ModelConfig) -> str:
    """The main-model tensor an MTP layer's shared tensor copies."""
    if mtp_suffix == "embed_tokens.weight" or cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def random_tensors(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``checkpoint_schema(cfg)`` in schema order, random but fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    main: dict[str, torch.Tensor] = {}  # the main-model tensors MTP layers copy
    for name, spec in checkpoint_schema(cfg).items():
        suffix = name.split(".", 3)[-1]
        if name.startswith("model.layers.") and suffix in _MTP_SHARED:
            tensor = main[_main_source(suffix, cfg)].clone()
        else:
            target = torch.float32 if name.endswith(_FP32_SUFFIXES) else dtype
            tensor = _draw(name, spec, gen).to(target)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                main[name] = tensor
        yield name, tensor


def _train_tokenizer(cfg: ModelConfig, out_dir: str) -> None:
    # ~200 bytes of source per token learns the whole vocabulary in a few seconds.
    files = default_corpus_files(limit_bytes=max(200_000, 200 * cfg.vocab_size))
    train_bpe_tokenizer(files, cfg.vocab_size, out_dir, model_max_length=cfg.max_position_embeddings)


def make_random_checkpoint(
    out_dir: str | os.PathLike,
    preset: str,
    seed: int = 0,
    fp8: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    **overrides: Any,
) -> ModelConfig:
    """Write a random checkpoint of ``preset`` (config fields changed by ``overrides``) to ``out_dir``.

    ``fp8=True`` writes DeepSeek's FP8 layout, quantized from the ``dtype`` values, so it
    equals ``quantize_checkpoint_fp8`` applied to the same checkpoint written without it.
    Returns the config written.
    """
    out_dir = os.fspath(out_dir)
    cfg = preset_config(preset, **overrides)
    tensors = random_tensors(cfg, seed, dtype)
    if fp8:
        cfg = fp8_config(cfg)
        tensors = quantize_tensors(checkpoint_schema(cfg), tensors)
    save_checkpoint(out_dir, cfg, tensors, max_shard_bytes)
    _train_tokenizer(cfg, out_dir)
    return cfg

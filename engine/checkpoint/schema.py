"""The official DeepSeek checkpoint layout, as names and shapes.

``checkpoint_schema(cfg)`` is the single description of what a checkpoint for a
config holds: the loader validates against it, ``make-random`` writes it, the
FP8 quantizer walks it. MTP layer ``k`` sits at layer index
``num_hidden_layers + k`` with its own ``embed_tokens``/``shared_head`` copies,
as in DeepSeek-V3's published files.
"""

from __future__ import annotations

import dataclasses

from engine.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    # True for the 2-D projection weights that DeepSeek's FP8 checkpoints store as e4m3
    # with a ``weight_scale_inv`` beside them; embeddings, heads, norms and the router stay bf16.
    fp8: bool = False


def _linear(out_features: int, in_features: int) -> TensorSpec:
    return TensorSpec((out_features, in_features), fp8=True)


def _vec(n: int) -> TensorSpec:
    return TensorSpec((n,))


def layer_schema(cfg: ModelConfig, layer_idx: int) -> dict[str, TensorSpec]:
    """Tensors of one decoder block (main or MTP), names relative to ``model.layers.<i>.``."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    t: dict[str, TensorSpec] = {
        "input_layernorm.weight": _vec(h),
        "post_attention_layernorm.weight": _vec(h),
        "self_attn.kv_a_proj_with_mqa.weight": _linear(cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm.weight": _vec(cfg.kv_lora_rank),
        "self_attn.kv_b_proj.weight": _linear(nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attn.o_proj.weight": _linear(h, nh * cfg.v_head_dim),
    }
    if cfg.q_lora_rank:
        t["self_attn.q_a_proj.weight"] = _linear(cfg.q_lora_rank, h)
        t["self_attn.q_a_layernorm.weight"] = _vec(cfg.q_lora_rank)
        t["self_attn.q_b_proj.weight"] = _linear(nh * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        t["self_attn.q_proj.weight"] = _linear(nh * cfg.qk_head_dim, h)
    if cfg.is_moe_layer(layer_idx):
        mi = cfg.moe_intermediate_size
        t["mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, h))
        if cfg.topk_method == "noaux_tc":
            t["mlp.gate.e_score_correction_bias"] = _vec(cfg.n_routed_experts)
        for e in range(cfg.n_routed_experts):
            t[f"mlp.experts.{e}.gate_proj.weight"] = _linear(mi, h)
            t[f"mlp.experts.{e}.up_proj.weight"] = _linear(mi, h)
            t[f"mlp.experts.{e}.down_proj.weight"] = _linear(h, mi)
        if cfg.n_shared_experts:
            si = mi * cfg.n_shared_experts
            t["mlp.shared_experts.gate_proj.weight"] = _linear(si, h)
            t["mlp.shared_experts.up_proj.weight"] = _linear(si, h)
            t["mlp.shared_experts.down_proj.weight"] = _linear(h, si)
    else:
        t["mlp.gate_proj.weight"] = _linear(cfg.intermediate_size, h)
        t["mlp.up_proj.weight"] = _linear(cfg.intermediate_size, h)
        t["mlp.down_proj.weight"] = _linear(h, cfg.intermediate_size)
    return t


def mtp_extra_schema(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """The MTP-only tensors of an MTP layer, relative to ``model.layers.<L+k>.``."""
    h = cfg.hidden_size
    return {
        "embed_tokens.weight": TensorSpec((cfg.vocab_size, h)),
        "enorm.weight": _vec(h),
        "hnorm.weight": _vec(h),
        "eh_proj.weight": TensorSpec((h, 2 * h)),
        "shared_head.norm.weight": _vec(h),
        "shared_head.head.weight": TensorSpec((cfg.vocab_size, h)),
    }


def checkpoint_schema(cfg: ModelConfig, include_mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor name of a checkpoint in the official layout with its shape (without FP8 scales)."""
    h = cfg.hidden_size
    t: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": TensorSpec((cfg.vocab_size, h)),
        "model.norm.weight": _vec(h),
    }
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = TensorSpec((cfg.vocab_size, h))
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for name, spec in layer_schema(cfg, i).items():
            t[prefix + name] = spec
        if i >= cfg.num_hidden_layers:
            for name, spec in mtp_extra_schema(cfg).items():
                t[prefix + name] = spec
    return t


def scale_inv_shape(shape: tuple[int, ...], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a 2-D weight: one fp32 scale per 128x128 block (ceil)."""
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))

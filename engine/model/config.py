"""Model configuration read from a checkpoint's Hugging Face ``config.json``.

One dataclass covers the DeepSeek family (``DeepseekV3ForCausalLM``,
``DeepseekV2ForCausalLM`` and checkpoints of the same shape such as Kimi-K2).
Fields keep the Hugging Face names so a reader can hold ``config.json`` beside
this file. Both spellings of the rope configuration are accepted:
``rope_scaling`` (DeepSeek's own files, transformers 4.x) and
``rope_parameters`` (transformers 5.x).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


class ConfigError(ValueError):
    """A config.json that pdserve cannot serve; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None

    @property
    def attention_factor(self) -> float:
        """Scale applied to cos/sin (transformers' rule; 1.0 for DeepSeek-V3 where mscale == mscale_all_dim)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)
        return yarn_get_mscale(self.factor, 1.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    # mla
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # rope / yarn
    rope_theta: float
    yarn: YarnConfig | None
    rope_interleave: bool
    # moe
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str  # "noaux_tc" (V3) | "greedy" | "group_limited_greedy" (V2)
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # mtp
    num_nextn_predict_layers: int
    # quantization (None = plain weights)
    quantization: dict[str, Any] | None = None

    # ---- derived sizes -------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_width(self) -> int:
        """Width of one cached MLA row: the compressed latent plus the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_get_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE or dense MLP for a layer index; MTP layers (index >= num_hidden_layers) follow the same rule."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    # ---- construction --------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: not found (a checkpoint directory needs config.json)")
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file}: not readable JSON ({e})") from e
        return cls.from_dict(raw, source=file)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = raw.get("model_type")
            arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
                    "deepseek_v2": "DeepseekV2ForCausalLM"}.get(model_type)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"pdserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        is_v3 = arch == "DeepseekV3ForCausalLM"

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return raw[key]

        def get(key: str, default: Any) -> Any:
            value = raw.get(key)
            return default if value is None else value

        try:
            n_routed = int(get("n_routed_experts", 0))
            cfg = cls(
                architecture=arch,
                vocab_size=int(need("vocab_size")),
                hidden_size=int(need("hidden_size")),
                intermediate_size=int(need("intermediate_size")),
                num_hidden_layers=int(need("num_hidden_layers")),
                num_attention_heads=int(need("num_attention_heads")),
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                q_lora_rank=int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
                kv_lora_rank=int(need("kv_lora_rank")),
                qk_nope_head_dim=int(need("qk_nope_head_dim")),
                qk_rope_head_dim=int(need("qk_rope_head_dim")),
                v_head_dim=int(need("v_head_dim")),
                rope_theta=float(_rope_field(raw, "rope_theta", 10000.0)),
                yarn=_read_yarn(raw, source),
                # DeepSeek-V3 checkpoints rotate interleaved pairs (the reference's complex
                # multiply); transformers exposes the same choice as rope_interleave.
                rope_interleave=bool(get("rope_interleave", True)),
                n_routed_experts=n_routed,
                n_shared_experts=int(get("n_shared_experts", 0)),
                num_experts_per_tok=int(get("num_experts_per_tok", 1 if n_routed else 0)),
                moe_intermediate_size=int(get("moe_intermediate_size", 0)),
                first_k_dense_replace=int(get("first_k_dense_replace", 0)),
                moe_layer_freq=int(get("moe_layer_freq", 1)),
                scoring_func=str(get("scoring_func", "sigmoid" if is_v3 else "softmax")),
                topk_method=str(get("topk_method", "noaux_tc" if is_v3 else "greedy")),
                n_group=int(get("n_group", 1)),
                topk_group=int(get("topk_group", 1)),
                norm_topk_prob=bool(get("norm_topk_prob", is_v3)),
                routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
                num_nextn_predict_layers=int(get("num_nextn_predict_layers", 0)),
                quantization=raw.get("quantization_config"),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{source}: bad field value ({e})") from e
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config.json") -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad(f"scoring_func {self.scoring_func!r} is not one of 'sigmoid', 'softmax'")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            bad(f"topk_method {self.topk_method!r} is not one of 'noaux_tc', 'greedy', 'group_limited_greedy'")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                bad(f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                bad(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts")
        if self.quantization is not None:
            method = self.quantization.get("quant_method")
            if method != "fp8":
                bad(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
            if list(self.quantization.get("weight_block_size", [128, 128])) != [128, 128]:
                bad(f"weight_block_size {self.quantization.get('weight_block_size')} is not [128, 128]")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json pdserve writes (DeepSeek's own spelling: rope_scaling)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "deepseek_v3" if self.architecture == "DeepseekV3ForCausalLM" else "deepseek_v2",
        }
        for f in dataclasses.fields(self):
            if f.name in ("architecture", "yarn", "quantization"):
                continue
            d[f.name] = getattr(self, f.name)
        d["rope_scaling"] = None if self.yarn is None else {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self.yarn)}
        if self.quantization is not None:
            d["quantization_config"] = self.quantization
        d["hidden_act"] = "silu"
        d["num_key_value_heads"] = self.num_attention_heads
        d["attention_bias"] = False
        d["torch_dtype"] = "bfloat16"
        return d


def yarn_get_mscale(scale: float, mscale: float) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_field(raw: dict[str, Any], key: str, default: Any) -> Any:
    if raw.get(key) is not None:
        return raw[key]
    params = raw.get("rope_parameters") or {}
    return params.get(key, default)


def _read_yarn(raw: dict[str, Any], source: str) -> YarnConfig | None:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: rope_scaling must be a JSON object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (only 'yarn')")
    if rs.get("factor") is None:
        raise ConfigError(f"{source}: yarn rope scaling needs a 'factor'")
    orig = rs.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    return YarnConfig(
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(orig),
        beta_fast=float(rs.get("beta_fast") or 32.0),
        beta_slow=float(rs.get("beta_slow") or 1.0),
        mscale=float(rs["mscale"]) if rs.get("mscale") else None,
        mscale_all_dim=float(rs["mscale_all_dim"]) if rs.get("mscale_all_dim") else None,
    )

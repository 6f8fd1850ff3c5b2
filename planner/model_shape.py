"""The sizes the simulator needs from a DeepSeek-V3-architecture config.json.

Parameter counts per layer and per expert, the MLA latent width, how many layers are
dense or MoE. The config is read by ``engine.model.config.ModelConfig`` (torch-free),
so the planner accepts exactly the checkpoints the engine serves.
"""

from __future__ import annotations

import dataclasses
import os

from engine.model.config import ModelConfig

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEEPSEEK_V3 = os.path.join(DATA_DIR, "deepseek-v3")  # its config.json, written from the public release

BYTES = {"fp8": 1.0, "bfloat16": 2.0, "float32": 4.0}


def load_model_config(path: str) -> ModelConfig:
    """A checkpoint directory holding config.json, or that config.json itself."""
    if os.path.basename(path) == "config.json":
        path = os.path.dirname(path) or "."
    return ModelConfig.from_dir(path)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    cfg: ModelConfig

    @classmethod
    def load(cls, path: str) -> "ModelShape":
        return cls(load_model_config(path))

    # ---- attention (MLA) ------------------------------------------------------------
    @property
    def heads(self) -> int:
        return self.cfg.num_attention_heads

    @property
    def latent_width(self) -> int:
        """One cached row: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
        return self.cfg.kv_cache_width

    @property
    def q_a_params(self) -> int:  # replicated over TP (the down projection), 0 without q LoRA
        c = self.cfg
        return c.hidden_size * c.q_lora_rank if c.q_lora_rank else 0

    @property
    def q_b_params(self) -> int:  # split over TP (heads)
        c = self.cfg
        return (c.q_lora_rank or c.hidden_size) * c.num_attention_heads * c.qk_head_dim

    @property
    def kv_a_params(self) -> int:
        c = self.cfg
        return c.hidden_size * self.latent_width

    @property
    def kv_b_params(self) -> int:  # W_UK and W_UV, split over TP
        c = self.cfg
        return c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)

    @property
    def o_params(self) -> int:
        c = self.cfg
        return c.num_attention_heads * c.v_head_dim * c.hidden_size

    def attention_params(self, tp: int = 1) -> float:
        return self.q_a_params + self.kv_a_params + (self.q_b_params + self.kv_b_params + self.o_params) / tp

    def attn_flops_per_ctx(self, absorbed: bool) -> int:
        """Core-attention FLOPs of one query token per context token (all heads).

        Absorbed (decode, FlashMLA): scores over the 576-wide latent + output over the 512 latent.
        Naive (prefill): per-head K of nope+rope and V of v_head_dim.
        """
        c = self.cfg
        width = 2 * c.kv_lora_rank + c.qk_rope_head_dim if absorbed else c.qk_head_dim + c.v_head_dim
        return 2 * c.num_attention_heads * width

    # ---- MLP / MoE --------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.num_hidden_layers

    @property
    def n_moe_layers(self) -> int:
        return sum(self.cfg.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def n_mtp_layers(self) -> int:
        return self.cfg.num_nextn_predict_layers

    @property
    def experts(self) -> int:
        return self.cfg.n_routed_experts

    @property
    def top_k(self) -> int:
        return self.cfg.num_experts_per_tok

    @property
    def expert_params(self) -> int:  # gate + up + down of one routed expert
        c = self.cfg
        return 3 * c.hidden_size * c.moe_intermediate_size

    @property
    def shared_params(self) -> int:
        c = self.cfg
        return 3 * c.hidden_size * c.moe_intermediate_size * c.n_shared_experts

    @property
    def dense_mlp_params(self) -> int:
        c = self.cfg
        return 3 * c.hidden_size * c.intermediate_size

    @property
    def gate_params(self) -> int:
        return self.cfg.hidden_size * self.cfg.n_routed_experts

    @property
    def vocab_params(self) -> int:  # one of embedding / lm_head
        return self.cfg.vocab_size * self.cfg.hidden_size

    @property
    def mtp_proj_params(self) -> int:  # eh_proj: [embedding; hidden] -> hidden
        return 2 * self.cfg.hidden_size * self.cfg.hidden_size

    # ---- KV cache ---------------------------------------------------------------------
    def kv_bytes_per_token(self, kv_dtype: str, with_mtp: bool) -> float:
        """Latent cache bytes of one token over every layer (FP8: FlashMLA's 656-byte row layout)."""
        per_layer = 656.0 if kv_dtype == "fp8" else self.latent_width * BYTES[kv_dtype]
        return per_layer * (self.n_layers + (self.n_mtp_layers if with_mtp else 0))

    def describe(self) -> str:
        c = self.cfg
        active = (self.n_layers * self.attention_params() + self.n_dense_layers * self.dense_mlp_params
                  + self.n_moe_layers * (self.shared_params + self.top_k * self.expert_params))
        total = (self.n_layers * self.attention_params() + self.n_dense_layers * self.dense_mlp_params
                 + self.n_moe_layers * (self.shared_params + self.experts * self.expert_params))
        return (f"{c.architecture}: {self.n_layers} layers ({self.n_dense_layers} dense, {self.n_moe_layers} MoE), "
                f"{self.experts} routed experts top-{self.top_k}, hidden {c.hidden_size}, "
                f"{total / 1e9:.1f}B params in layers ({active / 1e9:.1f}B active), MLA latent {self.latent_width}, "
                f"MTP layers {self.n_mtp_layers}")

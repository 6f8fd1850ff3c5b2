"""The DeepSeek-V3 / V2 model, read top-down: MLA → MLP / MoE → decoder block → MTP → causal LM.

Tokens of a step arrive flat (``input_ids [T]``, ``positions [T]``); an
``AttentionMetadata`` says how they split into sequences and where their latent
rows live in the paged cache. ``forward`` returns the final hidden states
(after the last norm) ``[T, D]``; ``compute_logits`` turns selected rows into
fp32 logits. MTP layer ``k`` (checkpoint layer ``num_hidden_layers + k``)
predicts token t+2 from the main model's hidden state at t and the embedding
of token t+1:

    h' = block(eh_proj([enorm(emb(x_{t+1})); hnorm(h_t)]))   logits = head(norm(h'))

(the concatenation order is the one DeepSeek's checkpoints were trained with,
embedding first, as vLLM and SGLang load them).

Weights are loaded by checkpoint name with ``load_weights``: each parameter's
``shard_dim`` (see ``layers.py``) is the whole tensor-parallel plan.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import AttentionMetadata, MLAWeights, mla_attention
from engine.model.config import ModelConfig
from engine.model.fp8 import FP8
from engine.model.layers import (
    ColumnParallelLinear,
    ParallelGroup,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.model.moe import Experts, ExpertPlacement, Gate, MoEDispatcher
from engine.model.rope import RotaryEmbedding


class MLA(nn.Module):
    """Multi-head latent attention; heads split over the TP group."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype, tp: ParallelGroup,
                 fp8: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.rope = rope
        self.heads = tp.split(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        h, q_out = cfg.hidden_size, cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(h, cfg.q_lora_rank, dtype, fp8)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, q_out, dtype, tp, fp8)
        else:
            self.q_proj = ColumnParallelLinear(h, q_out, dtype, tp, fp8)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype, fp8)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = ColumnParallelLinear(
            cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype, tp, fp8)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.v_head_dim, h, dtype, tp, fp8)
        self.softmax_scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.heads, self.nope + self.rope_dim)  # [T, H, Dn+Dr]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, R]
        q_pe = self.rope(q_pe, positions)  # [T, H, Dr]
        k_pe = self.rope(k_pe, positions)  # [T, Dr]
        w = MLAWeights.from_kv_b_proj(self.kv_b_proj.dense_weight(x.dtype), self.heads, self.nope, self.v_dim, self.softmax_scale)
        out = mla_attention(q_nope, q_pe, latent, k_pe, w, meta, self.layer_idx)  # [T, H*Dv]
        return self.o_proj(out)


class MLP(nn.Module):
    """SiLU-gated MLP, intermediate dimension split over the TP group."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, tp: ParallelGroup, fp8: bool = False):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter, dtype, tp, fp8)
        self.up_proj = ColumnParallelLinear(hidden, inter, dtype, tp, fp8)
        self.down_proj = RowParallelLinear(inter, hidden, dtype, tp, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: ParallelGroup, ep: ParallelGroup, fp8: bool = False):
        super().__init__()
        self.gate = Gate(cfg)
        placement = ExpertPlacement.identity(cfg.n_routed_experts)
        self.dispatcher = MoEDispatcher(placement, ep)
        self.experts = Experts(len(placement.local_slots), cfg.hidden_size, cfg.moe_intermediate_size, dtype,
                               fp8)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, tp, fp8)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x)  # [T, k], [T, k]
        routed, handle = self.dispatcher.dispatch(x, topk_ids, topk_weights)
        out = self.dispatcher.combine(self.experts(routed, handle.counts), handle)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype,
                 tp: ParallelGroup, ep: ParallelGroup, fp8: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, layer_idx, rope, dtype, tp, fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MoE(cfg, dtype, tp, ep, fp8) if cfg.is_moe_layer(layer_idx) else MLP(
            cfg.hidden_size, cfg.intermediate_size, dtype, tp, fp8)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (checkpoint layer ``num_hidden_layers + k``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype,
                 tp: ParallelGroup, ep: ParallelGroup, fp8: bool = False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, dtype)
        self.block = DecoderLayer(cfg, layer_idx, rope, dtype, tp, ep, fp8)  # eh_proj stays unquantized, as stored
        self.shared_head = SharedHead(cfg, dtype, tp)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """next_ids [T] (token t+1), hidden [T, D] (main model at t) -> [T, D] MTP hidden (before its norm)."""
        e = self.enorm(self.embed_tokens(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))
        return self.block(x, positions, meta)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(h))  # [N, V] fp32


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, max_positions: int | None = None,
                 tp: ParallelGroup | None = None, ep: ParallelGroup | None = None, with_mtp: bool = True,
                 fp8: bool = False):
        """``fp8``: hold the projections the checkpoint stores in block FP8 as e4m3 + ``weight_scale_inv``
        (load with ``iter_checkpoint_tensors(..., keep_fp8=True)``); otherwise every weight is ``dtype``."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        tp = tp or ParallelGroup.single()
        ep = ep or ParallelGroup.single()
        self.tp = tp
        rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope, dtype, tp, ep, fp8) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, cfg.num_hidden_layers + k, rope, dtype, tp, ep, fp8) for k in range(n_mtp))

    @property
    def num_cache_layers(self) -> int:
        """Layers that keep a latent cache: the main ones, then the MTP ones."""
        return len(self.layers) + len(self.mtp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta)
            if meta.layer_done is not None:
                meta.layer_done(i)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, V] fp32

    def mtp_forward(self, k: int, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
        return self.mtp[k](next_ids, hidden, positions, meta)

    # ---- weights -----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (by checkpoint name) into parameters; returns the names loaded.

        Each tensor is cut along its parameter's ``shard_dim`` for this TP rank. Experts
        land in their stacked slot; tensors of layers this model does not have (MTP when
        built without it) are skipped.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = self._param_for(name, params)
            if target is None:
                continue
            param, index = target
            dst = param.data if index is None else param.data[index]
            shard_dim = getattr(param, "shard_dim", None)  # None for experts: EP places them whole
            if shard_dim is not None and self.tp.size > 1:
                tensor = tensor.narrow(shard_dim, self.tp.rank * dst.shape[shard_dim], dst.shape[shard_dim])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit parameter {tuple(dst.shape)}")
            if (dst.dtype == FP8) != (tensor.dtype == FP8):
                raise ValueError(f"{name}: checkpoint dtype {tensor.dtype} does not fit parameter dtype {dst.dtype} "
                                 f"(FP8 parameters take the raw FP8 checkpoint tensors: keep_fp8=True)")
            dst.copy_(tensor)
            loaded.add(name)
        return loaded

    _EXPERT = re.compile(r"(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")

    def _param_for(self, name: str, params: dict[str, nn.Parameter]):
        """Checkpoint name -> (parameter, index into it or None), or None when not held here."""
        local = self._local_name(name)
        if local is None:
            return None
        m = self._EXPERT.match(local)
        if m:
            prefix, e, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            suffix = "" if kind == "weight" else "_scale_inv"
            if proj == "down_proj":
                return params[prefix + ".mlp.experts.w2" + suffix], e
            w13 = params[prefix + ".mlp.experts.w13" + suffix]
            half = w13.shape[1] // 2  # gate rows (or gate scale blocks), then up's
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            return w13, (e, rows)
        return (params[local], None) if local in params else None

    def _local_name(self, name: str) -> str | None:
        if name == "lm_head.weight":
            return name
        if not name.startswith("model."):
            return None
        rest = name[len("model."):]
        m = re.match(r"layers\.(\d+)\.(.*)", rest)
        if not m:
            return rest
        i, tail = int(m.group(1)), m.group(2)
        if i < len(self.layers):
            return f"layers.{i}.{tail}"
        k = i - len(self.layers)
        if k >= len(self.mtp):
            return None
        if tail.split(".")[0] in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head"):
            return f"mtp.{k}.{tail}"
        return f"mtp.{k}.block.{tail}"

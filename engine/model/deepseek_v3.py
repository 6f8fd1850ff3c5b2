"""The DeepSeek-V3 / V2 model, read top-down: MLA → dense MLP / MoE → decoder block → MTP → causal LM.

Tokens of a step arrive flat (``input_ids [T]``, ``positions [T]``); an
``AttentionMetadata`` says how they split into sequences and where their latent
rows live in the paged cache. ``forward`` returns the final hidden states
(after the last norm) ``[T, D]``; ``compute_logits`` turns selected rows into
fp32 logits over the full vocabulary. MTP layer ``k`` (checkpoint layer
``num_hidden_layers + k``) predicts token t+2 from the main model's hidden
state at t and the embedding of token t+1:

    h' = block(eh_proj([enorm(emb(x_{t+1})); hnorm(h_t)]))   logits = head(norm(h'))

(the concatenation order is the one DeepSeek's checkpoints were trained with,
embedding first, as vLLM and SGLang load them).

**Parallel instances** (``engine/model/parallel.py``): every rank of an instance
builds this model from its ``ParallelContext`` and, each step, calls
``forward`` / ``mtp_forward`` with its DP replica's inputs (the same on every TP
rank of the replica); ``forward`` returns ``[T, D]`` and ``compute_logits`` the
full-vocabulary logits on *every* TP rank of the replica (the vocabulary-parallel
head all-gathers). Heads are split over the TP group, the latent is not (every TP
rank writes the whole latent rows of its replica's tokens to its own cache); the
token split around the norms and the MoE is ``engine/model/token_split.py``.
With ``ep > 1`` every rank must make the same sequence of passes per step (the
main pass, then the same number of MTP passes): a replica without tokens for a
pass calls ``dummy_forward`` / ``dummy_mtp_forward``, which join each MoE
layer's all-to-alls with zero tokens.

Weights are loaded by checkpoint name with ``load_weights``; ``checkpoint_filter``
says which names this rank needs (its experts' slots only) so the loader never
reads the rest. Each parameter's ``shard_dim`` (see ``layers.py``) is the whole
tensor-parallel plan.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

import torch
from torch import nn

from engine.checkpoint.loader import TensorSlice
from engine.model.attention import AttentionMetadata, HeadKernel, MLAWeights, mla_attention, store_rows
from engine.model.config import ModelConfig
from engine.model.fp8 import FP8
from engine.model.layers import (
    MLP,
    ColumnParallelLinear,
    Kernel,
    ParallelGroup,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    _Linear,
    kernel_copy,
    kernel_fits,
    linear_kernel_weight,
    pack_weight,
)
from engine.model.moe import Experts, Gate, MoE
from engine.model.parallel import ParallelContext
from engine.model.rope import RotaryEmbedding
from engine.model.token_split import TokenSplit

log = logging.getLogger(__name__)


class MLA(nn.Module):
    """Multi-head latent attention; heads split over the TP group, the latent replicated.

    Returns o_proj's partial sums ``[T, D]`` (the caller reduces them over the TP group).
    """

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
        self.kernel: HeadKernel | None = None  # use_cpu_kernel(): the absorbed products of few rows per head
        # its copy of W_UK, [H, R, Dn] (layers.kernel_copy: bf16 when exact), and W_UV as it reads it, [H, Dv, R]
        # (likewise); with the AVX512-BF16 products both in cpu_gemm.pair_layout
        self.w_uk_t: torch.Tensor | None = None
        self.w_uv_kernel: torch.Tensor | None = None
        self.decode_attention = None  # and the same module's decode attention (cpu_gemm.mla_decode)
        self.prefill_attention = None  # and its prefill attention (cpu_gemm.mla_prefill), where it fits
        self._weights: tuple[tuple, MLAWeights] | None = None  # mla_weights(): what it was built from, and it

    def use_cpu_kernel(self, kernel: Kernel | None) -> bool:
        """Where ``kernel`` (``cpu_gemm.grouped_gemm``) is given, run the absorbed ``q · W_UK`` and ``o · W_UV``
        of decode-sized batches through the same module's ``head_gemm`` and decode attention over an fp32 or bf16 cache
        through its ``mla_decode`` (``None``: drop them and the copies of W_UK and W_UV); whether it applies
        (fp32 or bf16 weights on the CPU; in bf16 for decode batches of at most ``KERNEL_MAX_ROWS`` queries,
        computed in fp32). With any ``kernel`` the naive prefill pass's attention runs through its ``mla_prefill``
        where that fits (``cpu_gemm.prefill_fits``)."""
        from engine.kernels import cpu_gemm

        w = self.kv_b_proj
        self.prefill_attention = None if kernel is None else cpu_gemm.mla_prefill  # reads the expanded K and V
        if kernel is None or w.fp8 or not kernel_fits(w.weight) or self.nope % 8 or self.kv_lora_rank % 16 \
                or self.rope_dim % 8:
            self.kernel = self.w_uk_t = self.w_uv_kernel = self.decode_attention = None
            return False
        self.kernel = cpu_gemm.head_gemm
        uk_t = MLAWeights.kernel_layout(w.weight, self.heads, self.nope, self.v_dim)  # [H, R, Dn]
        uv = w.weight.view(self.heads, self.nope + self.v_dim, -1)[:, self.nope:]  # [H, Dv, R]
        if w.weight.dtype == torch.float32 and cpu_gemm.col_fits(uk_t) and cpu_gemm.col_fits(uv):
            # an fp32 model while the kernel's column tiles are on: both in them (cpu_gemm.cpp), bf16 where exact
            self.w_uk_t, self.w_uv_kernel = kernel_copy(cpu_gemm.col_layout(uk_t)), kernel_copy(cpu_gemm.col_layout(uv))
        else:
            self.w_uk_t, self.w_uv_kernel = kernel_copy(uk_t), kernel_copy(uv)
        if (w.weight.dtype == torch.bfloat16 and cpu_gemm.bf16_dot() and cpu_gemm.pair_fits(self.w_uk_t)
                and cpu_gemm.pair_fits(self.w_uv_kernel)):
            # a bf16 model with the AVX512-BF16 products: both in the layout those read fastest (cpu_gemm.cpp)
            self.w_uk_t, self.w_uv_kernel = cpu_gemm.pair_layout(self.w_uk_t), cpu_gemm.pair_layout(self.w_uv_kernel)
        self.decode_attention = cpu_gemm.mla_decode
        return True

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.heads, self.nope + self.rope_dim)  # [T, H, Dn+Dr]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self._latent(x)
        # the queries' heads and the shared key rotate in one call (elementwise: the same numbers as two)
        pe = self.rope(torch.cat([q_pe, k_pe[:, None]], dim=1), positions)  # [T, H+1, Dr]
        q_pe, k_pe = pe[:, :-1], pe[:, -1]  # [T, H, Dr], [T, Dr]
        out = mla_attention(q_nope, q_pe, latent, k_pe, self.mla_weights(x.dtype), meta, self.layer_idx)  # [T, H*Dv]
        return self.o_proj(out)

    def _latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> the normed latent [T, R] and the rope key before rotation [T, Dr]."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_pe

    def write_kv(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Only the cache rows of ``x``'s tokens, as ``forward`` writes them: no queries, no output."""
        latent, k_pe = self._latent(x)
        store_rows(latent, self.rope(k_pe[:, None], positions)[:, 0], meta, self.layer_idx)

    def mla_weights(self, dtype: torch.dtype) -> MLAWeights:
        """The attention's view of ``kv_b_proj`` and of the kernel's copies, built again only when one of them
        (or the weight's storage) changed; an FP8 ``kv_b_proj`` is dequantized on every call, as a kept dense
        copy would hold that layer's largest weight twice."""
        proj = self.kv_b_proj
        key = (proj.weight.data_ptr(), dtype, proj.packed, self.kernel, self.w_uk_t, self.decode_attention,
               self.w_uv_kernel, self.prefill_attention)
        if self._weights is not None:
            held, w = self._weights
            if key[0] == held[0] and all(a is b for a, b in zip(key[1:], held[1:])):
                return w
        w = MLAWeights.from_kv_b_proj(proj.dense_weight(dtype), self.heads, self.nope, self.v_dim, self.softmax_scale,
                                      self.kernel, self.w_uk_t, self.decode_attention, self.w_uv_kernel, proj.packed,
                                      self.prefill_attention)
        self._weights = None if proj.fp8 else (key, w)
        return w


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype,
                 parallel: ParallelContext, fp8: bool = False):
        super().__init__()
        self.tp = parallel.tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, layer_idx, rope, dtype, parallel.tp, fp8)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = (MoE(cfg, dtype, parallel.ep, parallel.layout.num_redundant_experts, fp8) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, parallel.tp, fp8))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                tokens: TokenSplit | None = None) -> torch.Tensor:
        """x: the residual stream in ``tokens``' layout (without ``tokens``: ``[T, D]``, replicated)."""
        tokens = tokens or TokenSplit(self.tp, False, x.shape[0])
        h = tokens.gather(self.input_layernorm(x))  # [T, D]
        x = x + tokens.reduce(self.self_attn(h, positions, meta))
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            return x + self.mlp(h, tokens)
        return x + tokens.reduce(self.mlp(tokens.gather(h)))

    def write_kv(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, tokens: TokenSplit) -> None:
        """Only the attention's cache rows of ``x``'s tokens (residual layout): what ``forward`` writes."""
        self.self_attn.write_kv(tokens.gather(self.input_layernorm(x)), positions, meta)


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: ParallelGroup):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, tp)


class MTPLayer(nn.Module):
    """One multi-token-prediction module (checkpoint layer ``num_hidden_layers + k``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding, dtype: torch.dtype,
                 parallel: ParallelContext, fp8: bool = False):
        super().__init__()
        self.parallel = parallel
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, parallel.tp)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, dtype)  # unquantized, as stored
        self.block = DecoderLayer(cfg, layer_idx, rope, dtype, parallel, fp8)
        self.shared_head = SharedHead(cfg, dtype, parallel.tp)

    def forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, out_rows: torch.Tensor | None = None,
                out_meta: AttentionMetadata | None = None) -> torch.Tensor:
        """next_ids [T] (token t+1), hidden [T, D] (main model at t) -> [T, D] MTP hidden (before its norm).

        With ``out_rows`` [B] (and ``out_meta``, a step of those rows' tokens alone): every token's cache
        rows are written, but the block runs on those rows only, returning [B, D] -- the drafts read the
        last position of each sequence, and the other rows' queries, attention and MoE would be thrown away."""
        tokens = self.parallel.split(next_ids.shape[0])
        e = self.enorm(tokens.reduce(self.embed_tokens(next_ids)))  # residual layout
        x = self.eh_proj(torch.cat([e, self.hnorm(tokens.scatter(hidden))], dim=-1))
        if out_rows is not None:
            self.block.write_kv(x, positions, meta, tokens)
            if not out_rows.numel() and self.parallel.is_single:  # no row read, and no peer joins its collectives
                return x.new_empty(0, x.shape[-1])
            x, positions, meta = tokens.gather(x)[out_rows], positions[out_rows], out_meta
            tokens = self.parallel.split(x.shape[0])
            x = tokens.scatter(x)
        return tokens.gather(self.block(x, positions, meta, tokens))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(h))  # [N, V] fp32

    def draft(self, h: torch.Tensor) -> torch.Tensor:
        """``logits(h).argmax(-1)`` [N]: the greedy draft tokens, without the logits where the kernel runs the head."""
        return self.shared_head.head.argmax(self.shared_head.norm(h))


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, max_positions: int | None = None,
                 parallel: ParallelContext | None = None, with_mtp: bool = True, fp8: bool = False):
        """``parallel``: this rank's place in its instance (``init_parallel``); None = one rank.
        ``fp8``: hold the projections the checkpoint stores in block FP8 as e4m3 + ``weight_scale_inv``
        (load with ``iter_checkpoint_tensors(..., keep_fp8=True)``); otherwise every weight is ``dtype``."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        parallel = parallel or ParallelContext.single()
        parallel.layout.check_model(cfg)
        self.parallel = parallel
        self.tp = parallel.tp
        rope = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, parallel.tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rope, dtype, parallel, fp8) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, parallel.tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(
            MTPLayer(cfg, cfg.num_hidden_layers + k, rope, dtype, parallel, fp8) for k in range(n_mtp))
        self._ep_dispatchers = [m.dispatcher for m in self.moe_layers().values()] if parallel.ep.size > 1 else []

    @property
    def num_cache_layers(self) -> int:
        """Layers that keep a latent cache: the main ones, then the MTP ones."""
        return len(self.layers) + len(self.mtp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, D] (on every TP rank)."""
        tokens = self.parallel.split(input_ids.shape[0])
        x = tokens.reduce(self.embed_tokens(input_ids))  # residual layout
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta, tokens)
            if meta.layer_done is not None:
                meta.layer_done(i)
        return tokens.gather(self.norm(x))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] (the same rows on every TP rank) -> [N, V] fp32 logits on every TP rank."""
        return self.lm_head(hidden)

    def mtp_forward(self, k: int, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata, out_rows: torch.Tensor | None = None,
                    out_meta: AttentionMetadata | None = None) -> torch.Tensor:
        return self.mtp[k](next_ids, hidden, positions, meta, out_rows, out_meta)

    # ---- idle DP replicas ----------------------------------------------------------
    def _empty_step(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        device = self.embed_tokens.weight.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, AttentionMetadata.no_cache([])

    def dummy_forward(self) -> None:
        """A main pass with zero tokens: joins every MoE layer's collectives, touches no cache."""
        ids, pos, meta = self._empty_step()
        self.forward(ids, pos, meta)

    def dummy_mtp_forward(self, k: int = 0) -> None:
        """An MTP pass of layer ``k`` with zero tokens."""
        ids, pos, meta = self._empty_step()
        self.mtp_forward(k, ids, torch.zeros(0, self.cfg.hidden_size, dtype=self.dtype, device=ids.device), pos, meta)

    def set_ep_max_tokens(self, tokens: int | None) -> None:
        """The step's agreed bound on any EP rank's tokens per pass (``StepInput.ep_max_tokens``)."""
        for dispatcher in self._ep_dispatchers:
            dispatcher.max_tokens = tokens

    # ---- experts: placement and load ---------------------------------------------------
    def moe_layers(self) -> dict[int, MoE]:
        """Checkpoint layer index -> its MoE (main layers, then MTP layers)."""
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return {i: b.mlp for i, b in enumerate(blocks) if b.is_moe}

    def read_expert_load(self, reset: bool = True) -> dict:
        """Checkpoint layer index -> ``ExpertLoad`` of this rank's tokens (reset after reading)."""
        return {i: moe.read_expert_load(reset) for i, moe in self.moe_layers().items()}

    # ---- weights -----------------------------------------------------------------
    def share_mtp_vocab(self) -> int:
        """After loading: each MTP layer's token embedding and output head become the main model's modules
        where they hold the same values (DeepSeek-V3's checkpoints store copies of the main ones: its MTP
        modules share them, as SGLang's and vLLM's MTP drafters do), with the copies the kernels read.
        Returns the bytes freed (DeepSeek-V3 in bf16: 3.7 GB on one rank). Per TP rank, its own cut."""
        freed = 0
        for m in self.mtp:
            for owner, attr, main in ((m, "embed_tokens", self.embed_tokens), (m.shared_head, "head", self.lm_head)):
                own = getattr(owner, attr)
                if own is not main and own.weight.shape == main.weight.shape \
                        and own.weight.dtype == main.weight.dtype and torch.equal(own.weight, main.weight):
                    setattr(owner, attr, main)
                    freed += own.weight.numel() * own.weight.element_size()
        return freed

    def checkpoint_filter(self) -> Callable[[str], "bool | TensorSlice"]:
        """For the loader's ``select``: per checkpoint name, False when this rank holds none of it (other
        ranks' experts), its TP slice when the parameter is cut, else True."""
        params = dict(self.named_parameters())

        def select(name: str) -> "bool | TensorSlice":
            targets = self._targets(name, params)
            if not targets:
                return False
            param, index = targets[0]
            if index is None and getattr(param, "num_shards", 1) > 1:
                part = param.shape[param.shard_dim]
                return TensorSlice(param.shard_dim, param.shard_rank * part, part)
            return True

        return select

    def pack_weights(self) -> int:
        """Hold oneDNN-prepacked copies of the projections and heads that run as matmuls (CPU, fp32 or fast bf16:
        ``layers.pack_weight``) and of fp32 routed experts (``Experts.pack``) beside the weights; returns the
        bytes they take (0 where none applies). ``kv_b_proj``'s serves the naive prefill pass, which expands a
        context's latent through it in one matmul."""
        total = 0
        for m in self.modules():
            if isinstance(m, (_Linear, ParallelLMHead)) and not getattr(m, "fp8", False):
                m.packed = pack_weight(m.weight)
                if m.packed is not None:
                    total += m.weight.numel() * m.weight.element_size()
            elif isinstance(m, Experts):
                total += m.pack()
        return total

    def use_cpu_kernels(self) -> bool:
        """Run the matmuls of decode-sized batches through pdserve's CPU kernel (engine/kernels/cpu_gemm.py)
        where it applies -- projections, heads, router, the absorbed attention products, routed experts
        with fp32 or bf16 weights (bf16: in fp32 arithmetic; projections and heads only where too small to
        prepack) on a CPU with AVX2 + FMA whose kernel built; whether any do. Only when some weight
        fits is the kernel loaded (built once; a reason logged if it cannot be)."""
        from engine.kernels import cpu_gemm

        linears = [m for m in self.modules() if isinstance(m, (_Linear, ParallelLMHead, Gate))
                   and not getattr(m, "fp8", False) and kernel_fits(m.weight)]
        experts = [m for m in self.modules() if isinstance(m, Experts)]
        attention = [m for m in self.modules() if isinstance(m, MLA)]
        fits = bool(linears) or any(m.kernel_fits for m in experts)  # attention's kv_b_proj is one of the linears
        kernel = cpu_gemm.kernel() if fits else None
        # kv_b_proj never runs through the kernel as a linear: MLA keeps its own copies of W_UK and W_UV
        per_head = {id(m.kv_b_proj) for m in attention}
        for m in linears:
            m.kernel = kernel
            m.kernel_weight = linear_kernel_weight(m.weight) if kernel is not None and id(m) not in per_head else None
        for m in experts + attention:
            m.use_cpu_kernel(kernel)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.kernel = cpu_gemm.rms_norm if kernel is not None else None
            elif isinstance(m, RotaryEmbedding):
                m.kernel = cpu_gemm.rope if kernel is not None else None
            elif isinstance(m, Gate):
                m.use_cpu_route(kernel is not None)
        # bf16 copies of an fp32 model's bf16-valued weights (a bf16 model's are its own weights, or layouts)
        copies = sum(t.numel() * t.element_size() for t in self.kernel_weights()
                     if t.dtype == torch.bfloat16) if self.dtype == torch.float32 else 0
        if copies:
            log.info("the CPU kernel reads %.1f MiB of weights as bf16 copies: the checkpoint's values are bf16, "
                     "so its fp32 products are the same, from half the bytes", copies / 2**20)
        tiles = sum(t.numel() * t.element_size() for t in self.kernel_weights()
                    if t.dtype == torch.float32 and t.dim() == 4)
        if tiles:
            log.info("the CPU kernel holds %.1f MiB of fp32 weights in column tiles beside them", tiles / 2**20)
        return kernel is not None

    def kernel_weights(self):
        """Every weight the CPU kernel reads (``layers.kernel_copy``: bf16 copies or the weights themselves)."""
        for m in self.modules():
            if isinstance(m, (_Linear, ParallelLMHead, Gate)) and m.kernel_weight is not None:
                yield m.kernel_weight
            elif isinstance(m, Experts) and m.w13_kernel is not None:
                yield from (m.w13_kernel, m.w2_kernel)
            elif isinstance(m, MLA) and m.w_uk_t is not None:
                yield from (m.w_uk_t, m.w_uv_kernel)

    def _drop_weight_copies(self) -> None:
        """Forget the prepacked weights and the CPU kernel's copies (stale once weights change)."""
        for m in self.modules():
            if isinstance(m, (_Linear, ParallelLMHead, Experts)):
                m.packed = None
            if isinstance(m, (_Linear, ParallelLMHead, Gate)):
                m.kernel_weight = None  # the kernel, if on, reads the weight itself
            elif isinstance(m, Experts) and m.kernel is not None:
                m.w13_kernel, m.w2_kernel = m.w13.detach(), m.w2.detach()
            elif isinstance(m, MLA):
                m.use_cpu_kernel(None)
                m._weights = None  # its contiguous copies of W_UK / W_UV (MLAWeights) are built again

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (by checkpoint name) into parameters; returns the names loaded.

        A tensor comes whole or already cut to this rank's slice; a whole one is cut along its
        parameter's ``shard_dim`` for this TP rank. An expert's tensors fill every local slot
        that holds it; tensors this rank does not hold (other ranks' experts, MTP layers when
        built without them) are skipped.
        """
        self._drop_weight_copies()  # they would go stale; pack_weights() / use_cpu_kernels() again after loading
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for param, index in self._targets(name, params):
                dst = param.data if index is None else param.data[index]
                shards = getattr(param, "num_shards", 1)
                if shards > 1 and tensor.shape[param.shard_dim] == dst.shape[param.shard_dim] * shards:
                    part = dst.shape[param.shard_dim]
                    tensor = tensor.narrow(param.shard_dim, param.shard_rank * part, part)
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit parameter "
                                     f"{tuple(dst.shape)}")
                if (dst.dtype == FP8) != (tensor.dtype == FP8):
                    raise ValueError(f"{name}: checkpoint dtype {tensor.dtype} does not fit parameter dtype "
                                     f"{dst.dtype} (FP8 parameters take the raw FP8 checkpoint tensors: keep_fp8=True)")
                dst.copy_(tensor)
                loaded.add(name)
        return loaded

    _EXPERT = re.compile(r"(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")

    def _param_for(self, name: str, params: dict[str, nn.Parameter]):
        """Checkpoint name -> (parameter, index into it or None) of its first home here, or None."""
        targets = self._targets(name, params)
        return targets[0] if targets else None

    def _targets(self, name: str, params: dict[str, nn.Parameter]) -> list[tuple[nn.Parameter, object]]:
        """Checkpoint name -> every (parameter, index or None) it is copied into on this rank."""
        local = self._local_name(name)
        if local is None:
            return []
        m = self._EXPERT.match(local)
        if m:
            prefix, e, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            slots = [j for j, log in enumerate(self.get_submodule(prefix + ".mlp").placement.local_logical) if log == e]
            suffix = "" if kind == "weight" else "_scale_inv"
            if proj == "down_proj":
                return [(params[prefix + ".mlp.experts.w2" + suffix], j) for j in slots]
            w13 = params[prefix + ".mlp.experts.w13" + suffix]
            half = w13.shape[1] // 2  # gate rows (or gate scale blocks), then up's
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            return [(w13, (j, rows)) for j in slots]
        return [(params[local], None)] if local in params else []

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

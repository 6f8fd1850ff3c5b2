"""MLA attention math over the paged latent cache.

Only the latent is cached: one row per token per layer, ``[kv_lora_rank |
qk_rope_head_dim]`` (normed compressed KV, then the rotated rope key). A layer's
cache is ``[num_blocks, block_size, width]``; a token's *slot* is
``block * block_size + offset``.

Two computations, proven equal in the tests:

* **naive** — expand the context's latent through ``kv_b_proj`` into per-head
  K and V, then ordinary attention. Cheapest when many queries share a context
  (prefill).
* **absorbed** — fold ``W_UK`` into the query (``q_nope · W_UK`` lives in the
  latent space) and ``W_UV`` into the output, so attention reads only the
  cached latent rows. What decode runs: per step it touches
  ``context × (kv_lora_rank + rope)`` numbers instead of
  ``context × heads × (nope + rope + v)``.

Tokens of a step are laid out flat, sequence after sequence. ``AttentionMetadata``
(built once per step, shared by every layer) says which tokens belong to which
sequence, where their rows go, and which rows each sequence attends to.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from engine.kernels import cpu_gemm
from engine.model.kv_cache_fp8 import read_rows, write_rows
from engine.model.layers import KERNEL_MAX_ROWS, linear


# x [M, H, K], w [H, N, K], out [M, H, N] or None -> x[m, h] @ w[h].T per head (``cpu_gemm.head_gemm``)
HeadKernel = Callable[..., torch.Tensor]

# Sequences with at most this many new tokens (decode, speculative verify) share one batched
# absorbed pass; longer ones (prefill chunks) run one by one, naive by default.
MAX_BATCHED_QUERY = 8


@dataclasses.dataclass
class SeqSpan:
    """One sequence of a step with more than one new token (or any sequence without a cache)."""

    q_start: int
    q_end: int
    context_slots: torch.Tensor | None  # [context length] cache rows; None = the new tokens are the whole context


@dataclasses.dataclass
class DecodeBatch:
    """Sequences with a few new tokens (a decode token, or one plus its speculative drafts),
    attended in one batched absorbed pass.

    The real queries, flat (M of them): their step positions, their sequence (row of ``slots``) and how many
    of its rows they attend (causal: a prefix) -- what the CPU kernel's decode attention reads. torch's
    batched pass reads them padded to ``Qmax`` per sequence instead (``token_index``, ``query_valid``,
    ``key_mask``): built on first use, since a step the kernel attends never needs them."""

    slots: torch.Tensor  # [Bd, Lmax] cache rows of each context, padded
    tokens: torch.Tensor  # [M]
    query_seq: torch.Tensor  # [M]
    query_keys: torch.Tensor  # [M]
    every_token: bool  # ``tokens`` is every token of the step, in order (a decode-only step)
    query_lens: list[int]  # per sequence, with ``context_lens`` and ``starts`` (its first step row) what the
    context_lens: list[int]  # padded views are built from
    starts: list[int]
    _padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _pad(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._padded is None:
            qd, cd, device = self.query_lens, self.context_lens, self.slots.device
            qmax = max(qd)
            # padding repeats a sequence's last query (its token, its position), so its mask is that query's
            last = [[min(j, q - 1) for j in range(qmax)] for q in qd]
            token_index = torch.tensor([[s + j for j in row] for s, row in zip(self.starts, last)])
            q_pos = torch.tensor([[c - q + j for j in row] for q, c, row in zip(qd, cd, last)])
            key_mask = torch.arange(self.slots.shape[1])[None, None, :] <= q_pos[:, :, None]  # causal, in context
            query_valid = torch.tensor([[j < q for j in range(qmax)] for q in qd])
            self._padded = token_index.to(device), query_valid.to(device), key_mask.to(device)
        return self._padded

    @property
    def token_index(self) -> torch.Tensor:
        """[Bd, Qmax] flat-step positions of each sequence's queries (padding repeats the last)."""
        return self._pad()[0]

    @property
    def query_valid(self) -> torch.Tensor:
        """[Bd, Qmax] True for real queries."""
        return self._pad()[1]

    @property
    def key_mask(self) -> torch.Tensor:
        """[Bd, Qmax, Lmax] True where the query may attend the row (causal, in context)."""
        return self._pad()[2]


@dataclasses.dataclass
class AttentionMetadata:
    num_tokens: int
    spans: list[SeqSpan]
    decode: DecodeBatch | None
    slot_mapping: torch.Tensor | None  # [T] rows the step's new tokens are written to; None = no cache
    kv_caches: list[torch.Tensor] | None  # per layer index (MTP layers after the main ones)
    prefill_mode: str = "naive"  # "naive" | "absorbed"
    # called with a cache layer's index once the model is done with that layer (KV streaming)
    layer_done: Callable[[int], None] | None = None

    @classmethod
    def no_cache(cls, seq_lens: list[int], prefill_mode: str = "naive") -> "AttentionMetadata":
        """Whole sequences, attended causally among themselves, nothing cached (reference runs, training)."""
        spans, start = [], 0
        for n in seq_lens:
            spans.append(SeqSpan(start, start + n, None))
            start += n
        return cls(num_tokens=start, spans=spans, decode=None, slot_mapping=None, kv_caches=None,
                   prefill_mode=prefill_mode)

    @classmethod
    def paged(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
        prefill_mode: str = "naive",
        layer_done: Callable[[int], None] | None = None,
    ) -> "AttentionMetadata":
        """A step over the paged cache: sequence i has query_lens[i] new tokens ending its context_lens[i].

        Built every step (and at batch 1 a decode step is a few ms on a CPU), so the index lists are made in
        Python and become a few tensors: the flat ones are views of one."""
        b = len(query_lens)
        lmax = max(context_lens)
        slots = _context_slots(block_tables, lmax, block_size)  # [B, Lmax]
        starts = list(itertools.accumulate(query_lens, initial=0))
        flat = [t[p // block_size] * block_size + p % block_size  # slot mapping [T], in sequence order
                for t, q, c in zip(block_tables, query_lens, context_lens) for p in range(c - q, c)]
        idx = [i for i in range(b) if query_lens[i] <= MAX_BATCHED_QUERY]
        qd, cd = [query_lens[i] for i in idx], [context_lens[i] for i in idx]
        flat += [starts[i] + j for i, q in zip(idx, qd) for j in range(q)]  # the decode queries' step rows [M],
        flat += [k for k, q in enumerate(qd) for _ in range(q)]  # their sequence [M]
        flat += [c - q + j + 1 for q, c in zip(qd, cd) for j in range(q)]  # and the rows they attend [M]
        t, m = starts[-1], sum(qd)
        flat_t = torch.tensor(flat, dtype=torch.long, device=device)
        spans = [SeqSpan(starts[i], starts[i + 1], slots[i, :context_lens[i]].to(device))
                 for i in range(b) if query_lens[i] > MAX_BATCHED_QUERY]
        decode = None
        if idx:
            dmax = max(cd)
            d_slots = slots if len(idx) == b and dmax == lmax else slots[torch.tensor(idx), :dmax]
            decode = DecodeBatch(d_slots.to(device), flat_t[t:t + m], flat_t[t + m:t + 2 * m], flat_t[t + 2 * m:],
                                 len(idx) == b,  # the batched sequences come in step order: all of them is 0..T-1
                                 qd, cd, [starts[i] for i in idx])
        return cls(num_tokens=t, spans=spans, decode=decode, slot_mapping=flat_t[:t],
                   kv_caches=kv_caches, prefill_mode=prefill_mode, layer_done=layer_done)

    @classmethod
    def decode_chain(cls, positions: list[int], block_tables: list[list[int]], passes: int, block_size: int,
                     kv_caches: list[torch.Tensor], device: torch.device) -> list["AttentionMetadata"]:
        """``passes`` steps of one new token per sequence, pass j's at ``positions[i] + j`` (the MTP layer's
        draft passes), built at once: the passes share one slots tensor, padded to the last pass's contexts
        (each query attends a prefix of its row), and their index tensors are views of one. What ``paged``
        builds pass by pass (``tests/test_attention_metadata.py``), for about the cost of one."""
        if passes < 1:
            return []
        b = len(positions)
        slots = _context_slots(block_tables, max(positions) + passes, block_size).to(device)  # [B, Lmax]
        flat = list(range(b))  # the queries' step rows, and their sequences: 0..B-1 in every pass
        flat += [t[p // block_size] * block_size + p % block_size  # slot mapping, pass after pass
                 for j in range(passes) for t, p in zip(block_tables, (q + j for q in positions))]
        flat += [p + j + 1 for j in range(passes) for p in positions]  # rows each query attends
        flat_t = torch.tensor(flat, dtype=torch.long, device=device)
        rows, first = flat_t[:b], list(range(b))
        out = []
        for j in range(passes):
            mapping, keys = flat_t[b * (1 + j):b * (2 + j)], flat_t[b * (1 + passes + j):b * (2 + passes + j)]
            decode = DecodeBatch(slots, rows, rows, keys, True, [1] * b, [p + j + 1 for p in positions], first)
            out.append(cls(num_tokens=b, spans=[], decode=decode, slot_mapping=mapping, kv_caches=kv_caches))
        return out


def _context_slots(block_tables: list[list[int]], length: int, block_size: int) -> torch.Tensor:
    """[B, length] the cache row of every position of each sequence (past a table's end: block 0's rows,
    which no query attends)."""
    nblk = -(-length // block_size)
    tables = torch.tensor([t[:nblk] + [0] * (nblk - len(t)) for t in block_tables], dtype=torch.long)
    return (tables[:, :, None] * block_size + torch.arange(block_size)).view(len(block_tables), -1)[:, :length]


@dataclasses.dataclass
class MLAWeights:
    """The per-head up-projections of one layer, views of ``kv_b_proj.weight``; with ``kernel``
    (pdserve's CPU kernel's ``head_gemm``, ``engine/kernels/cpu_gemm.py``) the absorbed products of few rows
    per head run through it, ``q · W_UK`` with ``w_uk_t``, a copy of ``w_uk`` laid out ``[H, R, Dn]`` for it."""

    w_uk: torch.Tensor  # [H, Dn, R]  latent -> key (nope part)
    w_uv: torch.Tensor  # [H, Dv, R]  latent -> value
    scale: float
    kv_b: torch.Tensor  # [H * (Dn+Dv), R]  both, as kv_b_proj holds them (one matmul for the naive pass)
    kernel: HeadKernel | None = None
    w_uk_t: torch.Tensor | None = None  # [H, R, Dn] (or ``cpu_gemm.pair_layout`` of it), given with ``kernel``
    # the same module's MLA decode attention over an fp32 cache (``cpu_gemm.mla_decode``)
    decode_attention: Callable[..., torch.Tensor] | None = None
    # ``w_uv`` as ``kernel`` reads it (a bf16 copy, or ``cpu_gemm.pair_layout`` of it); None: ``w_uv``
    w_uv_kernel: torch.Tensor | None = None
    kv_b_packed: torch.Tensor | None = None  # oneDNN's prepacked ``kv_b`` (``layers.pack_weight``), for the naive pass
    # the same module's prefill attention (``cpu_gemm.mla_prefill``) for the naive pass, where it fits
    prefill_attention: Callable[..., torch.Tensor] | None = None
    # contiguous copies for torch's bmm (absorbed products without ``kernel``): ``einsum`` over the views above
    # copied (and for W_UV transposed) the weight on every call: 0.24 / 0.65 ms vs 0.10 / 0.11 ms a layer at 32
    # rows (bench preset, bf16, side by side on a 2-core Intel Xeon with AMX). None while the weight trains
    w_uk_bmm: torch.Tensor | None = None  # [H, Dn, R]
    w_uv_bmm: torch.Tensor | None = None  # [H, R, Dv]

    @classmethod
    def from_kv_b_proj(cls, weight: torch.Tensor, num_heads: int, nope: int, v: int, scale: float,
                       kernel: HeadKernel | None = None, w_uk_t: torch.Tensor | None = None,
                       decode_attention: Callable[..., torch.Tensor] | None = None,
                       w_uv_kernel: torch.Tensor | None = None,
                       kv_b_packed: torch.Tensor | None = None,
                       prefill_attention: Callable[..., torch.Tensor] | None = None) -> "MLAWeights":
        w = weight.view(num_heads, nope + v, -1)  # [H, Dn+Dv, R]
        uk, uv = w[:, :nope], w[:, nope:]
        frozen = not weight.requires_grad
        return cls(w_uk=uk, w_uv=uv, scale=scale, kv_b=weight, kernel=kernel, w_uk_t=w_uk_t,
                   decode_attention=decode_attention, w_uv_kernel=w_uv_kernel, kv_b_packed=kv_b_packed,
                   prefill_attention=prefill_attention,
                   w_uk_bmm=uk.contiguous() if frozen else None,
                   w_uv_bmm=uv.transpose(1, 2).contiguous() if frozen else None)

    @staticmethod
    def kernel_layout(weight: torch.Tensor, num_heads: int, nope: int, v: int) -> torch.Tensor:
        """``w_uk_t`` for ``kernel``: ``[H, R, Dn]``, contiguous."""
        return weight.view(num_heads, nope + v, -1)[:, :nope].transpose(1, 2).contiguous()


def store_rows(latent: torch.Tensor, k_pe: torch.Tensor, meta: AttentionMetadata,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The new tokens' cache rows ``[T, R+Dr]`` (normed latent, rotated rope key), written to their slots;
    returns them and the layer's cache (None: nothing cached)."""
    rows = torch.cat([latent, k_pe], dim=-1)
    if meta.kv_caches is None:
        return rows, None
    cache = meta.kv_caches[layer_idx]  # [num_blocks, block_size, R+Dr], or packed FP8 bytes
    write_rows(cache, meta.slot_mapping, rows, latent.shape[-1])
    return rows, cache


def mla_attention(
    q_nope: torch.Tensor,  # [T, H, Dn]
    q_pe: torch.Tensor,  # [T, H, Dr] rotated
    latent: torch.Tensor,  # [T, R] normed compressed kv of the new tokens
    k_pe: torch.Tensor,  # [T, Dr] rotated rope key of the new tokens
    w: MLAWeights,
    meta: AttentionMetadata,
    layer_idx: int,
) -> torch.Tensor:  # [T, H * Dv]
    rows, cache = store_rows(latent, k_pe, meta, layer_idx)
    rank = latent.shape[-1]
    heads, dv = w.w_uv.shape[0], w.w_uv.shape[1]
    d = meta.decode
    # pdserve's CPU kernel reads the decode queries' rows where they lie in the cache: fp32, or bf16 (rows and
    # weights widened in registers, queries in fp32) for as many queries as its absorbed products take, any
    # number with its AVX512-BF16 products (bench preset, 32 queries: ~4x less time than gathering the rows
    # for torch's bmm; side by side on a 2-core AMD EPYC with AVX512-BF16)
    by_kernel = (d is not None and w.decode_attention is not None and cache.dtype == q_nope.dtype
                 and (q_nope.dtype == torch.float32
                      or (q_nope.dtype == torch.bfloat16
                          and (d.tokens.numel() <= KERNEL_MAX_ROWS or cpu_gemm.bf16_dot()))))
    if by_kernel and d.every_token:  # a decode-only step: its queries are the step's tokens, nothing to gather
        return _kernel_decode(q_nope, q_pe, cache, d, w, rank).flatten(1)
    out = q_nope.new_empty(q_nope.shape[0], heads, dv)
    for span in meta.spans:
        ctx = (rows[span.q_start:span.q_end] if span.context_slots is None
               else read_rows(cache, span.context_slots, rank, q_nope.dtype))
        q = slice(span.q_start, span.q_end)
        fn = _naive if meta.prefill_mode == "naive" else _absorbed_one
        out[q] = fn(q_nope[q], q_pe[q], ctx, w)
    if by_kernel:
        out[d.tokens] = _kernel_decode(q_nope[d.tokens], q_pe[d.tokens], cache, d, w, rank)
    elif d is not None:
        ctx = read_rows(cache, d.slots, rank, q_nope.dtype)  # [Bd, Lmax, R+Dr]
        res = _absorbed_batch(q_nope[d.token_index], q_pe[d.token_index], ctx, d.key_mask, w)  # [Bd, Qmax, H, Dv]
        out[d.tokens] = res[d.query_valid]
    return out.flatten(1)


def _kernel_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, d: DecodeBatch, w: MLAWeights,
                   rank: int) -> torch.Tensor:
    """The decode queries ``q [M, H, *]`` (``d.tokens``' rows) by ``w.decode_attention`` -> ``[M, H, Dv]``.
    A bf16 model's queries (at most KERNEL_MAX_ROWS, or any number with AVX512-BF16) go into the absorbed
    products as they are: with the kernel's AVX512-BF16 products (``cpu_gemm.bf16_dot()``) as bf16 rows, the
    attention's latent output rounded to bf16 for W_UV as well; without them widened, so that the whole is the
    fp32 arithmetic rounded at the end."""
    if q_nope.dtype == torch.float32:
        q = _absorb_query(q_nope, q_pe, w)  # [M, H, R+Dr]
    else:
        q = _kernel_absorb_query(q_nope, q_pe, w)
    o_lat = w.decode_attention(q, cache.view(-1, cache.shape[-1]), d.slots, d.query_seq, d.query_keys, rank,
                               w.scale)  # [M, H, R]
    if q_nope.dtype == torch.float32:
        return _absorb_output(o_lat, w)
    if cpu_gemm.bf16_dot():
        o_lat = o_lat.to(q_nope.dtype)
    return _kernel_absorb_output(o_lat, w).to(q_nope.dtype)


def _causal_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """[Q, L] True where query i (at context position ctx_len - q_len + i) may attend key j."""
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)
    return torch.arange(ctx_len, device=device)[None, :] <= q_pos[:, None]


def _naive(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """Expanded K/V for one sequence: q [Q, H, *], ctx [L, R+Dr] -> [Q, H, Dv]."""
    heads, nope, r = w.w_uk.shape
    ctx_len = ctx.shape[0]
    c_lat, c_pe = ctx[:, :r].to(q_nope.dtype), ctx[:, r:].to(q_nope.dtype)
    # one matmul through kv_b_proj's weight as stored (per-head einsums copied the weight each call); oneDNN's
    # prepacked copy where there is one: 1.1-1.8x F.linear's MKL sgemm at 64-1024 rows of this shape on the
    # bench preset (side by side on an AMD EPYC, 2 cores, AVX2 + FMA, no AVX512-BF16 / AMX; fp32), ~even at 2048
    kv = linear(c_lat, w.kv_b, w.kv_b_packed).view(ctx_len, heads, -1)  # [L, H, Dn+Dv]
    if w.prefill_attention is not None and cpu_gemm.prefill_fits(q_nope, q_pe, kv.shape[-1] - nope, ctx_len):
        # pdserve's kernel on the views as they are, causal blocks only. bf16 with the AVX512-BF16 products
        # (bench preset, 256 tokens: 0.24-0.33x the time of the fused path below with its copies; a prefill
        # step of 8 x 256 tokens 0.81x, alternated in one engine; 2-core AMD EPYC with AVX512-BF16, no AMX);
        # fp32 by AVX2 + FMA up to cpu_gemm.FP32_PREFILL_MAX_KEYS keys (bench preset, 256 tokens: 3-4 vs 8-11 ms;
        # a prefill step of 8 x 256 tokens 0.91x, 1350 vs 1485 ms, alternated in one engine; 2-core AMD EPYC with
        # AVX512-BF16, no AMX, the model in fp32), in 16 lanes where the CPU has AVX-512 (0.70-0.74x that)
        return w.prefill_attention(q_nope, q_pe, kv[..., :nope], c_pe, kv[..., nope:], w.scale)
    kv = kv.transpose(0, 1)  # [H, L, Dn+Dv]
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = torch.cat([k_nope, c_pe[None].expand(heads, ctx_len, -1)], dim=-1)  # [H, L, Dn+Dr]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, Q, Dn+Dr]
    q_len, dv = q.shape[1], v.shape[-1]
    if dv < k.shape[-1]:
        # zero columns make V as wide as K: torch's fused (flash) CPU kernel takes only equal head
        # dims, else SDPA runs its math path, which is ~1.8x slower and holds [H, Q, L] scores
        v = F.pad(v, (0, k.shape[-1] - dv))
    mask = None if q_len == ctx_len else _causal_mask(q_len, ctx_len, q.device)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                       scale=w.scale)[0, ..., :dv]
    return o.transpose(0, 1)  # [Q, H, Dv]


def _few_rows(x: torch.Tensor, w: MLAWeights) -> bool:
    """Whether ``w.kernel`` takes x [..., H, K]: at most KERNEL_MAX_ROWS rows per head, or
    ``cpu_gemm.COL_MAX_ROWS`` with its weights in column tiles (``cpu_gemm.col_layout``: 4-D)."""
    limit = cpu_gemm.COL_MAX_ROWS if w.w_uk_t is not None and w.w_uk_t.dim() == 4 else KERNEL_MAX_ROWS
    return w.kernel is not None and 0 < x[..., 0, 0].numel() <= limit and x.dtype == torch.float32


def _absorb_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """[..., H, R+Dr]: the latent part ``q_nope · W_UK`` per head, then ``q_pe``."""
    if _few_rows(q_nope, w):
        return _kernel_absorb_query(q_nope, q_pe, w)
    q_lat = _per_head(q_nope, w.w_uk_bmm) if w.w_uk_bmm is not None else \
        torch.einsum("...hd,hdr->...hr", q_nope, w.w_uk)  # [..., H, R]
    return torch.cat([q_lat, q_pe], dim=-1)  # [..., H, R+Dr]


def _kernel_absorb_query(q_nope: torch.Tensor, q_pe: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """``_absorb_query`` by ``w.kernel`` (fp32 or bf16 rows) -> fp32 ``[..., H, R+Dr]``."""
    heads, rank = q_nope.shape[-2], w.w_uk.shape[2]
    q = q_nope.new_empty(*q_nope.shape[:-1], rank + q_pe.shape[-1], dtype=torch.float32)
    flat = q.view(-1, heads, q.shape[-1])
    w.kernel(q_nope.reshape(-1, heads, q_nope.shape[-1]), w.w_uk_t, flat[..., :rank])  # written in place
    flat[..., rank:] = q_pe.reshape(flat.shape[0], heads, -1)
    return q


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., H, K] @ w [H, K, N] per head -> [..., H, N], one bmm."""
    heads, k = x.shape[-2:]
    y = torch.bmm(x.reshape(-1, heads, k).transpose(0, 1), w)  # [H, M, N]
    return y.transpose(0, 1).reshape(*x.shape[:-1], w.shape[-1])


def _absorb_output(o_lat: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """o_lat [..., H, R] -> [..., H, Dv] through ``W_UV``."""
    if _few_rows(o_lat, w):
        return _kernel_absorb_output(o_lat, w)
    if w.w_uv_bmm is not None:
        return _per_head(o_lat, w.w_uv_bmm)
    return torch.einsum("...hr,hvr->...hv", o_lat, w.w_uv)


def _kernel_absorb_output(o_lat: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """``_absorb_output`` by ``w.kernel`` (fp32 or bf16 rows) -> fp32 ``[..., H, Dv]``."""
    weight = w.w_uv if w.w_uv_kernel is None else w.w_uv_kernel
    heads = o_lat.shape[-2]
    return w.kernel(o_lat.reshape(-1, heads, o_lat.shape[-1]), weight).view(*o_lat.shape[:-1], -1)


def _absorbed_one(q_nope: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, w: MLAWeights) -> torch.Tensor:
    """Latent-space attention for one sequence: q [Q, H, *], ctx [L, R+Dr] -> [Q, H, Dv]."""
    r = w.w_uk.shape[2]
    q = _absorb_query(q_nope, q_pe, w)  # [Q, H, R+Dr]
    ctx = ctx.to(q.dtype)
    scores = torch.einsum("qhc,lc->hql", q, ctx).float() * w.scale  # [H, Q, L]
    scores.masked_fill_(~_causal_mask(q.shape[0], ctx.shape[0], q.device), float("-inf"))
    p = scores.softmax(-1).to(q.dtype)
    o_lat = torch.einsum("hql,lr->qhr", p, ctx[:, :r])  # [Q, H, R]
    return _absorb_output(o_lat, w)


def _absorbed_batch(
    q_nope: torch.Tensor,  # [B, Q, H, Dn]
    q_pe: torch.Tensor,  # [B, Q, H, Dr]
    ctx: torch.Tensor,  # [B, Lmax, R+Dr] gathered context rows
    key_mask: torch.Tensor,  # [B, Q, Lmax]
    w: MLAWeights,
) -> torch.Tensor:  # [B, Q, H, Dv]
    r = w.w_uk.shape[2]
    b, nq, heads = q_nope.shape[:3]
    q = _absorb_query(q_nope, q_pe, w).reshape(b, nq * heads, -1)  # [B, Q*H, R+Dr]
    ctx = ctx.to(q.dtype)
    scores = torch.bmm(q, ctx.transpose(1, 2)).float().view(b, nq, heads, -1) * w.scale  # [B, Q, H, Lmax]
    scores.masked_fill_(~key_mask[:, :, None, :], float("-inf"))
    p = scores.softmax(-1).to(q.dtype).view(b, nq * heads, -1)
    # the whole rows' product, then the latent columns: a bmm over the column slice copied it first (a layer
    # at 32 rows, bf16: 0.85 vs 0.36 ms, side by side on a 2-core Intel Xeon with AMX)
    o_lat = torch.bmm(p, ctx)[..., :r].reshape(b, nq, heads, r)  # [B, Q, H, R]
    return _absorb_output(o_lat, w)

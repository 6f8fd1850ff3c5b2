"""Batched token sampling for one decode step, with per-request parameters.

The engine builds a :class:`SamplingMetadata` once per step from one
:class:`SamplingRow` per sequence in the batch, then calls :class:`Sampler` on
the step's last-position logits ``[B, V]``. Everything on the hot path is a
tensor op over the whole batch (or the subset of rows that use a feature);
the only Python loop over rows is the per-row generator draw for seeded rows.

Processing order (as in vLLM):

0. structured output: tokens outside a row's ``allowed`` mask (its grammar's next-token set,
   ``engine.structured_output``) become ``-inf`` in the logits themselves, so the logprobs
   see the mask too, as in vLLM (which masks the logits before its sampler).
1. min_tokens: while ``len(output) < min_tokens`` the row's eos ids and
   ``stop_token_ids`` are masked to ``-inf``. ``ignore_eos`` masks nothing: as
   in vLLM, eos may be sampled and simply does not end the sequence.
   logit_bias (OpenAI): each listed token's bias is added to its logit, as a
   sparse (row, token) add that costs nothing when no row uses it.
2. repetition penalty (HF/vLLM): for tokens seen in prompt + output, positive
   logits are divided by the penalty and negative ones multiplied.
3. presence / frequency penalties (OpenAI): over output tokens only,
   ``logit -= frequency * count + presence * (count > 0)``.
4. greedy rows (``temperature < GREEDY_EPS``) take the argmax here and consume
   no randomness.
5. temperature, 6. top-k, 7. top-p, 8. min-p (relative to the row's top
   probability), 9. sample.

Sampling is an exponential race: ``argmax(probs / q)`` with ``q ~ Exp(1)``
i.i.d. per vocab entry, which picks token ``i`` with probability
``probs[i] / sum(probs)``. A seeded row draws its ``[V]`` noise from its own
generator, seeded by ``position_generator`` from the sequence's seed and the
position being sampled: a seeded sequence's tokens depend on nothing else (not its
batch companions, its row, a preemption, or which engine or rank continues it).
Unseeded rows share the sampler's generator (or torch's default).

Logprobs follow vLLM's default ("raw" logprobs): they are ``log_softmax`` of
the model's logits *before* min_tokens masking, penalties, temperature and
top-k/top-p/min-p. ``SamplerOutput.logprobs`` is always filled (one logprob per
row, for ``cumulative_logprob``); the top-k ids/values are computed only when
some row asked for ``logprobs >= 1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams

# Temperatures below this are greedy, as in vLLM: dividing by a tiny
# temperature only amplifies ties into overflow.
GREEDY_EPS = 1e-5
# Top-p first looks for the nucleus among each row's top entries, sorting the row only if needed.
_TOP_P_WIDTH = 64


_MASK64 = 2**64 - 1


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for sampling ``position`` of a sequence seeded with ``seed`` (splitmix64)."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def position_generator(seed: int | None, position: int, device: torch.device | str) -> torch.Generator | None:
    """The generator a seeded sequence samples ``position`` with; None for an unseeded one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(position_seed(seed, position))


@dataclasses.dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence of the batch.

    The engine can keep one per running sequence and let ``output_token_ids``
    alias the sequence's growing token list, so nothing is copied per step.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None  # seeded sequences: ``position_generator``
    allowed: np.ndarray | None = None  # [V] bool: structured output's mask; None = every token


@dataclasses.dataclass
class _Penalties:
    """Penalty inputs as (batch row, token) pairs, so applying them costs O(history), not O(B * V)."""

    presence: torch.Tensor  # [B], 0 on rows without it
    frequency: torch.Tensor  # [B], 0 on rows without it
    repetition: torch.Tensor | None  # [B], 1 on rows without it; None when no row uses it
    output_rows: torch.Tensor  # [T_out] int64, one entry per output token of a penalized row
    output_tokens: torch.Tensor  # [T_out] int64
    seen_rows: torch.Tensor | None  # [T_seen] prompt + output tokens of rows with a repetition penalty
    seen_tokens: torch.Tensor | None  # [T_seen]


@dataclasses.dataclass
class SamplingMetadata:
    """Per-step, per-row sampling inputs as tensors. Features no row uses are ``None``."""

    num_rows: int
    greedy: torch.Tensor | None  # [B] bool; None when no row is greedy
    all_greedy: bool
    temperature: torch.Tensor | None  # [B, 1]; 1.0 on greedy rows; None when all are 1.0
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    max_top_k: int
    top_p: torch.Tensor | None  # [B, 1]
    min_p: torch.Tensor | None  # [B, 1]
    banned_rows: torch.Tensor | None  # [N] int64, with banned_tokens: (row, token) pairs to mask
    banned_tokens: torch.Tensor | None  # [N] int64
    bias_rows: torch.Tensor | None  # [M] int64, with bias_tokens/bias_values: logit_bias as (row, token, bias)
    bias_tokens: torch.Tensor | None  # [M] int64
    bias_values: torch.Tensor | None  # [M] fp32
    penalties: _Penalties | None
    unseeded_rows: list[int]  # sampled rows that draw from the sampler's shared generator
    seeded_rows: list[tuple[int, torch.Generator]]  # sampled rows with their own generator
    num_logprobs: list[int | None]  # per row, params.logprobs
    max_num_logprobs: int  # top-k width of SamplerOutput.topk_* (0: none computed)
    allowed_rows: torch.Tensor | None = None  # [G] int64: rows with a structured-output mask
    allowed: torch.Tensor | None = None  # [G, V] bool: their allowed tokens

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], device: torch.device | str = "cpu") -> "SamplingMetadata":
        """One pass over the rows collecting Python lists, then a handful of tensors."""
        greedy: list[bool] = []
        temps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        min_ps: list[float] = []
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        bias_rows: list[int] = []
        bias_entries: list[tuple[int, float]] = []
        pen_rows: list[int] = []
        unseeded: list[int] = []
        seeded: list[tuple[int, torch.Generator]] = []
        num_logprobs: list[int | None] = []
        masked: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            is_greedy = p.temperature < GREEDY_EPS
            greedy.append(is_greedy)
            if is_greedy:
                temps.append(1.0)
                top_ks.append(0)
                top_ps.append(1.0)
                min_ps.append(0.0)
            else:
                temps.append(p.temperature)
                top_ks.append(p.top_k)
                top_ps.append(p.top_p)
                min_ps.append(p.min_p)
                if row.generator is None:
                    unseeded.append(i)
                else:
                    seeded.append((i, row.generator))
            banned = _banned_tokens(row)
            if row.allowed is not None:
                masked.append(i)
                banned = _keep_some_allowed(banned, row.allowed)
            if banned:
                banned_rows.extend([i] * len(banned))
                banned_tokens.extend(banned)
            if p.logit_bias:
                bias_rows.extend([i] * len(p.logit_bias))
                bias_entries.extend(p.logit_bias.items())
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                pen_rows.append(i)
            num_logprobs.append(p.logprobs)

        num_rows = len(rows)
        max_top_k = max(top_ks, default=0)
        max_logprobs = max((k for k in num_logprobs if k is not None), default=0)
        any_greedy = any(greedy)
        return cls(
            num_rows=num_rows,
            greedy=torch.tensor(greedy, device=device) if any_greedy else None,
            all_greedy=any_greedy and all(greedy),
            temperature=_column(temps, 1.0, device),
            top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if max_top_k > 0 else None,
            max_top_k=max_top_k,
            top_p=_column(top_ps, 1.0, device),
            min_p=_column(min_ps, 0.0, device),
            banned_rows=torch.tensor(banned_rows, dtype=torch.int64, device=device) if banned_rows else None,
            banned_tokens=torch.tensor(banned_tokens, dtype=torch.int64, device=device) if banned_rows else None,
            bias_rows=torch.tensor(bias_rows, dtype=torch.int64, device=device) if bias_rows else None,
            bias_tokens=torch.tensor([t for t, _ in bias_entries], dtype=torch.int64, device=device) if bias_rows else None,
            bias_values=torch.tensor([b for _, b in bias_entries], dtype=torch.float32, device=device) if bias_rows else None,
            penalties=_build_penalties(rows, pen_rows, device) if pen_rows else None,
            unseeded_rows=unseeded,
            seeded_rows=seeded,
            num_logprobs=num_logprobs,
            max_num_logprobs=max_logprobs,
            allowed_rows=torch.tensor(masked, dtype=torch.int64, device=device) if masked else None,
            allowed=(torch.from_numpy(np.stack([rows[i].allowed for i in masked])).to(device)
                     if masked else None),
        )


def _banned_tokens(row: SamplingRow) -> list[int]:
    """Token ids the row may not sample this step (min_tokens)."""
    p = row.params
    if len(row.output_token_ids) < p.min_tokens:
        return [*row.eos_token_ids, *p.stop_token_ids]
    return []


def _keep_some_allowed(banned: list[int], allowed: np.ndarray) -> list[int]:
    """min_tokens yields to the grammar: when it would ban every token the grammar allows (a complete
    grammar allows only end-of-sequence), nothing is banned."""
    in_vocab = [t for t in banned if t < len(allowed)]
    if banned and allowed.sum() <= allowed[in_vocab].sum():
        return []
    return banned


def masked_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Step 0: ``logits`` with each masked row's disallowed tokens at ``-inf`` (a copy; ``logits``
    itself when no row has a mask). ``meta.allowed`` may be narrower than the logits (a vocabulary
    padded past the tokenizer's): the extra columns are disallowed."""
    if meta.allowed_rows is None:
        return logits
    return _apply_allowed(logits, meta.allowed_rows, meta.allowed)


def masked_logits_of_rows(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """``masked_logits`` from the rows themselves (no full ``SamplingMetadata``)."""
    masked = [i for i, row in enumerate(rows) if row.allowed is not None]
    if not masked:
        return logits
    return _apply_allowed(logits, torch.tensor(masked, device=logits.device),
                          torch.from_numpy(np.stack([rows[i].allowed for i in masked])).to(logits.device))


def _apply_allowed(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    if allowed.shape[1] < logits.shape[1]:
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[1] - allowed.shape[1]), value=False)
    x = logits.clone()
    x[rows] = x[rows].masked_fill(~allowed[:, :logits.shape[1]], float("-inf"))
    return x


def _column(values: list[float], neutral: float, device: torch.device | str) -> torch.Tensor | None:
    """``[B, 1]`` float tensor, or None when every value is the neutral one."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _build_penalties(rows: Sequence[SamplingRow], pen_rows: list[int], device: torch.device | str) -> _Penalties:
    params = [row.params for row in rows]
    rep_rows = [i for i in pen_rows if params[i].repetition_penalty != 1.0]
    seen_rows = seen_tokens = None
    if rep_rows:
        seen = [[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in rep_rows]
        seen_rows, seen_tokens = _flatten(rep_rows, seen, device)
    output_rows, output_tokens = _flatten(pen_rows, [rows[i].output_token_ids for i in pen_rows], device)
    return _Penalties(
        presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
        repetition=(torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
                    if rep_rows else None),
        output_rows=output_rows,
        output_tokens=output_tokens,
        seen_rows=seen_rows,
        seen_tokens=seen_tokens,
    )


def _flatten(row_ids: list[int], lists: list[Sequence[int]],
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row token lists -> (batch row [T], token id [T]) int64 tensors."""
    lengths = torch.tensor([len(t) for t in lists], dtype=torch.int64)
    tokens = torch.tensor([t for ts in lists for t in ts], dtype=torch.int64)
    batch_rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.int64), lengths)
    return batch_rows.to(device), tokens.to(device)


@dataclasses.dataclass
class SamplerOutput:
    """Sampled (or given) tokens with their raw logprobs, one entry per row.

    Also the result of :func:`compute_logprobs_topk`, where ``token_ids`` are
    the tokens whose logprobs were asked for (e.g. the next prompt tokens).
    """

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, logprob of token_ids under the raw distribution
    topk_ids: torch.Tensor | None  # [B, k_max] int64; None when k_max == 0
    topk_logprobs: torch.Tensor | None  # [B, k_max] fp32

    def to_logprob_dicts(self, num_topk: Sequence[int | None]) -> list[TokenLogprobs | None]:
        """Per row ``{token: logprob}``: the row's token first, then its top ``num_topk[i]``.

        Rows whose ``num_topk`` is None (no logprobs requested) get None.
        """
        tokens = self.token_ids.tolist()
        logprobs = self.logprobs.tolist()
        top_ids = self.topk_ids.tolist() if self.topk_ids is not None else None
        top_lps = self.topk_logprobs.tolist() if self.topk_logprobs is not None else None
        result: list[TokenLogprobs | None] = []
        for i, k in enumerate(num_topk):
            if k is None:
                result.append(None)
                continue
            entry = {tokens[i]: logprobs[i]}
            if k > 0:
                for tok, lp in zip(top_ids[i][:k], top_lps[i][:k]):
                    entry.setdefault(tok, lp)
            result.append(entry)
        return result


def compute_logprobs_topk(logits: torch.Tensor, k: int, token_ids: torch.Tensor) -> SamplerOutput:
    """Logprobs of ``token_ids`` under ``log_softmax(logits)``, plus the top-``k`` per row.

    ``logits``: ``[N, V]`` (fp32 or bf16, computed in fp32); ``token_ids``: ``[N]``.
    For prompt logprobs pass the logits of positions ``0..P-2`` and the prompt
    tokens ``1..P-1`` (see :func:`prompt_logprobs`).
    """
    token_ids = token_ids.to(device=logits.device, dtype=torch.int64)
    # one fused op over the row (ATen's CPU logsumexp is a chain of them: at 4 x 4096 logits 29 us against
    # 8, on a 2-core AMD EPYC with AVX512-BF16, fp32)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    picked = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    if k <= 0:
        return SamplerOutput(token_ids, picked, None, None)
    top_vals, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [N, k]
    return SamplerOutput(token_ids, picked, top_ids, top_vals)


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: Sequence[int], k: int) -> list[TokenLogprobs | None]:
    """``RequestOutput.prompt_logprobs``: None for position 0, then for each prompt
    position ``p > 0`` the logprob of prompt token ``p`` given the prefix, plus top-``k``.

    ``logits``: ``[P, V]``, the model output at every prompt position.
    """
    if len(prompt_token_ids) < 2:
        return [None] * len(prompt_token_ids)
    targets = torch.tensor(prompt_token_ids[1:], dtype=torch.int64)
    out = compute_logprobs_topk(logits[:-1], k, targets)
    return [None, *out.to_logprob_dicts([k] * len(targets))]


def penalized_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 1-3 of the pipeline: fp32 ``[B, V]`` logits with the min_tokens mask, the logit
    bias and the repetition, frequency and presence penalties applied.

    Returns a new tensor, except when there is nothing to apply and ``logits``
    is already fp32: then ``logits`` itself (never modified).
    """
    x = logits.float()  # [B, V]; a copy unless already fp32
    if meta.banned_rows is None and meta.bias_rows is None and meta.penalties is None:
        return x
    if x is logits:
        x = x.clone()
    _mask_banned(x, meta)
    _add_bias(x, meta)
    if meta.penalties is not None:
        _apply_penalties(x, meta.penalties)
    return x


def sampling_probs(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 5-8 on penalized logits ``x`` [B, V]: the (unnormalised) distribution a row samples from.

    Temperature, top-k, softmax, top-p, min-p; ``x`` is not modified. Speculative decoding
    verifies drafts against exactly this distribution.
    """
    if meta.temperature is not None:
        x = x / meta.temperature
    if meta.top_k is not None:
        x = _apply_top_k(x, meta.top_k, meta.max_top_k)
    probs = x.softmax(dim=-1)  # [B, V]
    if meta.top_p is not None:
        _apply_top_p(probs, meta.top_p)
    if meta.min_p is not None:
        threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p  # [B, 1]
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


class Sampler:
    """Applies the per-row sampling pipeline to one step's logits. Stateless but for its generator."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator  # shared by unseeded rows; None = torch's default generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """``logits``: ``[B, V]`` fp32 or bf16 (not modified). Returns ``[B]`` tokens and raw logprobs."""
        assert logits.dim() == 2 and logits.shape[0] == meta.num_rows, (tuple(logits.shape), meta.num_rows)
        logits = masked_logits(logits, meta)
        x = penalized_logits(logits, meta)  # [B, V] fp32
        greedy_tokens = x.argmax(dim=-1) if meta.greedy is not None else None  # [B]
        if meta.all_greedy:
            tokens = greedy_tokens
        else:
            tokens = self._sample(x, meta)
            if greedy_tokens is not None:
                tokens = torch.where(meta.greedy, greedy_tokens, tokens)
        return compute_logprobs_topk(logits, meta.max_num_logprobs, tokens)

    def _sample(self, x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race. ``x`` is not modified."""
        probs = sampling_probs(x, meta)  # [B, V]
        noise = self._exponential_noise(probs, meta)  # [B, V]
        return probs.div_(noise).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """``[B, V]`` Exp(1) draws as ``-log(u)``, ``u ~ U[0, 1)``: shared generator for
        unseeded rows, each seeded row its own ``[V]`` draw from its generator.

        ``u < 1`` keeps every draw ``> 0``, so ``probs / noise`` never divides by zero
        (``u = 0`` gives ``inf``: that token cannot win). Greedy rows get ones and draw nothing.
        """
        num_rows, vocab = probs.shape
        if len(meta.unseeded_rows) == num_rows:
            uniform = torch.empty_like(probs).uniform_(generator=self.generator)
        else:
            uniform = torch.full_like(probs, math.exp(-1.0))
            if meta.unseeded_rows:
                rows = torch.tensor(meta.unseeded_rows, device=probs.device)
                uniform[rows] = torch.empty(len(rows), vocab, device=probs.device).uniform_(generator=self.generator)
            for row, generator in meta.seeded_rows:
                uniform[row].uniform_(generator=generator)
        return uniform.log_().neg_()


def _mask_banned(x: torch.Tensor, meta: SamplingMetadata) -> None:
    """min_tokens: ``-inf`` at the (row, token) pairs; ids outside the vocab are ignored."""
    if meta.banned_rows is None:
        return
    in_vocab = meta.banned_tokens < x.shape[1]
    x[meta.banned_rows[in_vocab], meta.banned_tokens[in_vocab]] = float("-inf")


def _add_bias(x: torch.Tensor, meta: SamplingMetadata) -> None:
    """logit_bias: add each (row, token) bias in place; ids outside the vocab are ignored."""
    if meta.bias_rows is None:
        return
    in_vocab = meta.bias_tokens < x.shape[1]
    x.index_put_((meta.bias_rows[in_vocab], meta.bias_tokens[in_vocab]), meta.bias_values[in_vocab], accumulate=True)


def _apply_penalties(x: torch.Tensor, pen: _Penalties) -> None:
    """Repetition (prompt + output), then frequency and presence (output) penalties, in place.

    Works on the (row, token) pairs only. Duplicate pairs are harmless where
    the update is a plain write: every duplicate reads the same value and
    writes the same result, so each seen token is penalized once; the
    frequency penalty accumulates once per occurrence.
    """
    if pen.repetition is not None:
        rows, tokens = pen.seen_rows, pen.seen_tokens
        values = x[rows, tokens]  # [T_seen]
        penalty = pen.repetition[rows]  # [T_seen]
        x[rows, tokens] = torch.where(values > 0, values / penalty, values * penalty)
    rows, tokens = pen.output_rows, pen.output_tokens
    x.index_put_((rows, tokens), -pen.frequency[rows], accumulate=True)
    x[rows, tokens] = x[rows, tokens] - pen.presence[rows]


def _apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """``x`` with all but each row's ``top_k`` largest logits set to ``-inf`` (ties at the
    k-th value kept); 0 = off."""
    vocab = x.shape[1]
    kth_values = x.topk(min(max_top_k, vocab), dim=-1).values  # [B, k_max]
    k = top_k.clamp(min=1, max=min(max_top_k, vocab))  # [B]
    threshold = kth_values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    threshold = threshold.masked_fill_((top_k == 0).unsqueeze(1), float("-inf"))
    return x.masked_fill(x < threshold, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Nucleus filter in place: zero each row's tail outside the smallest most-likely set
    whose mass reaches ``top_p`` (ties with the last kept probability are kept).

    Only the sorted *values* are needed, never the permutation. Most rows are
    resolved from their top ``_TOP_P_WIDTH`` entries; the rest sort their row.
    """
    num_rows, vocab = probs.shape
    threshold = torch.zeros(num_rows, 1, dtype=probs.dtype, device=probs.device)  # [B, 1]
    pending = (top_p < 1.0).squeeze(1).nonzero().squeeze(1)  # [R] rows with a nucleus to find
    for width in (_TOP_P_WIDTH, vocab):
        if pending.numel() == 0:
            break
        rows = probs if pending.numel() == num_rows else probs[pending]  # [R, V]
        top = rows.topk(width, dim=-1).values if width < vocab else _sorted_descending(rows)  # [R, width]
        cumulative = top.cumsum(dim=-1)  # [R, width]
        p = top_p[pending]  # [R, 1]
        # [R, 1]; at least the most likely token, also when top_p underflows to 0 in fp32
        num_keep = ((cumulative - top) < p).sum(dim=-1, keepdim=True).clamp_(min=1)
        resolved = (cumulative[:, -1:] >= p).squeeze(1) if width < vocab else torch.ones_like(pending, dtype=torch.bool)
        threshold[pending[resolved]] = top.gather(1, num_keep - 1)[resolved]
        pending = pending[~resolved]
    probs.masked_fill_(probs < threshold, 0.0)


def _sorted_descending(rows: torch.Tensor) -> torch.Tensor:
    """``[R, V]`` values sorted descending per row. On CPU via NumPy, whose value-only
    sort is an order of magnitude faster than ``torch.sort`` (which also builds indices)."""
    if rows.device.type != "cpu":
        return rows.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.sort(rows.numpy(), axis=-1)).flip(-1)

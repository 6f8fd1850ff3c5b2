"""MTP speculative decoding: draft with the MTP layer, verify in one main-model forward.

A request that has drafts ``d_1..d_k`` schedules its last known token ``x_n`` and
the drafts together; the main model's logits at positions ``n..n+k`` give the
target distributions ``p_0..p_k`` (each after the request's penalties,
temperature, top-k, top-p and min-p, with the earlier drafts counted in its
history). Drafts are the MTP head's argmax, so the draft distribution is
one-hot and the standard speculative rule (Leviathan et al. 2023) reads:

* greedy rows: accept ``d_i`` while ``d_i == argmax p_{i-1}``; the first
  mismatch's argmax (or ``argmax p_k`` when all agree) is the bonus token —
  token for token what plain greedy decoding produces;
* sampled rows: accept ``d_i`` with probability ``p_{i-1}(d_i)``; on a
  rejection draw from ``p_{i-1}`` without ``d_i`` (the residual
  ``max(0, p - q)``, renormalised); when all are accepted draw the bonus from
  ``p_k``. Outputs follow the main model's distribution exactly.

Drafting (``MTPProposer``): MTP row ``t`` reads the main model's hidden state at
``t`` and the embedding of token ``t+1`` and predicts ``t+2``. After a step, the
MTP layer writes its own cache rows (which later steps attend to) for every main
position whose next token is now known, and runs its block at the last one only,
whose output gives ``d_1``. Drafts ``d_2..d_k`` reuse the MTP layer autoregressively on its
own output hidden state; the rows those extra passes write are speculative and
are overwritten by the real rows one step later.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from engine.model.attention import AttentionMetadata
from engine.sampler import SamplingMetadata, SamplingRow, masked_logits, penalized_logits, sampling_probs


@dataclasses.dataclass
class VerifyGroup:
    """One request's verify rows: ``len(drafts) + 1`` consecutive rows of the logits."""

    first_row: int
    drafts: list[int]
    generator: torch.Generator | None


def verify(logits: torch.Tensor, rows: list[SamplingRow], groups: list[VerifyGroup],
           shared: torch.Generator | None) -> list[list[int]]:
    """Accepted drafts + the bonus token, per group. ``logits`` [R, V], one row per verify position."""
    meta = SamplingMetadata.build(rows, logits.device)
    x = penalized_logits(masked_logits(logits, meta), meta)  # [R, V]; a grammar-rejected draft has p = 0
    argmax = x.argmax(-1).tolist()
    greedy = [True] * len(rows) if meta.all_greedy else (
        meta.greedy.tolist() if meta.greedy is not None else [False] * len(rows))
    probs = None if meta.all_greedy else sampling_probs(x, meta)  # [R, V]
    out = []
    for g in groups:
        gen = g.generator or shared
        tokens: list[int] = []
        for i, d in enumerate(g.drafts + [None]):
            r = g.first_row + i
            if greedy[r]:
                tokens.append(argmax[r])
                if argmax[r] != d:
                    break
                continue
            p = probs[r]
            if d is not None and torch.rand((), generator=gen, device=p.device) * p.sum() < p[d]:
                tokens.append(d)
                continue
            if d is not None:
                p = p.clone()
                p[d] = 0.0
            tokens.append(int(torch.multinomial(p, 1, generator=gen)))
            break
        out.append(tokens)
    return out


@dataclasses.dataclass
class MTPJob:
    """One request's MTP pass: main positions ``start..start+count-1`` (whose next tokens are known)."""

    start: int
    count: int
    next_ids: list[int]  # token t+1 for each position t
    hidden_rows: list[int]  # rows of the step's main hidden states
    draft: bool  # propose drafts after this pass (the request sampled this step)


class MTPProposer:
    def __init__(self, model, num_speculative_tokens: int, block_size: int, fixed_passes: bool = False):
        self.model = model
        self.k = num_speculative_tokens
        self.block_size = block_size
        self.fixed_passes = fixed_passes  # always k MTP passes (ranks in lock-step must make the same ones)

    def run(self, hidden: torch.Tensor, jobs: list[MTPJob], tables: list[list[int]], kv_caches,
            device: torch.device, layer_done=None, step_meta: AttentionMetadata | None = None) -> list[list[int]]:
        """The MTP layer's cache rows for every job's positions; drafts (k tokens) for jobs with ``draft``, []
        for others (the layer's block runs past the attention's cache rows only where a draft reads it).
        ``layer_done(cache layer)`` is called once the MTP layer's rows of the jobs are written.
        ``step_meta``: the main pass's metadata, when the jobs cover exactly the step's rows (no draft
        rejected): the MTP pass attends over the same spans."""
        model = self.model
        drafting = [i for i, j in enumerate(jobs) if j.draft]
        ends = list(itertools.accumulate(j.count for j in jobs))
        # the tokens, their positions, the drafting rows (each drafting job's last) and, without step_meta, the
        # jobs' rows of the main pass: views of one tensor
        n = ends[-1] if ends else 0
        flat = torch.tensor([t for j in jobs for t in j.next_ids]
                            + [p for j in jobs for p in range(j.start, j.start + j.count)]
                            + [ends[i] - 1 for i in drafting]
                            + ([] if step_meta is not None else [r for j in jobs for r in j.hidden_rows]),
                            dtype=torch.long, device=device)
        ids, pos = flat[:n], flat[n:2 * n]
        out_rows, rows = flat[2 * n:2 * n + len(drafting)], flat[2 * n + len(drafting):]
        if step_meta is not None:
            h, meta = hidden, step_meta
        else:
            h = hidden[rows]
            meta = AttentionMetadata.paged([j.count for j in jobs], [j.start + j.count for j in jobs], tables,
                                           self.block_size, kv_caches, device)
        # pass j of the chain: one query per drafting job at its last position + j. Pass 0 is the block's
        # run over those last rows within the first pass (which writes every job's rows); passes 1.. draft
        # d_2..d_k on the layer's own hidden state (speculative rows)
        last_pos = [jobs[i].start + jobs[i].count - 1 for i in drafting]
        chain = AttentionMetadata.decode_chain(last_pos, [tables[i] for i in drafting], self.k, self.block_size,
                                               kv_caches, device) if drafting else [AttentionMetadata.no_cache([])]
        last = model.mtp_forward(0, ids, h, pos, meta, out_rows, chain[0])  # [B, D]
        if layer_done is not None:
            layer_done(len(model.layers))
        drafts: list[list[int]] = [[] for _ in jobs]
        if not drafting:
            if self.fixed_passes:
                for _ in range(1, self.k):
                    model.dummy_mtp_forward(0)
            return drafts
        tok = model.mtp[0].draft(last)  # [B]
        for i, t in zip(drafting, tok.tolist()):
            drafts[i].append(t)
        for meta_s in chain[1:]:
            # a query at position p attends its sequence's first p + 1 rows
            last = model.mtp_forward(0, tok, last, meta_s.decode.query_keys - 1, meta_s)
            tok = model.mtp[0].draft(last)
            for i, t in zip(drafting, tok.tolist()):
                drafts[i].append(t)
        return drafts

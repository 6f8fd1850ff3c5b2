"""The messages of one engine step: what the scheduler sends to the executor, and what comes back.

Torch-free and plain data, so rank 0 of a multi-rank instance can broadcast a
``StepInput`` to the other ranks and every rank's ``ModelRunner`` runs the same step.
A step, in order::

    Scheduler.schedule() ──StepInput──▶ Executor.execute() ──▶ ModelRunner(s)
          ▲                                                         │
          └──── Scheduler.update() ◀────────── StepOutput ──────────┘

The scheduler owns the requests; a runner keeps its own copy of what it needs per
sequence (prompt, tokens so far, sampling parameters, block table), created from a
``NewSequence`` the first time the sequence is scheduled (and again after a
preemption) and advanced by each ``ScheduledSequence``: the tokens the sequence got
since the runner last saw it and the blocks it was given. ``finished`` lists the
sequences a runner may forget. Nothing here refers to a scheduler object.

``kv_saves`` (prefill role, layer-wise KV streaming) names the positions of a
sequence whose latent rows leave this engine layer by layer as the forward computes
them; see ``engine.kv_connector``.
"""

from __future__ import annotations

import dataclasses

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class NewSequence:
    """Everything a runner keeps about a sequence, sent once (and again after a preemption)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before this point (continuation, KV hand-off)
    params: SamplingParams
    eos_token_ids: list[int]
    seed: int | None  # the sequence's own seed (``sequence_seed``); None = the shared generator
    block_ids: list[int]  # the whole block table
    grammar: str | None = None  # structured output: the compiled grammar (``engine.structured_output``)


@dataclasses.dataclass
class ScheduledSequence:
    """One sequence's share of a step."""

    seq_id: str
    start: int  # tokens already computed = position of the first new token
    num_new_tokens: int  # tokens computed this step, drafts included
    sample: bool  # the step brings the sequence up to date: sample (or verify the drafts)
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # appended since the runner last saw it
    new_block_ids: list[int] = dataclasses.field(default_factory=list)  # appended to its block table
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)  # the last new tokens, to verify
    new: NewSequence | None = None  # set the first time (or after a preemption)


@dataclasses.dataclass
class KVSave:
    """Stream the latent rows of positions ``[start, start + num_tokens)`` of a sequence, layer by layer."""

    seq_id: str
    start: int
    num_tokens: int


@dataclasses.dataclass
class StepInput:
    step_id: int
    sequences: list[ScheduledSequence]
    finished: list[str] = dataclasses.field(default_factory=list)  # sequences the runners may forget
    kv_saves: list[KVSave] = dataclasses.field(default_factory=list)
    # speculative decoding: the sampling sequences propose drafts for the next step (the MTP layer's
    # rows are written either way, so drafting can resume at full acceptance)
    propose: bool = True
    # lock-step DP replicas: the most tokens any replica runs this step (agreed before it; None
    # elsewhere). It bounds every pass's rows per EP rank, so dispatch sends rows and counts at once
    ep_max_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.sequences)


# (raw logprob of the token, top-k {token: logprob} or None)
TokenScore = tuple[float, "TokenLogprobs | None"]


@dataclasses.dataclass
class StepOutput:
    """Per sequence that sampled: its new tokens (accepted drafts, then one sampled or bonus token),
    their scores, and the drafts it proposes for the next step; prompt logprobs of the positions
    this step's chunk scored; the forward's wall time."""

    sampled: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    scores: dict[str, list[TokenScore]] = dataclasses.field(default_factory=dict)
    drafts: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = dataclasses.field(default_factory=dict)
    forward_seconds: float = 0.0

    def num_accepted(self, seq_id: str) -> int:
        """Drafts accepted for a sequence that verified drafts this step."""
        return len(self.sampled[seq_id]) - 1

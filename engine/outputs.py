"""What the engine returns: vLLM-shaped outputs and the ``EngineClient`` seam.

Torch-free, so the API layer can import it. A streamed request yields
``RequestOutput`` objects in *delta* form: each ``CompletionOutput`` carries the
token ids, text and logprobs produced since the previous yield for that
completion index; ``finish_reason`` is set on the last one. ``LLM.generate``
folds the deltas into whole outputs with ``RequestOutput.merge``.
"""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Protocol

from engine.sampling_params import SamplingParams

# One position's logprobs: {token_id: logprob}, the sampled/actual token first, then the top-k.
TokenLogprobs = dict[int, float]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's milestones; None until reached."""

    arrival_time: float
    scheduled_time: float | None = None  # first scheduled (queue time ends)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_draft_tokens: int = 0  # speculative drafts verified for this request
    num_accepted_tokens: int = 0  # of which accepted


@dataclasses.dataclass
class KVControl:
    """A KV hand-off's control message: everything but the latent rows (``engine.kv_connector``)
    that a decode engine needs to continue the sequence."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int  # completion index (the seed of a seeded sequence derives from it)
    output_token_ids: list[int]  # generated so far: before this leg, then the first token(s) of the prefill
    output_logprobs: list[TokenLogprobs | None]  # aligned with output_token_ids
    cumulative_logprob: float
    prompt_logprobs: list[TokenLogprobs | None] | None
    num_tokens: int  # positions whose rows were sent
    num_layers: int  # cache layers of the sender (MTP included)
    num_reported: int  # output tokens the client had before this leg (not reported again)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    handed_off: bool = False  # prefill role: the sequence continues on a decode engine (its KV left)

    def merge(self, delta: "RequestOutput") -> None:
        """Fold a later delta of the same request into this (accumulated) output."""
        by_index = {o.index: o for o in self.outputs}
        for d in delta.outputs:
            acc = by_index.get(d.index)
            if acc is None:
                acc = CompletionOutput(index=d.index, logprobs=[] if d.logprobs is not None else None)
                self.outputs.append(acc)
                by_index[d.index] = acc
            acc.text += d.text
            acc.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                acc.logprobs = (acc.logprobs or []) + d.logprobs
            if d.cumulative_logprob is not None:
                acc.cumulative_logprob = d.cumulative_logprob
            acc.finish_reason = d.finish_reason or acc.finish_reason
            acc.stop_reason = d.stop_reason if d.stop_reason is not None else acc.stop_reason
        self.outputs.sort(key=lambda o: o.index)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finished = delta.finished
        self.handed_off = delta.handed_off
        self.metrics = delta.metrics or self.metrics


@dataclasses.dataclass
class GenerateRequest:
    """What an API surface hands to an ``EngineClient``: already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    priority: int = 0  # lower runs first when the scheduler is in priority mode


@dataclasses.dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_reserved: int = 0  # decode role: room held for sequences whose KV is on its way (not in used)
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    num_preemptions: int = 0
    # speculative decoding (cumulative): verify passes with drafts, draft tokens, accepted ones,
    # and accepted counts by draft position (index 0 = first draft)
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineError(RuntimeError):
    """The engine cannot take or finish a request (shut down, failed)."""


class EngineStartError(EngineError):
    """The engine process could not load its model; the message is the cause's ``Type: text``."""


class EngineOverloaded(EngineError):
    """Too many requests waiting; the API answers 429 / RESOURCE_EXHAUSTED."""


class Admission:
    """Sequences in flight against ``limit`` (0: no limit), counted where requests arrive (the event
    loop), so a burst is seen whole: the dev server's engine and the PD router admit the same way."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.in_flight = 0

    def admit(self, n: int) -> "AdmissionSlot":
        """Room for ``n`` more sequences, or ``EngineOverloaded`` past the limit."""
        if self.limit and self.in_flight + n > self.limit:
            raise EngineOverloaded(f"{self.in_flight} sequences in flight, {n} more would pass the limit of "
                                   f"{self.limit}")
        self.in_flight += n
        return AdmissionSlot(self, n)


class AdmissionSlot:
    """One request's sequences; ``release`` gives them back once (later calls do nothing). Release
    before the caller sees a request's last output, so its next request fits."""

    def __init__(self, admission: Admission, n: int):
        self._admission, self._n = admission, n

    def release(self) -> None:
        self._admission.in_flight -= self._n
        self._n = 0


class EngineClient(Protocol):
    """The seam between API surfaces and whatever runs the model (local engine or PD router)."""

    model_name: str
    max_model_len: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> bool: ...

    def stats(self) -> EngineStats: ...

"""A sequence inside the engine, and how it ends.

One ``Request`` per generated sequence: a user request with ``n > 1`` becomes n
sequences sharing a ``parent_id`` (ids ``<parent>`` for index 0, ``<parent>#i``
after). The scheduler's only rule is that ``num_computed_tokens`` catches up
with ``num_tokens`` (prompt + generated): a prompt, a chunk of it, a prefix-cache
hit, a recompute after preemption, KV received from a prefill engine and
speculative tokens are all that one rule.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams, max_new_tokens


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HANDED_OFF = "handed_off"  # prefill role: first token sampled, KV sent to a decode engine, blocks freed
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int]
    max_model_len: int
    parent_id: str = ""
    index: int = 0  # completion index within the parent
    priority: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.time)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    seed: int | None = None  # the sequence's own seed (``sequence_seed``); None = unseeded
    wait_for: "Request | None" = None  # n > 1: start after this sibling's prompt is computed (prefix sharing)
    kv_received: bool = False  # its first num_computed_tokens rows came from a prefill engine (blocks held)
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)  # MTP drafts to verify next step
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of which accepted
    metrics: RequestMetrics = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.parent_id = self.parent_id or self.request_id
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token: int, logprob: float, top: dict[int, float] | None) -> bool:
        """Append a generated token (with its raw logprob); True when a token-level stop ended the request."""
        self.output_token_ids.append(token)
        self.cumulative_logprob += logprob
        if self.params.logprobs is not None:
            self.output_logprobs.append(top)
        return self.check_stop_token(token)

    def truncate_output(self, length: int) -> None:
        """Drop generated tokens past ``length`` (a stop string ended the text earlier)."""
        del self.output_token_ids[length:]
        del self.output_logprobs[length:]

    @property
    def max_tokens(self) -> int:
        """Generated tokens allowed: max_tokens, bounded by the context length."""
        return max_new_tokens(self.params.max_tokens, self.num_prompt_tokens, self.max_model_len)

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def check_stop_token(self, token: int) -> bool:
        """Token-level stops after appending ``token``; sets finish/stop reasons. Stop strings are checked by the engine."""
        n_out = len(self.output_token_ids)
        if n_out >= self.params.min_tokens:
            if not self.params.ignore_eos and token in self.eos_token_ids:
                self.finish_reason, self.stop_reason = "stop", None
                return True
            if token in self.params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token
                return True
        if n_out >= self.max_tokens:
            self.finish_reason = "length"
            return True
        return False

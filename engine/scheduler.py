"""Continuous batching with one rule: each request's computed tokens catch up to its known tokens.

Queues: ``waiting`` (FCFS, or by ``(priority, arrival)`` in priority mode) and
``running`` (admission order). Each ``schedule()``:

1. running requests first, in order: each gets ``num_tokens - num_computed``
   new tokens, cut to what is left of the step's token budget (chunked
   prefill); if its blocks cannot be allocated, the lowest-priority running
   request is preempted (blocks freed, ``num_computed = 0``, back to the front
   of ``waiting``: recompute) until they can;
2. then, unless something was preempted this step, waiting requests are
   admitted while the budget, the running cap and the free blocks allow; a
   newly admitted request first takes its cached prefix.

A request samples a token in a step when that step brings it fully up to date.
``update()`` appends sampled tokens, applies token-level stops and frees the
blocks of finished requests. Nothing here knows about prefill or decode phases.

What the executor gets is ``SchedulerOutput.step``, a torch-free ``StepInput``
(``engine.step``): the scheduler remembers how many tokens and blocks of each
sequence the runners already know and sends only what is new; a sequence is sent
whole the first time it is scheduled and again after a preemption.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus
from engine.step import KVSave, NewSequence, ScheduledSequence, StepInput, StepOutput
from engine.structured_output import grammar_of


@dataclasses.dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority
    lookahead: int = 0  # extra cache slots per request for speculative drafts
    # no drafts verified or proposed in a step that starts with this many running sequences (0: no limit)
    spec_disable_batch_size: int = 0


@dataclasses.dataclass
class ScheduledRequest:
    req: Request
    num_new_tokens: int  # known tokens computed this step (drafts included)
    sample: bool  # this step completes the known tokens: sample the next one (verify the drafts)
    num_draft_tokens: int = 0  # the last ones of the new tokens are drafts to verify

    @property
    def start(self) -> int:
        """Position of the first new token."""
        return self.req.num_computed_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_tokens: int
    step: StepInput | None = None  # what the executor runs (None when nothing is scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.stream_kv = False  # prefill role with layer-wise KV streaming: save every computed position
        self._synced: dict[str, tuple[int, int]] = {}  # seq id -> (tokens, blocks) the runners know
        self._forget: list[str] = []  # sequences the runners may drop, sent with the next step
        self._streamed: dict[str, int] = {}  # stream_kv: positions of a sequence already sent
        self._step_id = 0

    # ---- queue management ---------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        if self.config.policy == "priority":
            key = (req.priority, req.arrival_time)
            i = next((i for i, r in enumerate(self.waiting) if (r.priority, r.arrival_time) > key), len(self.waiting))
            self.waiting.insert(i, req)
        else:
            self.waiting.append(req)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request for any reason (stop, length, abort); frees its blocks."""
        if req.finished:
            return
        if req.status == RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason
        if stop_reason is not None:
            req.stop_reason = stop_reason
        req.metrics.finished_time = time.time()
        self._drop(req)

    def hand_off(self, req: Request) -> None:
        """Prefill role: the request's KV and first token went to a decode engine; it ends here."""
        self.running.remove(req)
        req.status = RequestStatus.HANDED_OFF
        self._drop(req)

    def _drop(self, req: Request) -> None:
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        self._streamed.pop(req.request_id, None)
        self._unsync(req)

    def _unsync(self, req: Request) -> None:
        if self._synced.pop(req.request_id, None) is not None:
            self._forget.append(req.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        limit = self.config.spec_disable_batch_size
        propose = not limit or len(self.running) < limit
        if not propose:
            for req in self.running:
                req.spec_token_ids = []  # a batch this large decodes faster without verifying drafts

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens > budget:
                req.spec_token_ids = []  # drafts are verified whole or not at all
            n = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while self._allocate(req, n) is None:
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1
                    budget += self._unschedule(victim, scheduled)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue  # req itself was preempted; running[i] is now the next one
            scheduled.append(self._entry(req, n))
            budget -= n
            i += 1

        if not preempted:
            budget = self._admit(budget, scheduled)
        out = SchedulerOutput(scheduled, preempted, self.config.max_num_batched_tokens - budget)
        if scheduled:
            out.step = self._step_input(scheduled)
            out.step.propose = propose
        return out

    def _step_input(self, scheduled: list[ScheduledRequest]) -> StepInput:
        """The torch-free message: per sequence, only what its runner does not know yet."""
        seqs = []
        for s in scheduled:
            req = s.req
            table = self.kv.block_table(req.request_id)
            known = self._synced.get(req.request_id)
            entry = ScheduledSequence(req.request_id, s.start, s.num_new_tokens, s.sample,
                                      draft_token_ids=list(req.spec_token_ids) if s.num_draft_tokens else [])
            if known is None:
                entry.new = NewSequence(list(req.prompt_token_ids), list(req.output_token_ids), req.params,
                                        req.eos_token_ids, req.seed, list(table),
                                        grammar_of(req.params.structured_outputs))
            else:
                tokens, blocks = known
                entry.new_token_ids = req.all_token_ids[tokens:]
                entry.new_block_ids = table[blocks:]
            self._synced[req.request_id] = (req.num_tokens, len(table))
            seqs.append(entry)
        self._step_id += 1
        saves = self._kv_saves(scheduled) if self.stream_kv else []
        forget, self._forget = self._forget, []
        return StepInput(self._step_id, seqs, forget, saves)

    def _kv_saves(self, scheduled: list[ScheduledRequest]) -> list[KVSave]:
        """Every position computed so far and not yet sent (a recompute after preemption is not resent)."""
        saves = []
        for s in scheduled:
            sent, end = self._streamed.get(s.req.request_id, 0), s.start + s.num_new_tokens
            if end > sent:
                saves.append(KVSave(s.req.request_id, sent, end - sent))
                self._streamed[s.req.request_id] = end
        return saves

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.wait_for is not None and not self._sibling_ready(req.wait_for):
                skipped.append(self.waiting.popleft())
                continue
            if req.num_computed_tokens == 0 and req.params.prompt_logprobs is None:  # (scores need every position)
                req.num_computed_tokens = self.kv.match_prefix(req.request_id, req.all_token_ids)
                req.metrics.num_cached_tokens = max(req.metrics.num_cached_tokens, req.num_computed_tokens)
            n = req.num_tokens - req.num_computed_tokens
            if n > budget and not self.config.enable_chunked_prefill:
                self._release(req)
                break
            n = min(n, budget)
            if self._allocate(req, n) is None:
                self._release(req)
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            if req.metrics.scheduled_time is None:
                req.metrics.scheduled_time = time.time()
            scheduled.append(self._entry(req, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _allocate(self, req: Request, n: int) -> list[int] | None:
        return self.kv.allocate(req.request_id, req.num_computed_tokens + n + self.config.lookahead)

    @staticmethod
    def _entry(req: Request, n: int) -> ScheduledRequest:
        drafts = len(req.spec_token_ids)
        sample = req.num_computed_tokens + n == req.num_tokens + drafts
        return ScheduledRequest(req, n, sample, drafts if sample else 0)

    def _sibling_ready(self, sibling: Request) -> bool:
        return sibling.status != RequestStatus.WAITING and (
            sibling.finished or sibling.num_computed_tokens >= sibling.num_prompt_tokens)

    def _release(self, req: Request) -> None:
        """Undo an admission attempt that did not fit (prefix blocks returned; received KV kept)."""
        if not req.kv_received:
            self.kv.free(req.request_id)
            req.num_computed_tokens = 0

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    @staticmethod
    def _unschedule(req: Request, scheduled: list[ScheduledRequest]) -> int:
        entry = next(s for s in scheduled if s.req is req)
        scheduled.remove(entry)
        return entry.num_new_tokens

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        self._unsync(req)
        req.num_computed_tokens = 0
        req.kv_received = False  # recompute from tokens, like any preempted request
        req.spec_token_ids = []
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the model ran ------------------------------------------------------------
    def update(self, out: SchedulerOutput, model_out: StepOutput) -> list[Request]:
        """Advance computed tokens, append sampled ones (accepted drafts + bonus), apply token stops.

        ``model_out`` carries, per request that sampled, its new tokens with their logprobs and
        (speculative decoding) the drafts to verify next step. Returns the requests with new tokens.
        """
        now = time.time()
        updated: list[Request] = []
        for s in out.scheduled:
            req = s.req
            scored = model_out.prompt_logprobs.get(req.request_id)
            if scored is not None:
                if s.start == 0:
                    req.prompt_logprobs = [None]
                req.prompt_logprobs.extend(scored)
            if not s.sample:
                req.num_computed_tokens += s.num_new_tokens
                self.kv.commit_computed(req.request_id, req.all_token_ids, req.num_computed_tokens)
                continue
            tokens = model_out.sampled[req.request_id]
            accepted = len(tokens) - 1  # drafts accepted; the last token is the bonus / sampled one
            req.num_computed_tokens += s.num_new_tokens - (s.num_draft_tokens - accepted)
            req.num_draft_tokens += s.num_draft_tokens
            req.num_accepted_tokens += accepted
            req.spec_token_ids = []
            # positions < num_computed now hold the old tokens and the accepted drafts
            self.kv.commit_computed(req.request_id, req.all_token_ids + tokens[:accepted], req.num_computed_tokens)
            for token, (lp, top) in zip(tokens, model_out.scores[req.request_id]):
                if req.append_token(token, lp, top):
                    self.finish(req, req.finish_reason)
                    break
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            updated.append(req)
            if not req.finished:
                req.spec_token_ids = self._trim_drafts(req, model_out.drafts.get(req.request_id, []))
        return updated

    @staticmethod
    def _trim_drafts(req: Request, drafts: list[int]) -> list[int]:
        """Never draft past max_tokens or the context: a step adds at most len(drafts) + 1 tokens."""
        room = min(req.max_tokens - len(req.output_token_ids), req.max_model_len - req.num_tokens) - 1
        return drafts[: max(room, 0)]

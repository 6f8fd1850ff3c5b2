"""The engine: one model replica, its scheduler and cache, driven step by step.

``step()`` is schedule → run → update → outputs. Requests enter with
``add_request`` and leave finished (stop / length), aborted, or — in role
``prefill`` — parked after their first token until ``export_kv`` hands their
latent rows to a decode engine, which continues them from
``add_request(..., kv=payload)``. Role ``colocated`` never parks.

Outputs are deltas (see ``engine.outputs``): each step reports, per user
request, the tokens, text and logprobs its sequences produced since the last
report.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from engine.args import EngineArgs
from engine.checkpoint.loader import load_config
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager
from engine.kv_transfer import KVPayload
from engine.model.kv_cache_fp8 import payload_width_ok
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParamError, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.tokenizer import Tokenizer

log = logging.getLogger("pdserve.engine")


@dataclasses.dataclass
class _Sequence:
    """Engine-side extras of a sequence: its detokenizer and how much of it was reported."""

    req: Request
    detok: IncrementalDetokenizer | None
    num_reported: int = 0  # output tokens already reported
    final_sent: bool = False


@dataclasses.dataclass
class StepTimings:
    """Cumulative wall time split of ``step()``: model forward vs everything else."""

    steps: int = 0
    forward_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclasses.dataclass
class SpecStats:
    """Speculative decoding counters: verify passes, drafts, accepted drafts by position."""

    k: int
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.k

    def record(self, out, model_out) -> None:
        for s in out.scheduled:
            if s.num_draft_tokens:
                accepted = len(model_out.sampled[s.req.request_id]) - 1
                self.drafts += 1
                self.draft_tokens += s.num_draft_tokens
                self.accepted_tokens += accepted
                for i in range(accepted):
                    self.accepted_per_position[i] += 1


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.role = args.role
        self.config = load_config(args.model)
        self.tokenizer = Tokenizer.from_dir(args.model) if Tokenizer.available(args.model) else None
        self.runner = ModelRunner(args, self.config)
        self.kv = KVCacheManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill,
                            args.scheduling_policy, args.lookahead), self.kv)
        limit = args.max_model_len or self.config.max_position_embeddings
        capacity = self.runner.num_blocks * args.block_size - args.lookahead
        if capacity < limit:
            log.warning("max_model_len lowered from %d to %d: the KV cache holds no longer sequence", limit, capacity)
        self.max_model_len = min(limit, capacity, self.config.max_position_embeddings)
        self.eos_token_ids = self.config.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.sequences: dict[str, list[_Sequence]] = {}  # user request id -> its sequences
        self.timings = StepTimings()
        self.spec = SpecStats(args.num_speculative_tokens)

    @property
    def model_name(self) -> str:
        return self.args.model_name

    # ---- requests in ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, kv: KVPayload | None = None) -> None:
        """Queue a request; raises ValueError (naming the parameter) when it cannot be served."""
        if request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already running")
        self._validate(prompt_token_ids, params)
        if kv is not None:
            self.sequences[request_id] = [self._import(request_id, kv, priority)]
            self.scheduler.add(self.sequences[request_id][0].req)
            return
        if self.role == "prefill" and params.n != 1:
            raise SamplingParamError("n", "a prefill engine runs one sequence per request; fan out n at the router")
        seqs: list[_Sequence] = []
        for i in range(params.n):
            req = Request(
                request_id=request_id if i == 0 else f"{request_id}#{i}",
                prompt_token_ids=list(prompt_token_ids), params=params, eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len, parent_id=request_id, index=i, priority=priority,
                generator=self._generator(params.seed, i),
                wait_for=seqs[0].req if i and self.args.enable_prefix_caching else None,
            )
            seqs.append(_Sequence(req, self._detokenizer(req)))
        self.sequences[request_id] = seqs
        for s in seqs:
            self.scheduler.add(s.req)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt:
            raise SamplingParamError("prompt", "must contain at least one token")
        vocab = self.config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt):
            raise SamplingParamError("prompt", f"token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingParamError("logit_bias", f"token id {max(params.logit_bias)} is outside the vocabulary "
                                                   f"[0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise SamplingParamError(
                "prompt", f"{len(prompt)} prompt tokens leave no room to generate (max_model_len {self.max_model_len})")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise SamplingParamError(
                "max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                              f"the context length ({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise SamplingParamError("stop", "stop strings need a tokenizer; this model directory has none")

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device=self.runner.device)
        g.manual_seed((seed + index * 1_000_003) % 2**63)
        return g

    def _detokenizer(self, req: Request) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        prompt = req.prompt_token_ids
        resumed = min(req.params.resumed_output_tokens, len(prompt) - 1)
        detok = IncrementalDetokenizer(self.tokenizer.hf, prompt[:len(prompt) - resumed], req.params)
        if resumed:
            # a resumed sequence: replay what the failed worker already streamed, so a character or
            # stop string split across the resume point continues exactly as it would have there
            detok.add(prompt[len(prompt) - resumed:])
        return detok

    def _import(self, request_id: str, kv: KVPayload, priority: int) -> _Sequence:
        """A decode-role request continuing from a prefill engine's payload."""
        width_ok = payload_width_ok(kv.rows, self.config.kv_lora_rank, self.config.qk_rope_head_dim)
        if kv.num_layers != self.runner.model.num_cache_layers or not width_ok:
            raise ValueError(f"kv: payload shape {tuple(kv.rows.shape)} does not fit this model's cache")
        req = Request(request_id=request_id, prompt_token_ids=list(kv.prompt_token_ids), params=kv.params,
                      eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len, priority=priority,
                      generator=kv.restore_generator(self.runner.device))
        req.output_token_ids = list(kv.output_token_ids)
        req.output_logprobs = list(kv.output_logprobs)
        req.cumulative_logprob = kv.cumulative_logprob
        req.num_computed_tokens = kv.num_tokens
        req.kv_import = kv.rows
        seq = _Sequence(req, self._detokenizer(req))
        return seq

    def abort(self, request_id: str) -> None:
        """End a user request wherever it is (queued, running, parked); its blocks are freed at once."""
        for seq in self.sequences.pop(request_id, []):
            self.scheduler.finish(seq.req, "abort")

    # ---- one step ----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.empty:
            return []
        tables = {s.req.request_id: self.kv.block_table(s.req.request_id) for s in out.scheduled}
        model_out = self.runner.execute(out, tables)
        self.spec.record(out, model_out)
        updated = self.scheduler.update(out, model_out)
        if self.role == "prefill":
            for req in updated:
                if not req.finished:
                    self.scheduler.park(req)
        outputs = self._collect(updated)
        self.timings.steps += 1
        self.timings.forward_seconds += model_out.forward_seconds
        self.timings.total_seconds += time.perf_counter() - t0
        return outputs

    def _collect(self, updated: list[Request]) -> list[RequestOutput]:
        """Deltas of every user request that got a token or finished since the last report."""
        outputs = []
        for pid in dict.fromkeys(r.parent_id for r in updated):
            seqs = self.sequences.get(pid)
            if seqs is None:
                continue
            deltas = [d for d in (self._delta(s) for s in seqs) if d is not None]
            done = all(s.req.finished or s.req.status == RequestStatus.PARKED for s in seqs)
            if not deltas and not done:
                continue
            first = seqs[0].req
            first.metrics.num_draft_tokens = sum(s.req.num_draft_tokens for s in seqs)
            first.metrics.num_accepted_tokens = sum(s.req.num_accepted_tokens for s in seqs)
            outputs.append(RequestOutput(
                request_id=pid, prompt_token_ids=first.prompt_token_ids, outputs=deltas, finished=done,
                prompt_logprobs=first.prompt_logprobs if first.num_computed_tokens >= first.num_prompt_tokens else None,
                metrics=first.metrics))
            if done and all(s.req.finished for s in seqs):
                del self.sequences[pid]
        return outputs

    def _delta(self, seq: _Sequence) -> CompletionOutput | None:
        """What one sequence produced since its last report; None when nothing is new."""
        req = seq.req
        new = req.output_token_ids[seq.num_reported:]
        if not new and (seq.final_sent or not req.finished):
            return None
        text = ""
        if seq.detok is not None:
            for i, token in enumerate(new):  # one at a time: a step may bring several (speculative)
                text += seq.detok.add([token])
                if seq.detok.stop_reason is not None:
                    req.truncate_output(seq.num_reported + i + 1)
                    new = new[: i + 1]
                    self.scheduler.finish(req, "stop")  # no-op when a token stop came in the same step
                    req.finish_reason, req.stop_reason = "stop", seq.detok.stop_reason  # the string came first
                    break
            if req.finished and seq.detok.stop_reason is None:
                text += seq.detok.finish()
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = req.output_logprobs[seq.num_reported:seq.num_reported + len(new)]
        seq.num_reported = len(req.output_token_ids)
        seq.final_sent = req.finished
        return CompletionOutput(
            index=req.index, text=text, token_ids=new, logprobs=logprobs,
            cumulative_logprob=req.cumulative_logprob, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason)

    # ---- KV hand-off ---------------------------------------------------------------------
    def export_kv(self, request_id: str) -> KVPayload:
        """Prefill role: the parked request's latent rows + first token + sampling state; frees its blocks."""
        seqs = self.sequences.get(request_id)
        if not seqs or seqs[0].req.status != RequestStatus.PARKED:
            raise KeyError(f"{request_id}: no parked request to export (not prefilled, finished or aborted)")
        req = seqs[0].req
        rows = self.runner.export_kv(self.kv.block_table(req.request_id), req.num_computed_tokens)
        payload = KVPayload.from_request(req, rows)
        self.abort(request_id)
        return payload

    # ---- observability --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=self.kv.num_blocks, kv_blocks_used=self.kv.num_used_blocks,
            prefix_cache_queries=self.kv.prefix_queries, prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, spec_drafts=self.spec.drafts,
            spec_draft_tokens=self.spec.draft_tokens, spec_accepted_tokens=self.spec.accepted_tokens,
            spec_accepted_per_position=list(self.spec.accepted_per_position))

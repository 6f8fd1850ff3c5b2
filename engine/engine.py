"""The engine: one model replica, its scheduler and cache, driven step by step.

``step()`` is schedule → execute → update → outputs: the scheduler's torch-free
``StepInput`` goes to an ``Executor`` (one rank in process, or many), its
``StepOutput`` comes back (``engine.step``). Requests enter with ``add_request``
and leave finished (stop / length), aborted, or — in role ``prefill`` — handed off
after their first token: their latent rows and a ``KVControl`` go out through the
KV connector (``engine.kv_connector``) and their blocks are freed. A decode engine
takes such a sequence in three moves, all on this thread: ``reserve_kv`` (blocks
for the rows), ``load_kv`` (each arriving piece), ``add_request(..., kv=control)``;
``add_request(..., kv=payload)`` does all three for an in-process hand-off. Role
``colocated`` does neither.

A ``Continuation`` beside the (frozen) ``SamplingParams`` continues a sequence
that already produced tokens elsewhere (the router's resume): they count as
output, are replayed into the detokenizer, and are not reported again.

Outputs are deltas (see ``engine.outputs``): each step reports, per user
request, the tokens, text and logprobs its sequences produced since the last
report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

from engine.args import EngineArgs
from engine.checkpoint.loader import load_config
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import Executor, LocalExecutor
from engine.kv_cache import KVCacheManager
from engine.kv_connector import KVConnector, KVOutbox, KVPayload, KVPiece
from engine.model.config import ModelConfig
from engine.model.kv_cache_fp8 import payload_width_ok
from engine.outputs import CompletionOutput, EngineStats, KVControl, RequestOutput
from engine.request import Request
from engine.sampling_params import (Continuation, SamplingParamError, SamplingParams, max_new_tokens,
                                    sequence_seed)
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.step import StepOutput
from engine.structured_output import check_grammar
from engine.tokenizer import Tokenizer

log = logging.getLogger("pdserve.engine")


@dataclasses.dataclass
class _Sequence:
    """Engine-side extras of a sequence: its detokenizer and how much of it was reported."""

    req: Request
    detok: IncrementalDetokenizer | None
    num_reported: int = 0  # output tokens already reported (or reported before this leg)
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

    def record(self, out: SchedulerOutput, result: StepOutput) -> None:
        for s in out.scheduled:
            if s.num_draft_tokens:
                accepted = result.num_accepted(s.req.request_id)
                self.drafts += 1
                self.draft_tokens += s.num_draft_tokens
                self.accepted_tokens += accepted
                for i in range(accepted):
                    self.accepted_per_position[i] += 1


class LLMEngine:
    def __init__(self, args: EngineArgs,
                 make_executor: Callable[[EngineArgs, ModelConfig, KVOutbox], Executor] = LocalExecutor):
        """``make_executor(args, model config, KV outbox)``: the ranks this engine drives (default: one,
        in this process; ``engine.multirank.MultiRankExecutor`` leads a replica of a multi-rank instance)."""
        self.args = args
        self.role = args.role
        self.config = load_config(args.model)
        self.tokenizer = Tokenizer.from_dir(args.model) if Tokenizer.available(args.model) else None
        outbox = KVOutbox()
        self.executor = make_executor(args, self.config, outbox)
        self.kv = KVCacheManager(self.executor.num_blocks, args.block_size, args.enable_prefix_caching)
        self.connector = KVConnector(self.kv, outbox, args.kv_transfer)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill,
                            args.scheduling_policy, args.lookahead,
                            args.speculative_disable_by_batch_size if args.speculative else 0), self.kv)
        self.scheduler.stream_kv = self.role == "prefill" and args.kv_transfer == "layerwise"
        limit = args.max_model_len or self.config.max_position_embeddings
        capacity = self.executor.num_blocks * args.block_size - args.lookahead
        if capacity < limit:
            log.warning("max_model_len lowered from %d to %d: the KV cache holds no longer sequence", limit, capacity)
        self.max_model_len = min(limit, capacity, self.config.max_position_embeddings)
        self.eos_token_ids = self.config.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else [])
        self.sequences: dict[str, list[_Sequence]] = {}  # user request id -> its sequences
        self.timings = StepTimings()
        self.spec = SpecStats(args.num_speculative_tokens)
        self._warned_mtp_rows = False

    @property
    def model_name(self) -> str:
        return self.args.model_name

    @property
    def runner(self):
        """The model runner of a one-rank engine (tests and tools)."""
        return self.executor.runner

    # ---- requests in ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, continuation: Continuation | None = None,
                    kv: KVControl | KVPayload | None = None) -> None:
        """Queue a request; raises ValueError (naming the parameter) when it cannot be served.

        ``kv``: a sequence handed off by a prefill engine — its ``KVControl`` once its rows are
        loaded (``reserve_kv`` + ``load_kv``), or a whole ``KVPayload`` (in-process)."""
        if request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if isinstance(kv, KVPayload):
            self._receive(request_id, kv)
            kv = kv.control
        if kv is not None:
            self._add_received(request_id, kv, priority)
            return
        cont = continuation or Continuation()
        self._validate(prompt_token_ids, params, len(cont.output_token_ids))
        if params.n != 1 and (self.role == "prefill" or cont.output_token_ids):
            raise SamplingParamError("n", "a prefill engine or a continued sequence runs one sequence per request; "
                                          "fan out n at the router")
        seqs: list[_Sequence] = []
        for i in range(params.n):
            index = cont.index + i
            req = Request(
                request_id=request_id if i == 0 else f"{request_id}#{i}",
                prompt_token_ids=list(prompt_token_ids), params=params, eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len, parent_id=request_id, index=index, priority=priority,
                seed=sequence_seed(params.seed, index), output_token_ids=list(cont.output_token_ids),
                output_logprobs=[None] * len(cont.output_token_ids), cumulative_logprob=cont.cumulative_logprob,
                wait_for=seqs[0].req if i and self.args.enable_prefix_caching else None,
            )
            seqs.append(self._sequence(req, num_reported=len(cont.output_token_ids)))
        self.sequences[request_id] = seqs
        if self.role == "prefill":
            self.connector.outbox.open(request_id)
        for s in seqs:
            self.scheduler.add(s.req)

    def _validate(self, prompt: list[int], params: SamplingParams, num_generated: int) -> None:
        params.validate()
        if not prompt:
            raise SamplingParamError("prompt", "must contain at least one token")
        vocab = self.config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt):
            raise SamplingParamError("prompt", f"token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingParamError("logit_bias", f"token id {max(params.logit_bias)} is outside the vocabulary "
                                                   f"[0, {vocab})")
        if len(prompt) + num_generated >= self.max_model_len:
            raise SamplingParamError(
                "prompt", f"{len(prompt) + num_generated} prompt tokens leave no room to generate "
                          f"(max_model_len {self.max_model_len})")
        if params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise SamplingParamError(
                "max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                              f"the context length ({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise SamplingParamError("stop", "stop strings need a tokenizer; this model directory has none")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise SamplingParamError("structured_outputs", "structured output needs a tokenizer; this model "
                                                               "directory has none")
            check_grammar(params.structured_outputs, self.args.model, self.eos_token_ids)  # invalid: a 400

    def _sequence(self, req: Request, num_reported: int) -> _Sequence:
        """The engine's side of a sequence; its first ``num_reported`` output tokens were reported
        before (another leg): the detokenizer replays them silently, so a character or a stop string
        split across the hand-over continues exactly as it would have."""
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer.hf, req.prompt_token_ids, req.params)
            if num_reported:
                detok.add(req.output_token_ids[:num_reported])
        return _Sequence(req, detok, num_reported=num_reported)

    def abort(self, request_id: str) -> None:
        """End a user request wherever it is (queued, running, reserved, handed off); its blocks are freed at once."""
        for seq in self.sequences.pop(request_id, []):
            self.scheduler.finish(seq.req, "abort")
        self.connector.outbox.drop(request_id)
        self.connector.release(request_id)

    # ---- KV arriving from a prefill engine (decode role) ----------------------------------
    def reserve_kv(self, request_id: str, num_kv_tokens: int, num_total_tokens: int) -> list[int] | None:
        """Blocks for ``num_kv_tokens`` incoming rows (their ids), room held up to ``num_total_tokens``;
        None when the cache is too full now."""
        if request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already running")
        return self.connector.reserve(request_id, num_kv_tokens, num_total_tokens)

    def load_kv(self, request_id: str, piece: KVPiece) -> None:
        """Write one arriving piece into the request's reserved blocks."""
        r = self.connector.reservation(request_id)
        layers = self.executor.num_cache_layers
        if piece.start + piece.num_tokens > r.num_tokens or piece.first_layer + piece.num_layers > layers:
            raise ValueError(f"kv: piece (layers {piece.first_layer}+{piece.num_layers}, positions {piece.start}"
                             f"+{piece.num_tokens}) is outside the reservation ({layers} layers, {r.num_tokens} rows)")
        if not payload_width_ok(piece.rows, self.config.kv_lora_rank, self.config.qk_rope_head_dim):
            raise ValueError(f"kv: rows of width {piece.rows.shape[-1]} ({piece.rows_dtype}) do not fit this model")
        self.executor.write_kv(r.block_ids, piece)

    def release_kv(self, request_id: str) -> None:
        self.connector.release(request_id)

    def _receive(self, request_id: str, payload: KVPayload) -> None:
        c = payload.control
        total = len(c.prompt_token_ids) + max_new_tokens(c.params.max_tokens, len(c.prompt_token_ids),
                                                          self.max_model_len)
        if self.reserve_kv(request_id, c.num_tokens, max(total, c.num_tokens)) is None:
            raise ValueError(f"kv: no room for {total} tokens in this engine's cache")
        for piece in payload.pieces:
            self.load_kv(request_id, piece)

    def _add_received(self, request_id: str, c: KVControl, priority: int) -> None:
        """A decode-role sequence continuing from a prefill engine; its rows are already loaded."""
        if not self.config.num_hidden_layers <= c.num_layers <= self.executor.num_cache_layers:
            self.connector.release(request_id)
            raise ValueError(f"kv: {c.num_layers} cache layers sent, this model has {self.executor.num_cache_layers}")
        if c.num_layers < self.executor.num_computed_layers and not self._warned_mtp_rows:
            self._warned_mtp_rows = True  # drafts stay lossless, but attend to MTP rows nobody computed
            log.warning("the prefill engine sends no MTP-layer rows (it runs without speculative decoding); "
                        "MTP drafts here will be accepted less often")
        self.connector.take(request_id, c)
        req = Request(request_id=request_id, prompt_token_ids=list(c.prompt_token_ids), params=c.params,
                      eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len, index=c.index,
                      priority=priority, seed=sequence_seed(c.params.seed, c.index),
                      output_token_ids=list(c.output_token_ids), output_logprobs=list(c.output_logprobs),
                      cumulative_logprob=c.cumulative_logprob, prompt_logprobs=c.prompt_logprobs,
                      num_computed_tokens=c.num_tokens, kv_received=True)
        self.sequences[request_id] = [self._sequence(req, c.num_reported)]
        self.scheduler.add(req)

    # ---- one step ----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.empty:
            self.executor.idle()
            return []
        result = self.executor.execute(out.step)
        self.spec.record(out, result)
        updated = self.scheduler.update(out, result)
        outputs = self._collect(updated)
        if self.role == "prefill":
            for output in outputs:
                if not output.finished:
                    self._hand_off(output)
                else:  # the first token ended it: nothing leaves
                    self.connector.outbox.drop(output.request_id)
        self.timings.steps += 1
        self.timings.forward_seconds += result.forward_seconds
        self.timings.total_seconds += time.perf_counter() - t0
        return outputs

    def _hand_off(self, output: RequestOutput) -> None:
        """Prefill role: the prompt is done and the first token did not end the sequence — its
        rows (all of them now, or what layer-wise streaming has not sent yet: nothing) and then
        its control message go to the outbox; it ends here and its blocks are freed."""
        (seq,) = self.sequences.pop(output.request_id)
        req = seq.req
        if self.connector.mode == "whole":
            table = self.kv.block_table(req.request_id)
            self.connector.outbox.put(self.executor.read_kv(req.request_id, table, req.num_computed_tokens))
        num_before = len(req.output_token_ids) - len(output.outputs[0].token_ids)
        self.connector.outbox.finish(KVControl(
            seq_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids), params=req.params, index=req.index,
            output_token_ids=list(req.output_token_ids), output_logprobs=list(req.output_logprobs),
            cumulative_logprob=req.cumulative_logprob, prompt_logprobs=req.prompt_logprobs,
            num_tokens=req.num_computed_tokens, num_layers=self.executor.num_computed_layers, num_reported=num_before))
        self.scheduler.hand_off(req)
        output.finished = output.handed_off = True

    def _collect(self, updated: list[Request]) -> list[RequestOutput]:
        """Deltas of every user request that got a token or finished since the last report."""
        outputs = []
        for pid in dict.fromkeys(r.parent_id for r in updated):
            seqs = self.sequences.get(pid)
            if seqs is None:
                continue
            deltas = [d for d in (self._delta(s) for s in seqs) if d is not None]
            done = all(s.req.finished for s in seqs)
            if not deltas and not done:
                continue
            first = seqs[0].req
            first.metrics.num_draft_tokens = sum(s.req.num_draft_tokens for s in seqs)
            first.metrics.num_accepted_tokens = sum(s.req.num_accepted_tokens for s in seqs)
            outputs.append(RequestOutput(
                request_id=pid, prompt_token_ids=first.prompt_token_ids, outputs=deltas, finished=done,
                prompt_logprobs=first.prompt_logprobs if first.num_computed_tokens >= first.num_prompt_tokens else None,
                metrics=first.metrics))
            if done:
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
        """Prefill role, in-process transport: the handed-off sequence's pieces and control."""
        if request_id not in self.connector.outbox:
            raise KeyError(f"{request_id}: nothing to export (not handed off, aborted or already taken)")
        pieces, control = self.connector.outbox.take(request_id, 0)
        if control is None:
            raise KeyError(f"{request_id}: not handed off yet (its prompt is still being computed)")
        return KVPayload(control, pieces)

    # ---- observability --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            kv_blocks_total=self.kv.num_blocks, kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_reserved=self.connector.num_reserved_blocks,
            prefix_cache_queries=self.kv.prefix_queries, prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, spec_drafts=self.spec.drafts,
            spec_draft_tokens=self.spec.draft_tokens, spec_accepted_tokens=self.spec.accepted_tokens,
            spec_accepted_per_position=list(self.spec.accepted_per_position))

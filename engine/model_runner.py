"""Runs one step on one rank: ``StepInput`` → inputs → forward → logits → ``StepOutput``.

Owns the model and the paged latent cache: per cache layer (main layers, then
MTP layers) one tensor ``[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]``, sized from a memory budget. Keeps its own state per sequence
(``_Sequence``: tokens, sampling parameters, block table, structured output's grammar
matcher), kept current by the step messages; it never sees the scheduler's objects.
A sequence with a grammar samples under its mask; its drafts are cut at the first token
the grammar rejects and verified under the mask of each verify row. Its ``KVConnectorWorker``
moves a sequence's latent rows out of / into the cache for the prefill → decode
hand-off.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable

import torch

from engine import cpu_memory, dtype_choice
from engine.args import EngineArgs
from engine.checkpoint.loader import iter_checkpoint_tensors, mtp_layers_to_load, read_index
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.model.fp8 import is_fp8_checkpoint
from engine.kv_connector import KVConnectorWorker, KVOutbox
from engine.model.kv_cache_fp8 import fp8_row_bytes
from engine.model.parallel import ParallelContext
from engine.rebalance import RankExperts
from engine.sampler import (Sampler, SamplingMetadata, SamplingRow, compute_logprobs_topk,
                            masked_logits_of_rows, position_generator)
from engine.sampling_params import SamplingParams
from engine.spec_decode import MTPJob, MTPProposer, VerifyGroup, verify
from engine.step import NewSequence, ScheduledSequence, StepInput, StepOutput
from engine.structured_output import GrammarBook, SequenceGrammar

log = logging.getLogger("pdserve.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclasses.dataclass
class _Sequence:
    """The runner's own copy of what it needs about a sequence (see ``engine.step``)."""

    prompt_token_ids: list[int]
    token_ids: list[int]  # prompt + generated, as far as the scheduler told us
    params: SamplingParams
    eos_token_ids: list[int]
    seed: int | None
    block_table: list[int]
    grammar: SequenceGrammar | None = None  # follows the generated tokens as far as the scheduler told us

    @classmethod
    def from_new(cls, new: NewSequence, grammars: GrammarBook) -> "_Sequence":
        grammar = None
        if new.grammar is not None:  # replays the tokens generated before (resume, hand-off, preemption)
            grammar = grammars.sequence(new.grammar, new.output_token_ids, new.eos_token_ids)
        return cls(list(new.prompt_token_ids), new.prompt_token_ids + new.output_token_ids, new.params,
                   new.eos_token_ids, new.seed, list(new.block_ids), grammar)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def row(self, device: torch.device, extra: list[int] | None = None, allowed=None) -> SamplingRow:
        """The sampler's view; ``extra`` = drafts counted in its history (verification), ``allowed`` = the
        grammar's mask after them (default: after the known tokens)."""
        output = self.token_ids[self.num_prompt_tokens:] + (extra or [])
        position = len(self.token_ids) + len(extra or [])
        if allowed is None and self.grammar is not None:
            allowed = self.grammar.allowed()
        return SamplingRow(self.params, self.prompt_token_ids, output, self.eos_token_ids,
                           position_generator(self.seed, position, device), allowed)


class ModelRunner:
    def __init__(self, args: EngineArgs, cfg: ModelConfig, outbox: KVOutbox | None = None,
                 parallel: ParallelContext | None = None, agree_blocks: Callable[[int], int] = lambda n: n,
                 fixed_passes: bool = False):
        """``parallel``: this rank's place in a multi-rank instance (its model holds only its share);
        ``agree_blocks``: turns this rank's affordable KV block count into the instance's (the minimum);
        ``fixed_passes``: every step makes the same MTP passes (ranks in lock-step, ``engine.multirank``)."""
        self.cfg = cfg
        self.role = args.role
        self.device = resolve_device(args.device)
        if self.device.type == "cpu":
            cpu_memory.keep_freed_memory()
        self.dtype_choice = dtype_choice.resolve(args.dtype, self.device.type)  # auto: by the hardware
        self.dtype = getattr(torch, self.dtype_choice.dtype)
        self.block_size = args.block_size
        self.mla_prefill = args.mla_prefill
        self.parallel = parallel or ParallelContext.single()
        torch.manual_seed(args.seed)
        self.model = self._load(args)
        self.cache_dtype = self.dtype
        self.kv_caches = self._allocate_cache(args, agree_blocks)
        self.kv_worker = KVConnectorWorker(self.kv_caches, self.block_size, cfg.kv_lora_rank, outbox)
        self.sequences: dict[str, _Sequence] = {}
        self.grammars = GrammarBook(args.model, cfg.vocab_size)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(args.seed))
        self.proposer = None
        if args.speculative == "mtp":
            self.proposer = MTPProposer(self.model, args.num_speculative_tokens, self.block_size, fixed_passes)
        self.kv_worker.sent_layers = range(self.num_computed_layers)
        self.experts = RankExperts(self.model, args.model, self.dtype, self._keep_fp8(args))
        if args.warmup:
            self.warm_up(args.max_num_batched_tokens, args.max_num_seqs, args.max_model_len)

    # ---- setup ------------------------------------------------------------------------
    def _load(self, args: EngineArgs) -> DeepseekV3ForCausalLM:
        with torch.device(self.device):
            # positions past the context: speculative rows of the MTP layer may run up to lookahead ahead
            max_positions = self.cfg.max_position_embeddings + args.lookahead
            fp8 = self._keep_fp8(args)
            mtp = mtp_layers_to_load(read_index(args.model), self.cfg, required=args.speculative == "mtp")
            model = DeepseekV3ForCausalLM(self.cfg, dtype=self.dtype, max_positions=max_positions,
                                          parallel=self.parallel, with_mtp=mtp, fp8=fp8)
        select = None if self.parallel.is_single else model.checkpoint_filter()  # only this rank's share
        model.load_weights(iter_checkpoint_tensors(args.model, self.cfg, self.dtype, include_mtp=mtp, keep_fp8=fp8,
                                                   strict=args.strict_load, select=select))
        shared = model.share_mtp_vocab()
        if shared:
            log.info("MTP layer: the main model's embedding and head serve it too (the checkpoint's copies are equal); "
                     "%.1f MiB freed", shared / 2**20)
        if args.prepack_weights:
            packed = model.pack_weights()
            if packed:
                log.info("prepacked %.1f MiB of projection, head and expert weights for oneDNN's CPU matmuls",
                         packed / 2**20)
        if args.cpu_kernels and self.device.type == "cpu":
            model.use_cpu_kernels()  # logs whether the kernel is on, and if not, why
        return model.eval()

    def _keep_fp8(self, args: EngineArgs) -> bool:
        return is_fp8_checkpoint(self.cfg) and args.weights == "auto"  # keep FP8 weights FP8

    @property
    def cache_bytes_per_token(self) -> int:
        """Latent bytes one token occupies across every cache layer (MTP layers included)."""
        if self.cache_dtype == torch.uint8:  # packed FP8 rows
            return self.model.num_cache_layers * fp8_row_bytes(self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
        elem = torch.tensor([], dtype=self.cache_dtype).element_size()
        return self.model.num_cache_layers * self.cfg.kv_cache_width * elem

    def _allocate_cache(self, args: EngineArgs, agree_blocks: Callable[[int], int]) -> list[torch.Tensor]:
        if args.kv_cache_dtype == "fp8":
            self.cache_dtype = torch.uint8  # rows packed as in engine/model/kv_cache_fp8.py
        per_block = self.cache_bytes_per_token * self.block_size
        num_blocks = agree_blocks(args.num_kv_blocks or int(args.kv_cache_memory_gb * 2**30 // per_block))
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gb: {args.kv_cache_memory_gb} GiB holds no block of {per_block} bytes")
        shape = (num_blocks, self.block_size, self.cache_bytes_per_token // self.model.num_cache_layers
                 // torch.tensor([], dtype=self.cache_dtype).element_size())
        log.info("latent KV cache: %d blocks x %d tokens, %d bytes/token", num_blocks, self.block_size,
                 self.cache_bytes_per_token)
        return [torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
                for _ in range(self.model.num_cache_layers)]

    @property
    def num_computed_layers(self) -> int:
        """Cache layers the forward fills: the main ones, and the MTP ones when they draft."""
        return len(self.model.layers) + (len(self.model.mtp) if self.proposer is not None else 0)

    @property
    def num_blocks(self) -> int:
        return self.kv_caches[0].shape[0]

    @torch.inference_mode()
    def warm_up(self, num_tokens: int, max_seqs: int, max_model_len: int | None = None) -> None:
        """One prefill step as large as the token budget before serving, as vLLM's start-up dummy run:
        ``num_tokens`` over ``min(num_tokens, max_seqs)`` sequences (fewer, or shorter, if the cache holds
        less), greedy, drafting when MTP is on. The first real step then finds its working set's pages in
        malloc's heap (``engine.cpu_memory``) instead of faulting them in one by one (transformers' fp32
        save of the bench preset in float32 on a 2-core AMD EPYC KVM guest, AVX2 + FMA, no AVX512-BF16 /
        AMX: 22,971-37,884 page faults in a fresh engine's first 8 x 256 prefill without it, 44-3,118 with
        it; a fault cost 1.4 us there at some hours and ~25 us at others), and GPU kernels are built. Every rank of an instance runs it at the
        same point of start-up, so the MoE and TP collectives meet. It leaves no trace: its sequences are
        forgotten, its cache rows are in blocks nobody holds yet, the expert-load counts are reset and
        the sampler's generator is not drawn."""
        lookahead = self.proposer.k if self.proposer is not None else 0  # rows the drafts write past it
        limit = min(max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings) - 1
        capacity = self.num_blocks * self.block_size - lookahead
        per_seq = min(num_tokens // min(num_tokens, max_seqs), limit, capacity)
        if per_seq < 1:
            log.warning("warm-up skipped: the KV cache (%d blocks of %d) holds no sequence to run it with",
                        self.num_blocks, self.block_size)
            return
        blocks_per_seq = -(-(per_seq + lookahead) // self.block_size)
        num_seqs = min(max(1, num_tokens // per_seq), self.num_blocks // blocks_per_seq)
        t0 = time.perf_counter()
        greedy = SamplingParams(temperature=0.0, max_tokens=1)
        vocab = self.cfg.vocab_size
        scheduled = []
        for i in range(num_seqs):
            prompt = [(7919 * (i * per_seq + j) + 1) % vocab for j in range(per_seq)]  # spread over experts
            blocks = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            seq_id = f"warm-up-{i}"
            scheduled.append(ScheduledSequence(seq_id, 0, per_seq, True,
                                               new=NewSequence(prompt, [], greedy, [], None, blocks)))
        self.execute(StepInput(-1, scheduled))  # no agreed EP bound: the dispatch's general path
        self.sequences.clear()
        for moe in self.experts.moes:
            moe.read_expert_load(reset=True)
        log.info("warm-up: one step of %d tokens over %d sequences in %.2f s", num_seqs * per_seq, num_seqs,
                 time.perf_counter() - t0)

    # ---- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def dummy_step(self, ep_max_tokens: int | None = None) -> None:
        """A step with no tokens: the same passes as a real one (main, then every MTP pass), joining the
        MoE collectives of the other DP replicas; touches no cache and no sequence."""
        self.model.set_ep_max_tokens(ep_max_tokens)
        self.model.dummy_forward()
        if self.proposer is not None:
            for _ in range(self.proposer.k):
                self.model.dummy_mtp_forward(0)

    def _apply(self, step: StepInput) -> None:
        """Bring the runner's copy of each scheduled sequence up to date (forgotten ones first)."""
        for seq_id in step.finished:
            self.sequences.pop(seq_id, None)
        for s in step.sequences:
            if s.new is not None:
                self.sequences[s.seq_id] = _Sequence.from_new(s.new, self.grammars)
            else:
                seq = self.sequences[s.seq_id]
                seq.token_ids.extend(s.new_token_ids)
                seq.block_table.extend(s.new_block_ids)
                if seq.grammar is not None:
                    seq.grammar.accept(s.new_token_ids)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        self._apply(step)
        self.model.set_ep_max_tokens(step.ep_max_tokens)
        seqs = [self.sequences[s.seq_id] for s in step.sequences]
        ids: list[int] = []
        positions: list[int] = []
        for s, seq in zip(step.sequences, seqs):
            tokens = seq.token_ids + s.draft_token_ids
            ids.extend(tokens[s.start:s.start + s.num_new_tokens])
            positions.extend(range(s.start, s.start + s.num_new_tokens))
        device = self.device
        tables = [seq.block_table for seq in seqs]
        self.kv_worker.begin_step(step, {s.seq_id: seq.block_table for s, seq in zip(step.sequences, seqs)})
        meta = AttentionMetadata.paged(
            [s.num_new_tokens for s in step.sequences], [s.start + s.num_new_tokens for s in step.sequences],
            tables, self.block_size, self.kv_caches, device, self.mla_prefill,
            layer_done=self.kv_worker.after_layer if self.kv_worker.streaming else None)
        t0 = time.perf_counter()
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta)
        result = StepOutput()
        self._prompt_logprobs(step, seqs, hidden, result)
        ends = list(itertools.accumulate(s.num_new_tokens for s in step.sequences))  # row after each span
        plain = [(s, seq, end - 1) for s, seq, end in zip(step.sequences, seqs, ends)
                 if s.sample and not s.draft_token_ids]
        drafted = [(s, seq, end) for s, seq, end in zip(step.sequences, seqs, ends) if s.sample and s.draft_token_ids]
        if plain:
            self._sample(hidden, plain, result)
        if drafted:
            self._verify(hidden, drafted, result)
        if self.proposer is not None:
            self._propose(hidden, step, seqs, ends, result, meta)
        result.forward_seconds = time.perf_counter() - t0
        return result

    def _sample(self, hidden: torch.Tensor, plain: list, result: StepOutput) -> None:
        """Sequences without drafts: one token each from the batched sampler."""
        logits = self.model.compute_logits(hidden[torch.tensor([r for *_, r in plain], device=self.device)])  # [B, V]
        meta = SamplingMetadata.build([seq.row(self.device) for _, seq, _ in plain], self.device)
        sampled = self.sampler(logits, meta)
        tops = sampled.to_logprob_dicts(meta.num_logprobs)
        for (s, _, _), tok, lp, top in zip(plain, sampled.token_ids.tolist(), sampled.logprobs.tolist(), tops):
            result.sampled[s.seq_id] = [tok]
            result.scores[s.seq_id] = [(lp, top)]

    def _verify(self, hidden: torch.Tensor, drafted: list, result: StepOutput) -> None:
        """Sequences with drafts: the logits at the last known token and at each draft decide them."""
        rows, sampling_rows, groups = [], [], []
        for s, seq, end in drafted:
            drafts = s.draft_token_ids
            k = len(drafts)
            groups.append(VerifyGroup(len(rows), list(drafts),
                                      position_generator(seq.seed, len(seq.token_ids), self.device)))
            masks = seq.grammar.masks_along(drafts) if seq.grammar is not None else [None] * (k + 1)
            for i in range(k + 1):  # row i: the distribution of the token after drafts[:i]
                rows.append(end - k - 1 + i)
                sampling_rows.append(seq.row(self.device, extra=drafts[:i], allowed=masks[i]))
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [R, V]
        logits = masked_logits_of_rows(logits, sampling_rows)  # the logprobs see the grammar's mask
        accepted = verify(logits, sampling_rows, groups, self.sampler.generator)
        k_max = max((seq.params.logprobs or 0) for _, seq, _ in drafted)
        picked = [g.first_row + i for g, tokens in zip(groups, accepted) for i in range(len(tokens))]
        # one group's rows (batch 1) are its first ones: a view
        chosen = logits[:len(picked)] if len(groups) == 1 else logits[torch.tensor(picked, device=self.device)]
        scored = compute_logprobs_topk(chosen, k_max,
                                       torch.tensor([t for tokens in accepted for t in tokens], device=self.device))
        tops = scored.to_logprob_dicts([seq.params.logprobs for (_, seq, _), tokens in zip(drafted, accepted)
                                        for _ in tokens])
        scores = list(zip(scored.logprobs.tolist(), tops))
        offset = 0
        for (s, _, _), tokens in zip(drafted, accepted):  # one scoring pass for every group's tokens
            result.sampled[s.seq_id] = tokens
            result.scores[s.seq_id] = scores[offset:offset + len(tokens)]
            offset += len(tokens)

    def _propose(self, hidden: torch.Tensor, step: StepInput, seqs: list[_Sequence], ends: list[int],
                 result: StepOutput, meta: AttentionMetadata) -> None:
        """Run the MTP layer over every position whose next token is now known; draft for samplers
        (not in role prefill: its sequences leave after their first token)."""
        jobs, job_tables = [], []
        for s, seq, end in zip(step.sequences, seqs, ends):
            new = result.sampled.get(s.seq_id, [])
            drafts = len(s.draft_token_ids)
            count = s.num_new_tokens - drafts + max(len(new) - 1, 0) if s.sample else s.num_new_tokens
            tokens = seq.token_ids + new  # token t+1 for each MTP position t
            first_row = end - s.num_new_tokens
            jobs.append(MTPJob(s.start, count, tokens[s.start + 1:s.start + count + 1],
                               list(range(first_row, first_row + count)),
                               draft=s.sample and self.role != "prefill" and step.propose))
            job_tables.append(seq.block_table)
        layer_done = self.kv_worker.after_layer if self.kv_worker.streaming else None
        same_rows = all(j.start == s.start and j.count == s.num_new_tokens for j, s in zip(jobs, step.sequences))
        drafts = self.proposer.run(hidden, jobs, job_tables, self.kv_caches, self.device, layer_done,
                                   meta if same_rows else None)
        for s, seq, d in zip(step.sequences, seqs, drafts):
            if d and seq.grammar is not None:  # drafts the grammar rejects cannot be accepted: not worth verifying
                d = seq.grammar.valid_drafts(result.sampled.get(s.seq_id, []), d)
            if s.sample and d:
                result.drafts[s.seq_id] = d

    def _prompt_logprobs(self, step: StepInput, seqs: list[_Sequence], hidden: torch.Tensor,
                         result: StepOutput) -> None:
        """Score the prompt positions this step's chunk predicts: the chunk's logits at
        ``start..last-1`` score prompt tokens ``start+1..last`` (position 0 has none)."""
        offset = 0
        for s, seq in zip(step.sequences, seqs):
            k, n = seq.params.prompt_logprobs, s.num_new_tokens
            if k is not None and s.start < seq.num_prompt_tokens:
                last = min(s.start + n, seq.num_prompt_tokens - 1)
                entries = []
                if last > s.start:
                    logits = self.model.compute_logits(hidden[offset:offset + last - s.start])  # [m, V]
                    targets = torch.tensor(seq.prompt_token_ids[s.start + 1:last + 1], device=self.device)
                    entries = compute_logprobs_topk(logits, k, targets).to_logprob_dicts([k] * len(targets))
                result.prompt_logprobs[s.seq_id] = entries
            offset += n

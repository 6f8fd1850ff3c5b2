"""Runs one scheduled step on the model: inputs → forward → logits → sampled tokens.

Owns the model and the paged latent cache: per cache layer (main layers, then
MTP layers) one tensor ``[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]``, sized from a memory budget. Also moves a request's latent
rows out of / into the cache for the prefill → decode hand-off.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from engine.args import EngineArgs
from engine.checkpoint.loader import iter_checkpoint_tensors, mtp_layers_to_load, read_index
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.model.fp8 import is_fp8_checkpoint
from engine.model.kv_cache_fp8 import convert_rows, fp8_row_bytes
from engine.sampler import Sampler, SamplingMetadata, SamplingRow, compute_logprobs_topk
from engine.scheduler import SchedulerOutput
from engine.spec_decode import MTPJob, MTPProposer, VerifyGroup, verify

log = logging.getLogger("pdserve.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


@dataclasses.dataclass
class ModelOutput:
    """Per request that sampled: its new tokens (accepted drafts + one sampled), their
    (raw logprob, top-k dict or None), and the drafts proposed for the next step."""

    sampled: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    logprobs: dict[str, list[tuple[float, dict[int, float] | None]]] = dataclasses.field(default_factory=dict)
    drafts: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    forward_seconds: float = 0.0


class ModelRunner:
    def __init__(self, args: EngineArgs, cfg: ModelConfig):
        self.cfg = cfg
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype)
        self.block_size = args.block_size
        self.mla_prefill = args.mla_prefill
        torch.manual_seed(args.seed)
        self.model = self._load(args)
        self.cache_dtype = self.dtype
        self.kv_caches = self._allocate_cache(args)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(args.seed))
        self.proposer = None
        if args.speculative == "mtp":
            self.proposer = MTPProposer(self.model, args.num_speculative_tokens, self.block_size)

    # ---- setup ------------------------------------------------------------------------
    def _load(self, args: EngineArgs) -> DeepseekV3ForCausalLM:
        with torch.device(self.device):
            # positions past the context: speculative rows of the MTP layer may run up to lookahead ahead
            max_positions = self.cfg.max_position_embeddings + args.lookahead
            fp8 = is_fp8_checkpoint(self.cfg) and args.weights == "auto"  # keep FP8 weights FP8
            mtp = mtp_layers_to_load(read_index(args.model), self.cfg, required=args.speculative == "mtp")
            model = DeepseekV3ForCausalLM(self.cfg, dtype=self.dtype, max_positions=max_positions, with_mtp=mtp,
                                          fp8=fp8)
        model.load_weights(iter_checkpoint_tensors(args.model, self.cfg, self.dtype, include_mtp=mtp, keep_fp8=fp8,
                                                   strict=args.strict_load))
        return model.eval()

    @property
    def cache_bytes_per_token(self) -> int:
        """Latent bytes one token occupies across every cache layer (MTP layers included)."""
        if self.cache_dtype == torch.uint8:  # packed FP8 rows
            return self.model.num_cache_layers * fp8_row_bytes(self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim)
        elem = torch.tensor([], dtype=self.cache_dtype).element_size()
        return self.model.num_cache_layers * self.cfg.kv_cache_width * elem

    def _allocate_cache(self, args: EngineArgs) -> list[torch.Tensor]:
        if args.kv_cache_dtype == "fp8":
            self.cache_dtype = torch.uint8  # rows packed as in engine/model/kv_cache_fp8.py
        per_block = self.cache_bytes_per_token * self.block_size
        num_blocks = args.num_kv_blocks or int(args.kv_cache_memory_gb * 2**30 // per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gb: {args.kv_cache_memory_gb} GiB holds no block of {per_block} bytes")
        shape = (num_blocks, self.block_size, self.cache_bytes_per_token // self.model.num_cache_layers
                 // torch.tensor([], dtype=self.cache_dtype).element_size())
        log.info("latent KV cache: %d blocks x %d tokens, %d bytes/token", num_blocks, self.block_size,
                 self.cache_bytes_per_token)
        return [torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
                for _ in range(self.model.num_cache_layers)]

    @property
    def num_blocks(self) -> int:
        return self.kv_caches[0].shape[0]

    # ---- one step ---------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> ModelOutput:
        ids: list[int] = []
        positions: list[int] = []
        for s in out.scheduled:
            req = s.req
            if req.kv_import is not None:
                self.import_kv(block_tables[req.request_id], req.kv_import)
            tokens = req.all_token_ids + req.spec_token_ids if s.num_draft_tokens else req.all_token_ids
            ids.extend(tokens[s.start:s.start + s.num_new_tokens])
            positions.extend(range(s.start, s.start + s.num_new_tokens))
        device = self.device
        tables = [block_tables[s.req.request_id] for s in out.scheduled]
        meta = AttentionMetadata.paged(
            [s.num_new_tokens for s in out.scheduled], [s.start + s.num_new_tokens for s in out.scheduled],
            tables, self.block_size, self.kv_caches, device, self.mla_prefill)
        t0 = time.perf_counter()
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta)
        self._prompt_logprobs(out, hidden)
        result = ModelOutput()
        ends = list(itertools.accumulate(s.num_new_tokens for s in out.scheduled))  # row after each span
        plain = [(s, end - 1) for s, end in zip(out.scheduled, ends) if s.sample and not s.num_draft_tokens]
        drafted = [(s, end) for s, end in zip(out.scheduled, ends) if s.sample and s.num_draft_tokens]
        if plain:
            self._sample(hidden, plain, result)
        if drafted:
            self._verify(hidden, drafted, result)
        if self.proposer is not None:
            self._propose(hidden, out, ends, tables, result)
        result.forward_seconds = time.perf_counter() - t0
        return result

    def _sample(self, hidden: torch.Tensor, plain: list, result: ModelOutput) -> None:
        """Requests without drafts: one token each from the batched sampler."""
        logits = self.model.compute_logits(hidden[torch.tensor([r for _, r in plain], device=self.device)])  # [B, V]
        meta = SamplingMetadata.build([_row(s.req) for s, _ in plain], self.device)
        sampled = self.sampler(logits, meta)
        tops = sampled.to_logprob_dicts(meta.num_logprobs)
        for (s, _), tok, lp, top in zip(plain, sampled.token_ids.tolist(), sampled.logprobs.tolist(), tops):
            result.sampled[s.req.request_id] = [tok]
            result.logprobs[s.req.request_id] = [(lp, top)]

    def _verify(self, hidden: torch.Tensor, drafted: list, result: ModelOutput) -> None:
        """Requests with drafts: the logits at the last known token and at each draft decide them."""
        rows, sampling_rows, groups = [], [], []
        for s, end in drafted:
            req, k = s.req, s.num_draft_tokens
            groups.append(VerifyGroup(len(rows), list(req.spec_token_ids), req.generator))
            for i in range(k + 1):  # row i: the distribution of the token after drafts[:i]
                rows.append(end - k - 1 + i)
                sampling_rows.append(_row(req, extra=req.spec_token_ids[:i]))
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [R, V]
        accepted = verify(logits, sampling_rows, groups, self.sampler.generator)
        k_max = max((s.req.params.logprobs or 0) for s, _ in drafted)
        for (s, _), g, tokens in zip(drafted, groups, accepted):
            picked = torch.arange(g.first_row, g.first_row + len(tokens), device=self.device)
            scored = compute_logprobs_topk(logits[picked], k_max, torch.tensor(tokens, device=self.device))
            tops = scored.to_logprob_dicts([s.req.params.logprobs] * len(tokens))
            result.sampled[s.req.request_id] = tokens
            result.logprobs[s.req.request_id] = list(zip(scored.logprobs.tolist(), tops))

    def _propose(self, hidden: torch.Tensor, out: SchedulerOutput, ends: list[int], tables: list[list[int]],
                 result: ModelOutput) -> None:
        """Run the MTP layer over every position whose next token is now known; draft for samplers."""
        jobs, job_tables = [], []
        for s, end, table in zip(out.scheduled, ends, tables):
            req = s.req
            new = result.sampled.get(req.request_id, [])
            count = s.num_new_tokens - s.num_draft_tokens + max(len(new) - 1, 0) if s.sample else s.num_new_tokens
            seq = req.all_token_ids + new  # token t+1 for each MTP position t
            first_row = end - s.num_new_tokens
            jobs.append(MTPJob(s.start, count, seq[s.start + 1:s.start + count + 1],
                               list(range(first_row, first_row + count)), draft=s.sample))
            job_tables.append(table)
        drafts = self.proposer.run(hidden, jobs, job_tables, self.kv_caches, self.device)
        for s, d in zip(out.scheduled, drafts):
            if s.sample:
                result.drafts[s.req.request_id] = d

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor) -> None:
        """Extend ``req.prompt_logprobs`` with the prompt positions this step's chunk predicts.

        Invariant: before a chunk starting at ``start`` the list holds positions ``0..start``
        (position 0 is None); the chunk's logits at ``start..last-1`` score tokens ``start+1..last``.
        """
        offset = 0
        for s in out.scheduled:
            req, k, n = s.req, s.req.params.prompt_logprobs, s.num_new_tokens
            if k is not None and s.start < req.num_prompt_tokens:
                if s.start == 0:
                    req.prompt_logprobs = [None]
                last = min(s.start + n, req.num_prompt_tokens - 1)
                if len(req.prompt_logprobs) == s.start + 1 and last > s.start:
                    logits = self.model.compute_logits(hidden[offset:offset + last - s.start])  # [m, V]
                    targets = torch.tensor(req.prompt_token_ids[s.start + 1:last + 1], device=self.device)
                    scored = compute_logprobs_topk(logits, k, targets)
                    req.prompt_logprobs.extend(scored.to_logprob_dicts([k] * len(targets)))
            offset += n

    # ---- KV hand-off ------------------------------------------------------------------
    def _slots(self, table: list[int], num_tokens: int) -> torch.Tensor:
        pos = torch.arange(num_tokens)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.device)

    def export_kv(self, table: list[int], num_tokens: int) -> torch.Tensor:
        """The request's latent rows: [num_cache_layers, num_tokens, width] on the CPU (an FP8 cache: packed uint8 rows)."""
        slots = self._slots(table, num_tokens)
        return torch.stack([c.view(-1, c.shape[-1])[slots] for c in self.kv_caches]).cpu()

    def import_kv(self, table: list[int], rows: torch.Tensor) -> None:
        slots = self._slots(table, rows.shape[1])
        for layer, cache in enumerate(self.kv_caches):
            layer_rows = convert_rows(rows[layer].to(self.device), self.cfg.kv_lora_rank, cache)  # FP8 <-> plain
            cache.view(-1, cache.shape[-1]).index_copy_(0, slots, layer_rows)


def _row(req, extra: list[int] | None = None) -> SamplingRow:
    """The sampler's view of a request; ``extra`` = drafts counted in its history (verification)."""
    output = req.output_token_ids + extra if extra else req.output_token_ids
    return SamplingRow(req.params, req.prompt_token_ids, output, req.eos_token_ids, req.generator)

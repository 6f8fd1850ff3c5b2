"""Runs one scheduled step on the model: inputs → forward → logits → sampled tokens.

Owns the model and the paged latent cache: per cache layer (main layers, then
MTP layers) one tensor ``[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]``, sized from a memory budget. Also moves a request's latent
rows out of / into the cache for the prefill → decode hand-off.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from engine.args import EngineArgs
from engine.checkpoint.loader import iter_checkpoint_tensors
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.sampler import Sampler, SamplingMetadata, SamplingRow, compute_logprobs_topk
from engine.scheduler import SchedulerOutput

log = logging.getLogger("pdserve.engine")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


@dataclasses.dataclass
class ModelOutput:
    sampled: dict[str, int]  # request id -> token
    logprobs: dict[str, tuple[float, dict[int, float] | None]]  # request id -> (logprob, top-k dict or None)
    forward_seconds: float


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

    # ---- setup ------------------------------------------------------------------------
    def _load(self, args: EngineArgs) -> DeepseekV3ForCausalLM:
        with torch.device(self.device):
            model = DeepseekV3ForCausalLM(self.cfg, dtype=self.dtype, max_positions=self.cfg.max_position_embeddings)
        model.load_weights(iter_checkpoint_tensors(args.model, self.cfg, self.dtype, include_mtp=True))
        return model.eval()

    @property
    def cache_bytes_per_token(self) -> int:
        """Latent bytes one token occupies across every cache layer (MTP layers included)."""
        elem = torch.tensor([], dtype=self.cache_dtype).element_size()
        return self.model.num_cache_layers * self.cfg.kv_cache_width * elem

    def _allocate_cache(self, args: EngineArgs) -> list[torch.Tensor]:
        per_block = self.cache_bytes_per_token * self.block_size
        num_blocks = args.num_kv_blocks or int(args.kv_cache_memory_gb * 2**30 // per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gb: {args.kv_cache_memory_gb} GiB holds no block of {per_block} bytes")
        shape = (num_blocks, self.block_size, self.cfg.kv_cache_width)
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
        sample_rows: list[int] = []
        for s in out.scheduled:
            req = s.req
            if req.kv_import is not None:
                self.import_kv(block_tables[req.request_id], req.kv_import)
            ids.extend(req.all_token_ids[s.start:s.start + s.num_new_tokens])
            positions.extend(range(s.start, s.start + s.num_new_tokens))
            if s.sample:
                sample_rows.append(len(ids) - 1)
        device = self.device
        meta = AttentionMetadata.paged(
            [s.num_new_tokens for s in out.scheduled],
            [s.start + s.num_new_tokens for s in out.scheduled],
            [block_tables[s.req.request_id] for s in out.scheduled],
            self.block_size, self.kv_caches, device, self.mla_prefill)
        t0 = time.perf_counter()
        hidden = self.model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta)
        self._prompt_logprobs(out, hidden)
        sampling = [s for s in out.scheduled if s.sample]
        result = ModelOutput({}, {}, 0.0)
        if sampling:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=device)])  # [B, V]
            rows = [SamplingRow(s.req.params, s.req.prompt_token_ids, s.req.output_token_ids, s.req.eos_token_ids,
                                s.req.generator) for s in sampling]
            meta_s = SamplingMetadata.build(rows, device)
            sampled = self.sampler(logits, meta_s)
            tokens = sampled.token_ids.tolist()
            lps = sampled.logprobs.tolist()
            tops = sampled.to_logprob_dicts(meta_s.num_logprobs)
            for s, tok, lp, top in zip(sampling, tokens, lps, tops):
                result.sampled[s.req.request_id] = tok
                result.logprobs[s.req.request_id] = (lp, top)
        result.forward_seconds = time.perf_counter() - t0
        return result

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
        """The request's latent rows: [num_cache_layers, num_tokens, width] on the CPU."""
        slots = self._slots(table, num_tokens)
        return torch.stack([c.view(-1, c.shape[-1])[slots] for c in self.kv_caches]).cpu()

    def import_kv(self, table: list[int], rows: torch.Tensor) -> None:
        slots = self._slots(table, rows.shape[1])
        for layer, cache in enumerate(self.kv_caches):
            cache.view(-1, cache.shape[-1]).index_copy_(0, slots, rows[layer].to(self.device, cache.dtype))

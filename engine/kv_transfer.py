"""The prefill → decode hand-off payload.

A ``KVPayload`` is everything a decode engine needs to continue a request a
prefill engine started: the latent rows of the request's computed tokens for
every cache layer (MTP included), the first sampled token(s) with their
logprobs, and the sampling state (parameters, the seeded generator's state).
It holds plain tensors and Python values only, so any transport (in-process,
Ray object store, later NCCL/RDMA) can carry it; fp8 rows travel as their
``uint8`` bytes (fp8 tensors cannot be pickled) and are viewed back on arrival.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class KVPayload:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_logprobs: list[dict[int, float]]
    cumulative_logprob: float
    params: SamplingParams
    rows_bytes: torch.Tensor  # [num_layers, num_tokens, width * elem] uint8
    rows_dtype: str  # e.g. "bfloat16", "float8_e4m3fn"
    generator_state: torch.Tensor | None  # torch.Generator.get_state() of a seeded request

    @classmethod
    def from_request(cls, req: Request, rows: torch.Tensor) -> "KVPayload":
        return cls(
            request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids), output_logprobs=list(req.output_logprobs),
            cumulative_logprob=req.cumulative_logprob, params=req.params,
            rows_bytes=rows.contiguous().view(torch.uint8), rows_dtype=str(rows.dtype).removeprefix("torch."),
            generator_state=req.generator.get_state() if req.generator is not None else None)

    @property
    def rows(self) -> torch.Tensor:
        """[num_layers, num_tokens, width] in the cache dtype."""
        return self.rows_bytes.view(getattr(torch, self.rows_dtype))

    @property
    def num_layers(self) -> int:
        return self.rows_bytes.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rows_bytes.shape[1]

    @property
    def nbytes(self) -> int:
        return self.rows_bytes.numel()

    def restore_generator(self, device: torch.device) -> torch.Generator | None:
        if self.generator_state is None:
            return None
        g = torch.Generator(device=device)
        g.set_state(self.generator_state)
        return g

"""Token usage of one API request, counted in one place for every surface (HTTP JSON, gRPC)."""

from __future__ import annotations

import dataclasses
from typing import Any

from serving.generation import Generation


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # prompt tokens served from the prefix cache, when the engine reports it
    draft_tokens: int  # speculative decoding: drafts verified / accepted for this request
    accepted_tokens: int

    @classmethod
    def of(cls, gen: Generation) -> "Usage":
        drafts, accepted = gen.spec_tokens
        return cls(gen.prompt_tokens, gen.completion_tokens, gen.cached_tokens, drafts, accepted)

    def counts(self) -> dict[str, int]:
        """The token counts, flat (gRPC's ``Usage`` message takes them as they are)."""
        out = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens is not None:
            out["cached_tokens"] = self.cached_tokens
        return out

    def openai(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object (cached tokens under ``prompt_tokens_details``), plus pdserve's ``spec_decode``."""
        out: dict[str, Any] = self.counts()
        if "cached_tokens" in out:
            out["prompt_tokens_details"] = {"cached_tokens": out.pop("cached_tokens")}
        if self.draft_tokens:
            out["spec_decode"] = {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens}
        return out

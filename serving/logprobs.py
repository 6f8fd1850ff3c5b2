"""Token logprobs as the APIs show them, read from the engine's entries in one place.

The engine reports, per generated (or prompt) position, ``{token_id: logprob}`` with the
position's own token first, then the top-k (``engine.outputs.TokenLogprobs``); the first
prompt position has no entry (None). ``positions`` turns those into ``Position`` records that
the three renderings share: OpenAI completions (``CompletionLogprobs``: tokens,
token_logprobs, top_logprobs, text_offset), OpenAI chat (``chat_logprobs``: a ``content``
list with ``bytes`` and ``top_logprobs``) and gRPC (``serving/grpc_server.py``). JSON has no
-inf, so the OpenAI renderings clamp to ``MIN_LOGPROB`` as vLLM does; gRPC sends floats as they are.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from engine.outputs import TokenLogprobs
from engine.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0


@dataclasses.dataclass(frozen=True)
class Position:
    token_id: int
    logprob: float | None  # None: the engine gave no entry here (the first prompt token)
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


def clamp(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


def positions(token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None] | None, k: int) -> list[Position]:
    """One ``Position`` per token; tokens past the end of ``entries`` (or all, when None) have no entry."""
    out = []
    for j, tid in enumerate(token_ids):
        entry = entries[j] if entries is not None and j < len(entries) else None
        if entry is None:
            out.append(Position(tid, None, []))
            continue
        sampled = entry[tid] if tid in entry else next(iter(entry.values()))  # the engine puts it first
        out.append(Position(tid, sampled, sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:k]))
    return out


class CompletionLogprobs:
    """OpenAI's completions ``logprobs`` object, built incrementally (text offsets carry over chunks)."""

    def __init__(self, tok: Tokenizer, k: int):
        self.tok, self.k, self.offset = tok, k, 0

    def build(self, token_ids: list[int], entries: list[TokenLogprobs | None] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in positions(token_ids, entries, self.k):
            text = self.tok.token_text(p.token_id)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if p.logprob is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(clamp(p.logprob))
            top = dict(p.top)
            top.setdefault(p.token_id, p.logprob)
            out["top_logprobs"].append({self.tok.token_text(t): clamp(v) for t, v in top.items()})
        return out


def _chat_entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": clamp(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tok: Tokenizer, token_ids: list[int], entries: list[TokenLogprobs] | None, k: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
    content = []
    for p in positions(token_ids, entries, k):
        if p.logprob is None:
            continue
        item = _chat_entry(tok, p.token_id, p.logprob)
        item["top_logprobs"] = [_chat_entry(tok, t, v) for t, v in p.top]
        content.append(item)
    return {"content": content}

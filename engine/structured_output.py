"""Structured output: a request's constraint compiled to a grammar, and one matcher per sequence.

Library: llguidance (the grammar engine vLLM's ``guidance`` backend uses). Two halves:

* engine side (torch-free): ``compile_grammar(StructuredOutputsParams) -> str`` turns the
  request's constraint into llguidance's serialized grammar and checks it (an invalid
  schema, regex or grammar is a ``SamplingParamError``, i.e. a 400). The scheduler puts that
  string in ``NewSequence.grammar``: plain text, so it crosses process boundaries (ranks,
  prefill → decode) where a live matcher could not. ``check_grammar`` (the engine's admission)
  also checks it against the model's tokenizer.
* runner side: ``GrammarBook`` builds the llguidance tokenizer from the model directory's
  ``tokenizer.json`` once, and a ``SequenceGrammar`` per sequence from the grammar string,
  replaying the tokens the sequence already has (a resume, a KV hand-off, a recompute after
  preemption). The matcher follows the sequence's committed tokens; ``allowed()`` is the
  next token's mask (``[V]`` bool) the sampler applies, ``masks_along(drafts)`` the masks
  of every verify row of a speculative step (it advances over the drafts the grammar takes,
  then rolls back), so a draft the grammar rejects has probability 0 and is rejected.

When the grammar is complete only the end-of-sequence tokens are allowed. JSON may hold
whitespace as ``JSON_WHITESPACE`` allows.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Sequence

import llguidance
import numpy as np

from engine.sampling_params import SamplingParamError, StructuredOutputsParams

log = logging.getLogger("pdserve.engine")

PARAM = "structured_outputs"
# Whitespace between JSON tokens: none, one space, or a line break and an indent — compact and
# pretty-printed JSON, but no runaway whitespace (vLLM allows any amount; a weak model fills
# max_tokens with it). ``disable_any_whitespace`` allows none.
JSON_WHITESPACE = r"[ \t]?|\r?\n[ \t]{0,20}"


@functools.lru_cache(maxsize=256)
def compile_grammar(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for ``spec``; ``SamplingParamError`` when it is invalid."""
    options = {"whitespace_flexible": False} if spec.disable_any_whitespace else {"whitespace_pattern": JSON_WHITESPACE}
    kind = spec.kind
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', options)
        elif kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json, options)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.regex)
        elif kind == "choice":
            grammar = llguidance.grammar_from("choice", list(spec.choice))
        else:
            grammar = llguidance.grammar_from("grammar", spec.grammar)
    except Exception as e:  # the library's compilers raise ValueError, its GBNF converter anything
        raise SamplingParamError(PARAM, f"invalid {kind}: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise SamplingParamError(PARAM, f"invalid {kind}: {error.strip()}")
    return grammar


def grammar_of(spec: StructuredOutputsParams | None) -> str | None:
    return None if spec is None else compile_grammar(spec)


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(model_dir: str, eos_token_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of the model directory's ``tokenizer.json`` (one per process and model)."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        return llguidance.LLTokenizer(f.read(), eos_token=list(eos_token_ids) or None)


def check_grammar(spec: StructuredOutputsParams, model_dir: str, eos_token_ids: Sequence[int]) -> None:
    """Engine-side admission: the constraint compiles and fits this model's tokenizer (special-token
    references included), so a runner never meets a grammar it cannot build."""
    error = _error_with_tokenizer(compile_grammar(spec), model_dir, tuple(eos_token_ids))
    if error:
        raise SamplingParamError(PARAM, error if error.startswith("structured output") else
                                 f"invalid {spec.kind}: {error}")


@functools.lru_cache(maxsize=256)
def _error_with_tokenizer(grammar: str, model_dir: str, eos_token_ids: tuple[int, ...]) -> str:
    try:
        tokenizer = grammar_tokenizer(model_dir, eos_token_ids)
    except Exception as e:  # a tokenizer.json llguidance cannot read
        return f"structured output is not available for this model's tokenizer: {e}"
    return llguidance.LLMatcher.validate_grammar(grammar, tokenizer).strip()


class SequenceGrammar:
    """One sequence's matcher; its state is the sequence's committed output tokens."""

    def __init__(self, book: "GrammarBook", grammar: str, output_token_ids: Sequence[int]):
        self.book = book
        self.matcher = llguidance.LLMatcher(book.tokenizer, grammar, log_level=0)
        self.accept(output_token_ids)

    def accept(self, token_ids: Sequence[int]) -> None:
        """Advance over tokens the sequence committed (sampled here, or generated on another engine)."""
        if token_ids and not self.matcher.is_error() and not self.matcher.consume_tokens(list(token_ids)):
            log.warning("structured output: the sequence left its grammar (%s); only ending is allowed now",
                        self.matcher.get_error())

    def allowed(self) -> np.ndarray:
        """``[V]`` bool: the tokens the grammar allows next (only end-of-sequence once it is complete)."""
        if self.matcher.is_error():
            return self.book.eos_only
        return self.book.unpack(self.matcher.compute_bitmask())

    def valid_drafts(self, pending: Sequence[int], drafts: Sequence[int]) -> list[int]:
        """``drafts`` up to the first one the grammar rejects, after the sampled but not yet committed
        ``pending`` tokens."""
        if self.matcher.is_error():
            return []
        return list(drafts[:max(self.matcher.validate_tokens([*pending, *drafts]) - len(pending), 0)])

    def masks_along(self, drafts: Sequence[int]) -> list[np.ndarray]:
        """The masks after ``drafts[:i]`` for i = 0..len(drafts) (one per verify row). Past the first
        draft the grammar rejects the rows cannot be reached; they repeat the last mask."""
        masks = [self.allowed()]
        taken = 0
        for d in drafts:
            if taken == len(masks) - 1 and masks[-1][d] and self.matcher.consume_token(d):
                taken += 1
                masks.append(self.allowed())
            else:
                masks.append(masks[-1])
        if taken:
            self.matcher.rollback(taken)
        return masks


class GrammarBook:
    """A runner's llguidance tokenizer (built on first use) and the masks' shape: ``vocab_size`` = the logits' width."""

    def __init__(self, model_dir: str, vocab_size: int):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.eos_only = np.zeros(vocab_size, dtype=bool)

    def tokenizer_for(self, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = grammar_tokenizer(self.model_dir, tuple(eos_token_ids))
            self.eos_only = np.zeros(self.vocab_size, dtype=bool)
            self.eos_only[[t for t in eos_token_ids if t < self.vocab_size]] = True
        return self._tokenizer

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        assert self._tokenizer is not None, "tokenizer_for() first"
        return self._tokenizer

    def sequence(self, grammar: str, output_token_ids: Sequence[int],
                 eos_token_ids: Sequence[int]) -> SequenceGrammar:
        self.tokenizer_for(eos_token_ids)
        return SequenceGrammar(self, grammar, output_token_ids)

    def unpack(self, bitmask: bytes) -> np.ndarray:
        """llguidance's bitmask (bit ``t % 32`` of little-endian word ``t // 32``) → ``[V]`` bool; tokens
        past the tokenizer's vocabulary are never allowed."""
        bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little").astype(bool)
        if len(bits) >= self.vocab_size:
            return bits[:self.vocab_size]
        return np.concatenate([bits, np.zeros(self.vocab_size - len(bits), dtype=bool)])

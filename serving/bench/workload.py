"""The requests a benchmark sends: ``build_workload`` returns one ``RequestSpec`` per prompt.

* ``random``: ``input_len`` token ids drawn uniformly from ``[0, vocab_size)``, sent as a
  token-id prompt so the server sees exactly ``input_len`` tokens (the chat endpoint
  takes text only, so there it is ``input_len`` random words, about as many tokens).
* ``shared-prefix``: one random prefix of ``prefix_len`` tokens common to every prompt,
  then a random suffix up to ``input_len`` (what prefix caching is for).
* a ``.jsonl`` file: ``{"prompt": TEXT or [token ids], "max_tokens": N}`` per line
  (``max_tokens`` defaults to ``output_len``); the first ``num_prompts`` lines, the file
  repeated when it is shorter.

Everything is a pure function of ``seed`` (an int, or a sequence of ints: ``pdserve bench`` gives each
level of a sweep ``(seed, level + 1)`` and its warm-up ``(seed, 0)``), so runs (and the endpoints of
``--compare``) get the same prompts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

# Common English words for text prompts; one word is about one token for BPE vocabularies.
WORDS = (
    "the of and to in is was for on are with as his they at be this from have or by one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where "
    "most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end along while"
).split()


class WorkloadError(ValueError):
    """A dataset that cannot be read or does not fit the endpoint."""


@dataclasses.dataclass
class RequestSpec:
    prompt: str | list[int]  # token ids only for /v1/completions
    max_tokens: int
    prompt_len: int | None  # known exactly for token-id prompts; otherwise taken from the server's usage


def _random_prompt(rng: np.random.Generator, n: int, vocab_size: int, as_text: bool) -> str | list[int]:
    if as_text:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
    return rng.integers(0, vocab_size, n).tolist()


def _spec(prompt: str | list[int], max_tokens: int) -> RequestSpec:
    return RequestSpec(prompt, max_tokens, len(prompt) if isinstance(prompt, list) else None)


def build_workload(dataset: str, *, num_prompts: int, input_len: int, output_len: int, seed: int | Sequence[int],
                   vocab_size: int, prefix_len: int, chat: bool) -> list[RequestSpec]:
    """The ``num_prompts`` requests of ``dataset`` (``random``, ``shared-prefix`` or a JSONL path)."""
    rng = np.random.default_rng(seed)
    if dataset == "random":
        return [_spec(_random_prompt(rng, input_len, vocab_size, chat), output_len) for _ in range(num_prompts)]
    if dataset == "shared-prefix":
        if not 0 <= prefix_len < input_len:
            raise WorkloadError(f"--prefix-len must be in [0, --input-len), got {prefix_len}")
        prefix = _random_prompt(rng, prefix_len, vocab_size, chat)
        specs = []
        for _ in range(num_prompts):
            suffix = _random_prompt(rng, input_len - prefix_len, vocab_size, chat)
            prompt = (f"{prefix} {suffix}" if prefix else suffix) if chat else prefix + suffix
            specs.append(_spec(prompt, output_len))
        return specs
    return _from_jsonl(dataset, num_prompts, output_len, chat)


def _from_jsonl(path: str, num_prompts: int, output_len: int, chat: bool) -> list[RequestSpec]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise WorkloadError(f"cannot read dataset {path!r}: {e.strerror or e}") from e
    if not lines:
        raise WorkloadError(f"dataset {path!r} has no requests")
    specs = []
    for i, line in lines[:num_prompts]:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise WorkloadError(f"{path}:{i}: not JSON: {e}") from e
        prompt = row.get("prompt") if isinstance(row, dict) else None
        max_tokens = row.get("max_tokens", output_len) if isinstance(row, dict) else None
        is_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not is_ids:
            raise WorkloadError(f"{path}:{i}: 'prompt' must be a non-empty string or list of token ids")
        if is_ids and chat:
            raise WorkloadError(f"{path}:{i}: the chat endpoint takes text prompts, not token ids")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise WorkloadError(f"{path}:{i}: 'max_tokens' must be a positive integer")
        specs.append(_spec(prompt, max_tokens))
    return [specs[k % len(specs)] for k in range(num_prompts)]

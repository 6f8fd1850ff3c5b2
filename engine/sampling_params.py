"""Per-request sampling parameters, shaped like vLLM's so users can switch.

Torch-free: the API layer builds these from HTTP/gRPC requests. ``validate()``
raises ``ValueError`` whose message starts with the offending parameter's name
(the servers turn it into a 400 / INVALID_ARGUMENT naming ``param``).

``SamplingParams`` is the user's intent and never changes once built (frozen). A
sequence's *progress* — its completion index and the tokens it already generated
somewhere else — travels beside it as a ``Continuation`` (the PD router resumes a
sequence on another worker with one). Two rules live here and nowhere else:
``sequence_seed`` (the seed of completion ``i`` of a seeded request) and
``max_new_tokens`` (``max_tokens=None`` means the rest of the context).

``StructuredOutputsParams`` (vLLM's name; ``GuidedDecodingParams`` is its older one)
constrains the output to a JSON schema, any JSON object, a regex, one of a list of
strings, or a Lark/GBNF grammar. It is plain data (a schema is kept as canonical JSON
text) so it travels wherever ``SamplingParams`` does; ``engine.structured_output``
compiles it and applies it as a token mask.
"""

from __future__ import annotations

import dataclasses
import json as _json
from typing import Any

MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: a bias in [-100, 100] per token


class SamplingParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion ``index`` of a request seeded with ``seed`` (index 0 keeps it)."""
    return None if seed is None else (seed + index * 1_000_003) % 2**63


def max_new_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int) -> int:
    """Tokens a sequence may generate: ``max_tokens`` bounded by the context (None = the rest of it)."""
    room = max_model_len - prompt_len
    return room if max_tokens is None else min(max_tokens, room)


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Where a sequence stands when it continues on another engine (a resume, or a KV hand-off).

    ``output_token_ids`` were generated (and streamed) before: they count against
    ``max_tokens``/``min_tokens`` and the penalties as output, the detokenizer replays them
    so text split across the hand-over continues exactly, and they are not reported again.
    Seeded sampling is a function of (seed, index, position), so no generator state travels.
    """

    index: int = 0  # completion index within the user request
    output_token_ids: tuple[int, ...] = ()
    cumulative_logprob: float = 0.0


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on the generated text (vLLM's ``StructuredOutputsParams``).

    ``json``: a JSON schema (dict or JSON text; kept as canonical JSON text); ``json_object``: any
    JSON object; ``regex``; ``choice``: one of these strings; ``grammar``: Lark or GBNF.
    ``disable_any_whitespace``: JSON without whitespace between tokens.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            object.__setattr__(self, "json", _json.dumps(self.json, sort_keys=True, separators=(",", ":")))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise SamplingParamError("structured_outputs", "give exactly one of json, json_object, regex, choice, "
                                                           f"grammar (got {', '.join(kinds) or 'none'})")
        for name in ("json", "regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SamplingParamError("structured_outputs", f"{name} must be a string")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamError("structured_outputs", "choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI)
    logprobs: int | None = None  # top-k logprobs per generated token (0 = only the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # the output follows this constraint

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN

        def check(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise SamplingParamError(param, msg)

        check(is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
              f"must be in [0, 100], got {self.temperature!r}")
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        check(is_int(self.top_k) and 0 <= self.top_k < 2**31, "top_k",
              f"must be -1, 0 (off) or a positive integer below 2^31, got {self.top_k!r}")
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(is_num(v) and -2.0 <= v <= 2.0, name, f"must be in [-2, 2], got {v!r}")
        check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
              f"must be in (0, 2], got {self.repetition_penalty!r}")
        check(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**64), "seed",
              f"must be an integer, got {self.seed!r}")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
              f"must be an integer >= 1, got {self.max_tokens!r}")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens",
                  f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be a non-empty string or a list of non-empty strings")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        check(all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
              f"each stop string is at most {MAX_STOP_STRING_CHARS} characters")
        check(isinstance(self.stop_token_ids, list) and all(is_int(t) and 0 <= t < 2**31 for t in self.stop_token_ids),
              "stop_token_ids", "must be a list of token ids (integers in [0, 2^31))")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        check(self.logit_bias is None or (
            isinstance(self.logit_bias, dict)
            and all(is_int(t) and t >= 0 and is_num(b) and abs(b) <= MAX_LOGIT_BIAS for t, b in self.logit_bias.items())),
            "logit_bias", f"must map token ids (integers >= 0) to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS), name,
                  f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", "must be a StructuredOutputsParams")

    def clone(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

"""Request bodies of the OpenAI-compatible endpoints, as strict pydantic models.

Types are strict (``"max_tokens": "10"`` or ``"stream": 1`` is a 400, as with
OpenAI); unknown fields are ignored like vLLM does, and unknown top-level fields are
logged once per request (logger ``pdserve.api``). Value ranges are checked by
``SamplingParams.validate`` so the HTTP and gRPC surfaces agree on them; only what
``SamplingParams`` cannot see (message roles, ``top_logprobs``, unsupported
features) is checked here. The vLLM extensions ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``add_special_tokens``,
``priority`` and (chat) ``add_generation_prompt``/``chat_template_kwargs`` are accepted.
Structured output, on both endpoints: OpenAI's ``response_format`` (``json_object``,
``json_schema``) and vLLM's ``guided_json``/``guided_regex``/``guided_choice``/
``guided_grammar`` and ``structured_outputs`` object (``serving.api_common.structured_outputs``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("pdserve.api")

# OpenAI's rule for function names; it also keeps a name on the one line DeepSeek-V3's tool-call format gives it.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(_Strict):
    """vLLM's ``structured_outputs`` request object (one of the constraints)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class SamplingFields(_Strict):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted as OpenAI documents it; not used
    priority: int = 0
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsFields | None = None

    @model_validator(mode="before")
    @classmethod
    def _log_ignored_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ignored = sorted(str(k) for k in set(data) - set(cls.model_fields))
            if ignored:
                log.warning("request fields ignored (not supported): %s", ", ".join(ignored))
        return data


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]; checked by openai_api so errors can say which part is wrong
    prompt: str | list[Any]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class TextPart(_Strict):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema; enforced when tool_choice forces a call
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    # default: "auto" with tools, "none" without
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

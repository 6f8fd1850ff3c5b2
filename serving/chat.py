"""``POST /v1/chat/completions``: OpenAI chat completions.

Request path: JSON body -> ``ChatCompletionRequest`` -> messages rendered by the model's
chat template (``engine.chat``, shared with ``LLM.chat``; ``tools`` become the template's
``tools`` variable) -> token ids (the template carries the BOS token) -> one
``GenerateRequest`` with ``SamplingParams.n = n`` -> ``Generation`` -> one
``chat.completion`` object or, with ``stream: true``, ``chat.completion.chunk`` events (a
role delta per choice first) then ``data: [DONE]``. ``max_completion_tokens`` wins over
``max_tokens``; omitted, generation may use the rest of the context. ``logprobs: true`` with
``top_logprobs: k`` returns OpenAI's ``logprobs.content`` list.

Tools (``serving.tool_calls``): with ``tools`` and ``tool_choice`` other than ``none`` each
reply is parsed for DeepSeek-V3 tool calls into ``message.tool_calls`` (streamed as
``delta.tool_calls``: index, id and name first, then argument fragments), with
``finish_reason: "tool_calls"``. ``required`` / a named function force the reply to start
inside a call (named: exactly one call to that function) and constrain the rest of it
(``tool_calls.call_grammar``): a tool's name, arguments that fit its ``parameters`` schema. When the tokenizer marks the tool-call markers as
special tokens they are kept in the detokenized text (``skip_special_tokens`` off) so the
parser sees them, and the end-of-sentence text that then ends the reply is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.chat import ChatFormatError, render_chat
from engine.outputs import CompletionOutput, GenerateRequest
from engine.sampling_params import SamplingParamError, StructuredOutputsParams
from engine.structured_output import compile_grammar
from serving import api_common as common
from serving.access_log import access_record
from serving.errors import invalid
from serving.generation import Generation
from serving.logprobs import chat_logprobs
from serving.protocol import ChatCompletionRequest
from serving.tool_calls import MARKERS, Parsed, ToolCallParser, call_grammar, forced_prefix
from serving.usage import Usage
from engine.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class _ToolMode:
    """How a request's replies are read for tool calls."""

    prefix: str  # forced start of every reply ("" unless tool_choice is required or named)
    max_calls: int | None  # 1 for a named function or parallel_tool_calls=false
    keep_special: bool  # the markers are special tokens: detokenize with skip_special_tokens off
    grammar: str | None = None  # what follows the forced prefix (Lark), when there is one

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.max_calls)


def _tool_mode(req: ChatCompletionRequest, tok: Tokenizer) -> _ToolMode | None:
    """None when replies are plain text (no tools, or tool_choice none); 400 for a tool_choice that cannot apply."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None
    if choice == "none":
        return None
    name = None
    if choice is not None and not isinstance(choice, str):
        name = choice.function.name
        if name not in {t.function.name for t in req.tools}:
            raise invalid(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    special = {t.content: i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
    prefix = forced_prefix(choice if isinstance(choice, str) else None, name)
    grammar = None
    if prefix:
        def literal(text: str) -> str:
            return f"<[{special[text]}]>" if text in special else json.dumps(text)
        grammar = call_grammar({t.function.name: t.function.parameters for t in req.tools}, name,
                               req.parallel_tool_calls, literal)
    return _ToolMode(prefix=prefix, max_calls=1 if name is not None or not req.parallel_tool_calls else None,
                     keep_special=req.skip_special_tokens and any(m in special for m in MARKERS), grammar=grammar)


_RESERVED_TEMPLATE_ARGS = ("self", "messages", "add_generation_prompt")  # apply_chat_template's own parameters


def _prompt_ids(req: ChatCompletionRequest, tok: Tokenizer, mode: _ToolMode | None = None) -> list[int]:
    clash = next((k for k in _RESERVED_TEMPLATE_ARGS if k in (req.chat_template_kwargs or {})), None)
    if clash is not None:
        raise invalid(f"chat_template_kwargs may not set {clash!r} (it comes from the request itself)",
                      f"chat_template_kwargs.{clash}")
    try:
        return render_chat(tok, [m.model_dump(exclude_none=True) for m in req.messages],
                           add_generation_prompt=req.add_generation_prompt,
                           tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
                           suffix=mode.prefix if mode else "", template_kwargs=req.chat_template_kwargs)
    except ChatFormatError as e:
        raise invalid(str(e), e.param) from e


def _engine_request(req: ChatCompletionRequest, prompt_ids: list[int], max_model_len: int,
                    request_id: str, mode: _ToolMode | None = None) -> GenerateRequest:
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = common.resolve_max_tokens(limit, len(prompt_ids), max_model_len, limit_param, "messages")
    params = common.sampling_params(req, max_tokens=max_tokens,
                                    logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                    aliases={"logprobs": "top_logprobs", "max_tokens": limit_param})
    if mode is not None and mode.keep_special:
        params = params.clone(skip_special_tokens=False)
    if mode is not None and mode.grammar is not None:
        if params.structured_outputs is not None:
            raise invalid("a tool_choice that forces a call cannot be combined with another output constraint "
                          "(response_format, guided_*, structured_outputs)", "tool_choice")
        try:
            params = params.clone(structured_outputs=StructuredOutputsParams(grammar=mode.grammar))
            compile_grammar(params.structured_outputs)
        except SamplingParamError as e:
            raise invalid(f"tools: a function's parameters schema cannot be enforced: {e}", "tools") from e
    return GenerateRequest(f"{request_id}-0", prompt_ids, params, priority=req.priority)


def _choice_logprobs(req: ChatCompletionRequest, tok: Tokenizer, c: CompletionOutput) -> dict[str, Any] | None:
    return chat_logprobs(tok, c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None


def _reply_text(c: CompletionOutput, mode: _ToolMode | None, tok: Tokenizer) -> str:
    """This delta's text, without the end-of-sentence text that shows when special tokens are kept."""
    if mode is not None and mode.keep_special and c.finish_reason == "stop" and c.stop_reason is None and tok.eos_token:
        return c.text.removesuffix(tok.eos_token)
    return c.text


def _finish_reason(c: CompletionOutput, parser: ToolCallParser | None) -> str | None:
    if parser is not None and parser.calls and c.finish_reason == "stop":
        return "tool_calls"
    return c.finish_reason


async def create(ctx: common.ServerContext, request: Request) -> Any:
    data = await common.read_json_object(request, ctx.max_body_bytes)
    req: ChatCompletionRequest = common.parse_model(ChatCompletionRequest, data)
    common.check_model(req.model, ctx.client.model_name)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    mode = _tool_mode(req, ctx.tokenizer)
    prompt_ids = _prompt_ids(req, ctx.tokenizer, mode)
    gen = Generation(ctx.client, [_engine_request(req, prompt_ids, ctx.client.max_model_len, request_id, mode)],
                     ctx.metrics)
    access_record(request).attach(request_id, gen)
    head = {"id": request_id, "created": common.now_seconds(), "model": ctx.client.model_name}
    if req.stream:
        outputs = await common.start_stream(request, gen)
        return common.EventStream(common.stream_events(_chunks(req, mode, gen, outputs, head, ctx.tokenizer)),
                                  on_close=gen.close)
    (result,) = await common.collect(request, gen)
    common.check_not_aborted([result])
    choices = [_choice(req, mode, c, ctx.tokenizer) for c in result.outputs]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": Usage.of(gen).openai()})


def _choice(req: ChatCompletionRequest, mode: _ToolMode | None, c: CompletionOutput, tok: Tokenizer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    parser = None
    if mode is not None:
        parser = mode.parser()
        parser.feed(mode.prefix + _reply_text(c, mode, tok))
        parser.finish()
        message["content"] = parser.content
        if parser.calls:
            message["content"] = parser.content or None
            message["tool_calls"] = [call.openai() for call in parser.calls]
    return {"index": c.index, "message": message, "logprobs": _choice_logprobs(req, tok, c),
            "finish_reason": _finish_reason(c, parser), "stop_reason": c.stop_reason}


def _chunk(head: dict[str, Any], index: int, delta: dict[str, Any], c: CompletionOutput | None = None,
           logprobs: dict[str, Any] | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if c is not None and c.finish_reason is not None:
        choice["stop_reason"] = c.stop_reason
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def _delta(parsed: Parsed) -> dict[str, Any]:
    """A streamed ``delta``; tool-call fragments of the same call in one chunk are merged into one entry."""
    delta: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
    calls: dict[int, dict[str, Any]] = {}
    for d in parsed.tool_calls:
        if d["index"] in calls:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
        else:
            calls[d["index"]] = {**d, "function": dict(d["function"])}
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


async def _chunks(req: ChatCompletionRequest, mode: _ToolMode | None, gen: Generation, outputs: AsyncIterator,
                  head: dict[str, Any], tok: Tokenizer) -> AsyncIterator[dict[str, Any]]:
    options = req.stream_options
    parsers = [mode.parser() for _ in range(req.n)] if mode is not None else None
    pending = [parser.feed(mode.prefix) for parser in parsers] if parsers else None  # a forced call's name
    for k in range(req.n):
        yield _chunk(head, k, {"role": "assistant", "content": ""})
    async for _, delta in outputs:
        for c in delta.outputs:
            common.check_completion_not_aborted(c)
            if not c.text and not c.token_ids and c.finish_reason is None:
                continue
            if parsers is None:
                parser, body = None, {"content": c.text} if c.text else {}
            else:
                parser, parsed = parsers[c.index], pending[c.index]
                pending[c.index] = Parsed()
                parsed.extend(parser.feed(_reply_text(c, mode, tok)))
                if c.finish_reason is not None:
                    parsed.extend(parser.finish())
                body = _delta(parsed)
            chunk = _chunk(head, c.index, body, c, _choice_logprobs(req, tok, c), _finish_reason(c, parser))
            if options and options.continuous_usage_stats:
                chunk["usage"] = Usage.of(gen).openai()
            yield chunk
    if options and options.include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": Usage.of(gen).openai()}

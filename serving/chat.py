"""``POST /v1/chat/completions``: OpenAI chat completions.

Request path: JSON body -> ``ChatCompletionRequest`` -> messages (roles system,
developer (rendered as system), user, assistant, tool; content a string or a list of
``{"type": "text"}`` parts, joined with newlines) rendered by the model's chat
template -> token ids (the template carries the BOS token) -> one ``GenerateRequest``
with ``SamplingParams.n = n`` -> ``Generation`` -> one ``chat.completion`` object or,
with ``stream: true``, ``chat.completion.chunk`` events (a role delta per choice
first) then ``data: [DONE]``. ``max_completion_tokens`` wins over ``max_tokens``;
omitted, generation may use the rest of the context. ``logprobs: true`` with
``top_logprobs: k`` returns OpenAI's ``logprobs.content`` list.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.chat import ChatFormatError, render_chat
from engine.outputs import CompletionOutput, GenerateRequest
from serving import api_common as common
from serving.access_log import access_record
from serving.errors import invalid
from serving.generation import Generation
from serving.protocol import ChatCompletionRequest
from engine.tokenizer import Tokenizer


def _prompt_ids(req: ChatCompletionRequest, tok: Tokenizer) -> list[int]:
    if req.tools:
        raise invalid("tool calling is not supported by this server", "tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise invalid(f"response_format {req.response_format.type!r} is not supported (only 'text')",
                      "response_format")
    try:
        return render_chat(tok, [m.model_dump(exclude_none=True) for m in req.messages],
                           add_generation_prompt=req.add_generation_prompt, template_kwargs=req.chat_template_kwargs)
    except ChatFormatError as e:
        raise invalid(str(e), e.param) from e


def _engine_request(req: ChatCompletionRequest, prompt_ids: list[int], max_model_len: int,
                    request_id: str) -> GenerateRequest:
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = common.resolve_max_tokens(limit, len(prompt_ids), max_model_len, limit_param, "messages")
    params = common.sampling_params(req, max_tokens=max_tokens,
                                    logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                    aliases={"logprobs": "top_logprobs", "max_tokens": limit_param})
    return GenerateRequest(f"{request_id}-0", prompt_ids, params, priority=req.priority)


def _token_entry(tok: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": common.clamp_logprob(logprob), "bytes": list(text.encode("utf-8"))}


def _logprobs(tok: Tokenizer, c: CompletionOutput, k: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(c.token_ids, c.logprobs or []):
        item: dict[str, Any] = _token_entry(tok, tid, common.sampled_logprob(entry, tid))
        item["top_logprobs"] = [_token_entry(tok, t, v) for t, v in common.top_entries(entry, k)]
        content.append(item)
    return {"content": content}


def _choice_logprobs(req: ChatCompletionRequest, tok: Tokenizer, c: CompletionOutput) -> dict[str, Any] | None:
    return _logprobs(tok, c, req.top_logprobs or 0) if req.logprobs else None


async def create(ctx: common.ServerContext, request: Request) -> Any:
    data = await common.read_json_object(request, ctx.max_body_bytes)
    req: ChatCompletionRequest = common.parse_model(ChatCompletionRequest, data)
    common.check_model(req.model, ctx.client.model_name)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompt_ids = _prompt_ids(req, ctx.tokenizer)
    gen = Generation(ctx.client, [_engine_request(req, prompt_ids, ctx.client.max_model_len, request_id)],
                     ctx.metrics)
    access_record(request).attach(request_id, gen)
    head = {"id": request_id, "created": common.now_seconds(), "model": ctx.client.model_name}
    if req.stream:
        outputs = await common.start_stream(request, gen)
        return common.EventStream(common.stream_events(_chunks(req, gen, outputs, head, ctx.tokenizer)),
                                  on_close=gen.close)
    (result,) = await common.collect(request, gen)
    common.check_not_aborted([result])
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _choice_logprobs(req, ctx.tokenizer, c), "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason} for c in result.outputs]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": common.usage(gen)})


def _chunk(head: dict[str, Any], index: int, delta: dict[str, Any], c: CompletionOutput | None = None,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": c.finish_reason if c else None}
    if c is not None and c.finish_reason is not None:
        choice["stop_reason"] = c.stop_reason
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


async def _chunks(req: ChatCompletionRequest, gen: Generation, outputs: AsyncIterator,
                  head: dict[str, Any], tok: Tokenizer) -> AsyncIterator[dict[str, Any]]:
    options = req.stream_options
    for k in range(req.n):
        yield _chunk(head, k, {"role": "assistant", "content": ""})
    async for _, delta in outputs:
        for c in delta.outputs:
            common.check_completion_not_aborted(c)
            if not c.text and not c.token_ids and c.finish_reason is None:
                continue
            chunk = _chunk(head, c.index, {"content": c.text} if c.text else {}, c,
                           _choice_logprobs(req, tok, c))
            if options and options.continuous_usage_stats:
                chunk["usage"] = common.usage(gen)
            yield chunk
    if options and options.include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": common.usage(gen)}

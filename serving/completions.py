"""``POST /v1/completions``: OpenAI's legacy text completions.

Request path: JSON body -> ``CompletionRequest`` -> each prompt (a string, a list of
strings, a token-id list or a list of token-id lists) tokenized and checked against
the context -> one ``GenerateRequest`` per prompt with ``SamplingParams.n = n`` ->
``Generation`` -> either one ``text_completion`` object or, with ``stream: true``,
SSE chunks then ``data: [DONE]``. Choice ``i * n + k`` is completion ``k`` of prompt
``i``, as OpenAI numbers them. ``echo`` prepends the prompt (and, with ``logprobs``,
its logprobs); ``logprobs: k`` returns the sampled token's logprob plus the top ``k``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from engine.outputs import CompletionOutput, GenerateRequest, TokenLogprobs
from serving import api_common as common
from serving.access_log import access_record
from serving.errors import invalid
from serving.generation import Generation
from serving.logprobs import CompletionLogprobs
from serving.protocol import CompletionRequest
from serving.usage import Usage
from engine.tokenizer import Tokenizer


@dataclasses.dataclass
class _Prompt:
    text: str  # what echo prints
    token_ids: list[int]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _split_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(_is_int(t) for t in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise invalid("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                  "token-id lists", "prompt", code="invalid_type")


def _tokenize(req: CompletionRequest, tok: Tokenizer) -> list[_Prompt]:
    prompts = []
    for i, p in enumerate(_split_prompts(req.prompt)):
        if isinstance(p, str):
            prompts.append(_Prompt(p, tok.encode(p, add_special_tokens=req.add_special_tokens)))
        else:
            common.check_token_ids(p, tok.vocab_size, "prompt")
            prompts.append(_Prompt(tok.decode(p), p))
        if not prompts[-1].token_ids:
            raise invalid(f"prompt {i} is empty", "prompt")
    return prompts


def _engine_requests(req: CompletionRequest, prompts: list[_Prompt], max_model_len: int,
                     request_id: str) -> list[GenerateRequest]:
    if req.suffix is not None:
        raise invalid("suffix is not supported by this server", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of is not supported by this server (only best_of == n)", "best_of")
    out = []
    for i, p in enumerate(prompts):
        max_tokens = common.resolve_max_tokens(req.max_tokens, len(p.token_ids), max_model_len, "max_tokens", "prompt")
        params = common.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                        prompt_logprobs=req.logprobs if req.echo else None)
        out.append(GenerateRequest(f"{request_id}-{i}", p.token_ids, params, prompt=p.text, priority=req.priority))
    return out


def _merge_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a[key] + b[key] for key in a}


class _Choice:
    """Per-choice state: echo not yet sent, running logprob offsets."""

    def __init__(self, req: CompletionRequest, prompt: _Prompt, prompt_logprobs: list[TokenLogprobs | None] | None,
                 tok: Tokenizer):
        self.pending_echo = req.echo
        self.prompt, self.prompt_logprobs = prompt, prompt_logprobs
        self.logprobs = CompletionLogprobs(tok, req.logprobs) if req.logprobs is not None else None

    def render(self, c: CompletionOutput) -> tuple[str, dict[str, Any] | None]:
        """This delta's text and logprobs, the prompt's prepended the first time when echoing."""
        text, lp = c.text, None
        if self.pending_echo:
            self.pending_echo = False
            text = self.prompt.text + text
            if self.logprobs is not None:
                lp = self.logprobs.build(self.prompt.token_ids, self.prompt_logprobs)
                self.logprobs.offset = len(self.prompt.text)
        if self.logprobs is not None:
            generated = self.logprobs.build(c.token_ids, c.logprobs)
            lp = generated if lp is None else _merge_logprobs(lp, generated)
        return text, lp


def _choice_dict(index: int, text: str, lp: dict | None, c: CompletionOutput) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


async def create(ctx: common.ServerContext, request: Request) -> Any:
    data = await common.read_json_object(request, ctx.max_body_bytes)
    req: CompletionRequest = common.parse_model(CompletionRequest, data)
    common.check_model(req.model, ctx.client.model_name)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompts = _tokenize(req, ctx.tokenizer)
    gen = Generation(ctx.client, _engine_requests(req, prompts, ctx.client.max_model_len, request_id), ctx.metrics)
    access_record(request).attach(request_id, gen)
    head = {"id": request_id, "object": "text_completion", "created": common.now_seconds(),
            "model": ctx.client.model_name}
    if req.stream:
        outputs = await common.start_stream(request, gen)
        return common.EventStream(common.stream_events(_chunks(req, prompts, gen, outputs, head, ctx.tokenizer)),
                                  on_close=gen.close)
    results = await common.collect(request, gen)
    common.check_not_aborted(results)
    choices = []
    for i, (p, out) in enumerate(zip(prompts, results)):
        for c in out.outputs:
            text, lp = _Choice(req, p, out.prompt_logprobs, ctx.tokenizer).render(c)
            choices.append(_choice_dict(i * req.n + c.index, text, lp, c))
    choices.sort(key=lambda ch: ch["index"])
    return JSONResponse({**head, "choices": choices, "usage": Usage.of(gen).openai()})


async def _chunks(req: CompletionRequest, prompts: list[_Prompt], gen: Generation,
                  outputs: AsyncIterator, head: dict[str, Any], tok: Tokenizer) -> AsyncIterator[dict[str, Any]]:
    options = req.stream_options
    states: dict[int, _Choice] = {}
    async for i, delta in outputs:
        for c in delta.outputs:
            common.check_completion_not_aborted(c)
            index = i * req.n + c.index
            if index not in states:
                states[index] = _Choice(req, prompts[i], delta.prompt_logprobs, tok)
            text, lp = states[index].render(c)
            if not text and not c.token_ids and c.finish_reason is None:
                continue
            chunk = {**head, "choices": [_choice_dict(index, text, lp, c)]}
            if options and options.continuous_usage_stats:
                chunk["usage"] = Usage.of(gen).openai()
            yield chunk
    if options and options.include_usage:
        yield {**head, "choices": [], "usage": Usage.of(gen).openai()}

"""What ``/v1/completions`` and ``/v1/chat/completions`` share.

Reading and checking the JSON body (size limit, UTF-8, content type, no lone
UTF-16 surrogates in any string: ``"\\ud800"`` is valid JSON but not Unicode text,
and tokenizers, templates and UTF-8 encoders all reject it), turning
request fields into ``SamplingParams`` with the context-length check, running a
``Generation`` to the end while watching for the client leaving, and framing
Server-Sent Events for ``stream: true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.outputs import CompletionOutput, EngineClient, EngineError, RequestOutput
from engine.sampling_params import SamplingParamError, SamplingParams, StructuredOutputsParams
from engine.structured_output import compile_grammar
from serving.errors import APIError, from_engine_error, from_sampling_error, internal_error, invalid
from serving.generation import Generation
from serving.metrics import ServingMetrics
from serving.protocol import SamplingFields
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerContext:
    client: EngineClient
    tokenizer: Tokenizer
    metrics: ServingMetrics
    max_body_bytes: int


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


# ---- request body -----------------------------------------------------------
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 415/413/400 for a wrong content type, a body over ``limit``, bad JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {content_type!r}",
                           code="unsupported_media_type")
    too_large = APIError(413, f"request body exceeds the {limit}-byte limit", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect as e:
        raise ClientGone() from e
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise invalid(f"request body is not valid UTF-8: {e}", code="invalid_json") from e
    except (ValueError, RecursionError) as e:
        raise invalid(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise invalid(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(body):  # only a \uD800-\uDFFF escape puts a surrogate in a parsed string
        _check_unicode(data)
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (a JSON escaped pair is already one code point)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _check_unicode(data: Any) -> None:
    """400 naming the first string (key or value, at any depth) that is not valid Unicode."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            at = _lone_surrogate(value)
            if at is not None:
                raise invalid(f"{_loc(loc)}: the string holds a lone UTF-16 surrogate ({value[at]!a} at index {at}), "
                              "which is not valid Unicode", _loc(loc), code="invalid_unicode")
        elif isinstance(value, dict):
            bad_key = next((k for k in value if _lone_surrogate(k) is not None), None)
            if bad_key is not None:
                where = _loc(loc) or "request body"
                raise invalid(f"{where}: the key {bad_key!a} holds a lone UTF-16 surrogate, which is not valid Unicode",
                              _loc(loc) or None, code="invalid_unicode")
            stack.extend((v, loc + (k,)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, loc + (i,)) for i, v in reversed(list(enumerate(value))))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_model(cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate ``data`` as ``cls``; a schema error becomes a 400 naming the (first) offending field.

    A value matching no member of a union (``stop``: string or list of strings) yields
    one error per member; they are reported together under the field they share.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        same_field = [err for err in errors if err["loc"][:1] == first["loc"][:1]]
        prefix = _common_prefix([err["loc"] for err in same_field])
        param = _loc(prefix)
        missing = first["type"] == "missing"
        if len(same_field) == 1:
            message = f"{param}: {first['msg']}"
        else:
            value = _value_at(data, prefix)
            forms = "; ".join(f"as {_loc(err['loc'][len(prefix):])}: {err['msg']}" for err in same_field)
            message = f"{param}: invalid value {_short_repr(value)} ({forms})"
        if not missing and len(same_field) == 1:
            message += f" (got {_short_repr(first.get('input'))})"
        raise invalid(message, param or None, code="missing_required_parameter" if missing else "invalid_type") from e


def _common_prefix(locs: list[tuple]) -> tuple:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist (this server serves `{served}`)",
                       param="model", code="model_not_found")


# ---- sampling parameters ---------------------------------------------------
def resolve_max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, param: str,
                       prompt_param: str) -> int | None:
    """``max_tokens`` checked against the context; omitted means the rest of the context (vLLM)."""
    if prompt_len >= max_model_len:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                      f"{prompt_len} tokens", prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return max_model_len - prompt_len
    if isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > max_model_len:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                      f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                      f"completion). Reduce the prompt or {param}.", param, code="context_length_exceeded")
    return max_tokens


_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty", "seed", "stop", "stop_token_ids")


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, aliases: dict[str, str] | None = None) -> SamplingParams:
    """``SamplingParams`` from the request's fields; an out-of-range value is a 400 naming its field."""
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    kwargs = {name: getattr(req, name) for name in _OPTIONAL_SAMPLING if getattr(req, name) is not None}
    if req.logit_bias:
        kwargs["logit_bias"] = _logit_bias(req.logit_bias)
    kwargs["structured_outputs"] = structured_outputs(req)
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, **kwargs)
    except SamplingParamError as e:
        raise from_sampling_error(e, aliases) from e


_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


def structured_outputs(req: SamplingFields) -> StructuredOutputsParams | None:
    """The request's one output constraint: ``response_format`` (OpenAI), ``guided_*`` or
    ``structured_outputs`` (vLLM); None for plain text. More than one, or one that does not
    compile (an invalid schema, regex or grammar), is a 400 naming the field."""
    given: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise invalid("response_format: type json_schema needs json_schema.schema", "response_format")
        given.append(("response_format", {"json": fmt.json_schema.schema_}))
    given += [(name, {key: getattr(req, name)}) for name, key in _GUIDED if getattr(req, name) is not None]
    if req.structured_outputs is not None:
        given.append(("structured_outputs", req.structured_outputs.model_dump(exclude_none=True, by_alias=True)))
    if not given:
        return None
    if len(given) > 1:
        raise invalid(f"{given[1][0]}: give one output constraint, not {' and '.join(n for n, _ in given)}",
                      given[1][0])
    param, fields = given[0]
    try:
        spec = StructuredOutputsParams(**fields)
        compile_grammar(spec)
    except SamplingParamError as e:
        raise invalid(f"{param}: {str(e).removeprefix(e.param + ': ')}", param) from e
    return spec


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings); the engine takes ints."""
    bad = next((key for key in bias if not (key.isascii() and key.isdigit())), None)
    if bad is not None:
        raise invalid(f"logit_bias: keys must be token ids (non-negative integers), got {bad!r}", "logit_bias")
    return {int(key): value for key, value in bias.items()}


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param)


def now_seconds() -> int:
    return int(time.time())


# ---- running ----------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, coro: Awaitable[Any]) -> Any:
    """Await ``coro`` unless the client disconnects first (then ``ClientGone``; ``coro`` is cancelled)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise ClientGone()
        return task.result()
    finally:
        with anyio.CancelScope(shield=True):
            for t in (task, watcher):
                t.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)


async def collect(request: Request, gen: Generation) -> list[RequestOutput]:
    """Run ``gen`` to the end and return one merged output per prompt; ``ClientGone`` if the client left.

    The engine requests are aborted (``gen.close``) whenever this returns or raises.
    """
    merged: list[RequestOutput | None] = [None] * len(gen.requests)

    async def run() -> None:
        async for i, delta in gen.outputs():
            if merged[i] is None:
                merged[i] = RequestOutput(delta.request_id, delta.prompt_token_ids, [], prompt=delta.prompt)
            merged[i].merge(delta)

    try:
        await _until_disconnect(request, run())
    except (EngineError, ValueError) as e:  # ValueError: the engine's own request validation
        raise from_engine_error(e) from e
    finally:
        await gen.close()
    missing = [r.request_id for r, m in zip(gen.requests, merged) if m is None]
    if missing:
        raise APIError(503, f"the engine returned no output for {missing[0]}", code="engine_unavailable")
    return merged  # type: ignore[return-value]


def check_completion_not_aborted(c: CompletionOutput) -> None:
    """An engine-side abort (shutdown) of a request whose client is still here is a 503."""
    if c.finish_reason == "abort":
        raise APIError(503, "the request was aborted by the engine (shutting down?)", code="engine_unavailable")


def check_not_aborted(outputs: list[RequestOutput]) -> None:
    for o in outputs:
        for c in o.outputs:
            check_completion_not_aborted(c)


# ---- streaming --------------------------------------------------------------
def sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class EventStream(StreamingResponse):
    """An SSE response that runs ``on_close`` when it ends for any reason (client gone included)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def start_stream(request: Request, gen: Generation) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``gen.outputs()`` with the first delta already received.

    Waiting for it before answering lets an overloaded or failed engine still get a
    proper 429/503 status instead of an error event inside a 200 stream; a client that
    leaves meanwhile (``ClientGone``) has its engine requests aborted.
    """
    outputs = gen.outputs()
    try:
        first = await _until_disconnect(request, anext(outputs, None))
    except (EngineError, ValueError) as e:
        await gen.close()
        raise from_engine_error(e) from e
    except BaseException:
        await gen.close()
        raise

    async def chained() -> AsyncIterator[tuple[int, RequestOutput]]:
        if first is not None:
            yield first
            async for item in outputs:
                yield item

    return chained()


async def stream_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame JSON chunks as SSE, turn any failure into an error event, end with ``[DONE]``.

    The 200 status is sent already, so an error can only be an event: a stream always
    ends well-formed, whatever went wrong (a bug too: logged, named by type only).
    """
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except (EngineError, ValueError) as e:
        yield sse(from_engine_error(e).body())
    except APIError as e:
        yield sse(e.body())
    except Exception as e:  # a bug; the client still gets a complete stream
        logger.exception("error while streaming a response")
        yield sse(internal_error(e).body())
    yield sse("[DONE]")

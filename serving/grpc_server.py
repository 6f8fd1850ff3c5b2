"""The gRPC API (``pdserve.v1.PDServe``, ``serving/proto/pdserve.proto``) over any ``EngineClient``.

``start_grpc_server(client, tokenizer, metrics, host, port)`` starts a ``grpc.aio``
server in the running event loop, beside the HTTP app of the same process and
sharing its ``EngineClient``, tokenizer and ``ServingMetrics`` (requests are labelled
``protocol="grpc"``). Like the HTTP app it never starts or stops ``client``.

Requests go through the HTTP API's own code: the sampling fields become a
``CompletionRequest`` and pass ``api_common.check_model``, ``resolve_max_tokens``
and ``sampling_params``, and the engine requests run in a ``Generation``, so both
surfaces accept, reject and name parameters alike. The ``APIError`` those raise maps
onto a status by its HTTP status: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 429
RESOURCE_EXHAUSTED, 503 UNAVAILABLE (a ``request_id`` already running is
ALREADY_EXISTS); the offending field goes in the trailing metadata ``pdserve-param``
(and a 429's ``Retry-After`` in ``retry-after``). A message that does not parse (bad
UTF-8 in a string, corrupt wire format) is INVALID_ARGUMENT too: the handlers are
registered with a decoder that hands them the parse error instead of letting grpc answer
UNKNOWN. Anything else a handler raises is a bug: logged, and answered INTERNAL with the
exception's type only. A client-chosen ``request_id`` is 1-128 characters of
``[A-Za-z0-9._:-]`` (the engine names the extra sequences of ``n > 1`` ``ID#k``).
A cancelled call (client gone, deadline) aborts its engine request, which frees its KV blocks.

Also served: ``grpc.health.v1.Health`` (SERVING / NOT_SERVING from ``client.health()``,
refreshed on every ``Check`` and every ``health_interval`` seconds for ``Watch``, for
the overall server ``""`` and for ``pdserve.v1.PDServe``) and server reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from engine.outputs import CompletionOutput, EngineClient, EngineError, GenerateRequest
from engine.tokenizer import Tokenizer
from serving import api_common as common
from serving.errors import APIError, from_engine_error, internal_error, invalid
from serving.generation import Generation
from serving.logprobs import positions
from serving.metrics import ServingMetrics
from serving.protocol import CompletionRequest
from serving.usage import Usage
from serving.proto import pdserve_pb2 as pb
from serving.proto import pdserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PDServe"].full_name  # "pdserve.v1.PDServe"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
PARAM_METADATA_KEY = "pdserve-param"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                 409: grpc.StatusCode.ALREADY_EXISTS, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                 503: grpc.StatusCode.UNAVAILABLE}

# SamplingParams message fields that map one-to-one onto CompletionRequest fields.
_SCALAR_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs",
                  "skip_special_tokens", "include_stop_str_in_output")


class _Abort(Exception):
    """An ``APIError`` on its way to ``context.abort``."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


def _status(e: APIError) -> grpc.StatusCode:
    return _STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, e: APIError) -> NoReturn:
    metadata = ((PARAM_METADATA_KEY, e.param),) if e.param else ()
    metadata += tuple((key.lower(), value) for key, value in e.headers.items())
    await context.abort(_status(e), e.message, trailing_metadata=metadata)


@dataclasses.dataclass
class _Undecodable:
    """A request message that did not parse; its handler answers INVALID_ARGUMENT."""

    error: str


def _decoder(message_class: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return _Undecodable(str(e))
    return decode


def _guarded(method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Callable:
    """``method`` answering INVALID_ARGUMENT for an undecodable request and INTERNAL (logged) for a bug."""

    @functools.wraps(method)
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort(context, invalid(f"the request message does not parse: {request.error}", code="invalid_message"))
        try:
            return await method(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, internal_error(e).message)
    return handler


def add_servicer(servicer: "PDServeServicer", server: grpc.aio.Server) -> None:
    """``pb_grpc.add_PDServeServicer_to_server`` with ``_decoder`` and ``_guarded`` around every method."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["PDServe"].methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(_guarded(getattr(servicer, method.name)),
                                     request_deserializer=_decoder(getattr(pb, method.input_type.name)),
                                     response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """``APIError`` (and the engine's errors) as ``_Abort`` for the handler to report."""
    try:
        yield
    except APIError as e:
        raise _Abort(e) from e
    except (EngineError, ValueError) as e:  # ValueError: the engine's own request validation
        raise _Abort(from_engine_error(e)) from e


def completion_request(request: pb.GenerateRequest) -> CompletionRequest:
    """The HTTP ``CompletionRequest`` a gRPC ``GenerateRequest`` stands for (unset fields: HTTP defaults)."""
    sp = request.sampling_params
    data: dict[str, Any] = {name: getattr(sp, name) for name in _SCALAR_FIELDS if sp.HasField(name)}
    if sp.stop:
        data["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        data["stop_token_ids"] = list(sp.stop_token_ids)
    for name in ("guided_json", "guided_regex", "guided_grammar"):
        if sp.HasField(name):
            data[name] = getattr(sp, name)
    if sp.guided_choice:
        data["guided_choice"] = list(sp.guided_choice)
    if sp.guided_json_object:
        data["response_format"] = {"type": "json_object"}
    if request.model:
        data["model"] = request.model
    if request.HasField("add_special_tokens"):
        data["add_special_tokens"] = request.add_special_tokens
    kind = request.WhichOneof("prompt")
    data["prompt"] = request.text if kind == "text" else list(request.token_ids.ids) if kind else ""
    data["priority"] = request.priority
    return common.parse_model(CompletionRequest, data)


def _prompt_ids(req: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    if isinstance(req.prompt, str):
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens) if req.prompt else []
    else:
        ids = req.prompt
        common.check_token_ids(ids, tokenizer.vocab_size, "prompt")
    if not ids:
        raise invalid("prompt is empty (set text or token_ids)", "prompt")
    return ids


def engine_request(req: CompletionRequest, prompt_ids: list[int], max_model_len: int,
                   request_id: str) -> GenerateRequest:
    """The engine request, with the context-length check and ``SamplingParams`` of ``/v1/completions``."""
    max_tokens = common.resolve_max_tokens(req.max_tokens, len(prompt_ids), max_model_len, "max_tokens", "prompt")
    params = common.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs)
    prompt = req.prompt if isinstance(req.prompt, str) else None
    return GenerateRequest(request_id, prompt_ids, params, prompt=prompt, priority=req.priority)


def _logprobs(c: CompletionOutput, k: int) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=p.token_id, logprob=p.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in p.top])
            for p in positions(c.token_ids, c.logprobs, k) if p.logprob is not None]


def _response(request_id: str, c: CompletionOutput, logprobs: int | None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, index=c.index, token_ids=c.token_ids, text=c.text,
                              finish_reason=c.finish_reason or "")
    if logprobs is not None and c.logprobs:
        msg.logprobs.extend(_logprobs(c, logprobs))
    if isinstance(c.stop_reason, int):
        msg.stop_token_id = c.stop_reason
    elif isinstance(c.stop_reason, str):
        msg.stop_string = c.stop_reason
    return msg


class PDServeServicer(pb_grpc.PDServeServicer):
    """``pdserve.v1.PDServe`` over ``client``; running requests are kept by id for ``Abort``."""

    def __init__(self, client: EngineClient, tokenizer: Tokenizer, metrics: ServingMetrics):
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.created = int(time.time())
        self._running: dict[str, bool] = {}  # request id -> aborted by an Abort call

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
            if not _REQUEST_ID.fullmatch(request_id):
                raise _Abort(invalid(f"request_id must be 1-128 characters of [A-Za-z0-9._:-], got "
                                     f"{request_id[:140]!r}", "request_id"))
            if request_id in self._running:
                raise _Abort(APIError(409, f"request_id {request_id!r} is already running", param="request_id"))
            with _api_errors():
                req = completion_request(request)
                common.check_model(req.model, self.client.model_name)
                ids = _prompt_ids(req, self.tokenizer)
                gen = Generation(self.client, [engine_request(req, ids, self.client.max_model_len, request_id)],
                                 self.metrics, protocol="grpc")
        except _Abort as e:
            await _abort(context, e.error)
        self._running[request_id] = False
        try:
            with _api_errors():
                async for _, delta in gen.outputs():
                    last = len(delta.outputs) - 1 if delta.finished else -1
                    for j, c in enumerate(delta.outputs):
                        if c.finish_reason == "abort" and not self._running[request_id]:
                            raise APIError(503, "the request was aborted by the engine (shutting down?)",
                                           code="engine_unavailable")
                        if not c.text and not c.token_ids and c.finish_reason is None:
                            continue
                        msg = _response(request_id, c, req.logprobs)
                        if j == last:
                            msg.usage.CopyFrom(pb.Usage(**Usage.of(gen).counts()))
                        await context.write(msg)
        except _Abort as e:
            await _abort(context, e.error)
        finally:  # also on cancellation (client gone, deadline): close() is shielded and aborts the engine request
            del self._running[request_id]
            await gen.close()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if request.request_id not in self._running:
            return pb.AbortResponse(aborted=False)
        self._running[request.request_id] = True
        await self.client.abort(request.request_id)
        return pb.AbortResponse(aborted=True)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            common.check_model(request.model or None, self.client.model_name)
        except APIError as e:
            await _abort(context, e)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = self.tokenizer.encode(request.text, add_special_tokens=add)
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.client.max_model_len)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        ids = list(request.token_ids)
        try:
            common.check_model(request.model or None, self.client.model_name)
            common.check_token_ids(ids, self.tokenizer.vocab_size, "token_ids")
        except APIError as e:
            await _abort(context, e)
        return pb.DetokenizeResponse(text=self.tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        card = pb.ModelCard(id=self.client.model_name, max_model_len=self.client.max_model_len, owned_by="pdserve",
                            created=self.created)
        return pb.ListModelsResponse(models=[card])


class _HealthServicer(health_aio.HealthServicer):
    """The standard health service; ``Check`` asks the engine first, so it is never stale."""

    def __init__(self, client: EngineClient):
        super().__init__()
        self.client = client

    async def refresh(self) -> None:
        try:
            healthy = await self.client.health()
        except Exception as e:  # a health probe answers, it does not raise
            logger.warning("EngineClient.health() failed: %s", e)
            healthy = False
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)


@dataclasses.dataclass
class GrpcServer:
    """A started gRPC server; ``await stop(grace)`` ends it (running calls get ``grace`` seconds)."""

    server: grpc.aio.Server
    port: int
    servicer: PDServeServicer
    health: _HealthServicer
    _watcher: asyncio.Task

    async def stop(self, grace: float | None = None) -> None:
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def _watch_health(health: _HealthServicer, interval: float) -> None:
    while True:
        await health.refresh()
        await asyncio.sleep(interval)


async def start_grpc_server(client: EngineClient, tokenizer: Tokenizer, metrics: ServingMetrics, host: str,
                            port: int, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                            health_interval: float = 1.0) -> GrpcServer:
    """Serve ``pdserve.v1.PDServe``, health and reflection on ``host:port`` (0 picks a free port).

    Raises ``RuntimeError`` when the address cannot be bound.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    servicer = PDServeServicer(client, tokenizer, metrics)
    add_servicer(servicer, server)
    health = _HealthServicer(client)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:  # older grpcio reports a failed bind this way instead of raising
        raise RuntimeError(f"cannot listen on {address}")
    await health.refresh()
    await server.start()
    watcher = asyncio.ensure_future(_watch_health(health, health_interval))
    return GrpcServer(server, bound, servicer, health, watcher)

"""The OpenAI-compatible HTTP API over any ``EngineClient``.

``build_app(client, tokenizer, ...)`` returns a FastAPI app; it assumes nothing about
what is behind ``client`` (the in-process ``AsyncEngine``, or the PD router's client),
and never starts or stops it. Endpoints:

* ``POST /v1/completions`` — text completions (``serving.completions``).
* ``POST /v1/chat/completions`` — chat completions (``serving.chat``).
  Both stream with ``stream: true`` (SSE ``data: {json}`` chunks, then ``data: [DONE]``).
* ``GET /v1/models``, ``GET /v1/models/{id}`` — the one served model (``client.model_name``).
* ``GET /health`` — 200 ``{}`` when ``client.health()`` is true, else 503.
* ``GET /metrics`` — Prometheus text format (``serving.metrics``).
* ``GET /version`` — ``{"version": ...}`` of the installed pdserve (the dev server adds the
  engine's compute ``dtype`` and ``dtype_reason``: what ``--dtype auto`` chose on this machine).

Authentication: with ``api_key`` set, every path needs ``Authorization: Bearer <api_key>``
(401 otherwise; compared with ``hmac.compare_digest``) except the read-only ``OPEN_PATHS``
(``/health``, ``/metrics``, ``/version`` and the OpenAPI docs), so probes and scrapers need
no secret and routes added on top of this app (the router's ``/pools`` and admin routes)
are protected without saying so.

Every error, whatever its origin, is OpenAI's ``{"error": {"message", "type", "param",
"code"}}``: 400 bad request or parameter, 401, 404 unknown model or path, 405, 413 body
over ``max_body_bytes``, 415 not JSON, 429 engine overloaded (with ``Retry-After``), 503
engine down, 500 bug. A 500 names the exception type only, never a message or traceback
(those go to the log), and leaves the connection usable: no exception escapes to uvicorn,
which would drop a keep-alive connection under the client's next request.
A client that disconnects gets its engine requests aborted. Each ``/v1/`` request
writes one JSON line to the ``pdserve.access`` logger (``serving.access_log``).

``/openapi.json`` describes the request bodies as the pydantic models of
``serving.protocol`` (the handlers read and validate bodies themselves, so FastAPI
would not), and every error answer as ``ErrorResponse``.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.outputs import EngineClient
from serving import chat, completions
from serving.access_log import CLIENT_CLOSED, AccessLogMiddleware
from serving.api_common import ClientGone, ServerContext
from serving.errors import APIError, internal_error
from serving.metrics import CONTENT_TYPE, ServingMetrics
from serving.protocol import ChatCompletionRequest, CompletionRequest
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as a JSON token-id list fits
# Answered without the API key: probes, scrapers, the API's description. Nothing here changes state.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})


def pdserve_version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    return JSONResponse(e.body(), status_code=e.status, headers={**headers, **e.headers})


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <api_key>`` on every path but ``OPEN_PATHS``."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            error = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """The last line: an exception nothing else handled becomes a 500 in OpenAI's shape, logged here.

    Outermost, and it does not re-raise: Starlette's own handler would, and uvicorn then
    closes the connection after the 500, so a keep-alive client's next request on it is
    dropped unanswered. A failure after the response started (a stream) can only be logged.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _error_response(internal_error(e))(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log records 499

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        response = _error_response(APIError(e.status_code, message, code=str(e.detail).lower().replace(" ", "_")))
        response.headers.update(e.headers or {})
        return response


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's shape."""

    error: ErrorDetail


_ERRORS = {400: "bad request or parameter", 401: "missing or wrong API key", 404: "unknown model or path",
           413: "request body too large", 415: "body is not JSON", 429: "overloaded: retry after Retry-After seconds",
           500: "server bug", 503: "engine unavailable"}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a handler's request body as ``model`` (added to the components below)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_GENERATION_OK = {200: {"description": "a completion object, or with `stream: true` Server-Sent Events",
                        "content": {"application/json": {}, "text/event-stream": {}}}}
_GENERATION_ERRORS = _responses(400, 401, 404, 413, 415, 429, 500, 503)


def _describe_request_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Make ``app.openapi()`` carry ``models`` (and the models they use) under components/schemas."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(client: EngineClient, tokenizer: Tokenizer, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: ServingMetrics | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``client``.

    ``tokenizer`` must match the model behind ``client`` (prompts are tokenized here).
    ``metrics`` defaults to a fresh ``ServingMetrics(client.stats)``; pass one to share
    it with another surface (gRPC) of the same process.
    """
    metrics = metrics if metrics is not None else ServingMetrics(client.stats)
    ctx = ServerContext(client, tokenizer, metrics, max_body_bytes)
    created = int(time.time())
    app = FastAPI(title="pdserve", version=pdserve_version())
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(AccessLogMiddleware)  # outside the key check, so it also logs 401s
    app.add_middleware(InternalErrorMiddleware)  # added last: outermost
    _install_error_handlers(app)
    _describe_request_bodies(app, (CompletionRequest, ChatCompletionRequest))

    def model_card() -> dict:
        return {"id": client.model_name, "object": "model", "created": created, "owned_by": "pdserve",
                "root": client.model_name, "max_model_len": client.max_model_len}

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest), responses={
        **_GENERATION_OK, **_GENERATION_ERRORS})
    async def create_completion(request: Request) -> Response:
        return await completions.create(ctx, request)

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest), responses={
        **_GENERATION_OK, **_GENERATION_ERRORS})
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(ctx, request)

    @app.get("/v1/models", responses=_responses(401))
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=_responses(401, 404))
    async def get_model(model_id: str) -> dict:
        if model_id != client.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", responses=_responses(503))
    async def health() -> Response:
        try:
            healthy = await client.health()
        except Exception as e:  # a health probe answers, it does not raise
            logger.warning("EngineClient.health() failed: %s", e)
            healthy = False
        if not healthy:
            return _error_response(APIError(503, "the engine is not healthy", code="engine_unavailable"))
        return JSONResponse({})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        choice = getattr(client, "dtype_choice", None)  # the dev server's engine: its compute dtype and why
        extra = {} if choice is None else {"dtype": choice.dtype, "dtype_reason": choice.reason}
        return {"version": pdserve_version(), **extra}

    return app

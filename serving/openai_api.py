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
* ``GET /version`` — ``{"version": ...}`` of the installed pdserve.

Authentication: with ``api_key`` set, every path under ``/v1/`` needs
``Authorization: Bearer <api_key>`` (401 otherwise); ``/health``, ``/metrics``,
``/version`` and the OpenAPI docs stay open so probes and scrapers need no secret.

Every error, whatever its origin, is OpenAI's ``{"error": {"message", "type", "param",
"code"}}``: 400 bad request or parameter, 401, 404 unknown model or path, 405, 413 body
over ``max_body_bytes``, 415 not JSON, 429 engine overloaded, 503 engine down, 500 bug.
A client that disconnects gets its engine requests aborted. Each ``/v1/`` request
writes one JSON line to the ``pdserve.access`` logger (``serving.access_log``).
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.outputs import EngineClient
from serving import chat, completions
from serving.access_log import CLIENT_CLOSED, AccessLogMiddleware
from serving.api_common import ClientGone, ServerContext
from serving.errors import APIError
from serving.metrics import CONTENT_TYPE, ServingMetrics
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as a JSON token-id list fits


def pdserve_version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <api_key>`` on every path under ``/v1/``."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            error = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


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

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so uvicorn logs the traceback.
        return _error_response(APIError(500, f"internal server error: {type(e).__name__}", code="internal_error"))


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
    app.add_middleware(AccessLogMiddleware)  # added last: outermost, so it also logs 401s
    _install_error_handlers(app)

    def model_card() -> dict:
        return {"id": client.model_name, "object": "model", "created": created, "owned_by": "pdserve",
                "root": client.model_name, "max_model_len": client.max_model_len}

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(ctx, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(ctx, request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id != client.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
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
        return {"version": pdserve_version()}

    return app

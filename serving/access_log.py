"""One JSON access-log line per API request, on the ``pdserve.access`` logger.

``AccessLogMiddleware`` (pure ASGI, so it sees streamed responses end) wraps every
request under ``/v1/``; handlers attach the request id and its ``Generation`` with
``access_record(request).attach(...)``. The line is written when the response has
been sent, or the client left, e.g.::

    {"id": "chatcmpl-…", "method": "POST", "path": "/v1/chat/completions", "status": 200,
     "prompt_tokens": 12, "completion_tokens": 16, "ttft_s": 0.021, "total_s": 0.18,
     "finish_reason": "length", "client": "127.0.0.1:53412"}

Status 499 means the client disconnected before the answer was complete.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.generation import Generation

logger = logging.getLogger("pdserve.access")

_STATE_KEY = "pdserve_access"
CLIENT_CLOSED = 499  # nginx's "client closed request"


class AccessRecord:
    def __init__(self, scope: Scope):
        client = scope.get("client")
        self.method = scope.get("method", "")
        self.path = scope.get("path", "")
        self.client = f"{client[0]}:{client[1]}" if client else None
        self.start = time.monotonic()
        self.status: int | None = None
        self.request_id: str | None = None
        self.generation: Generation | None = None

    def attach(self, request_id: str, generation: Generation) -> None:
        self.request_id, self.generation = request_id, generation

    def fields(self) -> dict[str, Any]:
        g = self.generation
        ttft = g.ttft if g is not None else None
        return {
            "id": self.request_id, "method": self.method, "path": self.path,
            "status": self.status if self.status is not None else CLIENT_CLOSED,
            "prompt_tokens": g.prompt_tokens if g is not None else None,
            "completion_tokens": g.completion_tokens if g is not None else None,
            "ttft_s": round(ttft, 6) if ttft is not None else None,
            "total_s": round(time.monotonic() - self.start, 6),
            "finish_reason": ",".join(g.finish_reasons) if g is not None and g.finish_reasons else None,
            "client": self.client,
        }


def access_record(request: Request) -> AccessRecord:
    """The record of this request (a detached one outside ``AccessLogMiddleware``)."""
    record = request.scope.get("state", {}).get(_STATE_KEY)
    return record if record is not None else AccessRecord(request.scope)


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        record = AccessRecord(scope)
        scope.setdefault("state", {})[_STATE_KEY] = record

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            record.status = record.status or 500  # the error middleware outside us answers 500
            raise
        finally:
            logger.info(json.dumps(record.fields(), ensure_ascii=False))

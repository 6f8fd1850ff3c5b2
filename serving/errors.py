"""API errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the HTTP server reports goes through ``APIError`` so clients (the
``openai`` SDK included) see one body format whatever went wrong; ``from_engine_error``
and ``from_sampling_error`` map the engine contract's exceptions onto statuses (a
``ValueError`` out of ``generate`` is the engine's own validation: a 400). An
overloaded engine is a 429 with ``Retry-After`` (seconds) so clients back off
instead of timing out.
"""

from __future__ import annotations

from engine.outputs import EngineError, EngineOverloaded
from engine.sampling_params import SamplingParamError

_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
RETRY_AFTER_SECONDS = 1  # what a 429 asks for: the engine frees capacity as its running requests finish


class APIError(Exception):
    """An error answer: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return _ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(e: BaseException) -> APIError:
    """A bug: the answer names the exception type only (no message, no traceback); the log has the rest."""
    return APIError(500, f"internal server error: {type(e).__name__}", code="internal_error")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_sampling_error(e: SamplingParamError, aliases: dict[str, str] | None = None) -> APIError:
    """A 400 naming the request field; ``aliases`` maps engine names to the request's (top_logprobs)."""
    param = (aliases or {}).get(e.param, e.param)
    message = str(e)
    if param != e.param:
        message = f"{param}{message[len(e.param):]}"
    return invalid(message, param)


def from_engine_error(e: EngineError | ValueError) -> APIError:
    """What ``EngineClient.generate`` raised: overload 429, engine down 503, a rejected request 400."""
    if isinstance(e, EngineOverloaded):
        return APIError(429, f"the server is overloaded, retry later ({e})", code="engine_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, EngineError):
        return APIError(503, f"the engine cannot serve requests: {e}", code="engine_unavailable")
    if isinstance(e, SamplingParamError):
        return from_sampling_error(e)
    return invalid(f"the engine rejected the request: {e}")

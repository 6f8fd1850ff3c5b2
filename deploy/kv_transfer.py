"""KV hand-off between a prefill and a decode worker: the transfer state machine.

One ``Transfer`` per hand-off, on the decode side. States, in order::

    pending ──run()──▶ transferring ──▶ done
                             └────────▶ failed   (timeout, lost object, bad payload)

``pending``: the prefill worker has exported the request's latent rows and put the
``KVPayload`` somewhere the transport can reach (for ``RayObjectTransport``: the Ray
object store, ``ray.put`` by the prefill worker, which owns the object); the decode
worker holds only a handle (an ``ObjectRef``). ``transferring``: ``transport.fetch``
is pulling it, bounded by ``timeout_s``. ``done``: the payload is here (its bytes
and the seconds it took are recorded). ``failed``: ``cause`` says why; the caller
aborts the request on the decode side (its reservation is dropped) and the router
decides whether to prefill again. The prefill side's blocks are already free
(``export_kv`` frees them), so every outcome leaves no KV held on either side.
fp8 latent rows travel as their ``uint8`` bytes (``KVPayload.rows_bytes``).
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Any, Protocol


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class TransferFailed(RuntimeError):
    """A hand-off that ended in ``failed``; ``cause`` is a short label for metrics."""

    def __init__(self, cause: str, message: str):
        super().__init__(f"kv transfer failed ({cause}): {message}")
        self.cause = cause


class KVTransport(Protocol):
    """Moves a payload from the prefill side to the decode side, given the handle the prefill side made."""

    async def fetch(self, handle: Any) -> Any: ...


class RayObjectTransport:
    """The Ray object store: the handle is an ``ObjectRef`` put by the prefill worker."""

    async def fetch(self, handle: Any) -> Any:
        return await handle


class Transfer:
    """One hand-off: ``await run()`` moves pending → transferring → done | failed, once."""

    def __init__(self, request_id: str, handle: Any, transport: KVTransport, timeout_s: float):
        self.request_id = request_id
        self.handle = handle
        self.transport = transport
        self.timeout_s = timeout_s
        self.state = TransferState.PENDING
        self.cause: str | None = None
        self.nbytes = 0
        self.seconds = 0.0

    async def run(self) -> Any:
        """The payload; raises ``TransferFailed`` (state ``failed``) on timeout or any transport error."""
        if self.state is not TransferState.PENDING:
            raise RuntimeError(f"{self.request_id}: transfer already {self.state.value}")
        self.state = TransferState.TRANSFERRING
        t0 = time.perf_counter()
        try:
            payload = await asyncio.wait_for(self.transport.fetch(self.handle), self.timeout_s)
        except asyncio.TimeoutError:
            self._fail("timeout", f"no payload within {self.timeout_s:g} s", t0)
        except asyncio.CancelledError:
            self._fail("cancelled", "the request was aborted during the transfer", t0)
        except Exception as e:  # the transport's own errors (object lost, owner died, ...)
            self._fail("lost", f"{type(e).__name__}: {e}", t0)
        if getattr(payload, "request_id", None) is None or not hasattr(payload, "rows_bytes"):
            self._fail("invalid", f"not a KVPayload: {type(payload).__name__}", t0)
        self.seconds = time.perf_counter() - t0
        self.nbytes = int(payload.nbytes)
        self.state = TransferState.DONE
        self.handle = None  # drop our reference: the object store may free it
        return payload

    def _fail(self, cause: str, message: str, t0: float) -> None:
        self.seconds = time.perf_counter() - t0
        self.state = TransferState.FAILED
        self.cause = cause
        self.handle = None
        raise TransferFailed(cause, message)

    def report(self) -> dict[str, Any]:
        return {"state": self.state.value, "cause": self.cause, "nbytes": self.nbytes, "seconds": self.seconds}

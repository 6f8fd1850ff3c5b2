"""KV hand-off between a prefill and a decode worker: the transfer state machine, decode side.

One ``Transfer`` per hand-off, run by the decode worker's ``start_decode`` while the
prefill worker computes. States, in order::

    pending ──first piece──▶ transferring ──control──▶ done
       └───────────────────────────┴──────────────────▶ failed   (timeout, lost, invalid, cancelled)

``pending``: the decode worker holds a reservation (blocks for the rows) and asks the
source (``KVSource.pull``: the prefill worker's ``pull_kv``, a long poll) for pieces;
nothing has come yet — the prompt may still be queued there, so this wait is bounded by
``pending_timeout_s`` (the router's prefill timeout). ``transferring``: pieces arrive
(all layers at once in ``whole`` mode; layer by layer, chunk by chunk, in ``layerwise``
mode, while the prompt is still being computed) and each one is written into the
reserved blocks (``sink.load_kv``) at once; a gap of ``timeout_s`` without any news
fails the transfer. ``done``: the control message came after the last piece; the
caller adds the sequence to its engine. ``failed``: ``cause`` says why; the caller
aborts the sequence here (its reservation is freed) and the router decides what next.
Rows travel in host memory, fp8 rows as their ``uint8`` bytes (``KVPiece``).
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Any, Protocol

from deploy.contract import KVPull, TransferReport
from engine.outputs import KVControl


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


class KVSource(Protocol):
    """Where the pieces come from: ``pull(seq_id, cursor, wait_s)`` long-polls for what is new."""

    async def pull(self, seq_id: str, cursor: int, wait_s: float) -> KVPull: ...


class KVSink(Protocol):
    """Where they go: the decode engine's reserved blocks."""

    async def load_kv(self, seq_id: str, piece: Any) -> None: ...


class ActorSource:
    """A prefill worker actor (by handle): pieces travel as the return values of its ``pull_kv``."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def pull(self, seq_id: str, cursor: int, wait_s: float) -> KVPull:
        return await self.handle.pull_kv.remote(seq_id, cursor, wait_s)


class Transfer:
    """One hand-off: ``await run(sink)`` moves pending → transferring → done | failed, once."""

    POLL_S = 1.0  # one long poll of the source waits at most this long

    def __init__(self, seq_id: str, source: KVSource, timeout_s: float, pending_timeout_s: float):
        self.seq_id = seq_id
        self.source = source
        self.timeout_s = timeout_s
        self.pending_timeout_s = pending_timeout_s
        self.state = TransferState.PENDING
        self.cause: str | None = None
        self.message: str | None = None
        self.nbytes = 0
        self.num_pieces = 0
        self.seconds = 0.0
        self.done_at = 0.0

    async def run(self, sink: KVSink) -> KVControl:
        """The control message, once every piece is loaded; raises ``TransferFailed`` (state ``failed``)."""
        if self.state is not TransferState.PENDING:
            raise RuntimeError(f"{self.seq_id}: transfer already {self.state.value}")
        t0 = last_news = time.monotonic()
        try:
            while True:
                limit = self.pending_timeout_s if self.state is TransferState.PENDING else self.timeout_s
                left = limit - (time.monotonic() - last_news)
                if left <= 0:
                    self._fail("timeout", f"no KV from the prefill worker for {limit:g} s", t0)
                got = await asyncio.wait_for(self.source.pull(self.seq_id, self.num_pieces, min(self.POLL_S, left)),
                                             left + 5.0)
                if not isinstance(got, KVPull):
                    self._fail("invalid", f"the source answered {type(got).__name__}, not KVPull", t0)
                if got.pieces or got.control is not None:
                    last_news = time.monotonic()
                    self.state = TransferState.TRANSFERRING
                for piece in got.pieces:
                    await self._load(sink, piece, t0)
                    self.num_pieces += 1
                    self.nbytes += int(piece.nbytes)
                if got.control is not None:
                    break
        except TransferFailed:
            raise
        except asyncio.TimeoutError:
            self._fail("timeout", "the prefill worker did not answer", t0)
        except asyncio.CancelledError:
            self._fail("cancelled", "the request was aborted during the transfer", t0)
        except ValueError as e:  # the engine refused a piece (shape, reservation)
            self._fail("invalid", str(e), t0)
        except Exception as e:  # the source's own errors: the sequence is unknown there, the actor died
            self._fail("lost", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", t0)
        self.seconds = time.monotonic() - t0
        self.state = TransferState.DONE
        self.done_at = time.time()
        return got.control

    async def _load(self, sink: KVSink, piece: Any, t0: float) -> None:
        """One piece into this worker's engine. Its refusal of the piece is ``invalid`` (raised as
        ValueError); any other failure is this side's own (``sink``: e.g. its engine failed), so that
        the router does not blame the prefill worker for it."""
        try:
            await sink.load_kv(self.seq_id, piece)
        except (ValueError, asyncio.CancelledError):
            raise
        except Exception as e:
            self._fail("sink", f"this worker could not load the rows: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}", t0)

    def _fail(self, cause: str, message: str, t0: float) -> None:
        self.seconds = time.monotonic() - t0
        self.state = TransferState.FAILED
        self.cause, self.message = cause, message
        raise TransferFailed(cause, message)

    def report(self) -> TransferReport:
        return TransferReport(self.state.value, self.cause, self.message, self.nbytes, self.num_pieces, self.seconds,
                              self.done_at)

"""An ``LLMEngine`` driven by a background thread, for an asyncio owner.

The one implementation behind the in-process ``AsyncEngine`` (dev server) and the Ray
workers of a disaggregated deployment. Queues, in order: the owner's event loop puts
*commands* (add, abort, export, stop) on ``_inbox``; the engine thread drains it
before every step (so ``export_kv`` never races a step), runs ``step()`` while there
is work (sleeping on ``_wake`` otherwise) and hands each step's deltas back to the
loop with one ``call_soon_threadsafe``; there each delta lands on its request's
``asyncio.Queue`` (opened with ``open``). An aborted request's queue receives
``ABORTED`` so whoever waits on it wakes up; a failed engine puts an ``EngineError``
on every queue. Only the engine thread touches the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any

from engine.outputs import EngineError, RequestOutput

log = logging.getLogger("pdserve.deploy")

ABORTED = object()  # put on a request's queue when it is aborted
_STOP = ("stop", None, None)


class EngineLoop:
    def __init__(self, engine: Any):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    def ensure_started(self) -> None:
        """Start the engine thread, bound to the running event loop (first call only)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
            self._thread.start()

    # ---- commands (event loop side) -------------------------------------------------
    def is_open(self, request_id: str) -> bool:
        return request_id in self._queues

    def open(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    async def add(self, request_id: str, prompt: list[int], params: Any, kv: Any = None, priority: int = 0) -> None:
        """Queue a request; raises the engine's validation error, if any."""
        await self._call("add", (request_id, prompt, params, kv, priority))

    async def export(self, request_id: str) -> Any:
        """``export_kv`` on the engine thread, between steps; frees the request's blocks."""
        return await self._call("export", request_id)

    def abort(self, request_id: str) -> None:
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(ABORTED)
        self._send(("abort", request_id, None))

    def close(self, request_id: str) -> None:
        """Forget a finished request's queue."""
        self._queues.pop(request_id, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the engine thread (blocking; call it off the event loop)."""
        if self._thread is not None:
            self._send(_STOP)
            self._thread.join(timeout)

    async def _call(self, kind: str, arg: Any) -> Any:
        self.ensure_started()
        if self.error is not None:
            raise EngineError(f"the engine failed: {self.error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send((kind, arg, future))
        return await asyncio.wrap_future(future)

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while self._drain(engine):
                if engine.has_unfinished():
                    outputs = engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # a model failure fails every waiting request with a clean error
            log.exception("engine thread failed")
            self.error = e
            self._loop.call_soon_threadsafe(self.fail_all, EngineError(f"the engine failed: {e}"))

    def _drain(self, engine: Any) -> bool:
        """Apply queued commands; False when asked to stop (everything in flight is aborted)."""
        while True:
            try:
                kind, arg, future = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "stop":
                for rid in list(engine.sequences):
                    engine.abort(rid)
                return False
            if kind == "abort":
                engine.abort(arg)
                continue
            try:
                if kind == "add":
                    rid, prompt, params, kv, priority = arg
                    result = engine.add_request(rid, prompt, params, priority=priority, kv=kv)
                else:
                    result = engine.export_kv(arg)
            except Exception as e:
                future.set_exception(e)
            else:
                future.set_result(result)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def fail_all(self, error: EngineError) -> None:
        for q in self._queues.values():
            q.put_nowait(error)

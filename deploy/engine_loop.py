"""An ``LLMEngine`` driven by a thread, for an asyncio owner (a Ray worker actor).

The same pattern as ``engine.async_engine.AsyncEngine``, plus the two hand-off
commands a disaggregated worker needs (add with ``kv=``; ``export``). Queues, in
order: the owner's event loop puts *commands* (add, abort, export) on ``_inbox``;
the engine thread drains it before every step (so ``export_kv`` never races a
step), runs ``step()`` while there is work (sleeping on ``_wake`` otherwise) and
hands each step's deltas back to the loop with one ``call_soon_threadsafe``; there
each delta lands on its request's ``asyncio.Queue`` (opened with ``open``). An
aborted request's queue receives ``ABORTED`` so whoever waits on it wakes up.
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
            self._thread = threading.Thread(target=self._run, name="pdserve-worker-engine", daemon=True)
            self._thread.start()

    # ---- commands (event loop side) -------------------------------------------------
    def open(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    async def add(self, request_id: str, prompt: list[int], params: Any, kv: Any = None) -> None:
        """Queue a request; raises the engine's validation error, if any."""
        await self._call("add", (request_id, prompt, params, kv))

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
            while True:
                self._drain(engine)
                if engine.has_unfinished():
                    outputs = engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # a model failure fails every waiting request with a clean error
            log.exception("worker engine thread failed")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, EngineError(f"the engine failed: {e}"))

    def _drain(self, engine: Any) -> None:
        while True:
            try:
                kind, arg, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                engine.abort(arg)
                continue
            try:
                if kind == "add":
                    rid, prompt, params, kv = arg
                    result = engine.add_request(rid, prompt, params, kv=kv)
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

    def _fail_all(self, error: EngineError) -> None:
        for q in self._queues.values():
            q.put_nowait(error)

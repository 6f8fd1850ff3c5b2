"""The in-process ``EngineClient``: an ``LLMEngine`` driven by a background thread.

Queues, in order: the event loop puts *commands* (add, abort) on ``_inbox``; the
engine thread drains it before every step, runs ``step()`` while there is work
(sleeping on ``_wake`` otherwise) and hands each step's deltas back to the loop
in one ``call_soon_threadsafe``, where they land on the request's own
``asyncio.Queue``. Only the engine thread touches the engine, so no lock is held
across a model step and the event loop never blocks on one.

A caller that stops iterating ``generate`` (client gone, task cancelled) aborts
its request, which frees its blocks on the next loop turn. ``shutdown`` aborts
what is in flight, ends every stream, and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import AsyncIterator

from engine.args import EngineArgs
from engine.outputs import EngineError, EngineOverloaded, EngineStats, GenerateRequest, RequestOutput

log = logging.getLogger("pdserve.engine")

_STOP = object()


class AsyncEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.engine = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._closing = False

    # ---- EngineClient --------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.args.model_name

    @property
    def model_path(self) -> str:
        return self.args.model

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return self.engine.eos_token_ids

    async def start(self) -> None:
        """Load the model (off the event loop) and start the engine thread."""
        from engine.engine import LLMEngine

        self._loop = asyncio.get_running_loop()
        self.engine = await self._loop.run_in_executor(None, LLMEngine, self.args)
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        if self.engine.scheduler.num_waiting >= self.args.max_waiting_requests:
            raise EngineOverloaded(f"{self.engine.scheduler.num_waiting} requests are already waiting")
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request_id: {rid!r} is already in flight")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = stream
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("add", request, added))
        finished = False
        try:
            await asyncio.wrap_future(added)  # raises the engine's validation error, if any
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._send(("abort", rid, None))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id, None))

    async def health(self) -> bool:
        return self._error is None and not self._closing and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.engine is not None else EngineStats()

    async def shutdown(self) -> None:
        """Abort in-flight requests, end their streams, stop the engine thread."""
        if self._thread is None or self._closing:
            return
        self._closing = True
        self._send(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        self._fail_streams(EngineError("the engine is shutting down"))

    # ---- engine thread ----------------------------------------------------------------
    def _send(self, command) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineError(f"the engine failed: {self._error}")
        if self._closing or self._thread is None:
            raise EngineError("the engine is not running")

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._drain(engine):
                    return
                if engine.has_unfinished():
                    outputs = engine.step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # a model failure ends every stream with a clean error
            log.exception("engine thread failed")
            self._error = e
            self._loop.call_soon_threadsafe(self._fail_streams, EngineError(f"the engine failed: {e}"))

    def _drain(self, engine) -> bool:
        """Apply queued commands; False when asked to stop (everything in flight is aborted)."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if command is _STOP:
                for rid in list(engine.sequences):
                    engine.abort(rid)
                return False
            kind, arg, future = command
            if kind == "add":
                try:
                    engine.add_request(arg.request_id, arg.prompt_token_ids, arg.sampling_params, arg.priority)
                except Exception as e:
                    future.set_exception(e)
                else:
                    future.set_result(None)
            else:
                engine.abort(arg)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_streams(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)

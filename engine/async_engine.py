"""The in-process ``EngineClient``: an ``LLMEngine`` driven by an ``EngineLoop`` thread.

``generate`` opens the request's queue on the loop, queues the add (the engine's
validation error comes back as the exception of that call) and yields the deltas
as the engine thread delivers them. A caller that stops iterating (client gone,
task cancelled) aborts its request, which frees its blocks before the next step.
``shutdown`` aborts what is in flight, ends every stream with an ``EngineError``
and joins the thread. The Ray workers of a disaggregated deployment use the same
``EngineLoop``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from engine.args import EngineArgs
from engine.engine_loop import ABORTED, EngineLoop
from engine.outputs import EngineError, EngineOverloaded, EngineStats, GenerateRequest, RequestOutput


class AsyncEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.engine = None
        self.loop: EngineLoop | None = None
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

        self.engine = await asyncio.get_running_loop().run_in_executor(None, LLMEngine, self.args)
        self.loop = EngineLoop(self.engine)
        self.loop.ensure_started()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        if self.engine.scheduler.num_waiting >= self.args.max_waiting_requests:
            raise EngineOverloaded(f"{self.engine.scheduler.num_waiting} requests are already waiting")
        rid = request.request_id
        if self.loop.is_open(rid):
            raise ValueError(f"request_id: {rid!r} is already in flight")
        stream = self.loop.open(rid)
        finished = False
        try:
            await self.loop.add(rid, request.prompt_token_ids, request.sampling_params, priority=request.priority)
            while True:
                item = await stream.get()
                if item is ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.loop.close(rid)
            if not finished:
                self.loop.abort(rid)

    async def abort(self, request_id: str) -> None:
        if self.loop is not None:
            self.loop.abort(request_id)

    async def health(self) -> bool:
        return not self._closing and self.loop is not None and self.loop.alive

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.engine is not None else EngineStats()

    async def shutdown(self) -> None:
        """Abort in-flight requests, end their streams, stop the engine thread."""
        if self.loop is None or self._closing:
            return
        self._closing = True
        await asyncio.get_running_loop().run_in_executor(None, self.loop.stop)
        self.loop.fail_all(EngineError("the engine is shutting down"))

    def _check_alive(self) -> None:
        if self.loop is not None and self.loop.error is not None:
            raise EngineError(f"the engine failed: {self.loop.error}")
        if self._closing or self.loop is None:
            raise EngineError("the engine is not running")

"""The local ``EngineClient``: an ``LLMEngine`` driven by an ``EngineLoop`` thread, or (``process=True``,
``pdserve serve``'s default) by the same loop in a process of its own (``engine.engine_process``).

``generate`` opens the request's queue on the loop, queues the add (the engine's
validation error comes back as the exception of that call) and yields the deltas
as the engine thread delivers them. A caller that stops iterating (client gone,
task cancelled) aborts its request, which frees its blocks before the next step.
``shutdown`` aborts what is in flight, ends every stream with an ``EngineError``
and joins the thread.

Admission: ``generate`` raises ``EngineOverloaded`` (the API's 429) when the request's
``n`` sequences would bring the sequences in flight — admitted here and not finished,
running or waiting, counted on the event loop so a burst inside one engine step is
seen whole — past ``admission_limit = max_num_seqs + max_waiting_requests`` (by
default ``2 * max_num_seqs``). With FCFS an admitted sequence then waits at most until
the running ones finish, so time to first token stays bounded under any burst. The Ray workers of a disaggregated deployment use the same
``EngineLoop``.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from engine.args import EngineArgs
from engine.engine_loop import ABORTED, EngineLoop
from engine.outputs import Admission, EngineError, EngineStats, GenerateRequest, RequestOutput


class AsyncEngine:
    def __init__(self, args: EngineArgs, process: bool = False):
        self.args = args
        self.process = process  # run the engine in a process of its own (``engine.engine_process``)
        self.engine = None  # the LLMEngine, when it runs in this process
        self.info = None  # engine.engine_process.EngineInfo, once started
        self.loop: EngineLoop | None = None
        self._closing = False
        self.admission = Admission(args.admission_limit)  # sequences admitted by generate(), not finished yet

    # ---- EngineClient --------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.args.model_name

    @property
    def model_path(self) -> str:
        return self.args.model

    @property
    def dtype_choice(self):
        """The compute dtype and why (``engine.dtype_choice``); None before ``start``."""
        return None if self.info is None else self.info.dtype_choice

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return self.info.eos_token_ids

    async def start(self) -> None:
        """Load the model and start the engine: a thread here (loading off the event loop), or a process."""
        from engine.engine_process import EngineInfo, EngineProcess

        if self.process:
            self.loop = EngineProcess(self.args)
            self.info = await self.loop.start()
            return
        from engine.engine import LLMEngine

        self.engine = await asyncio.get_running_loop().run_in_executor(None, LLMEngine, self.args)
        self.info = EngineInfo.of(self.engine)
        self.loop = EngineLoop(self.engine)
        self.loop.ensure_started()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        slot = self.admission.admit(request.sampling_params.n)
        rid = request.request_id
        if self.loop.is_open(rid):
            slot.release()
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
                if finished:
                    slot.release()
                yield item
                if finished:
                    return
        finally:
            slot.release()
            self.loop.close(rid)
            if not finished:
                self.loop.abort(rid)

    async def abort(self, request_id: str) -> None:
        if self.loop is not None:
            self.loop.abort(request_id)

    async def health(self) -> bool:
        return not self._closing and self.loop is not None and self.loop.alive

    def stats(self) -> EngineStats:
        return self.loop.stats() if self.loop is not None else EngineStats()

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

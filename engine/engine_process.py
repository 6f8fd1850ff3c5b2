"""The engine in a process of its own: ``EngineProcess``, the server side of a pipe to it.

Why: in one process the engine thread's Python and the HTTP side's (uvicorn, pydantic, JSON,
the garbage collector) take turns on one GIL, so every decode step waits for request
handling; on a 2-core machine the step inside ``pdserve serve`` ran 1.5-1.7x the same step
in an offline loop. vLLM runs its engine core in its own process for the same reason. Here
the child runs the very ``EngineLoop`` the in-process engine uses, on its main thread, and
only the transport differs:

* server → engine: ``(call_id, command)`` pairs (the ``engine.engine_loop`` commands, pickled);
  a reader thread in the child hands them to the loop's inbox. ``call_id`` is None for a
  fire-and-forget command (abort), else the child answers ``("result", call_id, ok, value)``
  once the command ran between two steps.
* engine → server: ``("step", outputs, stats)`` after every step that changed anything (each
  ``RequestOutput`` without its prompt's token ids: the server has them from ``add`` and puts them
  back, so a step's message does not grow with the prompts: on a 2-core AMD EPYC with AVX512-BF16,
  32 requests of 4096 prompt tokens took ~3-6 ms a step to pickle and unpickle, 32k-token ones as
  long as a bf16 decode step of the bench preset),
  ``("stats", stats)`` before the engine sleeps for want of work, ``("failed", message)``
  when the engine dies of an error. The server reads them on its event loop (``add_reader``
  on the pipe, no thread) and puts each delta on its request's queue, as the thread does.

The child is spawned (not forked: the server may hold threads), ignores SIGINT (the server
stops it: ``Stop`` aborts what is in flight and ends it; a child that does not end within
the timeout is terminated), and ends by itself when the server's end of the pipe closes,
so a killed server leaves no engine behind. A child that dies (a crash, the OOM killer)
closes the pipe: every open stream ends with an ``EngineError`` and health turns false.
Loading errors come back as the ``start`` exception with the child's message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from typing import Any

from engine.engine_loop import Command, EngineLoop, Stop
from engine.outputs import EngineError, EngineStartError, EngineStats
from engine.sampling_params import SamplingParamError

log = logging.getLogger("pdserve.engine")


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What the serving side needs to know of a loaded engine."""

    max_model_len: int
    eos_token_ids: list[int]
    dtype_choice: Any  # engine.dtype_choice.DtypeChoice

    @classmethod
    def of(cls, engine: Any) -> "EngineInfo":
        return cls(engine.max_model_len, list(engine.eos_token_ids), engine.runner.dtype_choice)


class EngineProcess(EngineLoop):
    """``EngineLoop``'s interface (open, add, call, abort, close, stop, alive, stats) over a pipe to
    an engine process; ``start`` spawns it and returns its ``EngineInfo``."""

    def __init__(self, args: Any):
        super().__init__(engine=None)
        self.args = args
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None
        self._write_lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ready: asyncio.Future | None = None
        self._stats = EngineStats()
        self._stopping = False
        self._prompts: dict[str, list[int]] = {}  # request id -> prompt token ids, from add() until it ends
        self._prompt_logprobs: dict[str, list] = {}  # request id -> its prompt logprobs, once they came, until it ends

    async def start(self) -> EngineInfo:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._process = ctx.Process(target=_engine_main, args=(self.args, child, logging.getLogger().level),
                                    name="pdserve-engine")
        self._process.start()
        child.close()
        self._loop.add_reader(self._conn.fileno(), self._readable)
        try:
            return await self._ready
        except BaseException:
            await self._loop.run_in_executor(None, self.stop)
            raise

    @property
    def alive(self) -> bool:
        return self.error is None and self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def ensure_started(self) -> None:
        if self._process is None:
            raise EngineError("the engine process is not started")

    def stats(self) -> EngineStats:
        return self._stats

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the engine process (blocking; call it off the event loop)."""
        if self._process is None:
            return
        self._stopping = True
        if self._process.is_alive():
            try:
                self._write((None, Stop()))
            except OSError:  # it is dying already
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            log.error("the engine process did not stop within %.0f s; terminating it", timeout)
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()

    async def add(self, request_id: str, prompt: list[int], params: Any, priority: int = 0,
                  continuation: Any = None, kv: Any = None) -> None:
        self._prompts[request_id] = prompt
        try:
            await super().add(request_id, prompt, params, priority, continuation, kv)
        except BaseException:
            self._forget(request_id)
            raise

    def abort(self, request_id: str) -> None:
        self._forget(request_id)
        super().abort(request_id)

    def close(self, request_id: str) -> None:
        self._forget(request_id)
        super().close(request_id)

    def _forget(self, request_id: str) -> None:
        """What this side keeps of a request's prompt for its deltas, once it ended."""
        self._prompts.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)

    def _send(self, command: Command, future: concurrent.futures.Future | None = None) -> None:
        call_id = None
        if future is not None:
            call_id = next(self._ids)
            self._pending[call_id] = future
        try:
            self._write((call_id, command))
        except OSError as e:
            self._pending.pop(call_id, None)
            if future is not None:
                future.set_exception(EngineError(f"the engine process is gone: {e}"))

    def _write(self, message: Any) -> None:
        with self._write_lock:
            self._conn.send(message)

    # ---- event loop side: what the engine sends -----------------------------------------
    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._receive(self._conn.recv())
        except (EOFError, OSError):
            self._closed()

    def _receive(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            self._stats = message[2]
            outputs = message[1]
            for out in outputs:  # the prompt's ids back (an aborted request's late output: dropped anyway)
                out.prompt_token_ids = self._prompts.get(out.request_id, [])
                if out.prompt_logprobs is not None:  # they cross once (_PipedLoop._publish)
                    self._prompt_logprobs[out.request_id] = out.prompt_logprobs
                else:
                    out.prompt_logprobs = self._prompt_logprobs.get(out.request_id)
                if out.finished:
                    self._forget(out.request_id)
            self._deliver(outputs)
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "result":
            _, call_id, ok, value = message
            future = self._pending.pop(call_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(value) if ok else future.set_exception(_decode_error(*value))
        elif kind == "ready":
            if not self._ready.done():
                self._ready.set_result(message[1])
        elif kind == "failed":
            self._fail(message[1])
        else:
            raise AssertionError(f"unknown message from the engine process: {kind!r}")

    def _closed(self) -> None:
        self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._process.join(1)  # the child closed its end: it is exiting
        if not self._stopping:
            self._fail(f"the engine process exited (exit code {self._process.exitcode})")

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = EngineError(message)
        if not self._ready.done():
            self._ready.set_exception(EngineStartError(message))
        for future in self._pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineError(f"the engine failed: {message}"))
        self._pending.clear()
        self.fail_all(EngineError(f"the engine failed: {message}"))


# ---- the engine process ---------------------------------------------------------------------
class _PipedLoop(EngineLoop):
    """The engine loop of the child: steps on the main thread, results into the pipe."""

    def __init__(self, engine: Any, conn: Any):
        super().__init__(engine)
        self.conn = conn
        self._sent_stats: EngineStats | None = None
        self._sent_prompt_logprobs: set[str] = set()  # requests whose prompt logprobs crossed, while they run

    def _publish(self, outputs: list) -> None:
        stats = self.engine.stats()
        sent = self._sent_prompt_logprobs
        for out in outputs:  # the server holds them (EngineProcess); these objects are not used again here
            out.prompt_token_ids = None
            if out.prompt_logprobs is not None:  # a prompt's logprobs cross with its first delta that has them
                if out.request_id in sent:
                    out.prompt_logprobs = None
                else:
                    sent.add(out.request_id)
        if sent:  # forget the ended (finished, aborted: engine.sequences holds the running ones)
            sent.intersection_update(self.engine.sequences)
        if outputs or stats != self._sent_stats:
            self.conn.send(("step", outputs, stats))
            self._sent_stats = stats

    def _idle(self) -> None:
        stats = self.engine.stats()
        if stats != self._sent_stats:
            self.conn.send(("stats", stats))
            self._sent_stats = stats

    def _failed(self, error: BaseException) -> None:
        self.conn.send(("failed", f"{type(error).__name__}: {error}"))

    def reply(self, call_id: int, future: concurrent.futures.Future) -> None:
        error = future.exception()
        ok, value = (True, future.result()) if error is None else (False, _encode_error(error))
        self.conn.send(("result", call_id, ok, value))

    def read_commands(self) -> None:
        """The reader thread: the server's commands into the inbox; a closed pipe stops the engine."""
        while True:
            try:
                call_id, command = self.conn.recv()
            except (EOFError, OSError):
                self._send(Stop())
                return
            future = None
            if call_id is not None:
                future = concurrent.futures.Future()
                future.add_done_callback(lambda f, call_id=call_id: self.reply(call_id, f))
            self._send(command, future)
            if isinstance(command, Stop):
                return


# Errors cross the pipe as (kind, param, text) and come back as the class the API maps onto a status
# (``serving.errors``): a SamplingParamError with its parameter, a ValueError, a KeyError, an
# EngineError; anything else is a RuntimeError naming the original type.
def _encode_error(error: BaseException) -> tuple[str, str | None, str]:
    if isinstance(error, SamplingParamError):
        return "sampling", error.param, error.message
    for kind, cls in (("engine", EngineError), ("value", ValueError), ("key", KeyError)):
        if isinstance(error, cls):
            return kind, None, str(error.args[0]) if error.args else str(error)
    return "other", None, f"{type(error).__name__}: {error}"


def _decode_error(kind: str, param: str | None, text: str) -> BaseException:
    if kind == "sampling":
        return SamplingParamError(param, text)
    return {"engine": EngineError, "value": ValueError, "key": KeyError}.get(kind, RuntimeError)(text)


def _engine_main(args: Any, conn: Any, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us, in order
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from engine.engine import LLMEngine

        engine = LLMEngine(args)
    except BaseException as e:  # the server reports it as the start error
        log.debug("engine failed to load", exc_info=True)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    loop = _PipedLoop(engine, conn)
    conn.send(("ready", EngineInfo.of(engine)))
    reader = threading.Thread(target=loop.read_commands, name="pdserve-engine-commands", daemon=True)
    reader.start()
    log.info("engine process %d ready", os.getpid())
    loop.run()

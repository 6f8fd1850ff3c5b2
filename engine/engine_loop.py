"""An ``LLMEngine`` driven by a background thread, for an asyncio owner.

The one implementation behind the in-process ``AsyncEngine`` (dev server) and the Ray
workers of a disaggregated deployment. Queues, in order: the owner's event loop puts
*commands* on ``_inbox`` — typed ones (``AddRequest``, ``Abort``, ``ReserveKV``,
``LoadKV``, ``Expire``, ``Stop``; each knows how to apply itself to the engine, so a
new one is one small class) — and the engine thread drains it before every step (so
a command never races a step), runs ``step()`` while there is work (sleeping on
``_wake`` otherwise; an executor with ``needs_ticks`` — a multi-rank leader — is stepped
every ``tick_s`` even when idle, for lock-step and pings) and hands each step's deltas back to the
loop with one ``call_soon_threadsafe``; there each delta lands on its request's
``asyncio.Queue`` (opened with ``open``). An aborted request's queue receives
``ABORTED`` so whoever waits on it wakes up; a failed engine puts an ``EngineError``
on every queue. Only the engine thread touches the engine. ``engine.engine_process`` runs
the same loop on the main thread of a process of its own (``pdserve serve``'s default); there
only the transport differs (``_publish``, ``_idle``, ``_failed``; commands from a pipe).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from typing import Any, Callable

from engine.outputs import EngineError, EngineStats, RequestOutput

log = logging.getLogger("pdserve.deploy")

ABORTED = object()  # put on a request's queue when it is aborted


class Command(abc.ABC):
    """Something the engine thread does between steps; ``apply`` returns the caller's result."""

    @abc.abstractmethod
    def apply(self, engine: Any) -> Any: ...


@dataclasses.dataclass
class AddRequest(Command):
    request_id: str
    prompt: list[int]
    params: Any
    priority: int = 0
    continuation: Any = None
    kv: Any = None  # a KVControl (decode role, rows already loaded) or a whole KVPayload

    def apply(self, engine: Any) -> None:
        engine.add_request(self.request_id, self.prompt, self.params, priority=self.priority,
                           continuation=self.continuation, kv=self.kv)


@dataclasses.dataclass
class Abort(Command):
    request_id: str

    def apply(self, engine: Any) -> None:
        engine.abort(self.request_id)


@dataclasses.dataclass
class ReserveKV(Command):
    request_id: str
    num_kv_tokens: int
    num_total_tokens: int

    def apply(self, engine: Any) -> list[int] | None:
        return engine.reserve_kv(self.request_id, self.num_kv_tokens, self.num_total_tokens)


@dataclasses.dataclass
class LoadKV(Command):
    request_id: str
    piece: Any  # engine.kv_connector.KVPiece

    def apply(self, engine: Any) -> None:
        engine.load_kv(self.request_id, self.piece)


@dataclasses.dataclass
class Expire(Command):
    """Give back KV reservations nobody used in time (but those in ``keep``: transfers are filling them)
    and drop outbox rows nobody took in time (``KVConnector.expire``, ``KVOutbox.expire``)."""

    keep: frozenset[str] = frozenset()

    def apply(self, engine: Any) -> None:
        engine.connector.expire(self.keep)
        engine.connector.outbox.expire()


@dataclasses.dataclass
class ReadExpertCounts(Command):
    """The replica's cumulative expert-load counts (``ExpertCounts``, None without MoE layers)."""

    def apply(self, engine: Any) -> Any:
        return engine.executor.expert_counts()


@dataclasses.dataclass
class StageExperts(Command):
    """Start reading a new placement's expert weights on every rank (``engine.rebalance``)."""

    version: int
    phy2log: list[list[int]]

    def apply(self, engine: Any) -> None:
        engine.executor.stage_experts(self.version, self.phy2log)


@dataclasses.dataclass
class RolloutStatus(Command):
    def apply(self, engine: Any) -> Any:
        return engine.executor.rollout_state()


@dataclasses.dataclass
class SwitchExperts(Command):
    """Switch the staged placement in, one MoE layer per step from the next step on."""

    version: int

    def apply(self, engine: Any) -> None:
        engine.executor.switch_experts(self.version)


@dataclasses.dataclass
class AbortRollout(Command):
    def apply(self, engine: Any) -> None:
        engine.executor.abort_rollout()


@dataclasses.dataclass
class Stop(Command):
    """Abort everything in flight and end the thread."""

    def apply(self, engine: Any) -> None:
        for rid in list(engine.sequences):
            engine.abort(rid)


class EngineLoop:
    def __init__(self, engine: Any):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.on_news: Callable[[], None] = lambda: None  # called on the event loop after anything lands on a queue

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    def ensure_started(self) -> None:
        """Start the engine thread, bound to the running event loop (first call only)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self.run, name="pdserve-engine", daemon=True)
            self._thread.start()

    # ---- commands (event loop side) -------------------------------------------------
    def is_open(self, request_id: str) -> bool:
        return request_id in self._queues

    def open(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    async def add(self, request_id: str, prompt: list[int], params: Any, priority: int = 0,
                  continuation: Any = None, kv: Any = None) -> None:
        """Queue a request; raises the engine's validation error, if any."""
        await self.call(AddRequest(request_id, prompt, params, priority, continuation, kv))

    async def call(self, command: Command) -> Any:
        """Run ``command`` on the engine thread between steps; its result (or its exception)."""
        self.ensure_started()
        if self.error is not None:
            raise EngineError(f"the engine failed: {self.error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(command, future)
        return await asyncio.wrap_future(future)

    def post(self, command: Command) -> concurrent.futures.Future:
        """Queue ``command`` without waiting for it: for callers that must answer while a long step runs
        (a health probe). Its result or exception lands on the returned future."""
        self.ensure_started()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(command, future)
        return future

    def abort(self, request_id: str) -> None:
        q = self._queues.pop(request_id, None)
        if q is not None:
            q.put_nowait(ABORTED)
            self.on_news()
        self._send(Abort(request_id))

    def close(self, request_id: str) -> None:
        """Forget a finished request's queue."""
        self._queues.pop(request_id, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the engine thread (blocking; call it off the event loop)."""
        if self._thread is not None:
            self._send(Stop())
            self._thread.join(timeout)

    def _send(self, command: Command, future: concurrent.futures.Future | None = None) -> None:
        self._inbox.put((command, future))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---- engine thread -----------------------------------------------------------------
    def run(self) -> None:
        """The engine thread's body: apply commands, step while there is work, until ``Stop``."""
        engine = self.engine
        try:
            executor = engine.executor
            while self._drain(engine):
                if engine.has_unfinished() or executor.needs_ticks:
                    self._publish(engine.step())
                    if not engine.has_unfinished() and not executor.busy_elsewhere:  # ticking while idle
                        self._wake.wait(executor.tick_s)
                        self._wake.clear()
                else:
                    self._idle()
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # a model failure fails every waiting request with a clean error
            log.exception("engine thread failed")
            self.error = e
            self._failed(e)

    # Where a step's results go: to the owner's event loop here; over a pipe in the engine process
    # (``engine.engine_process``).
    def _publish(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _idle(self) -> None:
        """Called before the thread sleeps for want of work."""

    def _failed(self, error: BaseException) -> None:
        self._loop.call_soon_threadsafe(self.fail_all, EngineError(f"the engine failed: {error}"))

    def _drain(self, engine: Any) -> bool:
        """Apply queued commands; False when asked to stop (everything in flight is aborted)."""
        while True:
            try:
                command, future = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if future is not None and not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it ran (e.g. an aborted transfer's LoadKV): skip it
            try:
                result = command.apply(engine)
            except Exception as e:
                if future is None:
                    raise  # a fire-and-forget command (abort) failing is an engine failure
                future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)
            if isinstance(command, Stop):
                return False

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        self.on_news()

    def fail_all(self, error: EngineError) -> None:
        for q in self._queues.values():
            q.put_nowait(error)
        self.on_news()

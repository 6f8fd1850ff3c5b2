"""The router's view of the worker actors: a registry, their health, and calls that can fail.

``WorkerRegistry`` holds one ``Worker`` per named actor of each pool. A background
health loop probes every worker's ``load()`` each ``health_interval_s``: a failure or
timeout takes it out of rotation, an answer puts it back (re-resolving the named
actor, so a re-created worker is found) with its fresh ``WorkerLoad``. A worker that
answers with a new ``started_at`` is a new incarnation (it restarted): the registry's
``on_restart`` hook lets the policy forget what it knew (prefix affinity).

``call(worker, ref, timeout)`` awaits one actor call and turns every way a worker can
fail — dead, restarting, unknown, silent past the timeout — into ``WorkerLost``; an
error the engine raised about the request itself (``ValueError``: a bad request) is
re-raised as is, so the client gets a 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any, Awaitable, Callable

from deploy.contract import NAMESPACE, ROLES, LeaseExpired, WorkerInfo, WorkerLoad

log = logging.getLogger("pdserve.router")


@dataclasses.dataclass
class Worker:
    name: str
    role: str
    handle: Any = None
    healthy: bool = False
    load: WorkerLoad = None  # type: ignore[assignment]
    info: WorkerInfo | None = None
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.load = self.load or WorkerLoad(self.name, self.role)

    @property
    def incarnation(self) -> tuple[str, float]:
        """(name, started_at): equal only for the same life of the same actor."""
        return self.name, self.load.started_at


class WorkerLost(Exception):
    """A worker died, restarted or stopped answering during a call; or (``lease_expired``) it is fine
    but freed the sequence, which its router had not polled for its lease."""

    def __init__(self, worker: Worker, cause: str, lease_expired: bool = False):
        super().__init__(f"{worker.name}: {cause}")
        self.worker = worker
        self.lease_expired = lease_expired


def worker_error(w: Worker, cause: BaseException) -> BaseException:
    """What an error a worker answered means here: a ``ValueError`` is the request's own (a 400 for the
    client); ``LeaseExpired`` a sequence the worker freed (it is fine); anything else a lost worker."""
    if isinstance(cause, ValueError):
        return cause
    if isinstance(cause, LeaseExpired):
        return WorkerLost(w, str(cause), lease_expired=True)
    return WorkerLost(w, f"{type(cause).__name__}: {cause}")


class WorkerRegistry:
    def __init__(self, pools: dict[str, list[str]], namespace: str = NAMESPACE, health_interval_s: float = 1.0,
                 health_timeout_s: float = 3.0):
        self.workers = {role: [Worker(n, role) for n in pools.get(role, [])] for role in ROLES}
        self.namespace = namespace
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.on_restart: Callable[[Worker], None] = lambda w: None
        self.on_load: Callable[[Worker, WorkerLoad], None] = lambda w, load: None  # every answered probe
        self._task: asyncio.Task | None = None

    def all(self) -> list[Worker]:
        return [w for ws in self.workers.values() for w in ws]

    def get(self, name: str) -> Worker:
        return next(w for w in self.all() if w.name == name)

    def healthy(self, role: str, exclude: set[tuple[str, float]] = frozenset()) -> list[Worker]:
        """Workers of ``role`` in rotation, but for the incarnations in ``exclude``."""
        return [w for w in self.workers[role] if w.healthy and w.handle is not None and w.incarnation not in exclude]

    def pool_health(self) -> dict[str, tuple[int, int]]:
        return {role: (len(ws), sum(w.healthy for w in ws)) for role, ws in self.workers.items()}

    async def pool_info(self, role: str) -> list[WorkerInfo]:
        """``info()`` of every healthy worker of a pool (each is asked once per incarnation)."""
        for w in self.healthy(role):
            if w.info is None:
                try:
                    w.info = await self.call(w, w.handle.info.remote(), self.health_timeout_s)
                except WorkerLost as e:
                    self.mark_down(w, str(e))
        return [w.info for w in self.healthy(role) if w.info is not None]

    # ---- health ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._health_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def refresh(self) -> None:
        """Probe every worker once: in rotation if it answers, out otherwise."""
        await asyncio.gather(*(self._probe(w) for w in self.all()))

    async def wait_for(self, role: str, exclude: set[tuple[str, float]], timeout_s: float) -> list[Worker]:
        """Workers of ``role`` in rotation (but ``exclude``), waiting up to ``timeout_s`` for one to
        come (back): a worker Ray is re-creating rejoins within seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            found = self.healthy(role, exclude)
            if found or loop.time() >= deadline:
                return found
            await asyncio.sleep(min(self.health_interval_s / 2, max(deadline - loop.time(), 0.0)))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("health round failed")

    async def _probe(self, w: Worker) -> None:
        import ray

        try:
            if w.handle is None:
                loop = asyncio.get_running_loop()
                w.handle = await loop.run_in_executor(
                    None, functools.partial(ray.get_actor, w.name, namespace=self.namespace))
            load: WorkerLoad = await asyncio.wait_for(w.handle.load.remote(), self.health_timeout_s)
        except Exception as e:  # dead, restarting, unknown name, timeout: all mean "not now"
            self.mark_down(w, f"{type(e).__name__}: {e}".splitlines()[0][:200])
            return
        if not load.alive:
            self.mark_down(w, "its engine thread failed")
            return
        if w.load.started_at and load.started_at != w.load.started_at:
            w.info = None
            self.on_restart(w)  # a new incarnation: e.g. its prefix cache is empty
        if not w.healthy:
            log.info("%s is back in rotation", w.name)
        w.load, w.healthy, w.last_error = load, True, None
        try:
            self.on_load(w, load)
        except Exception:  # statistics must never take a worker out of rotation
            log.exception("load report of %s not taken", w.name)

    def mark_down(self, w: Worker, why: str) -> None:
        if w.healthy:
            log.warning("%s out of rotation: %s", w.name, why)
        w.healthy, w.handle, w.last_error = False, None, why

    # ---- calls ---------------------------------------------------------------------------
    async def call(self, w: Worker, ref: Awaitable[Any], timeout: float) -> Any:
        """Await one actor call; lost worker / timeout → ``WorkerLost``; the request's own errors re-raised."""
        import ray.exceptions as rex

        try:
            return await asyncio.wait_for(ref, timeout)
        except asyncio.TimeoutError:
            raise WorkerLost(w, f"no answer within {timeout:g} s") from None
        except rex.RayTaskError as e:
            raise worker_error(w, e.cause if e.cause is not None else e) from None
        except rex.RayError as e:  # actor died / unavailable, object lost
            raise WorkerLost(w, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def abort_on(self, w: Worker | None, seq_id: str) -> None:
        """Fire-and-forget ``abort`` (a worker that is gone holds nothing any more)."""
        if w is None or w.handle is None:
            return
        try:
            w.handle.abort.remote(seq_id)
        except Exception:
            log.debug("abort of %s on %s not delivered", seq_id, w.name)

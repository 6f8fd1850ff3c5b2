"""One long poll per decode worker for all of the router's sequences on it (``DecodeFeeds``).

A decoding sequence ``subscribe``s to its decode worker's feed and reads its deltas from a
queue. The feed keeps every subscribed sequence covered by exactly one ``poll(seq_ids, wait_s)``
in flight: a call returns as soon as one of its sequences has news (``deploy.worker``), its
sequences are polled again at once, together with any that subscribed meanwhile, so at a steady
batch a worker answers one call per engine step however many sequences it runs. (A poll per
sequence costs the worker's event loop, its Ray threads and the router one actor call each per
step: with the engine loop on the same interpreter that took the GIL away from the steps.)

A sequence that subscribes while a call is in flight gets a call of its own at once, so it never
waits out another call's ``wait_s``; once calls come back together they merge again.

What a call answers per sequence goes on that sequence's queue: a ``RequestOutput``, or an error
(``KeyError``/``LeaseExpired``: the worker does not hold it). A call that fails — the worker died,
or it did not answer within ``wait_s + stall_timeout_s`` — puts the ``WorkerLost`` on the queue of
every sequence subscribed to that feed and the feed ends; each sequence resumes elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engine.outputs import EngineError, RequestOutput
from router.workers import Worker, WorkerLost, WorkerRegistry, worker_error

log = logging.getLogger("pdserve.router")


class FeedClosed(EngineError):
    """The router is shutting down."""


class Subscription:
    """One sequence's deltas from its decode worker's feed."""

    def __init__(self, worker: Worker, queue: asyncio.Queue):
        self.worker, self.queue = worker, queue

    async def next(self) -> RequestOutput:
        """The next delta; ``WorkerLost`` when the worker is lost or no longer holds the sequence."""
        item = await self.queue.get()
        if isinstance(item, RequestOutput):
            return item
        if isinstance(item, (WorkerLost, FeedClosed)):  # the feed's own
            raise item
        raise worker_error(self.worker, item)  # what the worker answered for this sequence


class _Feed:
    """The polls of one decode worker (one actor handle: a new incarnation gets a new feed)."""

    def __init__(self, registry: WorkerRegistry, worker: Worker, handle: Any, wait_s: float, timeout_s: float):
        self.registry, self.worker, self.handle = registry, worker, handle
        self.wait_s, self.timeout_s = wait_s, timeout_s
        self.queues: dict[str, asyncio.Queue] = {}
        self.task: asyncio.Task | None = None
        self._joined = asyncio.Event()  # a sequence subscribed that no call in flight covers

    def subscribe(self, seq_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.queues[seq_id] = q
        self._joined.set()
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        return q

    async def _run(self) -> None:
        calls: dict[asyncio.Task, list[str]] = {}
        try:
            while self.queues:
                covered = {s for ids in calls.values() for s in ids}
                uncovered = [s for s in self.queues if s not in covered]
                if uncovered:
                    calls[asyncio.ensure_future(self._call(uncovered))] = uncovered
                self._joined.clear()
                joined = asyncio.ensure_future(self._joined.wait())
                try:
                    await asyncio.wait([*calls, joined], return_when=asyncio.FIRST_COMPLETED)
                    await asyncio.sleep(0)  # answers of one engine step arrive together: take them as one
                finally:
                    joined.cancel()
                for call in [c for c in calls if c.done()]:
                    del calls[call]
                    self._deliver(call.result())
        except WorkerLost as e:
            self._fail(e)
        except Exception as e:  # never leave a sequence waiting on a feed that stopped
            log.exception("decode feed of %s failed", self.worker.name)
            self._fail(WorkerLost(self.worker, f"{type(e).__name__}: {e}"))
        finally:
            for call in calls:
                call.cancel()

    async def _call(self, seq_ids: list[str]) -> dict[str, Any]:
        return await self.registry.call(self.worker, self.handle.poll.remote(seq_ids, self.wait_s), self.timeout_s)

    def _deliver(self, news: dict[str, Any]) -> None:
        for seq_id, item in news.items():
            q = self.queues.get(seq_id)
            if q is not None:
                q.put_nowait(item)

    def _fail(self, error: Exception) -> None:
        queues, self.queues = self.queues, {}
        for q in queues.values():
            q.put_nowait(error)


class DecodeFeeds:
    """The router's feeds, one per decode actor handle in use."""

    def __init__(self, registry: WorkerRegistry, wait_s: float, stall_timeout_s: float):
        self.registry = registry
        self.wait_s = wait_s
        self.timeout_s = wait_s + stall_timeout_s
        self._feeds: dict[int, _Feed] = {}

    def subscribe(self, worker: Worker, handle: Any, seq_id: str) -> Subscription:
        """``seq_id``'s deltas from ``handle`` (``worker``'s actor); ``unsubscribe`` when done with them."""
        feed = self._feeds.get(id(handle))
        if feed is None or feed.handle is not handle:
            feed = self._feeds[id(handle)] = _Feed(self.registry, worker, handle, self.wait_s, self.timeout_s)
        return Subscription(worker, feed.subscribe(seq_id))

    def unsubscribe(self, handle: Any, seq_id: str) -> None:
        feed = self._feeds.get(id(handle))
        if feed is None or feed.handle is not handle:
            return
        feed.queues.pop(seq_id, None)
        if not feed.queues:  # its loop ends after the call in flight; a later subscribe starts a new one
            del self._feeds[id(handle)]

    async def close(self) -> None:
        """Stop every feed; a sequence still subscribed reads an ``EngineError``."""
        feeds, self._feeds = list(self._feeds.values()), {}
        tasks = [f.task for f in feeds if f.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for f in feeds:
            f._fail(FeedClosed("the router is shutting down"))

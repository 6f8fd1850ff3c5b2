"""The decode side's batched long poll: ``EngineWorker.poll(seq_ids, wait_s)`` and the router's
``DecodeFeeds`` over it (one call in flight per worker for all of its sequences).

The worker is a real ``EngineWorker`` (decode role, tiny checkpoint) whose deltas arrive through
its real ``EngineLoop`` delivery path; the router side reaches it through an in-process stand-in
for a Ray actor handle that counts the calls."""

from __future__ import annotations

import asyncio
import time

import pytest

from deploy.contract import LeaseExpired
from deploy.worker import EngineWorker, _Decoding
from engine.outputs import CompletionOutput, RequestOutput
from router.decode_feed import DecodeFeeds
from router.workers import Worker, WorkerLost, WorkerRegistry


def _delta(seq_id: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(seq_id, [1, 2], [CompletionOutput(0, token_ids=list(tokens),
                                                          finish_reason="length" if finished else None)], finished)


@pytest.fixture
def worker(tiny_checkpoint):
    w = EngineWorker("decode-0", dict(model=tiny_checkpoint, role="decode", dtype="float32",
                                      kv_cache_memory_gb=0.01), lease_s=60.0)
    yield w
    w.loop.stop()


def _decoding(w: EngineWorker, *seq_ids: str) -> None:
    for s in seq_ids:
        w.decoding[s] = _Decoding(w.loop.open(s))


class _Handle:
    """A Ray actor handle's ``poll.remote`` for an in-process worker; counts the calls and their ids.
    ``silent``: calls never answer (a hung worker)."""

    def __init__(self, worker: EngineWorker):
        self.worker, self.calls, self.silent = worker, [], False
        self.poll = self

    def remote(self, seq_ids: list[str], wait_s: float):
        self.calls.append(list(seq_ids))
        if self.silent:
            return asyncio.get_running_loop().create_future()
        return asyncio.ensure_future(self.worker.poll(seq_ids, wait_s))


def test_poll_answers_the_sequences_with_news_and_errors_per_sequence(worker):
    async def main():
        _decoding(worker, "a", "b", "c")
        worker._lapsed["gone"] = None
        t0 = time.monotonic()
        assert await worker.poll(["a", "b"], 0.2) == {}  # nothing within wait_s
        assert time.monotonic() - t0 >= 0.19

        async def deliver_later():
            await asyncio.sleep(0.05)
            worker.loop._deliver([_delta("a", [5]), _delta("a", [6]), _delta("c", [7], finished=True)])

        t0 = time.monotonic()
        errors = await worker.poll(["b", "gone", "unknown"], 5.0)  # errors are news: answered at once
        assert time.monotonic() - t0 < 1.0
        assert type(errors["gone"]) is LeaseExpired and type(errors["unknown"]) is KeyError and "b" not in errors
        t0 = time.monotonic()
        task = asyncio.ensure_future(deliver_later())
        news = await worker.poll(["a", "b", "c"], 5.0)
        await task
        assert time.monotonic() - t0 < 2.0  # woken by the delivery, not by the deadline
        assert news["a"].outputs[0].token_ids == [5, 6]  # merged
        assert news["c"].finished and "c" not in worker.decoding  # a finished sequence is released
        assert "b" not in news  # no news: not in the answer, still decoding
        worker.abort("b")
        assert isinstance((await worker.poll(["b"], 1.0))["b"], KeyError)

    asyncio.run(main())


def _feeds(worker: EngineWorker, wait_s: float = 0.3, stall_s: float = 0.5):
    registry = WorkerRegistry({"decode": ["decode-0"]})
    w = registry.get("decode-0")
    handle = _Handle(worker)
    w.handle, w.healthy = handle, True
    return DecodeFeeds(registry, wait_s, stall_s), w, handle


def test_one_call_per_step_for_every_sequence_of_a_worker(worker):
    async def main():
        feeds, w, handle = _feeds(worker)
        seqs = [f"s{i}" for i in range(6)]
        _decoding(worker, *seqs)
        subs = {s: feeds.subscribe(w, handle, s) for s in seqs}
        await asyncio.sleep(0.01)
        for step in range(5):
            worker.loop._deliver([_delta(s, [step]) for s in seqs])
            for s in seqs:
                assert (await asyncio.wait_for(subs[s].next(), 2)).outputs[0].token_ids == [step]
        assert len(handle.calls) <= 5 + 1  # one call per step (and the one now in flight) ...
        assert all(sorted(c) == seqs for c in handle.calls)  # ... for all six
        for s in seqs:
            feeds.unsubscribe(handle, s)
        await feeds.close()

    asyncio.run(main())


def test_a_sequence_joining_mid_call_is_polled_at_once(worker):
    async def main():
        feeds, w, handle = _feeds(worker, wait_s=5.0)
        _decoding(worker, "old", "new")
        feeds.subscribe(w, handle, "old")
        await asyncio.sleep(0.05)  # "old"'s call now waits up to 5 s
        sub = feeds.subscribe(w, handle, "new")
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        worker.loop._deliver([_delta("new", [9])])
        assert (await asyncio.wait_for(sub.next(), 2)).outputs[0].token_ids == [9]
        assert time.monotonic() - t0 < 1.0
        assert ["new"] in handle.calls
        await feeds.close()

    asyncio.run(main())


def test_a_silent_worker_loses_every_sequence_and_an_unknown_one_only_itself(worker):
    async def main():
        feeds, w, handle = _feeds(worker, wait_s=0.2, stall_s=0.3)
        _decoding(worker, "a")
        a, ghost = feeds.subscribe(w, handle, "a"), feeds.subscribe(w, handle, "ghost")
        with pytest.raises(WorkerLost, match="KeyError"):
            await asyncio.wait_for(ghost.next(), 2)
        feeds.unsubscribe(handle, "ghost")
        worker.loop._deliver([_delta("a", [1])])
        assert (await asyncio.wait_for(a.next(), 2)).outputs[0].token_ids == [1]  # "a" carries on
        handle.silent = True
        b = feeds.subscribe(w, handle, "b")
        t0 = time.monotonic()
        for sub in (a, b):
            with pytest.raises(WorkerLost, match="no answer within 0.5 s"):
                await asyncio.wait_for(sub.next(), 3)
        assert time.monotonic() - t0 < 2.0
        await feeds.close()

    asyncio.run(main())

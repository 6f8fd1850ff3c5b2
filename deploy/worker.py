"""Ray worker actors: one engine rank in role ``prefill`` or ``decode``.

``PrefillWorker`` / ``DecodeWorker`` are ``EngineWorker`` as Ray actor classes
(named ``prefill-<i>`` / ``decode-<i>`` in namespace ``pdserve`` by ``deploy.pool``).
Each owns an ``LLMEngine`` stepped by an ``EngineLoop`` thread; its methods run on
the actor's asyncio loop, so many requests are in flight at once. The methods and
their message types are ``deploy.contract.WorkerAPI``.

Prefill side, per sequence: ``prefill(seq_id, prompt, params, continuation)`` queues
it and waits until the prompt is done. Meanwhile its latent rows collect in the
engine's KV outbox (all at the end, or layer by layer as computed: ``kv_transfer``)
and the decode worker pulls them with ``pull_kv`` (long polling) — the control
message comes last. When the first token already ends the sequence (``max_tokens``
1, EOS, a stop string) the result carries the output and nothing is handed off.

Decode side, per sequence, in order: ``reserve(seq_id, num_kv_tokens, total)``
(blocks for the rows, room for the rest, before the prefill starts) →
``start_decode(seq_id, source)`` (a
``deploy.kv_transfer.Transfer`` pulling from the prefill worker named ``source``,
writing each piece into the reserved blocks; on done the sequence joins the engine)
→ ``poll([seq_id, ...], wait_s)`` until an output with ``finished`` (long polling, one call
for all of a router's sequences here: the deltas merged since the last poll of each one
with news, or nothing after ``wait_s``). ``abort(seq_id)`` ends a
sequence in any of these stages on either role and frees its blocks and reservation.

**The lease.** A router that dies (or loses a request without aborting it) must not leave
blocks behind, so every worker frees, ``lease_s`` after the router last touched it: a
reservation no ``start_decode`` took; a decoding sequence nobody polled (finished or
not); outbox rows nobody pulled (prefill side; a sequence still computing with nothing
out yet is left alone). A transfer in progress holds its reservation; it is bounded by
its own timeouts. A sweep every ``lease_s / 4`` (at most 1 s) applies the lease, so
whatever it frees is gone within ``lease_s`` plus that; a later ``poll`` of a sequence
freed this way answers ``LeaseExpired`` for it (the worker is fine). The router touches its
sequences far more often (a poll every ``poll_wait_s``), so the lease is a few times its
``poll_wait_s + stall_timeout_s`` (``deploy.pool.default_lease_s``).

``set_faults(FaultInjection)`` arms deliberate faults for tests and chaos drills
(none by default): e.g. ``pull_kv`` holding back a sequence's rows for a while.

After an actor restart the new incarnation knows none of the old sequences:
``start_decode`` returns a failed report (``no_reservation``), ``pull_kv`` raises and
``poll`` answers ``KeyError``, which the router treats as a lost worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from deploy.contract import (NAMESPACE, FaultInjection, KVPull, LeaseExpired, PrefillResult, RankInfo, TransferReport,
                             WorkerInfo, WorkerLoad, instance_of)
from deploy.kv_transfer import ActorSource, Transfer, TransferFailed
from engine.engine_loop import (ABORTED, AbortRollout, EngineLoop, Expire, LoadKV, ReadExpertCounts, ReserveKV,
                                RolloutStatus, StageExperts, SwitchExperts)
from engine.expert_load import RolloutState
from engine.outputs import EngineError, RequestOutput
from engine.sampling_params import Continuation, SamplingParams

log = logging.getLogger("pdserve.deploy")


@dataclasses.dataclass
class _Decoding:
    """A decode-side sequence: its queue and the deltas not yet polled."""

    queue: asyncio.Queue
    pending: RequestOutput | None = None
    finished: bool = False
    touched: float = dataclasses.field(default_factory=time.monotonic)  # the router's last poll (the lease)


class EngineWorker:
    def __init__(self, name: str, engine_args: dict[str, Any], cpu_affinity: list[int] | None = None,
                 transfer_timeout_s: float = 30.0, prefill_timeout_s: float = 120.0,
                 lease_s: float = 120.0, parallel: dict[str, Any] | None = None):
        """``lease_s``: see the module docstring. ``parallel``: this actor is rank ``parallel["rank"]`` of a
        multi-rank instance of layout ``parallel["layout"]`` (ParallelLayout fields); it builds its engine
        (leader) or follower loop in ``setup(init_method)``, once every rank of the instance exists. None:
        one rank, built now."""
        if cpu_affinity:
            os.sched_setaffinity(0, cpu_affinity)
        import torch

        from engine.args import EngineArgs

        threads = len(cpu_affinity) if cpu_affinity else (parallel or {}).get("threads")
        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.args = EngineArgs(**engine_args)
        self.role = self.args.role
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role: a worker runs role 'prefill' or 'decode', got {self.role!r}")
        self.parallel = parallel
        self.lease_s = lease_s
        self.engine = self.loop = None
        self._follower: threading.Thread | None = None
        self._follower_error: BaseException | None = None
        self._weights = None
        self._news = asyncio.Event()  # set whenever a decoding sequence's queue receives something (poll waits on it)
        if parallel is None:
            self._build_engine(None)
        self.transfer_timeout_s = transfer_timeout_s
        self.prefill_timeout_s = prefill_timeout_s
        self.started_at = time.time()
        self.queued_prompt_tokens = 0  # prefill: prompt tokens accepted and not yet handed off
        self.decoding: dict[str, _Decoding] = {}
        self._outbox_events: dict[str, asyncio.Event] = {}
        self._transfers: dict[str, asyncio.Task] = {}  # decode: the start_decode call of each sequence
        self.transfers_done = 0
        self.transfers_failed = 0
        self.polls = self.polled_sequences = 0
        self._counts_read = None  # the engine thread's pending read of the expert counts (load())
        self._expert_counts = None
        self.faults = FaultInjection()
        self._stalled: set[str] = set()  # sequences whose pull_kv stall was served (at most the armed count)
        self._sweeper: asyncio.Task | None = None
        self._lapsed: dict[str, None] = {}  # the latest sequences the lease freed (poll says so: LeaseExpired)

    def _build_engine(self, groups: Any) -> None:
        from engine.engine import LLMEngine

        if groups is None:
            self.engine = LLMEngine(self.args)
        else:
            from engine.multirank import MultiRankExecutor

            self.engine = LLMEngine(self.args, lambda a, cfg, outbox: MultiRankExecutor(a, cfg, outbox, groups))
        self.engine.connector.reservation_ttl_s = self.lease_s
        self.engine.connector.outbox.ttl_s = self.lease_s
        self.loop = EngineLoop(self.engine)
        self.loop.on_news = self._news.set

    # ---- a rank of a multi-rank instance --------------------------------------------------
    def rendezvous(self) -> str:
        """Rank 0: where the instance's ranks meet (``tcp://<this node's address>:<a free port>``)."""
        import socket

        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    async def setup(self, init_method: str, timeout_s: float = 120.0) -> None:
        """Join the instance (every rank at once) and build this rank's part: an engine (a replica's
        leader) or a follower loop on its own thread."""
        from engine.model.parallel import ParallelLayout
        from engine.model.weight_share import weight_share
        from engine.model_runner import resolve_device
        from engine.multirank import RankSpec, follow, init_rank

        spec = RankSpec(ParallelLayout(**self.parallel["layout"]), self.parallel["rank"], init_method, timeout_s)
        groups = init_rank(spec, resolve_device(self.args.device))
        if spec.is_leader:
            self._build_engine(groups)
            self._weights = weight_share(self.engine.runner.model)
            self.loop.ensure_started()  # lock-step and pings start now, before any request
            return
        ready = threading.Event()

        def run() -> None:
            def on_ready(runner: Any) -> None:
                self._weights = weight_share(runner.model)
                ready.set()

            try:
                follow(self.args, self.engine_config(), groups, on_ready)
            except BaseException as e:  # a failed collective: the instance must be re-created
                self._follower_error = e
                ready.set()

        self._follower = threading.Thread(target=run, name=f"{self.name}-follower", daemon=True)
        self._follower.start()
        await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        if self._follower_error is not None:
            raise RuntimeError(f"{self.name}: {self._follower_error}") from self._follower_error

    def engine_config(self) -> Any:
        from engine.checkpoint.loader import load_config

        return load_config(self.args.model)

    def rank_info(self) -> RankInfo:
        """This rank's state, for the pool's watchdog and ``pdserve status``."""
        rank = self.parallel["rank"] if self.parallel else 0
        if self._follower is not None:
            alive, error = self._follower.is_alive(), self._follower_error
        else:
            alive, error = self.loop is not None and self.loop.alive, self.loop.error if self.loop else None
        w = self._weights
        return RankInfo(self.name, rank, self._follower is None, alive, None if error is None else str(error)[:300],
                        w.resident_bytes if w else 0, w.expected_bytes if w else 0, w.full_model_bytes if w else 0)

    # ---- info, health, load ----------------------------------------------------------
    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(self.name, self.role, self.args.model_name, self.args.model, e.max_model_len,
                          list(e.eos_token_ids), self.args.block_size, e.kv.num_blocks, os.getpid(),
                          instance_of(self.name), e.executor.runner.experts.shape(), self.args.admission_limit)

    async def load(self) -> WorkerLoad:
        """Answers at once, also while a long step runs (a health probe must not wait for a 4k-token
        prefill): the lease sweep runs on its own timer, and the expert counts are the ones the engine
        thread read for the previous probe (cumulative, so a late read loses nothing)."""
        self.loop.ensure_started()
        self._ensure_sweeper()
        if self.loop.alive:
            read = self._counts_read
            if read is not None and read.done() and read.exception() is None:
                self._expert_counts = read.result()
            if read is None or read.done():
                self._counts_read = self.loop.post(ReadExpertCounts())
        s = self.engine.stats()
        return WorkerLoad(
            name=self.name, role=self.role, alive=self.loop.alive, started_at=self.started_at,
            queued_prompt_tokens=self.queued_prompt_tokens, num_running=s.num_running, num_waiting=s.num_waiting,
            kv_blocks_used=s.kv_blocks_used, kv_blocks_reserved=s.kv_blocks_reserved,
            kv_blocks_total=s.kv_blocks_total, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions,
            transfers_done=self.transfers_done, transfers_failed=self.transfers_failed,
            outbox_bytes=self.engine.connector.outbox.nbytes, polls=self.polls,
            polled_sequences=self.polled_sequences, experts=self._expert_counts)

    # ---- prefill role -------------------------------------------------------------------
    async def prefill(self, seq_id: str, prompt: list[int], params: SamplingParams,
                      continuation: Continuation) -> PrefillResult:
        """Prompt → first token; the rows leave through ``pull_kv`` (see the module docstring)."""
        self._require("prefill")
        self._watch_outbox()
        self._ensure_sweeper()
        t0 = time.perf_counter()
        q = self.loop.open(seq_id)
        queued = len(prompt) + len(continuation.output_token_ids)
        self.queued_prompt_tokens += queued
        try:
            await self.loop.add(seq_id, prompt, params, continuation=continuation)
            merged: RequestOutput | None = None
            while merged is None or not merged.finished:
                item = await q.get()
                if item is ABORTED:
                    return PrefillResult(aborted=True)
                if isinstance(item, BaseException):
                    raise item
                if merged is None:
                    merged = RequestOutput(item.request_id, item.prompt_token_ids, [])
                merged.merge(item)
        except BaseException:
            self.loop.abort(seq_id)
            raise
        finally:
            self.queued_prompt_tokens -= queued
            self.loop.close(seq_id)
        return PrefillResult(handed_off=merged.handed_off, output=None if merged.handed_off else merged,
                             num_tokens=queued, num_cached_tokens=merged.metrics.num_cached_tokens if merged.metrics
                             else 0, seconds=time.perf_counter() - t0, finished_at=time.time())

    async def pull_kv(self, seq_id: str, cursor: int, wait_s: float) -> KVPull:
        """The pieces of ``seq_id`` from ``cursor`` on, waiting up to ``wait_s`` for news; the control
        message once all pieces are out. A sequence not here (yet) is an empty answer: the decode
        side's pending timeout and the router's own view of the prefill bound the wait."""
        self._require("prefill")
        self._watch_outbox()
        if await self._stall_pull(seq_id, cursor):
            return KVPull([], None)
        outbox = self.engine.connector.outbox
        deadline = time.monotonic() + wait_s
        while True:
            event = self._outbox_events.setdefault(seq_id, asyncio.Event())
            event.clear()
            try:
                pieces, control = outbox.take(seq_id, cursor)
            except KeyError:  # not added yet (the router starts both sides at once), or gone: wait
                pieces, control = [], None
            left = deadline - time.monotonic()
            if pieces or control is not None or left <= 0:
                if control is not None:
                    self._outbox_events.pop(seq_id, None)
                return KVPull(pieces, control)
            try:
                await asyncio.wait_for(event.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _stall_pull(self, seq_id: str, cursor: int) -> bool:
        """The armed ``pull_kv`` stall (``FaultInjection``), once per sequence; True if it was served."""
        f = self.faults
        if f.pull_stall_sequences <= 0 or cursor < f.pull_stall_cursor or seq_id in self._stalled:
            return False
        f.pull_stall_sequences -= 1
        self._stalled.add(seq_id)
        await asyncio.sleep(f.pull_stall_s)
        return True

    def _watch_outbox(self) -> None:
        """Wake ``pull_kv`` waiters from the engine thread when their sequence's outbox changes."""
        loop = asyncio.get_running_loop()

        def notify(seq_id: str) -> None:
            loop.call_soon_threadsafe(self._wake_puller, seq_id)

        self.engine.connector.outbox.notify = notify

    def _wake_puller(self, seq_id: str) -> None:
        event = self._outbox_events.get(seq_id)
        if event is not None:
            event.set()

    # ---- decode role ----------------------------------------------------------------------
    async def reserve(self, seq_id: str, num_kv_tokens: int, num_total_tokens: int) -> bool:
        """Blocks for the ``num_kv_tokens`` rows to come and room up to ``num_total_tokens``; False if full."""
        self._require("decode")
        self._ensure_sweeper()
        return await self.loop.call(ReserveKV(seq_id, num_kv_tokens, num_total_tokens)) is not None

    async def start_decode(self, seq_id: str, source: str) -> TransferReport:
        """Pull the sequence's rows from the prefill worker ``source`` into the reserved blocks, then join."""
        self._require("decode")
        import ray

        if seq_id not in self.engine.connector.reservations:
            return TransferReport("failed", "no_reservation")
        try:
            handle = ray.get_actor(source, namespace=NAMESPACE)
        except ValueError:
            self.loop.abort(seq_id)
            return TransferReport("failed", "lost", f"no prefill worker named {source!r}")
        transfer = Transfer(seq_id, ActorSource(handle), self.transfer_timeout_s, self.prefill_timeout_s)
        self._transfers[seq_id] = asyncio.current_task()  # abort() cancels it
        try:
            control = await transfer.run(self)
        except TransferFailed:
            self.transfers_failed += 1
            self.loop.abort(seq_id)
            return transfer.report()
        finally:
            self._transfers.pop(seq_id, None)
        state = _Decoding(self.loop.open(seq_id))
        self.decoding[seq_id] = state
        try:
            await self.loop.add(seq_id, control.prompt_token_ids, control.params, kv=control)
        except ValueError as e:
            self.decoding.pop(seq_id, None)
            self.loop.abort(seq_id)
            self.transfers_failed += 1
            return TransferReport("failed", "rejected", str(e), transfer.nbytes, transfer.num_pieces, transfer.seconds)
        except BaseException:
            self.decoding.pop(seq_id, None)
            self.loop.abort(seq_id)
            raise
        self.transfers_done += 1
        return transfer.report()

    async def load_kv(self, seq_id: str, piece: Any) -> None:
        """``KVSink``: one arriving piece into the reserved blocks, on the engine thread."""
        await self.loop.call(LoadKV(seq_id, piece))

    async def poll(self, seq_ids: list[str], wait_s: float) -> dict[str, RequestOutput | KeyError]:
        """For each of ``seq_ids`` with news, the deltas merged since its last poll; returns as soon as one
        has news, or ``{}`` after ``wait_s``. A sequence this worker does not hold maps to a ``KeyError``
        (``LeaseExpired`` when the lease freed it; a ``KeyError`` too once it was aborted here); an
        engine failure is every sequence's ``EngineError``. One call covers all of a router's sequences
        here, so the calls per step do not grow with the batch."""
        self.polls += 1
        self.polled_sequences += len(seq_ids)
        news: dict[str, RequestOutput | KeyError] = {}
        waiting: dict[str, _Decoding] = {}
        deadline = time.monotonic() + wait_s
        for seq_id in seq_ids:
            state = self.decoding.get(seq_id)
            if state is not None:
                state.touched = deadline  # a poll in progress holds the lease
                waiting[seq_id] = state
            elif seq_id in self._lapsed:
                news[seq_id] = LeaseExpired(f"{self.name}: request {seq_id!r} was not polled for {self.lease_s:g} s")
            else:
                news[seq_id] = KeyError(f"{self.name}: request {seq_id!r} is not decoding here")
        held = list(waiting.values())
        while True:
            self._news.clear()  # anything delivered from here on sets it again
            for seq_id, state in list(waiting.items()):
                item = self._take(seq_id, state)
                if item is not None:
                    news[seq_id] = item
                    del waiting[seq_id]
            left = deadline - time.monotonic()
            if news or left <= 0:
                break
            try:
                await asyncio.wait_for(self._news.wait(), left)
            except asyncio.TimeoutError:
                pass
        now = time.monotonic()
        for state in held:
            state.touched = now
        return news

    def _take(self, seq_id: str, state: _Decoding) -> RequestOutput | KeyError | EngineError | None:
        """What a poll answers for one sequence now: its deltas merged (the last one releases it), an
        error, or None when nothing arrived since its last poll."""
        try:  # take everything already delivered without waiting
            while True:
                self._absorb(state, state.queue.get_nowait())
        except asyncio.QueueEmpty:
            pass
        except (KeyError, EngineError) as e:
            return e
        if state.pending is None and not state.finished:
            return None
        out, state.pending = state.pending, None
        if state.finished:
            self.decoding.pop(seq_id, None)
            self.loop.close(seq_id)
        return out

    def _absorb(self, state: _Decoding, item: Any) -> None:
        if item is ABORTED:
            raise KeyError("the request was aborted")
        if isinstance(item, BaseException):
            raise item
        if state.pending is None:
            state.pending = item
        else:
            state.pending.merge(item)
        state.finished = item.finished

    # ---- both roles ------------------------------------------------------------------------
    def abort(self, seq_id: str) -> None:
        """End the sequence wherever it is here: reservation, transfer, outbox, engine; its blocks are freed."""
        self.decoding.pop(seq_id, None)
        transfer = self._transfers.pop(seq_id, None)
        if transfer is not None:
            transfer.cancel()
        self.loop.abort(seq_id)

    # ---- the lease (see the module docstring) -----------------------------------------------
    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.lease_s / 4, 1.0))
            if self.loop is not None and self.loop.alive:
                try:
                    await self._sweep()
                except Exception:  # the engine failed: load() reports it, the router takes this worker out
                    log.exception("%s: lease sweep failed", self.name)

    async def _sweep(self) -> None:
        """Free what the lease has run out on: decoding sequences nobody polls, then (on the engine
        thread) reservations no transfer took and outbox rows nobody pulled."""
        now = time.monotonic()
        for seq_id in [s for s, d in self.decoding.items() if now - d.touched > self.lease_s]:
            self.abort(seq_id)
            self._lapsed[seq_id] = None
            if len(self._lapsed) > 1024:
                del self._lapsed[next(iter(self._lapsed))]
        await self.loop.call(Expire(frozenset(self._transfers)))

    # ---- live expert rebalancing (router.experts) -------------------------------------------
    async def stage_experts(self, version: int, phy2log: list[list[int]]) -> None:
        """Start reading placement ``version``'s expert weights on every rank of this DP replica."""
        await self.loop.call(StageExperts(version, phy2log))

    async def rollout_status(self) -> RolloutState:
        return await self.loop.call(RolloutStatus())

    async def switch_experts(self, version: int) -> None:
        """Switch the staged placement in, one MoE layer per step boundary (agreed with the instance's
        other replicas)."""
        await self.loop.call(SwitchExperts(version))

    async def abort_rollout(self) -> None:
        await self.loop.call(AbortRollout())

    # ---- fault injection (tests, chaos drills) ----------------------------------------------
    def set_faults(self, faults: FaultInjection) -> None:
        self.faults = faults
        self._stalled.clear()

    def _require(self, role: str) -> None:
        if self.role != role:
            raise RuntimeError(f"{self.name} runs role {self.role!r}, not {role!r}")


class PrefillWorker(EngineWorker):
    """An ``EngineWorker`` in role ``prefill`` (its own class so Ray names the actors by role)."""


class DecodeWorker(EngineWorker):
    """An ``EngineWorker`` in role ``decode``."""


def actor_classes() -> dict[str, Any]:
    """``{"prefill": ..., "decode": ...}``: the worker classes as Ray actor classes."""
    import ray

    return {"prefill": ray.remote(PrefillWorker), "decode": ray.remote(DecodeWorker)}

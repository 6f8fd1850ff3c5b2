"""Ray worker actors: one engine rank in role ``prefill`` or ``decode``.

``PrefillWorker`` / ``DecodeWorker`` are ``EngineWorker`` as Ray actor classes
(named ``prefill-<i>`` / ``decode-<i>`` in namespace ``pdserve`` by ``deploy.pool``).
Each owns an ``LLMEngine`` stepped by an ``EngineLoop`` thread; its methods run on
the actor's asyncio loop, so many requests are in flight at once.

Prefill side, per request: ``prefill(rid, prompt, params)`` queues the prompt,
waits for the first token (the engine parks the request), exports the latent rows
(freeing the blocks), ``ray.put``s the ``KVPayload`` (this worker owns the object)
and returns ``{"kv": [ObjectRef], ...}``; when the first token already ends the
request (``max_tokens`` 1, EOS) it returns ``{"output": ...}`` and no payload.

Decode side, per request, in order: ``reserve(rid, tokens)`` (capacity held before
prefill starts; dropped after ``reservation_ttl_s`` if never used) →
``start_decode(rid, [ObjectRef])`` (a ``deploy.kv_transfer.Transfer``: pending →
transferring → done | failed; on done the request joins the engine and the
reservation is released) → ``poll(rid, wait_s)`` until an output with
``finished`` (long polling: returns the deltas merged since the last poll, or None
after ``wait_s``). ``abort(rid)`` ends a request in any of these stages on either
role and frees its blocks and reservation.

``load()`` is the health probe and the policies' input (``router.policy.WorkerLoad``
fields). After an actor restart the new incarnation knows none of the old
requests: ``start_decode`` returns a failed report (``no_reservation``) and ``poll``
raises ``KeyError``, which the router treats as a lost worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from typing import Any

from engine.engine_loop import ABORTED, EngineLoop
from deploy.kv_transfer import RayObjectTransport, Transfer, TransferFailed
from engine.outputs import RequestOutput

NAMESPACE = "pdserve"


@dataclasses.dataclass
class _Decoding:
    """A decode-side request: its queue and the deltas not yet polled."""

    queue: asyncio.Queue
    pending: RequestOutput | None = None
    finished: bool = False


class EngineWorker:
    def __init__(self, name: str, engine_args: dict[str, Any], cpu_affinity: list[int] | None = None,
                 transfer_timeout_s: float = 30.0, reservation_ttl_s: float = 120.0):
        if cpu_affinity:
            os.sched_setaffinity(0, cpu_affinity)
        import torch

        from engine.args import EngineArgs
        from engine.engine import LLMEngine

        if cpu_affinity:
            torch.set_num_threads(len(cpu_affinity))
        self.name = name
        self.args = EngineArgs(**engine_args)
        self.role = self.args.role
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role: a worker runs role 'prefill' or 'decode', got {self.role!r}")
        self.engine = LLMEngine(self.args)
        self.loop = EngineLoop(self.engine)
        self.transport = RayObjectTransport()
        self.transfer_timeout_s = transfer_timeout_s
        self.reservation_ttl_s = reservation_ttl_s
        self.started_at = time.time()
        self.queued_prompt_tokens = 0  # prefill: prompt tokens accepted and not yet exported
        self.reservations: dict[str, tuple[int, float]] = {}  # decode: rid -> (blocks, expiry monotonic)
        self.decoding: dict[str, _Decoding] = {}
        self.transfers_done = 0
        self.transfers_failed = 0

    # ---- info, health, load ----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"name": self.name, "role": self.role, "model_name": self.args.model_name, "model": self.args.model,
                "max_model_len": e.max_model_len, "eos_token_ids": list(e.eos_token_ids),
                "block_size": self.args.block_size, "kv_blocks_total": e.kv.num_blocks, "pid": os.getpid()}

    async def load(self) -> dict[str, Any]:
        self.loop.ensure_started()
        self._expire_reservations()
        s = self.engine.stats()
        return {"name": self.name, "role": self.role, "alive": self.loop.alive,
                "queued_prompt_tokens": self.queued_prompt_tokens, "num_running": s.num_running,
                "num_waiting": s.num_waiting, "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total,
                "kv_blocks_reserved": sum(b for b, _ in self.reservations.values()),
                "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
                "num_preemptions": s.num_preemptions, "started_at": self.started_at,
                "transfers_done": self.transfers_done, "transfers_failed": self.transfers_failed}

    # ---- prefill role -------------------------------------------------------------------
    async def prefill(self, request_id: str, prompt: list[int], params: Any) -> dict[str, Any]:
        """Prompt → first token → exported payload in the object store (see the module docstring)."""
        self._require("prefill")
        t0 = time.perf_counter()
        q = self.loop.open(request_id)
        self.queued_prompt_tokens += len(prompt)
        try:
            await self.loop.add(request_id, prompt, params)
            merged: RequestOutput | None = None
            while merged is None or not merged.finished:
                item = await q.get()
                if item is ABORTED:
                    return {"aborted": True}
                if isinstance(item, BaseException):
                    raise item
                if merged is None:
                    merged = RequestOutput(item.request_id, item.prompt_token_ids, [])
                merged.merge(item)
        except BaseException:
            self.loop.abort(request_id)
            raise
        finally:
            self.queued_prompt_tokens -= len(prompt)
            self.loop.close(request_id)
        if merged.outputs and merged.outputs[0].finish_reason is not None:  # the first token ended it
            return {"output": merged, "prefill_seconds": time.perf_counter() - t0}
        import ray

        payload = await self.loop.export(request_id)
        return {"kv": [ray.put(payload)], "nbytes": payload.nbytes, "num_tokens": payload.num_tokens,
                "prefill_seconds": time.perf_counter() - t0}

    # ---- decode role ----------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Hold blocks for ``num_tokens`` (prompt + max generated) before prefill starts; False if full."""
        self._require("decode")
        self._expire_reservations()
        need = self.engine.kv.blocks_needed(num_tokens)
        free = self.engine.kv.num_free_blocks - sum(b for b, _ in self.reservations.values())
        if need > free:
            return False
        self.reservations[request_id] = (need, time.monotonic() + self.reservation_ttl_s)
        return True

    async def start_decode(self, request_id: str, kv: list[Any]) -> dict[str, Any]:
        """Fetch the payload (``kv[0]``, an ObjectRef: a list so Ray does not resolve it) and join the engine."""
        self._require("decode")
        transfer = Transfer(request_id, kv[0], self.transport, self.transfer_timeout_s)
        if request_id not in self.reservations:
            return {"state": "failed", "cause": "no_reservation", "nbytes": 0, "seconds": 0.0}
        try:
            payload = await transfer.run()
        except TransferFailed:
            self.transfers_failed += 1
            return transfer.report()
        finally:
            self.reservations.pop(request_id, None)
        self.transfers_done += 1
        state = _Decoding(self.loop.open(request_id))
        self.decoding[request_id] = state
        try:
            await self.loop.add(request_id, payload.prompt_token_ids, payload.params, kv=payload)
        except BaseException:
            self.decoding.pop(request_id, None)
            self.loop.abort(request_id)
            raise
        return transfer.report()

    async def poll(self, request_id: str, wait_s: float) -> RequestOutput | None:
        """The deltas merged since the last poll (None if none within ``wait_s``); KeyError if unknown."""
        state = self.decoding.get(request_id)
        if state is None:
            raise KeyError(f"{self.name}: request {request_id!r} is not decoding here")
        deadline = time.monotonic() + wait_s
        while True:
            try:  # take everything already delivered without waiting
                while True:
                    self._absorb(state, state.queue.get_nowait())
            except asyncio.QueueEmpty:
                pass
            if state.pending is not None or state.finished:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self._absorb(state, await asyncio.wait_for(state.queue.get(), left))
            except asyncio.TimeoutError:
                return None
        out, state.pending = state.pending, None
        if state.finished:
            self.decoding.pop(request_id, None)
            self.loop.close(request_id)
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
    def abort(self, request_id: str) -> None:
        """End the request wherever it is here: reservation, transfer, engine; its blocks are freed."""
        self.reservations.pop(request_id, None)
        self.decoding.pop(request_id, None)
        self.loop.abort(request_id)

    def _require(self, role: str) -> None:
        if self.role != role:
            raise RuntimeError(f"{self.name} runs role {self.role!r}, not {role!r}")

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, expiry) in self.reservations.items() if expiry < now]:
            del self.reservations[rid]


class PrefillWorker(EngineWorker):
    """An ``EngineWorker`` in role ``prefill`` (its own class so Ray names the actors by role)."""


class DecodeWorker(EngineWorker):
    """An ``EngineWorker`` in role ``decode``."""


def actor_classes() -> dict[str, Any]:
    """``{"prefill": ..., "decode": ...}``: the worker classes as Ray actor classes."""
    import ray

    return {"prefill": ray.remote(PrefillWorker), "decode": ray.remote(DecodeWorker)}

"""The contract between the router and the worker actors: every message type and method, typed.

Both sides import this module; nothing crosses the Ray boundary as a loose dict.
``WorkerAPI`` lists the remote methods (an ``EngineWorker`` implements all of them;
a test checks it), in the order a request uses them:

* prefill pool: ``prefill(seq_id, prompt, params, continuation) -> PrefillResult``;
  the latent rows leave through ``pull_kv(seq_id, cursor, wait_s) -> KVPull``, which
  the decode worker calls (the pieces, then the ``KVControl``);
* decode pool: ``reserve(seq_id, num_kv_tokens, num_total_tokens) -> bool`` (before
  the prefill starts), ``start_decode(seq_id, source) -> TransferReport`` (pulls the
  rows from the prefill worker named ``source`` while it computes, then joins the
  engine), ``poll(seq_ids, wait_s) -> {seq_id: RequestOutput | KeyError}`` until finished
  (one long poll for all of a router's sequences on the worker);
* both: ``info() -> WorkerInfo``, ``load() -> WorkerLoad`` (health probe and the
  policies' input; it carries the replica's cumulative expert-load counts), ``abort(seq_id)``;
* live expert rebalancing (``router.experts``), to every DP replica leader of an instance:
  ``stage_experts(version, phy2log)``, ``rollout_status() -> RolloutState`` until staged,
  ``switch_experts(version)``, ``rollout_status()`` until installed; ``abort_rollout()``;
* tests and chaos drills: ``set_faults(FaultInjection)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from engine.expert_load import ExpertCounts, ExpertShape, RolloutState
from engine.outputs import KVControl, RequestOutput
from engine.sampling_params import Continuation, SamplingParams

NAMESPACE = "pdserve"  # the Ray namespace of a deployment's named actors
ROLES = ("prefill", "decode")  # the pools of a disaggregated deployment


def worker_name(role: str, index: int, rank: int | None = None) -> str:
    """The actor name of instance ``index`` of a pool (one rank), or of one rank of it."""
    return f"{role}-{index}" if rank is None else f"{role}-{index}.{rank}"


def instance_of(name: str) -> str:
    """The instance a worker (rank) name belongs to: ``decode-0.2`` -> ``decode-0``."""
    return name.split(".", 1)[0]


@dataclasses.dataclass
class WorkerInfo:
    """Facts about a worker that do not change while it lives."""

    name: str
    role: str
    model_name: str
    model: str
    max_model_len: int  # this worker's engine's context length (its pool's, when the pool is uniform)
    eos_token_ids: list[int]
    block_size: int
    kv_blocks_total: int
    pid: int
    instance: str = ""  # its instance (``instance_of(name)``): the DP replica leaders of one share it
    experts: ExpertShape | None = None  # its MoE layers (None: no MoE layer)
    admission_limit: int = 0  # sequences its engine admits (running + waiting)


@dataclasses.dataclass
class RankInfo:
    """One rank of an instance as its actor reports it (``rank_info()``; every rank, leaders and followers)."""

    name: str
    rank: int  # instance rank
    leader: bool  # leads a DP replica (owns an engine; the router talks to it)
    alive: bool  # its engine thread (leader) or follower loop is running
    error: str | None = None
    weight_bytes: int = 0  # resident weights on this rank
    expected_weight_bytes: int = 0  # its share by the layout (engine.model.weight_share)
    full_weight_bytes: int = 0  # the whole model, for comparison


@dataclasses.dataclass
class WorkerLoad:
    """A worker's state now: the router's health signal and the policies' input."""

    name: str
    role: str = ""
    alive: bool = True
    started_at: float = 0.0  # identifies the incarnation: a restarted worker has a new one
    queued_prompt_tokens: int = 0  # prefill: prompt tokens accepted and not yet handed off
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_reserved: int = 0  # decode: held for sequences whose KV is on its way
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    outbox_bytes: int = 0  # prefill: latent rows waiting for their decode worker
    polls: int = 0  # decode: poll calls answered (cumulative)
    polled_sequences: int = 0  # decode: sequence ids those calls listed (cumulative; / polls = the batching)
    experts: ExpertCounts | None = None  # its DP replica's expert-load counts, cumulative

    @property
    def kv_fraction(self) -> float:
        return (self.kv_blocks_used + self.kv_blocks_reserved) / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclasses.dataclass
class PrefillResult:
    """How a prefill ended: handed off (its KV went to the decode worker pulling it), finished by
    its first token (``output``: no decode needed), or aborted here."""

    handed_off: bool = False
    output: RequestOutput | None = None
    aborted: bool = False
    num_tokens: int = 0  # prompt positions computed or taken from the prefix cache
    num_cached_tokens: int = 0  # of which taken from the prefill worker's prefix cache
    seconds: float = 0.0  # on the worker: accepted → done
    finished_at: float = 0.0  # time.time() on the worker when the prompt was done


@dataclasses.dataclass
class TransferReport:
    """A KV hand-off as the decode worker saw it (``deploy.kv_transfer``)."""

    state: str  # "done" | "failed"
    # failed: timeout | lost (the prefill side failed) | sink (this decode side failed) | invalid | cancelled
    # | no_reservation | rejected
    cause: str | None = None
    message: str | None = None  # failed: what happened, for the logs
    nbytes: int = 0
    num_pieces: int = 0
    seconds: float = 0.0  # first pull → last piece
    done_at: float = 0.0  # time.time() on the worker when the sequence joined its engine


@dataclasses.dataclass
class KVPull:
    """One answer of ``pull_kv``: pieces after the cursor; the control message once all are out."""

    pieces: list[Any]  # engine.kv_connector.KVPiece
    control: KVControl | None = None


class LeaseExpired(KeyError):
    """``poll``'s answer for a sequence the worker freed: its router had not polled it for ``lease_s``."""


@dataclasses.dataclass
class FaultInjection:
    """Deliberate faults (``WorkerAPI.set_faults``), for tests and chaos drills; none by default.

    ``pull_kv`` stall: for each of the next ``pull_stall_sequences`` sequences, the first call at a
    cursor ≥ ``pull_stall_cursor`` (0: its first call, before the decode side got anything; 1: after
    some pieces, mid-transfer) holds for ``pull_stall_s`` and then answers "nothing new"."""

    pull_stall_s: float = 0.0
    pull_stall_cursor: int = 0
    pull_stall_sequences: int = 0


class WorkerAPI(Protocol):
    """The remote methods of a worker actor (see the module docstring)."""

    def info(self) -> WorkerInfo: ...

    async def load(self) -> WorkerLoad: ...

    async def prefill(self, seq_id: str, prompt: list[int], params: SamplingParams,
                      continuation: Continuation) -> PrefillResult: ...

    async def pull_kv(self, seq_id: str, cursor: int, wait_s: float) -> KVPull: ...

    async def reserve(self, seq_id: str, num_kv_tokens: int, num_total_tokens: int) -> bool: ...

    async def start_decode(self, seq_id: str, source: str) -> TransferReport: ...

    async def poll(self, seq_ids: list[str], wait_s: float) -> dict[str, RequestOutput | KeyError]: ...

    def abort(self, seq_id: str) -> None: ...

    async def stage_experts(self, version: int, phy2log: list[list[int]]) -> None: ...

    async def rollout_status(self) -> RolloutState: ...

    async def switch_experts(self, version: int) -> None: ...

    async def abort_rollout(self) -> None: ...

    def set_faults(self, faults: FaultInjection) -> None: ...


WORKER_METHODS = tuple(name for name in vars(WorkerAPI) if not name.startswith("_"))

"""The executor: the seam between an engine and the rank(s) that run its model.

``LLMEngine`` never touches a model or a cache tensor; it hands the executor a
torch-free ``StepInput`` and gets a ``StepOutput`` back (``engine.step``). The
executor also carries the KV connector's worker-side operations (read a sequence's
rows for a hand-off, write arriving rows into reserved blocks), because the rows
live on the ranks.

Executors also carry the experts' side of live rebalancing (``engine.rebalance``): the
replica's cumulative expert-load counts, staging a new placement on every rank, and
switching it one MoE layer per step boundary (``switch_experts``; the executor installs a
layer before each step, or in ``idle``, while ``needs_ticks`` keeps an idle loop stepping).

``LocalExecutor`` runs one rank in this process; ``engine.multirank.MultiRankExecutor``
leads a DP replica of a multi-rank instance (it sends each step to the replica's other
ranks, and keeps DP replicas in lock-step for the MoE collectives). Their ``num_blocks``
is the minimum over the ranks, so the scheduler never hands out a block some rank does
not have.
"""

from __future__ import annotations

from typing import Protocol

from engine.args import EngineArgs
from engine.expert_load import ExpertCounts, RolloutState
from engine.kv_connector import KVOutbox, KVPiece
from engine.model.config import ModelConfig
from engine.step import StepInput, StepOutput


class Executor(Protocol):
    needs_ticks: bool  # the engine loop must step even without work (lock-step ranks, pings)
    busy_elsewhere: bool  # lock-step: another DP replica worked in the last iteration (do not sleep)
    tick_s: float  # how long an idle engine loop waits before stepping again (needs_ticks)
    num_blocks: int  # KV blocks every rank holds (the minimum over ranks)
    num_cache_layers: int  # latent cache layers (main layers, then MTP layers)
    num_computed_layers: int  # of which the forward fills: the MTP layers only when it drafts with them

    def execute(self, step: StepInput) -> StepOutput: ...

    def idle(self) -> None: ...  # a step with nothing scheduled here

    def read_kv(self, seq_id: str, block_table: list[int], num_tokens: int) -> KVPiece: ...

    def write_kv(self, block_table: list[int], piece: KVPiece) -> None: ...

    def expert_counts(self) -> ExpertCounts | None: ...  # None: the model has no MoE layer

    def stage_experts(self, version: int, phy2log: list[list[int]]) -> None: ...

    def rollout_state(self) -> RolloutState: ...

    def switch_experts(self, version: int) -> None: ...

    def abort_rollout(self) -> None: ...

    def shutdown(self) -> None: ...


def rollout_state(experts, staged: bool, error: str | None, staged_bytes: int) -> RolloutState:
    """A ``RolloutState`` from this rank's ``RankExperts`` and the replica-wide staging result."""
    return RolloutState(experts.version, experts.installed_version, staged, error, staged_bytes,
                        len(experts.pauses_s), experts.num_layers, list(experts.pauses_s))


class LocalExecutor:
    """One rank in this process: a ``ModelRunner``."""

    busy_elsewhere = False
    tick_s = 0.0

    def __init__(self, args: EngineArgs, cfg: ModelConfig, outbox: KVOutbox | None = None):
        from engine.model_runner import ModelRunner

        self.runner = ModelRunner(args, cfg, outbox)
        self.num_blocks = self.runner.num_blocks
        self.num_cache_layers = self.runner.model.num_cache_layers
        self.num_computed_layers = self.runner.num_computed_layers

    @property
    def needs_ticks(self) -> bool:
        return self.runner.experts.switching  # idle or not, the next layer switches at the next step

    def execute(self, step: StepInput) -> StepOutput:
        self._switch_layer()
        return self.runner.execute(step)

    def idle(self) -> None:
        self._switch_layer()

    def _switch_layer(self) -> None:
        if self.runner.experts.switching:  # one rank: nobody to agree with
            self.runner.experts.install_next()

    def read_kv(self, seq_id: str, block_table: list[int], num_tokens: int) -> KVPiece:
        return self.runner.kv_worker.read(seq_id, block_table, 0, num_tokens)

    def write_kv(self, block_table: list[int], piece: KVPiece) -> None:
        self.runner.kv_worker.write(block_table, piece)

    def expert_counts(self) -> ExpertCounts | None:
        ex = self.runner.experts
        if not ex.num_layers:
            return None
        return ExpertCounts(ex.installed_version, *ex.counts_split(ex.counts()))

    def stage_experts(self, version: int, phy2log: list[list[int]]) -> None:
        self.runner.experts.stage(version, phy2log)

    def rollout_state(self) -> RolloutState:
        ex = self.runner.experts
        return rollout_state(ex, ex.is_staged(ex.version), ex.error, ex.staged_bytes)

    def switch_experts(self, version: int) -> None:
        self.runner.experts.begin_switch(version)

    def abort_rollout(self) -> None:
        self.runner.experts.drop()

    def shutdown(self) -> None:
        self.runner.sequences.clear()

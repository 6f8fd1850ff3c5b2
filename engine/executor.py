"""The executor: the seam between an engine and the rank(s) that run its model.

``LLMEngine`` never touches a model or a cache tensor; it hands the executor a
torch-free ``StepInput`` and gets a ``StepOutput`` back (``engine.step``). The
executor also carries the KV connector's worker-side operations (read a sequence's
rows for a hand-off, write arriving rows into reserved blocks), because the rows
live on the ranks.

``LocalExecutor`` runs one rank in this process; ``engine.multirank.MultiRankExecutor``
leads a DP replica of a multi-rank instance (it sends each step to the replica's other
ranks, and keeps DP replicas in lock-step for the MoE collectives). Their ``num_blocks``
is the minimum over the ranks, so the scheduler never hands out a block some rank does
not have.
"""

from __future__ import annotations

from typing import Protocol

from engine.args import EngineArgs
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

    def shutdown(self) -> None: ...


class LocalExecutor:
    """One rank in this process: a ``ModelRunner``."""

    needs_ticks = False
    busy_elsewhere = False
    tick_s = 0.0

    def __init__(self, args: EngineArgs, cfg: ModelConfig, outbox: KVOutbox | None = None):
        from engine.model_runner import ModelRunner

        self.runner = ModelRunner(args, cfg, outbox)
        self.num_blocks = self.runner.num_blocks
        self.num_cache_layers = self.runner.model.num_cache_layers
        self.num_computed_layers = self.runner.num_computed_layers

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def idle(self) -> None:
        pass  # one rank: nobody to keep in step

    def read_kv(self, seq_id: str, block_table: list[int], num_tokens: int) -> KVPiece:
        return self.runner.kv_worker.read(seq_id, block_table, 0, num_tokens)

    def write_kv(self, block_table: list[int], piece: KVPiece) -> None:
        self.runner.kv_worker.write(block_table, piece)

    def shutdown(self) -> None:
        self.runner.sequences.clear()

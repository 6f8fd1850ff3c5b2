"""Multi-rank instances: one process per rank, every rank of a TP group running the same step.

The layout and the model's groups are ``engine.model.parallel``. Ranks play one of two parts:

* a **leader** — TP rank 0 of each DP replica (instance ranks ``0, tp, 2·tp, …``) — owns an
  ``LLMEngine``: scheduler, KV block manager, KV connector. Its executor is a
  ``MultiRankExecutor``: each message (a ``StepInput``, a dummy step, a KV write, a ping,
  stop) goes to the replica's other ranks first, over a gloo *control group*
  (``broadcast_object_list``), then the leader runs it itself;
* a **follower** runs ``follow()``: receive, run, repeat. Its ``ModelRunner`` keeps its
  state from the same messages, so it computes exactly what its leader computes (logits
  are gathered to every TP rank; sampling is seeded alike), and only the leader's
  results are used.

**Lock-step across DP replicas.** With ``dp > 1`` and ``ep > 1`` the replicas meet in
every MoE layer's all-to-all, so every leader takes part in every iteration: before each
step it all-reduces (max) its step's token count over the leaders' control group — whether
anyone has work, and a bound on every pass's tokens per rank, which lets a decode-sized MoE
dispatch send counts and rows in one exchange (``engine.model.dispatch``); when any leader has
work, the idle ones run a *dummy step* (a main pass and the MTP passes with zero tokens,
``ModelRunner.dummy_step``) as DeepSeek's and SGLang's DP attention do; when none has,
all wait one tick: 2 ms after work, doubling while all stay idle up to 25 ms, so idle
replicas do not burn a core on all-reduces (at a fixed 2 ms two idle leaders used ~30% of a
core each) and a replica that gets work waits at most one tick for the others. Every step
then makes the same passes on every rank (``fixed_passes``). With ``ep == 1`` replicas never talk and each leader steps alone.

**Expert rollouts** (``engine.rebalance``). The leader relays them: ``Stage`` starts every
rank's background read of the new placement's weights; ``ReadCounts`` and ``QueryStage``
sum the replica's counts and staging results over the control group; a layer switch is
``InstallLayer`` sent before the step it precedes, so a replica's ranks switch at the same
step boundary. Across lock-step replicas (which exchange tokens in every MoE layer) the
leaders agree on the boundary in the same all-reduce that says "I have work": each offers
"(version, next layer)" once it is told to switch, and a layer switches only when every
leader offers the same one. Until then each keeps serving with the old placement.

**Timeouts.** The process group is created with ``timeout_s``: a rank that dies or hangs
makes its peers' next collective fail with an error instead of blocking for ever; the
leader's engine thread then fails, its worker reports itself not alive, and the instance
is re-created as a whole (``deploy.pool``). Idle leaders ping their followers every
``PING_S`` so a quiet follower's wait never reaches the timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from engine.args import EngineArgs
from engine.executor import rollout_state
from engine.expert_load import ExpertCounts, RolloutState
from engine.kv_connector import KVOutbox, KVPiece
from engine.model.config import ModelConfig
from engine.model.parallel import ParallelContext, ParallelLayout, backend_for, init_parallel
from engine.step import StepInput, StepOutput

log = logging.getLogger("pdserve.engine")

PING_S = 1.0  # an idle leader's followers hear from it at least this often
LOCKSTEP_TICK_S = 0.002  # lock-step leaders with nothing to do anywhere check again after this ...
LOCKSTEP_IDLE_TICK_S = 0.025  # ... doubling while all stay idle, up to this


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Where a rank sits: its instance's layout, its rank, and how the ranks find each other."""

    layout: ParallelLayout
    rank: int
    init_method: str  # e.g. "tcp://127.0.0.1:29500" (rank 0's host)
    timeout_s: float = 120.0  # a collective that does not complete in this time fails

    @property
    def leader(self) -> int:
        """The instance rank of this rank's DP replica leader."""
        return self.rank - self.rank % self.layout.tp

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def lockstep(self) -> bool:
        return self.layout.dp > 1 and self.layout.ep > 1


@dataclasses.dataclass
class RankGroups:
    spec: RankSpec
    ctx: ParallelContext
    control: Any  # gloo group of this rank's DP replica (None when tp == 1)
    leaders: Any  # gloo group of every replica's leader (None unless lock-step)


def init_rank(spec: RankSpec, device: torch.device | str) -> RankGroups:
    """Join the instance's process group and build this rank's groups; every rank calls it."""
    layout = spec.layout
    timeout = datetime.timedelta(seconds=spec.timeout_s)  # every group's, not only the default one's
    dist.init_process_group(backend_for(torch.device(device)), init_method=spec.init_method, rank=spec.rank,
                            world_size=layout.world, timeout=timeout)
    ctx = init_parallel(layout, timeout)
    control = leaders = None
    for d in range(layout.dp):  # every rank creates every group, in the same order
        ranks = list(range(d * layout.tp, (d + 1) * layout.tp))
        if layout.tp > 1:
            group = dist.new_group(ranks, backend="gloo", timeout=timeout)
            if spec.rank in ranks:
                control = group
    if spec.lockstep:
        leaders = dist.new_group([d * layout.tp for d in range(layout.dp)], backend="gloo", timeout=timeout)
    return RankGroups(spec, ctx, control, leaders)


def agree_min(groups: RankGroups, device: torch.device | str):
    """``agree_blocks`` for ``ModelRunner``: the instance's minimum of every rank's value."""

    def agree(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    return agree


# ---- control messages (leader → followers) -------------------------------------------------
@dataclasses.dataclass
class RunStep:
    step: StepInput


@dataclasses.dataclass
class DummyStep:
    ep_max_tokens: int | None = None  # as ``StepInput.ep_max_tokens``


@dataclasses.dataclass
class WriteKV:
    block_table: list[int]
    piece: KVPiece


@dataclasses.dataclass
class Ping:
    pass


@dataclasses.dataclass
class ReadCounts:
    pass


@dataclasses.dataclass
class Stage:
    version: int
    phy2log: list[list[int]]


@dataclasses.dataclass
class QueryStage:
    version: int


@dataclasses.dataclass
class InstallLayer:
    pass


@dataclasses.dataclass
class DropStage:
    pass


@dataclasses.dataclass
class Stop:
    pass


def _runner(args: EngineArgs, cfg: ModelConfig, groups: RankGroups, outbox: KVOutbox | None):
    from engine.model_runner import ModelRunner, resolve_device

    device = resolve_device(args.device)
    return ModelRunner(args, cfg, outbox, parallel=groups.ctx, agree_blocks=agree_min(groups, device),
                       fixed_passes=groups.spec.lockstep)


class MultiRankExecutor:
    """A leader's executor (see the module docstring). ``needs_ticks``: the engine loop must call
    ``step()`` (hence ``idle()``) even without work, for lock-step and pings."""

    needs_ticks = True

    def __init__(self, args: EngineArgs, cfg: ModelConfig, outbox: KVOutbox | None, groups: RankGroups):
        if not groups.spec.is_leader:
            raise ValueError(f"rank {groups.spec.rank} is not a leader; followers run follow()")
        self.groups = groups
        self.runner = _runner(args, cfg, groups, outbox)
        self.num_blocks = self.runner.num_blocks
        self.num_cache_layers = self.runner.model.num_cache_layers
        self.num_computed_layers = self.runner.num_computed_layers
        self.tick_s = LOCKSTEP_TICK_S if groups.spec.lockstep else PING_S / 2
        self.busy_elsewhere = False  # lock-step: another replica had work in the last iteration
        self._last_sent = time.monotonic()

    def _send(self, message: Any) -> None:
        if self.groups.control is not None:
            dist.broadcast_object_list([message], src=self.groups.spec.leader, group=self.groups.control)
            self._last_sent = time.monotonic()

    def _sync(self, tokens: int) -> int:
        """Before a step with ``tokens`` here (0: none): the most tokens any replica runs (0: no replica
        has work), and the expert layer switch, if one is due (see the module docstring)."""
        experts = self.runner.experts
        code = experts.switch_code()
        if self.groups.leaders is None:
            agreed = code > 0
        else:
            t = torch.tensor([tokens, code, -code], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups.leaders)
            tokens = int(t[0])
            agreed = code > 0 and int(t[1]) == code and -int(t[2]) == code  # max == min: all offer the same
        if agreed:
            self._send(InstallLayer())
            experts.install_next()
        return tokens

    def execute(self, step: StepInput) -> StepOutput:
        most = self._sync(max(step.num_tokens, 1))
        if self.groups.spec.lockstep:
            step.ep_max_tokens = most
        self.busy_elsewhere = False
        self._tick(busy=True)
        self._send(RunStep(step))
        return self.runner.execute(step)

    def idle(self) -> None:
        """Nothing scheduled here: in lock-step, a dummy step if another replica works; else a ping when due."""
        if self.groups.spec.lockstep or self.runner.experts.switching:
            most = self._sync(0)
            self.busy_elsewhere = most > 0
            self._tick(self.busy_elsewhere)
            if self.groups.spec.lockstep and self.busy_elsewhere:
                self._send(DummyStep(most))
                self.runner.dummy_step(most)
                return
        if time.monotonic() - self._last_sent >= PING_S:
            self._send(Ping())

    def _tick(self, busy: bool) -> None:
        """Lock-step: the idle tick restarts at ``LOCKSTEP_TICK_S`` after any work and doubles while
        every replica stays idle."""
        if self.groups.spec.lockstep:
            self.tick_s = LOCKSTEP_TICK_S if busy else min(2 * self.tick_s, LOCKSTEP_IDLE_TICK_S)

    def read_kv(self, seq_id: str, block_table: list[int], num_tokens: int) -> KVPiece:
        return self.runner.kv_worker.read(seq_id, block_table, 0, num_tokens)

    def write_kv(self, block_table: list[int], piece: KVPiece) -> None:
        self._send(WriteKV(block_table, piece))
        self.runner.kv_worker.write(block_table, piece)

    # ---- experts (engine.rebalance) ---------------------------------------------------------
    def expert_counts(self) -> ExpertCounts | None:
        experts = self.runner.experts
        if not experts.num_layers:
            return None
        self._send(ReadCounts())
        total = _replica_sum(experts.counts(), self.groups)
        return ExpertCounts(experts.installed_version, *experts.counts_split(total))

    def stage_experts(self, version: int, phy2log: list[list[int]]) -> None:
        self.runner.experts.stage(version, phy2log)  # checks the placement before the others hear of it
        self._send(Stage(version, phy2log))

    def rollout_state(self) -> RolloutState:
        experts = self.runner.experts
        self._send(QueryStage(experts.version))
        staged, failed, nbytes = _replica_staging(experts, experts.version, self.groups)
        error = experts.error or ("staging failed on another rank of this replica (see its log)" if failed else None)
        return rollout_state(experts, staged, error, nbytes)

    def switch_experts(self, version: int) -> None:
        self.runner.experts.begin_switch(version)  # the layers switch in _sync, one per step boundary

    def abort_rollout(self) -> None:
        self._send(DropStage())
        self.runner.experts.drop()

    def shutdown(self) -> None:
        self._send(Stop())
        self.runner.sequences.clear()


def _replica_sum(t: torch.Tensor, groups: RankGroups) -> torch.Tensor:
    if groups.control is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=groups.control)
    return t


def _replica_staging(experts, version: int, groups: RankGroups) -> tuple[bool, bool, int]:
    """(every rank staged ``version``, some rank failed, bytes staged over the replica)."""
    flags = torch.tensor([-int(experts.is_staged(version)), int(experts.error is not None)], dtype=torch.int64)
    nbytes = torch.tensor([experts.staged_bytes], dtype=torch.int64)
    if groups.control is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=groups.control)
        dist.all_reduce(nbytes, op=dist.ReduceOp.SUM, group=groups.control)
    return flags[0].item() == -1, bool(flags[1].item()), int(nbytes.item())


def follow(args: EngineArgs, cfg: ModelConfig, groups: RankGroups, on_ready=None) -> None:
    """A follower rank, until its leader says stop (or a collective fails: the exception propagates)."""
    if groups.spec.is_leader:
        raise ValueError(f"rank {groups.spec.rank} leads its replica; it runs an engine, not follow()")
    runner = _runner(args, cfg, groups, outbox=None)
    if on_ready is not None:
        on_ready(runner)
    src = groups.spec.leader
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=groups.control)
        message = box[0]
        if isinstance(message, RunStep):
            runner.execute(message.step)
        elif isinstance(message, DummyStep):
            runner.dummy_step(message.ep_max_tokens)
        elif isinstance(message, WriteKV):
            runner.kv_worker.write(message.block_table, message.piece)
        elif isinstance(message, InstallLayer):
            runner.experts.install_next()
        elif isinstance(message, ReadCounts):
            _replica_sum(runner.experts.counts(), groups)
        elif isinstance(message, Stage):
            try:
                runner.experts.stage(message.version, message.phy2log)
            except (RuntimeError, ValueError) as e:  # reported to the leader by the next QueryStage
                runner.experts.error = f"{type(e).__name__}: {e}"
        elif isinstance(message, QueryStage):
            _replica_staging(runner.experts, message.version, groups)
        elif isinstance(message, DropStage):
            runner.experts.drop()
        elif isinstance(message, Stop):
            return
        elif not isinstance(message, Ping):
            raise TypeError(f"follower {groups.spec.rank}: unexpected control message {type(message).__name__}")


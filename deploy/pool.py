"""Pools of worker actors: one pool per role, ``instances`` engine instances in each.

An instance of one rank is one actor named ``<role>-<i>`` (namespace ``pdserve``),
created with ``max_restarts`` so Ray restarts a dead worker under the same name
(in-flight calls fail; the router notices and routes around it).

An instance of ``tp × dp`` ranks (``parallel`` in the pools YAML) is one actor per
rank, named ``<role>-<i>.<rank>``, in a placement group of its own (``PACK``: one
node when it fits), joined by one torch.distributed group (gloo on CPU, NCCL on
CUDA; ``engine.multirank``). Each DP replica's leader (ranks ``0, tp, 2·tp, …``) is
a worker the router sees — a request lands on exactly one of them, picked by the
router's decode/prefill policy like any worker; its followers only follow. The
ranks cannot rejoin a process group one by one, so they run without Ray restarts:
a watchdog thread (``start_watchdog``) asks every rank for its ``rank_info`` and,
when one is dead or its engine thread failed (a peer died, a collective timed out),
kills the whole instance and creates it again under the same names; the router's
health loop finds the new incarnation.

Every worker frees what its router stopped touching after ``lease_s`` (``deploy.worker``);
a pool's ``lease_s`` defaults to ``default_lease_s(router config)``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from deploy.config import DeployConfig, PoolConfig
from deploy.contract import NAMESPACE, RankInfo, worker_name
from deploy.worker import actor_classes

log = logging.getLogger("pdserve.deploy")


def default_lease_s(router: dict[str, Any]) -> float:
    """Three times the longest a live router goes without touching a decoding sequence
    (``poll_wait_s + stall_timeout_s``): ~31 s with the router's defaults."""
    from router.pd_flow import RouterConfig

    cfg = RouterConfig.from_dict(router)
    return 3 * (cfg.poll_wait_s + cfg.stall_timeout_s)


@dataclasses.dataclass
class Instance:
    index: int
    actors: dict[str, Any]  # rank name -> actor handle, in rank order
    placement_group: Any = None
    restarts: int = 0


class Pool:
    def __init__(self, config: PoolConfig, engine_args: dict[str, Any], transfer_timeout_s: float = 30.0,
                 prefill_timeout_s: float = 120.0, ready_timeout_s: float = 300.0,
                 collective_timeout_s: float = 120.0, lease_s: float | None = None):
        self.config = config
        self.role = config.role
        self.engine_args = engine_args
        self.transfer_timeout_s = transfer_timeout_s
        self.prefill_timeout_s = prefill_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.collective_timeout_s = collective_timeout_s
        self.lease_s = lease_s if lease_s is not None else default_lease_s({})
        self.instances: dict[int, Instance] = {}
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def from_deploy(cls, cfg: DeployConfig, role: str) -> "Pool":
        r = cfg.router
        return cls(cfg.pools[role], cfg.engine_args(role), float(r.get("transfer_timeout_s", 30.0)),
                   float(r.get("prefill_timeout_s", 120.0)),
                   collective_timeout_s=float(r.get("collective_timeout_s", 120.0)),
                   lease_s=cfg.pools[role].lease_s or default_lease_s(r))

    @property
    def layout(self):
        return self.config.parallel

    @property
    def names(self) -> list[str]:
        """The workers the router talks to: every instance's DP replica leaders."""
        par = self.layout
        if par.world == 1:
            return [worker_name(self.role, i) for i in range(self.config.instances)]
        return [worker_name(self.role, i, d * par.tp) for i in range(self.config.instances) for d in range(par.dp)]

    @property
    def actors(self) -> dict[str, Any]:
        return {n: a for inst in self.instances.values() for n, a in inst.actors.items()}

    def check_model(self) -> None:
        """Raise ValueError when the model cannot be split this way (heads, vocab, experts per rank)."""
        from engine.checkpoint.loader import load_config
        from engine.model.parallel import ParallelLayout

        par = self.layout
        ParallelLayout(par.tp, par.sp, par.dp, par.ep, par.num_redundant_experts).check_model(
            load_config(self.engine_args["model"]))

    def start(self) -> list[str]:
        """Create every instance and wait until each has loaded its model."""
        self.check_model()
        for i in range(self.config.instances):
            self.start_instance(i)
        return self.names

    def start_instance(self, index: int) -> None:
        """(Re-)create instance ``index`` under its names and wait until it is ready."""
        import ray

        with self._lock:
            self._kill(index)
            par = self.layout
            if par.world == 1:
                actor = self._create(worker_name(self.role, index), None, self.config.max_restarts)
                self.instances[index] = Instance(index, {worker_name(self.role, index): actor})
                ray.get(actor.info.remote(), timeout=self.ready_timeout_s)
                return
            from ray.util.placement_group import placement_group

            cpus = max(self.config.num_cpus, 0.01)
            pg = placement_group([{"CPU": cpus}] * par.world, strategy="PACK")
            ray.get(pg.ready(), timeout=self.ready_timeout_s)
            layout = {"tp": par.tp, "sp": par.sp, "dp": par.dp, "ep": par.ep,
                      "num_redundant_experts": par.num_redundant_experts}
            actors = {}
            for rank in range(par.world):
                name = worker_name(self.role, index, rank)
                spec = {"layout": layout, "rank": rank, "threads": max(1, int(self.config.num_cpus))}
                actors[name] = self._create(name, spec, 0, pg, rank)
            inst = Instance(index, actors, pg)
            self.instances[index] = inst
            first = next(iter(actors.values()))
            init = ray.get(first.rendezvous.remote(), timeout=self.ready_timeout_s)
            ray.get([a.setup.remote(init, self.collective_timeout_s) for a in actors.values()],
                    timeout=self.ready_timeout_s)
            log.info("%s instance %d ready: %d ranks (tp=%d, sp=%s, dp=%d, ep=%d, %d redundant experts)",
                     self.role, index, par.world, par.tp, par.sp, par.dp, par.ep, par.num_redundant_experts)

    def _create(self, name: str, parallel: dict | None, max_restarts: int, pg: Any = None, bundle: int = 0) -> Any:
        options: dict[str, Any] = dict(name=name, namespace=NAMESPACE, max_restarts=max_restarts, max_task_retries=0,
                                       num_cpus=self.config.num_cpus, max_concurrency=1000)
        if pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options.update(num_cpus=max(self.config.num_cpus, 0.01), scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle))
        return actor_classes()[self.role].options(**options).remote(
            name, self.engine_args, self.config.cpu_affinity, self.transfer_timeout_s, self.prefill_timeout_s,
            lease_s=self.lease_s, parallel=parallel)

    def _kill(self, index: int) -> None:
        """Make sure no actor of instance ``index`` is alive (a dead name may linger) and drop its group."""
        import ray

        inst = self.instances.pop(index, None)
        par = self.layout
        names = ([worker_name(self.role, index)] if par.world == 1
                 else [worker_name(self.role, index, r) for r in range(par.world)])
        for name in names:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:  # no such actor (any more)
                pass
        if inst is not None and inst.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(inst.placement_group)

    # ---- health of multi-rank instances ---------------------------------------------------
    def rank_status(self, timeout_s: float = 5.0) -> list[RankInfo]:
        """Every rank's ``RankInfo`` (a rank that does not answer: alive False, the error)."""
        import ray

        out = []
        for inst in list(self.instances.values()):
            for name, actor in inst.actors.items():
                try:
                    out.append(ray.get(actor.rank_info.remote(), timeout=timeout_s))
                except Exception as e:  # dead, unreachable, timed out
                    rank = int(name.rsplit(".", 1)[1]) if "." in name else 0
                    out.append(RankInfo(name, rank, False, False, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        return out

    def watch_once(self) -> list[int]:
        """Re-create every multi-rank instance with a rank that is dead or failed; the indices re-created."""
        if self.layout.world == 1:
            return []  # Ray restarts single-rank workers itself (max_restarts)
        broken = sorted({int(r.name.rsplit(".", 1)[0].rsplit("-", 1)[1]) for r in self.rank_status() if not r.alive})
        for index in broken:
            if self._stopping.is_set():
                break
            log.warning("%s instance %d has a failed rank; re-creating the whole instance", self.role, index)
            restarts = self.instances[index].restarts + 1 if index in self.instances else 1
            try:
                self.start_instance(index)
                self.instances[index].restarts = restarts
            except Exception:  # the next round tries again
                log.exception("%s instance %d could not be re-created", self.role, index)
        return broken

    def start_watchdog(self, interval_s: float = 2.0) -> None:
        def run() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.watch_once()
                except Exception:  # never let the watchdog die
                    log.exception("watchdog round failed")

        if self.layout.world > 1 and self._watchdog is None:
            self._watchdog = threading.Thread(target=run, name=f"pdserve-watchdog-{self.role}", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=30)
        for index in list(self.instances):
            try:
                self._kill(index)
            except Exception:  # already gone: nothing to stop
                log.debug("%s instance %d already gone", self.role, index)
        self.instances.clear()

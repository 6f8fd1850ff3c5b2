"""Pools of worker actors: one pool per role, ``instances`` engine instances in each.

An instance is one rank today (``ParallelConfig.ranks == 1``); an instance of
``tp × dp`` ranks (a placement group, one torch.distributed group per instance)
is the next step, and ``Pool.start`` refuses it with ``NotImplementedError`` rather
than silently running one rank. Actors are named ``<role>-<i>`` in namespace
``pdserve`` and created with ``max_restarts``, so Ray restarts a dead worker under
the same name (in-flight calls fail; the router notices and routes around it).
``start_instance(i)`` re-creates one that is gone for good (killed with
``no_restart``, restarts used up).
"""

from __future__ import annotations

import logging
from typing import Any

from deploy.config import DeployConfig, PoolConfig
from deploy.contract import NAMESPACE
from deploy.worker import actor_classes

log = logging.getLogger("pdserve.deploy")


def worker_name(role: str, index: int) -> str:
    return f"{role}-{index}"


class Pool:
    def __init__(self, config: PoolConfig, engine_args: dict[str, Any], transfer_timeout_s: float = 30.0,
                 prefill_timeout_s: float = 120.0, ready_timeout_s: float = 300.0):
        self.config = config
        self.role = config.role
        self.engine_args = engine_args
        self.transfer_timeout_s = transfer_timeout_s
        self.prefill_timeout_s = prefill_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.actors: dict[str, Any] = {}

    @classmethod
    def from_deploy(cls, cfg: DeployConfig, role: str) -> "Pool":
        return cls(cfg.pools[role], cfg.engine_args(role), float(cfg.router.get("transfer_timeout_s", 30.0)),
                   float(cfg.router.get("prefill_timeout_s", 120.0)))

    @property
    def names(self) -> list[str]:
        return [worker_name(self.role, i) for i in range(self.config.instances)]

    def check_supported(self) -> None:
        par = self.config.parallel
        if par.ranks > 1:
            raise NotImplementedError(
                f"pools.{self.role}: an instance of {par.ranks} ranks (tp={par.tp}, dp={par.dp}, ep={par.ep}) is not "
                f"supported yet; multi-rank pools arrive with TP/EP over torch.distributed. Use tp: 1, dp: 1, ep: 1 "
                f"and scale with instances.")

    def start(self) -> list[str]:
        """Create every instance's actor and wait until each has loaded its model."""
        self.check_supported()
        import ray

        for i in range(self.config.instances):
            self._create(i)
        names = list(self.actors)
        ray.get([self.actors[n].info.remote() for n in names], timeout=self.ready_timeout_s)
        return names

    def start_instance(self, index: int) -> Any:
        """(Re-)create instance ``index`` under its name and wait until it is ready."""
        import ray

        name = worker_name(self.role, index)
        try:  # a dead name may linger; make sure it is gone before re-using it
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
        actor = self._create(index)
        ray.get(actor.info.remote(), timeout=self.ready_timeout_s)
        return actor

    def _create(self, index: int) -> Any:
        cls = actor_classes()[self.role]
        name = worker_name(self.role, index)
        actor = cls.options(name=name, namespace=NAMESPACE, max_restarts=self.config.max_restarts,
                            max_task_retries=0, num_cpus=self.config.num_cpus, max_concurrency=1000).remote(
            name, self.engine_args, self.config.cpu_affinity, self.transfer_timeout_s, self.prefill_timeout_s)
        self.actors[name] = actor
        return actor

    def stop(self) -> None:
        import ray

        for name, actor in list(self.actors.items()):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone: nothing to stop
                log.debug("%s already gone", name)
        self.actors.clear()

"""The deployment file of ``pdserve up --config FILE`` (YAML), parsed and validated.

    model: models/pdserve-mini          # checkpoint directory, shared by every pool
    served_model_name: pdserve-mini     # optional
    engine: {dtype: bfloat16}           # EngineArgs fields for every pool (role is set per pool)
    ray: {address: null, num_cpus: 2, object_store_memory_mb: 512}
    router: {host: 127.0.0.1, port: 8000, grpc_port: null, api_key: null, max_resumes: 2, eplb: {...},
             ...RouterConfig fields}
    pools:
      prefill:
        instances: 1                    # independent engine instances (each a pool unit)
        parallel: {tp: 1, sp: false, dp: 1, ep: 1, num_redundant_experts: 0}
        engine: {max_num_batched_tokens: 4096}   # per-pool EngineArgs overrides
        resources: {num_cpus: 0, cpu_affinity: [0]}
        max_restarts: 3
        lease_s: 30                     # free what the router stopped touching (default:
                                        # 3 × (router.poll_wait_s + router.stall_timeout_s))
      decode: {...}

One instance of a pool is ``tp × dp`` ranks (attention TP groups × data-parallel
attention replicas); MoE experts are spread over all of them, so ``ep`` must equal
``tp × dp`` (or be 1: experts replicated), and ``(n_routed_experts +
num_redundant_experts)`` must divide evenly by ``ep`` when the model's config.json is
readable. ``sp`` (sequence parallelism inside the TP group) needs ``tp > 1``. The layout is
``engine.model.parallel.ParallelLayout`` (its rules are the ones checked here);
``deploy.pool.Pool`` runs an instance of ``tp × dp`` ranks as one actor per rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import yaml

from deploy.contract import ROLES
from engine.args import EngineArgs
from engine.model.parallel import ParallelLayout
from router.experts import EPLBConfig



class DeployConfigError(ValueError):
    """The deployment file is wrong; the message names the key (``pools.decode.parallel.ep: ...``)."""


@dataclasses.dataclass
class PoolConfig:
    role: str
    instances: int = 1
    parallel: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_cpus: float = 0.0
    cpu_affinity: list[int] | None = None
    max_restarts: int = 3
    lease_s: float | None = None  # None: deploy.pool.default_lease_s


@dataclasses.dataclass
class DeployConfig:
    model: str
    served_model_name: str | None
    engine: dict[str, Any]
    pools: dict[str, PoolConfig]
    router: dict[str, Any]
    ray: dict[str, Any]
    source: str = "<dict>"

    def engine_args(self, role: str) -> dict[str, Any]:
        """EngineArgs fields (a dict, so Ray ships it cheaply) for one pool's workers."""
        fields = {**self.engine, **self.pools[role].engine, "model": self.model, "role": role}
        if self.served_model_name:
            fields["served_model_name"] = self.served_model_name
        return fields


_ROUTER_KEYS = {"host", "port", "grpc_port", "api_key", "max_body_bytes", "poll_wait_s", "prefill_timeout_s", "reserve_timeout_s",
                "collective_timeout_s",
                "transfer_timeout_s", "stall_timeout_s", "health_interval_s", "health_timeout_s",
                "max_prefill_retries", "max_resumes", "affinity_slack_tokens", "affinity_entries", "eplb",
                "max_in_flight"}
_RAY_KEYS = {"address", "num_cpus", "object_store_memory_mb"}
_POOL_KEYS = {"instances", "parallel", "engine", "resources", "max_restarts", "lease_s"}
_PARALLEL_KEYS = {f.name for f in dataclasses.fields(ParallelLayout)}
_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineArgs)} - {"model", "role", "served_model_name"}


def load_deploy_config(path: str) -> DeployConfig:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise DeployConfigError(f"cannot read {path}: {e}") from e
    except yaml.YAMLError as e:
        raise DeployConfigError(f"{path} is not valid YAML: {e}") from e
    base = os.path.dirname(os.path.abspath(path))
    return parse_config(raw, source=path, base_dir=base)


def parse_config(raw: Any, source: str = "<dict>", base_dir: str | None = None) -> DeployConfig:
    """Validate a parsed YAML document; relative model paths resolve against ``base_dir`` then the cwd."""
    _mapping(raw, "the file")
    _known(raw, {"model", "served_model_name", "engine", "pools", "router", "ray"}, "")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise DeployConfigError("model: a checkpoint directory is required")
    if not os.path.isabs(model) and not os.path.isdir(model) and base_dir:
        candidate = os.path.normpath(os.path.join(base_dir, model))
        model = candidate if os.path.isdir(candidate) else model
    engine = _mapping(raw.get("engine", {}), "engine")
    _known(engine, _ENGINE_KEYS, "engine.")
    router = _mapping(raw.get("router", {}), "router")
    _known(router, _ROUTER_KEYS, "router.")
    try:
        EPLBConfig.from_dict(_mapping(router.get("eplb", {}), "router.eplb"))
    except (TypeError, ValueError) as e:
        raise DeployConfigError(f"router.eplb: {e}") from None
    ray_cfg = _mapping(raw.get("ray", {}), "ray")
    _known(ray_cfg, _RAY_KEYS, "ray.")
    pools_raw = _mapping(raw.get("pools"), "pools")
    _known(pools_raw, set(ROLES), "pools.")
    missing = [r for r in ROLES if r not in pools_raw]
    if missing:
        raise DeployConfigError(f"pools: a disaggregated deployment needs both pools, missing {', '.join(missing)}")
    pools = {role: _pool(role, pools_raw[role]) for role in ROLES}
    cfg = DeployConfig(model=model, served_model_name=raw.get("served_model_name"), engine=engine, pools=pools,
                       router=router, ray=ray_cfg, source=source)
    for role in ROLES:  # EngineArgs' own checks, per pool
        try:
            EngineArgs(**cfg.engine_args(role))
        except (TypeError, ValueError) as e:
            raise DeployConfigError(f"pools.{role}.engine: {e}") from e
    _check_experts(cfg)
    return cfg


def _pool(role: str, raw: Any) -> PoolConfig:
    where = f"pools.{role}"
    raw = _mapping(raw, where)
    _known(raw, _POOL_KEYS, where + ".")
    instances = _int(raw.get("instances", 1), f"{where}.instances", minimum=1)
    par_raw = _mapping(raw.get("parallel", {}), f"{where}.parallel")
    _known(par_raw, _PARALLEL_KEYS, f"{where}.parallel.")
    sp = par_raw.get("sp", False)
    if not isinstance(sp, bool):
        raise DeployConfigError(f"{where}.parallel.sp: must be true or false, got {sp!r}")
    try:  # the layout's own rules (engine.model.parallel): sp needs tp > 1, ep is 1 or tp × dp, ...
        par = ParallelLayout(
            tp=_int(par_raw.get("tp", 1), f"{where}.parallel.tp", minimum=1), sp=sp,
            dp=_int(par_raw.get("dp", 1), f"{where}.parallel.dp", minimum=1),
            ep=_int(par_raw.get("ep", 1), f"{where}.parallel.ep", minimum=1),
            num_redundant_experts=_int(par_raw.get("num_redundant_experts", 0),
                                       f"{where}.parallel.num_redundant_experts", minimum=0))
    except ValueError as e:
        if isinstance(e, DeployConfigError):
            raise
        raise DeployConfigError(f"{where}.parallel.{e}") from e
    engine = _mapping(raw.get("engine", {}), f"{where}.engine")
    _known(engine, _ENGINE_KEYS, f"{where}.engine.")
    res = _mapping(raw.get("resources", {}), f"{where}.resources")
    _known(res, {"num_cpus", "cpu_affinity"}, f"{where}.resources.")
    num_cpus = res.get("num_cpus", 0)
    if not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or num_cpus < 0:
        raise DeployConfigError(f"{where}.resources.num_cpus: must be a number >= 0, got {num_cpus!r}")
    affinity = res.get("cpu_affinity")
    if affinity is not None and (not isinstance(affinity, list) or not affinity
                                 or not all(isinstance(c, int) and c >= 0 for c in affinity)):
        raise DeployConfigError(f"{where}.resources.cpu_affinity: must be a non-empty list of CPU ids, got {affinity!r}")
    lease = raw.get("lease_s")
    if lease is not None and (not isinstance(lease, (int, float)) or isinstance(lease, bool) or lease <= 0):
        raise DeployConfigError(f"{where}.lease_s: must be a number of seconds > 0, got {lease!r}")
    return PoolConfig(role=role, instances=instances, parallel=par, engine=engine, num_cpus=float(num_cpus),
                      cpu_affinity=affinity,
                      max_restarts=_int(raw.get("max_restarts", 3), f"{where}.max_restarts", minimum=-1),
                      lease_s=None if lease is None else float(lease))


def _check_experts(cfg: DeployConfig) -> None:
    """(routed + redundant experts) % ep == 0, when the model's config.json can be read here."""
    try:
        with open(os.path.join(cfg.model, "config.json"), encoding="utf-8") as f:
            routed = json.load(f).get("n_routed_experts")
    except (OSError, ValueError):
        return
    if not isinstance(routed, int):
        return
    for role, pool in cfg.pools.items():
        par = pool.parallel
        total = routed + par.num_redundant_experts
        if par.ep > 1 and total % par.ep:
            raise DeployConfigError(f"pools.{role}.parallel: {routed} routed + {par.num_redundant_experts} redundant experts "
                              f"= {total} do not divide evenly over ep={par.ep} ranks")


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DeployConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _known(raw: dict, allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise DeployConfigError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _int(value: Any, where: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DeployConfigError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value

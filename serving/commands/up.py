"""``pdserve up | down | status``: a disaggregated deployment on Ray.

    pdserve up --config FILE [--address ADDR] [--state-file PATH] [--log-level info]
    pdserve status [--state-file PATH] [--json] [--api-key KEY]
    pdserve down [--state-file PATH] [--timeout 60]

``up``, in order: parse and validate the deployment file (``deploy.config``), load the tokenizer,
bind the router's port, start a local Ray instance or join ``--address`` (or the
file's ``ray.address``), start the prefill pool then the decode pool
(``deploy.pool.Pool``: named actors ``prefill-<i>``/``decode-<i>`` in namespace
``pdserve``, or ``<role>-<i>.<rank>`` per rank of a parallel instance; each rank loads its
share of the model), start the router (``router.app`` over
``router.pd_flow.PDClient``), write the state file (pid, router URL, Ray address,
worker names) and print ``pdserve: router at URL (...)``. It stays in the
foreground; SIGINT/SIGTERM (or ``pdserve down``) stop the router, then the pools,
then Ray if ``up`` started it, and remove the state file.

``status`` asks the router's ``GET /pools`` (health, last error, load per worker, every
rank with its weights) and ``GET /expert_load`` (per pool: expert balancedness over the
load window, placement version, last rebalance);
``down`` sends SIGTERM to the ``up`` process named in the state file and waits for it
to exit. The state file defaults to ``$PDSERVE_STATE_DIR/up.json`` (else
``~/.cache/pdserve/up.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from serving.cli import CLIError

logger = logging.getLogger("pdserve.up")


def default_state_file() -> str:
    base = os.environ.get("PDSERVE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    return os.path.join(base, "up.json")


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="start prefill/decode pools on Ray and the PD router",
                               description=__doc__.split("\n\n")[0])
    up.add_argument("--config", required=True, help="deployment YAML (see deploy/examples/)")
    up.add_argument("--address", default=None, help="join this Ray cluster (default: the file's ray.address, "
                                                    "else start a local Ray instance)")
    up.add_argument("--state-file", default=None, help="where to record the deployment (default: %(default)s)")
    up.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    up.set_defaults(func=run_up)
    status = subparsers.add_parser("status", help="pools, health and load of a running deployment")
    status.add_argument("--state-file", default=None)
    status.add_argument("--json", action="store_true", help="print the router's /pools and /expert_load as JSON")
    status.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                        help="the router's API key, if it has one (default: $PDSERVE_API_KEY)")
    status.set_defaults(func=run_status)
    down = subparsers.add_parser("down", help="stop the deployment `pdserve up` started")
    down.add_argument("--state-file", default=None)
    down.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
    down.set_defaults(func=run_down)


# ---- up --------------------------------------------------------------------------------
def run_up(ns: argparse.Namespace) -> int:
    from deploy.config import DeployConfigError, load_deploy_config
    from deploy.pool import Pool
    from serving.commands.serve import _bind, _configure_logging, _load_tokenizer

    _configure_logging(ns.log_level)
    try:
        cfg = load_deploy_config(ns.config)
    except DeployConfigError as e:
        raise CLIError(f"{ns.config}: {e}") from e
    pools = {role: Pool.from_deploy(cfg, role) for role in ("prefill", "decode")}
    if not os.path.isdir(cfg.model):
        raise CLIError(f"model directory {cfg.model!r} does not exist")
    for role, pool in pools.items():
        try:
            pool.check_model()
        except ValueError as e:
            raise CLIError(f"pools.{role}.parallel: {e}") from e
    state_file = ns.state_file or default_state_file()
    if _alive(_read_state(state_file, missing_ok=True)):
        raise CLIError(f"a deployment is already up (state file {state_file}); run `pdserve down` first")
    tokenizer = _load_tokenizer(cfg.model)
    host, port = cfg.router.get("host", "127.0.0.1"), int(cfg.router.get("port", 8000))
    sock = _bind(host, port)
    try:
        with _ray(ns.address or cfg.ray.get("address"), cfg, host) as address:
            try:
                for pool in pools.values():
                    par = pool.config.parallel
                    print(f"pdserve: starting {pool.role} pool ({pool.config.instances} instance(s) of {par.world} "
                          f"rank(s): tp={par.tp} sp={par.sp} dp={par.dp} ep={par.ep} "
                          f"redundant experts={par.num_redundant_experts})", flush=True)
                    pool.start()
                    pool.start_watchdog()
                return asyncio.run(_serve_router(cfg, pools, tokenizer, sock, state_file, address, ns))
            except Exception as e:
                if isinstance(e, CLIError):
                    raise
                logger.debug("up failed", exc_info=True)
                raise CLIError(f"cannot start the deployment: {type(e).__name__}: {str(e).splitlines()[0]}") from e
            finally:
                for pool in pools.values():
                    pool.stop()
    finally:
        sock.close()


@contextlib.contextmanager
def _ray(address: str | None, cfg: Any, host: str) -> Iterator[str]:
    """Join ``address`` or start a local instance (stopped on exit); yields the GCS address."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from deploy.contract import NAMESPACE

    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(address="local", include_dashboard=False, num_cpus=cfg.ray.get("num_cpus"))
        if cfg.ray.get("object_store_memory_mb"):
            kwargs["object_store_memory"] = int(cfg.ray["object_store_memory_mb"]) * 1024 * 1024
        if host in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"
    try:
        context = ray.init(**kwargs)
    except Exception as e:
        raise CLIError(f"cannot {'join Ray at ' + address if address else 'start Ray'}: {e}") from e
    try:
        yield context.address_info.get("gcs_address", address or "")
    finally:
        ray.shutdown()


async def _serve_router(cfg: Any, pools: dict, tokenizer: Any, sock: Any, state_file: str, address: str,
                        ns: argparse.Namespace) -> int:
    from router.app import build_router_app
    from router.pd_flow import PDClient, RouterConfig
    from serving.commands.serve import _url, run_uvicorn
    from serving.openai_api import DEFAULT_MAX_BODY_BYTES

    client = PDClient(pools["prefill"].names, pools["decode"].names, RouterConfig.from_dict(cfg.router))
    await client.start()
    app = build_router_app(client, tokenizer, api_key=cfg.router.get("api_key") or os.environ.get("PDSERVE_API_KEY"),
                           max_body_bytes=int(cfg.router.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                           ranks=lambda: {role: pool.rank_status() for role, pool in pools.items()})
    url = _url(sock)
    state = {"pid": os.getpid(), "url": url, "ray_address": address, "config": os.path.abspath(ns.config),
             "workers": {role: pool.names for role, pool in pools.items()}, "model": client.model_name}
    os.makedirs(os.path.dirname(os.path.abspath(state_file)), exist_ok=True)
    with open(state_file, "w", encoding="utf-8") as f:
        json.dump(state, f)
    ready = (f"pdserve: router at {url} serving {client.model_name} (OpenAI API under /v1; prefill: "
             f"{len(pools['prefill'].names)}, decode: {len(pools['decode'].names)} worker(s); Ray at {address})")
    grpc_port = cfg.router.get("grpc_port")
    grpc_server = None
    if grpc_port is not None:  # the dev server's gRPC API, over the router's client
        from serving.commands.serve import _start_grpc

        grpc_server = await _start_grpc(client, tokenizer, app.state.metrics, cfg.router.get("host", "127.0.0.1"),
                                        int(grpc_port))
    try:
        await run_uvicorn(app, sock, ns.log_level, 10.0, ready)  # the pools stop after the router
    finally:
        if grpc_server is not None:
            await grpc_server.stop(5.0)
        await client.shutdown()
        with contextlib.suppress(OSError):
            if _read_state(state_file, missing_ok=True).get("pid") == os.getpid():
                os.remove(state_file)
    return 0


# ---- status / down ----------------------------------------------------------------------------
def _read_state(path: str, missing_ok: bool = False) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise CLIError(f"no deployment recorded in {path} (is `pdserve up` running?)") from None
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {e}") from e


def _alive(state: dict) -> bool:
    pid = state.get("pid")
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def run_status(ns: argparse.Namespace) -> int:
    path = ns.state_file or default_state_file()
    state = _read_state(path)
    if not _alive(state):
        raise CLIError(f"the deployment in {path} is not running (pid {state.get('pid')} is gone)")
    pools = _get(state["url"] + "/pools", ns.api_key)
    experts = _get(state["url"] + "/expert_load", ns.api_key)
    if ns.json:
        print(json.dumps({**pools, "expert_load": experts}, indent=2))
        return 0
    print(f"router {state['url']}  model {state.get('model')}  Ray {state.get('ray_address')}  pid {state['pid']}")
    print(f"{'worker':<12} {'health':<8} {'queued tok':>10} {'running':>8} {'waiting':>8} {'kv used/total':>14}  note")
    for role in ("prefill", "decode"):
        for w in pools.get(role, []):
            load = w["load"]
            print(f"{w['name']:<12} {'up' if w['healthy'] else 'DOWN':<8} {load['queued_prompt_tokens']:>10} "
                  f"{load['num_running']:>8} {load['num_waiting']:>8} "
                  f"{str(load['kv_blocks_used']) + '/' + str(load['kv_blocks_total']):>14}  {w['last_error'] or ''}")
    ranks = pools.get("ranks", {})
    if any(ranks.values()):
        print(f"\n{'rank':<12} {'part':<9} {'state':<6} {'weights MiB':>11} {'share MiB':>10}  note")
        for role in ("prefill", "decode"):
            for r in ranks.get(role, []):
                print(f"{r['name']:<12} {'leader' if r['leader'] else 'follower':<9} {'up' if r['alive'] else 'DOWN':<6} "
                      f"{r['weight_bytes'] / 2**20:>11.1f} {r['expected_weight_bytes'] / 2**20:>10.1f}  "
                      f"{r['error'] or ''}")
    _print_experts(experts)
    return 0


def _get(url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        hint = " (pass --api-key or set PDSERVE_API_KEY)" if e.code == 401 else ""
        raise CLIError(f"the router answered {url} with {e.code}{hint}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CLIError(f"the router at {url.rsplit('/', 1)[0]} does not answer: {e}") from e


def _print_experts(view: dict) -> None:
    """Per pool: balancedness over the load window (mean and worst layer), placement, last rebalance."""
    auto = f"auto below {view['threshold']}" if view.get("auto") else "auto off"
    print(f"\nexperts ({auto}, window {view.get('window_s', 0):g} s)")
    print(f"{'pool':<8} {'balance':>8} {'worst':>6} {'placement':>10}  last rebalance")
    for role, p in view.get("pools", {}).items():
        b = [v for v in p.get("balancedness") or [] if v is not None] or None  # None: a layer no token went through
        versions = sorted({i["version"] for i in p.get("instances", {}).values()})
        last = p.get("last_rebalance")
        note = "none"
        if last:
            ago = time.time() - last.get("at", time.time())
            note = f"{last['outcome']} {ago:.0f} s ago ({last.get('reason', '')})"
        print(f"{role:<8} {'-' if b is None else format(p['balancedness_mean'], '.3f'):>8} "
              f"{'-' if b is None else format(min(b), '.3f'):>6} {','.join(map(str, versions)) or '-':>10}  {note}")


def run_down(ns: argparse.Namespace) -> int:
    path = ns.state_file or default_state_file()
    state = _read_state(path)
    pid = state.get("pid")
    if not _alive(state):
        with contextlib.suppress(OSError):
            os.remove(path)
        print(f"pdserve: nothing running (pid {pid} is gone); removed {path}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ns.timeout
    while _alive(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state):
        raise CLIError(f"pid {pid} did not stop within {ns.timeout:g} s (send SIGTERM again to skip the grace period)")
    print(f"pdserve: stopped the deployment (pid {pid})")
    return 0

"""Ray tests on loopback only.

Ray connects its processes through the machine's network interface even when told
127.0.0.1, so the Ray tests only run where loopback is the only interface. On a
machine with other interfaces, a module's ``test_suite_in_private_network_namespace``
(``rerun_in_private_netns``) re-runs that module inside a private network namespace
(``unshare -n``, then ``ip link set lo up``) and the in-place copies (marked
``in_netns``) are skipped; where no namespace can be made, it skips with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK_ONLY = {name for _, name in socket.if_nameindex()} <= {"lo"}
in_netns = pytest.mark.skipif(not LOOPBACK_ONLY, reason="Ray would use a non-loopback interface; "
                                                         "run by test_suite_in_private_network_namespace")


def rerun_in_private_netns(module_file: str, timeout_s: float) -> None:
    if LOOPBACK_ONLY:
        pytest.skip("already loopback-only: the tests run in place")
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip to make a loopback-only network namespace")
    flags = ["-n"] if os.geteuid() == 0 else ["-rn"]
    probe = subprocess.run([unshare, *flags, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.decode().strip()}")
    cmd = [unshare, *flags, "sh", "-c",
           f"ip link set lo up && exec {sys.executable} -m pytest -q -x -p no:cacheprovider {module_file}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_pools(raw_config: dict, watchdog_s: float | None = None):
    """A local Ray on 127.0.0.1 with the deployment's pools started (``deploy.pool``); stopped on exit."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from deploy.config import parse_config
    from deploy.pool import Pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 1024 * 1024, log_to_driver=False, namespace="pdserve")
    cfg = parse_config(raw_config)
    pools = {role: Pool.from_deploy(cfg, role) for role in ("prefill", "decode")}
    try:
        for pool in pools.values():
            pool.start()
            if watchdog_s is not None:
                pool.start_watchdog(watchdog_s)
        yield pools
    finally:
        for pool in pools.values():
            pool.stop()
        ray.shutdown()

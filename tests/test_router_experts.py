"""The router's expert-load bookkeeping (router/experts.py) without Ray: cumulative reports become
window deltas (baseline, restarts, placement versions, mid-switch reports), pool views, the
automatic decision, and the eplb config. The rollout itself runs end to end in
tests/test_pd_parallel.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deploy.contract import WorkerInfo, WorkerLoad
from engine.expert_load import ExpertCounts, ExpertShape
from router.experts import EPLBConfig, ExpertBalancer
from router.workers import Worker

SHAPE = ExpertShape(num_layers=2, num_logical=4, num_slots=6, num_ranks=2, num_groups=1)


class _Registry:
    def __init__(self, workers):
        self.workers = {"prefill": [], "decode": workers}

    async def pool_info(self, role):
        return [w.info for w in self.workers[role]]


def _worker(name: str) -> Worker:
    w = Worker(name, "decode", healthy=True)
    w.info = WorkerInfo(name, "decode", "m", "m", 64, [0], 16, 10, 1, instance=name.split(".")[0], experts=SHAPE)
    return w


def _counts(version: int, logical, physical) -> ExpertCounts:
    return ExpertCounts(version, np.array(logical, dtype=np.int64), np.array(physical, dtype=np.int64))


def _load(name: str, started: float, counts: ExpertCounts) -> WorkerLoad:
    return WorkerLoad(name, "decode", started_at=started, experts=counts)


def _physical(per_slot: list[int]) -> list[list[int]]:
    return [per_slot, per_slot]


def _logical(per_slot: list[int]) -> list[list[int]]:
    """Per logical expert under the default placement (slot s holds expert s % 4)."""
    out = np.zeros(4, dtype=np.int64)
    np.add.at(out, np.arange(6) % 4, per_slot)
    return [out.tolist(), out.tolist()]


def test_reports_become_window_deltas():
    a, b = _worker("decode-0.0"), _worker("decode-0.1")
    bal = ExpertBalancer(_Registry([a, b]), EPLBConfig(interval_s=1000.0, window=4))
    slots0 = [100, 100, 100, 100, 100, 100]
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(slots0), _physical(slots0))))  # baseline only
    inst = bal.instances["decode-0"]
    assert inst.window._open_log.sum() == 0
    slots1 = [130, 100, 100, 100, 100, 100]  # 30 more tokens to slot 0 (expert 0)
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(slots1), _physical(slots1))))
    assert inst.window._open_phys[0].tolist() == [30, 0, 0, 0, 0, 0]
    assert inst.window._open_log[0].tolist() == [30, 0, 0, 0]
    # the other replica of the same instance adds to the same window
    bal.observe(b, _load(b.name, 5.0, _counts(0, _logical([0] * 6), _physical([0] * 6))))
    bal.observe(b, _load(b.name, 5.0, _counts(0, _logical([0, 0, 0, 0, 10, 0]), _physical([0, 0, 0, 0, 10, 0]))))
    assert inst.window._open_phys[0].tolist() == [30, 0, 0, 0, 10, 0]
    # a restarted replica (new started_at) counts from zero: its whole report is new
    bal.observe(b, _load(b.name, 9.0, _counts(0, _logical([0, 3, 0, 0, 0, 0]), _physical([0, 3, 0, 0, 0, 0]))))
    assert inst.window._open_phys[0].tolist() == [30, 3, 0, 0, 10, 0]
    inst.window.advance()
    assert inst.window.rank_load()[0].tolist() == [33, 10]
    np.testing.assert_allclose(bal.pool_balancedness("decode"), [21.5 / 33] * 2)
    assert bal.pool_balancedness_mean("decode") == pytest.approx(21.5 / 33)
    view = bal.view()["pools"]["decode"]
    assert view["instances"]["decode-0"]["routed_tokens"] == 2 * 43
    assert view["balancedness_mean"] == pytest.approx(21.5 / 33, abs=1e-4)


def test_placement_versions_and_mid_switch_reports():
    a = _worker("decode-0.0")
    bal = ExpertBalancer(_Registry([a]), EPLBConfig(interval_s=1000.0))
    zero = [0] * 6
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(zero), _physical(zero))))
    inst = bal.instances["decode-0"]
    new = np.array([[1, 0, 2, 3, 0, 1]] * 2)
    inst.placements[1] = new
    # mid-switch: per-slot counts mean nothing, the logical ones are kept
    bal.observe(a, _load(a.name, 1.0, _counts(-1, [[5, 0, 0, 0]] * 2, [[99] * 6] * 2)))
    assert inst.window._open_phys.sum() == 0 and inst.window._open_log[0].tolist() == [5, 0, 0, 0]
    assert inst.window.version == 0
    # switched: the window moves to placement 1; its per-slot counts started with it
    bal.observe(a, _load(a.name, 1.0, _counts(1, [[5, 7, 0, 0]] * 2, [[0, 0, 0, 0, 0, 7]] * 2)))
    assert inst.window.version == 1 and (inst.phy2log == new).all()
    assert inst.window._open_phys[0].tolist() == [0, 0, 0, 0, 0, 7]
    bal.observe(a, _load(a.name, 1.0, _counts(1, [[5, 9, 0, 0]] * 2, [[0, 0, 0, 0, 0, 9]] * 2)))
    assert inst.window._open_phys[0].tolist() == [0, 0, 0, 0, 0, 9]
    assert inst.window._open_log[0].tolist() == [5, 9, 0, 0]
    # a worker without MoE layers, or without info yet, is ignored
    c = _worker("decode-1")
    c.info = None
    bal.observe(c, _load(c.name, 1.0, _counts(0, _logical(zero), _physical(zero))))
    assert "decode-1" not in bal.instances


def test_automatic_decision_needs_imbalance_tokens_and_gap():
    a = _worker("decode-0.0")
    bal = ExpertBalancer(_Registry([a]), EPLBConfig(interval_s=1000.0, threshold=0.9, min_tokens=50, min_gap_s=0))
    calls = []

    async def fake_rebalance(role, *, force=False, reason=""):
        calls.append((role, reason))
        return {"outcome": "finished"}

    bal.rebalance = fake_rebalance
    zero = [0] * 6
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(zero), _physical(zero))))
    inst = bal.instances["decode-0"]
    even = [20, 20, 20, 20, 20, 20]
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(even), _physical(even))))
    inst.window.advance()
    assert asyncio.run(bal.check("decode")) is None  # balanced
    skew = [120, 20, 20, 20, 20, 20]
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(skew), _physical(skew))))
    inst.window.advance()
    assert asyncio.run(bal.check("decode")) == {"outcome": "finished"}
    assert calls and calls[0][0] == "decode" and calls[0][1].startswith("auto: balancedness")
    bal.config.min_gap_s = 3600
    assert asyncio.run(bal.check("decode")) is None  # too soon after the last one


@pytest.mark.parametrize("bad,match", [
    ({"threshold": 0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"window": 0}, "window"),
    ({"nodes": {"decode": 0}}, "nodes"), ({"nodes": {"mixed": 2}}, "nodes"), ({"auto_": True}, "unknown"),
])
def test_eplb_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        EPLBConfig.from_dict(bad)


def test_deploy_config_checks_router_eplb(tmp_path):
    from deploy.config import DeployConfigError, parse_config

    base = {"model": str(tmp_path), "pools": {"prefill": {}, "decode": {}}}
    assert parse_config({**base, "router": {"eplb": {"threshold": 0.7, "auto": False}}})
    with pytest.raises(DeployConfigError, match="router.eplb: threshold"):
        parse_config({**base, "router": {"eplb": {"threshold": "low"}}})
    with pytest.raises(DeployConfigError, match="router.eplb: must be a mapping"):
        parse_config({**base, "router": {"eplb": [1]}})


def test_metrics_pass_promtool_and_stay_bounded():
    import shutil
    import subprocess

    from prometheus_client import CollectorRegistry, generate_latest

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH (Debian package `prometheus`)")
    a = _worker("decode-0.0")
    bal = ExpertBalancer(_Registry([a]), EPLBConfig(interval_s=1000.0))
    registry = CollectorRegistry()
    bal.attach(registry)
    zero, skew = [0] * 6, [120, 20, 20, 20, 20, 20]
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(zero), _physical(zero))))
    bal.observe(a, _load(a.name, 1.0, _counts(0, _logical(skew), _physical(skew))))
    bal.instances["decode-0"].window.advance()
    bal.rebalances.labels("decode", "started").inc()
    bal.layer_pause.labels("decode").observe(0.002)
    text = generate_latest(registry).decode()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    series = [line for line in text.splitlines() if line.startswith(("pdserve_expert_balancedness{",
                                                                      "pdserve_expert_tokens_total{"))]
    assert len(series) == 2 * SHAPE.num_layers  # per pool and layer: not per expert or slot
    assert 'pdserve_expert_balancedness{layer="0",pool="decode"} 0.6875' in text  # ranks 160 and 60 tokens


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class _Leader:
    """The rollout methods of a replica leader, by the contract's rules, with a failure to inject."""

    def __init__(self, fail_staging: bool = False):
        from engine.expert_load import RolloutState

        self.state = RolloutState(version=-1, installed_version=0, num_layers=SHAPE.num_layers)
        self.fail_staging = fail_staging
        self.calls: list[str] = []
        self.stage_experts = _Method(self._stage)
        self.rollout_status = _Method(lambda: self.state)
        self.switch_experts = _Method(self._switch)
        self.abort_rollout = _Method(self._abort)

    def _stage(self, version, phy2log):
        self.calls.append("stage")
        self.phy2log = phy2log
        self.state.version, self.state.staged = version, not self.fail_staging
        self.state.error = "OSError: checkpoint unreadable" if self.fail_staging else None
        self.state.staged_bytes = 1000

    def _switch(self, version):
        self.calls.append("switch")
        self.state.installed_version, self.state.version = version, -1
        self.state.pauses_s = [0.001] * SHAPE.num_layers

    def _abort(self):
        self.calls.append("abort")


@pytest.mark.parametrize("fail", [False, True], ids=["finished", "staging-fails"])
def test_rollout_over_every_replica_leader(fail):
    a, b = _worker("decode-0.0"), _worker("decode-0.1")
    a.handle, b.handle = _Leader(), _Leader(fail_staging=fail)
    bal = ExpertBalancer(_Registry([a, b]), EPLBConfig(interval_s=1000.0, min_tokens=10))
    zero, skew = [0] * 6, [20, 20, 120, 20, 20, 20]  # expert 2 (one copy, on rank 0) is hot
    for w in (a, b):
        bal.observe(w, _load(w.name, 1.0, _counts(0, _logical(zero), _physical(zero))))
        bal.observe(w, _load(w.name, 1.0, _counts(0, _logical(skew), _physical(skew))))
    bal.instances["decode-0"].window.advance()
    summary = asyncio.run(bal.rebalance("decode"))
    inst = summary["instances"]["decode-0"]
    assert inst["predicted_balancedness_after"] > inst["predicted_balancedness_before"]
    if not fail:
        assert summary["outcome"] == inst["outcome"] == "finished" and inst["version"] == 1
        assert a.handle.calls == b.handle.calls == ["stage", "switch"]
        assert a.handle.phy2log == b.handle.phy2log == bal.instances["decode-0"].placements[1].tolist()
        assert inst["moved_bytes"] == 2000
        # the leaders' next reports carry version 1: the window follows
        for w in (a, b):
            bal.observe(w, _load(w.name, 1.0, _counts(1, _logical(skew), _physical(zero))))
        assert bal.instances["decode-0"].window.version == 1
    else:
        assert summary["outcome"] == inst["outcome"] == "failed" and "checkpoint unreadable" in inst["error"]
        assert "switch" not in a.handle.calls + b.handle.calls  # nothing switched anywhere
        assert a.handle.calls[-1] == b.handle.calls[-1] == "abort"
        assert bal.instances["decode-0"].window.version == 0
    outcome = "failed" if fail else "finished"
    assert bal.rebalances.labels("decode", outcome)._value.get() == 1
    assert bal.last_rebalance["decode"]["outcome"] == outcome


def test_router_admin_and_expert_routes_need_the_api_key(tmp_path):
    from fastapi.testclient import TestClient

    from fake_engine import make_tokenizer
    from router.app import build_router_app
    from router.pd_flow import PDClient

    client = PDClient([], [])
    app = build_router_app(client, make_tokenizer(str(tmp_path)), api_key="sekret")
    with TestClient(app) as http:
        for method, path in (("post", "/admin/rebalance"), ("get", "/expert_load"), ("get", "/pools")):
            r = getattr(http, method)(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        auth = {"Authorization": "Bearer sekret"}
        r = http.post("/admin/rebalance", json={"pool": "decode"}, headers=auth)
        assert r.status_code == 200 and r.json()["pools"]["decode"]["outcome"] == "skipped", r.text
        assert http.post("/admin/rebalance", content=b"{", headers=auth).status_code == 400
        assert http.get("/expert_load", headers=auth).json()["pools"]["decode"]["balancedness"] is None

"""Unit tests of the PD pieces that need no Ray: policies, the transfer state machine, the deploy config."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from deploy.config import DeployConfigError, load_deploy_config, parse_config
from deploy.contract import KVPull, WorkerLoad
from deploy.kv_transfer import Transfer, TransferFailed, TransferState
from engine.kv_connector import KVPiece
from engine.outputs import KVControl
from engine.sampling_params import SamplingParams
from router.policy import Policy, PrefixAffinity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- policies -------------------------------------------------------------------------
def test_prefill_least_queued_prompt_tokens_ties_by_name():
    p = Policy()
    loads = [WorkerLoad("prefill-1", queued_prompt_tokens=10), WorkerLoad("prefill-0", queued_prompt_tokens=300),
             WorkerLoad("prefill-2", queued_prompt_tokens=10)]
    assert p.pick_prefill([], loads).name == "prefill-1"
    assert p.pick_prefill([], []) is None


def test_prefill_prefix_affinity_within_slack():
    aff = PrefixAffinity(block_size=4)
    p = Policy(aff, affinity_slack_tokens=100)
    prompt = list(range(20))
    aff.record(aff.hashes(prompt[:12]), "prefill-1")  # saw the first 3 blocks
    loads = [WorkerLoad("prefill-0", queued_prompt_tokens=0), WorkerLoad("prefill-1", queued_prompt_tokens=50)]
    assert p.pick_prefill(aff.hashes(prompt), loads).name == "prefill-1"
    busy = [WorkerLoad("prefill-0", queued_prompt_tokens=0), WorkerLoad("prefill-1", queued_prompt_tokens=500)]
    assert p.pick_prefill(aff.hashes(prompt), busy).name == "prefill-0"  # beyond the slack: load wins
    other = list(range(100, 120))
    assert p.pick_prefill(aff.hashes(other), loads).name == "prefill-0"  # no shared prefix
    aff.forget("prefill-1")
    assert p.pick_prefill(aff.hashes(prompt), loads).name == "prefill-0"


def test_affinity_longest_chain_and_lru_bound():
    aff = PrefixAffinity(block_size=2, max_entries=3)
    aff.record(aff.hashes([1, 2, 3, 4]), "a")
    aff.record(aff.hashes([1, 2, 3, 4, 5, 6]), "b")  # b saw all three blocks most recently
    assert aff.match(aff.hashes([1, 2, 3, 4, 5, 6, 7, 8])) == {"b": 3}
    aff.record(aff.hashes([9, 9]), "c")  # evicts the oldest entry
    assert len(aff._owner) == 3


def test_decode_least_kv_then_running():
    p = Policy()
    loads = [WorkerLoad("decode-0", num_running=1, kv_blocks_used=80, kv_blocks_total=100),
             WorkerLoad("decode-1", num_running=4, kv_blocks_used=10, kv_blocks_total=100),
             WorkerLoad("decode-2", num_running=0, kv_blocks_used=10, kv_blocks_reserved=30, kv_blocks_total=100)]
    assert [w.name for w in p.decode_order(loads)] == ["decode-2", "decode-0", "decode-1"]
    assert p.pick_decode(loads).name == "decode-2"
    assert p.pick_decode([]) is None


# ---- the transfer state machine ---------------------------------------------------------
def _control(num_tokens: int = 5) -> KVControl:
    return KVControl("r", list(range(1, num_tokens + 1)), SamplingParams(max_tokens=4), 0, [7], [None], -0.5, None,
                     num_tokens, 3, 0)


class FakeSource:
    """Answers pulls from a script: each entry is a KVPull, an exception, or a delay in seconds (then empty)."""

    def __init__(self, script: list):
        self.script = list(script)
        self.cursors: list[int] = []

    async def pull(self, seq_id, cursor, wait_s):
        self.cursors.append(cursor)
        step = self.script.pop(0) if self.script else 10.0
        if isinstance(step, Exception):
            raise step
        if isinstance(step, float):
            await asyncio.sleep(min(step, wait_s))
            return KVPull([])
        return step


class Sink:
    def __init__(self, error: Exception | None = None):
        self.loaded: list[KVPiece] = []
        self.error = error

    async def load_kv(self, seq_id, piece):
        if self.error is not None:
            raise self.error
        self.loaded.append(piece)


def _piece(layer: int, dtype=torch.bfloat16) -> KVPiece:
    return KVPiece.from_rows("r", layer, 0, torch.randn(1, 5, 8).to(dtype))


def test_transfer_layer_by_layer_then_control_with_fp8_bytes():
    pieces = [_piece(i, torch.float8_e4m3fn) for i in range(3)]
    source = FakeSource([0.01, KVPull(pieces[:1]), KVPull(pieces[1:]), KVPull([], _control())])
    t = Transfer("r", source, timeout_s=1.0, pending_timeout_s=1.0)
    assert t.state is TransferState.PENDING
    sink = Sink()
    control = asyncio.run(t.run(sink))
    assert t.state is TransferState.DONE and control.num_tokens == 5
    assert [p.first_layer for p in sink.loaded] == [0, 1, 2] and sink.loaded[0].rows.dtype == torch.float8_e4m3fn
    assert source.cursors == [0, 0, 1, 3]  # each pull asks for what it has not seen
    report = t.report()
    assert (report.state, report.nbytes, report.num_pieces) == ("done", 3 * 5 * 8, 3)
    with pytest.raises(RuntimeError, match="already done"):
        asyncio.run(t.run(sink))


@pytest.mark.parametrize("script, sink_error, cause", [
    ([], None, "timeout"),  # nothing ever comes: the pending wait runs out
    ([KVPull([_piece(0)])], None, "timeout"),  # a piece, then silence: the transfer wait runs out
    ([RuntimeError("owner died")], None, "lost"),
    (["not a pull"], None, "invalid"),
    ([KVPull([_piece(0)])], ValueError("kv: piece outside the reservation"), "invalid"),
    # this (decode) side's engine failed while loading: not the prefill worker's fault
    ([KVPull([_piece(0)])], RuntimeError("the engine failed: gloo Read error: Connection reset by peer"), "sink"),
])
def test_transfer_failures(script, sink_error, cause, monkeypatch):
    monkeypatch.setattr(Transfer, "POLL_S", 0.02)
    t = Transfer("r", FakeSource(script), timeout_s=0.1, pending_timeout_s=0.15)
    with pytest.raises(TransferFailed) as e:
        asyncio.run(t.run(Sink(sink_error)))
    assert t.state is TransferState.FAILED and t.cause == cause == e.value.cause
    assert t.report().state == "failed" and t.report().cause == cause


def test_worker_implements_the_contract():
    from deploy.contract import WORKER_METHODS
    from deploy.worker import EngineWorker

    assert {"prefill", "pull_kv", "reserve", "start_decode", "poll", "abort", "info", "load"} <= set(WORKER_METHODS)
    for name in WORKER_METHODS:
        assert callable(getattr(EngineWorker, name, None)), name


# ---- the deployment file --------------------------------------------------------------------
def test_examples_parse():
    local = load_deploy_config(os.path.join(ROOT, "deploy/examples/local-cpu.yaml"))
    lp, ld = local.pools["prefill"].parallel, local.pools["decode"].parallel
    assert (lp.tp, lp.sp, lp.ep) == (2, True, 2) and (ld.dp, ld.ep, ld.num_redundant_experts) == (2, 2, 2)
    assert local.engine_args("decode")["role"] == "decode"
    v3 = load_deploy_config(os.path.join(ROOT, "deploy/examples/deepseek-v3.yaml"))
    pre, dec = v3.pools["prefill"].parallel, v3.pools["decode"].parallel
    assert (pre.tp, pre.sp, pre.dp, pre.ep, pre.num_redundant_experts, pre.world) == (4, True, 8, 32, 32, 32)
    assert (dec.tp, dec.dp, dec.ep, dec.world) == (4, 80, 320, 320)


def _cfg(**pool_changes):
    pools = {"prefill": {"instances": 1}, "decode": {"instances": 1}}
    for role, change in pool_changes.items():
        pools[role].update(change)
    return {"model": "m", "pools": pools}


@pytest.mark.parametrize("raw, match", [
    ({"pools": {}}, "model"),
    ({"model": "m", "pools": {"prefill": {}}}, "missing decode"),
    (_cfg(prefill={"parallel": {"tp": 1, "sp": True}}), "sp.*tp > 1"),
    (_cfg(decode={"parallel": {"tp": 2, "dp": 4, "ep": 4}}), "ep must be 1 or tp × dp = 8"),
    (_cfg(decode={"parallel": {"num_redundant_experts": 2}}), "need expert parallelism"),
    (_cfg(decode={"instances": 0}), "instances: must be an integer >= 1"),
    (_cfg(decode={"parallel": {"pp": 2}}), "pp: unknown key"),
    (_cfg(decode={"engine": {"block_size": 0}}), "pools.decode.engine: block_size"),
    (_cfg(prefill={"resources": {"cpu_affinity": "0"}}), "cpu_affinity"),
    ({**_cfg(), "router": {"prt": 1}}, "router.prt: unknown key"),
])
def test_config_rejects(raw, match):
    with pytest.raises(DeployConfigError, match=match):
        parse_config(raw)


def test_expert_divisibility_checked_against_the_model(tiny_checkpoint):
    ok = {"tp": 2, "dp": 2, "ep": 4, "num_redundant_experts": 4}  # tiny: 8 routed experts + 4 = 12 over 4 ranks
    parse_config({"model": tiny_checkpoint, "pools": {"prefill": {"parallel": ok}, "decode": {}}})
    with pytest.raises(DeployConfigError, match="do not divide evenly"):
        parse_config({"model": tiny_checkpoint,
                      "pools": {"prefill": {"parallel": {**ok, "num_redundant_experts": 3}}, "decode": {}}})


def test_pool_refuses_a_layout_the_model_cannot_take(tiny_checkpoint, tmp_path, capsys):
    from deploy.pool import Pool
    from serving.cli import main

    raw = {"model": tiny_checkpoint, "pools": {"prefill": {}, "decode": {"parallel": {"tp": 8}}}}
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by tp=8"):
        Pool.from_deploy(parse_config(raw), "decode").check_model()
    config = tmp_path / "pools.yaml"
    config.write_text(f"model: {tiny_checkpoint}\npools:\n  prefill: {{}}\n  decode: {{parallel: {{tp: 8}}}}\n")
    assert main(["up", "--config", str(config), "--state-file", str(tmp_path / "up.json")]) == 2  # before Ray starts
    assert "pools.decode.parallel: num_attention_heads (4) is not divisible by tp=8" in capsys.readouterr().err


def test_status_and_down_without_a_deployment(tmp_path, capsys):
    from serving.cli import main

    state = str(tmp_path / "up.json")
    assert main(["status", "--state-file", state]) == 2
    assert "no deployment recorded" in capsys.readouterr().err
    assert main(["down", "--state-file", state]) == 2


def test_lease_per_pool_default_from_the_router_and_checked():
    from deploy.pool import Pool, default_lease_s

    assert default_lease_s({}) == pytest.approx(3 * (0.25 + 10.0))
    cfg = parse_config({**_cfg(decode={"lease_s": 4}), "router": {"poll_wait_s": 0.5, "stall_timeout_s": 2.0}})
    assert Pool.from_deploy(cfg, "decode").lease_s == 4.0
    assert Pool.from_deploy(cfg, "prefill").lease_s == pytest.approx(7.5)
    with pytest.raises(DeployConfigError, match="pools.prefill.lease_s"):
        parse_config(_cfg(prefill={"lease_s": 0}))


def test_outbox_drops_rows_nobody_took_within_its_ttl(monkeypatch):
    import engine.kv_connector as kvc

    now = [100.0]
    monkeypatch.setattr(kvc.time, "monotonic", lambda: now[0])
    outbox = kvc.KVOutbox(ttl_s=5.0)
    for seq in ("computing", "pulled", "orphan"):
        outbox.open(seq)
    rows = _piece(0).rows_bytes
    outbox.put(KVPiece("pulled", 0, 0, rows, "bfloat16"))
    outbox.put(KVPiece("orphan", 0, 0, rows, "bfloat16"))
    now[0] += 4.0
    outbox.take("pulled", 0)  # a live puller keeps it
    now[0] += 4.0
    assert outbox.expire() == ["orphan"]
    assert "computing" in outbox and "pulled" in outbox and outbox.nbytes == rows.numel()


def test_reservations_expire_but_those_a_transfer_fills():
    from engine.kv_cache import KVCacheManager
    from engine.kv_connector import KVConnector, KVOutbox

    conn = KVConnector(KVCacheManager(num_blocks=8, block_size=4), KVOutbox(), reservation_ttl_s=-1.0)
    assert conn.reserve("a", 4, 8) is not None and conn.reserve("b", 4, 8) is not None
    conn.expire(keep={"b"})
    assert set(conn.reservations) == {"b"}


def test_engine_thread_skips_a_command_whose_caller_gave_up():
    """A transfer aborted while its ``LoadKV`` waits must not fail the engine thread (InvalidStateError)."""
    import threading

    from engine.engine_loop import Command, EngineLoop

    class Idle:
        executor = type("X", (), {"needs_ticks": False, "busy_elsewhere": False, "tick_s": 0.1})()
        sequences: dict = {}

        def has_unfinished(self):
            return False

    gate, ran = threading.Event(), []

    class Blocking(Command):
        def apply(self, engine):
            gate.wait(5)

    class Mark(Command):
        def __init__(self, tag):
            self.tag = tag

        def apply(self, engine):
            ran.append(self.tag)
            return self.tag

    async def main():
        loop = EngineLoop(Idle())
        first = asyncio.ensure_future(loop.call(Blocking()))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(loop.call(Mark("gone")))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)  # the cancel reaches the engine's future
        gate.set()
        await first
        assert await asyncio.wait_for(loop.call(Mark("next")), 5) == "next" and loop.alive
        loop.stop()

    asyncio.run(main())
    assert ran == ["next"]


def test_deepseek_v3_example_fits_deepseek_v3(tmp_path):
    """deploy/examples/deepseek-v3.yaml against DeepSeek-V3's own config.json (planner/data): every
    layout divides the model (heads over TP, vocab, 256 routed + redundant experts over EP), with
    DeepSeek's experts per GPU, on the GPU counts the file states."""
    import shutil

    import yaml

    from deploy.pool import Pool

    model = tmp_path / "DeepSeek-V3"
    model.mkdir()
    shutil.copy(os.path.join(ROOT, "planner/data/deepseek-v3/config.json"), model / "config.json")
    with open(os.path.join(ROOT, "deploy/examples/deepseek-v3.yaml")) as f:
        raw = yaml.safe_load(f)
    cfg = parse_config({**raw, "model": str(model)})  # expert divisibility is checked against the model here
    for role in ("prefill", "decode"):
        Pool.from_deploy(cfg, role).check_model()  # heads, vocab
    pre, dec = cfg.pools["prefill"], cfg.pools["decode"]
    slots = {role: 256 + p.parallel.num_redundant_experts for role, p in cfg.pools.items()}
    assert slots["prefill"] // pre.parallel.ep == 9 and slots["decode"] // dec.parallel.ep == 1  # per GPU
    assert pre.instances * pre.parallel.world == 128 and dec.instances * dec.parallel.world == 320  # GPUs

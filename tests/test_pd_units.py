"""Unit tests of the PD pieces that need no Ray: policies, the transfer state machine, the deploy config."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from deploy.config import ConfigError, load_config, parse_config
from deploy.kv_transfer import Transfer, TransferFailed, TransferState
from engine.kv_transfer import KVPayload
from engine.sampling_params import SamplingParams
from router.policy import Policy, PrefixAffinity, WorkerLoad

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
    assert WorkerLoad.from_dict({"name": "x", "num_running": 2, "alive": True}).num_running == 2


# ---- the transfer state machine ---------------------------------------------------------
def _payload(dtype=torch.bfloat16) -> KVPayload:
    rows = torch.randn(3, 5, 8).to(dtype)
    return KVPayload("r", [1, 2, 3, 4, 5], [7], [], -0.5, SamplingParams(max_tokens=4),
                     rows.contiguous().view(torch.uint8), str(dtype).removeprefix("torch."), None)


class FakeTransport:
    def __init__(self, result=None, delay=0.0, error: Exception | None = None):
        self.result, self.delay, self.error = result, delay, error
        self.fetched = []

    async def fetch(self, handle):
        self.fetched.append(handle)
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result


def test_transfer_done_records_bytes_and_fp8_roundtrip():
    payload = _payload(torch.float8_e4m3fn)
    t = Transfer("r", "handle", FakeTransport(payload), timeout_s=1.0)
    assert t.state is TransferState.PENDING
    got = asyncio.run(t.run())
    assert t.state is TransferState.DONE and t.handle is None
    assert t.nbytes == 3 * 5 * 8 and got.rows.dtype == torch.float8_e4m3fn
    assert t.report()["state"] == "done"
    with pytest.raises(RuntimeError, match="already done"):
        asyncio.run(t.run())


@pytest.mark.parametrize("transport, cause", [
    (FakeTransport(delay=0.5), "timeout"),
    (FakeTransport(error=RuntimeError("owner died")), "lost"),
    (FakeTransport(result="not a payload"), "invalid"),
])
def test_transfer_failures(transport, cause):
    t = Transfer("r", "h", transport, timeout_s=0.05)
    with pytest.raises(TransferFailed) as e:
        asyncio.run(t.run())
    assert t.state is TransferState.FAILED and t.cause == cause == e.value.cause and t.handle is None
    assert t.report() == {"state": "failed", "cause": cause, "nbytes": 0, "seconds": t.seconds}


# ---- the deployment file --------------------------------------------------------------------
def test_examples_parse():
    local = load_config(os.path.join(ROOT, "deploy/examples/local-cpu.yaml"))
    assert local.pools["prefill"].instances == 1 and local.pools["decode"].instances == 2
    assert local.engine_args("decode")["role"] == "decode"
    v3 = load_config(os.path.join(ROOT, "deploy/examples/deepseek-v3.yaml"))
    pre, dec = v3.pools["prefill"].parallel, v3.pools["decode"].parallel
    assert (pre.tp, pre.sp, pre.dp, pre.ep, pre.num_redundant_experts, pre.ranks) == (4, True, 8, 32, 32, 32)
    assert (dec.tp, dec.dp, dec.ep, dec.ranks) == (4, 80, 320, 320)


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
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_expert_divisibility_checked_against_the_model(tiny_checkpoint):
    ok = {"tp": 2, "dp": 2, "ep": 4, "num_redundant_experts": 4}  # tiny: 8 routed experts + 4 = 12 over 4 ranks
    parse_config({"model": tiny_checkpoint, "pools": {"prefill": {"parallel": ok}, "decode": {}}})
    with pytest.raises(ConfigError, match="do not divide evenly"):
        parse_config({"model": tiny_checkpoint,
                      "pools": {"prefill": {"parallel": {**ok, "num_redundant_experts": 3}}, "decode": {}}})


def test_multi_rank_pool_is_refused_clearly():
    from deploy.pool import Pool

    cfg = parse_config(_cfg(decode={"parallel": {"tp": 2, "dp": 2, "ep": 4}}))
    with pytest.raises(NotImplementedError, match="4 ranks .* not supported yet"):
        Pool.from_deploy(cfg, "decode").start()


def test_up_refuses_multi_rank_pools_before_starting_anything(capsys):
    from serving.cli import main

    assert main(["up", "--config", os.path.join(ROOT, "deploy/examples/deepseek-v3.yaml")]) == 2
    err = capsys.readouterr().err
    assert "pools.prefill: an instance of 32 ranks" in err and "not supported yet" in err


def test_status_and_down_without_a_deployment(tmp_path, capsys):
    from serving.cli import main

    state = str(tmp_path / "up.json")
    assert main(["status", "--state-file", state]) == 2
    assert "no deployment recorded" in capsys.readouterr().err
    assert main(["down", "--state-file", state]) == 2

"""Multi-rank engine instances over real gloo process groups (one process per rank, no Ray).

Each layout runs the same requests through real engines: every DP replica's leader owns an
``LLMEngine`` with a ``MultiRankExecutor`` and takes the requests ``i % dp == replica``; its
followers run ``engine.multirank.follow``. Greedy tokens (fp32) must equal one process's,
with MTP speculative decoding on (so the MTP passes, dummy steps included, stay in
lock-step), chunked prefill, and prompts of different lengths so replicas finish at
different times and idle replicas run dummy steps. Two layouts also switch to a new expert
placement while they decode (``engine.rebalance``): the tokens must not change.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile

import pytest
import torch.multiprocessing as mp

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", block_size=8, num_kv_blocks=64, max_num_batched_tokens=24,
              speculative="mtp", num_speculative_tokens=2)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (5, 31, 12, 47, 3, 20)]


def _rank_main(rank: int, layout_kw: dict, model: str, init: str, prompts, out_dir: str,
               rollout: list[list[int]] | None = None, device: str = "cpu") -> None:
    import faulthandler
    import json

    import torch.distributed as dist

    from engine.args import EngineArgs
    from engine.engine import LLMEngine
    from engine.model.config import ModelConfig
    from engine.model.parallel import ParallelLayout
    from engine.multirank import MultiRankExecutor, RankSpec, follow, init_rank

    faulthandler.enable(all_threads=True)  # a rank that aborts prints every thread's stack
    layout = ParallelLayout(**layout_kw)
    spec = RankSpec(layout, rank, init, timeout_s=120)
    if device == "cuda":  # one GPU per rank; the model's collectives go over NCCL
        import torch

        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    groups = init_rank(spec, device)
    args = EngineArgs(model=model, device=device, **ENGINE)
    if not spec.is_leader:
        follow(args, ModelConfig.from_dir(model), groups)
        dist.destroy_process_group()  # every group, before the interpreter tears down what is left
        return
    engine = LLMEngine(args, lambda a, cfg, outbox: MultiRankExecutor(a, cfg, outbox, groups))
    replica = groups.ctx.dp_rank
    mine = {f"r{i}": p for i, p in enumerate(prompts) if i % layout.dp == replica}
    for rid, p in mine.items():
        engine.add_request(rid, p, GREEDY)
    got: dict[str, list[int]] = {}
    idle_steps = 0
    ex = engine.executor
    switched = False
    for i in itertools.count():  # leave only at an iteration where every replica was idle (the lock-step rule)
        if rollout is not None:  # stage at step 2, switch once every rank of this replica has the weights
            if i == 2:
                ex.stage_experts(1, rollout)
            if i >= 2 and not switched and ex.rollout_state().staged:
                ex.switch_experts(1)
                switched = True
        idle = not engine.has_unfinished()
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        if idle and (rollout is None or ex.runner.experts.installed_version == 1):
            if not ex.busy_elsewhere:
                break
            idle_steps += 1
    counts = ex.expert_counts()
    state = ex.rollout_state()
    ex.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"tokens": got, "idle_steps": idle_steps, "num_blocks": ex.num_blocks,
                   "blocks_used": engine.kv.num_used_blocks, "version": counts.version,
                   "routed": int(counts.logical.sum()), "phy2log": ex.runner.experts.phy2log().tolist(),
                   "layers_switched": state.layers_switched}, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, **ENGINE)
    prompts = _prompts(llm.engine.config.vocab_size)
    return prompts, {f"r{i}": o.outputs[0].token_ids for i, o in enumerate(llm.generate(prompts, GREEDY))}


def _run_layout(model: str, layout: dict, prompts, rollout=None, device: str = "cpu") -> dict[int, dict]:
    import json

    world = layout.get("tp", 1) * layout.get("dp", 1)
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + os.path.join(out, "rendezvous")
        mp.start_processes(_rank_main, args=(layout, model, init, prompts, out, rollout, device), nprocs=world,
                           start_method="spawn", join=True)
        results = {}
        for name in os.listdir(out):
            if name.startswith("rank"):
                with open(os.path.join(out, name)) as f:
                    results[int(name[4:-5])] = json.load(f)
    tp = layout.get("tp", 1)
    assert sorted(results) == [r for r in range(world) if r % tp == 0]  # the leaders
    return results


def _moved_placement(model: str, layout: dict) -> list[list[int]]:
    """A balanced placement for a skewed load that moves experts on every MoE layer (MTP's too)."""
    import numpy as np

    from engine.eplb import plan_placement
    from engine.model.config import ModelConfig

    cfg = ModelConfig.from_dir(model)
    num_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    ep = layout.get("ep", 1)
    slots = cfg.n_routed_experts + layout.get("num_redundant_experts", 0)
    rng = np.random.default_rng(1)
    new = plan_placement(rng.gamma(0.3, size=(num_layers, cfg.n_routed_experts)), slots, cfg.n_group, 1, ep).phy2log
    if ep == 1:  # one rank holds every slot: any order is as balanced, so shuffle them
        new = np.stack([rng.permutation(row) for row in new])
    assert (new != np.arange(slots) % cfg.n_routed_experts).any(axis=1).all()
    return new.tolist()


@pytest.mark.parametrize("layout,rollout", [
    (dict(tp=2), False),
    (dict(tp=2, sp=True), True),
    (dict(dp=2, ep=2, num_redundant_experts=2), True),
    (dict(tp=2, sp=True, dp=2, ep=4, num_redundant_experts=4), False),
], ids=["TP2", "TP2+SP+rollout", "DP2+EP2+2red+rollout", "TP2xDP2+SP+EP4+4red"])
def test_multirank_engine_greedy_equals_one_process(tiny_checkpoint, reference, layout, rollout):
    """With ``rollout``, a new expert placement is staged at step 2 and switched in layer by layer while
    the requests decode (every rank, at the same steps; in lock-step across DP replicas)."""
    prompts, want = reference
    new = _moved_placement(tiny_checkpoint, layout) if rollout else None
    results = _run_layout(tiny_checkpoint, layout, prompts, new)
    leaders = sorted(results)
    got = {rid: toks for r in leaders for rid, toks in results[r]["tokens"].items()}
    assert got == want
    assert all(results[r]["blocks_used"] == 0 for r in leaders)
    assert len({results[r]["num_blocks"] for r in leaders}) == 1
    if layout.get("dp", 1) > 1:  # replicas finish at different times: the early one ran dummy steps
        assert sum(results[r]["idle_steps"] for r in leaders) > 0
    for r in leaders:
        assert results[r]["routed"] > 0
        if new is not None:
            assert results[r]["version"] == 1 and results[r]["phy2log"] == new
            assert results[r]["layers_switched"] == len(new)



def _hung_follower_main(rank: int, model: str, init: str, out_dir: str, timeout_s: float, hang_s: float) -> None:
    """TP2: the follower builds its runner, then stops answering for ``hang_s``; the leader steps."""
    import json
    import time

    from engine.args import EngineArgs
    from engine.engine import LLMEngine
    from engine.model.config import ModelConfig
    from engine.model.parallel import ParallelLayout
    from engine.multirank import MultiRankExecutor, RankSpec, follow, init_rank

    spec = RankSpec(ParallelLayout(tp=2), rank, init, timeout_s=timeout_s)
    groups = init_rank(spec, "cpu")
    args = EngineArgs(model=model, **ENGINE)
    result: dict = {}
    t0 = time.monotonic()
    try:
        if not spec.is_leader:
            follow(args, ModelConfig.from_dir(model), groups, on_ready=lambda runner: time.sleep(hang_s))
        else:
            engine = LLMEngine(args, lambda a, cfg, outbox: MultiRankExecutor(a, cfg, outbox, groups))
            engine.add_request("r0", [5, 6, 7, 8], GREEDY)
            t0 = time.monotonic()
            while engine.has_unfinished():
                engine.step()
    except Exception as e:  # noqa: BLE001 - the error is the result
        result = {"error": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leave without the interpreter's teardown: a gloo group whose operation to a peer timed out may abort in
    # its destructor ("terminate called without an active exception", SIGABRT; seen on either rank, 2 runs
    # in 15 under a CPU hog; 0 in 14 since). A worker never exits there: its instance is re-created
    # (ray.kill). The parent's resource tracker then counts the children's multiprocessing locks (tqdm's) as
    # leaked semaphores, a warning at exit.
    os._exit(0)


def test_a_hung_rank_fails_its_peers_collective_with_an_error_instead_of_a_hang(tiny_checkpoint):
    """A follower that stops answering (alive, not dead) makes the leader's next step fail once the
    process group's timeout passes: the engine thread gets an error (its worker then reports itself not
    alive and the pool re-creates the instance, ``tests/test_pd_parallel.py``), it does not block."""
    import json

    timeout_s, hang_s = 3.0, 15.0
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + os.path.join(out, "rendezvous")
        mp.start_processes(_hung_follower_main, args=(tiny_checkpoint, init, out, timeout_s, hang_s), nprocs=2,
                           start_method="spawn", join=True)
        with open(os.path.join(out, "rank0.json")) as f:
            leader = json.load(f)
    print(leader)
    assert "error" in leader, leader  # the step did not complete without its follower
    assert leader["seconds"] < hang_s - 5, leader  # failed at the timeout, not when the follower came back
    assert "timed out" in leader["error"].lower() or "timeout" in leader["error"].lower(), leader


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA devices (one per rank; NCCL)")
@pytest.mark.parametrize("layout", [dict(tp=2, sp=True), dict(dp=2, ep=2, num_redundant_experts=2)],
                         ids=["TP2+SP", "DP2+EP2+2red"])
def test_multirank_engine_on_cuda_over_nccl(tiny_checkpoint, layout):
    """The same engines with one GPU per rank: the model's groups use NCCL (``backend_for``), the control
    and lock-step groups stay gloo; greedy tokens equal one GPU's, with a rollout switched mid-stream."""
    llm = LLM(tiny_checkpoint, device="cuda:0", **ENGINE)
    prompts = _prompts(llm.engine.config.vocab_size)
    want = {f"r{i}": o.outputs[0].token_ids for i, o in enumerate(llm.generate(prompts, GREEDY))}
    del llm
    new = _moved_placement(tiny_checkpoint, layout)
    results = _run_layout(tiny_checkpoint, layout, prompts, new, device="cuda")
    assert {rid: t for r in results.values() for rid, t in r["tokens"].items()} == want
    assert all(r["version"] == 1 for r in results.values())

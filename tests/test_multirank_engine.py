"""Multi-rank engine instances over real gloo process groups (one process per rank, no Ray).

Each layout runs the same requests through real engines: every DP replica's leader owns an
``LLMEngine`` with a ``MultiRankExecutor`` and takes the requests ``i % dp == replica``; its
followers run ``engine.multirank.follow``. Greedy tokens (fp32) must equal one process's,
with MTP speculative decoding on (so the MTP passes, dummy steps included, stay in
lock-step), chunked prefill, and prompts of different lengths so replicas finish at
different times and idle replicas run dummy steps.
"""

from __future__ import annotations

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


def _rank_main(rank: int, layout_kw: dict, model: str, init: str, prompts, out_dir: str) -> None:
    import json

    from engine.args import EngineArgs
    from engine.engine import LLMEngine
    from engine.model.config import ModelConfig
    from engine.model.parallel import ParallelLayout
    from engine.multirank import MultiRankExecutor, RankSpec, follow, init_rank

    layout = ParallelLayout(**layout_kw)
    spec = RankSpec(layout, rank, init, timeout_s=120)
    groups = init_rank(spec, "cpu")
    args = EngineArgs(model=model, **ENGINE)
    if not spec.is_leader:
        follow(args, ModelConfig.from_dir(model), groups)
        return
    engine = LLMEngine(args, lambda a, cfg, outbox: MultiRankExecutor(a, cfg, outbox, groups))
    replica = groups.ctx.dp_rank
    mine = {f"r{i}": p for i, p in enumerate(prompts) if i % layout.dp == replica}
    for rid, p in mine.items():
        engine.add_request(rid, p, GREEDY)
    got: dict[str, list[int]] = {}
    idle_steps = 0
    while True:  # leave only at an iteration where every replica was idle (the lock-step rule)
        idle = not engine.has_unfinished()
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        if idle:
            if not engine.executor.busy_elsewhere:
                break
            idle_steps += 1
    engine.executor.shutdown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"tokens": got, "idle_steps": idle_steps, "num_blocks": engine.executor.num_blocks,
                   "blocks_used": engine.kv.num_used_blocks}, f)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, **ENGINE)
    prompts = _prompts(llm.engine.config.vocab_size)
    return prompts, {f"r{i}": o.outputs[0].token_ids for i, o in enumerate(llm.generate(prompts, GREEDY))}


@pytest.mark.parametrize("layout", [
    dict(tp=2),
    dict(tp=2, sp=True),
    dict(dp=2, ep=2, num_redundant_experts=2),
    dict(tp=2, sp=True, dp=2, ep=4, num_redundant_experts=4),
], ids=["TP2", "TP2+SP", "DP2+EP2+2red", "TP2xDP2+SP+EP4+4red"])
def test_multirank_engine_greedy_equals_one_process(tiny_checkpoint, reference, layout):
    import json

    prompts, want = reference
    world = layout.get("tp", 1) * layout.get("dp", 1)
    with tempfile.TemporaryDirectory() as out:
        init = "file://" + os.path.join(out, "rendezvous")
        mp.start_processes(_rank_main, args=(layout, tiny_checkpoint, init, prompts, out), nprocs=world,
                           start_method="spawn", join=True)
        results = {}
        for name in os.listdir(out):
            if name.startswith("rank"):
                with open(os.path.join(out, name)) as f:
                    results[int(name[4:-5])] = json.load(f)
    tp = layout.get("tp", 1)
    leaders = sorted(r for r in range(world) if r % tp == 0)
    assert sorted(results) == leaders
    got = {rid: toks for r in leaders for rid, toks in results[r]["tokens"].items()}
    assert got == want
    assert all(results[r]["blocks_used"] == 0 for r in leaders)
    assert len({results[r]["num_blocks"] for r in leaders}) == 1
    if layout.get("dp", 1) > 1:  # replicas finish at different times: the early one ran dummy steps
        assert sum(results[r]["idle_steps"] for r in leaders) > 0

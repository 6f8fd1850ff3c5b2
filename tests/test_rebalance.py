"""Live expert rebalancing on one engine (engine/rebalance.py through LocalExecutor): counting,
staging, switching one layer per step while requests run, and failures that leave the old
placement serving. The multi-rank versions (DP lock-step, TP followers) are in
tests/test_multirank_engine.py; the router-driven rollout in tests/test_pd_parallel.py."""

from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.eplb import plan_placement
from engine.expert_load import ExpertCounts

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
ENGINE = dict(dtype="float32", block_size=8, num_kv_blocks=64, speculative="mtp", num_speculative_tokens=2)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, vocab, n).tolist() for n in (7, 19, 33)]


def _new_placement(shape, seed: int = 0) -> list[list[int]]:
    """A placement that moves experts on every layer (one rank: a permutation of the slots)."""
    rng = np.random.default_rng(seed)
    weight = rng.gamma(0.5, size=(shape.num_layers, shape.num_logical))
    p = plan_placement(weight, shape.num_slots, shape.num_groups, 1, shape.num_ranks).phy2log
    p = np.stack([rng.permutation(row) for row in p])  # one rank: any order of the slots is balanced alike
    assert (p != shape.default_phy2log()).any(axis=1).all()
    return p.tolist()


def _run(llm: LLM, prompts, rollout=None) -> tuple[dict[str, list[int]], list]:
    """Step the engine by hand; ``rollout(step_index, engine)`` runs between steps."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    got: dict[str, list[int]] = {}
    i = 0
    while engine.has_unfinished() or engine.executor.needs_ticks:
        if rollout is not None:
            rollout(i, engine)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        i += 1
    return got, engine


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, **ENGINE)


def test_counts_are_cumulative_and_match_the_placement(llm):
    engine = llm.engine
    before = engine.executor.expert_counts()
    assert isinstance(before, ExpertCounts) and before.version == 0
    _run(llm, _prompts(engine.config.vocab_size))
    after = engine.executor.expert_counts()
    routed = after.logical - before.logical
    L, E = routed.shape
    assert L == len(engine.runner.model.moe_layers()) and E == engine.config.n_routed_experts
    assert (routed >= 0).all() and routed.sum() > 0
    # every token copy is counted once per layer: each layer routed the same number of copies (main
    # layers see every token; the MTP layer its own passes), k per token
    main = routed[:engine.config.num_hidden_layers - engine.config.first_k_dense_replace]
    assert (main.sum(1) == main.sum(1)[0]).all() and main.sum(1)[0] % engine.config.num_experts_per_tok == 0
    # the per-slot counts map back onto the logical ones through the start-up placement
    phys = after.physical - before.physical
    p2l = engine.runner.experts.phy2log()
    mapped = np.stack([np.bincount(p2l[i], weights=phys[i], minlength=E) for i in range(L)])
    np.testing.assert_array_equal(mapped, routed)
    assert (engine.executor.expert_counts().logical == after.logical).all()  # reading does not reset


def test_rollout_while_decoding_keeps_greedy_output(tiny_checkpoint, llm):
    prompts = _prompts(llm.engine.config.vocab_size)
    want, _ = _run(llm, prompts)
    fresh = LLM(tiny_checkpoint, **ENGINE)
    ex = fresh.engine.executor
    shape = ex.runner.experts.shape()
    new = _new_placement(shape)
    seen = {}

    def rollout(i, engine):
        if i == 2:
            engine.executor.stage_experts(1, new)
            seen["staging_at"] = i
        state = engine.executor.rollout_state()
        if state.version == 1 and state.staged and "switch_at" not in seen:
            engine.executor.switch_experts(1)
            seen["switch_at"] = i
        if engine.executor.runner.experts.switching:
            seen.setdefault("switching_steps", 0)
            seen["switching_steps"] += 1

    got, engine = _run(fresh, prompts, rollout)
    assert got == want
    state = ex.rollout_state()
    assert state.installed_version == 1 and state.version == -1
    assert len(state.pauses_s) == shape.num_layers  # one layer per step boundary
    assert seen["switching_steps"] == shape.num_layers
    np.testing.assert_array_equal(ex.runner.experts.phy2log(), np.array(new))
    assert ex.expert_counts().version == 1
    # the switched model still answers like the reference, from scratch
    again, _ = _run(fresh, prompts)
    assert again == want


def test_failed_staging_leaves_the_old_placement(tiny_checkpoint, tmp_path):
    fresh = LLM(tiny_checkpoint, **ENGINE)
    ex = fresh.engine.executor
    experts = ex.runner.experts
    old = experts.phy2log()
    with pytest.raises(ValueError, match="layers given"):
        ex.stage_experts(1, old.tolist()[:-1])
    with pytest.raises(ValueError, match="no slot"):  # an expert left without a slot
        bad = old.copy()
        bad[0, 0] = bad[0, 1]
        ex.stage_experts(1, bad.tolist())
    experts.checkpoint = str(tmp_path / "gone")  # the weights cannot be read
    ex.stage_experts(2, _new_placement(experts.shape()))
    experts._thread.join(30)
    state = ex.rollout_state()
    assert not state.staged and state.error
    with pytest.raises(RuntimeError, match="not staged"):
        ex.switch_experts(2)
    ex.abort_rollout()
    np.testing.assert_array_equal(experts.phy2log(), old)
    assert not ex.needs_ticks and ex.rollout_state().installed_version == 0

"""Parallel layouts against the single-process model: real processes, real gloo groups on 127.0.0.1.

Four processes are spawned once for the file; for each layout the ranks it needs
form a fresh gloo group (FileStore rendezvous, connections on 127.0.0.1) and run
``tests/parallel_scenario.py``
(chunked prefill through the paged cache, greedy decode steps, the MTP layer after
every pass, dummy steps on idle DP replicas, an expert-placement switch under EP)
and the parent compares, in fp32: every logit row and every MTP logit row within
1e-4 of one process, greedy tokens identical, TP ranks of a replica holding the
same logits, the instance's summed expert load equal to one process's, and each
rank's resident weight bytes equal to its share by the layout.

Layouts (E = 14 routed experts, n_group 7, top-4; 4 heads, vocab 512):
TP2; TP2+SP; DP2 (experts replicated); TP2+EP2; DP4+EP4 with 2 redundant experts
(DeepSeek's decode shape in miniature); TP2×DP2 with SP and EP4 with 2 redundant
experts (the prefill shape); FP8 experts and attention under DP2+EP2.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import parallel_scenario as scenario
from engine.checkpoint.quantize import fp8_config, quantize_tensors
from engine.checkpoint.random_ckpt import preset_config, random_tensors
from engine.checkpoint.schema import checkpoint_schema
from engine.checkpoint.writer import save_checkpoint
from engine.model.parallel import ParallelContext

TOL = 1e-4
MODEL = dict(n_routed_experts=14, n_group=7, topk_group=3, num_experts_per_tok=4)

LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "dp2": dict(dp=2),
    "tp2_ep2": dict(tp=2, ep=2),
    "dp4_ep4_r2": dict(dp=4, ep=4, num_redundant_experts=2),
    "tp2_sp_dp2_ep4_r2": dict(tp=2, sp=True, dp=2, ep=4, num_redundant_experts=2),
    "fp8_dp2_ep2": dict(dp=2, ep=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """fp32 and FP8 random checkpoints, sharded (small shards: tensors and their scales cross files)."""
    root = tmp_path_factory.mktemp("parallel")
    cfg = preset_config("tiny", **MODEL)
    save_checkpoint(root / "fp32", cfg, random_tensors(cfg, 1, torch.float32), max_shard_bytes=300_000)
    cfg8 = fp8_config(cfg)
    save_checkpoint(root / "fp8", cfg8, quantize_tensors(checkpoint_schema(cfg8), random_tensors(cfg, 1, torch.float32)),
                    max_shard_bytes=300_000)
    return {"fp32": str(root / "fp32"), "fp8": str(root / "fp8")}


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, dict]:
    """The scenario in this process, world size 1."""
    out = {}
    for kind, path in checkpoints.items():
        ctx = ParallelContext.single()
        model = scenario.load_model(path, ctx, fp8=kind == "fp8")
        out[kind] = scenario.run(model, ctx, path, fp8=kind == "fp8", switch=False)
    return out


@pytest.fixture(scope="module")
def parallel_runs(checkpoints, tmp_path_factory) -> str:
    """Every layout, in one spawn of four processes; returns the directory of their results."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = []
    for name, layout in LAYOUTS.items():
        os.makedirs(out / name)
        kind = "fp8" if name.startswith("fp8") else "fp32"
        jobs.append((name, layout, checkpoints[kind], kind == "fp8"))
    ctx = mp.start_processes(scenario.worker, args=(jobs, str(out)), nprocs=4, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError("parallel layouts still running after 300 s")
    finally:
        for p in ctx.processes:  # only the processes this fixture started
            if p.is_alive():
                p.kill()
                p.join()
    return str(out)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [x.shape for x in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, references, parallel_runs):
    layout = LAYOUTS[name]
    kind = "fp8" if name.startswith("fp8") else "fp32"
    world = layout.get("tp", 1) * layout.get("dp", 1)
    ranks = [torch.load(os.path.join(parallel_runs, name, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    ref = references[kind]

    worst_logit = worst_mtp = 0.0
    seen = set()
    for r in ranks:
        for i, got in r["requests"].items():
            want = ref["requests"][i]
            assert got["tokens"] == want["tokens"], f"{name} rank {ranks.index(r)} request {i}: greedy tokens differ"
            worst_logit = max(worst_logit, _max_diff(got["logits"], want["logits"]))
            worst_mtp = max(worst_mtp, _max_diff(got["mtp"], want["mtp"]))
            seen.add(i)
    assert seen == set(ref["requests"]), "every request ran on some replica"
    assert worst_logit < TOL and worst_mtp < TOL, (worst_logit, worst_mtp)

    for r in ranks:  # every TP rank of a replica holds the full logits, identical
        peer = next(p for p in ranks if p["dp_rank"] == r["dp_rank"])
        for i in r["requests"]:
            assert all(torch.equal(a, b) for a, b in zip(r["requests"][i]["logits"], peer["requests"][i]["logits"]))

    for layer, counts in ref["load"].items():  # each token copy counted once, by its owner
        assert torch.equal(ranks[0]["load_total"][layer], counts), f"{name}: layer {layer} expert load"
    if layout.get("ep", 1) > 1:
        assert any(not torch.equal(p, torch.arange(len(p)) % 14) for p in ranks[0]["phy2log"].values())
    if layout.get("dp", 1) > 1:
        assert sum(r["dummy_steps"] for r in ranks) > 0, "some replica idled through a dummy step"

    shares = [r["share"] for r in ranks]
    for s in shares:
        assert s.resident_bytes == s.expected_bytes, s
    print(f"\n{name}: max |dlogit| {worst_logit:.2e}, max |dMTP logit| {worst_mtp:.2e}, "
          f"dummy steps {[r['dummy_steps'] for r in ranks]}, rank seconds {[round(r['seconds'], 1) for r in ranks]}")
    for s in shares:
        print(f"  rank {s.rank}: resident {s.resident_bytes} B = expected {s.expected_bytes} B "
              f"({s.resident_bytes / s.full_model_bytes:.3f} of one-rank {s.full_model_bytes} B)")


# ---- in-process units --------------------------------------------------------------------------------------


def test_layout_validation():
    from engine.model.parallel import ParallelLayout

    cfg = preset_config("tiny", **MODEL)
    assert ParallelLayout(tp=2, sp=True, dp=2, ep=4, num_redundant_experts=2).world == 4
    for bad, match in [(dict(sp=True), "needs tp > 1"), (dict(tp=2, ep=3), "ep must be 1 or"),
                       (dict(dp=2, num_redundant_experts=2), "need expert parallelism"), (dict(tp=0), ">= 1")]:
        with pytest.raises(ValueError, match=match):
            ParallelLayout(**bad)
    with pytest.raises(ValueError, match="divide evenly over ep=4"):
        ParallelLayout(dp=4, ep=4).check_model(cfg)  # 14 experts over 4 ranks
    with pytest.raises(ValueError, match="num_attention_heads"):
        ParallelLayout(tp=8).check_model(cfg)


def test_placement_tables_and_replica_rule():
    from engine.model.placement import ExpertPlacement

    p = ExpertPlacement.default(14, 2, ep_size=4, ep_rank=3)  # slots 12..15 = experts 12, 13, 0, 1
    assert p.phy2log.tolist() == list(range(14)) + [0, 1] and p.local_logical == [12, 13, 0, 1]
    assert p.logcnt.tolist()[:3] == [2, 2, 1] and p.log2phy[0].tolist() == [0, 14] and p.log2phy[2].tolist() == [2, -1]
    ids = torch.tensor([[0, 1, 5], [0, 1, 13], [0, 2, 7]])
    assert p.physical_ids(ids).tolist() == [[14, 15, 5], [14, 15, 13], [14, 2, 7]]  # a local replica first
    p0 = ExpertPlacement.default(14, 2, ep_size=4, ep_rank=1)  # holds neither copy of 0 or 1
    assert p0.physical_ids(ids).tolist() == [[0, 1, 5], [14, 15, 13], [0, 2, 7]]  # token index % replicas
    assert p0.logical_counts(torch.ones(16, dtype=torch.long)).tolist() == [2, 2] + [1] * 12
    ident = ExpertPlacement.default(8)
    assert ident.physical_ids(ids[:, :2]).data_ptr() == ids[:, :2].data_ptr()  # world size 1: no lookup
    for bad, match in [([0, 1, 2], "divide evenly"), ([0, 1, 1, 1], "have no slot"), ([0, 1, 9, 2], r"\[0, 4\)")]:
        with pytest.raises(ValueError, match=match):
            ExpertPlacement(bad, 4, ep_size=2)


def test_install_placement_is_checked_then_switched():
    from engine.model.layers import ParallelGroup
    from engine.model.moe import MoE

    cfg = preset_config("tiny", **MODEL)
    moe = MoE(cfg, torch.float32, ParallelGroup(rank=1, size=2), num_redundant_experts=0)  # slots 7..13
    for name, p in moe.named_parameters():
        p.data.normal_(generator=torch.Generator().manual_seed(len(name)))
    x = torch.randn(6, cfg.hidden_size)
    moe._physical_load[:] = torch.arange(14)
    new = list(range(7, 14)) + list(range(7))  # this rank's slots now hold experts 0..6
    with pytest.raises(ValueError, match="change expert but no weights"):
        moe.install_placement(new, {7: moe.experts.slot_weights(0)})
    with pytest.raises(ValueError, match="not on this rank"):
        moe.install_placement(new, {0: moe.experts.slot_weights(0)})
    assert moe.placement.local_logical == list(range(7, 14)) and moe._physical_load.sum() == 91  # untouched
    weights = {7 + j: {"w13": torch.full((2 * 32, 64), float(j)), "w2": torch.full((64, 32), float(j))}
               for j in range(7)}
    assert moe.install_placement(new, weights) == list(range(7, 14))
    assert moe.placement.local_logical == list(range(7)) and torch.equal(moe.experts.w2[3], torch.full((64, 32), 3.0))
    load = moe.read_expert_load()
    assert load.physical.sum() == 0 and load.logical.tolist() == list(range(14))  # carried across the switch
    assert moe.read_expert_load().logical.sum() == 0  # reset


def test_token_split_ownership():
    from engine.model.layers import ParallelGroup
    from engine.model.token_split import TokenSplit

    def owned(t, tp):
        return [(s.start, s.num_owned) for s in (TokenSplit(ParallelGroup(r, tp), True, t) for r in range(tp))]

    assert owned(7, 2) == [(0, 4), (4, 3)]
    assert owned(1, 2) == [(0, 1), (1, 0)]  # T < tp: the last rank owns none
    assert owned(5, 4) == [(0, 2), (2, 2), (4, 1), (6, 0)]
    assert owned(0, 2) == [(0, 0), (0, 0)]
    single = TokenSplit(ParallelGroup.single(), False, 3)
    x = torch.randn(3, 4)
    assert all(f(x) is x for f in (single.reduce, single.gather, single.scatter, single.owned, single.from_owned))


def test_world_size_one_runs_no_collective(checkpoints, monkeypatch):
    import torch.distributed as dist

    from engine.model.attention import AttentionMetadata

    for fn in ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single", "broadcast"):
        monkeypatch.setattr(dist, fn, lambda *a, _fn=fn, **k: pytest.fail(f"{_fn} at world size 1"))
    model = scenario.load_model(checkpoints["fp32"], ParallelContext.single(), fp8=False)
    with torch.inference_mode():
        h = model(torch.arange(9), torch.arange(9), AttentionMetadata.no_cache([4, 5]))
        model.compute_logits(h)
        model.mtp[0].logits(model.mtp_forward(0, torch.arange(1, 10), h, torch.arange(9),
                                              AttentionMetadata.no_cache([4, 5])))
        model.dummy_forward()


def test_loader_reads_only_selected_tensors_and_slices(tmp_path, monkeypatch):
    from engine.checkpoint import loader
    from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
    from engine.model.layers import ParallelGroup
    from engine.model.parallel import ParallelLayout

    cfg = fp8_config(preset_config("tiny", intermediate_size=512, **MODEL))  # dense gate_proj: 4 row blocks
    path = str(tmp_path / "fp8")
    save_checkpoint(path, cfg, quantize_tensors(checkpoint_schema(cfg), random_tensors(cfg, 2, torch.float32)))
    full = dict(loader.iter_checkpoint_tensors(path, cfg, torch.float32, progress=False))  # dequantized
    read: dict[str, object] = {}  # name -> the slice it was read with (None: whole)
    real_get = loader._get
    monkeypatch.setattr(loader, "_get", lambda h, f, name, part=None: read.update({name: part}) or
                        real_get(h, f, name, part))
    # rank 1 of TP2 × EP2 (no process group needed to build and load it)
    ctx = ParallelContext(ParallelLayout(tp=2, ep=2), 1, ParallelGroup(1, 2), ParallelGroup(1, 2))
    model = DeepseekV3ForCausalLM(cfg, torch.float32, parallel=ctx)  # dequantize-on-load
    loaded = model.load_weights(loader.iter_checkpoint_tensors(path, cfg, torch.float32, progress=False,
                                                                select=model.checkpoint_filter()))
    assert not any(".experts.3." in n for n in read) and any(".experts.7." in n for n in read)  # slots 7..13 only
    assert len(loaded) == len([n for n in full if ".experts." not in n or int(n.split(".")[5]) >= 7])
    assert torch.equal(model.layers[1].mlp.experts.w2[0], full["model.layers.1.mlp.experts.7.down_proj.weight"])
    cuts = {"model.embed_tokens.weight": model.embed_tokens.weight,  # bf16-stored: read as a slice
            "model.layers.0.mlp.gate_proj.weight": model.layers[0].mlp.gate_proj.weight,  # FP8, whole blocks
            "model.layers.1.self_attn.q_b_proj.weight": model.layers[1].self_attn.q_b_proj.weight}  # FP8, half a block
    for name, param in cuts.items():
        assert torch.equal(param, full[name][param.shape[0]:]), name  # TP rank 1's rows
    assert read["model.embed_tokens.weight"] == loader.TensorSlice(0, 256, 256)
    assert read["model.layers.0.mlp.gate_proj.weight_scale_inv"] == loader.TensorSlice(0, 2, 2)
    assert read["model.layers.1.self_attn.q_b_proj.weight"] is None  # through a block: read whole, cut after
    name = "model.layers.0.mlp.gate_proj.weight"
    raw = dict(loader.iter_checkpoint_tensors(path, cfg, None, progress=False, keep_fp8=True,
                                              select=lambda n: loader.TensorSlice(0, 256, 256) if n == name else False))
    whole = dict(loader.iter_checkpoint_tensors(path, cfg, None, progress=False, keep_fp8=True,
                                                select=lambda n: n == name))
    assert set(raw) == {name, name + "_scale_inv"}
    assert torch.equal(raw[name].view(torch.uint8), whole[name][256:].view(torch.uint8))
    assert torch.equal(raw[name + "_scale_inv"], whole[name + "_scale_inv"][2:])  # the slice's 2 of 4 row blocks

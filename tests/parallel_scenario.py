"""One serving scenario run by every rank of a parallel instance, and by one process as the reference.

Requests (prompts of different lengths) are spread over the DP replicas (request
``i`` -> replica ``i % dp``). A fixed global schedule, the same on every rank:

1. prefill chunk A: each prompt's first ``CHUNK`` tokens (a long chunk: the naive
   MLA path), written to the paged cache through each request's block table;
2. prefill chunk B: the rest of the long prompts, attending to chunk A's rows in
   the cache (<= 8 new tokens: the batched absorbed path);
3. decode steps, one token each, greedy, for a per-request number of steps.

After every pass the MTP layer runs over the pass's positions (next ids known:
prompt tokens or the token just sampled), writing its own cache layer. A replica
with no request in a step runs ``dummy_forward`` + ``dummy_mtp_forward``. Every
rank records, for its replica's requests, the logits of every row, the MTP
logits of every row and the greedy tokens; plus its expert load, its weight
share and (EP) a placement switch before the first decode step.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from engine.checkpoint.loader import iter_checkpoint_tensors
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.model.parallel import ParallelContext, ParallelLayout, init_parallel
from engine.model.weight_share import weight_share

CHUNK = 10
BLOCK_SIZE = 4
PROMPT_LENS = [13, 5, 18, 3, 9]
DECODE_STEPS = [4, 2, 5, 3, 1]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def schedule() -> list[list[tuple[int, int]]]:
    """Per global step: (request, new tokens) for every request that runs."""
    steps = [[(i, min(n, CHUNK)) for i, n in enumerate(PROMPT_LENS)],
             [(i, n - CHUNK) for i, n in enumerate(PROMPT_LENS) if n > CHUNK]]
    for d in range(max(DECODE_STEPS)):
        steps.append([(i, 1) for i, n in enumerate(DECODE_STEPS) if d < n])
    return steps


def block_table(request: int, num_tokens: int) -> list[int]:
    """Scattered, distinct blocks per request (the same on every rank of a replica)."""
    per_request = -(-num_tokens // BLOCK_SIZE)
    return [(request + 5 * j) % 64 + 64 * (j % 2) for j in range(per_request)]


def load_model(path: str, ctx: ParallelContext, fp8: bool) -> DeepseekV3ForCausalLM:
    cfg = ModelConfig.from_dir(path)
    model = DeepseekV3ForCausalLM(cfg, torch.float32, parallel=ctx, fp8=fp8)
    model.load_weights(iter_checkpoint_tensors(path, cfg, torch.float32, progress=False, keep_fp8=fp8,
                                               select=model.checkpoint_filter()))
    return model.eval()


def expert_slot_weights(path: str, model: DeepseekV3ForCausalLM, layer: int, slots: dict[int, int],
                        fp8: bool) -> dict[int, dict[str, torch.Tensor]]:
    """{physical slot: its new expert's tensors} read from the checkpoint (a rebalancer copies them from peers)."""
    want = {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for e in slots.values()
            for p in ("gate_proj", "up_proj", "down_proj")}
    got = dict(iter_checkpoint_tensors(path, model.cfg, torch.float32, progress=False, keep_fp8=fp8,
                                       select=lambda name: name in want))
    out = {}
    for slot, e in slots.items():
        p = f"model.layers.{layer}.mlp.experts.{e}."
        w = {"w13": torch.cat([got[p + "gate_proj.weight"], got[p + "up_proj.weight"]]),
             "w2": got[p + "down_proj.weight"]}
        if fp8:
            w["w13_scale_inv"] = torch.cat([got[p + "gate_proj.weight_scale_inv"], got[p + "up_proj.weight_scale_inv"]])
            w["w2_scale_inv"] = got[p + "down_proj.weight_scale_inv"]
        out[slot] = w
    return out


def switch_placement(path: str, model: DeepseekV3ForCausalLM, fp8: bool) -> None:
    """Every MoE layer: experts rotated by 3 slots, redundant slots re-assigned to other experts."""
    for layer, moe in model.moe_layers().items():
        placement = moe.placement
        e, s = placement.num_logical, placement.num_slots
        phy2log = [(j + 3) % e for j in range(e)] + [(5 + 4 * r) % e for r in range(s - e)]
        first = placement.local_start
        mine = {slot: phy2log[slot] for slot in range(first, first + placement.slots_per_rank)}
        moe.install_placement(phy2log, expert_slot_weights(path, model, layer, mine, fp8))


@torch.inference_mode()
def run(model: DeepseekV3ForCausalLM, ctx: ParallelContext, ckpt: str, fp8: bool, switch: bool) -> dict:
    cfg = model.cfg
    mine = [i for i in range(len(PROMPT_LENS)) if i % ctx.layout.dp == ctx.dp_rank]
    seqs = {i: p for i, p in enumerate(prompts(cfg.vocab_size)) if i in mine}
    caches = [torch.zeros(128, BLOCK_SIZE, cfg.kv_cache_width) for _ in range(model.num_cache_layers)]
    done = {i: 0 for i in mine}
    rec = {i: {"logits": [], "mtp": [], "tokens": []} for i in mine}
    dummy_steps = 0
    for step_no, step in enumerate(schedule()):
        if switch and step_no == 2:
            switch_placement(ckpt, model, fp8)
        work = [(i, n) for i, n in step if i in mine]
        if not work:
            model.dummy_forward()
            model.dummy_mtp_forward(0)
            dummy_steps += 1
            continue
        ids, pos, tables = [], [], []
        for i, n in work:
            ids += seqs[i][done[i]:done[i] + n]
            pos += range(done[i], done[i] + n)
            tables.append(block_table(i, done[i] + n + 1))
        q_lens, ctx_lens = [n for _, n in work], [done[i] + n for i, n in work]
        meta = AttentionMetadata.paged(q_lens, ctx_lens, tables, BLOCK_SIZE, caches, torch.device("cpu"))
        hidden = model(torch.tensor(ids), torch.tensor(pos), meta)  # [T, D]
        logits = model.compute_logits(hidden)  # [T, V]
        row = 0
        for i, n in work:
            rec[i]["logits"].append(logits[row:row + n])
            if done[i] + n == len(seqs[i]):  # fully computed: sample greedily
                tok = int(logits[row + n - 1].argmax())
                seqs[i] = seqs[i] + [tok]
                rec[i]["tokens"].append(tok)
            row += n
        next_ids = [t for i, n in work for t in seqs[i][done[i] + 1:done[i] + n + 1]]
        mtp_meta = AttentionMetadata.paged(q_lens, ctx_lens, tables, BLOCK_SIZE, caches, torch.device("cpu"))
        mtp_logits = model.mtp[0].logits(model.mtp_forward(0, torch.tensor(next_ids), hidden, torch.tensor(pos),
                                                           mtp_meta))
        row = 0
        for i, n in work:
            rec[i]["mtp"].append(mtp_logits[row:row + n])
            done[i] += n
            row += n
    load = {layer: x.logical for layer, x in model.read_expert_load().items()}
    physical_after_switch = {layer: moe.placement.phy2log.clone() for layer, moe in model.moe_layers().items()}
    return {"requests": rec, "load": load, "phy2log": physical_after_switch, "dummy_steps": dummy_steps}


def _run_layout(rank: int, world: int, layout: dict, ckpt: str, fp8: bool, out_dir: str) -> None:
    t0 = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ctx = init_parallel(ParallelLayout(**layout))
        model = load_model(ckpt, ctx, fp8)
        share = weight_share(model)
        result = run(model, ctx, ckpt, fp8, switch=ctx.layout.ep > 1)
        totals = {}
        for layer, counts in result["load"].items():  # the instance's load: summed over every rank
            totals[layer] = counts.clone()
            dist.all_reduce(totals[layer])
        result.update(share=share, load_total=totals, dp_rank=ctx.dp_rank, tp_rank=ctx.tp.rank,
                      seconds=time.perf_counter() - t0)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def worker(rank: int, jobs: list[tuple[str, dict, str, bool]], out_dir: str) -> None:
    """Process ``rank`` of a spawn: for each (name, layout, checkpoint, fp8) job it belongs to (rank < the
    layout's world size), a fresh gloo group (FileStore under ``out_dir/name``; gloo's connections on
    127.0.0.1), the scenario, results to ``out_dir/name/rank<r>.pt``."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    for name, layout, ckpt, fp8 in jobs:
        world = layout.get("tp", 1) * layout.get("dp", 1)
        if rank < world:
            _run_layout(rank, world, layout, ckpt, fp8, os.path.join(out_dir, name))

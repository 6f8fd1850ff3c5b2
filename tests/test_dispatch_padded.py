"""MoE dispatch with an agreed token bound (one padded exchange of counts and rows) against the
two-exchange path: real processes, a real gloo group on 127.0.0.1.

Three EP ranks with different token counts (one with none, as an idle DP replica's dummy pass),
fp32 and bf16 rows: the received rows, the counts per local slot and the combined output must be
bit-identical, and the padded path must make one collective fewer per layer."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.model.dispatch import MoEDispatcher
from engine.model.layers import ParallelGroup

WORLD, SLOTS, K, D = 3, 9, 3, 64
TOKENS = [5, 0, 7]  # per rank


def _rank(rank: int, store_dir: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        group = ParallelGroup(rank, WORLD, dist.group.WORLD, tuple(range(WORLD)))
        calls = [0]
        plain_all_to_all = ParallelGroup.all_to_all

        def counted(self, *a, **kw):
            calls[0] += 1
            return plain_all_to_all(self, *a, **kw)

        ParallelGroup.all_to_all = counted
        gen = torch.Generator().manual_seed(rank)
        n = TOKENS[rank]
        results = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, D, generator=gen).to(dtype)
            phys = torch.stack([torch.randperm(SLOTS, generator=gen)[:K] for _ in range(n)]) if n else \
                torch.zeros(0, K, dtype=torch.long)
            weights = torch.rand(n, K, generator=gen)
            for bound in (None, max(TOKENS)):
                d = MoEDispatcher(group)
                d.max_tokens = bound
                calls[0] = 0
                rows, counts, handle = d.dispatch(x, phys, weights, SLOTS)
                out = d.combine(rows.float().mul(2).add(1).to(dtype), handle)  # a stand-in for the experts
                results[(str(dtype), bound)] = (rows, counts, out, calls[0])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_padded_dispatch_equals_the_two_exchange_path(tmp_path):
    mp.start_processes(_rank, args=(str(tmp_path), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for dtype in ("torch.float32", "torch.bfloat16"):
            rows, counts, out, calls = res[(dtype, None)]
            p_rows, p_counts, p_out, p_calls = res[(dtype, max(TOKENS))]
            assert torch.equal(rows, p_rows) and counts == p_counts and torch.equal(out, p_out), (rank, dtype)
            assert rows.shape[0] == sum(counts) > 0  # every rank's experts received rows
            assert out.shape == (TOKENS[rank], 64)
            assert (calls, p_calls) == (3, 2)

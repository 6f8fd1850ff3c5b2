"""The CPU kernel's AVX512-BF16 products for a bf16 model (engine/kernels/cpu_gemm.cpp, VDPBF16PS): bf16 rows
times bf16 weights summed in fp32, for the grouped GEMM (projections, experts), the per-head absorbed MLA
products and the decode attention.

Each must equal the fp32 arithmetic on the same bf16 values to bf16's precision, at every tail the tiles
have (rows per weight 1-9, weight rows not a multiple of 4, K not a multiple of 32, keys not a multiple of
the 64-row block or odd); the engine's greedy tokens must not change. They run only on a CPU with
AVX512-BF16 (that part skips elsewhere); the switch that turns them off, and what it leaves, is checked on
every CPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels import cpu_gemm
from kernel_marks import HAS_DOT, needs_dot, needs_kernel


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within a few bf16 roundings of the fp32 products' scale (the rows and the sums' order differ)."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1.5e-2 * scale)


@needs_kernel
def test_the_switch_follows_the_cpu():
    """On where the CPU has AVX512-BF16 (unless PDSERVE_CPU_KERNEL_BF16_DOT=0), refused where it has not."""
    cpu_gemm.load()
    assert cpu_gemm.bf16_dot() == (HAS_DOT and cpu_gemm._module().bf16_dot_enabled())
    if not HAS_DOT:
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            cpu_gemm.set_bf16_dot(True)
    was = cpu_gemm.set_bf16_dot(False)
    try:
        assert not cpu_gemm.bf16_dot() and not cpu_gemm._module().bf16_dot_enabled()
        # off: bf16 rows are widened, the fp32 arithmetic rounded at the end, bit for bit
        w = torch.randn(2, 40, 72).bfloat16()
        x = torch.randn(5, 72).bfloat16()
        got = cpu_gemm.grouped_gemm(x, w, [2, 3])
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, cpu_gemm.grouped_gemm(x.float(), w, [2, 3]).bfloat16())
        # and the prefill attention is not taken (the naive pass runs torch's instead)
        q = torch.zeros(2, 1, 8).bfloat16()
        assert not cpu_gemm.prefill_fits(q, q, 32, 2)
        with pytest.raises(RuntimeError, match="mla_prefill: needs the AVX512-BF16 products"):
            cpu_gemm.mla_prefill(q, q, q, q[:, 0], torch.zeros(2, 1, 32).bfloat16(), 1.0)
    finally:
        cpu_gemm.set_bf16_dot(was)


@needs_dot
@pytest.mark.parametrize("counts", [[1], [2, 0, 1], [3, 4], [9, 0, 5, 1], [16]])
@pytest.mark.parametrize("n, k", [(37, 40), (130, 96), (64, 1024), (5, 8)])
def test_grouped_gemm_of_bf16_rows(bf16_dot, counts, n, k):
    torch.manual_seed(n + k + len(counts))
    w = torch.randn(len(counts), n, k).bfloat16()
    x = torch.randn(sum(counts), k).bfloat16()
    got = cpu_gemm.grouped_gemm(x, w, counts)
    assert got.dtype == torch.bfloat16 and got.shape == (sum(counts), n)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    want = torch.cat([x[s:s + c].float() @ w[e].float().T for e, (s, c) in enumerate(zip(starts, counts)) if c])
    _close(got, want)


@needs_dot
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
def test_head_gemm_of_bf16_rows_reads_and_writes_strided_views(bf16_dot, rows):
    """bf16 rows that are a slice of a wider tensor (q_nope of q_b_proj's output), per-head weights apart, the
    fp32 result written into a slice; nothing outside it changes."""
    torch.manual_seed(rows)
    heads, k, n = 3, 40, 70
    x = torch.randn(rows, heads, k + 24).bfloat16()[..., :k]
    w = torch.randn(heads, n + 10, k).bfloat16()[:, 10:]
    want = torch.einsum("mhk,hnk->mhn", x.float(), w.float())
    wide = torch.full((rows, heads, n + 8), 7.0)
    cpu_gemm.head_gemm(x, w, wide[..., :n])
    _close(wide[..., :n], want)
    assert bool((wide[..., n:] == 7.0).all())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("k", [8, 40, 128])
def test_head_gemm_from_pair_layout(rows, k):
    """Per-head weights in cpu_gemm.pair_layout (a bf16 model's W_UK and W_UV where the products are on): bf16
    rows that are a slice of a wider tensor, by the products where the CPU has them (to bf16's precision), and
    with them off (rows widened: the fp32 arithmetic, every row tail of the 8-row and 4-row tiles); the fp32
    result written into a slice, nothing outside it changed."""
    cpu_gemm.load()
    torch.manual_seed(rows * 100 + k)
    heads, n = 3, 64
    x = torch.randn(rows, heads, k + 24).bfloat16()[..., :k]
    w = torch.randn(heads, n, k).bfloat16()
    assert cpu_gemm.pair_fits(w) and not cpu_gemm.pair_fits(w[:, :40]) and not cpu_gemm.pair_fits(w.float())
    pairs = cpu_gemm.pair_layout(w)
    assert pairs.shape == (heads, n // 32, k // 2, 32, 2)
    want = torch.einsum("mhk,hnk->mhn", x.float(), w.float())
    was = cpu_gemm.bf16_dot()
    try:
        for dot in (True, False) if HAS_DOT else (False,):
            cpu_gemm.set_bf16_dot(dot)
            wide = torch.full((rows, heads, n + 8), 7.0)
            cpu_gemm.head_gemm(x, pairs, wide[..., :n])
            if dot:
                _close(wide[..., :n], want)
            else:
                torch.testing.assert_close(wide[..., :n], want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cpu_gemm.head_gemm(x.float(), pairs), want, rtol=1e-5, atol=1e-5)
            assert bool((wide[..., n:] == 7.0).all())
    finally:
        cpu_gemm.set_bf16_dot(was)
    with pytest.raises(RuntimeError, match="pair layout"):
        cpu_gemm.head_gemm(x, pairs.float())


@needs_dot
@pytest.mark.parametrize("tokens, k", [(1, 4), (3, 2), (8, 4), (16, 6)])
def test_moe_experts_of_bf16_rows(bf16_dot, tokens, k):
    """The routed experts whole: the SiLU product rounded to bf16 between the GEMMs, as torch's bf16 experts
    round it; the weighted sum in fp32, rounded once."""
    torch.manual_seed(tokens * 10 + k)
    slots, hidden, inter = 12, 64, 40
    w13 = (torch.randn(slots, 2 * inter, hidden) * 0.2).bfloat16()
    w2 = (torch.randn(slots, hidden, inter) * 0.2).bfloat16()
    x = torch.randn(tokens, hidden).bfloat16()
    phys = torch.stack([torch.randperm(slots)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    load = torch.zeros(slots, dtype=torch.long)
    got = cpu_gemm.moe_experts(x, phys, weights, w13, w2, load)
    assert got.dtype == torch.bfloat16
    _close(got, _experts(x, phys, weights, w13, w2))
    assert torch.equal(load, torch.bincount(phys.flatten(), minlength=slots))


def _experts(x, phys, weights, w13, w2):
    """The routed experts in fp32 on the same bf16 values, the SiLU product rounded to bf16."""
    inter = w2.shape[2]
    want = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for j in range(phys.shape[1]):
            e = phys[t, j]
            gate, up = (w13[e].float() @ x[t].float()).split(inter)
            act = (torch.nn.functional.silu(gate) * up).bfloat16().float()
            want[t] += weights[t, j] * (w2[e].float() @ act)
    return want


@needs_dot
def test_a_bf16_decode_step_of_up_to_64_tokens_runs_its_experts_whole(bf16_dot):
    """With the products, Experts.whole_step takes bf16 steps of up to DOT_WHOLE_MAX_TOKENS tokens in one call
    (several rows per expert); larger ones, and fp32 ones above GROUPED_MAX_ROWS, go to the dispatcher."""
    from engine.model.moe import Experts

    torch.manual_seed(3)
    slots, hidden, inter, k = 8, 64, 32, 2
    experts = Experts(slots, hidden, inter, torch.bfloat16)
    experts.w13.data.copy_(torch.randn(experts.w13.shape) * 0.2)
    experts.w2.data.copy_(torch.randn(experts.w2.shape) * 0.2)
    assert experts.use_cpu_kernel(cpu_gemm.kernel())
    for tokens in (Experts.GROUPED_MAX_ROWS + 1, Experts.DOT_WHOLE_MAX_TOKENS, Experts.DOT_WHOLE_MAX_TOKENS + 1):
        x = torch.randn(tokens, hidden).bfloat16()
        phys = torch.stack([torch.randperm(slots)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k)
        got = experts.whole_step(x, phys, weights, None)
        if tokens > Experts.DOT_WHOLE_MAX_TOKENS:
            assert got is None
        else:
            _close(got, _experts(x, phys, weights, experts.w13, experts.w2))
            assert experts.whole_step(x.float(), phys, weights, None) is None


def _attention(q, cache, slots, keys, rank, scale):
    out = torch.empty(q.shape[0], q.shape[1], rank)
    for m in range(q.shape[0]):
        rows = cache[slots[m, :keys[m]]].float()
        p = torch.softmax(q[m] @ rows.T * scale, -1)
        out[m] = p @ rows[:, :rank]
    return out


@needs_dot
@pytest.mark.parametrize("queries, heads, max_keys", [(1, 16, 300), (8, 16, 77), (3, 4, 1), (2, 12, 130),
                                                      (5, 8, 64)])
@pytest.mark.parametrize("rank", [64, 48])
def test_decode_attention_over_a_bf16_cache(bf16_dot, queries, heads, max_keys, rank):
    """Keys one to several 64-row blocks, odd counts (a row paired with weight 0), heads split over items; a
    latent width not a multiple of 32 takes the widened path, which must agree as well."""
    torch.manual_seed(queries * 1000 + max_keys + rank)
    width = rank + 16
    cache = (torch.randn(512, width) * 0.5).bfloat16()
    slots = torch.stack([torch.randperm(512)[:max_keys] for _ in range(queries)])
    keys = torch.randint(1, max_keys + 1, (queries,))
    keys[0] = max_keys
    seq = torch.arange(queries)
    q = torch.randn(queries, heads, width)
    got = cpu_gemm.mla_decode(q, cache, slots, seq, keys, rank, 0.2)
    _close(got, _attention(q, cache, slots, keys, rank, 0.2))


def _close_logprobs(a, b) -> None:
    """vLLM's criterion for two numerics of one model (its tests' check_logprobs_close): the greedy tokens are
    the same up to the first difference, and there each side's token is among the other's top logprobs (a
    near tie decided the other way); what follows conditions on different text and is not compared."""
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b):
        for pos, (x, y) in enumerate(zip(ids_a, ids_b)):
            if x != y:
                assert x in lp_b[pos] and y in lp_a[pos], f"position {pos}: {x} vs {y}, not near a tie"
                break


@needs_dot
def test_bundled_model_greedy_tokens_with_and_without_the_products():
    """The bundled model in bf16, with the AVX512-BF16 products and with the widened fp32 arithmetic: the same
    greedy tokens but for near ties, at batch 1 (projections by the products too) and batch 8 (attention and
    experts)."""
    from engine.args import default_model

    cpu_gemm.load()
    llm = LLM(default_model(), dtype="bfloat16", max_num_seqs=8, kv_cache_memory_gb=0.25)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
               "import numpy as np\n", "The quick brown fox", "Water boils at", "Dear Sir,"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = {}
    was = cpu_gemm.bf16_dot()
    try:
        for on in (True, False):
            cpu_gemm.set_bf16_dot(on)
            outs[on] = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                        for batch in (prompts[:1], prompts) for o in llm.generate(batch, params)]
    finally:
        cpu_gemm.set_bf16_dot(was)
    _close_logprobs(outs[True], outs[False])
    same = sum(a[0] == b[0] for a, b in zip(outs[True], outs[False]))
    assert same >= len(outs[True]) // 2  # near ties are the exception

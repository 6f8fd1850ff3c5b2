"""The CPU fast paths of the decode step: oneDNN-prepacked matmuls, the routed experts' kernel choice
and pdserve's own grouped GEMM for few rows per expert (engine/kernels/cpu_gemm.py).

Each path must compute what the plain one does (fp32, to rounding), and the engine must give the
same greedy tokens with each of them on and off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.dtype_choice import auto_dtype
from engine.kernels import cpu_gemm
from engine.model import layers
from engine.model.deepseek_v3 import MLA
from engine.model.moe import Experts, Gate
from kernel_marks import CAN_BUILD, HAS_AVX512, HAS_DOT, WIDTHS, avx512_code, needs_avx512, needs_kernel

HAS_PACKED = layers.pack_weight(torch.zeros(1024, 1024)) is not None


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
@pytest.mark.parametrize("rows", [1, 2, 8, 64, layers.PACKED_MAX_ROWS, layers.PACKED_MAX_ROWS + 1,
                                  2 * layers.PACKED_ROW_BUCKET, layers.PACKED_BUCKET_MAX_ROWS + 1])
def test_packed_linear_matches_f_linear(rows, monkeypatch):
    """The prepacked copy gives F.linear's product at every row count; above PACKED_MAX_ROWS an fp32 input's rows
    are padded up to a PACKED_ROW_BUCKET multiple for it (the padding's rows cut off again), past
    PACKED_BUCKET_MAX_ROWS F.linear takes it."""
    torch.manual_seed(0)
    w = torch.randn(1024, 768) / 32
    packed = layers.pack_weight(w)
    x = torch.randn(rows, 768)
    shapes = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda a, *rest: shapes.append(a.shape[0]) or onednn(a, *rest))
    with torch.inference_mode():
        out = layers.linear(x, w, packed)
    assert out.shape == (rows, 1024)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
    if rows <= layers.PACKED_MAX_ROWS:
        assert shapes == [rows]
    elif rows <= layers.PACKED_BUCKET_MAX_ROWS:
        assert shapes == [-(-rows // layers.PACKED_ROW_BUCKET) * layers.PACKED_ROW_BUCKET]
    else:
        assert shapes == []


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
def test_packed_linear_leaves_many_rows_to_autograd():
    """Where autograd records (a layer that trains), many rows go to F.linear: oneDNN's op has no backward."""
    torch.manual_seed(0)
    w = torch.randn(1024, 768) / 32
    packed = layers.pack_weight(w)
    x = torch.randn(layers.PACKED_MAX_ROWS + 1, 768, requires_grad=True)
    layers.linear(x, w, packed).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand_as(x), rtol=1e-4, atol=1e-4)


def test_pack_weight_declines_what_does_not_pay():
    assert layers.pack_weight(torch.zeros(64, 64)) is None  # under PACKED_BUCKETED_MIN_NUMEL: the call's cost dominates
    if HAS_PACKED:  # fp32 from PACKED_BUCKETED_MIN_NUMEL (a q_a_proj's 384 x 1024), bf16 only from PACKED_MIN_NUMEL
        assert layers.pack_weight(torch.zeros(384, 1024)) is not None
        assert layers.pack_weight(torch.zeros(384, 1024, dtype=torch.bfloat16)) is None
    assert layers.pack_weight(torch.zeros(4, 1024, 1024)) is None
    assert layers.pack_weight(torch.zeros(1024, 1024, dtype=torch.float16)) is None
    if auto_dtype("cpu").dtype != "bfloat16":  # no bf16 matrix instructions: bf16 stays with F.linear
        assert layers.pack_weight(torch.zeros(1024, 1024, dtype=torch.bfloat16)) is None


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
@pytest.mark.parametrize("rows", [3, 64, layers.PACKED_MAX_ROWS, layers.PACKED_MAX_ROWS + 1,
                                  2 * layers.PACKED_ROW_BUCKET])
def test_a_smaller_weights_packed_copy_takes_only_a_prefills_rows(rows, monkeypatch):
    """An fp32 weight under PACKED_MIN_NUMEL (from PACKED_BUCKETED_MIN_NUMEL) goes through its packed copy only above
    PACKED_MAX_ROWS, bucketed, so that decode batches make oneDNN no primitive per row count; fewer rows take the
    kernel (up to KERNEL_MAX_ROWS) or F.linear. The same numbers every way."""
    torch.manual_seed(rows)
    w = torch.randn(384, 1024) / 32
    assert layers.PACKED_BUCKETED_MIN_NUMEL <= w.numel() < layers.PACKED_MIN_NUMEL
    packed = layers.pack_weight(w)
    shapes = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda a, *rest: shapes.append(a.shape[0]) or onednn(a, *rest))
    x = torch.randn(rows, 1024)
    with torch.inference_mode():
        out = layers.linear(x, w, packed)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
    bucketed = -(-rows // layers.PACKED_ROW_BUCKET) * layers.PACKED_ROW_BUCKET
    assert shapes == ([] if rows <= layers.PACKED_MAX_ROWS else [bucketed])


@pytest.mark.skipif(auto_dtype("cpu").dtype != "bfloat16" or not HAS_PACKED,
                    reason="bf16 weights are prepacked only on a CPU with bf16 matrix instructions")
@pytest.mark.parametrize("rows", [1, 8, 32, layers.PACKED_MAX_ROWS + 1])
def test_packed_bf16_linear_matches_f_linear(rows):
    torch.manual_seed(1)
    w = (torch.randn(1024, 768) / 32).bfloat16()
    packed = layers.pack_weight(w)
    assert packed is not None
    x = torch.randn(rows, 768).bfloat16()
    with torch.inference_mode():
        out = layers.linear(x, w, packed)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_attention_by_bmm_copies_matches_einsum_over_views(dtype):
    """The torch path's contiguous W_UK / W_UV copies (one bmm each) and the latent columns sliced after the
    value product give the einsum over ``kv_b_proj``'s views; a weight that trains keeps the views."""
    import dataclasses

    from engine.model.attention import MLAWeights, _absorbed_batch

    torch.manual_seed(3)
    heads, nope, rope, v, rank, ctx_len, batch, queries = 4, 16, 8, 24, 32, 11, 5, 2
    weight = (torch.randn(heads * (nope + v), rank) / 8).to(dtype)
    fast = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.1)
    assert fast.w_uk_bmm.is_contiguous() and fast.w_uv_bmm.shape == (heads, rank, v)
    views = dataclasses.replace(fast, w_uk_bmm=None, w_uv_bmm=None)
    q_nope = torch.randn(batch, queries, heads, nope).to(dtype)
    q_pe = torch.randn(batch, queries, heads, rope).to(dtype)
    ctx = torch.randn(batch, ctx_len, rank + rope).to(dtype)
    key_mask = torch.ones(batch, queries, ctx_len, dtype=torch.bool)
    key_mask[:, 0, -1] = False
    with torch.inference_mode():
        got = _absorbed_batch(q_nope, q_pe, ctx, key_mask, fast)
        want = _absorbed_batch(q_nope, q_pe, ctx, key_mask, views)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    trained = MLAWeights.from_kv_b_proj(weight.float().requires_grad_(), heads, nope, v, 0.1)
    assert trained.w_uk_bmm is None and trained.w_uv_bmm is None


@needs_kernel
def test_the_kernel_builds_where_it_can():
    """Where the CPU and a compiler allow it, the kernel must load: a failed build is a bug here, not
    a reason to fall back quietly."""
    assert cpu_gemm.load() is not None, cpu_gemm.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("counts", [[1], [3, 0, 7, 1, 0, 2], [0, 0, 5], [16, 9, 4, 1], [33, 2]])
@pytest.mark.parametrize("n", [37, 128, 130])
def test_grouped_gemm_matches_per_expert_matmuls(counts, n):
    """Rows of any count per expert (tiles of 4 and the remainder), experts with none, an odd number of
    weight rows (the single-row tail) and blocks that end past N."""
    cpu_gemm.load()
    torch.manual_seed(len(counts) * n)
    k = 40
    w = torch.randn(len(counts), n, k)
    x = torch.randn(sum(counts), k)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    want = torch.cat([x[s:s + c] @ w[e].T for e, (s, c) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(cpu_gemm.grouped_gemm(x, w, counts), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_kernel_runs_on_torchs_threads():
    """Built without OpenMP, at::parallel_for is a serial loop: the kernel then reads weights at one
    core's bandwidth (half of two on the dev machine) and nothing else notices."""
    module = cpu_gemm.load()
    assert module.parallel_threads(64) == torch.get_num_threads()


@needs_kernel
def test_grouped_gemm_takes_experts_that_sit_apart():
    """The per-head blocks of a larger matrix (W_UV inside kv_b_proj): a stride between experts, no copy."""
    cpu_gemm.load()
    torch.manual_seed(1)
    whole = torch.randn(3, 24 + 16, 32)  # [H, Dn + Dv, R]
    w = whole[:, 24:]  # [H, Dv, R], experts 40 rows apart
    x = torch.randn(6, 32)
    want = torch.cat([x[2 * h:2 * h + 2] @ w[h].T for h in range(3)])
    torch.testing.assert_close(cpu_gemm.grouped_gemm(x, w, [2, 2, 2]), want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype, dot", [(torch.float32, False), (torch.bfloat16, False),
                                        pytest.param(torch.bfloat16, True, marks=pytest.mark.skipif(
                                            not HAS_DOT, reason="the AVX512-BF16 products need AVX512-BF16"))])
@pytest.mark.parametrize("rows, n", [(1, 4096), (3, 37), (4, 5), (2, 264)])
def test_gemm_argmax_is_the_argmax_of_grouped_gemm(dtype, dot, rows, n):
    """The draft head's tokens: the argmax of what grouped_gemm returns (a bf16 product's rounded values), the
    first of equal ones -- at every tail of the 8-lane scan, and on ties that exist only after rounding."""
    cpu_gemm.load()
    was = cpu_gemm.set_bf16_dot(dot)
    try:
        torch.manual_seed(rows * n)
        w = torch.randn(n, 64).to(dtype)
        w[n // 2] = w[n // 3]  # an exact tie, the later copy second
        x = torch.randn(rows, 64).to(dtype)
        want = cpu_gemm.grouped_gemm(x, w[None], [rows]).argmax(-1)
        assert torch.equal(cpu_gemm.gemm_argmax(x, w), want)
        # 1 + 2^-10 rounds to bf16's 1: in bf16 the earlier column (1.0) wins, in fp32 the later one
        w, x = torch.zeros(n, 64, dtype=dtype), torch.ones(1, 64, dtype=dtype)
        w[min(3, n - 2), 0], w[n - 1, 0], w[n - 1, 1] = 1.0, 1.0, 2.0 ** -10
        assert cpu_gemm.gemm_argmax(x, w).tolist() == [min(3, n - 2) if dtype == torch.bfloat16 else n - 1]
    finally:
        cpu_gemm.set_bf16_dot(was)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, layers.KERNEL_MAX_ROWS, layers.KERNEL_MAX_ROWS + 1, 40])
def test_linear_through_the_kernel_matches_f_linear(rows):
    """Up to KERNEL_MAX_ROWS rows the kernel, above it the prepacked (or plain) matmul: the same numbers."""
    torch.manual_seed(rows)
    w = torch.randn(1024, 768) / 32
    x = torch.randn(rows, 768)
    with torch.inference_mode():
        out = layers.linear(x, w, layers.pack_weight(w), cpu_gemm.kernel())
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("avx512", WIDTHS)
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, layers.KERNEL_COL_MAX_ROWS, layers.KERNEL_COL_MAX_ROWS + 1])
def test_fp32_linear_takes_column_tiles_up_to_their_limit(rows, avx512, monkeypatch):
    """An fp32 weight's kernel copy is in column tiles (bf16 where every value is one, fp32 otherwise; a weight
    whose rows are no multiple of 32 keeps kernel_copy's), and linear runs fp32 inputs of up to
    KERNEL_COL_MAX_ROWS through them (the grouped-GEMM kernel never reads that layout; past the limit the
    prepacked matmul), in AVX2 code and in AVX-512 code where the CPU has it: F.linear's numbers, bf16 copy and
    fp32 copy bit for bit the same."""
    torch.manual_seed(rows)
    w = (torch.randn(512, 1024) / 32).bfloat16().float()
    x = torch.randn(rows, 1024)
    with avx512_code(avx512):
        exact, inexact = layers.linear_kernel_weight(w), layers.linear_kernel_weight(w + 1e-4)
        assert exact.shape == inexact.shape == (1, 512 // 32, 1024, 32)
        assert exact.dtype == torch.bfloat16 and inexact.dtype == torch.float32
        monkeypatch.setenv("PDSERVE_CPU_KERNEL_BF16", "0")
        as_fp32 = layers.linear_kernel_weight(w)
        assert as_fp32.dtype == torch.float32
        odd = torch.randn(40, 1024)
        assert layers.linear_kernel_weight(odd).shape == odd.shape and not isinstance(
            layers.linear_kernel_weight(torch.nn.Parameter(odd, requires_grad=False)), torch.nn.Parameter)
        kernel = cpu_gemm.kernel()
        grouped, heads = [], []
        spy = lambda *a: grouped.append(a) or kernel(*a)  # noqa: E731
        monkeypatch.setattr(cpu_gemm, "head_gemm", lambda *a, _f=cpu_gemm.head_gemm: heads.append(a) or _f(*a))
        with torch.inference_mode():
            outs = [layers.linear(x, w, layers.pack_weight(w), spy, copy) for copy in (exact, as_fp32)]
    torch.testing.assert_close(outs[0], F.linear(x, w), rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[0], outs[1])
    assert not grouped and len(heads) == (2 if rows <= layers.KERNEL_COL_MAX_ROWS else 0)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 8, layers.KERNEL_MAX_ROWS, layers.KERNEL_MAX_ROWS + 1])
@pytest.mark.parametrize("avx512", [False, True])
def test_fp32_linear_takes_the_kernel_over_a_prepacked_weight_up_to_its_limit(rows, avx512, monkeypatch):
    """fp32: a weight without a prepacked copy takes the kernel up to KERNEL_MAX_ROWS rows, and so does one whose
    kernel copy is bf16 (half the bytes to read); a prepacked one read as fp32 up to KERNEL_OVER_PACKED_MAX_ROWS
    (2 on a CPU with AVX-512, where oneDNN is faster from 3 rows). The same numbers every way."""
    monkeypatch.setattr(layers, "KERNEL_OVER_PACKED_MAX_ROWS", 2 if avx512 else layers.KERNEL_MAX_ROWS)
    kernel = cpu_gemm.kernel()
    calls = []
    spy = lambda *a: calls.append(a) or kernel(*a)  # noqa: E731
    w = (torch.randn(512, 1024) / 32).bfloat16().float()  # bf16 values: layers.kernel_copy gives a bf16 copy
    x = torch.randn(rows, 1024)
    packed = layers.pack_weight(w)
    with torch.inference_mode():
        for prepacked, copy, limit in ((None, None, layers.KERNEL_MAX_ROWS),
                                       (packed, None, layers.KERNEL_OVER_PACKED_MAX_ROWS),
                                       (packed, layers.kernel_copy(w), layers.KERNEL_MAX_ROWS)):
            calls.clear()
            out = layers.linear(x, w, prepacked, spy, copy)
            torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
            assert bool(calls) is (rows <= (layers.KERNEL_MAX_ROWS if prepacked is None else limit))


@needs_kernel
@pytest.mark.parametrize("batch,queries", [(1, 1), (5, 1), (3, 2), (16, 1), (9, 2)])
def test_absorbed_attention_through_the_kernel_matches_einsum(batch, queries):
    """q·W_UK and o·W_UV per head through the kernel (up to KERNEL_MAX_ROWS rows per head, einsum above)
    give the einsum's numbers, for the batched decode pass and the one-sequence pass."""
    from engine.model.attention import MLAWeights, _absorbed_batch, _absorbed_one

    torch.manual_seed(batch * 10 + queries)
    heads, nope, rope, v, rank, ctx_len = 4, 16, 8, 24, 32, 11
    weight = torch.randn(heads * (nope + v), rank) / 8
    plain = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.1)
    cpu_gemm.load()
    fast = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.1, cpu_gemm.head_gemm,
                                     MLAWeights.kernel_layout(weight, heads, nope, v))
    q_nope, q_pe = torch.randn(batch, queries, heads, nope), torch.randn(batch, queries, heads, rope)
    ctx = torch.randn(batch, ctx_len, rank + rope)
    key_mask = torch.ones(batch, queries, ctx_len, dtype=torch.bool)
    key_mask[:, 0, -1] = False  # the first query does not see the last row (a speculative layout)
    with torch.inference_mode():
        torch.testing.assert_close(_absorbed_batch(q_nope, q_pe, ctx, key_mask, fast),
                                   _absorbed_batch(q_nope, q_pe, ctx, key_mask, plain), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_absorbed_one(q_nope[0], q_pe[0], ctx[0], fast),
                                   _absorbed_one(q_nope[0], q_pe[0], ctx[0], plain), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("query_lens, longer", [([1], 0), ([1, 1, 1, 1, 1], 0), ([2, 1, 3], 0), ([1] * 17, 0),
                                                ([1, 3], 130)])
@pytest.mark.parametrize("heads, lanes", [(12, False), (32, False), (32, True)])
def test_decode_attention_kernel_matches_torch(query_lens, longer, heads, lanes):
    """MLA decode attention by the kernel, reading rows where they lie in the paged cache (contexts of
    different lengths across blocks, speculative queries attending causal prefixes, heads split over
    items when the queries are few, contexts of several key blocks: the online softmax, every tail of
    the 16-key score tiles), equals the gathered-rows torch path; the other rows of the cache are never read.
    With AVX-512 (``lanes``) 16 heads at a time sit in the vector lanes (heads a multiple of 16)."""
    from engine.model.attention import AttentionMetadata, MLAWeights, mla_attention

    if lanes and not HAS_AVX512:
        pytest.skip("the heads-in-lanes decode attention needs a CPU with AVX-512")
    torch.manual_seed(len(query_lens) * 7 + sum(query_lens))
    nope, rope, v, rank, block = 16, 8, 24, 32, 4
    weight = torch.randn(heads * (nope + v), rank) / 8
    plain = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.2)
    cpu_gemm.load()
    fast = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.2, cpu_gemm.head_gemm,
                                     MLAWeights.kernel_layout(weight, heads, nope, v), cpu_gemm.mla_decode)
    context_lens = [q + 3 + 5 * i % 23 + longer for i, q in enumerate(query_lens)]
    free = torch.randperm(128).tolist()  # blocks in no order
    tables = [[free.pop() for _ in range(-(-n // block))] for n in context_lens]
    t = sum(query_lens)
    q_nope, q_pe = torch.randn(t, heads, nope), torch.randn(t, heads, rope)
    latent, k_pe = torch.randn(t, rank), torch.randn(t, rope)
    outs = []
    for w in (plain, fast):
        cache = torch.randn(128, block, rank + rope)
        cache[torch.tensor(free)] = 1e6  # blocks no sequence owns: attending a row of one would show
        torch.manual_seed(0)
        cache[torch.tensor([b for tb in tables for b in tb])] = torch.randn(sum(map(len, tables)), block, rank + rope)
        meta = AttentionMetadata.paged(query_lens, context_lens, tables, block, [cache], torch.device("cpu"))
        with avx512_code(lanes), torch.inference_mode():
            outs.append(mla_attention(q_nope, q_pe, latent, k_pe, w, meta, 0))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bf16", [False, True])
def test_head_gemm_reads_and_writes_strided_views(rows, bf16):
    """Per head x[m, h] @ w[h].T, with x a slice of a wider tensor (as q_nope is of q_b_proj's output), w's
    heads apart (as W_UV is in kv_b_proj's weight) or a bf16 copy of exact values, and the result written
    into a slice of a wider tensor (the absorbed query's latent part); nothing outside the slice changes."""
    cpu_gemm.load()
    torch.manual_seed(rows)
    heads, k, n = 3, 40, 70
    x = torch.randn(rows, heads, k + 24)[..., :k]
    w = torch.randn(heads, n + 10, k)[:, 10:]
    if bf16:
        w = w.to(torch.bfloat16)
    want = torch.einsum("mhk,hnk->mhn", x, w.float())
    wide = torch.full((rows, heads, n + 8), 7.0)
    got = cpu_gemm.head_gemm(x, w, wide[..., :n])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide[..., :n], want, rtol=1e-5, atol=1e-5)
    assert bool((wide[..., n:] == 7.0).all())
    torch.testing.assert_close(cpu_gemm.head_gemm(x, w), want, rtol=1e-5, atol=1e-5)  # a new tensor
    with pytest.raises(RuntimeError, match="do not agree"):
        cpu_gemm.head_gemm(x, w, torch.empty(rows, heads, n + 1))


@needs_kernel
@pytest.mark.parametrize("avx512", WIDTHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 9, 33])
def test_head_gemm_from_column_tiles(rows, avx512):
    """Per-head weights in cpu_gemm.col_layout (an fp32 model's W_UK and W_UV), in AVX2 code (3-row passes) and
    AVX-512 code (8-row passes) where the CPU has it: fp32 rows that are a slice of a wider tensor (every split
    of the rows over passes), the result written into a slice, nothing outside it changed; bf16 weights holding
    exact values give the fp32 weights' numbers bit for bit; with the tiles off the layout is refused."""
    torch.manual_seed(rows)
    heads, k, n = 3, 40, 64
    x = torch.randn(rows, heads, k + 24)[..., :k]
    w = torch.randn(heads, n, k).bfloat16().float()  # exact bf16 values
    want = torch.einsum("mhk,hnk->mhn", x, w)
    wide = torch.full((rows, heads, n + 8), 7.0)
    with avx512_code(avx512):
        assert cpu_gemm.col_fits(w) and cpu_gemm.col_fits(w.bfloat16()) and not cpu_gemm.col_fits(w[:, :40])
        cols = cpu_gemm.col_layout(w)
        assert cols.shape == (heads, n // 32, k, 32)
        cpu_gemm.head_gemm(x, cols, wide[..., :n])
        assert torch.equal(cpu_gemm.head_gemm(x, cpu_gemm.col_layout(w.bfloat16())), wide[..., :n])
        was = cpu_gemm.set_col_tiles(False)
        try:
            assert not cpu_gemm.col_fits(w)
            with pytest.raises(RuntimeError, match="column tiles are off"):
                cpu_gemm.head_gemm(x, cols)
        finally:
            cpu_gemm.set_col_tiles(was)
    torch.testing.assert_close(wide[..., :n], want, rtol=1e-5, atol=1e-5)
    assert bool((wide[..., n:] == 7.0).all())


@needs_avx512
@pytest.mark.parametrize("rows", [1, 4, 9, 33])
def test_column_tiles_are_the_same_in_avx2_and_avx512_code(rows):
    """Per output the two widths add the same products in k order: bit for bit the same result."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 2, 200), cpu_gemm.col_layout(torch.randn(2, 96, 200))
    outs = []
    for avx512 in (False, True):
        with avx512_code(avx512):
            outs.append(cpu_gemm.head_gemm(x, w))
    assert torch.equal(outs[0], outs[1])


@needs_kernel
@pytest.mark.parametrize("rows", [3, 40])
def test_fp32_model_takes_column_tiles(rows):
    """An fp32 MLA layer lays W_UK and W_UV out in column tiles (as grouped_gemm's tiles read them where the
    tiles are off); its absorbed decode products then run through the kernel past KERNEL_MAX_ROWS (torch's bmm
    before) with the plain path's numbers."""
    from engine.args import default_model
    from engine.model.attention import MLAWeights, _absorbed_one
    from engine.model.config import ModelConfig
    from engine.model.rope import RotaryEmbedding

    cpu_gemm.load()
    torch.manual_seed(rows)
    cfg = ModelConfig.from_dir(default_model())
    mla = MLA(cfg, 0, RotaryEmbedding(cfg, 64), torch.float32, layers.ParallelGroup.single())
    mla.kv_b_proj.weight.data.normal_(0, 0.1)
    assert mla.use_cpu_kernel(cpu_gemm.kernel())
    cols = cpu_gemm.col_tiles()
    assert mla.w_uk_t.dim() == mla.w_uv_kernel.dim() == (4 if cols else 3)
    fast = mla.mla_weights(torch.float32)
    heads, nope, rope, rank = mla.heads, mla.nope, mla.rope_dim, mla.kv_lora_rank
    plain = MLAWeights.from_kv_b_proj(mla.kv_b_proj.weight, heads, nope, mla.v_dim, cfg.softmax_scale)
    q_nope, q_pe = torch.randn(rows, heads, nope), torch.randn(rows, heads, rope)
    ctx = torch.randn(rows + 5, rank + rope)
    calls = []
    fast.kernel = lambda *a: calls.append(a[1].dim()) or cpu_gemm.head_gemm(*a)
    with torch.inference_mode():
        torch.testing.assert_close(_absorbed_one(q_nope, q_pe, ctx, fast), _absorbed_one(q_nope, q_pe, ctx, plain),
                                   rtol=1e-4, atol=1e-4)
    assert calls == ([4, 4] if cols else [3, 3] if rows <= layers.KERNEL_MAX_ROWS else [])


@needs_kernel
def test_decode_attention_kernel_refuses_what_it_cannot_read():
    cpu_gemm.load()
    q, cache, slots = torch.randn(1, 2, 48), torch.randn(10, 48), torch.tensor([[3, 4, 5]])
    one = torch.tensor([0])
    for args, msg in [((q, cache, slots, one, torch.tensor([4]), 32, 1.0), "has 4 keys"),
                      ((q, cache, torch.tensor([[3, 40, 5]]), one, torch.tensor([3]), 32, 1.0), "out of the cache"),
                      ((q, cache, slots, torch.tensor([1]), torch.tensor([2]), 32, 1.0), "names sequence 1"),
                      ((q, torch.randn(10, 40), slots, one, torch.tensor([2]), 32, 1.0), "40 wide")]:
        with pytest.raises(RuntimeError, match=msg):
            cpu_gemm.mla_decode(*args)


@needs_kernel
def test_grouped_gemm_refuses_inputs_it_does_not_fit():
    cpu_gemm.load()
    w, x = torch.randn(2, 16, 8), torch.randn(3, 8)
    for bad, msg in [((x, w, [1, 1]), "counts sum to 2"), ((x, w, [3]), "1 counts for 2 experts"),
                     ((torch.randn(3, 12), torch.randn(2, 16, 12), [1, 2]), "multiple of 8"),
                     ((x.double(), w, [1, 2]), "x \\[T, K\\] float32"),
                     ((x, w.half(), [1, 2]), "weights float32 or bfloat16")]:
        with pytest.raises(RuntimeError, match=msg):
            cpu_gemm.grouped_gemm(*bad)


def test_kernel_off_by_environment_says_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_gemm, "_state", {})
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    with caplog.at_level("WARNING", logger="engine.kernels.cpu_gemm"):
        assert cpu_gemm.load() is None
    assert cpu_gemm.unavailable_reason() == "PDSERVE_CPU_KERNELS=0"
    assert "PDSERVE_CPU_KERNELS=0" in caplog.text
    experts = Experts(4, 64, 32, torch.float32)
    assert experts.use_cpu_kernel(cpu_gemm.kernel()) is False and experts.cpu_kernel is False
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_gemm.grouped_gemm(torch.zeros(1, 8), torch.zeros(1, 8, 8), [1])


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul"))])
@pytest.mark.parametrize("cpu_kernel", [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize("tokens", [1, 2, 5, 40, 300])
def test_expert_kernels_agree(tokens, cpu_kernel, packed):
    """Few active slots run expert by expert, many run as one padded bmm, few rows per expert through
    the CPU kernel, a prefill's many rows expert by expert (each padded to Experts.ROWS_BUCKET rows; through
    oneDNN's prepacked copies where held): same result every way."""
    torch.manual_seed(tokens)
    e, d, inter, k = 8, 64, 32, 2
    experts = Experts(e, d, inter, torch.float32)
    with torch.no_grad():
        experts.w13.normal_(std=0.1)
        experts.w2.normal_(std=0.1)
    assert experts.use_cpu_kernel(cpu_gemm.kernel() if cpu_kernel else None) is cpu_kernel  # its copies: of these
    if packed:
        assert experts.pack() == (experts.w13.numel() + experts.w2.numel()) * 4
    ids = torch.randint(0, e, (tokens * k,))
    counts = torch.bincount(ids, minlength=e).tolist()
    x = torch.randn(tokens * k, d)
    with torch.inference_mode():
        out = experts(x, counts)
        looped = _per_expert(experts, x, counts)
    torch.testing.assert_close(out, looped, rtol=1e-5, atol=1e-5)


def _per_expert(experts: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """What ``experts(x, counts)`` computes, by F.linear expert by expert."""
    out, start = [], 0
    for i, n in enumerate(counts):
        if n:
            g, u = F.linear(x[start:start + n], experts.w13[i]).chunk(2, -1)
            out.append(F.linear(F.silu(g) * u, experts.w2[i]))
            start += n
    return torch.cat(out)


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
def test_engine_tokens_same_with_and_without_prepacking():
    """The bundled model: its heads (4096 x 256) are prepacked, its small projections are not."""
    prompts = [[(7 * i + 3 * j) % 4000 + 2 for j in range(5 + 3 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for prepack in (True, False):
        llm = LLM(dtype="float32", prepack_weights=prepack, cpu_kernels=False, speculative="mtp",
                  kv_cache_memory_gb=0.05)
        model = llm.engine.executor.runner.model
        assert (model.lm_head.packed is not None) == prepack
        assert (model.mtp[0].shared_head.head.packed is not None) == prepack
        assert model.layers[0].self_attn.o_proj.packed is None  # 256 x 128: not worth a oneDNN call
        outs[prepack] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


@needs_kernel
def test_engine_tokens_same_with_and_without_the_cpu_kernel():
    """The bundled model with MTP (batches of 1-6 sequences, 1-2 rows per expert per step): the kernel is
    on for every routed-expert layer, projection, head, router, attention and norm, the MTP layer's
    included, and greedy tokens do not change."""
    prompts = [[(5 * i + 11 * j) % 4000 + 2 for j in range(4 + 5 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for on in (True, False):
        llm = LLM(dtype="float32", cpu_kernels=on, speculative="mtp", kv_cache_memory_gb=0.05)
        model = llm.engine.executor.runner.model
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and all(m.cpu_kernel is on for m in experts)
        others = [m for m in model.modules() if isinstance(m, (layers._Linear, layers.ParallelLMHead, Gate, MLA))]
        assert {m.kernel is not None for m in others} == {on}
        norms = [m for m in model.modules() if isinstance(m, layers.RMSNorm)]
        assert norms and {m.kernel is not None for m in norms} == {on}
        outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


@needs_kernel
@pytest.mark.parametrize("counts", [[1], [3, 0, 7, 1, 0, 2], [16, 9, 4, 1]])
@pytest.mark.parametrize("n", [37, 130])
def test_grouped_gemm_reads_bf16_weights_as_their_fp32_values(counts, n):
    """bf16 weights widen exactly in the kernel: the result is the fp32 weights' result, bit for bit."""
    cpu_gemm.load()
    torch.manual_seed(n + len(counts))
    k = 96
    w = torch.randn(len(counts), n, k).to(torch.bfloat16)
    x = torch.randn(sum(counts), k)
    out = cpu_gemm.grouped_gemm(x, w, counts)
    assert torch.equal(out, cpu_gemm.grouped_gemm(x, w.float(), counts))
    want = torch.cat([x[sum(counts[:e]):sum(counts[:e]) + c] @ w[e].float().T for e, c in enumerate(counts) if c])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_kernel_copy_is_bf16_only_where_every_value_is(monkeypatch):
    exact = torch.randn(64, 32).to(torch.bfloat16).float()
    copy = layers.kernel_copy(exact)
    assert copy.dtype == torch.bfloat16 and copy.is_contiguous() and torch.equal(copy.float(), exact)
    strided = exact.view(4, 16, 32)[:, 8:]  # a per-head slice (W_UV's layout): copied dense
    assert torch.equal(layers.kernel_copy(strided).float(), strided) and layers.kernel_copy(strided).is_contiguous()
    inexact = exact.clone()
    inexact[3, 5] += 2.0 ** -20  # one value below bf16's precision
    assert layers.kernel_copy(inexact) is inexact
    assert layers.kernel_copy(exact.double()).dtype == torch.float64  # not the kernel's: left alone
    monkeypatch.setenv("PDSERVE_CPU_KERNEL_BF16", "0")
    assert layers.kernel_copy(exact) is exact


@needs_kernel
def test_bf16_checkpoint_in_fp32_decodes_the_same_through_bf16_copies(monkeypatch):
    """The bundled model is stored in bf16; run in fp32, the kernel reads bf16 copies of every weight it
    takes (the MTP layer's included) and tokens and logprobs are exactly those of reading fp32 weights (the kernel
    taking the same rows both ways: on AVX-512 it leaves fp32-read prepacked weights to oneDNN from 3 rows)."""
    monkeypatch.setattr(layers, "KERNEL_OVER_PACKED_MAX_ROWS", layers.KERNEL_MAX_ROWS)
    prompts = [[(5 * i + 11 * j) % 4000 + 2 for j in range(4 + 5 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = {}
    for bf16 in (True, False):
        monkeypatch.setenv("PDSERVE_CPU_KERNEL_BF16", "1" if bf16 else "0")
        llm = LLM(dtype="float32", speculative="mtp", kv_cache_memory_gb=0.05)
        model = llm.engine.executor.runner.model
        want = torch.bfloat16 if bf16 else torch.float32
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        assert experts and {m.w13_kernel.dtype for m in experts} == {m.w2_kernel.dtype for m in experts} == {want}
        attention = [m for m in model.modules() if isinstance(m, MLA)]
        assert {m.w_uk_t.dtype for m in attention} == {m.w_uv_kernel.dtype for m in attention} == {want}
        linears = {n: m for n, m in model.named_modules() if isinstance(m, (layers._Linear, layers.ParallelLMHead, Gate))}
        assert all(m.kernel_weight is None for n, m in linears.items() if n.endswith("kv_b_proj"))
        assert {m.kernel_weight.dtype for n, m in linears.items() if not n.endswith("kv_b_proj")} == {want}
        outs[bf16] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
def test_prefill_experts_run_on_packed_copies_that_follow_slot_rewrites(monkeypatch):
    """fp32 experts hold a prepacked copy per slot: a prefill's experts (more than PADDED_MAX_ROWS rows) run on
    them in ROWS_BUCKET-row multiples, not where autograd records, and a slot rewrite (live rebalancing) packs
    that slot again; bf16 experts hold none."""
    torch.manual_seed(0)
    e, d, inter = 4, 64, 32
    experts = Experts(e, d, inter, torch.float32)
    with torch.no_grad():
        experts.w13.normal_(std=0.1)
        experts.w2.normal_(std=0.1)
    assert experts.pack() > 0 and len(experts.packed) == e
    counts = [70, 0, 100, 33]
    x = torch.randn(sum(counts), d)

    rows = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda a, *rest: rows.append(a.shape[0]) or onednn(a, *rest))
    experts.set_slot(2, {"w13": torch.randn(2 * inter, d) / 8, "w2": torch.randn(d, inter) / 8})
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, counts), _per_expert(experts, x, counts), rtol=1e-5, atol=1e-5)
    assert rows == [96, 96, 128, 128, 64, 64]  # gate/up, then down, of experts 0, 2, 3
    rows.clear()
    x.requires_grad_(True)
    experts(x, counts).sum().backward()  # F.linear: oneDNN's op has no backward
    assert rows == [] and x.grad is not None
    assert Experts(e, d, inter, torch.bfloat16).pack() == 0


@needs_kernel
def test_expert_slot_rewrites_keep_the_kernel_copies_true():
    """Live rebalancing writes expert slots: the bf16 copies follow (in column tiles on a CPU with AVX-512); a
    slot whose new weights are not bf16 values sends the kernel back to the fp32 weights (or fp32 column tiles
    of them), and the result stays the plain matmuls'."""
    torch.manual_seed(0)
    e, d, inter = 4, 64, 32
    experts = Experts(e, d, inter, torch.float32)
    with torch.no_grad():
        experts.w13.copy_((torch.randn_like(experts.w13) / 8).to(torch.bfloat16))
        experts.w2.copy_((torch.randn_like(experts.w2) / 8).to(torch.bfloat16))
    assert experts.use_cpu_kernel(cpu_gemm.kernel())
    assert experts.w13_kernel.dtype == torch.bfloat16
    counts = [2, 1, 0, 3]
    x = torch.randn(sum(counts), d)

    new = {"w13": (torch.randn(2 * inter, d) / 8).to(torch.bfloat16).float(),
           "w2": (torch.randn(d, inter) / 8).to(torch.bfloat16).float()}
    experts.set_slot(1, new)
    cols = experts.w13_kernel.dim() == 4
    assert cols is cpu_gemm.col_tiles()
    laid = (lambda w: cpu_gemm.col_layout(w[None])[0]) if cols else (lambda w: w)  # noqa: E731
    assert experts.w13_kernel.dtype == torch.bfloat16 and torch.equal(experts.w13_kernel[1].float(), laid(new["w13"]))
    assert torch.equal(experts.w2_kernel[1].float(), laid(new["w2"]))
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, counts), _per_expert(experts, x, counts), rtol=1e-5, atol=1e-5)
    experts.set_slot(3, {"w13": torch.randn(2 * inter, d) / 8, "w2": torch.randn(d, inter) / 8})  # not bf16 values
    if cols:
        experts.set_slot(0, {"w13": torch.randn(2 * inter, d) / 8, "w2": torch.randn(d, inter) / 8})  # fp32 tiles
        assert torch.equal(experts.w13_kernel, cpu_gemm.col_layout(experts.w13))
        assert torch.equal(experts.w2_kernel, cpu_gemm.col_layout(experts.w2))
    else:
        assert experts.w13_kernel.data_ptr() == experts.w13.data_ptr()
        assert experts.w2_kernel.data_ptr() == experts.w2.data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(experts(x, counts), _per_expert(experts, x, counts), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
@pytest.mark.parametrize("ctx_len", [7, layers.PACKED_MAX_ROWS, layers.PACKED_MAX_ROWS + 44])
def test_naive_prefill_expands_the_latent_through_the_packed_kv_b(ctx_len):
    """The naive prefill pass expands a context's latent with oneDNN's prepacked ``kv_b`` (up to
    PACKED_MAX_ROWS context rows; F.linear above): the same attention output as the plain weight."""
    from engine.model.attention import MLAWeights, _naive

    torch.manual_seed(ctx_len)
    heads, nope, v, rank, rope = 16, 128, 128, 512, 64  # the bench preset's kv_b: 4096 x 512, worth packing
    weight = torch.randn(heads * (nope + v), rank) / 24
    packed = layers.pack_weight(weight)
    assert packed is not None
    plain = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.1)
    fast = MLAWeights.from_kv_b_proj(weight, heads, nope, v, 0.1, kv_b_packed=packed)
    q_nope, q_pe, ctx = torch.randn(ctx_len, heads, nope), torch.randn(ctx_len, heads, rope), torch.randn(ctx_len, rank + rope)
    with torch.inference_mode():
        torch.testing.assert_close(_naive(q_nope, q_pe, ctx, fast), _naive(q_nope, q_pe, ctx, plain), rtol=1e-4, atol=1e-4)


def _norm_cases():
    torch.manual_seed(0)
    for dim, lead, strided in [(7, (1,), False), (256, (1,), True), (512, (8,), True), (1024, (33,), False),
                               (7168, (3,), False), (24, (2, 3), False), (1024, (200,), False)]:
        x = torch.randn(*lead, dim + 64 if strided else dim) * 5
        yield dim, x[..., :dim]  # a view, as the latent split off kv_a_proj's output is


def _formula(norm, x):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def test_rmsnorm_fused_on_cpu_fp32_is_the_formula_bit_for_bit():
    """Without the kernel, RMSNorm is ATen's one fused op: the formula's numbers exactly."""
    for dim, x in _norm_cases():
        norm = layers.RMSNorm(dim, 1e-6, torch.float32)
        norm.weight.data.normal_()
        assert torch.equal(norm(x), _formula(norm, x))


@needs_kernel
def test_rmsnorm_through_the_kernel_is_the_formula():
    """With the kernel (what use_cpu_kernels sets), one call per norm: the formula within fp32 rounding, on
    rows that sit apart, leading dims, lengths that are not a multiple of the vector width, rows over threads."""
    cpu_gemm.load()
    for dim, x in _norm_cases():
        norm = layers.RMSNorm(dim, 1e-6, torch.float32)
        norm.weight.data.normal_()
        norm.kernel = cpu_gemm.rms_norm
        got = norm(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got, _formula(norm, x), rtol=2e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        cpu_gemm.rms_norm(torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="w \\[D\\]"):
        cpu_gemm.rms_norm(torch.ones(2, 8), torch.ones(4), 1e-6)


@needs_kernel
def test_rmsnorm_of_a_bf16_model_through_the_kernel_rounds_as_its_formula():
    """A bf16 model's norms through the kernel: the bf16 formula's numbers (the normalized rows rounded to bf16,
    times the weight, rounded again); a value apart at most where the fp32 sum's order tips a rounding."""
    cpu_gemm.load()
    for dim, x in _norm_cases():
        norm = layers.RMSNorm(dim, 1e-6, torch.bfloat16)
        norm.weight.data.normal_()
        xb = x.to(torch.bfloat16)
        want = norm(xb)  # RMSNorm.forward's own bf16 formula (no kernel set yet)
        norm.kernel = cpu_gemm.rms_norm
        got = norm(xb)
        assert got.dtype == torch.bfloat16 and got.shape == xb.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)  # one bf16 ulp
        assert (got != want).float().mean() < 0.01


@needs_kernel
@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_through_the_kernel_is_the_formula_bit_for_bit(interleave, dtype):
    """``cpu_gemm.rope``: RotaryEmbedding's formula to the bit (the products and sums rounded as ATen's separate
    ops round them, bf16 to nearest even), for queries' heads with the shared key, a lone key row cut from a
    wider projection (strided), one and many positions, YaRN's scaled tables; positions over threads."""
    import json

    from engine.args import default_model
    from engine.model.config import ModelConfig
    from engine.model.rope import RotaryEmbedding

    cpu_gemm.load()
    with open(f"{default_model()}/config.json") as f:
        raw = json.load(f)
    raw.update(rope_interleave=interleave, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0})
    cfg = ModelConfig.from_dict(raw)
    assert cfg.yarn is not None and cfg.qk_rope_head_dim == 32
    rope = RotaryEmbedding(cfg, 4096)
    g = torch.Generator().manual_seed(0)
    for t in (1, 3, 700):
        positions = torch.randint(0, 4096, (t,), generator=g)
        wide = torch.randn(t, 48, generator=g).to(dtype)
        for x in (torch.randn(t, 5, 32, generator=g).to(dtype), wide[:, 16:][:, None]):
            rope.kernel = None
            want = rope(x, positions)
            rope.kernel = cpu_gemm.rope
            got = rope(x, positions)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, want), (got - want).abs().max()
    with pytest.raises(RuntimeError, match="dim even"):
        cpu_gemm.rope(torch.ones(2, 3, 7), torch.ones(2, 3), torch.ones(2, 3), True)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_gemm.rope(torch.ones(2, 3, 8), torch.ones(2, 3), torch.ones(2, 4), True)


def test_mla_weights_are_kept_until_what_they_view_changes():
    """``MLA.mla_weights`` builds the attention's weights once, and again when the kernel, its copies, the
    packing or the weight's storage change; an FP8 kv_b_proj is dequantized on every call."""
    from engine.args import default_model
    from engine.model.config import ModelConfig
    from engine.model.rope import RotaryEmbedding

    cfg = ModelConfig.from_dir(default_model())
    mla = MLA(cfg, 0, RotaryEmbedding(cfg, 64), torch.float32, layers.ParallelGroup.single())
    first = mla.mla_weights(torch.float32)
    assert mla.mla_weights(torch.float32) is first and first.kernel is None
    if CAN_BUILD:
        assert mla.use_cpu_kernel(cpu_gemm.kernel())
        fast = mla.mla_weights(torch.float32)
        assert fast is not first and fast.kernel is not None and fast.w_uk_t is mla.w_uk_t
        assert mla.mla_weights(torch.float32) is fast
        mla.use_cpu_kernel(None)
        assert mla.mla_weights(torch.float32).kernel is None
    kept = mla.mla_weights(torch.float32)
    mla.kv_b_proj.weight.data = torch.randn_like(mla.kv_b_proj.weight)  # new storage: the old views are stale
    fresh = mla.mla_weights(torch.float32)
    assert fresh is not kept and fresh.kv_b.data_ptr() == mla.kv_b_proj.weight.data_ptr()
    fp8 = MLA(cfg, 0, RotaryEmbedding(cfg, 64), torch.float32, layers.ParallelGroup.single(), fp8=True)
    assert fp8.mla_weights(torch.float32) is not fp8.mla_weights(torch.float32)


@needs_kernel
@pytest.mark.parametrize("experts, groups, keep, k, bias, renormalize", [
    (32, 4, 2, 4, True, True), (256, 8, 4, 8, True, True), (16, 1, 1, 2, False, True), (64, 8, 3, 6, True, False),
    (384, 1, 1, 8, True, True)])
def test_routing_through_the_kernel_matches_the_gate(experts, groups, keep, k, bias, renormalize):
    """DeepSeek-V3's sigmoid routing (bias for the choice, group-limited) in one kernel call chooses the
    experts Gate's torch ops choose, with the same weights, for 1 to 300 tokens (rows over threads)."""
    import types

    cpu_gemm.load()
    torch.manual_seed(experts + k)
    cfg = types.SimpleNamespace(n_routed_experts=experts, hidden_size=64, topk_method="noaux_tc" if bias else "greedy",
                                num_experts_per_tok=k, n_group=groups, topk_group=keep, scoring_func="sigmoid",
                                norm_topk_prob=renormalize, routed_scaling_factor=2.5)
    gate = Gate(cfg)
    gate.weight.data.normal_(std=0.05)  # logits ~N(0, 0.4^2): no sigmoid saturating to a tie at 1.0
    if bias:
        gate.e_score_correction_bias.data.normal_(std=0.1)
    for tokens in (1, 8, 300):
        x = torch.randn(tokens, 64)
        gate.route = None
        want_ids, want_w = gate(x)
        gate.use_cpu_route(True)
        assert gate.route is not None
        ids, w = gate(x)
        assert ids.dtype == torch.long and w.dtype == torch.float32 and ids.shape == w.shape == (tokens, k)
        ids, order = ids.sort(-1)
        want_ids, want_order = want_ids.sort(-1)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_routing_kernel_survives_nan_logits_and_refuses_bad_shapes():
    cpu_gemm.load()
    ids, w = cpu_gemm.route(torch.full((3, 32), float("nan")), None, 4, 2, 4, True, 1.0)
    assert ids.shape == (3, 4) and bool(((ids >= 0) & (ids < 32)).all())
    with pytest.raises(RuntimeError, match="choosing 5"):
        cpu_gemm.route(torch.randn(2, 8), None, 4, 1, 5, True, 1.0)  # 2 experts left in one group, 5 asked
    with pytest.raises(RuntimeError, match="float32"):
        cpu_gemm.route(torch.randn(2, 8, dtype=torch.float64), None, 1, 1, 2, True, 1.0)


@needs_kernel
@pytest.mark.parametrize("tokens, k", [(1, 1), (1, 4), (8, 4), (16, 2), (5, 8)])
@pytest.mark.parametrize("bf16", [False, True])
def test_small_step_experts_in_one_call_match_the_dispatcher(tokens, k, bf16):
    """A small step's routed experts through ``moe_experts`` (sort, both GEMMs, SiLU, weighted sum, load
    counts) give the dispatcher + expert module + combine's outputs and the same expert-load sample; with
    bf16 copies of exact weights too."""
    from engine.model.dispatch import MoEDispatcher

    cpu_gemm.load()
    torch.manual_seed(tokens * 10 + k)
    slots, hidden, inter = 12, 64, 40
    experts = Experts(slots, hidden, inter, torch.float32)
    for p in (experts.w13, experts.w2):
        p.data.normal_(std=0.2)
        if bf16:
            p.data = p.data.to(torch.bfloat16).float()  # exact bf16 values: the kernel reads bf16 copies
    assert experts.use_cpu_kernel(cpu_gemm.kernel())
    assert (experts.w13_kernel.dtype == torch.bfloat16) is bf16
    x = torch.randn(tokens, hidden)
    phys = torch.stack([torch.randperm(slots)[:k] for _ in range(tokens)])  # distinct slots per token
    weights = torch.rand(tokens, k)
    load = torch.zeros(slots, dtype=torch.long)
    got = experts.whole_step(x, phys, weights, load)
    dispatcher = MoEDispatcher(layers.ParallelGroup.single())
    rows, counts, handle = dispatcher.dispatch(x, phys, weights, slots)
    want = dispatcher.combine(experts(rows, counts), handle)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(load, handle.slot_counts)
    assert experts.whole_step(torch.randn(Experts.GROUPED_MAX_ROWS + 1, hidden), phys[:1].repeat(17, 1),
                              weights[:1].repeat(17, 1), None) is None  # more tokens: the dispatcher's path
    with pytest.raises(RuntimeError, match="outside the 12 slots"):
        cpu_gemm.moe_experts(x, phys + slots, weights, experts.w13_kernel, experts.w2_kernel)


@needs_kernel
@pytest.mark.parametrize("tokens, k", [(1, 4), (8, 4), (16, 2)])
def test_bf16_experts_through_the_kernel_are_the_fp32_products_rounded(tokens, k, widened_bf16):
    """A bf16 model's experts without the AVX512-BF16 products: the kernel reads the bf16 weights as they are
    (no copy) on inputs widened to fp32, so its outputs are the fp32 model's on the same values, rounded to
    bf16; torch's bf16 path agrees within bf16's precision. (With them: tests/test_bf16_dot.py.)"""
    from engine.model.dispatch import MoEDispatcher

    torch.manual_seed(tokens + k)
    slots, hidden, inter = 12, 64, 40
    fp32, bf16 = Experts(slots, hidden, inter, torch.float32), Experts(slots, hidden, inter, torch.bfloat16)
    for a, b in ((fp32.w13, bf16.w13), (fp32.w2, bf16.w2)):
        b.data.copy_(torch.randn(b.shape) * 0.2)
        a.data.copy_(b.data.float())
    assert bf16.kernel_fits and fp32.use_cpu_kernel(cpu_gemm.kernel()) and bf16.use_cpu_kernel(cpu_gemm.kernel())
    assert bf16.w13_kernel.data_ptr() == bf16.w13.data_ptr() and bf16.w2_kernel.data_ptr() == bf16.w2.data_ptr()
    x = torch.randn(tokens, hidden).bfloat16()
    phys = torch.stack([torch.randperm(slots)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k)
    got = bf16.whole_step(x, phys, weights, None)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp32.whole_step(x.float(), phys, weights, None).bfloat16())
    dispatcher = MoEDispatcher(layers.ParallelGroup.single())
    rows, counts, _ = dispatcher.dispatch(x, phys, weights, slots)
    grouped = bf16(rows, counts)  # the dispatcher's path, few rows per expert: the grouped kernel
    assert grouped.dtype == torch.bfloat16 and torch.equal(grouped, fp32(rows.float(), counts).bfloat16())
    bf16.use_cpu_kernel(None)
    torch.testing.assert_close(bf16(rows, counts).float(), grouped.float(), rtol=3e-2, atol=3e-2)


@needs_kernel
@pytest.mark.parametrize("query_lens", [[1], [1, 1, 1, 1, 1], [2, 1, 3], [1] * 17])
@pytest.mark.parametrize("dot", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_DOT, reason="the AVX512-BF16 products need a CPU with AVX512-BF16"))])
def test_bf16_decode_attention_through_the_kernel_is_the_fp32_one_rounded(query_lens, dot, request):
    """A bf16 model's decode attention: up to KERNEL_MAX_ROWS queries the kernel reads the bf16 cache rows and
    weights widened to fp32 (so its output is the fp32 kernel's on the same values, rounded to bf16); more
    queries take torch's bf16 path, which agrees within bf16's precision. With the kernel's AVX512-BF16
    products it takes every decode query, in bf16 arithmetic: within bf16's precision too."""
    from engine.model.attention import AttentionMetadata, MLAWeights, mla_attention

    request.getfixturevalue("bf16_dot" if dot else "widened_bf16")

    torch.manual_seed(sum(query_lens) + len(query_lens))
    heads, nope, rope, v, rank, block = 12, 16, 8, 24, 32, 4
    weight = (torch.randn(heads * (nope + v), rank) / 8).bfloat16()
    cpu_gemm.load()

    def weights(w):
        return MLAWeights.from_kv_b_proj(w, heads, nope, v, 0.2, cpu_gemm.head_gemm,
                                         MLAWeights.kernel_layout(w, heads, nope, v), cpu_gemm.mla_decode)

    context_lens = [q + 3 + 5 * i % 23 for i, q in enumerate(query_lens)]
    tables = [[i * 16 + j for j in range(-(-n // block))] for i, n in enumerate(context_lens)]
    t = sum(query_lens)
    q_nope, q_pe = torch.randn(t, heads, nope).bfloat16(), torch.randn(t, heads, rope).bfloat16()
    latent, k_pe = torch.randn(t, rank).bfloat16(), torch.randn(t, rope).bfloat16()
    cache = torch.randn(len(query_lens) * 16, block, rank + rope).bfloat16()
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        c = cache.to(dtype)
        meta = AttentionMetadata.paged(query_lens, context_lens, tables, block, [c], torch.device("cpu"))
        with torch.inference_mode():
            outs.append(mla_attention(q_nope.to(dtype), q_pe.to(dtype), latent.to(dtype), k_pe.to(dtype),
                                      weights(weight.to(dtype)), meta, 0))
    assert outs[0].dtype == torch.bfloat16
    if t <= layers.KERNEL_MAX_ROWS and not dot:
        assert torch.equal(outs[0], outs[1].bfloat16())
    else:
        torch.testing.assert_close(outs[0].float(), outs[1], rtol=3e-2, atol=3e-2)


@needs_kernel
def test_bf16_linear_takes_the_kernel_only_for_weights_too_small_to_prepack():
    """A bf16 projection of at most KERNEL_MAX_ROWS rows: an unpacked (small) weight runs through the kernel,
    its output the fp32 kernel's on the same values rounded to bf16; a prepacked one stays with oneDNN."""
    cpu_gemm.load()
    kernel = cpu_gemm.kernel()
    torch.manual_seed(5)
    w = (torch.randn(384, 256) / 16).bfloat16()
    x = torch.randn(8, 256).bfloat16()
    with torch.inference_mode():
        got = layers.linear(x, w, None, kernel, w)
        want = layers.linear(x.float(), w.float(), None, kernel, w)  # the fp32 kernel reading the same bf16 values
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
        calls = []
        spy = lambda *a: calls.append(a) or kernel(*a)  # noqa: E731
        big = (torch.randn(1024, 1024) / 32).bfloat16()
        packed = layers.pack_weight(big)
        layers.linear(torch.randn(8, 1024).bfloat16(), big, packed, spy, big)
        assert (calls == []) is (packed is not None)

"""FP8 weights kept FP8: activation quantization, the CPU GEMM, the layers, loading, the engine."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint.fp8 import dequantize_block_fp8, quantize_block_fp8
from engine.checkpoint.loader import iter_checkpoint_tensors
from engine.llm import LLM
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.model.fp8 import (
    FP8,
    TILE_ROWS,
    act_quant,
    dequant_tile,
    fp8_linear,
    gemm_backend,
    is_fp8_checkpoint,
)
from engine.model.layers import ColumnParallelLinear, ParallelGroup, RowParallelLinear
from engine.sampling_params import SamplingParams

# A config with every projection dimension >= 128, so the 128x128 blocks and 1x128 groups matter.
SMALL = {"hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 128, "q_lora_rank": 128,
         "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
         "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory, bench_fp8_tool) -> tuple[str, str]:
    """The same random weights as bf16 and in DeepSeek's FP8 layout."""
    return bench_fp8_tool.make_checkpoints(str(tmp_path_factory.mktemp("fp8lin")), "tiny", seed=5, **SMALL)


def test_act_quant_groups_and_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-3, 2, 300)  # groups of very different magnitude
    x[1, 128:256] = 0  # an all-zero group
    q, s = act_quant(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (3, 3) and s.dtype == torch.float32
    assert s[1, 1] == 1.0 and (q[1, 128:256].float() == 0).all()
    deq = q.float() * s.repeat_interleave(128, -1)[:, :300]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half the subnormal step (2^-10 * scale)
    bound = x.abs() * 2**-4 + s.repeat_interleave(128, -1)[:, :300] * 2**-10
    assert ((deq - x).abs() <= bound + 1e-12).all()
    assert torch.allclose(q.float().abs().amax(-1), torch.full((3,), 448.0))  # the group amax lands on 448
    q2, s2 = act_quant(x, pow2_scale=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2)  # powers of two
    assert (s2 >= s).all() and (s2 < 2 * s).all()
    assert (q2.float().abs() <= 448).all()


def test_dequant_tile_is_bitwise_dequantize_block_fp8():
    w = torch.randn(300, 200) / 7
    wq, ws = quantize_block_fp8(w)
    ref = dequantize_block_fp8(wq, ws, torch.bfloat16)
    for r0, r1 in [(0, 300), (128, 256), (256, 300), (0, 128)]:
        assert torch.equal(dequant_tile(wq, ws, r0, r1, torch.bfloat16), ref[r0:r1])


@pytest.mark.parametrize("out_features", [200, TILE_ROWS + 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_fp8_linear_matches_dequantized_weight(out_features, dtype):
    g = torch.Generator().manual_seed(1)
    wq, ws = quantize_block_fp8(torch.randn(out_features, 320, generator=g) / 16)
    x = torch.randn(2, 5, 320, generator=g).to(dtype)
    got = fp8_linear(x, wq, ws)
    want = F.linear(x, dequantize_block_fp8(wq, ws, dtype))
    assert got.dtype == dtype and got.shape == (2, 5, out_features)
    assert gemm_backend(x.device) == "dequant"
    # same bf16 weight values, same matmul; only the output tiling differs
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_fp8_layers_hold_e4m3_and_scales():
    tp1 = ParallelGroup.single()
    col = ColumnParallelLinear(300, 384, torch.bfloat16, tp1, fp8=True)
    assert col.weight.dtype == FP8 and col.weight.shape == (384, 300)
    assert col.weight_scale_inv.shape == (3, 3)
    assert col.weight_scale_inv.dtype == torch.float32 and col.weight_scale_inv.shard_dim == 0
    bf = ColumnParallelLinear(300, 384, torch.bfloat16, tp1)
    assert bf.weight.dtype == torch.bfloat16 and not hasattr(bf, "weight_scale_inv")
    # a TP shard must be whole 128-blocks, or its scales could not be cut with it
    with pytest.raises(ValueError, match="128-wide blocks"):
        RowParallelLinear(320, 256, torch.bfloat16, ParallelGroup(rank=0, size=2), fp8=True)


def test_model_keeps_fp8_and_matches_dequantize_on_load(small_pair, bench_fp8_tool):
    src, fp8 = small_pair
    cfg = ModelConfig.from_dir(fp8)
    assert is_fp8_checkpoint(cfg) and not is_fp8_checkpoint(ModelConfig.from_dir(src))
    q = bench_fp8_tool.load_model(fp8)
    deq = bench_fp8_tool.load_model(fp8, fp8=False)
    attn = q.layers[1].self_attn
    assert attn.q_b_proj.weight.dtype == FP8 and q.layers[1].mlp.experts.w13.dtype == FP8
    assert q.mtp[0].block.mlp.experts.w2.dtype == FP8  # the MTP block too
    assert q.mtp[0].eh_proj.weight.dtype == torch.bfloat16  # stored bf16 in DeepSeek's FP8 release
    assert not any(p.dtype == torch.bfloat16 and p.shape == attn.q_b_proj.weight.shape
                   for p in q.parameters())  # no resident bf16 copy of a quantized weight
    g = torch.Generator().manual_seed(2)
    lens = [7, 40]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    from engine.model.attention import AttentionMetadata

    meta = AttentionMetadata.no_cache(lens)
    with torch.no_grad():
        a = deq.compute_logits(deq(ids, pos, meta))
        b = q.compute_logits(q(ids, pos, meta))
    # the CPU FP8 path computes with exactly the dequantized bf16 weights
    assert (a - b).abs().max().item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.95


def test_resident_bytes_about_half(small_pair, capsys, bench_fp8_tool):
    src, fp8 = small_pair
    ref, q = bench_fp8_tool.load_model(src), bench_fp8_tool.load_model(fp8)
    stored = {n for n, p in q.named_parameters() if p.dtype == FP8}
    (rt, rp), (qt, qp) = bench_fp8_tool.resident_bytes(ref, stored), bench_fp8_tool.resident_bytes(q, stored)
    with capsys.disabled():
        print(f"\nresident weights: bf16 {rt} B, FP8 {qt} B ({qt / rt:.3f}); projections {rp} -> {qp} ({qp / rp:.3f})")
    assert 0.5 < qp / rp < 0.505  # e4m3 = half of bf16, + one fp32 per 128x128 block
    assert qt < 0.75 * rt  # embeddings, lm_head, norms and router stay bf16/fp32


def test_loading_dequantized_tensors_into_fp8_params_fails(small_pair):
    _, fp8 = small_pair
    cfg = ModelConfig.from_dir(fp8)
    model = DeepseekV3ForCausalLM(cfg, dtype=torch.bfloat16, fp8=True)
    with pytest.raises(ValueError, match="keep_fp8"):
        model.load_weights(iter_checkpoint_tensors(fp8, cfg, torch.bfloat16, progress=False))


def test_fp8_vs_bf16_source_over_prompts_x_64_tokens(small_pair, capsys, bench_fp8_tool):
    src, fp8 = small_pair
    cfg = ModelConfig.from_dir(src)
    prompts = bench_fp8_tool.random_prompts(cfg.vocab_size, 8, 16)
    conts = bench_fp8_tool.greedy_continuations(src, prompts, 64)
    base = bench_fp8_tool.replay_logits(bench_fp8_tool.load_model(src), prompts, conts)
    m = bench_fp8_tool.compare(base, bench_fp8_tool.replay_logits(bench_fp8_tool.load_model(fp8), prompts, conts))
    with capsys.disabled():
        print(f"\nFP8 weights vs bf16 (8 prompts x 64 tokens): {m}")
    # Stated tolerance (random weights, logit std ~1; measured: mean 0.063, max 2.85, agreement 0.89):
    # mean |dlogit| < 0.15, greedy agreement >= 0.8; single logits move up to ~3 where a token's
    # routed expert flips (random routers have near-tied scores), so max |dlogit| < 4.
    assert m["mean_dlogit"] < 0.15 and m["max_dlogit"] < 4.0 and m["greedy_agreement"] >= 0.8


def test_llm_serves_fp8_checkpoint_in_fp8_by_default(small_pair):
    _, fp8 = small_pair
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42]]
    # pdserve's CPU kernels take dense weights only (fp32, and a bf16 model's experts and decode attention, in
    # fp32 arithmetic): off in both, so the two differ only in how the FP8 weights are held
    served = LLM(fp8, num_kv_blocks=16, block_size=16, cpu_kernels=False)
    assert served.engine.runner.model.layers[0].mlp.gate_proj.weight.dtype == FP8
    dequantized = LLM(fp8, num_kv_blocks=16, block_size=16, weights="dequantize", cpu_kernels=False)
    assert dequantized.engine.runner.model.layers[0].mlp.gate_proj.weight.dtype == dequantized.engine.runner.dtype
    a = [o.outputs[0].token_ids for o in served.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in dequantized.generate(prompts, params)]
    assert a == b

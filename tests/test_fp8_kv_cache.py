"""The FP8 latent KV cache (``kv_cache_dtype="fp8"``): layout, accuracy, prefix caching, hand-off, MTP layers."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.args import EngineArgs
from engine.kv_connector import KVPiece
from engine.llm import LLM
from engine.model.config import ModelConfig
from engine.model.kv_cache_fp8 import (
    convert_rows,
    fp8_row_bytes,
    pack_rows,
    payload_width_ok,
    read_rows,
    unpack_rows,
    write_rows,
)
from engine.sampling_params import SamplingParams
from handoff import prefill_then_decode

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> str:
    """bf16 random weights, kv_lora_rank 256 (two scale groups), rope 32, with an MTP layer."""
    from engine.checkpoint.random_ckpt import make_random_checkpoint

    path = tmp_path_factory.mktemp("fp8kv") / "small"
    make_random_checkpoint(path, "tiny", seed=7, hidden_size=256, kv_lora_rank=256, qk_rope_head_dim=32,
                           q_lora_rank=128, qk_nope_head_dim=32, v_head_dim=32, num_hidden_layers=2)
    return str(path)


def test_row_bytes_flashmla_layout():
    assert fp8_row_bytes(512, 64) == 656  # DeepSeek-V3 / bench: 512 e4m3 + 4 fp32 + 64 bf16
    assert 2 * (512 + 64) == 1152
    assert fp8_row_bytes(256, 32) == 256 + 8 + 64
    assert fp8_row_bytes(32, 16) == 32 + 4 + 32  # rank below 128: one (short) group


def test_pack_unpack_roundtrip_error_bound():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 512 + 64, generator=g) * torch.logspace(-2, 1, 576)
    rows[3, :128] = 0  # an all-zero group
    packed = pack_rows(rows.to(torch.bfloat16), 512)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 656)
    back = unpack_rows(packed, 512, torch.float32)
    lat, ref = back[:, :512], rows.to(torch.bfloat16).float()[:, :512]
    scale = packed[:, 512:528].contiguous().view(torch.float32)  # [6, 4]
    bound = ref.abs() * 2**-4 + scale.repeat_interleave(128, -1) * 2**-10
    assert ((lat - ref).abs() <= bound + 1e-12).all()
    assert (lat[3, :128] == 0).all()
    assert torch.equal(back[:, 512:], rows[:, 512:].to(torch.bfloat16).float())  # rope key stored bf16, exact


def test_read_write_rows_both_layouts():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 288, generator=g).to(torch.bfloat16)
    slots = torch.tensor([0, 7, 3, 12, 9])
    plain = torch.zeros(2, 8, 288, dtype=torch.bfloat16)
    write_rows(plain, slots, rows, 256)
    assert torch.equal(read_rows(plain, slots, 256, torch.bfloat16), rows)
    packed = torch.zeros(2, 8, fp8_row_bytes(256, 32), dtype=torch.uint8)
    write_rows(packed, slots, rows, 256)
    got = read_rows(packed, slots.view(1, 5), 256, torch.bfloat16)
    assert got.shape == (1, 5, 288)
    assert torch.equal(got[0], unpack_rows(pack_rows(rows, 256), 256, torch.bfloat16))
    assert (got[0].float() - rows.float()).abs().max() < 0.07 * rows.float().abs().max()


def test_engine_kv_bytes_and_mtp_layers(small_ckpt):
    llm = LLM(small_ckpt, kv_cache_dtype="fp8", num_kv_blocks=8, block_size=16)
    runner, cfg = llm.engine.runner, ModelConfig.from_dir(small_ckpt)
    layers = runner.model.num_cache_layers
    assert layers == cfg.num_hidden_layers + cfg.num_nextn_predict_layers  # MTP layers are cache layers too
    assert len(runner.kv_caches) == layers
    assert all(c.dtype == torch.uint8 and c.shape == (8, 16, 328) for c in runner.kv_caches)
    assert runner.cache_bytes_per_token == layers * 328
    plain = LLM(small_ckpt, dtype="bfloat16", num_kv_blocks=8, block_size=16).engine.runner
    assert plain.cache_bytes_per_token == layers * 288 * 2
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="fp16")


def test_fp8_cache_vs_bf16_cache_over_prompts_x_64_tokens(small_ckpt, capsys, bench_fp8_tool):
    cfg = ModelConfig.from_dir(small_ckpt)
    model = bench_fp8_tool.load_model(small_ckpt)
    prompts = bench_fp8_tool.random_prompts(cfg.vocab_size, 8, 16, seed=3)
    conts = bench_fp8_tool.greedy_continuations(small_ckpt, prompts, 64)
    m = bench_fp8_tool.compare(bench_fp8_tool.replay_logits(model, prompts, conts), bench_fp8_tool.replay_logits(model, prompts, conts, "fp8"))
    with capsys.disabled():
        print(f"\nFP8 KV cache vs bf16 KV cache (8 prompts x 64 tokens): {m}")
    # Stated tolerance (random weights, logit std ~1; measured: mean 0.023, max 2.73, agreement 0.95):
    # mean |dlogit| < 0.1, greedy agreement >= 0.85, max |dlogit| < 4 (a near-tied random router
    # can flip a token's expert).
    assert m["mean_dlogit"] < 0.1 and m["max_dlogit"] < 4.0 and m["greedy_agreement"] >= 0.85


def test_prefix_caching_with_fp8_cache(small_ckpt):
    prompt = list(range(3, 3 + 40))  # 2 full blocks of 16 shared
    # fp32 compute: a prefix hit leaves a short tail that takes the batched absorbed path instead of the
    # naive one, and bf16 would round the two differently; the cache under test is FP8 either way
    fresh = LLM(small_ckpt, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16, block_size=16,
                enable_prefix_caching=False)
    want = fresh.generate([prompt], GREEDY)[0].outputs[0].token_ids
    llm = LLM(small_ckpt, dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16, block_size=16)
    first = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    second = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert llm.engine.kv.prefix_hits >= 32
    assert first == want and second == want


def test_kv_payload_carries_packed_bytes_and_converts(small_ckpt):
    cfg = ModelConfig.from_dir(small_ckpt)
    fp8_runner = LLM(small_ckpt, kv_cache_dtype="fp8", num_kv_blocks=8, block_size=16).engine.runner
    plain_runner = LLM(small_ckpt, num_kv_blocks=8, block_size=16).engine.runner
    layers, n = fp8_runner.model.num_cache_layers, 20
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(layers, n, cfg.kv_cache_width, generator=g).to(torch.bfloat16)
    table = [2, 5]
    piece = KVPiece.from_rows("r", 0, 0, rows)
    plain_runner.kv_worker.write(table, piece)
    fp8_runner.kv_worker.write(table, piece)  # bf16 rows into an FP8 cache: packed on arrival
    packed = fp8_runner.kv_worker.read("r", table, 0, n, range(layers))
    assert packed.rows_dtype == "uint8" and packed.rows.shape == (layers, n, 328)
    assert payload_width_ok(packed.rows, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    assert payload_width_ok(rows, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    # the piece pickles (fp8 tensors cannot) and restores the same bytes
    moved = pickle.loads(pickle.dumps(packed))
    assert moved.nbytes == layers * n * 328  # 57% of the bf16 rows
    other = LLM(small_ckpt, kv_cache_dtype="fp8", num_kv_blocks=8, block_size=16).engine.runner
    other.kv_worker.write([7, 1], moved)
    assert torch.equal(other.kv_worker.read("r", [7, 1], 0, n, range(layers)).rows, packed.rows)  # FP8 -> FP8: bytes unchanged
    plain_runner.kv_worker.write([0, 3], moved)  # FP8 rows into a bf16 cache: unpacked
    unpacked = plain_runner.kv_worker.read("r", [0, 3], 0, n, range(layers)).rows
    assert torch.equal(unpacked, convert_rows(packed.rows, cfg.kv_lora_rank, plain_runner.kv_caches[0]))
    assert (unpacked.float() - rows.float()).abs().max() < 0.07 * rows.float().abs().max()


def test_engine_handoff_with_fp8_cache_equals_single_fp8_engine(small_ckpt):
    """prefill engine (FP8 cache) -> payload bytes -> decode engine (FP8 cache): same greedy tokens."""
    from engine.engine import LLMEngine

    prompts = [[(7 * i + j) % 200 + 2 for j in range(11 + 9 * i)] for i in range(3)]
    single = LLM(small_ckpt, kv_cache_dtype="fp8")
    want = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY)]
    common = dict(model=small_ckpt, kv_cache_dtype="fp8")
    prefill = LLMEngine(EngineArgs(role="prefill", **common))
    decode = LLMEngine(EngineArgs(role="decode", **common))
    got = prefill_then_decode(prefill, decode, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts)})
    assert [got[f"r{i}"] for i in range(len(prompts))] == want
    assert prefill.kv.num_used_blocks == 0 and decode.kv.num_used_blocks == 0


def test_mtp_speculative_decoding_over_fp8_cache_is_lossless(small_ckpt):
    prompts = [[(5 * i + 3 * j) % 200 + 2 for j in range(9 + 13 * i)] for i in range(4)]
    # fp32 compute: verification (many tokens) and plain decode (one) then round alike; the cache is FP8 in both
    plain = LLM(small_ckpt, dtype="float32", kv_cache_dtype="fp8")
    spec = LLM(small_ckpt, dtype="float32", kv_cache_dtype="fp8", speculative="mtp", num_speculative_tokens=2)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, GREEDY)] == want
    assert spec.engine.stats().spec_drafts > 0

"""Checkpoint I/O in the official Hugging Face DeepSeek layout: random checkpoints,
sharding, block FP8, broken checkpoints, the ``pdserve checkpoint`` CLI and the tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.checkpoint.fp8 import dequantize_block_fp8, quantize_block_fp8
from engine.checkpoint.loader import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    iter_checkpoint_tensors,
    load_config,
    read_index,
)
from engine.checkpoint.quantize import FP8_QUANTIZATION_CONFIG, quantize_checkpoint_fp8
from engine.checkpoint.random_ckpt import make_random_checkpoint
from engine.checkpoint.schema import checkpoint_schema, scale_inv_shape
from engine.checkpoint.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    USER_TOKEN,
    default_corpus_files,
    train_bpe_tokenizer,
)
from engine.checkpoint.writer import save_checkpoint
from serving.cli import main as cli_main


def load_all(path, dtype=torch.float32, include_mtp=True) -> dict[str, torch.Tensor]:
    path = str(path)
    return dict(iter_checkpoint_tensors(path, load_config(path), dtype, include_mtp=include_mtp, progress=False))


def rewrite_weights(path, edit) -> None:
    """Apply ``edit(dict)`` to the tensors of a single-file checkpoint and save them back."""
    file = os.path.join(path, SINGLE_NAME)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(file, "w") as f:
        json.dump(raw, f)


# ---------------------------------------------------------------- random checkpoints


def test_tiny_checkpoint_holds_exactly_the_schema(tiny_checkpoint):
    cfg = load_config(tiny_checkpoint)
    schema = checkpoint_schema(cfg)
    tensors = load_all(tiny_checkpoint, torch.bfloat16)
    assert list(tensors) != [] and set(tensors) == set(schema)
    assert len(tensors) == len(schema)
    for name, spec in schema.items():
        assert tuple(tensors[name].shape) == spec.shape, name
        assert tensors[name].dtype == torch.bfloat16
    # the preset exercises dense + MoE layers, q LoRA and one MTP layer
    assert cfg.num_nextn_predict_layers == 1 and cfg.first_k_dense_replace == 1
    assert "model.layers.0.mlp.gate_proj.weight" in tensors
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in tensors
    # the MTP layer shares (copies) the main embedding and head, as DeepSeek-V3's files do
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    assert torch.equal(tensors[mtp + "embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors[mtp + "shared_head.head.weight"], tensors["lm_head.weight"])
    # projections ~ N(0, 1/fan_in), norms ~ 1
    w = tensors["model.layers.0.mlp.down_proj.weight"].float()
    assert abs(w.std().item() * cfg.intermediate_size**0.5 - 1.0) < 0.05
    assert abs(tensors["model.norm.weight"].float().mean().item() - 1.0) < 0.05
    # the router bias is stored fp32 as in DeepSeek-V3's release
    stored = read_index(tiny_checkpoint).tensors
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert stored["model.layers.1.mlp.gate.weight"].dtype == "BF16"


def test_without_mtp_skips_the_mtp_layer(tiny_checkpoint):
    cfg = load_config(tiny_checkpoint)
    tensors = load_all(tiny_checkpoint, include_mtp=False)
    assert set(tensors) == set(checkpoint_schema(cfg, include_mtp=False))
    assert not any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in tensors)


def test_random_checkpoint_is_deterministic_per_seed(tmp_path, tiny_checkpoint):
    make_random_checkpoint(tmp_path / "same", "tiny", seed=0)
    make_random_checkpoint(tmp_path / "other", "tiny", seed=1)

    def read(d, f):
        with open(os.path.join(d, f), "rb") as fh:
            return fh.read()

    assert read(tmp_path / "same", SINGLE_NAME) == read(tiny_checkpoint, SINGLE_NAME)
    assert read(tmp_path / "same", "tokenizer.json") == read(tiny_checkpoint, "tokenizer.json")
    assert read(tmp_path / "other", SINGLE_NAME) != read(tiny_checkpoint, SINGLE_NAME)
    a, b = load_all(tiny_checkpoint), load_all(tmp_path / "other")
    assert not torch.equal(a["model.layers.1.self_attn.q_b_proj.weight"], b["model.layers.1.self_attn.q_b_proj.weight"])


def test_sharded_save_loads_the_same_tensors(tmp_path, tiny_checkpoint):
    cfg = load_config(tiny_checkpoint)
    tensors = load_all(tiny_checkpoint, torch.bfloat16)
    shards = save_checkpoint(tmp_path / "sharded", cfg, tensors, max_shard_bytes=200_000)
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not os.path.exists(tmp_path / "sharded" / SINGLE_NAME)
    with open(tmp_path / "sharded" / INDEX_NAME) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(tmp_path / "sharded" / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    again = load_all(tmp_path / "sharded", torch.bfloat16)
    assert set(again) == set(tensors)
    for name in tensors:
        assert torch.equal(again[name], tensors[name]), name
    assert load_config(tmp_path / "sharded") == cfg


# ---------------------------------------------------------------- block FP8


def _reference_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """DeepSeek's README_WEIGHTS.md formula, literally: pad to 128, multiply each 128x128 block, crop."""
    rows, cols = w_fp8.shape
    padded = torch.zeros(scale_inv.shape[0] * 128, scale_inv.shape[1] * 128)
    padded[:rows, :cols] = w_fp8.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            padded[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale_inv[i, j]
    return padded[:rows, :cols]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (576, 130), (5, 7)])
def test_block_fp8_error_is_within_half_an_e4m3_step(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    # blocks of very different magnitude, so per-block scales matter
    w *= torch.logspace(-4, 2, shape[0]).unsqueeze(1)
    w_fp8, scale_inv = quantize_block_fp8(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == scale_inv_shape(shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scale_inv[i, j].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    deq = dequantize_block_fp8(w_fp8, scale_inv, torch.float32)
    assert torch.equal(deq, _reference_dequant(w_fp8, scale_inv))
    # the product is taken in fp32 and rounded once to the target dtype
    assert torch.equal(dequantize_block_fp8(w_fp8, scale_inv, torch.bfloat16), deq.to(torch.bfloat16))
    # e4m3 keeps 3 mantissa bits: rounding moves q = w/scale by at most half a step, 2^(e-4)
    # for |q| in [2^e, 2^(e+1)), with e clamped at the subnormal exponent -6; the fp32
    # division before the cast can add a few ulps of q (the 1e-5 slack).
    s = scale_inv.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    e = torch.floor(torch.log2((w / s).abs().clamp_min(2.0**-6)))
    bound = s * torch.exp2(e - 4)
    err = (deq - w).abs()
    assert (err <= bound * (1 + 1e-5)).all(), (err / bound).max()


def test_block_fp8_zero_block_and_wrong_scale_shape():
    w = torch.zeros(200, 300)
    w[150:, 260:] = 3.0
    w_fp8, scale_inv = quantize_block_fp8(w)
    assert torch.isfinite(scale_inv).all()
    assert torch.equal(dequantize_block_fp8(w_fp8, scale_inv, torch.float32), w)
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        dequantize_block_fp8(w_fp8, scale_inv[:, :2], torch.float32)


def test_quantize_fp8_checkpoint_matches_transformers_dequantization(tmp_path):
    transformers = pytest.importorskip("transformers")
    # Multi-block weights whose dims are all multiples of 128 (or below it): transformers 5.x
    # dequantizes on CPU with a block size derived from the scale grid (rows // grid_rows), which
    # is wrong or raises for other shapes (576 x 7168 included); those are checked against
    # _reference_dequant above instead.
    make_random_checkpoint(tmp_path / "bf16", "tiny", seed=3, hidden_size=256, intermediate_size=384)
    quantize_checkpoint_fp8(tmp_path / "bf16", tmp_path / "fp8", progress=False)

    cfg = load_config(tmp_path / "fp8")
    assert cfg.quantization == FP8_QUANTIZATION_CONFIG
    assert os.path.exists(tmp_path / "fp8" / "tokenizer.json")
    assert os.path.exists(tmp_path / "fp8" / "tokenizer_config.json")
    stored = read_index(tmp_path / "fp8").tensors
    schema = checkpoint_schema(cfg)
    for name, spec in schema.items():
        assert stored[name].dtype == ("F8_E4M3" if spec.fp8 else ("F32" if name.endswith("bias") else "BF16")), name
        if spec.fp8:
            assert stored[name + "_scale_inv"].shape == scale_inv_shape(spec.shape)
    assert stored["model.layers.3.eh_proj.weight"].dtype == "BF16"  # DeepSeek keeps the MTP projection bf16
    assert len(stored) == len(schema) + sum(spec.fp8 for spec in schema.values())

    ours = load_all(tmp_path / "fp8", torch.float32, include_mtp=False)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the CPU-dequantization warning and the unexpected MTP layer
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    compared = 0
    for key, theirs in model.state_dict().items():
        if key.endswith("experts.gate_up_proj"):  # transformers fuses experts: [E, 2*mi, h]
            prefix = key.removesuffix("gate_up_proj")
            mine = torch.stack([torch.cat([ours[f"{prefix}{e}.gate_proj.weight"], ours[f"{prefix}{e}.up_proj.weight"]])
                                for e in range(cfg.n_routed_experts)])
        elif key.endswith("experts.down_proj"):  # [E, h, mi]
            prefix = key.removesuffix("down_proj")
            mine = torch.stack([ours[f"{prefix}{e}.down_proj.weight"] for e in range(cfg.n_routed_experts)])
        else:
            mine = ours[key]
        assert torch.equal(mine, theirs.float()), key
        compared += 1
    assert compared == len(model.state_dict()) > 40

    # and the FP8 values are the bf16 source within e4m3 precision
    source = load_all(tmp_path / "bf16", torch.float32, include_mtp=False)
    for name, spec in schema.items():
        if name in ours:
            tol = source[name].abs().max() * 2.0**-4 if spec.fp8 else 0
            assert (ours[name] - source[name]).abs().max() <= tol, name


def test_make_random_fp8_equals_quantizing_the_bf16_checkpoint(tmp_path, tiny_checkpoint, tiny_fp8_checkpoint):
    quantize_checkpoint_fp8(tiny_checkpoint, tmp_path / "q", progress=False)
    with safe_open(os.path.join(tiny_fp8_checkpoint, SINGLE_NAME), framework="pt") as a, \
            safe_open(str(tmp_path / "q" / SINGLE_NAME), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name).view(torch.uint8), b.get_tensor(name).view(torch.uint8)), name


def test_fp8_weight_and_scale_in_different_shards(tmp_path, tiny_fp8_checkpoint):
    cfg = load_config(tiny_fp8_checkpoint)
    stored = load_file(os.path.join(tiny_fp8_checkpoint, SINGLE_NAME))
    # all weights first, all scales last: the scales end up in a later shard than most of their weights
    ordered = {name: t for name, t in stored.items() if not name.endswith("_scale_inv")}
    ordered.update({name: t for name, t in stored.items() if name.endswith("_scale_inv")})
    save_checkpoint(tmp_path / "s", cfg, ordered, max_shard_bytes=20_000)
    with open(tmp_path / "s" / INDEX_NAME) as f:
        where = json.load(f)["weight_map"]
    split = [n for n in where if n.endswith("_scale_inv") and where[n] != where[n.removesuffix("_scale_inv")]]
    assert split, "no weight/scale pair straddles two shards; lower max_shard_bytes"
    sharded, single = load_all(tmp_path / "s"), load_all(tiny_fp8_checkpoint)
    assert set(sharded) == set(single) == set(checkpoint_schema(cfg))
    for name in single:
        assert torch.equal(sharded[name], single[name]), name


# ---------------------------------------------------------------- broken checkpoints


def _sharded_copy(src, dst) -> list[str]:
    return save_checkpoint(dst, load_config(src), load_all(src, torch.bfloat16), max_shard_bytes=200_000)


def _break_missing_shard(path):
    shards = _sharded_copy(path, path + "-s")
    os.remove(os.path.join(path + "-s", shards[1]))
    return path + "-s", [INDEX_NAME, shards[1], "missing"]


def _break_missing_tensor(path):
    rewrite_weights(path, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    return path, [SINGLE_NAME, "model.layers.2.self_attn.kv_b_proj.weight", "missing"]


def _break_shape(path):
    def edit(t):
        t["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(32, 65, dtype=torch.bfloat16)
    rewrite_weights(path, edit)
    return path, [SINGLE_NAME, "model.layers.1.mlp.experts.3.up_proj.weight", "[32, 65]", "[32, 64]"]


def _break_truncated(path):
    file = os.path.join(path, SINGLE_NAME)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 1000)
    return path, [SINGLE_NAME, "truncated or corrupt"]


def _break_index_json(path):
    _sharded_copy(path, path + "-s")
    with open(os.path.join(path + "-s", INDEX_NAME), "w") as f:
        f.write('{"weight_map": {"model.norm.weight": ')
    return path + "-s", [INDEX_NAME, "not readable JSON"]


def _break_config(path):
    os.remove(os.path.join(path, "config.json"))
    return path, ["config.json", "not found"]


def _break_architecture(path):
    edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama")
    return path, ["config.json", "unsupported architecture", "LlamaForCausalLM"]


def _break_rope_scaling(path):
    edit_config(path, rope_scaling={"type": "yarn", "original_max_position_embeddings": 512})
    return path, ["config.json", "yarn", "factor"]


def _break_fp8_scale(path):
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight_scale_inv"))
    return path, [SINGLE_NAME, "model.layers.1.self_attn.o_proj.weight", "F8_E4M3", "weight_scale_inv"]


def _break_directory(path):
    shutil.rmtree(path)
    return path, [os.path.basename(path), "directory not found"]


@pytest.mark.parametrize("breaker", [
    _break_missing_shard, _break_missing_tensor, _break_shape, _break_truncated, _break_index_json,
    _break_config, _break_architecture, _break_rope_scaling, _break_fp8_scale, _break_directory,
], ids=lambda f: f.__name__.removeprefix("_break_"))
def test_broken_checkpoint_gives_one_clear_error(breaker, tmp_path, tiny_checkpoint, tiny_fp8_checkpoint):
    source = tiny_fp8_checkpoint if breaker is _break_fp8_scale else tiny_checkpoint
    path = str(tmp_path / "ckpt")
    shutil.copytree(source, path)
    broken, fragments = breaker(path)
    with pytest.raises(CheckpointError) as info:
        # load_config checks config.json; iter_checkpoint_tensors checks the weights before the first yield
        next(iter_checkpoint_tensors(broken, load_config(broken), torch.float32, progress=False))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_mtp_layer_needs_include_mtp_false(tmp_path, tiny_checkpoint):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    rewrite_weights(path, lambda t: [t.pop(n) for n in list(t) if n.startswith("model.layers.3.")])
    with pytest.raises(CheckpointError, match="model.layers.3.*include_mtp=False"):
        load_all(path)
    assert set(load_all(path, include_mtp=False)) == set(checkpoint_schema(load_config(path), include_mtp=False))


def test_extra_tensors_are_ignored_and_tied_head_may_be_absent(tmp_path, tiny_checkpoint):
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)

    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        del t["lm_head.weight"]
    rewrite_weights(path, edit)
    edit_config(path, tie_word_embeddings=True)
    tensors = load_all(path)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in tensors
    assert "lm_head.weight" not in tensors and set(tensors) == set(checkpoint_schema(load_config(path)))


# ---------------------------------------------------------------- CLI


def test_cli_make_random_inspect_and_quantize(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["checkpoint", "make-random", str(out), "--preset", "tiny", "--seed", "7", "--dtype", "float32"]
    assert cli_main(argv) == 0
    tensors = load_all(out, torch.float32)
    assert set(tensors) == set(checkpoint_schema(load_config(out)))
    assert read_index(out).tensors["model.norm.weight"].dtype == "F32"

    assert cli_main(["checkpoint", "inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "DeepseekV3ForCausalLM" in report and "MTP             present" in report
    assert f"{(32 + 16) * 3 * 2} bytes/token" in report

    assert cli_main(["checkpoint", "quantize-fp8", str(out), str(tmp_path / "q")]) == 0
    assert load_config(tmp_path / "q").quantization == FP8_QUANTIZATION_CONFIG


def test_cli_errors_are_readable_and_exit_2(tmp_path, tiny_checkpoint, capsys):
    assert cli_main(["checkpoint", "make-random", tiny_checkpoint, "--preset", "tiny"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert cli_main(["checkpoint", "make-random", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert "unknown preset 'huge'; choose one of bench, tiny" in capsys.readouterr().err
    assert cli_main(["checkpoint", "inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve checkpoint: error: ") and "directory not found" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:  # argparse's own errors exit 2 too
        cli_main(["checkpoint", "make-random", str(tmp_path / "x"), "--preset", "tiny", "--dtype", "float16"])
    assert info.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text_and_has_deepseek_special_tokens(tiny_checkpoint):
    from tokenizers import Tokenizer

    cfg = load_config(tiny_checkpoint)
    tok = Tokenizer.from_file(os.path.join(tiny_checkpoint, "tokenizer.json"))
    assert tok.get_vocab_size() == cfg.vocab_size
    assert tok.token_to_id(BOS_TOKEN) == cfg.bos_token_id == 0 and tok.token_to_id(EOS_TOKEN) == cfg.eos_token_id == 1
    for text in ["def f(x):\n    return x + 1\n", "naïve café — 東京 🚀", "  leading spaces\ttabs\r\n"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert len(ids) < len(text.encode()) or len(text) < 8  # merges were learned
        assert tok.decode(ids) == text
        assert tok.encode(text).ids == [0] + ids  # bos prepended with special tokens
    turn = tok.encode(f"{USER_TOKEN}hi{ASSISTANT_TOKEN}", add_special_tokens=False).ids
    assert turn[0] == tok.token_to_id(USER_TOKEN) and turn[-1] == tok.token_to_id(ASSISTANT_TOKEN)


def test_chat_template_renders_deepseek_v3_format(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>"
                    "<｜User｜>2+2?<｜Assistant｜>")
    no_prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.convert_tokens_to_ids(ASSISTANT_TOKEN)
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN


def test_tokenizer_size_is_exact_even_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 50)
    tok = train_bpe_tokenizer([str(corpus)], 300, str(tmp_path / "tok"))
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode("hello world", add_special_tokens=False).ids) == "hello world"
    files = default_corpus_files(limit_bytes=100_000)
    assert files == sorted(files) and all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert sum(os.path.getsize(f) for f in files) >= 100_000
    assert not any(f"{os.sep}test{os.sep}" in f for f in files)

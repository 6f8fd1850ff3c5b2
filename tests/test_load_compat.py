"""Checkpoints that depart from the official layout the way real ones do (issue #16, item 1).

A checkpoint written by transformers' ``save_pretrained`` keeps ``num_nextn_predict_layers: 1``
in config.json but does not store the MTP layer: it must load (``LLM`` and ``pdserve serve``)
without it, with one warning, and generate transformers' greedy tokens; MTP speculative decoding
on it is one clear start-up error naming the missing layer. Stored tensors the model does not use
are one warning listing them, or an error with ``strict_load`` / ``--strict-load``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint.loader import CheckpointError, read_index, unused_tensors  # noqa: E402
from engine.checkpoint.tokenizer import default_corpus_files, train_bpe_tokenizer  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512,
    initializer_range=0.1, norm_topk_prob=True, num_nextn_predict_layers=1,
)
MTP_LAYER = f"model.layers.{CONFIG['num_hidden_layers']}"
PROMPTS = [[5, 17, 42, 99, 3], [200, 1, 7], [64] * 20]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A DeepSeek-V3 checkpoint exactly as transformers writes it, plus a tokenizer of its vocabulary size."""
    path = str(tmp_path_factory.mktemp("hf") / "v3")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONFIG)).eval()
    model.save_pretrained(path)
    train_bpe_tokenizer(default_corpus_files(limit_bytes=100_000), CONFIG["vocab_size"], path)
    return path


@pytest.fixture(scope="module")
def hf_greedy(hf_dir) -> list[list[int]]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _mtp_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "MTP" in r.getMessage()]


def test_save_pretrained_checkpoint_has_no_mtp_layer_but_declares_one(hf_dir):
    index = read_index(hf_dir)
    assert ModelConfig.from_dir(hf_dir).num_nextn_predict_layers == 1
    assert not any(n.startswith(MTP_LAYER + ".") for n in index.tensors)
    assert unused_tensors(index, ModelConfig.from_dir(hf_dir)) == []  # nothing else departs from the schema


def test_loads_without_mtp_with_one_warning_and_matches_transformers(hf_dir, hf_greedy, caplog):
    with caplog.at_level(logging.WARNING):
        llm = LLM(hf_dir, dtype="float32", num_kv_blocks=32, block_size=16)
    warnings = _mtp_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert MTP_LAYER in warnings[0] and "num_nextn_predict_layers=1" in warnings[0]
    assert len(llm.engine.runner.model.mtp) == 0
    assert llm.engine.runner.model.num_cache_layers == CONFIG["num_hidden_layers"]  # no cache for a missing layer
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy


def test_mtp_speculative_on_it_is_one_clear_error(hf_dir):
    with pytest.raises(CheckpointError) as info:
        LLM(hf_dir, dtype="float32", num_kv_blocks=32, block_size=16, speculative="mtp")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("speculative", MTP_LAYER, "num_nextn_predict_layers=1"):
        assert fragment in message, message


def _with_extra_tensors(src: str, dst: str, extra: dict[str, torch.Tensor]) -> str:
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    tensors.update(extra)
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_unused_tensors_are_one_warning_or_a_strict_error(hf_dir, tmp_path, caplog):
    extra = {f"model.layers.0.mlp.bias_{i}": torch.zeros(4) for i in range(3)}
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # derived: not reported
    path = _with_extra_tensors(hf_dir, str(tmp_path / "extra"), extra)
    with caplog.at_level(logging.WARNING, logger="pdserve.checkpoint"):
        llm = LLM(path, dtype="float32", num_kv_blocks=32, block_size=16)
    unused = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(unused) == 1, unused
    assert "3 tensor(s)" in unused[0] and all(f"model.layers.0.mlp.bias_{i}" in unused[0] for i in range(3))
    assert "inv_freq" not in unused[0]
    assert llm.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids  # and it serves
    with pytest.raises(CheckpointError, match=r"3 tensor\(s\) the model does not use: model\.layers\.0\.mlp\.bias_0"):
        LLM(path, dtype="float32", num_kv_blocks=32, block_size=16, strict_load=True)


def _serve(model_dir: str, *flags: str) -> subprocess.Popen:
    code = "import sys; from serving.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--model", model_dir, "--port", "0",
                             "--dtype", "float32", "--num-kv-blocks", "32", "--block-size", "16", *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pdserve_serve_starts_on_it_and_refuses_mtp_speculation(hf_dir, hf_greedy):
    proc = _serve(hf_dir, "--log-level", "warning")
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("pdserve: serving "), ready + proc.stderr.read()
        url = ready.split(" at ")[1].split()[0]
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": PROMPTS[0], "max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err.count("loading without MTP") == 1, err
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(hf_dir, "tokenizer.json"))
    assert r.json()["choices"][0]["text"] == tok.decode(hf_greedy[0])

    proc = _serve(hf_dir, "--speculative", "mtp")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert MTP_LAYER in err and "speculative" in err

"""tools/tune_mtp.py: its chained training pass is the proposer's chained draft, and it writes only the MTP layer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from engine.checkpoint.loader import iter_checkpoint_tensors
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM
from engine.spec_decode import MTPJob, MTPProposer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tune_mtp():
    spec = importlib.util.spec_from_file_location("tune_mtp", os.path.join(ROOT, "tools", "tune_mtp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("t", [0, 5, 9])
def test_chained_training_pass_is_the_proposers_chained_draft(tiny_checkpoint, tune_mtp, monkeypatch, t):
    """The logits the tool trains at both draft positions are the ones MTPProposer computes over the paged
    cache (pass 1 over positions 0..t, then one chained row at t+1 fed its own first draft)."""
    cfg = ModelConfig.from_dir(tiny_checkpoint)
    model = DeepseekV3ForCausalLM(cfg, dtype=torch.float32, with_mtp=True)
    model.load_weights(iter_checkpoint_tensors(tiny_checkpoint, cfg, torch.float32, progress=False))
    model.eval()
    seq_len, block = 12, 4
    tokens = torch.randint(0, cfg.vocab_size, (seq_len + 2,), generator=torch.Generator().manual_seed(t))

    # inference: the main pass over 0..t, then the proposer (k=2), its head's logits recorded
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    caches = [torch.zeros(8, block, width) for _ in range(model.num_cache_layers)]
    table = list(range(8))
    recorded = []
    draft = model.mtp[0].draft  # the drafts as the proposer takes them, with the head's logits recorded
    monkeypatch.setattr(model.mtp[0], "draft", lambda h: recorded.append(model.mtp[0].logits(h)) or draft(h))
    with torch.no_grad():
        meta = AttentionMetadata.paged([t + 1], [t + 1], [table], block, caches, torch.device("cpu"))
        h = model(tokens[:t + 1], torch.arange(t + 1), meta)
        job = MTPJob(start=0, count=t + 1, next_ids=tokens[1:t + 2].tolist(), hidden_rows=list(range(t + 1)),
                     draft=True)
        drafts = MTPProposer(model, 2, block).run(h, [job], [table], caches, torch.device("cpu"))[0]
    monkeypatch.undo()
    first, second = recorded[0][-1], recorded[1][0]
    assert drafts == [int(first.argmax()), int(second.argmax())]

    # training: the chained row at t+1 reads token t+2, here the first draft as in inference
    tokens[t + 2] = drafts[0]
    attn = tune_mtp.ChainedAttention(cfg.num_hidden_layers)
    monkeypatch.setattr(tune_mtp.dsv3, "mla_attention", attn)
    with torch.no_grad():
        _, logits1, logits2 = tune_mtp.passes(model, attn, tokens[None], seq_len)
    torch.testing.assert_close(logits1[0, t], first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits2[0, t], second, atol=1e-4, rtol=1e-4)


def test_tuning_writes_only_the_mtp_layers_own_weights(tiny_checkpoint, tune_mtp, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    out = tmp_path / "tuned"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "tune_mtp.py"), "--model", str(src), "--out", str(out),
         "--steps", "3", "--seq-len", "32", "--batch", "2", "--eval-tokens", "256", "--lr", "1e-2",
         "--threads", "1", "--log-every", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out agreement before" in res.stdout and "held-out agreement after 3 steps" in res.stdout
    old, new = tune_mtp.stored_tensors(str(src)), tune_mtp.stored_tensors(str(out))
    assert old.keys() == new.keys()
    cfg = ModelConfig.from_dir(str(src))
    layer = f"model.layers.{cfg.num_hidden_layers}."
    changed = {n for n in old if not torch.equal(old[n], new[n])}
    assert changed and all(n.startswith(layer) for n in changed)
    assert not any("embed_tokens" in n or "shared_head.head" in n or "e_score_correction_bias" in n
                   for n in changed)
    assert any(".self_attn." in n for n in changed) and f"{layer}eh_proj.weight" in changed
    assert all(new[n].dtype == old[n].dtype for n in old)
    after = tune_mtp.stored_tensors(str(src))  # the source checkpoint is left as it was
    assert after.keys() == old.keys() and all(torch.equal(after[n], old[n]) for n in old)

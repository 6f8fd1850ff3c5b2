"""The CPU fast paths of the decode step: oneDNN-prepacked matmuls and the routed experts' kernel choice.

Each path must compute what the plain one does (fp32, to rounding), and the engine must give the
same greedy tokens with prepacking on and off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.model import layers
from engine.model.moe import Experts

HAS_PACKED = layers.pack_weight(torch.zeros(1024, 1024)) is not None


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
@pytest.mark.parametrize("rows", [1, 2, 8, 64, layers.PACKED_MAX_ROWS, layers.PACKED_MAX_ROWS + 1])
def test_packed_linear_matches_f_linear(rows):
    torch.manual_seed(0)
    w = torch.randn(1024, 768) / 32
    packed = layers.pack_weight(w)
    x = torch.randn(rows, 768)
    with torch.inference_mode():
        out = layers.linear(x, w, packed)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_pack_weight_declines_what_does_not_pay():
    assert layers.pack_weight(torch.zeros(64, 64)) is None  # under PACKED_MIN_NUMEL: the call overhead dominates
    assert layers.pack_weight(torch.zeros(1024, 1024, dtype=torch.bfloat16)) is None
    assert layers.pack_weight(torch.zeros(4, 1024, 1024)) is None


@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
def test_expert_kernels_agree(tokens):
    """Few active slots run expert by expert, many run as one padded bmm: same result either way."""
    torch.manual_seed(tokens)
    e, d, inter, k = 8, 64, 32, 2
    experts = Experts(e, d, inter, torch.float32)
    with torch.no_grad():
        experts.w13.normal_(std=0.1)
        experts.w2.normal_(std=0.1)
    ids = torch.randint(0, e, (tokens * k,))
    counts = torch.bincount(ids, minlength=e).tolist()
    x = torch.randn(tokens * k, d)
    with torch.inference_mode():
        out = experts(x, counts)
        looped = torch.cat([F.linear(F.silu(g) * u, experts.w2[i])
                            for i, n in enumerate(counts) if n
                            for g, u in [F.linear(x[sum(counts[:i]):sum(counts[:i]) + n], experts.w13[i]).chunk(2, -1)]])
    torch.testing.assert_close(out, looped, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_PACKED, reason="this torch build has no oneDNN prepacked fp32 matmul")
def test_engine_tokens_same_with_and_without_prepacking():
    """The bundled model: its heads (4096 x 256) are prepacked, its small projections are not."""
    prompts = [[(7 * i + 3 * j) % 4000 + 2 for j in range(5 + 3 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for prepack in (True, False):
        llm = LLM(dtype="float32", prepack_weights=prepack, speculative="mtp", kv_cache_memory_gb=0.05)
        model = llm.engine.executor.runner.model
        assert (model.lm_head.packed is not None) == prepack
        assert (model.mtp[0].shared_head.head.packed is not None) == prepack
        assert model.layers[0].self_attn.o_proj.packed is None  # 256 x 128: not worth a oneDNN call
        outs[prepack] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]

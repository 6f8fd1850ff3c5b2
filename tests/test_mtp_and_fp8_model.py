"""The MTP layer against a reference written from the formula, and FP8 logits against their bf16 source."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.checkpoint.loader import iter_checkpoint_tensors, read_index
from engine.model.attention import AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.deepseek_v3 import DeepseekV3ForCausalLM


def _load(path: str, with_mtp: bool = True) -> DeepseekV3ForCausalLM:
    cfg = ModelConfig.from_dir(path)
    model = DeepseekV3ForCausalLM(cfg, dtype=torch.float32, with_mtp=with_mtp)
    model.load_weights(iter_checkpoint_tensors(path, cfg, torch.float32, include_mtp=with_mtp, progress=False))
    return model.eval()


def _raw(path: str, name: str) -> torch.Tensor:
    index = read_index(path)
    with safe_open(index.tensors[name].file, "pt") as f:
        return f.get_tensor(name).float()


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_matches_formula(tiny_checkpoint):
    model = _load(tiny_checkpoint)
    cfg = model.cfg
    L = cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (24,), generator=g)
    pos = torch.arange(23)
    meta = AttentionMetadata.no_cache([23])
    with torch.no_grad():
        h = model(tokens[:-1], pos, meta)  # [23, D] main model at t
        got = model.mtp[0].logits(model.mtp_forward(0, tokens[1:], h, pos, meta))  # predicts t+2
        # reference, from the checkpoint's layer-L tensors: h' = block(eh_proj([enorm(emb(x_{t+1})); hnorm(h_t)]))
        p = f"model.layers.{L}."
        emb = F.embedding(tokens[1:], _raw(tiny_checkpoint, p + "embed_tokens.weight"))
        e = _rms(emb, _raw(tiny_checkpoint, p + "enorm.weight"), cfg.rms_norm_eps)
        hn = _rms(h, _raw(tiny_checkpoint, p + "hnorm.weight"), cfg.rms_norm_eps)
        x = torch.cat([e, hn], -1) @ _raw(tiny_checkpoint, p + "eh_proj.weight").T
        block_out = model.mtp[0].block(x, pos, meta)
        normed = _rms(block_out, _raw(tiny_checkpoint, p + "shared_head.norm.weight"), cfg.rms_norm_eps)
        want = normed @ _raw(tiny_checkpoint, p + "shared_head.head.weight").T
    assert (got - want).abs().max().item() < 1e-4
    # the block really is layer L's weights (attention of the MTP block loaded from the checkpoint)
    assert torch.equal(model.mtp[0].block.self_attn.kv_b_proj.weight, _raw(tiny_checkpoint, p + "self_attn.kv_b_proj.weight"))


def test_mtp_pass_runs_its_block_only_on_the_rows_drafts_read(tiny_checkpoint):
    """``out_rows``: every token's cache rows are written as the whole pass writes them, and the block's
    output at those rows is the whole pass's (a prompt chunk of 10 and a verify-sized run of 4 tokens)."""
    model = _load(tiny_checkpoint)
    cfg, L, bs = model.cfg, model.cfg.num_hidden_layers, 8
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (14,), generator=g)
    h = torch.randn(14, cfg.hidden_size, generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(3, 7)])
    tables = [[3, 1], [0]]
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim

    def run(out: bool):
        caches = [torch.zeros(4, bs, width) for _ in range(L + 1)]
        caches[L][0, :3] = torch.randn(3, width, generator=torch.Generator().manual_seed(2))  # context before run 2
        meta = AttentionMetadata.paged([10, 4], [10, 7], tables, bs, caches, torch.device("cpu"))
        with torch.no_grad():
            if not out:
                return model.mtp_forward(0, ids, h, pos, meta)[[9, 13]], caches[L]
            last = AttentionMetadata.decode_chain([9, 6], tables, 1, bs, caches, torch.device("cpu"))[0]
            return model.mtp_forward(0, ids, h, pos, meta, torch.tensor([9, 13]), last), caches[L]

    (want, want_cache), (got, got_cache) = run(False), run(True)
    assert got.shape == (2, cfg.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cache, want_cache, rtol=1e-6, atol=1e-6)
    assert want_cache[3, :8].abs().sum() > 0 and want_cache[1, :2].abs().sum() > 0 and want_cache[0, 3:7].abs().sum() > 0


def test_fp8_checkpoint_logits_close_to_bf16_source(tmp_path):
    from engine.checkpoint.quantize import quantize_checkpoint_fp8
    from engine.checkpoint.random_ckpt import make_random_checkpoint

    src = tmp_path / "bf16"
    # hidden 256 / intermediate 384 so the 128x128 blocks matter
    make_random_checkpoint(src, "tiny", seed=3, hidden_size=256, intermediate_size=384, moe_intermediate_size=128)
    dst = tmp_path / "fp8"
    quantize_checkpoint_fp8(str(src), str(dst), progress=False)
    ref, q = _load(str(src), with_mtp=False), _load(str(dst), with_mtp=False)
    g = torch.Generator().manual_seed(1)
    lens = [9, 31, 64]
    ids = torch.randint(0, ref.cfg.vocab_size, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    meta = AttentionMetadata.no_cache(lens)
    with torch.no_grad():
        a = ref.compute_logits(ref(ids, pos, meta))
        b = q.compute_logits(q(ids, pos, meta))
    # Stated tolerance (random tiny model, 3 layers): e4m3 weight error is <= 1/16 of a block's amax;
    # on a random net it can flip a token's expert choice, so single rows may move far (measured:
    # max |dlogit| 2.9, min cosine 0.58). Typical rows stay close: measured mean |dlogit| 0.13 of a
    # logit spread of 1.0, top-1 agreement 0.81.
    spread = a.std().item()
    cos = F.cosine_similarity(a, b, dim=-1)
    assert (a - b).abs().mean().item() < 0.2 * spread
    assert cos.median().item() > 0.98
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.7


def test_mtp_layer_shares_the_main_vocab_where_the_checkpoint_copies_it(tiny_checkpoint):
    from engine.model.weight_share import weight_share

    model = _load(tiny_checkpoint)
    cfg, mtp = model.cfg, model.mtp[0]
    ids = torch.arange(5, 40)
    h = torch.randn(35, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mtp.logits(model.mtp_forward(0, ids, h, torch.arange(35), AttentionMetadata.no_cache([35])))
    before = weight_share(model)
    assert before.resident_bytes == before.expected_bytes
    assert model.share_mtp_vocab() == 2 * cfg.vocab_size * cfg.hidden_size * 4  # fp32: both copies freed
    assert mtp.embed_tokens is model.embed_tokens and mtp.shared_head.head is model.lm_head
    after = weight_share(model)
    assert after.resident_bytes == after.expected_bytes == before.resident_bytes - 2 * cfg.vocab_size * cfg.hidden_size * 4
    with torch.no_grad():
        got = mtp.logits(model.mtp_forward(0, ids, h, torch.arange(35), AttentionMetadata.no_cache([35])))
    assert torch.equal(got, want)
    assert model.share_mtp_vocab() == 0  # once

    other = _load(tiny_checkpoint)  # a checkpoint whose MTP head is its own keeps it
    other.mtp[0].shared_head.head.weight.data[3, 7] += 1.0
    assert other.share_mtp_vocab() == cfg.vocab_size * cfg.hidden_size * 4
    assert other.mtp[0].embed_tokens is other.embed_tokens and other.mtp[0].shared_head.head is not other.lm_head
    share = weight_share(other)
    assert share.resident_bytes == share.expected_bytes

"""The engine end to end on the tiny random checkpoint (fp32, so tokens can be compared exactly).

Greedy tokens of a request must be the same alone, inside a batch of 32
mixed-length requests, with chunked prefill at a small chunk, on a prefix-cache
hit, through a prefill engine → payload → decode engine, under preemption, and
equal to transformers' greedy generate.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.engine import LLMEngine
from engine.args import EngineArgs
from engine.outputs import RequestOutput
from engine.sampling_params import Continuation
from handoff import prefill_then_decode

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def _prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 150) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _run(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until idle; every request's deltas merged."""
    got: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            got.setdefault(delta.request_id, RequestOutput(delta.request_id, delta.prompt_token_ids, [])).merge(delta)
    return got


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def prompts(llm):
    return _prompts(32, llm.engine.config.vocab_size)


@pytest.fixture(scope="module")
def alone(llm, prompts):
    """Reference: each request run by itself."""
    return [_tokens(llm.generate([p], GREEDY))[0] for p in prompts]


def test_batch_of_32_equals_alone(llm, prompts, alone):
    assert _tokens(llm.generate(prompts, GREEDY)) == alone
    assert llm.engine.kv.num_used_blocks == 0


def test_chunked_prefill_equals_alone(tiny_checkpoint, prompts, alone):
    small = LLM(tiny_checkpoint, dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=False)
    assert _tokens(small.generate(prompts[:8], GREEDY)) == alone[:8]


def test_prefix_cache_hit_equals_alone(tiny_checkpoint, prompts, alone):
    cached = LLM(tiny_checkpoint, dtype="float32", block_size=16)
    long = [p for p in prompts if len(p) > 40][:4]
    want = [alone[prompts.index(p)] for p in long]
    assert _tokens(cached.generate(long, GREEDY)) == want
    hits_before = cached.engine.kv.prefix_hits
    assert _tokens(cached.generate(long, GREEDY)) == want  # second time: served from the prefix cache
    assert cached.engine.kv.prefix_hits - hits_before >= sum((len(p) - 1) // 16 * 16 for p in long)


def test_prefill_decode_handoff_equals_alone(tiny_checkpoint, prompts, alone):
    prefill = LLMEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", role="prefill"))
    decode = LLMEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", role="decode"))
    for i, p in enumerate(prompts[:6]):
        prefill.add_request(f"r{i}", p, GREEDY)
    while prefill.has_unfinished():
        prefill.step()
    payloads = [prefill.export_kv(f"r{i}") for i in range(6)]
    assert prefill.kv.num_used_blocks == 0
    for payload in payloads:
        c = payload.control
        assert c.num_tokens == len(c.prompt_token_ids) == sum(p.num_tokens for p in payload.pieces)
        assert c.num_layers == prefill.config.num_hidden_layers  # no MTP drafting: no MTP rows
        decode.add_request(c.seq_id, c.prompt_token_ids, c.params, kv=payload)
    got = {rid: out.outputs[0].token_ids for rid, out in _run(decode).items()}
    assert [got[f"r{i}"] for i in range(6)] == alone[:6]
    assert decode.kv.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_handoff_modes_with_chunked_prefill_and_prefix_hits(tiny_checkpoint, prompts, alone, mode):
    """Both transfer modes, chunked prompts, a second round served from the prefill's prefix cache
    (its cached rows must travel too), and a decode engine with another block size."""
    prefill = LLMEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", role="prefill", kv_transfer=mode,
                                   max_num_batched_tokens=48, block_size=16))
    decode = LLMEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", role="decode", block_size=32))
    long = [i for i, p in enumerate(prompts) if len(p) > 60][:3]
    for round_ in ("a", "b"):
        payloads: list = []
        got = prefill_then_decode(prefill, decode, {f"{round_}{i}": (prompts[i], GREEDY) for i in long},
                                  payloads=payloads)
        assert [got[f"{round_}{i}"] for i in long] == [alone[i] for i in long]
        layers = prefill.executor.num_computed_layers  # no MTP drafting: the MTP layer's rows stay home
        assert layers == prefill.config.num_hidden_layers
        for payload in payloads:
            covered = sorted((p.first_layer + j, p.start + t) for p in payload.pieces
                             for j in range(p.num_layers) for t in range(p.num_tokens))
            assert covered == [(j, t) for j in range(layers) for t in range(payload.control.num_tokens)]
            if mode == "whole":
                assert len(payload.pieces) == 1
            elif round_ == "a":  # one piece per layer per chunk (prompts > 48 tokens: two chunks at least)
                assert len(payload.pieces) >= layers * 2 and all(p.num_layers == 1 for p in payload.pieces)
            else:  # the prefix-cache hit goes at once, every layer; the computed tail layer by layer
                first = payload.pieces[0]
                assert first.num_layers == layers and first.start == 0 and first.num_tokens >= 48
                assert len(payload.pieces) >= 1 + layers
    assert prefill.kv.prefix_hits > 0
    assert prefill.kv.num_used_blocks == 0 and decode.kv.num_used_blocks == 0
    assert prefill.connector.outbox.nbytes == 0


def test_matches_transformers_generate(tiny_checkpoint, prompts, alone):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    for p, ours in list(zip(prompts, alone))[:4]:
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert ours == want


def test_preemption_keeps_greedy_tokens_and_frees_blocks(tiny_checkpoint, prompts, alone):
    # 12 blocks of 16 tokens cannot hold 8 requests of up to 150 + 64 tokens at once
    tight = LLM(tiny_checkpoint, dtype="float32", block_size=16, num_kv_blocks=14, enable_prefix_caching=False)
    subset = [p for p in prompts if len(p) < 150][:8]
    want = [alone[prompts.index(p)] for p in subset]
    assert _tokens(tight.generate(subset, GREEDY)) == want
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.kv.num_used_blocks == 0


def test_start_up_warm_up_fills_the_budget_and_leaves_no_trace(tiny_checkpoint, prompts, caplog):
    caplog.set_level(logging.INFO, "pdserve.engine")
    warm = LLM(tiny_checkpoint, dtype="float32", seed=3)
    assert "warm-up: one step of 2048 tokens over 64 sequences" in caplog.text
    cold = LLM(tiny_checkpoint, dtype="float32", seed=3, warmup=False)
    runner = warm.engine.runner
    assert not runner.sequences and runner.experts.num_layers and not runner.experts.counts().any()
    sampled = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)  # drawn from the shared generator
    for params in (GREEDY, sampled):
        assert _tokens(warm.generate(prompts[:8], params)) == _tokens(cold.generate(prompts[:8], params))
    assert warm.engine.kv.num_used_blocks == 0
    caplog.clear()  # a cache smaller than the budget: as many sequences as it holds
    small = LLM(tiny_checkpoint, dtype="float32", block_size=16, num_kv_blocks=5)
    assert "warm-up: one step of 64 tokens over 2 sequences" in caplog.text
    short, params = [p[:20] for p in prompts[:2]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert _tokens(small.generate(short, params)) == _tokens(cold.generate(short, params))
    caplog.clear()  # one block: one sequence, as long as the block
    LLM(tiny_checkpoint, dtype="float32", block_size=16, num_kv_blocks=1)
    assert "warm-up: one step of 16 tokens over 1 sequences" in caplog.text


def test_abort_frees_every_block(llm, prompts):
    eng = llm.engine
    for i, p in enumerate(prompts[:8]):
        eng.add_request(f"a{i}", p, GREEDY)
    eng.step()
    eng.step()
    assert eng.kv.num_used_blocks > 0
    for i in range(8):
        eng.abort(f"a{i}")
    assert eng.kv.num_used_blocks == 0 and not eng.has_unfinished()


def test_kv_bytes_per_token_is_latent_only(llm, capsys):
    cfg = llm.engine.config
    runner = llm.engine.runner
    layers = runner.model.num_cache_layers
    assert runner.cache_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers * 4
    mha = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    with capsys.disabled():
        print(f"\nKV bytes/token: MLA latent {runner.cache_bytes_per_token} vs MHA-equivalent {mha} "
              f"({mha / runner.cache_bytes_per_token:.1f}x)")
    assert runner.kv_caches[0].shape[-1] == cfg.kv_cache_width


def test_seeded_sampling_independent_of_batch(llm, prompts):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    target = prompts[5]
    alone = _tokens(llm.generate([target], params))[0]
    mixed = llm.generate(prompts[:3] + [target] + prompts[6:9], [other] * 3 + [params] + [other] * 3)
    assert mixed[3].outputs[0].token_ids == alone
    unseeded = _tokens(llm.generate([target, target], [other, other]))
    assert unseeded[0] != unseeded[1]


def test_n_completions_share_the_prompt(llm, prompts):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    out = llm.generate([prompts[2]], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 16 for o in out.outputs)
    assert llm.engine.kv.num_used_blocks == 0


def test_stop_strings_and_tokens(llm):
    tok = llm.tokenizer
    free = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    stop_id = free.token_ids[5]
    by_id = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id],
                                                        ignore_eos=True))[0].outputs[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert by_id.stop_reason == stop_id
    assert tok.decode(free.token_ids, skip_special_tokens=True) == free.text


def test_logprobs_and_prompt_logprobs(llm, prompts):
    p = prompts[7][:40]
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = llm.generate([p], params)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 5
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert next(iter(entry)) == tok and len(entry) >= 3
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    assert all(next(iter(e)) == t for e, t in zip(out.prompt_logprobs[1:], p[1:]))
    # chunked prefill gives the same prompt logprobs
    small = LLM(llm.engine.args.model, dtype="float32", max_num_batched_tokens=7)
    again = small.generate([p], params)[0]
    for a, b in zip(out.prompt_logprobs[1:], again.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_invalid_requests_name_the_parameter(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("x1", [], GREEDY)
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("x2", [eng.config.vocab_size + 5], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("x3", [1, 2, 3], SamplingParams(max_tokens=eng.max_model_len))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not eng.has_unfinished()


def test_resumed_request_text_continues_across_the_resume_point(llm, prompts):
    """A sequence resumed elsewhere (prompt + already streamed tokens re-prefilled) continues its text."""
    p = prompts[4][:30]
    full = llm.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    for cut in (1, 7, 13):
        first = llm.generate([p], SamplingParams(temperature=0, max_tokens=cut, ignore_eos=True))[0].outputs[0]
        rid = f"resume-{cut}"
        llm.engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                               continuation=Continuation(output_token_ids=tuple(first.token_ids)))
        rest = _run(llm.engine)[rid].outputs[0]
        assert first.token_ids + rest.token_ids == full.token_ids
        # the first leg flushes what it held back at its end; the resumed leg must not repeat it
        assert full.text.startswith(first.text.rstrip("\ufffd")) and full.text.endswith(rest.text)
        assert len(first.text.rstrip("\ufffd")) + len(rest.text) >= len(full.text) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=24, ignore_eos=True),
                                    SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=16, ignore_eos=True)])
def test_seeded_sequence_continued_elsewhere_is_unchanged(llm, prompts, params):
    """Seeded sampling depends on (seed, completion index, position) only: a sequence cut after k tokens
    and continued (another engine, a resume) produces exactly the tokens it would have."""
    p = prompts[5][:40]
    full = llm.generate([p], params)[0].outputs
    for c in full:
        for cut in (1, 9):
            rid = f"seeded-{c.index}-{cut}"
            llm.engine.add_request(rid, p, params.clone(n=1), continuation=Continuation(
                index=c.index, output_token_ids=tuple(c.token_ids[:cut])))
            rest = _run(llm.engine)[rid].outputs[0]
            assert c.token_ids[:cut] + rest.token_ids == c.token_ids
    assert llm.engine.kv.num_used_blocks == 0

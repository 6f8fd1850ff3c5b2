"""MTP speculative decoding is lossless.

Greedy: identical tokens with and without MTP (batch 1 and 32, k = 1 and 3,
chunked prefill, prefix caching, stop strings, max_tokens, n > 1, the
prefill → decode hand-off). Sampling: the verification rule reproduces the
target distribution (chi-square on a small vocabulary, drafts right and wrong).
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.args import EngineArgs
from engine.engine import LLMEngine
from engine.sampler import SamplingRow
from engine.spec_decode import VerifyGroup, verify
from handoff import prefill_then_decode

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _prompts(n: int, vocab: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 90))] for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def prompts(plain):
    return _prompts(32, plain.engine.config.vocab_size)


@pytest.fixture(scope="module")
def reference(plain, prompts):
    return _tokens(plain.generate(prompts, GREEDY))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_batch_32_and_alone(tiny_checkpoint, prompts, reference, k):
    spec = LLM(tiny_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=k,
               speculative_disable_by_batch_size=0)  # draft at batch 32 too
    assert _tokens(spec.generate(prompts, GREEDY)) == reference
    assert [_tokens(spec.generate([p], GREEDY))[0] for p in prompts[:4]] == reference[:4]
    stats = spec.engine.stats()
    assert stats.spec_drafts > 0 and stats.spec_draft_tokens >= stats.spec_drafts
    assert spec.engine.kv.num_used_blocks == 0


def test_drafting_stops_at_the_batch_size_limit_and_resumes(tiny_checkpoint, prompts, reference):
    """No draft is verified in a step that starts with ``speculative_disable_by_batch_size`` running
    sequences or more; drafting resumes as the batch shrinks; the tokens stay those of plain decoding."""
    eng = LLMEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", speculative="mtp",
                               speculative_disable_by_batch_size=4))
    lengths = [8 + 6 * i for i in range(6)]
    for i, n in enumerate(lengths):
        eng.add_request(str(i), prompts[i], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    verified: dict[int, int] = {}  # running sequences at the step's start -> draft tokens it verified
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        running, before = len(eng.scheduler.running), eng.spec.draft_tokens
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        verified[running] = verified.get(running, 0) + eng.spec.draft_tokens - before
    assert {b: v for b, v in verified.items() if b >= 4 and v} == {}
    assert sum(v for b, v in verified.items() if b < 4) > 0
    assert [tokens[str(i)] for i in range(6)] == [r[:n] for r, n in zip(reference, lengths)]


def test_greedy_identical_with_chunking_prefix_cache_stops_and_n(tiny_checkpoint, plain, prompts, reference):
    spec = LLM(tiny_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=2,
               max_num_batched_tokens=24, block_size=16)
    assert _tokens(spec.generate(prompts[:6], GREEDY)) == reference[:6]
    assert _tokens(spec.generate(prompts[:6], GREEDY)) == reference[:6]  # now with prefix-cache hits
    assert spec.engine.kv.prefix_hits > 0
    short = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    outs = spec.generate(prompts[:8], short)
    assert all(len(t) == 7 for t in _tokens(outs))  # never overshoots max_tokens
    assert _tokens(outs) == [r[:7] for r in reference[:8]]
    text = "def f(x):"
    free = plain.generate([text], GREEDY)[0].outputs[0]
    stop = free.text[4:7]
    want = plain.generate([text], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))
    got = spec.generate([text], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))
    assert got[0].outputs[0].text == want[0].outputs[0].text
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    n_out = spec.generate([prompts[0]], SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert [o.token_ids for o in n_out.outputs] == [reference[0][:20]] * 3
    assert spec.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_greedy_identical_through_kv_handoff(tiny_checkpoint, prompts, reference, mode):
    args = dict(model=tiny_checkpoint, dtype="float32", speculative="mtp", num_speculative_tokens=2)
    prefill = LLMEngine(EngineArgs(role="prefill", kv_transfer=mode, **args))
    decode = LLMEngine(EngineArgs(role="decode", **args))
    got = prefill_then_decode(prefill, decode, {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts[:6])})
    assert [got[f"r{i}"] for i in range(6)] == reference[:6]
    assert decode.stats().spec_drafts > 0
    assert prefill.kv.num_used_blocks == 0 and decode.kv.num_used_blocks == 0


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against expected counts; critical value for p = 0.001 at <= 6 dof is 22.5."""
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat < 22.5


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 3)])
def test_verification_follows_the_target_distribution(temperature, top_k):
    """First emitted token ~ p_0 and, when d_1 was accepted, the second ~ p_1: the exact spec rule."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.5, 1.0, -0.5, 0.3]])  # p_0, p_1 (5-token vocab)
    params = SamplingParams(temperature=temperature, top_k=top_k, max_tokens=10)

    def target(row: int) -> torch.Tensor:
        x = logits[row] / temperature
        if top_k:
            x = x.masked_fill(x < x.topk(top_k).values[-1], float("-inf"))
        return x.softmax(-1)

    for draft in (0, 2, 4):  # the likely token, a middling one, one outside top-k
        rows = [SamplingRow(params, [1], []), SamplingRow(params, [1], [draft])]
        first = torch.zeros(5)
        second = torch.zeros(5)
        for _ in range(4000):
            out = verify(logits, rows, [VerifyGroup(0, [draft], None)], g)[0]
            first[out[0]] += 1
            if len(out) == 2:
                second[out[1]] += 1
        assert _chi2_ok(first, target(0))
        if target(0)[draft] > 0.05:
            assert _chi2_ok(second, target(1))


def test_verification_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    params = SamplingParams(temperature=0.0)
    rows = [SamplingRow(params, [0], []), SamplingRow(params, [0], [1]), SamplingRow(params, [0], [1, 0])]
    assert verify(logits, rows, [VerifyGroup(0, [1, 0], None)], None) == [[1, 0, 2]]  # all accepted + bonus
    assert verify(logits, rows, [VerifyGroup(0, [2, 0], None)], None) == [[1]]  # first rejected


def test_server_reports_acceptance_and_metrics(tiny_checkpoint):
    import shutil
    import subprocess

    import httpx
    from fake_engine import running_server

    from engine.async_engine import AsyncEngine
    from engine.tokenizer import load_tokenizer

    client = AsyncEngine(EngineArgs(model=tiny_checkpoint, dtype="float32", speculative="mtp",
                                    num_speculative_tokens=2))
    with running_server(client, load_tokenizer(tiny_checkpoint)) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 12,
                                                           "temperature": 0, "ignore_eos": True}, timeout=60)
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == 12
        spec = usage["spec_decode"]
        assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
        text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    assert "pdserve_spec_decode_num_draft_tokens_total" in text
    assert 'pdserve_spec_decode_num_accepted_tokens_per_pos_total{position="1"}' in text
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_sampled_outputs_follow_the_same_distribution_end_to_end():
    """Bundled trained model (its MTP drafts are often accepted), top-k 3, 768 seeded samples with and
    without MTP: the distributions of the 2nd and 3rd generated tokens agree (two-sample chi-square)."""
    from engine.args import default_model

    params = [SamplingParams(n=64, temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, seed=s) for s in range(12)]
    prompt = "def read_config(path):\n    with open(path) as f:\n"
    samples = {}
    for k in (0, 2):
        opts = {"speculative": "mtp", "num_speculative_tokens": k, "speculative_disable_by_batch_size": 0} if k else {}
        llm = LLM(default_model(), dtype="float32", **opts)
        outs = llm.generate([prompt] * len(params), params)
        samples[k] = [tuple(c.token_ids) for o in outs for c in o.outputs]
        if k:
            assert llm.engine.stats().spec_accepted_tokens > 100  # the accept path really ran
    for pos in (1, 2):
        a = [s[pos] for s in samples[0]]
        b = [s[pos] for s in samples[2]]
        cats = sorted(set(a) | set(b))
        ca = torch.tensor([a.count(c) for c in cats], dtype=torch.float64)
        cb = torch.tensor([b.count(c) for c in cats], dtype=torch.float64)
        keep = (ca + cb) >= 10  # pool rare categories
        ca = torch.cat([ca[keep], ca[~keep].sum(0, keepdim=True)])
        cb = torch.cat([cb[keep], cb[~keep].sum(0, keepdim=True)])
        nz = (ca + cb) > 0
        stat = (((ca - cb) ** 2) / (ca + cb))[nz].sum().item()  # equal sample sizes
        dof = int(nz.sum()) - 1
        # chi-square critical values at p = 0.001
        critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
                    10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}
        assert dof >= 1 and stat < critical[min(dof, 15)], (pos, stat, dof)

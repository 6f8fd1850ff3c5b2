"""Sampler: greedy/seeded determinism, filters, penalties, distributions, logprobs, param validation."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    _apply_top_p,
    compute_logprobs_topk,
    penalized_logits,
    prompt_logprobs,
)
from engine.sampling_params import SamplingParamError, SamplingParams

EOS = 3
# Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 64)
    return SamplingParams(**kw)


def row(p: SamplingParams, output=(), prompt=(0, 1), generator=None) -> SamplingRow:
    if generator is None and p.seed is not None:
        generator = torch.Generator().manual_seed(p.seed)
    return SamplingRow(p, list(prompt), list(output), (EOS,), generator)


def sample(logits: torch.Tensor, rows: list[SamplingRow], sampler: Sampler | None = None):
    return (sampler or Sampler())(logits, SamplingMetadata.build(rows))


def test_greedy_is_argmax_fp32_and_bf16():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    rows = [row(params(temperature=0.0)) for _ in range(8)]
    assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))
    bf16 = logits.bfloat16()
    out = sample(bf16, rows)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, bf16.float().argmax(-1))
    assert torch.equal(bf16, logits.bfloat16()), "input logits must not be modified"


def test_temperature_zero_ignores_seed_and_consumes_no_randomness():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    rows = [row(params(temperature=0.0, seed=7), generator=g), row(params(temperature=1.0))]
    out = sample(logits, rows)
    assert out.token_ids[0].item() == logits[0].argmax().item()
    assert torch.equal(g.get_state(), state)


def _target_logits(step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step)) * 3


def _seeded_run(position: int, companions: list[SamplingParams], steps: int, vocab: int) -> list[int]:
    """Tokens of one seeded target row placed at ``position`` among ``companions``."""
    target = params(temperature=0.9, top_p=0.95, top_k=200, min_p=0.01, seed=1234)
    rows = [row(p) for p in companions]
    rows.insert(position, row(target))
    noise = torch.Generator().manual_seed(position * 31 + len(companions))
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(rows), vocab, generator=noise) * 3  # [B, V] companions change every run
        logits[position] = _target_logits(step, vocab)
        out = sample(logits, rows)
        tokens.append(out.token_ids[position].item())
        for r, t in zip(rows, out.token_ids.tolist()):
            r.output_token_ids.append(t)
    return tokens


def test_seeded_row_independent_of_batch_and_position():
    vocab, steps = 2000, 12
    alone = _seeded_run(0, [], steps, vocab)
    companions_a = [params(temperature=0.0), params(temperature=1.3, seed=5), params(temperature=0.7, top_p=0.5)]
    companions_b = [params(temperature=1.0, presence_penalty=1.0)] * 6 + [params(temperature=0.5, seed=99, top_k=3)]
    assert _seeded_run(2, companions_a, steps, vocab) == alone
    assert _seeded_run(7, companions_b, steps, vocab) == alone
    assert _seeded_run(3, companions_b, steps, vocab) == alone
    assert len(set(alone)) > 1, "target row should actually be sampling"


def test_different_seeds_differ():
    logits = torch.zeros(2, 1000)
    rows = [row(params(seed=1)), row(params(seed=2))]
    tokens = [sample(logits, rows).token_ids.tolist() for _ in range(5)]
    assert any(a != b for a, b in tokens)


@pytest.mark.parametrize("filt", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_degenerate_filters_equal_greedy(filt):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3)) * 2
    rows = [row(params(temperature=1.5, **filt)) for _ in range(16)]
    for _ in range(3):
        assert torch.equal(sample(logits, rows).token_ids, logits.argmax(-1))


def test_min_p_keeps_only_tokens_near_the_top():
    # probs (temperature 1): token 0 -> e^2, token 1 -> e^1.5 (ratio 0.61), the rest far below 0.5 * max.
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, 0.5, -3.0]]).repeat(4000, 1)
    tokens = sample(logits, [row(params(min_p=0.5))] * 4000, Sampler(torch.Generator().manual_seed(0))).token_ids
    assert set(tokens.tolist()) == {0, 1}


def _reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                         rep: float, presence: float, frequency: float) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_penalties_match_reference():
    vocab = 12
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, vocab, generator=gen) * 2
    cases = [
        (dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25), [1, 2, 2], [2, 5, 5, 5, 7]),
        (dict(repetition_penalty=0.8), [0, 11], [4, 4]),
        (dict(), [1, 2], [3]),  # no penalties on this row
        (dict(presence_penalty=-1.0, frequency_penalty=1.5), [9], [9, 9, 0, 10, 10, 10, 10]),
    ]
    rows = [SamplingRow(params(**kw), prompt, output) for kw, prompt, output in cases]
    got = penalized_logits(logits, SamplingMetadata.build(rows))
    for i, (kw, prompt, output) in enumerate(cases):
        expected = _reference_penalties(logits[i].tolist(), prompt, output, kw.get("repetition_penalty", 1.0),
                                        kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0))
        torch.testing.assert_close(got[i], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0]])
    assert sample(logits, [row(params(temperature=0.0), output=[0])]).token_ids.item() == 0
    assert sample(logits, [row(params(temperature=0.0, presence_penalty=0.5), output=[0])]).token_ids.item() == 1
    assert sample(logits, [row(params(temperature=0.0, repetition_penalty=1.1), prompt=[0])]).token_ids.item() == 1


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 1.0, 9.0, 10.0, 0.0]])  # EOS=3 best, then stop token 2
    p = params(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert sample(logits, [row(p, output=[1])]).token_ids.item() == 1
    assert sample(logits, [row(p, output=[1, 1, 1])]).token_ids.item() == EOS
    # ignore_eos (vLLM): eos may be sampled, it just does not end the sequence (the engine's stop check)
    ignore = params(temperature=0.0, ignore_eos=True, stop_token_ids=[2])
    assert sample(logits, [row(ignore, output=[1, 1, 1])]).token_ids.item() == EOS
    sampled = sample(logits.repeat(500, 1), [row(params(min_tokens=2), output=[1])] * 500).token_ids
    assert EOS not in sampled.tolist()


def _reference_probs(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Straightforward float64 reference of temperature -> top-k -> top-p -> min-p."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k] if top_k else order)
    m = max(z)
    w = {i: math.exp(z[i] - m) for i in keep}
    total = sum(w.values())
    nucleus, acc = set(), 0.0
    for i in order:
        if i in keep and acc < top_p:
            nucleus.add(i)
            acc += w[i] / total
    top = max(w[i] for i in nucleus)
    final = {i: w[i] for i in nucleus if w[i] >= min_p * top}
    norm = sum(final.values())
    return [final.get(i, 0.0) / norm for i in range(len(logits))]


def _chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    n = sum(counts)
    support = [i for i, p in enumerate(probs) if p > 0]
    assert all(counts[i] == 0 for i, p in enumerate(probs) if p == 0), (counts, probs)
    stat = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    return stat, len(support) - 1


LOGITS5 = [1.0, 0.5, 0.0, -0.5, 2.0]


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=2.0, top_k=4, top_p=0.8, min_p=0.2),
])
def test_sampling_follows_filtered_softmax(kw):
    n = 20000
    logits = torch.tensor([LOGITS5]).repeat(n, 1)
    tokens = sample(logits, [row(params(**kw))] * n, Sampler(torch.Generator().manual_seed(0))).token_ids
    counts = torch.bincount(tokens, minlength=5).tolist()
    stat, df = _chi_square(counts, _reference_probs(LOGITS5, **kw))
    assert df >= 1 and stat < CHI2_CRITICAL[df], (counts, stat)


def test_seeded_rows_follow_softmax():
    rows = [row(params(seed=s)) for s in range(200)]
    logits = torch.tensor([LOGITS5]).repeat(len(rows), 1)
    counts = [0] * 5
    for _ in range(10):
        for t in sample(logits, rows).token_ids.tolist():
            counts[t] += 1
    stat, df = _chi_square(counts, _reference_probs(LOGITS5))
    assert stat < CHI2_CRITICAL[df], (counts, stat)


def _sort_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Reference nucleus filter with a full descending sort."""
    values, order = probs.sort(dim=-1, descending=True)
    exclusive = values.cumsum(-1) - values
    threshold = torch.where(exclusive < top_p, values, torch.inf).amin(-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def test_top_p_matches_sort_reference():
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([0.01, 0.3, 1.0, 3.0, 8.0, 0.05]).unsqueeze(1)  # flat rows need a full sort
    probs = (torch.randn(6, 3000, generator=gen) * scales).softmax(-1)
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.7, 0.99, 1.0]).unsqueeze(1)
    got = probs.clone()
    _apply_top_p(got, top_p)
    assert torch.equal(got, _sort_top_p(probs, top_p))
    assert torch.equal(got[5], probs[5])
    assert (got[0] > 0).sum() > 1024


def test_logprobs_are_raw_log_softmax():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 40, generator=gen) * 2
    rows = [
        row(params(temperature=0.0)),
        row(params(temperature=0.7, logprobs=0, presence_penalty=2.0), output=[1, 2]),
        row(params(temperature=1.5, logprobs=3, top_k=5)),
        row(params(temperature=0.0, logprobs=5, repetition_penalty=1.5), prompt=[7, 8]),
    ]
    out = sample(logits, rows)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.topk_ids.shape == (4, 5)
    top_vals, top_ids = ref.topk(5, -1)
    torch.testing.assert_close(out.topk_logprobs, top_vals)
    assert torch.equal(out.topk_ids, top_ids)

    dicts = out.to_logprob_dicts([r.params.logprobs for r in rows])
    assert dicts[0] is None
    tok = out.token_ids.tolist()
    assert list(dicts[1]) == [tok[1]]
    assert next(iter(dicts[2])) == tok[2]
    assert set(dicts[2]) == {tok[2], *top_ids[2, :3].tolist()}
    for i in (1, 2, 3):
        for t, lp in dicts[i].items():
            assert lp == pytest.approx(ref[i, t].item(), abs=1e-5)


def test_no_topk_when_no_row_asks():
    out = sample(torch.randn(2, 10), [row(params()), row(params(logprobs=0))])
    assert out.topk_ids is None and out.topk_logprobs is None
    assert out.logprobs.shape == (2,)


def test_prompt_logprobs():
    gen = torch.Generator().manual_seed(8)
    prompt = [3, 1, 4, 1, 5]
    logits = torch.randn(len(prompt), 10, generator=gen)
    result = prompt_logprobs(logits, prompt, 2)
    ref = torch.log_softmax(logits, -1)
    assert result[0] is None and len(result) == len(prompt)
    for p in range(1, len(prompt)):
        entry = result[p]
        assert next(iter(entry)) == prompt[p]
        assert entry[prompt[p]] == pytest.approx(ref[p - 1, prompt[p]].item(), abs=1e-5)
        assert set(ref[p - 1].topk(2).indices.tolist()) <= set(entry)
    direct = compute_logprobs_topk(logits[:-1], 0, torch.tensor(prompt[1:]))
    assert direct.topk_ids is None
    torch.testing.assert_close(direct.logprobs, torch.tensor([result[p][prompt[p]] for p in range(1, 5)]))


def test_metadata_skips_unused_features():
    meta = SamplingMetadata.build([row(params()), row(params(temperature=0.0))])
    assert meta.temperature is None and meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.penalties is None and meta.banned_rows is None and meta.max_num_logprobs == 0
    assert meta.greedy.tolist() == [False, True] and not meta.all_greedy


@pytest.mark.parametrize("kw, param", [
    (dict(n=0), "n"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(min_p=1.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed="1"), "seed"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
])
def test_sampling_params_validation_names_the_parameter(kw, param):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(**kw)
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}:")


def test_sampling_params_normalization():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0
    assert SamplingParams(temperature=0.0).greedy

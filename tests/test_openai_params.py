"""OpenAI request fields as OpenAI documents them (issue #16, item 5), on the real engine.

``logit_bias`` (token id -> bias in [-100, 100], added to the logits before sampling, a sparse
add in the batched sampler), chat ``logprobs`` + ``top_logprobs``, ``user``, ``seed``,
``stream_options`` (``include_usage``, vLLM's ``continuous_usage_stats``),
``max_completion_tokens`` over ``max_tokens``; unknown fields ignored and logged as vLLM does.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.args import EngineArgs
from engine.sampler import Sampler, SamplingMetadata, SamplingRow
from engine.sampling_params import SamplingParamError
from engine.tokenizer import load_tokenizer
from fake_engine import running_server

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Hello there"}]


# ---- the sampler ---------------------------------------------------------------------------
def _row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), prompt_token_ids=[1, 2], output_token_ids=[])


def test_logit_bias_in_the_batched_sampler():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(dim=-1).tolist()
    rows = [_row(temperature=0, logit_bias={7: 100.0}),
            _row(temperature=0, logit_bias={top[1]: -100.0}),
            _row(temperature=0),
            _row(temperature=1.0, seed=3, logit_bias={9: 100.0, 10**6: 5.0})]  # out-of-vocab id: no effect
    meta = SamplingMetadata.build(rows)
    assert meta.bias_rows.tolist() == [0, 1, 3, 3]
    out = Sampler()(logits, meta).token_ids.tolist()
    assert out[0] == 7 and out[1] != top[1] and out[2] == top[2] and out[3] == 9
    assert SamplingMetadata.build([_row(temperature=0), _row()]).bias_rows is None  # nothing built when unused
    # logprobs stay the model's raw ones (vLLM's default), as for the other logit processors
    raw = Sampler()(logits[:1], SamplingMetadata.build([_row(temperature=0, logit_bias={7: 100.0}, logprobs=0)]))
    assert raw.logprobs.item() == pytest.approx(torch.log_softmax(logits[0], -1)[7].item())


@pytest.mark.parametrize("bias", [{1: 100.5}, {-1: 1.0}, {"5": 1.0}, {2: float("nan")}, [1, 2]])
def test_logit_bias_validation(bias):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(logit_bias=bias)
    assert info.value.param == "logit_bias"


def test_offline_logit_bias_and_vocabulary_check(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", num_kv_blocks=32, block_size=16)
    out = llm.generate("def f():", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={42: 100.0}))
    assert out[0].outputs[0].token_ids == [42] * 4
    vocab = llm.engine.config.vocab_size
    with pytest.raises(SamplingParamError, match=f"logit_bias: token id {vocab} is outside the vocabulary"):
        llm.generate("x", SamplingParams(logit_bias={vocab: 1.0}))


# ---- the HTTP API --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    engine = AsyncEngine(EngineArgs(model=tiny_checkpoint, served_model_name=MODEL, dtype="float32",
                                    num_kv_blocks=64, block_size=16))
    with running_server(engine, load_tokenizer(tiny_checkpoint)) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as client:
        yield client


def _token_ids(server, choice_logprobs) -> list[int]:
    tok = load_tokenizer(server.client.args.model)
    return [tok.hf.token_to_id(entry.token) for entry in choice_logprobs.content]


def test_logit_bias_on_chat_and_completions(server, sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logit_bias={"42": 100},
                                    logprobs=True, extra_body={"ignore_eos": True})
    assert [e.token for e in r.choices[0].logprobs.content] == [load_tokenizer(server.client.args.model).token_text(42)] * 5
    c = sdk.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, logit_bias={"42": 100}, logprobs=0,
                               extra_body={"ignore_eos": True})
    assert c.choices[0].text == load_tokenizer(server.client.args.model).decode([42] * 3)
    odd = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0,
                                        logit_bias={str(i): -100 for i in range(0, 512, 2)},
                                        extra_body={"ignore_eos": True}, logprobs=True)
    assert all(t % 2 == 1 for t in _token_ids(server, odd.choices[0].logprobs))
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logit_bias={"100000": 1})
    assert info.value.body["param"] == "logit_bias"


def test_chat_logprobs_top_logprobs_seed_user_and_max_completion_tokens(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, max_completion_tokens=4,
                                    temperature=0, logprobs=True, top_logprobs=3, user="user-1234",
                                    extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == 4 and len(content) == 4  # max_completion_tokens wins
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token for e in content)  # greedy: top-1
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob for e in content)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    sampled = [sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=s,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
               for s in (11, 11, 12)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_stream_options_usage(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    with_choices = [e for e in events if e["choices"]]
    generated = [e for e in with_choices if "role" not in e["choices"][0]["delta"]]
    assert [e["usage"]["completion_tokens"] for e in generated] == [1, 2, 3, 4]  # continuous usage
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4  # the final usage chunk
    assert events[-1]["usage"]["total_tokens"] == events[-1]["usage"]["prompt_tokens"] + 4


def test_unknown_fields_are_ignored_and_logged_known_ones_stay_strict(server, caplog):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "store": False, "metadata": {"a": "b"},
            "service_tier": "auto"}
    with caplog.at_level(logging.WARNING, logger="pdserve.api"):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "pdserve.api"]
    assert logged == ["request fields ignored (not supported): metadata, service_tier, store"]
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": "2"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

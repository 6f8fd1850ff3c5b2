"""Malformed and out-of-range requests: each gets the right 4xx with an OpenAI error body,
and the server still answers a good request right after it.
"""

from __future__ import annotations

import json

import httpx
import pytest

from fake_engine import FakeEngine, make_tokenizer, running_server

MAX_MODEL_LEN = 256
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return {"model": "fake-model", "messages": USER, "max_tokens": 4, **fields}


def completion(**fields):
    return {"model": "fake-model", "prompt": "Hello", "max_tokens": 4, **fields}


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (name, method, path, body: dict/list -> JSON, bytes -> raw, headers, status, param the error names or None)
CASES = [
    ("prompt wrong type", "POST", COMPLETIONS, completion(prompt=5), {}, 400, "prompt"),
    ("prompt missing", "POST", COMPLETIONS, {"max_tokens": 3}, {}, 400, "prompt"),
    ("prompt empty list", "POST", COMPLETIONS, completion(prompt=[]), {}, 400, "prompt"),
    ("prompt mixed list", "POST", COMPLETIONS, completion(prompt=["a", 1]), {}, 400, "prompt"),
    ("token id outside vocab", "POST", COMPLETIONS, completion(prompt=[1, 2, 10**6]), {}, 400, "prompt"),
    ("prompt beyond context", "POST", COMPLETIONS, completion(prompt=list(range(2, 300)), max_tokens=None), {}, 400,
     "prompt"),
    ("messages missing", "POST", CHAT, {"model": "fake-model"}, {}, 400, "messages"),
    ("messages empty", "POST", CHAT, chat(messages=[]), {}, 400, "messages"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), {}, 400, "messages[0].role"),
    ("content wrong type", "POST", CHAT, chat(messages=[{"role": "user", "content": 7}]), {}, 400,
     "messages[0].content"),
    ("user content missing", "POST", CHAT, chat(messages=[{"role": "user"}]), {}, 400, "messages[0].content"),
    ("image content part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), {}, 400,
     "messages[0].content[0].type"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4"), {}, 404, "model"),
    ("model wrong type", "POST", CHAT, chat(model=3), {}, 400, "model"),
    ("n zero", "POST", CHAT, chat(n=0), {}, 400, "n"),
    ("n 1000", "POST", COMPLETIONS, completion(n=1000), {}, 400, "n"),
    ("n float", "POST", CHAT, chat(n=2.0), {}, 400, "n"),
    ("n huge int", "POST", CHAT, chat(n=10**30), {}, 400, "n"),
    ("temperature -1", "POST", CHAT, chat(temperature=-1), {}, 400, "temperature"),
    ("top_p 2", "POST", COMPLETIONS, completion(top_p=2), {}, 400, "top_p"),
    ("top_k -5", "POST", CHAT, chat(top_k=-5), {}, 400, "top_k"),
    ("min_p 1.5", "POST", CHAT, chat(min_p=1.5), {}, 400, "min_p"),
    ("presence_penalty 3", "POST", CHAT, chat(presence_penalty=3), {}, 400, "presence_penalty"),
    ("repetition_penalty 0", "POST", COMPLETIONS, completion(repetition_penalty=0), {}, 400, "repetition_penalty"),
    ("seed string", "POST", CHAT, chat(seed="abc"), {}, 400, "seed"),
    ("max_tokens 0", "POST", CHAT, chat(max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens string", "POST", COMPLETIONS, completion(max_tokens="10"), {}, 400, "max_tokens"),
    ("max_tokens beyond context", "POST", CHAT, chat(max_tokens=10_000), {}, 400, "max_tokens"),
    ("max_completion_tokens beyond context", "POST", CHAT, chat(max_completion_tokens=10_000), {}, 400,
     "max_completion_tokens"),
    ("min_tokens above max_tokens", "POST", CHAT, chat(min_tokens=9), {}, 400, "min_tokens"),
    ("100 stop strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(100)]), {}, 400, "stop"),
    ("stop not strings", "POST", CHAT, chat(stop=["a", 3]), {}, 400, "stop"),
    ("negative stop token id", "POST", COMPLETIONS, completion(stop_token_ids=[-1]), {}, 400, "stop_token_ids"),
    ("stream not a bool", "POST", CHAT, chat(stream="yes"), {}, 400, "stream"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), {}, 400,
     "stream_options"),
    ("logprobs 100", "POST", COMPLETIONS, completion(logprobs=100), {}, 400, "logprobs"),
    ("top_logprobs 100", "POST", CHAT, chat(logprobs=True, top_logprobs=100), {}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs"),
    ("best_of unsupported", "POST", COMPLETIONS, completion(best_of=3), {}, 400, "best_of"),
    ("logit_bias out of range", "POST", CHAT, chat(logit_bias={"5": 101.0}), {}, 400, "logit_bias"),
    ("logit_bias key not a token id", "POST", COMPLETIONS, completion(logit_bias={"five": 1.0}), {}, 400,
     "logit_bias"),
    ("tool_choice names no tool", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                     tool_choice={"type": "function", "function": {"name": "g"}}),
     {}, 400, "tool_choice"),
    ("json_schema without a schema", "POST", CHAT, chat(response_format={"type": "json_schema"}), {}, 400,
     "response_format"),
    ("invalid guided_regex", "POST", COMPLETIONS, completion(guided_regex="(ab"), {}, 400, "guided_regex"),
    ("invalid JSON", "POST", CHAT, b'{"messages": [', {}, 400, None),
    ("NaN in JSON", "POST", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', {}, 400, None),
    ("non-UTF-8 body", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe"}', {}, 400, None),
    ("array instead of object", "POST", CHAT, [chat()], {}, 400, None),
    ("null body", "POST", CHAT, b"null", {}, 400, None),
    ("empty body", "POST", CHAT, b"", {}, 400, None),
    ("deeply nested JSON", "POST", COMPLETIONS, nested(100_000), {}, 400, None),
    ("10 MB body", "POST", COMPLETIONS, completion(prompt="a" * 10_000_000), {}, 413, None),
    ("wrong content-type", "POST", CHAT, b"messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     None),
    ("GET on a POST endpoint", "GET", CHAT, None, {}, 405, None),
    ("unknown path", "POST", "/v1/embeddings", chat(), {}, 404, None),
]


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    tok = make_tokenizer(str(tmp_path_factory.mktemp("model")))
    with running_server(FakeEngine(tok, max_model_len=MAX_MODEL_LEN), tok) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client


def send(client: httpx.Client, method: str, path: str, body, headers: dict) -> httpx.Response:
    if body is None:
        return client.request(method, path, headers=headers)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.request(method, path, content=content, headers={"Content-Type": "application/json", **headers})


def test_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,method,path,body,headers,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, name, method, path, body, headers, status, param):
    r = send(http, method, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    good = http.post(CHAT, json=chat())
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


def test_context_error_names_both_numbers(http):
    r = http.post(CHAT, json=chat(max_tokens=10_000))
    message = r.json()["error"]["message"]
    assert str(MAX_MODEL_LEN) in message and "10000" in message


def test_openai_sdk_maps_errors(http):
    import openai

    with openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key="x", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(model="fake-model", messages=USER, temperature=-1)
        assert e.value.body["param"] == "temperature"
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="nope", messages=USER)

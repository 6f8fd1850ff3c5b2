"""The HTTP API under malformed and generated requests (issue #19): no 5xx, no dropped
connection, the server still serves.

``tools/fuzz_http.py`` runs against two servers started here: ``FakeEngine`` (fast: every
hand-written case, 150 schemathesis examples per mode) and the real engine on the bundled
model in fp32 with a 32-token context (crashes can come from the engine side: tokenizing odd
strings, sampling at extreme parameters), 60 examples per mode. Both runs are seeded, so
CI sees the same requests every time. Plus the two crashes of the issue as plain regression
tests, and ``/openapi.json`` describing the bodies that requests are validated against.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

from engine.tokenizer import load_tokenizer
from fake_engine import FakeEngine, make_tokenizer, running_server
from serving.protocol import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODEL_LEN = 32


sys.path.insert(0, os.path.join(REPO, "tools"))
import fuzz_http as fuzz  # noqa: E402  (tools/ is not a package)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def fake(tok):
    engine = FakeEngine(tok, max_model_len=MAX_MODEL_LEN)
    with running_server(engine, tok) as srv:
        yield srv


@pytest.fixture(scope="module")
def real():
    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine

    args = EngineArgs(dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory_gb=0.25)
    with running_server(AsyncEngine(args), load_tokenizer(args.model)) as srv:
        yield srv


def _run_all_cases(url: str) -> None:
    openapi, model, max_model_len = fuzz.server_description(url)
    cases = fuzz.hand_cases(openapi, model, max_model_len)
    report = fuzz.run_hand_cases(url, cases)
    print(f"hand-written cases against {model}: {report.summary()}")
    assert report.requests == len(cases) >= 100
    assert report.server_errors == 0 and not report.failures, "\n".join(report.failures)


def _run_schemathesis(url: str, examples: int) -> None:
    report = fuzz.run_schemathesis(url, examples, seed=19)
    print(f"schemathesis, {examples} examples per mode: {report.summary()}")
    assert report.requests >= 2 * examples * 0.9  # hypothesis may stop early on a small space, not by much
    assert report.statuses[200] > 0 and report.statuses[400] > 0  # both accepted and rejected requests were made
    assert report.server_errors == 0 and not report.failures, "\n".join(report.failures)
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# ---- the crashes of issue #19 ---------------------------------------------------------
def test_lone_surrogate_in_chat_content_is_a_400(fake):
    body = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
    r = httpx.post(fake.v1 + "/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content"
    assert r.json()["error"]["code"] == "invalid_unicode"


def test_completions_without_prompt_is_a_400(fake):
    r = httpx.post(fake.v1 + "/completions", json={"max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_500_keeps_the_connection_and_shows_no_details(tok):
    """The dropped connection of the issue: after a 500 uvicorn closed the keep-alive connection
    (Starlette re-raised the error), so the client's next request on it went unanswered."""
    engine = FakeEngine(tok)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url) as c:
        for stream in (False, True):
            engine.fail_with = RuntimeError("secret detail in /srv/pdserve/engine.py")
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": stream})
            assert r.status_code == 500
            assert r.json()["error"] == {"message": "internal server error: RuntimeError", "type": "server_error",
                                         "param": None, "code": "internal_error"}
            port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
            r = c.post("/v1/completions", json={"max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            assert r.extensions["network_stream"].get_extra_info("client_addr")[1] == port  # the same connection


# ---- fuzzing ----------------------------------------------------------------------------
def test_hand_written_cases_fake_engine(fake):
    _run_all_cases(fake.url)


def test_schemathesis_fake_engine(fake):
    _run_schemathesis(fake.url, examples=150)


def test_hand_written_cases_real_engine(real):
    _run_all_cases(real.url)
    assert real.client.stats().kv_blocks_used == 0


def test_schemathesis_real_engine(real):
    _run_schemathesis(real.url, examples=60)
    assert real.client.stats().kv_blocks_used == 0


def test_the_fuzzer_catches_a_server_error(tok):
    """The harness itself: a server that answers 500 and drops the connection fails the run."""
    engine = FakeEngine(tok, max_model_len=MAX_MODEL_LEN)
    with running_server(engine, tok) as srv:
        engine.fail_with = RuntimeError("boom")
        case = fuzz.Case("a request that meets an engine bug", "/v1/completions",
                         json.dumps({"prompt": "Hi", "max_tokens": 1}).encode(), frozenset({200}))
        report = fuzz.run_hand_cases(srv.url, [case])
    assert report.server_errors == 1
    assert any("server error 500" in f for f in report.failures)


# ---- the OpenAPI description ---------------------------------------------------------
def test_openapi_describes_the_request_bodies(fake):
    openapi = httpx.get(fake.url + "/openapi.json").json()
    schemas = openapi["components"]["schemas"]
    for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        body = openapi["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
        assert schemas[model.__name__]["required"] == [n for n, f in model.model_fields.items() if f.is_required()]
        responses = openapi["paths"][path]["post"]["responses"]
        assert responses["429"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    # describing the bodies did not hand validation to FastAPI: a schema error is still OpenAI's 400, not a 422
    r = httpx.post(fake.v1 + "/completions", json={"prompt": 5})
    assert r.status_code == 400 and set(r.json()["error"]) == fuzz.ERROR_FIELDS

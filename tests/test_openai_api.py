"""The OpenAI-compatible server end to end: the official ``openai`` SDK (sync and async,
streaming and not) against uvicorn on 127.0.0.1 over the deterministic ``FakeEngine``;
disconnects, auth, engine failures, the access log and the ``pdserve serve`` command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest

from fake_engine import FakeEngine, make_model_dir, running_server
from engine.tokenizer import load_tokenizer

MODEL = "fake-model"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(tok):
    with running_server(FakeEngine(tok, token_delay=0.001), tok) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as client:
        yield client


def chat_prompt_ids(tok, messages):
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ---- plain endpoints ---------------------------------------------------------------
def test_models_health_version(server, sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/version").json()["version"]
        assert c.get("/v1/models/other").status_code == 404


# ---- completions -------------------------------------------------------------------
def test_completion_sync_exact_text_and_usage(server, sdk, tok):
    r = sdk.completions.create(model=MODEL, prompt="Hello world", max_tokens=7)
    ids = tok.encode("Hello world")
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == server.client.expected_text(ids, 0, 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 7, len(ids) + 7)


def test_completion_batch_prompts_and_n_indices(server, sdk, tok):
    prompts = ["The quick brown fox", "Serving large models"]
    r = sdk.completions.create(model=MODEL, prompt=prompts, n=3, max_tokens=4)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        i, k = divmod(c.index, 3)
        assert c.text == server.client.expected_text(tok.encode(prompts[i]), k, 4)
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 6 * 4


def test_completion_token_id_prompts(server, sdk, tok):
    a, b = tok.encode("Hello"), tok.encode("world")
    r = sdk.completions.create(model=MODEL, prompt=a, max_tokens=3)
    assert r.choices[0].text == server.client.expected_text(a, 0, 3)
    r = sdk.completions.create(model=MODEL, prompt=[a, b], max_tokens=3)
    assert [c.text for c in r.choices] == [server.client.expected_text(p, 0, 3) for p in (a, b)]
    assert r.usage.prompt_tokens == len(a) + len(b)


def test_completion_echo_and_logprobs(server, sdk, tok):
    prompt = "Hello world"
    ids = tok.encode(prompt)
    r = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt + server.client.expected_text(ids, 0, 4)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.token_logprobs[-1] == -0.25
    assert all(len(t) == 2 for t in lp.top_logprobs[len(ids):])
    assert lp.text_offset[len(ids)] == len(prompt)


def test_completion_stream_sync(server, sdk, tok):
    ids = tok.encode("Hello world")
    chunks = list(sdk.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == server.client.expected_text(ids, 0, 6)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_stop_string_and_stop_token_ids(server, sdk, tok):
    ids = tok.encode("Hello world")
    full = server.client.expected_text(ids, 0, 8)
    plan = server.client.expected_token_ids(ids, 0, 8)
    r = sdk.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, extra_body={"stop_token_ids": [plan[2]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    stop = full[4:6]
    r = sdk.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.find(stop)]


# ---- chat --------------------------------------------------------------------------
def test_chat_sync_usage_and_content_parts(server, sdk, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = chat_prompt_ids(tok, messages)
    r = sdk.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, n=2)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert [c.message.content for c in r.choices] == [server.client.expected_text(ids, k, 5) for k in range(2)]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    r2 = sdk.chat.completions.create(model=MODEL, messages=parts, max_tokens=5)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_default_max_tokens_is_rest_of_context(tok):
    with running_server(FakeEngine(tok, max_model_len=48), tok) as srv:
        with openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0) as sdk:
            messages = [{"role": "user", "content": "Hello"}]
            r = sdk.chat.completions.create(model=MODEL, messages=messages)
            assert r.usage.total_tokens == 48 and r.choices[0].finish_reason == "length"


def test_chat_eos_ignore_eos_and_min_tokens(tok):
    with running_server(FakeEngine(tok, eos_after=3), tok) as srv:
        with openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0) as sdk:
            messages = [{"role": "user", "content": "Hello"}]
            r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
            assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4  # EOS counts
            r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
            r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            extra_body={"min_tokens": 6})
            assert r.usage.completion_tokens == 7


def test_chat_logprobs(server, sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_chat_stream_async_n2_with_usage(server, tok):
    messages = [{"role": "user", "content": "Tell me about attention"}]
    ids = chat_prompt_ids(tok, messages)

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2,
                                                          stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    texts, roles, reasons = {0: "", 1: ""}, set(), {}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        texts[c.index] += c.delta.content or ""
        if c.delta.role:
            roles.add((c.index, c.delta.role))
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert texts == {k: server.client.expected_text(ids, k, 6) for k in range(2)}
    assert reasons == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids)


def test_64_concurrent_streams_are_independent(tok):
    engine = FakeEngine(tok, token_delay=0.002)
    with running_server(engine, tok) as srv:
        async def one(client, i):
            messages = [{"role": "user", "content": f"Question number {i}: why?"}]
            stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
            return text == engine.expected_text(chat_prompt_ids(tok, messages), 0, 12)

        async def run():
            async with openai.AsyncOpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=60) as client:
                return await asyncio.gather(*(one(client, i) for i in range(64)))

        assert all(asyncio.run(run()))
        wait_until(lambda: engine.blocks_in_use == 0)
        assert engine.abort_calls == []


# ---- disconnects ------------------------------------------------------------------------
def test_stream_disconnect_aborts_and_releases_blocks(tok):
    engine = FakeEngine(tok, token_delay=0.02)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines)[len("data: "):])
            assert engine.blocks_in_use > 0
        wait_until(lambda: engine.blocks_in_use == 0 and not engine.running)
        assert engine.abort_calls == [first["id"] + "-0"]


def test_non_stream_disconnect_aborts(tok):
    engine = FakeEngine(tok, token_delay=0.02)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400},
                   timeout=0.3)
        wait_until(lambda: engine.blocks_in_use == 0 and not engine.running)
        assert len(engine.abort_calls) == 1 and engine.abort_calls[0].startswith("chatcmpl-")


def test_stream_disconnect_before_first_token_aborts(tok):
    engine = FakeEngine(tok, token_delay=5.0)  # the first token takes 5 s: the client gives up first
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True}, timeout=0.3)
        wait_until(lambda: engine.blocks_in_use == 0 and not engine.running, timeout=4)
        assert len(engine.abort_calls) == 1


# ---- auth, engine failures ----------------------------------------------------------
def test_api_key(tok):
    with running_server(FakeEngine(tok), tok, api_key="s3cret") as srv, httpx.Client(base_url=srv.url) as c:
        body = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        with openai.OpenAI(base_url=srv.v1, api_key="s3cret", max_retries=0) as sdk:
            assert sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        with openai.OpenAI(base_url=srv.v1, api_key="nope", max_retries=0) as sdk, \
                pytest.raises(openai.AuthenticationError):
            sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2)


def test_engine_overloaded_down_and_unhealthy(tok):
    engine = FakeEngine(tok)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url) as c:
        from engine.outputs import EngineError, EngineOverloaded

        for stream in (False, True):
            engine.fail_with = EngineOverloaded("queue full")
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": stream})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            engine.fail_with = EngineError("engine died")
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": stream})
            assert r.status_code == 503 and "engine died" in r.json()["error"]["message"]
        engine.healthy = False
        assert c.get("/health").status_code == 503
        engine.healthy = True
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_engine_side_abort_is_an_error_not_a_truncated_answer(tok):
    engine = FakeEngine(tok, token_delay=0.02)

    def abort_everything_soon():
        wait_until(lambda: engine.running)
        for run in list(engine.running.values()):
            run.aborted = True  # what shutdown() does

    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        aborter = threading.Thread(target=abort_everything_soon)
        aborter.start()
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 300})
        aborter.join()
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        aborter = threading.Thread(target=abort_everything_soon)
        aborter.start()
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 300, "stream": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line]
        aborter.join()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"


def test_serving_never_imports_torch():
    code = ("import sys, serving.openai_api, serving.commands.serve, serving.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_access_log_line(server, sdk, caplog):
    with caplog.at_level(logging.INFO, logger="pdserve.access"):
        r = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        wait_until(lambda: any(r.id in rec.getMessage() for rec in caplog.records))
    (line,) = [json.loads(rec.getMessage()) for rec in caplog.records if r.id in rec.getMessage()]
    assert line["status"] == 200 and line["path"] == "/v1/completions"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (r.usage.prompt_tokens, 3)
    assert line["finish_reason"] == "length" and 0 <= line["ttft_s"] <= line["total_s"]


# ---- the real engine -----------------------------------------------------------------------
def test_real_engine_greedy_equals_llm_generate(tiny_checkpoint):
    from engine import LLM, SamplingParams
    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine

    tok = load_tokenizer(tiny_checkpoint)
    messages = [{"role": "user", "content": "Hello there"}]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(tiny_checkpoint, dtype="float32")
    want_text = llm.generate(["Hello world"], greedy)[0].outputs[0].text
    want_chat = llm.generate([chat_prompt_ids(tok, messages)], greedy)[0].outputs[0].text
    del llm
    engine = AsyncEngine(EngineArgs.from_kwargs(tiny_checkpoint, dtype="float32"))
    with running_server(engine, tok) as srv, openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0) as sdk:
        extra = {"ignore_eos": True}
        r = sdk.completions.create(model=engine.model_name, prompt="Hello world", max_tokens=10, temperature=0,
                                   extra_body=extra)
        assert r.choices[0].text == want_text and r.usage.completion_tokens == 10
        stream = sdk.completions.create(model=engine.model_name, prompt="Hello world", max_tokens=10, temperature=0,
                                        extra_body=extra, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == want_text
        c = sdk.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=10, temperature=0,
                                        extra_body=extra)
        assert c.choices[0].message.content == want_chat
        assert engine.stats().kv_blocks_used == 0


# ---- pdserve serve ------------------------------------------------------------------------
def _pdserve(*args):
    """What the ``pdserve`` console script runs (``python -m serving.cli`` would load cli.py twice)."""
    code = "import sys; from serving.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_serve_rejects_missing_or_broken_model_dir(tmp_path):
    r = _pdserve("serve", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "tokenizer.json").write_text("{not json")
    r = _pdserve("serve", "--model", str(tmp_path))
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and "Traceback" not in r.stderr


SERVE_WITH_FAKE_ENGINE = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from fake_engine import FakeEngine
    from serving.commands import serve
    from engine.tokenizer import load_tokenizer

    class Engine(FakeEngine):
        async def shutdown(self):
            await super().shutdown()
            print("engine shut down", flush=True)

    serve._create_engine = lambda args, process: Engine(load_tokenizer(args.model), model_name=args.model_name,
                                               token_delay=0.05)
    from serving.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_lifecycle(tmp_path, model_dir, sig):
    script = tmp_path / "serve_fake.py"
    script.write_text(SERVE_WITH_FAKE_ENGINE.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--model", model_dir, "--port", "0",
                             "--served-model-name", MODEL, "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith(f"pdserve: serving {MODEL} at http://127.0.0.1:"), ready + proc.stderr.read()
        url = ready.split(" at ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 10, "stream": True}) as r:
                lines = r.iter_lines()
                next(lines)
                proc.send_signal(sig)  # graceful: the running stream still completes
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]" and len(rest) == 10
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "engine shut down" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

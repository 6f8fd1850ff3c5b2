"""The gRPC API end to end: ``serving.grpc_server`` on 127.0.0.1 (its own event loop in a
thread) over ``FakeEngine``, driven by ``serving.grpc_client`` (sync and asyncio), the
health and reflection services and raw stubs; parity with HTTP ``/v1/completions`` on
the real engine; the committed stubs against a fresh ``protoc`` run; and
``pdserve serve --grpc-port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import filecmp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import grpc
import httpx
import pytest
import uvicorn
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from engine.outputs import EngineError, EngineOverloaded
from engine.tokenizer import load_tokenizer
from fake_engine import FakeEngine, make_model_dir
from serving.grpc_client import AsyncGrpcClient, GrpcClient
from serving.grpc_server import PARAM_METADATA_KEY, SERVICE_NAME, start_grpc_server
from serving.metrics import ServingMetrics
from serving.openai_api import build_app
from serving.proto import pdserve_pb2 as pb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "fake-model"

pytestmark = pytest.mark.timeout(120)


@dataclasses.dataclass
class Served:
    target: str  # 127.0.0.1:PORT of the gRPC server
    http: str | None  # http://127.0.0.1:PORT when HTTP runs beside it
    client: Any
    metrics: ServingMetrics


@contextlib.contextmanager
def serving(client: Any, tokenizer: Any, *, http: bool = False) -> Iterator[Served]:
    """Start ``client``, the gRPC server (and, with ``http``, uvicorn) in one loop on a thread; stop them after."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-loop", daemon=True)
    thread.start()

    def run(coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    metrics = ServingMetrics(client.stats)
    sock, server, http_task = None, None, None
    try:
        run(client.start())
        grpc_server = run(start_grpc_server(client, tokenizer, metrics, "127.0.0.1", 0, health_interval=0.1))
        if http:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            server = uvicorn.Server(uvicorn.Config(build_app(client, tokenizer, metrics=metrics), log_level="warning",
                                                   lifespan="off"))

            async def serve_http() -> asyncio.Task:
                return asyncio.ensure_future(server.serve(sockets=[sock]))

            http_task = run(serve_http())
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline and not http_task.done(), "HTTP server did not start"
                time.sleep(0.01)
        http_url = f"http://127.0.0.1:{sock.getsockname()[1]}" if sock else None
        yield Served(f"127.0.0.1:{grpc_server.port}", http_url, client, metrics)
        run(grpc_server.stop(1.0))
        if http_task is not None:
            server.should_exit = True
            run(asyncio.wait_for(asyncio.shield(http_task), 30))
    finally:
        run(client.shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if sock is not None:
            sock.close()
        assert not thread.is_alive(), "the server loop did not stop"


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_model_dir(str(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def served(tok):
    with serving(FakeEngine(tok, token_delay=0.001), tok) as s:
        yield s


@pytest.fixture(scope="module")
def grpc_client(served):
    with GrpcClient(served.target, timeout=30) as c:
        yield c


# ---- generate, tokenize, models ---------------------------------------------------------
def test_generate_streams_tokens_text_logprobs_and_usage(served, grpc_client, tok):
    ids = tok.encode("Hello world")
    msgs = list(grpc_client.generate("Hello world", model=MODEL, max_tokens=5, logprobs=2, request_id="r-1"))
    want = served.client.expected_token_ids(ids, 0, 5)
    assert [t for m in msgs for t in m.token_ids] == want
    assert "".join(m.text for m in msgs) == tok.decode(want)
    assert all(m.request_id == "r-1" and m.index == 0 for m in msgs)
    assert [m.finish_reason for m in msgs] == [""] * 4 + ["length"]
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    first = msgs[0].logprobs[0]
    assert first.token_id == want[0] and first.logprob == -0.25 and len(first.top_logprobs) == 2
    assert [m.HasField("usage") for m in msgs] == [False] * 4 + [True]
    u = msgs[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 5, len(ids) + 5)
    assert 'pdserve_request_success_total{finish_reason="length",protocol="grpc"}' in \
        served.metrics.exposition().decode()


def test_generate_token_ids_n_and_stop(served, grpc_client, tok):
    prompt = tok.encode("The quick brown fox")
    msgs = list(grpc_client.generate(prompt, n=2, max_tokens=4, stop_token_ids=[], ignore_eos=True))
    for k in range(2):
        got = [t for m in msgs if m.index == k for t in m.token_ids]
        assert got == served.client.expected_token_ids(prompt, k, 4)
    assert sum(m.HasField("usage") for m in msgs) == 1 and msgs[-1].usage.completion_tokens == 8
    stop_token = served.client.expected_token_ids(prompt, 0, 3)[2]
    msgs = list(grpc_client.generate(prompt, max_tokens=10, stop_token_ids=[stop_token]))
    assert msgs[-1].finish_reason == "stop" and msgs[-1].stop_token_id == stop_token


def test_tokenize_detokenize_list_models(served, grpc_client, tok):
    assert grpc_client.tokenize("Hello world") == tok.encode("Hello world")
    assert grpc_client.tokenize("Hello world", add_special_tokens=False) == tok.encode("Hello world", False)
    ids = tok.encode("fox jumps", add_special_tokens=False)
    assert grpc_client.detokenize(ids) == "fox jumps"
    models = grpc_client.list_models()
    assert [(m.id, m.max_model_len, m.owned_by) for m in models] == [(MODEL, 512, "pdserve")]


def test_async_client(served, tok):
    async def main() -> tuple[list[pb.ModelCard], list[int], list[pb.GenerateResponse]]:
        async with AsyncGrpcClient(served.target, timeout=30) as c:
            models = await c.list_models()
            ids = await c.tokenize("Hello world")
            msgs = [m async for m in c.generate("Hello world", max_tokens=3, seed=5)]
            return models, ids, msgs

    models, ids, msgs = asyncio.run(main())
    assert models[0].id == MODEL and ids == tok.encode("Hello world")
    assert [t for m in msgs for t in m.token_ids] == served.client.expected_token_ids(ids, 0, 3)


# ---- cancellation and abort -------------------------------------------------------------
def test_cancelled_stream_aborts_request_and_frees_blocks(tok):
    engine = FakeEngine(tok, token_delay=0.05)
    with serving(engine, tok) as s, GrpcClient(s.target, timeout=30) as c:
        call = c.generate("Hello world", max_tokens=200, request_id="cancel-me")
        next(call)
        assert engine.blocks_in_use > 0
        call.cancel()
        wait_until(lambda: engine.blocks_in_use == 0 and not engine.running)
        assert "cancel-me" in engine.abort_calls


def test_abort_rpc_ends_the_stream_with_abort(tok):
    engine = FakeEngine(tok, token_delay=0.05)
    with serving(engine, tok) as s, GrpcClient(s.target, timeout=30) as c:
        call = c.generate("Hello world", max_tokens=200, request_id="job-7")
        next(call)
        assert _error(c, request_id="job-7").code() == grpc.StatusCode.ALREADY_EXISTS
        assert c.abort("job-7") is True and c.abort("unknown") is False
        rest = list(call)
        assert rest[-1].finish_reason == "abort" and rest[-1].HasField("usage")
        assert engine.blocks_in_use == 0


# ---- health and reflection --------------------------------------------------------------
def test_health_follows_the_engine(served):
    with grpc.insecure_channel(served.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        served.client.healthy = False
        try:
            r = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            served.client.healthy = True  # the watcher task notices within its 0.1 s interval
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        finally:
            served.client.healthy = True


def test_reflection_lists_the_service(served):
    with grpc.insecure_channel(served.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        service = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        assert {m.name for m in service.methods} == {"Generate", "Abort", "Tokenize", "Detokenize", "ListModels"}


# ---- errors -----------------------------------------------------------------------------
def _error(c: GrpcClient, prompt: Any = "Hello world", **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(c.generate(prompt, **kwargs))
    return info.value


@pytest.mark.parametrize("kwargs, param, words", [
    ({"temperature": -1.0}, "temperature", ["temperature", "[0, 100]"]),
    ({"n": 0}, "n", ["n:"]),
    ({"top_p": 0.0}, "top_p", ["top_p"]),
    ({"stop": ["x"] * 17}, "stop", ["stop", "16"]),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", ["min_tokens", "max_tokens"]),
    ({"logprobs": 21}, "logprobs", ["logprobs"]),
    ({"max_tokens": 600}, "max_tokens", ["512", "600"]),
])
def test_invalid_parameters(grpc_client, kwargs, param, words):
    e = _error(grpc_client, **kwargs)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in e.details() for w in words), e.details()
    assert (PARAM_METADATA_KEY, param) in tuple(e.trailing_metadata())


def test_prompt_too_long_names_both_numbers(grpc_client, tok):
    prompt = tok.encode("Hello world") * (450 // len(tok.encode("Hello world")))  # fits 512, not with 100 more
    e = _error(grpc_client, prompt, max_tokens=100)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{len(prompt)} in the prompt" in e.details() and "100 for the completion" in e.details()
    e = _error(grpc_client, prompt * 2)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "512" in e.details()


def test_bad_prompt_and_model(grpc_client):
    assert _error(grpc_client, "").code() == grpc.StatusCode.INVALID_ARGUMENT
    e = _error(grpc_client, [1, 10**6])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in e.details()
    e = _error(grpc_client, model="other-model")
    assert e.code() == grpc.StatusCode.NOT_FOUND and "other-model" in e.details()
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.tokenize("x", model="other-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.detokenize([10**6])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_engine_overloaded_and_down(served, grpc_client):
    served.client.fail_with = EngineOverloaded("queue full")
    assert _error(grpc_client).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    served.client.fail_with = EngineError("engine died")
    e = _error(grpc_client)
    assert e.code() == grpc.StatusCode.UNAVAILABLE and "engine died" in e.details()


def test_message_size_limit(grpc_client):
    e = _error(grpc_client, "x" * (5 * 1024 * 1024))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- the real engine: same tokens as HTTP ------------------------------------------------
def test_real_engine_matches_http_completions(tiny_checkpoint):
    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine

    tok = load_tokenizer(tiny_checkpoint)
    engine = AsyncEngine(EngineArgs(model=tiny_checkpoint, dtype="float32"))
    sampling = {"max_tokens": 8, "temperature": 0.9, "seed": 1234, "ignore_eos": True, "logprobs": 0}
    with serving(engine, tok, http=True) as s:
        with httpx.Client(base_url=s.http, timeout=60) as h:
            r = h.post("/v1/completions", json={"prompt": "Hello world", **sampling})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
        with GrpcClient(s.target, timeout=60) as c:
            msgs = list(c.generate("Hello world", model=engine.model_name, **sampling))
            ids = [t for m in msgs for t in m.token_ids]
            assert len(ids) == 8 and [tok.token_text(t) for t in ids] == choice["logprobs"]["tokens"]
            assert "".join(m.text for m in msgs) == choice["text"]
            grpc_logprobs = [lp.logprob for m in msgs for lp in m.logprobs]
            assert grpc_logprobs == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-5)
            call = c.generate("Hello world", max_tokens=500, ignore_eos=True)
            next(call)
            call.cancel()
            wait_until(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0, 30)


# ---- generated stubs ----------------------------------------------------------------------
def test_committed_stubs_match_a_fresh_protoc_run(tmp_path):
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{REPO}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", os.path.join(REPO, "serving", "proto", "pdserve.proto")])
    assert rc == 0
    names = ["pdserve_pb2.py", "pdserve_pb2_grpc.py", "pdserve_pb2.pyi"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "serving" / "proto", os.path.join(REPO, "serving", "proto"),
                                               names, shallow=False)
    assert (mismatch, errors) == ([], []), "regenerate the stubs (see serving/proto/pdserve.proto)"


# ---- pdserve serve --grpc-port --------------------------------------------------------------
SERVE_WITH_FAKE_ENGINE = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from fake_engine import FakeEngine
from serving.commands import serve
from engine.tokenizer import load_tokenizer

serve._create_engine = lambda args, process: FakeEngine(load_tokenizer(args.model), model_name=args.model_name)
from serving.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_command_runs_grpc_beside_http(tmp_path):
    model_dir = make_model_dir(str(tmp_path / "model"))
    script = tmp_path / "serve_fake.py"
    script.write_text(SERVE_WITH_FAKE_ENGINE.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--model", model_dir, "--port", "0",
                             "--grpc-port", "0", "--served-model-name", MODEL, "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        grpc_line, http_line = proc.stdout.readline(), proc.stdout.readline()
        assert grpc_line.startswith(f"pdserve: gRPC API ({SERVICE_NAME}) at 127.0.0.1:"), grpc_line + proc.stderr.read()
        assert http_line.startswith(f"pdserve: serving {MODEL} at http://127.0.0.1:"), http_line
        with GrpcClient(grpc_line.rsplit(" at ", 1)[1].strip(), timeout=30) as c:
            assert len([t for m in c.generate("Hi", max_tokens=3) for t in m.token_ids]) == 3
        url = http_line.split(" at ")[1].split()[0]
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert 'pdserve_generation_tokens_total{protocol="grpc"} 3.0' in metrics
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

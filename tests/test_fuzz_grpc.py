"""The gRPC API under generated requests (issue #19): every wrong type or range is
INVALID_ARGUMENT (or NOT_FOUND / RESOURCE_EXHAUSTED), never UNKNOWN or INTERNAL.

``tools/fuzz_grpc.py`` against ``serving.grpc_server`` over ``FakeEngine`` (fast) and over the
real engine on the bundled model in fp32 (32-token context, 8 running sequences so large
``n`` meets the admission limit), seeded; plus the specific cases that were UNKNOWN before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from typing import Any, Iterator

import grpc
import pytest

from engine.tokenizer import load_tokenizer
from fake_engine import FakeEngine, make_tokenizer
from serving.grpc_server import start_grpc_server
from serving.metrics import ServingMetrics
from serving.proto import pdserve_pb2 as pb

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import fuzz_grpc as fuzz  # noqa: E402  (tools/ is not a package)


@contextlib.contextmanager
def grpc_serving(client: Any, tokenizer: Any) -> Iterator[str]:
    """``client`` and a gRPC server on 127.0.0.1 in an event loop on a thread; yields HOST:PORT."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-fuzz-loop", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    try:
        run(client.start())
        server = run(start_grpc_server(client, tokenizer, ServingMetrics(client.stats), "127.0.0.1", 0))
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            run(server.stop(1.0))
    finally:
        run(client.shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server loop did not stop"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    tok = make_tokenizer(str(tmp_path_factory.mktemp("model")))
    engine = FakeEngine(tok, max_model_len=64)
    with grpc_serving(engine, tok) as target:
        yield target, engine


HELLO = pb.GenerateRequest(text="Hi", sampling_params=pb.SamplingParams(max_tokens=2))


def _generate_stub(channel: grpc.Channel) -> Any:
    return channel.unary_stream(fuzz.SERVICE + "Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)


def _generate_error(target: str, request: pb.GenerateRequest) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as e:
        list(_generate_stub(channel)(request, timeout=30))
    return e.value


def _raw(target: str, method: str, data: bytes, streaming: bool) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        make = channel.unary_stream if streaming else channel.unary_unary
        stub = make(fuzz.SERVICE + method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            list(stub(data, timeout=30)) if streaming else stub(data, timeout=30)
    return e.value


@pytest.mark.parametrize("method,data,streaming", [
    ("Tokenize", b"\x12\x02\xff\xfe", False),  # text = bad UTF-8
    ("Tokenize", b"\x12\x05ab", False),  # truncated
    ("Generate", b"\x1a\x02\xff\xfe", True),  # text = bad UTF-8
    ("Detokenize", b"\x0a\x09\xc3", False),  # model: length past the end
])
def test_undecodable_messages_are_invalid_argument(fake, method, data, streaming):
    error = _raw(fake[0], method, data, streaming)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "does not parse" in error.details()


@pytest.mark.parametrize("request_id", ["a#1", "x" * 129, "with space", "é"])
def test_request_ids_outside_the_charset_are_invalid(fake, request_id):
    error = _generate_error(fake[0], pb.GenerateRequest(text="Hi", request_id=request_id,
                                                        sampling_params=pb.SamplingParams(max_tokens=2)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["pdserve-param"] == "request_id"


def test_a_handler_bug_is_internal_without_details(fake):
    target, engine = fake
    engine.fail_with = RuntimeError("secret detail")
    error = _generate_error(target, HELLO)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal server error: RuntimeError"
    with grpc.insecure_channel(target) as channel:  # and it still serves
        assert list(_generate_stub(channel)(HELLO, timeout=30))[-1].finish_reason == "length"


def test_overload_is_resource_exhausted_with_retry_after(fake):
    from engine.outputs import EngineOverloaded

    target, engine = fake
    engine.fail_with = EngineOverloaded("queue full")
    error = _generate_error(target, HELLO)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata())["retry-after"] == "1"


def test_fuzz_fake_engine(fake):
    report = fuzz.run(fake[0], "fake-model", examples=150, seed=19)
    print("gRPC fuzz, FakeEngine:", report.summary())
    assert report.calls >= 4 * 150 * 0.9
    assert report.codes["OK"] > 0 and report.codes["INVALID_ARGUMENT"] > 0
    assert not report.failures, "\n".join(report.failures)


def test_fuzz_real_engine():
    from engine.args import EngineArgs
    from engine.async_engine import AsyncEngine

    args = EngineArgs(dtype="float32", max_model_len=32, max_num_seqs=8, kv_cache_memory_gb=0.25)
    engine = AsyncEngine(args)
    with grpc_serving(engine, load_tokenizer(args.model)) as target:
        report = fuzz.run(target, engine.model_name, examples=60, seed=19)
        assert engine.stats().kv_blocks_used == 0
    print("gRPC fuzz, bundled model:", report.summary())
    assert report.codes["OK"] > 0 and report.codes["INVALID_ARGUMENT"] > 0
    assert not report.failures, "\n".join(report.failures)

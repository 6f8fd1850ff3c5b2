"""``pdserve bench`` against real uvicorn servers on 127.0.0.1: timings checked against a
fake engine with known delays, the JSON and PNG of a sweep, ``--compare`` ratios, and
failures (a closed port, 5xx/4xx, malformed or broken streams, a hung request) counted
by kind without a crash.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fake_engine import FakeEngine, make_model_dir, running_server, serve_asgi
from engine.tokenizer import load_tokenizer
from serving.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_model_dir(str(tmp_path_factory.mktemp("model"))))


class PrefillDelayEngine(FakeEngine):
    """``FakeEngine`` that waits ``first_delay`` more before its first token (a slow prefill)."""

    def __init__(self, tokenizer, *, first_delay: float, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.first_delay = first_delay

    async def generate(self, request):
        await asyncio.sleep(self.first_delay)
        async for out in super().generate(request):
            yield out


class RecordingEngine(FakeEngine):
    """``FakeEngine`` that keeps every prompt it is sent, in arrival order."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.prompts: list[tuple[int, ...]] = []

    async def generate(self, request):
        self.prompts.append(tuple(request.prompt_token_ids))
        async for out in super().generate(request):
            yield out


def bench(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--no-progress", "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def test_measures_known_delays(tok, tmp_path, capsys):
    # first token after first_delay + token_delay, then one token (one SSE chunk) per token_delay
    engine = PrefillDelayEngine(tok, first_delay=0.08, token_delay=0.02)
    with running_server(engine, tok) as srv:
        rc, doc = bench(tmp_path, "--base-url", srv.v1, "--input-len", "8", "--output-len", "10",
                        "--num-prompts", "6", "--concurrency", "2")
    assert rc == 0
    [run] = doc["runs"]
    s = run["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"], s["total_input_tokens"]) == (6, 0, 60, 48)
    assert all(r["output_tokens"] == 10 and r["output_tokens_from"] == "usage" and len(r["itl_s"]) == 9
               for r in run["requests"])
    # the delays are floors; a shared machine only adds to them, now and then a lot, so the upper
    # bounds hold for the median of the 6 requests (one stalled request cannot move it)
    for name, low, high in (("ttft_ms", 100, 160), ("tpot_ms", 20, 28), ("itl_ms", 20, 28)):
        assert low <= s[name]["mean"] and low <= s[name]["p50"] <= high, (name, s[name])
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    e2e = s["e2el_ms"]["mean"]
    assert e2e == pytest.approx(s["ttft_ms"]["mean"] + 9 * s["tpot_ms"]["mean"], rel=1e-6)
    out = capsys.readouterr().out
    assert "A C=2" in out and "TTFT p99 (ms)" in out and "output tok/s" in out


def test_sweep_writes_records_and_png(tok, tmp_path):
    png = tmp_path / "bench.png"
    with running_server(FakeEngine(tok, token_delay=0.002), tok) as srv:
        rc, doc = bench(tmp_path, "--base-url", srv.url, "--dataset", "shared-prefix", "--input-len", "12",
                        "--output-len", "5", "--num-prompts", "4", "--concurrency", "1,3", "--plot", str(png))
    assert rc == 0
    assert [(r["endpoint"], r["concurrency"]) for r in doc["runs"]] == [("A", 1), ("A", 3)]
    assert doc["config"]["levels"] == [1, 3] and doc["config"]["prefix_len"] == 6
    for run in doc["runs"]:
        assert [r["index"] for r in run["requests"]] == [0, 1, 2, 3]
        assert all(r["ok"] and r["prompt_tokens"] == 12 and r["output_tokens"] == 5 for r in run["requests"])
        assert all(r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["e2e_s"] > r["ttft_s"] for r in run["requests"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_each_level_sends_its_own_prompts_the_same_to_every_endpoint(tok, tmp_path):
    """A server with prefix caching must not find a level's prompts cached by an earlier level or the warm-up,
    and ``--compare`` must send the endpoints of one level the same prompts."""
    a, b = RecordingEngine(tok, token_delay=0.001), RecordingEngine(tok, token_delay=0.001)
    with running_server(a, tok) as sa, running_server(b, tok) as sb:
        rc, _ = bench(tmp_path, "--base-url", sa.url, "--compare", sb.url, "--input-len", "8", "--output-len", "2",
                      "--num-prompts", "3", "--concurrency", "1,3")
    assert rc == 0
    assert len(a.prompts) == len(b.prompts) == 7  # the warm-up, then 3 per level
    warm, first, second = a.prompts[0], set(a.prompts[1:4]), set(a.prompts[4:])
    assert len(first) == len(second) == 3 and first.isdisjoint(second) and warm not in first | second
    assert b.prompts[0] == warm and set(b.prompts[1:4]) == first and set(b.prompts[4:]) == second


def test_chat_endpoint_with_jsonl_dataset(tok, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hello world", "max_tokens": 3}\n\n{"prompt": "The quick brown fox"}\n')
    with running_server(FakeEngine(tok, token_delay=0.001), tok) as srv:
        rc, doc = bench(tmp_path, "--base-url", srv.url, "--endpoint", "chat", "--dataset", str(data),
                        "--output-len", "4", "--num-prompts", "3", "--model", "fake-model")
    assert rc == 0
    [run] = doc["runs"]
    assert run["concurrency"] == 3 and [r["output_tokens"] for r in run["requests"]] == [3, 4, 3]


def test_bad_dataset_is_a_cli_error(tmp_path, capsys):
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read dataset" in capsys.readouterr().err
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--seed", "-1"]) == 2
    assert "--seed must be at least 0" in capsys.readouterr().err


def test_unreachable_endpoint_counts_connection_errors():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                        "--num-prompts", "3", "--timeout", "5", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr + p.stdout
    assert "3 of 3 requests failed: connection_error 3" in p.stderr
    assert "errors: connection_error" in p.stdout


# ---- a misbehaving server ------------------------------------------------------------------
def chaos_app():
    """Request k of /v1/completions: k % 6 == 0 streams properly, then 500, 429, a malformed
    ``data:`` line, a stream without ``[DONE]``, a connection dropped mid-body."""
    counter = iter(range(1_000_000))

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/v1/models":
            return await _send(send, 200, b'{"object": "list", "data": [{"id": "chaos"}]}', "application/json")
        while (await receive()).get("more_body"):
            pass
        kind = next(counter) % 6
        if kind in (1, 2):
            return await _send(send, 500 if kind == 1 else 429, b'{"error": {"message": "no"}}', "application/json")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        chunk = b'data: {"choices": [{"index": 0, "text": "hi"}]}\n\n'
        if kind == 0:
            body = chunk * 3 + b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}\n\n'
            return await send({"type": "http.response.body", "body": body + b"data: [DONE]\n\n"})
        if kind == 3:
            return await send({"type": "http.response.body", "body": chunk + b"data: {not json\n\n"})
        if kind == 4:
            return await send({"type": "http.response.body", "body": chunk})
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if kind == 5:
            raise RuntimeError("the server dies mid-stream")

    return app


async def _send(send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]})
    await send({"type": "http.response.body", "body": body})


def test_server_failures_are_counted_by_kind(tmp_path, capsys):
    with serve_asgi(chaos_app(), log_level="critical") as url:  # its broken streams are on purpose
        rc, doc = bench(tmp_path, "--base-url", url, "--num-prompts", "12", "--concurrency", "1", "--warmup", "0",
                        "--output-len", "3", "--timeout", "2")
    assert rc == 1
    s = doc["runs"][0]["summary"]
    assert doc["runs"][0]["model"] == "chaos"
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 10, 6)
    assert s["errors"] == {"http_429": 2, "http_500": 2, "incomplete_stream": 2, "malformed_sse": 2,
                           "stream_broken": 2}
    err = capsys.readouterr().err
    assert "10 of 12 requests failed" in err and "Traceback" not in err


def test_hung_request_times_out(tmp_path):
    async def hang(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'data: {"choices": [{"text": "x"}]}\n\n',
                        "more_body": True})
            await asyncio.sleep(30)

    with serve_asgi(hang, log_level="critical") as url:
        t0 = time.monotonic()
        rc, doc = bench(tmp_path, "--base-url", url, "--num-prompts", "2", "--warmup", "0", "--timeout", "0.5",
                        "--model", "m")
        elapsed = time.monotonic() - t0
    assert rc == 1 and elapsed < 5
    assert doc["runs"][0]["summary"]["errors"] == {"timeout": 2}


def test_compare_alternates_and_prints_ratios(tok, tmp_path, capsys):
    with running_server(FakeEngine(tok, token_delay=0.01), tok) as fast, \
            running_server(FakeEngine(tok, token_delay=0.03), tok) as slow:
        rc, doc = bench(tmp_path, "--base-url", fast.url, "--compare", slow.url, "--input-len", "8",
                        "--output-len", "8", "--num-prompts", "4", "--concurrency", "1,2")
    assert rc == 0
    assert [(r["endpoint"], r["concurrency"]) for r in doc["runs"]] == [("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    b_rows = [r for r in doc["ratios"] if r["endpoint"] == "B"]
    assert [r["concurrency"] for r in b_rows] == [1, 2]
    for row in b_rows:
        # The ratios are the B run's figures over the A run's at the same level ...
        a_run, b_run = ({r["endpoint"]: r for r in doc["runs"] if r["concurrency"] == row["concurrency"]}[e]["summary"]
                        for e in "AB")
        assert row["output_throughput"] == pytest.approx(b_run["output_throughput"] / a_run["output_throughput"])
        assert row["tpot_mean"] == pytest.approx(b_run["tpot_ms"]["mean"] / a_run["tpot_ms"]["mean"])
        # ... and B, which sleeps 30 ms a token against A's 10, is the slower one. (Not a bound on the ratio
        # itself: on a loaded machine streamed chunks can arrive in bursts and move it either way.)
        assert row["output_throughput"] < 1 < row["tpot_mean"], row
    out = capsys.readouterr().out
    assert "relative to A" in out and "C=2 B: output tok/s x0." in out


def _run_tool(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_offline_bench_runs_and_profiles_on_a_tiny_setting(tiny_checkpoint):
    out = _run_tool("tools/bench_offline.py", "--model", tiny_checkpoint, "--skip-transformers", "--num-prompts", "2",
                    "--input-len", "8", "--output-len", "4", "--split-batch", "2", "--split-steps", "3",
                    "--profile", "5", "--ab-bf16-dot")
    assert "output tok/s" in out and "Self CPU time total" in out
    assert "decode step at batch 2:" in out
    assert ("AVX512-BF16 products on / off" in out) == _has_bf16_dot()
    assert ("AVX512-BF16 products: not on this CPU" in out) != _has_bf16_dot()


def _has_bf16_dot() -> bool:
    """Whether this machine runs the CPU kernel's AVX512-BF16 products (the tool's comparison needs them)."""
    from engine.kernels import cpu_gemm

    return cpu_gemm.load() is not None and cpu_gemm.bf16_dot()


def test_spec_bench_runs_on_a_tiny_setting():
    out = _run_tool("tools/bench_spec.py", "--batches", "2", "--k", "1", "--output-len", "6", "--repeats", "1",
                    "--prompt-len", "16", "--sets", "2")
    assert "batch 2 (2 sets of 2 prompts): without MTP" in out and "greedy sequences identical 4/4" in out

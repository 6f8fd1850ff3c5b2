"""``/metrics``: values move as expected after a known workload, engine stats are read at
scrape time, and the exposition passes ``promtool check metrics``.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import FakeEngine, make_tokenizer, running_server
from serving.metrics import ServingMetrics

PROMTOOL_HELP = ("promtool is not on PATH; install it with `apt-get update && apt-get install -y prometheus` "
                 "(Debian/Ubuntu package `prometheus` ships /usr/bin/promtool)")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("model")))


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from ``GET /metrics``."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_known_workload_moves_the_metrics(tok):
    engine = FakeEngine(tok, token_delay=0.001)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        before = scrape(c)
        assert value(before, "pdserve_prompt_tokens_total", protocol="http") == 0
        prompts = ["Hello world", "The quick brown fox", "Serving"]
        for p in prompts:
            assert c.post("/v1/completions", json={"prompt": p, "max_tokens": 5}).status_code == 200
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            assert r.read().endswith(b"data: [DONE]\n\n")
        c.post("/v1/completions", json={"prompt": "x", "n": 0})  # rejected: must not count
        prompt_tokens = sum(len(tok.encode(p)) for p in prompts) + len(
            tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False))
        after = scrape(c)
        h = {"protocol": "http"}
        assert value(after, "pdserve_prompt_tokens_total", **h) == prompt_tokens
        assert value(after, "pdserve_generation_tokens_total", **h) == 3 * 5 + 2 * 4
        assert value(after, "pdserve_request_success_total", finish_reason="length", **h) == 5
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     "request_prompt_tokens", "request_generation_tokens"):
            assert value(after, f"pdserve_{name}_count", **h) == 4, name
        assert value(after, "pdserve_request_generation_tokens_sum", **h) == 23
        assert value(after, "pdserve_request_prompt_tokens_sum", **h) == prompt_tokens
        # each engine request has (generated steps - 1) gaps between outputs: 3 * 4 + 3
        assert value(after, "pdserve_inter_token_latency_seconds_count", **h) == 15
        assert value(after, "pdserve_num_requests_running") == 0 and value(after, "pdserve_kv_cache_usage_perc") == 0


def test_engine_stats_are_read_at_scrape_time(tok):
    engine = FakeEngine(tok, token_delay=0.05, block_size=4, num_blocks=1000)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        long_prompt = "Prefill and decode run on different machines in a disaggregated deployment."
        n_prompt = len(tok.encode(long_prompt))
        for _ in range(2):
            c.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
        engine.num_preemptions = 3
        s = scrape(c)
        assert value(s, "pdserve_num_preemptions_total") == 3
        assert value(s, "pdserve_prefix_cache_queries_total") == 2 * n_prompt
        assert value(s, "pdserve_prefix_cache_hits_total") == (n_prompt // 4) * 4
        with c.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 40, "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)
            during = scrape(c)
            assert value(during, "pdserve_num_requests_running") == 1
            assert value(during, "pdserve_kv_cache_usage_perc") == engine.blocks_in_use / 1000 > 0
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        after = scrape(c)
        assert value(after, "pdserve_num_requests_running") == 0
        assert value(after, "pdserve_request_success_total", finish_reason="abort", protocol="http") == 1


def test_registries_are_per_app(tok):
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_first_token("http", 0.5)
    assert b"pdserve_time_to_first_token_seconds_count" not in b.exposition()
    assert b'pdserve_time_to_first_token_seconds_count{protocol="http"} 1.0' in a.exposition()


def test_promtool_check_metrics(tok):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(PROMTOOL_HELP)
    engine = FakeEngine(tok)
    with running_server(engine, tok) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "n": 2})
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        text = c.get("/metrics").text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

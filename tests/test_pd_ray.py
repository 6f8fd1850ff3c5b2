"""End to end through Ray: PD router + 2 prefill + 2 decode workers on the tiny checkpoint.

Loopback only: see ``tests/netns.py``. Everything the module starts (Ray, actors, the
router) is stopped at its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from netns import ROOT, free_port, in_netns, ray_pools, rerun_in_private_netns
from pd_helpers import held, make_reference, metric, openai_client, stream_text, wait, worker_loads



def test_suite_in_private_network_namespace():
    rerun_in_private_netns(__file__, timeout_s=420)


# ---- the suite (inside the namespace) ---------------------------------------------------
PROMPTS = ["The quick brown fox", "Prefill and decode run on", "Hello world! How are", "DeepSeek uses multi-head"]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    engine = {"dtype": "float32", "num_kv_blocks": 128, "block_size": 16, "max_num_seqs": 16}
    # the prefill pool streams the rows layer by layer, chunk by chunk (test_pdserve_up_status_down: whole)
    prefill_engine = {"kv_transfer": "layerwise", "max_num_batched_tokens": 32}
    with ray_pools({"model": tiny_checkpoint, "engine": engine,
                    "pools": {"prefill": {"instances": 2, "max_restarts": 2, "engine": prefill_engine},
                              "decode": {"instances": 2, "max_restarts": 2,
                                         "engine": {"num_kv_blocks": 512}}}}) as pools:  # the soak's prompts fit
        yield pools


@pytest.fixture(scope="module")
def router(cluster, tiny_checkpoint):
    from engine.tokenizer import load_tokenizer
    from router.app import build_router_app
    from router.pd_flow import PDClient, RouterConfig
    from fake_engine import serve_asgi

    client = PDClient(cluster["prefill"].names, cluster["decode"].names,
                      RouterConfig(health_interval_s=1.0, health_timeout_s=2.0, poll_wait_s=0.2, stall_timeout_s=5.0))
    app = build_router_app(client, load_tokenizer(tiny_checkpoint))
    with serve_asgi(app, client) as url:
        yield url, client


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return make_reference(tiny_checkpoint)


WORKERS = ["prefill-0", "prefill-1", "decode-0", "decode-1"]


def _idle():
    return not held(WORKERS)


@in_netns
def test_pdserve_up_status_down(tiny_checkpoint, tmp_path):
    """The CLI end to end (runs first, before this module starts its own Ray)."""
    port, grpc_port = free_port(), free_port()
    config = tmp_path / "pools.yaml"
    config.write_text(f"model: {tiny_checkpoint}\nengine: {{dtype: float32, num_kv_blocks: 64, block_size: 16}}\n"
                      f"ray: {{num_cpus: 2, object_store_memory_mb: 100}}\n"
                      f"router: {{host: 127.0.0.1, port: {port}, grpc_port: {grpc_port}}}\n"
                      "pools:\n  prefill: {instances: 1}\n  decode: {instances: 1}\n")
    env = {**os.environ, "PDSERVE_STATE_DIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    cli = [sys.executable, "-m", "serving.cli"]
    up = subprocess.Popen([*cli, "up", "--config", str(config), "--log-level", "warning"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "pdserve: router at" in line:
                break
        assert "pdserve: router at" in "".join(lines), "".join(lines)
        status = subprocess.run([*cli, "status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "prefill-0    up" in status.stdout and "decode-0     up" in status.stdout
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # the router serves the dev server's gRPC API too: the same greedy text
        from serving.grpc_client import GrpcClient

        with GrpcClient(f"127.0.0.1:{grpc_port}", timeout=60) as g:
            msgs = list(g.generate("hello", max_tokens=4, temperature=0))
        assert "".join(m.text for m in msgs) == r.json()["choices"][0]["text"] and msgs[-1].finish_reason
        down = subprocess.run([*cli, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        assert not (tmp_path / "up.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@in_netns
def test_loopback_only_sockets(cluster):
    out = subprocess.run(["ss", "-tnH"], capture_output=True, text=True).stdout
    peers = [line.split()[3] for line in out.splitlines() if line.strip()]
    assert all("127.0.0.1" in p or p.startswith("[::1]") for p in peers), peers


@in_netns
def test_greedy_identical_to_dev_server_streaming_and_not(router, reference):
    url, client = router
    oai = openai_client(url)
    want = reference(PROMPTS, 24)
    got = [oai.completions.create(model=client.model_name, prompt=p, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
    assert got == want
    assert [stream_text(oai, client.model_name, p, 24) for p in PROMPTS] == want
    # n > 1 fans out at the router: greedy completions are all the same text
    many = oai.completions.create(model=client.model_name, prompt=PROMPTS[0], max_tokens=24, temperature=0, n=2,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1] and all(c.text == want[0] for c in many.choices)
    # a repeated prompt is served from the prefill worker's prefix cache (prefix affinity sends it back
    # there), and the router reports it as OpenAI does
    long = "The prefix cache keeps whole blocks of this prompt. " * 6
    first, again = (oai.completions.create(model=client.model_name, prompt=long, max_tokens=4, temperature=0)
                    for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 16 <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    # structured output across the hand-off: the decode worker rebuilds the grammar from the request and
    # replays the prefill's first token, so every answer still matches the schema / the choices
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    chat = oai.chat.completions.create(
        model=client.model_name, messages=[{"role": "user", "content": "Give n and ok."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    obj = json.loads(chat.choices[0].message.content)
    assert set(obj) == {"n", "ok"} and isinstance(obj["n"], int) and isinstance(obj["ok"], bool)
    picked = oai.completions.create(model=client.model_name, prompt=PROMPTS[2], max_tokens=8, temperature=0.8, n=2,
                                    seed=3, extra_body={"guided_choice": ["prefill", "decode", "router"]})
    assert all(c.text in ("prefill", "decode", "router") for c in picked.choices)
    # max_tokens 1: the prefill worker's first token ends the request, no decode
    one = oai.completions.create(model=client.model_name, prompt=PROMPTS[1], max_tokens=1, temperature=0)
    assert want[1].startswith(one.choices[0].text)
    # the engine's own validation (token ids beyond the vocabulary) comes back through Ray as a 400
    bad = httpx.post(url + "/v1/completions", json={"model": client.model_name, "prompt": [1, 10**6], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
    assert metric(url, "pdserve_router_kv_transfer_bytes_total") > 0
    assert metric(url, 'pdserve_router_stage_seconds_count{stage="handoff"}') >= 8
    assert metric(url, 'pdserve_router_healthy_workers{pool="decode"}') == 2
    wait(_idle, what="both sides idle")


@in_netns
def test_concurrent_streams_share_one_poll_per_decode_worker(router, reference):
    """8 streams at once over 2 decode workers: the router's polls list several sequences each (one call
    per worker per step, ``router.decode_feed``), not one call per sequence; every text is the greedy one."""
    import concurrent.futures

    url, client = router
    oai = openai_client(url)
    prompts = [f"{p} number {i}" for i in range(2) for p in PROMPTS]
    want = reference(prompts, 48)
    before = worker_loads(["decode-0", "decode-1"])
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: stream_text(oai, client.model_name, p, 48), prompts))
    assert got == want
    after = worker_loads(["decode-0", "decode-1"])
    polls = sum(after[n].polls - before[n].polls for n in after)
    listed = sum(after[n].polled_sequences - before[n].polled_sequences for n in after)
    print(f"\n[polls] {polls} calls listed {listed} sequences ({listed / polls:.2f} per call) for 8 x 48 tokens")
    assert listed / polls >= 2.0  # 4 sequences per worker; a call per sequence would be exactly 1


@in_netns
def test_client_disconnect_frees_blocks_on_both_sides(router):
    url, client = router
    body = {"model": client.model_name, "prompt": PROMPTS[2] * 4, "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    wait(_idle, what="blocks freed on both sides after the disconnect")
    assert metric(url, 'pdserve_router_requests_total{outcome="aborted"}') >= 1


@in_netns
def test_short_soak_through_the_router(router, tmp_path, capsys):
    """tools/soak.py against the PD router (issue #19 item 3, the CI-sized run): mixed streaming requests
    with n = 2, stop strings and cancellations, then a burst past the router's admission limit (set to 24
    sequences here; the decode workers would admit 64): 0 lost, 0 errors, blocks back to 0, 429 with
    Retry-After for the excess and a bounded TTFT for the admitted."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import soak

    url, client = router
    limit, client.admission.limit = client.admission.limit, 24
    out = tmp_path / "report.json"
    try:
        code = soak.main(["--base-url", url, "--requests", "120", "--concurrency", "6", "--warmup", "12",
                          "--max-tokens", "4:16", "--burst", "48", "--burst-ttft-factor", "3", "--timeout", "120",
                          "--json", str(out)])
    finally:
        client.admission.limit = limit
    printed = capsys.readouterr().out
    print(printed)
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"] and all(report["criteria"].values()), printed
    assert report["burst"]["status_429"] > 0 and report["burst"]["admitted"] + report["burst"]["status_429"] == 48
    wait(_idle, what="both sides idle")


@in_netns
def test_decode_killed_mid_stream_resumes(router, reference):
    import concurrent.futures

    import ray

    url, client = router
    oai = openai_client(url)
    prompts = [p + " again" for p in PROMPTS]
    seeded = {"temperature": 0.9, "top_k": 20, "seed": 1234}  # sampled, seeded: must not change on a resume
    want = reference(prompts, 300) + reference(prompts[:2], 300, **seeded)
    jobs = [(p, {}) for p in prompts] + [(p, seeded) for p in prompts[:2]]
    started = [0] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        def on_chunk(k):
            def mark(_):
                started[k] = 1
            return mark

        futures = [pool.submit(stream_text, oai, client.model_name, p, 300, on_chunk(k), **sampling)
                   for k, (p, sampling) in enumerate(jobs)]
        wait(lambda: all(started), what="every stream started")
        ray.kill(ray.get_actor("decode-0", namespace="pdserve"), no_restart=False)
        got = [f.result(timeout=120) for f in futures]
    assert got == want
    assert metric(url, 'pdserve_router_retries_total{cause="decode_lost"}') >= 1
    wait(lambda: all(w.healthy for w in client.workers["decode"]), timeout=60, what="decode-0 back in rotation")
    wait(_idle, what="both sides idle")


@in_netns
def test_prefill_killed_request_retried_then_worker_back(cluster, router, reference):
    import ray

    url, client = router
    oai = openai_client(url)
    ray.kill(ray.get_actor("prefill-0", namespace="pdserve"), no_restart=True)
    before = metric(url, 'pdserve_router_retries_total{cause="prefill_lost"}')
    prompt = "A prompt nobody sent before"
    assert oai.completions.create(model=client.model_name, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text == reference([prompt], 16)[0]
    wait(lambda: not client.workers["prefill"][0].healthy, what="prefill-0 out of rotation")
    # the router either sent it to the dead worker and retried, or its health probe got there first
    assert (metric(url, 'pdserve_router_retries_total{cause="prefill_lost"}') >= before + 1
            or "prefill_lost" not in (client.workers["prefill"][0].last_error or "prefill_lost"))
    cluster["prefill"].start_instance(0)
    wait(lambda: client.workers["prefill"][0].healthy, what="prefill-0 back")
    hits_before = worker_loads(["prefill-0"])["prefill-0"].prefix_cache_queries
    for p in ["x " * 5 + str(i) for i in range(3)]:  # least queued + name order: traffic reaches prefill-0 again
        oai.completions.create(model=client.model_name, prompt=p, max_tokens=4, temperature=0)
    assert worker_loads(["prefill-0"])["prefill-0"].prefix_cache_queries > hits_before


@in_netns
def test_all_workers_down_503_router_alive_then_back(cluster, router, reference):
    import ray

    url, client = router
    for name in cluster["decode"].names:
        ray.kill(ray.get_actor(name, namespace="pdserve"), no_restart=True)
    wait(lambda: not any(w.healthy for w in client.workers["decode"]), what="decode pool out of rotation")
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": client.model_name, "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 503 and time.monotonic() - t0 < 2.0, r.text
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert httpx.get(url + "/health").status_code == 503
    assert httpx.get(url + "/v1/models").status_code == 200  # the router itself is alive
    assert metric(url, 'pdserve_router_failures_total{cause="no_decode_worker"}') >= 1
    cluster["decode"].start_instance(1)
    wait(lambda: httpx.get(url + "/health").status_code == 200, timeout=60, what="router healthy again")
    oai = openai_client(url)
    assert oai.completions.create(model=client.model_name, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text == reference(PROMPTS[:1], 24)[0]

"""Faults at every stage of the PD lifecycle (issue #19, item 2), through Ray on the tiny checkpoint.

One prefill worker (layer-wise hand-off, small chunks, so a prompt streams out in many pieces)
and two decode workers, ``lease_s`` ``LEASE_S``. Each test injects one fault and checks that
every stream still gets the one-process greedy text (or, when the client left, nothing is
waited for), and that afterwards every worker's KV blocks, reservations, running sequences,
queued prompt tokens and outbox bytes are back to 0 within 2 s (their ``load()`` reports). Each
prints its time to recovery. Faults are Ray kills, a router process killed with SIGKILL,
client sockets closed, and the workers' own ``set_faults`` (``FaultInjection``: a ``pull_kv``
that holds back a sequence's rows).

Loopback only: see ``tests/netns.py``.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import pytest

from netns import in_netns, ray_pools, rerun_in_private_netns
from pd_helpers import (held, make_reference, metric, openai_client, router_url, spawn_router, stream_text, wait,
                        worker_loads)

LEASE_S = 3.0
PREFILL, DECODE = ["prefill-0"], ["decode-0", "decode-1"]
WORKERS = PREFILL + DECODE
ROUTER = {"health_interval_s": 0.5, "health_timeout_s": 2.0, "poll_wait_s": 0.2, "stall_timeout_s": 5.0,
          "prefill_timeout_s": 60.0, "transfer_timeout_s": 2.0}
# each test's prompts start with a word of their own, so no prefix cache shortens another test's prefills
LONG = "Disaggregated serving moves the latent rows of every layer from one worker to another. " * 4


def test_suite_in_private_network_namespace():
    rerun_in_private_netns(__file__, timeout_s=420)


# ---- the suite (inside the namespace) ---------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    engine = {"dtype": "float32", "num_kv_blocks": 128, "block_size": 16, "max_num_seqs": 16}
    with ray_pools({"model": tiny_checkpoint, "engine": engine, "router": ROUTER,
                    "pools": {"prefill": {"instances": 1, "max_restarts": 4, "lease_s": LEASE_S,
                                          "engine": {"kv_transfer": "layerwise", "max_num_batched_tokens": 32}},
                              "decode": {"instances": 2, "max_restarts": 4, "lease_s": LEASE_S}}}) as pools:
        yield pools


@pytest.fixture(scope="module")
def router(cluster, tiny_checkpoint):
    from engine.tokenizer import load_tokenizer
    from fake_engine import serve_asgi
    from router.app import build_router_app
    from router.pd_flow import PDClient, RouterConfig

    client = PDClient(PREFILL, DECODE, RouterConfig(**ROUTER))
    with serve_asgi(build_router_app(client, load_tokenizer(tiny_checkpoint)), client) as url:
        yield url, client


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return make_reference(tiny_checkpoint)


def _actor(name):
    import ray

    return ray.get_actor(name, namespace="pdserve")


def _set_faults(name, **fields):
    import ray

    from deploy.contract import FaultInjection

    ray.get(_actor(name).set_faults.remote(FaultInjection(**fields)), timeout=10)


def _prefill_load():
    return worker_loads(PREFILL)["prefill-0"]


def _recovered(what, t_fault, within_s=2.0):
    """Every worker back to 0 within ``within_s`` from now; prints the time to recovery from ``t_fault``."""
    last = {}

    def idle():
        nonlocal last
        last = held(WORKERS)
        return not last

    try:
        wait(idle, timeout=within_s, what="idle", every=0.05)
    except AssertionError:
        raise AssertionError(f"{what}: still held {within_s:g} s later: {last}") from None
    print(f"\n[recovery] {what}: {time.monotonic() - t_fault:.2f} s to recover, 0 blocks left")


def _streams(url, client, prompts, max_tokens, started=None):
    """The prompts streamed concurrently; (pool, futures). ``started[k]`` is set at stream k's first chunk."""
    oai = openai_client(url)
    pool = concurrent.futures.ThreadPoolExecutor(len(prompts))

    def on_chunk(k):
        def mark(_):
            if started is not None:
                started[k] = 1
        return mark

    return pool, [pool.submit(stream_text, oai, client.model_name, p, max_tokens, on_chunk(k))
                  for k, p in enumerate(prompts)]


def _raw_request(url, model, prompt, max_tokens) -> socket.socket:
    """A streaming completion sent over a bare socket (closing it is the client going away at any moment,
    even before the response headers)."""
    import json

    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


# ---- (e) the client goes away, in each state ----------------------------------------------
@in_netns
def test_client_gone_while_queued_or_prefilling(router):
    url, client = router
    socks = [_raw_request(url, client.model_name, f"queued {i} {LONG * 2}", 64) for i in range(4)]
    # the first prompts compute while the others wait on the prefill worker
    wait(lambda: _prefill_load().queued_prompt_tokens > 0, what="the prompts on the prefill worker", every=0.02)
    t0 = time.monotonic()
    for s in socks:
        s.close()
    _recovered("client gone while queued/prefilling", t0)


@in_netns
def test_client_gone_during_kv_transfer(router):
    url, client = router
    _set_faults("prefill-0", pull_stall_s=8.0, pull_stall_cursor=0, pull_stall_sequences=2)
    try:
        socks = [_raw_request(url, client.model_name, f"transfer {i} {LONG}", 64) for i in range(2)]
        # prefill done, its rows held back in the outbox; the decode side waits with its reservation
        wait(lambda: (lambda p: p.queued_prompt_tokens == 0 and p.outbox_bytes > 0)(_prefill_load()),
             what="rows waiting in the outbox", every=0.02)
        loads = worker_loads(DECODE)
        assert sum(d.kv_blocks_used for d in loads.values()) > 0  # the reservations' blocks
        t0 = time.monotonic()
        for s in socks:
            s.close()
        _recovered("client gone during the KV transfer", t0)
    finally:
        _set_faults("prefill-0")


@in_netns
def test_client_gone_while_decoding(router):
    url, client = router
    body = {"model": client.model_name, "prompt": "decoding " + LONG, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
        t0 = time.monotonic()
    _recovered("client gone while decoding", t0)


@in_netns
def test_abort_while_decoding_ends_the_stream_not_the_worker(cluster, tiny_checkpoint):
    """``PDClient.abort`` (what gRPC ``Abort`` calls) mid-stream: the stream ends without an error, the decode
    worker stays in rotation and nothing is resumed (the worker's KeyError for the aborted sequence is the
    abort, not a lost worker); n=2 ends both sequences."""
    import asyncio

    from engine.outputs import GenerateRequest
    from engine.sampling_params import SamplingParams
    from router.pd_flow import PDClient, RouterConfig

    async def main():
        client = PDClient(PREFILL, DECODE, RouterConfig(**ROUTER))
        await client.start()
        try:
            for n in (1, 2):
                rid = f"abort-me-{n}"
                req = GenerateRequest(rid, list(range(3, 40)),
                                      SamplingParams(max_tokens=400, ignore_eos=True, temperature=0, n=n))
                tokens = 0
                stream = client.generate(req)
                async for out in stream:
                    tokens += sum(len(c.token_ids) for c in out.outputs)
                    if tokens >= 8 * n:
                        t0 = time.monotonic()
                        await client.abort(rid)
                assert 8 * n <= tokens < 400 * n and time.monotonic() - t0 < 5.0
                assert all(w.healthy for w in client.registry.all()), [w.last_error for w in client.registry.all()]
            assert not any(s.value for s in client.metrics.retries.collect()[0].samples)  # no resume, no retry
        finally:
            await client.shutdown()

    asyncio.run(main())
    _recovered("aborted while decoding", time.monotonic())


# ---- the KV hand-off fails ---------------------------------------------------------------------
@in_netns
def test_kv_transfer_timeout_retried(router, reference):
    url, client = router
    prompts = [f"timeout {i} {LONG}" for i in range(3)]
    want = reference(prompts, 24)
    before = metric(url, 'pdserve_router_retries_total{cause="transfer_timeout"}')
    # mid-transfer (after the first piece), one sequence's rows stop for longer than transfer_timeout_s
    _set_faults("prefill-0", pull_stall_s=ROUTER["transfer_timeout_s"] + 1.0, pull_stall_cursor=1,
                pull_stall_sequences=1)
    try:
        t0 = time.monotonic()
        pool, futures = _streams(url, client, prompts, 24)
        with pool:
            got = [f.result(timeout=120) for f in futures]
    finally:
        _set_faults("prefill-0")
    assert got == want
    assert metric(url, 'pdserve_router_retries_total{cause="transfer_timeout"}') >= before + 1
    _recovered("KV transfer timed out, retried", t0)


def _prefill_killed_when(router, reference, prompts, max_tokens, ready, what):
    """Stream ``prompts``; once ``ready(prefill-0's load)``, Ray kills prefill-0 and re-creates it (a new
    incarnation: no faults armed). Every stream must still get the reference text."""
    import ray

    url, client = router
    want = reference(prompts, max_tokens)
    pool, futures = _streams(url, client, prompts, max_tokens)
    with pool:
        wait(lambda: ready(_prefill_load()), what=f"the moment to kill: {what}", every=0.02)
        t0 = time.monotonic()
        ray.kill(_actor("prefill-0"), no_restart=False)
        got = [f.result(timeout=120) for f in futures]
    assert got == want
    _recovered(what, t0)


@in_netns
def test_prefill_killed_before_rows_pulled(router, reference):
    prompts = [f"pulled {i} {LONG}" for i in range(3)]
    _set_faults("prefill-0", pull_stall_s=60.0, pull_stall_cursor=0, pull_stall_sequences=len(prompts))
    # every prompt done on the prefill worker, all its rows still in its outbox
    _prefill_killed_when(router, reference, prompts, 24,
                         lambda p: p.queued_prompt_tokens == p.num_running == p.num_waiting == 0 and p.outbox_bytes,
                         "prefill killed after prefill, before the pull")


@in_netns
def test_prefill_killed_while_computing_long_prompts(router, reference):
    """Issue #19: 3 of 6 requests failed with 503 here; they must wait for the re-created worker."""
    _prefill_killed_when(router, reference, [f"computing {i} {LONG * 2}" for i in range(6)], 16,
                         lambda p: p.num_running > 0 and p.queued_prompt_tokens > 0,
                         "prefill killed while computing")


@in_netns
def test_prefill_gone_for_good_one_clean_error_each(cluster, router, reference, tiny_checkpoint):
    """No prefill worker comes back within the prefill timeout: a request whose prefill was cut gets one
    clean 503 (one that finished before the kill, its text)."""
    import ray

    from engine.tokenizer import load_tokenizer
    from fake_engine import serve_asgi
    from router.app import build_router_app
    from router.pd_flow import PDClient, RouterConfig

    prompts = [f"gone {i} {LONG * 2}" for i in range(3)]
    want = reference(prompts, 8)
    client = PDClient(PREFILL, DECODE, RouterConfig(**{**ROUTER, "prefill_timeout_s": 2.0}))
    with serve_asgi(build_router_app(client, load_tokenizer(tiny_checkpoint)), client) as url:
        body = {"model": client.model_name, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json={**body, "prompt": p}, timeout=60)
                       for p in prompts]
            wait(lambda: _prefill_load().num_running > 0, what="the prompts computing", every=0.02)
            t0 = time.monotonic()
            ray.kill(_actor("prefill-0"), no_restart=True)
            answers = [f.result() for f in futures]
    outcomes = [(r.status_code, r.json()["error"]["code"] if r.status_code != 200 else r.json()["choices"][0]["text"])
                for r in answers]
    assert all(o in ((503, "engine_unavailable"), (200, w)) for o, w in zip(outcomes, want)), outcomes
    assert (503, "engine_unavailable") in outcomes
    print(f"\n[recovery] prefill gone for good: {sum(o[0] == 503 for o in outcomes)} clean 503s, "
          f"{time.monotonic() - t0:.2f} s after the kill")
    cluster["prefill"].start_instance(0)
    _, main_client = router
    wait(lambda: main_client.workers["prefill"][0].healthy, what="prefill-0 back in rotation")
    _recovered("prefill re-created after the 503s", t0)


# ---- the router dies ------------------------------------------------------------------------------
@in_netns
def test_router_killed_workers_free_orphans_within_lease(router, reference, tiny_checkpoint):
    """A router killed with streams open aborts nothing; each worker's lease frees their blocks, while a
    new router (a process of its own, like the one killed) starts and serves."""
    import ray

    _, client = router
    address = ray.get_runtime_context().gcs_address
    procs = [spawn_router(address, PREFILL, DECODE, ROUTER, tiny_checkpoint)]
    try:
        url = router_url(procs[0])
        started = [0] * 4
        pool, futures = _streams(url, client, [f"router {i} {LONG}" for i in range(4)], 600, started)
        with pool:
            wait(lambda: all(started), what="every stream decoding")
            assert held(DECODE), "the streams hold decode blocks"
            t0 = time.monotonic()
            procs[0].kill()
            procs.append(spawn_router(address, PREFILL, DECODE, ROUTER, tiny_checkpoint))
            assert all(f.exception(timeout=60) is not None for f in futures)  # dropped with the router
        _recovered(f"router killed with 4 streams open (lease {LEASE_S:g} s)", t0,
                   within_s=LEASE_S + 2.0 - (time.monotonic() - t0))
        oai = openai_client(router_url(procs[1]))
        text = oai.completions.create(model=client.model_name, prompt="after the router died", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        assert text == reference(["after the router died"], 8)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()

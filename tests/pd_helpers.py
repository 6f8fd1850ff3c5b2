"""Helpers of the Ray PD tests (``test_pd_ray.py``, ``test_pd_faults.py``): OpenAI streams, router
metrics, the workers' load reports, a one-process greedy reference and a router in a process of
its own (so a test can kill it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import httpx

from netns import ROOT

IDLE_FIELDS = ("kv_blocks_used", "kv_blocks_reserved", "num_running", "num_waiting", "queued_prompt_tokens",
               "outbox_bytes")


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def stream_text(client, model: str, prompt: str, max_tokens: int, on_chunk: Callable[[int], None] | None = None,
                **sampling) -> str:
    text = ""
    temperature = sampling.pop("temperature", 0)
    for i, chunk in enumerate(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=temperature, stream=True,
                                                        extra_body={"ignore_eos": True, **sampling})):
        if chunk.choices:
            text += chunk.choices[0].text
        if on_chunk is not None:
            on_chunk(i)
    return text


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def worker_loads(names: list[str]) -> dict[str, Any]:
    """Each named worker's ``load()`` report (``WorkerLoad``)."""
    import ray

    from deploy.contract import NAMESPACE

    refs = {n: ray.get_actor(n, namespace=NAMESPACE).load.remote() for n in names}
    return {n: ray.get(ref, timeout=10) for n, ref in refs.items()}


def held(names: list[str]) -> dict[str, dict[str, int]]:
    """What each worker still holds (the nonzero ``IDLE_FIELDS``); {} when every one is idle."""
    out = {}
    for name, load in worker_loads(names).items():
        busy = {f: getattr(load, f) for f in IDLE_FIELDS if getattr(load, f)}
        if busy:
            out[name] = busy
    return out


def make_reference(checkpoint: str) -> Callable[..., list[str]]:
    """What the dev server's engine produces (``LLM.generate`` in this process), greedy by default."""
    from engine import LLM, SamplingParams

    llm = LLM(checkpoint, dtype="float32", num_kv_blocks=128, block_size=16)

    def run(prompts: list[str], max_tokens: int, **sampling) -> list[str]:
        params = SamplingParams(**{"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, **sampling})
        return [o.outputs[0].text for o in llm.generate(prompts, params)]

    return run


# ---- a router in a process of its own ------------------------------------------------------
def spawn_router(ray_address: str, prefill: list[str], decode: list[str], router_config: dict,
                 checkpoint: str) -> subprocess.Popen:
    """``python tests/pd_helpers.py``: a PD router joined to the Ray cluster at ``ray_address``, on a
    free 127.0.0.1 port (``router_url`` waits for it)."""
    spec = json.dumps({"address": ray_address, "prefill": prefill, "decode": decode, "config": router_config,
                       "checkpoint": checkpoint})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), spec], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def router_url(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The URL a ``spawn_router`` process serves at, once it serves (killed if it does not)."""
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("router at "):
            return line.split()[-1]
    proc.kill()
    proc.wait()
    raise AssertionError("the router process did not start:\n" + "".join(lines[-30:]))


def _router_main(spec: dict) -> None:
    import threading

    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine.tokenizer import load_tokenizer
    from fake_engine import serve_asgi
    from router.app import build_router_app
    from router.pd_flow import PDClient, RouterConfig

    ray.init(address=spec["address"], namespace="pdserve", log_to_driver=False)
    client = PDClient(spec["prefill"], spec["decode"], RouterConfig(**spec["config"]))
    with serve_asgi(build_router_app(client, load_tokenizer(spec["checkpoint"])), client) as url:
        print("router at", url, flush=True)
        threading.Event().wait()  # until killed


if __name__ == "__main__":
    _router_main(json.loads(sys.argv[1]))

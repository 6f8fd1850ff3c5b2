"""The load generator: streaming requests with httpx, timed on the client.

``send_request`` posts one streaming request and returns a ``RequestRecord``: the time
to the first non-empty content chunk (TTFT), the gaps between content chunks (ITL),
the end-to-end latency, and the output token count from the final ``usage`` chunk
(requested with ``stream_options.include_usage``), else the number of content chunks.
Any failure becomes ``ok=False`` with an error kind — ``connection_error``,
``timeout``, ``http_<status>``, ``stream_broken``, ``malformed_sse``, ``stream_error``
(an error object inside the stream), ``incomplete_stream`` (no ``data: [DONE]``) or
``client_error`` — never an exception. ``run_level`` sends a workload at one
concurrency (a semaphore) or one request rate (Poisson arrivals) and times the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from serving.bench.workload import RequestSpec


@dataclasses.dataclass
class RequestRecord:
    index: int
    max_tokens: int
    ok: bool = False
    error: str | None = None  # the kind, see the module docstring
    error_detail: str | None = None
    start_s: float = 0.0  # send time, relative to the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_tokens_from: str = "chunks"  # or "usage"

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1): the mean time per output token after the first."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tpot_s": self.tpot_s}


@dataclasses.dataclass
class LevelResult:
    records: list[RequestRecord]
    duration_s: float


class _Failure(Exception):
    def __init__(self, kind: str, detail: str = ""):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def normalize_base_url(url: str) -> str:
    """``http://host:port`` from ``http://host:port``, ``.../`` or ``.../v1``."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def first_model(client: httpx.AsyncClient, base_url: str) -> str | None:
    """The id of the first model listed by ``GET /v1/models``; None if the server does not answer it."""
    try:
        r = await client.get(f"{base_url}/v1/models", timeout=10)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def build_payload(spec: RequestSpec, model: str | None, chat: bool, ignore_eos: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"max_tokens": spec.max_tokens, "stream": True,
                               "stream_options": {"include_usage": True}}
    if model:
        payload["model"] = model
    if chat:
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def _content(choice: Any, chat: bool) -> str:
    if not isinstance(choice, dict):
        raise _Failure("malformed_sse", f"choice is not an object: {choice!r:.200}")
    value = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return value if isinstance(value, str) else ""


async def _stream(client: httpx.AsyncClient, url: str, payload: dict[str, Any], chat: bool,
                  rec: RequestRecord, t0: float) -> None:
    last = t0
    chunks = 0
    done = False
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code >= 400:
            body = (await resp.aread()).decode("utf-8", "replace")
            raise _Failure(f"http_{resp.status_code}", body[:300])
        async for line in resp.aiter_lines():
            if not line.strip() or line.startswith(":") or line.startswith(("event:", "id:", "retry:")):
                continue
            if not line.startswith("data:"):
                raise _Failure("malformed_sse", line[:300])
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                raise _Failure("malformed_sse", data[:300]) from None
            if not isinstance(obj, dict):
                raise _Failure("malformed_sse", data[:300])
            if "error" in obj:
                raise _Failure("stream_error", json.dumps(obj["error"])[:300])
            choices = obj.get("choices") or []
            if not isinstance(choices, list):
                raise _Failure("malformed_sse", data[:300])
            if choices and _content(choices[0], chat):
                now = time.perf_counter()
                if rec.ttft_s is None:
                    rec.ttft_s = now - t0
                else:
                    rec.itl_s.append(now - last)
                last = now
                chunks += 1
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("completion_tokens"), int):
                    rec.output_tokens, rec.output_tokens_from = usage["completion_tokens"], "usage"
                if isinstance(usage.get("prompt_tokens"), int):
                    rec.prompt_tokens = usage["prompt_tokens"]
    if not done:
        raise _Failure("incomplete_stream", f"the stream ended after {chunks} content chunks without [DONE]")
    rec.e2e_s = time.perf_counter() - t0
    if rec.output_tokens_from == "chunks":
        rec.output_tokens = chunks


async def send_request(client: httpx.AsyncClient, base_url: str, index: int, spec: RequestSpec, model: str | None,
                       *, chat: bool, ignore_eos: bool, timeout: float, run_start: float) -> RequestRecord:
    """One streaming request, timed; failures are recorded, never raised."""
    url = f"{base_url}/v1/chat/completions" if chat else f"{base_url}/v1/completions"
    rec = RequestRecord(index, spec.max_tokens, prompt_tokens=spec.prompt_len)
    t0 = time.perf_counter()
    rec.start_s = t0 - run_start
    try:
        await asyncio.wait_for(_stream(client, url, build_payload(spec, model, chat, ignore_eos), chat, rec, t0),
                               timeout)
        rec.ok = True
    except _Failure as e:
        rec.error, rec.error_detail = e.kind, e.detail
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        rec.error, rec.error_detail = "timeout", f"no complete response in {timeout:g}s ({type(e).__name__})"
    except httpx.ConnectError as e:
        rec.error, rec.error_detail = "connection_error", str(e) or type(e).__name__
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        rec.error, rec.error_detail = "stream_broken", str(e) or type(e).__name__
    except Exception as e:  # any other transport or decoding failure is this request's error, not the run's
        rec.error, rec.error_detail = "client_error", f"{type(e).__name__}: {e}"
    if not rec.ok:
        rec.ttft_s, rec.itl_s = None, []
    return rec


def make_client(timeout: float) -> httpx.AsyncClient:
    """An httpx client without a connection cap (the benchmark sets the concurrency) that ignores proxy settings."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                             trust_env=False)


async def run_level(client: httpx.AsyncClient, base_url: str, model: str | None, specs: list[RequestSpec], *,
                    concurrency: int | None, request_rate: float | None, chat: bool, ignore_eos: bool,
                    timeout: float, seed: int, progress: bool, desc: str) -> LevelResult:
    """Send every spec at ``concurrency`` requests in flight, or at Poisson ``request_rate`` requests/s."""
    sem = asyncio.Semaphore(concurrency or len(specs))
    bar = tqdm(total=len(specs), desc=desc, file=sys.stderr, disable=not progress, leave=False)
    run_start = time.perf_counter()

    async def one(i: int, spec: RequestSpec) -> RequestRecord:
        async with sem:
            rec = await send_request(client, base_url, i, spec, model, chat=chat, ignore_eos=ignore_eos,
                                     timeout=timeout, run_start=run_start)
        bar.update(1)
        return rec

    tasks = []
    rng = np.random.default_rng(seed)
    try:
        for i, spec in enumerate(specs):
            if request_rate is not None and not math.isinf(request_rate) and i:
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
            tasks.append(asyncio.ensure_future(one(i, spec)))
        records = list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    return LevelResult(records, time.perf_counter() - run_start)

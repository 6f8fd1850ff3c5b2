"""The router's FastAPI app: serving's OpenAI API over ``PDClient``, with router metrics.

``build_router_app(client, tokenizer, ...)`` is ``serving.openai_api.build_app`` (the
same endpoints, errors, auth and streaming as the dev server) with the router's
metrics (``router.metrics``: per-stage latency, transfer bytes, retries and failures
by cause, healthy workers per pool; ``router.experts``: expert balance and rebalances)
registered in the same registry, so one ``GET /metrics`` exposes both, and:

* ``GET /pools`` — JSON view of the workers (health, last error, load, ranks) for
  ``pdserve status`` and operators;
* ``GET /expert_load[?detail=true]`` — expert-load statistics per pool and instance
  (balancedness per layer, placement version, last rebalance; with ``detail`` the
  per-expert and per-slot counts over the window);
* ``POST /admin/rebalance`` ``{"pool": "decode", "force": false}`` (no pool: both) —
  plan and roll out a new expert placement now; answers when it is done, with what
  moved. Behind the API key like every other route; 409 while one is running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Callable

from fastapi import FastAPI, Request

from deploy.contract import ROLES
from router.experts import RebalanceError
from router.pd_flow import PDClient
from serving.errors import APIError
from serving.metrics import ServingMetrics
from serving.openai_api import DEFAULT_MAX_BODY_BYTES, build_app


def _load_view(load) -> dict:
    """A ``WorkerLoad`` as JSON; its expert counts are ``GET /expert_load``'s business."""
    return {k: v for k, v in dataclasses.asdict(load).items() if k != "experts"}


def build_router_app(client: PDClient, tokenizer, *, api_key: str | None = None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                     ranks: Callable[[], dict[str, list]] | None = None) -> FastAPI:
    """``ranks``: every rank of every pool (``deploy.pool.Pool.rank_status``), when this process owns the pools."""
    metrics = ServingMetrics(client.stats)
    client.metrics.attach(metrics.registry)
    client.experts.attach(metrics.registry)
    app = build_app(client, tokenizer, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    app.state.metrics = metrics  # the gRPC server beside it records into the same registry

    @app.get("/pools")
    async def pools() -> dict:
        rank_status = {}
        if ranks is not None:
            status = await asyncio.get_running_loop().run_in_executor(None, ranks)
            rank_status = {role: [dataclasses.asdict(r) for r in rs] for role, rs in status.items()}
        return {"max_model_len": client.pool_max_model_len, "ranks": rank_status,
                **{role: [{"name": w.name, "healthy": w.healthy, "last_error": w.last_error,
                           "load": _load_view(w.load)} for w in ws] for role, ws in client.workers.items()}}

    @app.get("/expert_load")
    async def expert_load(detail: bool = False) -> dict:
        return client.experts.view(detail)

    @app.post("/admin/rebalance")
    async def rebalance(request: Request) -> dict:
        body = await request.body()
        try:
            spec = json.loads(body) if body.strip() else {}
        except ValueError:
            raise APIError(400, "body: not valid JSON") from None
        if not isinstance(spec, dict) or set(spec) - {"pool", "force"}:
            raise APIError(400, 'body: {"pool": "prefill" | "decode" (default: both), "force": bool}')
        pool, force = spec.get("pool"), spec.get("force", False)
        if pool is not None and pool not in ROLES:
            raise APIError(400, f"pool: one of {list(ROLES)}, got {pool!r}", param="pool")
        if not isinstance(force, bool):
            raise APIError(400, "force: must be true or false", param="force")
        results = {}
        for role in [pool] if pool else ROLES:
            try:
                results[role] = await client.experts.rebalance(role, force=force)
            except RebalanceError as e:
                raise APIError(409, str(e), code="rebalance_in_progress") from None
        return {"pools": results}

    return app

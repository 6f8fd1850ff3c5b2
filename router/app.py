"""The router's FastAPI app: serving's OpenAI API over ``PDClient``, with router metrics.

``build_router_app(client, tokenizer, ...)`` is ``serving.openai_api.build_app`` (the
same endpoints, errors, auth and streaming as the dev server) with the router's
metrics (``router.metrics``: per-stage latency, transfer bytes, retries and failures
by cause, healthy workers per pool) registered in the same registry, so one
``GET /metrics`` exposes both, and a ``GET /pools`` JSON view of the workers
(health, last error, load) for ``pdserve status`` and operators.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

from fastapi import FastAPI

from router.pd_flow import PDClient
from serving.metrics import ServingMetrics
from serving.openai_api import DEFAULT_MAX_BODY_BYTES, build_app


def build_router_app(client: PDClient, tokenizer, *, api_key: str | None = None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                     ranks: Callable[[], dict[str, list]] | None = None) -> FastAPI:
    """``ranks``: every rank of every pool (``deploy.pool.Pool.rank_status``), when this process owns the pools."""
    metrics = ServingMetrics(client.stats)
    client.metrics.attach(metrics.registry)
    app = build_app(client, tokenizer, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.get("/pools")
    async def pools() -> dict:
        rank_status = {}
        if ranks is not None:
            status = await asyncio.get_running_loop().run_in_executor(None, ranks)
            rank_status = {role: [dataclasses.asdict(r) for r in rs] for role, rs in status.items()}
        return {"max_model_len": client.pool_max_model_len, "ranks": rank_status,
                **{role: [{"name": w.name, "healthy": w.healthy, "last_error": w.last_error,
                           "load": dataclasses.asdict(w.load)} for w in ws] for role, ws in client.workers.items()}}

    return app

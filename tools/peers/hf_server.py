"""A transformers-based baseline OpenAI-compatible server, for side-by-side numbers only.

    python tools/peers/hf_server.py --model DIR [--port 8002] [--max-batch 32] [--dtype bfloat16]

It exists to give a baseline number in docs/BENCHMARKS.md; it is not part of pdserve.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``prompt``: a string or a list of
token ids; ``max_tokens``, ``temperature`` (0 = greedy, else sampling from the
temperature-scaled softmax), ``ignore_eos``, ``stream`` with
``stream_options.include_usage``; ``seed`` is honoured per request).

Batching: **static batching**. One worker thread takes every request waiting in the queue
(up to ``--max-batch``), left-pads the prompts, runs one prefill and then decode steps with
transformers' KV cache (``DynamicCache``) until every request of that batch is done; requests
that arrive meanwhile wait for the next batch (no continuous batching, no chunked prefill).
A finished request is streamed its ``[DONE]`` at once but its row keeps being computed
until the batch ends; a batch ends when every request in it is finished or its streaming
client has disconnected.
"""

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Req:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    ignore_eos: bool
    seed: int | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


class Engine:
    def __init__(self, model_dir: str, dtype: str, max_batch: int):
        import transformers

        self.tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        eos = self.model.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.max_batch = max_batch
        self.q: queue.Queue[Req] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _emit(self, r: Req, item: Any) -> None:
        r.loop.call_soon_threadsafe(r.out.put_nowait, item)

    def _loop(self) -> None:
        while True:
            batch = [self.q.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                with torch.inference_mode():
                    self._run(batch)
            except Exception as e:  # noqa: BLE001  (report to every request of the batch, keep serving)
                for r in batch:
                    if not r.done:
                        self._emit(r, e)

    def _run(self, batch: list[Req]) -> None:
        from transformers import DynamicCache

        n = len(batch)
        longest = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((n, longest), self.pad, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in batch]
        cache = DynamicCache()
        steps = max(r.max_tokens for r in batch)
        inp = ids
        for _ in range(steps):
            logits = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits[:, -1, :].float()
            nxt = logits.argmax(-1)
            for i, r in enumerate(batch):
                if r.temperature > 0 and not r.done:
                    probs = torch.softmax(logits[i] / r.temperature, -1)
                    nxt[i] = torch.multinomial(probs, 1, generator=gens[i])[0]
            for i, r in enumerate(batch):
                if r.done:
                    continue
                t = int(nxt[i])
                r.generated.append(t)
                text = self.tok.decode(r.generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
                    delta = ""
                else:
                    delta, r.text = text[len(r.text):], text
                finish = None
                if len(r.generated) >= r.max_tokens:
                    finish = "length"
                elif t in self.eos and not r.ignore_eos:
                    finish = "stop"
                self._emit(r, (delta, finish))
                if finish:
                    r.done = True
            if all(r.done for r in batch):
                return
            inp = nxt[:, None]
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1


def build_app(engine: Engine, served_name: str):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "hf-baseline"}]}

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = engine.tok.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            prompt_ids = prompt
        else:
            raise HTTPException(400, "prompt must be a string or a list of token ids")
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        r = Req(prompt_ids, max_tokens, temperature, bool(body.get("ignore_eos", False)), body.get("seed"),
                asyncio.get_running_loop(), asyncio.Queue())
        engine.q.put(r)
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.get("model") or served_name

        def usage() -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(r.generated),
                    "total_tokens": len(prompt_ids) + len(r.generated)}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def gen():
                try:
                    while True:
                        item = await r.out.get()
                        if isinstance(item, Exception):
                            yield f"data: {json.dumps({'error': {'message': str(item)}})}\n\n"
                            break
                        delta, finish = item
                        if delta or finish:
                            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                     "choices": [{"index": 0, "text": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if finish:
                            break
                finally:
                    r.done = True  # a client that went away stops counting towards its batch
                if include_usage:
                    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        text, finish = "", None
        while finish is None:
            item = await r.out.get()
            if isinstance(item, Exception):
                raise HTTPException(500, str(item))
            delta, finish = item
            text += delta
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                             "usage": usage()})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-batch", type=int, default=32, help="most requests in one static batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvicorn

    engine = Engine(args.model, args.dtype, args.max_batch)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    uvicorn.run(build_app(engine, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

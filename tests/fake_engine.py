"""Test doubles for the API layer: a tiny tokenizer, a deterministic fake ``EngineClient``
and ``running_server``, which serves any ``EngineClient`` on 127.0.0.1 with uvicorn.

``FakeEngine`` emits, for completion ``k`` of a prompt, the tokens
``expected_token_ids(prompt, k, count)`` — a pure function of the prompt, so concurrent
requests can be checked independently — or, with ``reply``, the tokens of the text
``reply(request, k)`` followed by EOS (scripted model output). It honours ``max_tokens``, ``n``, stop strings,
``stop_token_ids``, EOS (after ``eos_after`` tokens unless ``ignore_eos``), ``min_tokens``,
logprobs/prompt logprobs and ``abort``, sleeps ``token_delay`` seconds per step, and
keeps ``blocks_in_use`` (KV blocks held by running requests) so tests can check that
disconnects release them. Point a test at the real engine with
``running_server(AsyncEngine(args), load_tokenizer(args.model))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import socket
import threading
import time
from typing import AsyncIterator, Callable, Iterator

import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.outputs import (CompletionOutput, EngineError, EngineOverloaded, EngineStats, GenerateRequest,
                            RequestMetrics, RequestOutput)
from serving.openai_api import build_app
from engine.tokenizer import Tokenizer, load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving large language models needs paged attention and continuous batching.",
    "Prefill and decode run on different machines in a disaggregated deployment.",
    "Hello world! How are you today? I am fine, thank you.",
    "DeepSeek uses multi-head latent attention and a mixture of experts.",
    "0123456789 + - * / = ( ) [ ] { } < > , ; : ' \" ! ?",
]

# DeepSeek-V3's template, shortened: the same variables, namespace use and error helper.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'tool' %}{{ '<｜User｜>[tool] ' + message['content'] }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unsupported role ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def make_model_dir(path: str) -> str:
    """Write a byte-level BPE ``tokenizer.json`` and a DeepSeek-style ``tokenizer_config.json`` to ``path``."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
              "bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": {"__type": "AddedToken", "content": EOS},
              "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return path


def make_tokenizer(path: str) -> Tokenizer:
    return load_tokenizer(make_model_dir(path))


@dataclasses.dataclass
class _Running:
    request: GenerateRequest
    blocks: int
    aborted: bool = False


class FakeEngine:
    """A deterministic ``EngineClient``; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, *, model_name: str = "fake-model", max_model_len: int = 512,
                 token_delay: float = 0.0, block_size: int = 16, num_blocks: int = 100_000,
                 max_running: int | None = None, eos_after: int | None = None,
                 reply: Callable[[GenerateRequest, int], str] | None = None):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_running = max_running
        self.eos_after = eos_after
        self.reply = reply
        self.eos_token_ids = [tokenizer.eos_token_id]
        self.healthy = True
        self.fail_with: EngineError | None = None  # raised by the next generate()
        self.running: dict[str, _Running] = {}
        self.blocks_in_use = 0
        self.abort_calls: list[str] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._seen_blocks: set[tuple[int, ...]] = set()
        self.safe_ids = sorted(i for i in range(tokenizer.vocab_size) if _plain_ascii(tokenizer.token_text(i)))
        self.started = self.stopped = False

    # ---- what the engine will produce (tests use these too) ---------------------
    def expected_token_ids(self, prompt_ids: list[int], k: int, count: int) -> list[int]:
        h = sum((j + 1) * t for j, t in enumerate(prompt_ids))
        return [self.safe_ids[(h + 7 * s + 13 * k) % len(self.safe_ids)] for s in range(count)]

    def expected_text(self, prompt_ids: list[int], k: int, count: int) -> str:
        return self.tokenizer.decode(self.expected_token_ids(prompt_ids, k, count))

    # ---- EngineClient -------------------------------------------------------
    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True
        for r in self.running.values():
            r.aborted = True

    async def health(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=0, kv_blocks_total=self.num_blocks,
                           kv_blocks_used=self.blocks_in_use, prefix_cache_queries=self.prefix_cache_queries,
                           prefix_cache_hits=self.prefix_cache_hits, num_preemptions=self.num_preemptions)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        if request_id in self.running:
            self.running[request_id].aborted = True

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        if self.stopped:
            raise EngineError("engine is shut down")
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise EngineOverloaded(f"{len(self.running)} requests running")
        sp = request.sampling_params
        total = len(request.prompt_token_ids) + (sp.max_tokens or 0)
        assert total <= self.max_model_len, "the API layer must enforce the context length"
        blocks = sp.n * math.ceil(total / self.block_size)
        self.running[request.request_id] = run = _Running(request, blocks)
        self.blocks_in_use += blocks
        try:
            async for out in self._steps(run):
                yield out
        finally:  # finished, aborted, or closed by the consumer: the blocks go back
            self.running.pop(request.request_id, None)
            self.blocks_in_use -= blocks

    def _cached_tokens(self, prompt: list[int]) -> int:
        hits = 0
        for end in range(self.block_size, len(prompt) + 1, self.block_size):
            key = tuple(prompt[:end])
            hits += self.block_size if key in self._seen_blocks else 0
            self._seen_blocks.add(key)
        self.prefix_cache_queries += len(prompt)
        self.prefix_cache_hits += hits
        return hits

    async def _steps(self, run: _Running) -> AsyncIterator[RequestOutput]:
        req, sp = run.request, run.request.sampling_params
        metrics = RequestMetrics(arrival_time=time.time(), num_cached_tokens=self._cached_tokens(req.prompt_token_ids))
        await asyncio.sleep(self.token_delay)
        metrics.scheduled_time = time.time()
        states = [_Completion(k, self._plan(req, k)) for k in range(sp.n)]
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: -1.5} for t in req.prompt_token_ids[1:]]
        step = 0
        while any(not s.finished for s in states):
            if step:
                await asyncio.sleep(self.token_delay)
            deltas = []
            for s in states:
                if s.finished:
                    continue
                deltas.append(self._advance(s, step, sp) if not run.aborted else
                              CompletionOutput(s.index, finish_reason="abort"))
                s.finished = deltas[-1].finish_reason is not None
            step += 1
            now = time.time()
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            done = all(s.finished for s in states)
            if done:
                metrics.finished_time = now
            yield RequestOutput(req.request_id, req.prompt_token_ids, deltas, finished=done, prompt=req.prompt,
                                prompt_logprobs=prompt_logprobs if step == 1 else None,
                                metrics=dataclasses.replace(metrics))

    def _plan(self, req: GenerateRequest, k: int) -> list[int]:
        if self.reply is None:
            return self.expected_token_ids(req.prompt_token_ids, k, req.sampling_params.max_tokens)
        return self.tokenizer.encode(self.reply(req, k), add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def _advance(self, s: "_Completion", step: int, sp) -> CompletionOutput:
        eos = self.tokenizer.eos_token_id
        at_eos = (self.eos_after is not None and step >= self.eos_after and not sp.ignore_eos
                  and step >= sp.min_tokens) or (s.plan[step] == eos and not sp.ignore_eos)
        tid = eos if at_eos else s.plan[step]
        s.token_ids.append(tid)
        out = CompletionOutput(s.index, token_ids=[tid])
        if sp.logprobs is not None:
            alternatives = [t for t in self.safe_ids[:sp.logprobs + 1] if t != tid][:sp.logprobs]
            out.logprobs = [{tid: -0.25, **{t: -1.0 - j for j, t in enumerate(alternatives)}}]
        if at_eos:
            out.finish_reason = "stop"
            return out
        text = self.tokenizer.decode(s.token_ids)
        stop_at = min(((text.find(x), x) for x in sp.stop if x in text), default=None)
        if stop_at is not None:
            cut = stop_at[0] + (len(stop_at[1]) if sp.include_stop_str_in_output else 0)
            out.text, out.finish_reason, out.stop_reason = text[:cut][len(s.text):], "stop", stop_at[1]
        else:
            out.text = text[len(s.text):]
            if tid in sp.stop_token_ids and len(s.token_ids) >= sp.min_tokens:
                out.finish_reason, out.stop_reason = "stop", tid
            elif len(s.token_ids) >= sp.max_tokens:
                out.finish_reason = "length"
            if out.finish_reason is None and out.text.endswith("\ufffd"):
                out.text = ""  # a character split across tokens: shown once its last byte arrives
        s.text += out.text
        return out


@dataclasses.dataclass
class _Completion:
    index: int
    plan: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finished: bool = False


def _plain_ascii(text: str) -> bool:
    return bool(text) and all(32 <= ord(ch) < 127 for ch in text)


# ---- serving any EngineClient in a background thread -----------------------------
@dataclasses.dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    client: object
    app: object

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def serve_asgi(app, client=None, log_level: str = "warning") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port; yields its base URL.

    The server's event loop runs in a thread; ``client.start()``/``client.shutdown()``
    are awaited in it when a client with them is given. Stopped (thread joined) on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5))
    errors: list[BaseException] = []

    async def main() -> None:
        if hasattr(client, "start"):
            await client.start()
        try:
            await server.serve(sockets=[sock])
        finally:
            if hasattr(client, "shutdown"):
                await client.shutdown()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced to the test below
            errors.append(e)

    thread = threading.Thread(target=thread_main, name="uvicorn-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if errors or not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"test server did not start: {errors}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "test server did not stop"
        assert not errors, f"test server failed: {errors}"


@contextlib.contextmanager
def running_server(client, tokenizer: Tokenizer, **app_kwargs) -> Iterator[RunningServer]:
    """Serve ``build_app(client, tokenizer, **app_kwargs)`` (see ``serve_asgi``)."""
    app = build_app(client, tokenizer, **app_kwargs)
    with serve_asgi(app, client) as url:
        yield RunningServer(url, client, app)

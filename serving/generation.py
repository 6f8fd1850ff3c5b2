"""Running the engine requests behind one API request, whichever surface it came from.

An API request becomes one ``GenerateRequest`` per prompt (``n`` stays inside
``SamplingParams``). ``Generation`` starts them on an ``EngineClient``, merges their
delta streams, times them for the metrics and the access log, and — whenever it is
closed before every engine request finished (client gone, error, cancellation) —
aborts the unfinished ones so the engine frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

import anyio

from engine.outputs import EngineClient, EngineOverloaded, GenerateRequest, RequestOutput
from serving.metrics import ServingMetrics


@dataclasses.dataclass
class _Timing:
    """What the API layer sees of one engine request."""

    arrival: float  # time.monotonic() when handed to the engine
    prompt_tokens: int
    first_output: float | None = None
    last_output: float | None = None
    generated: int = 0
    queue_seconds: float | None = None
    finish_reasons: dict[int, str] = dataclasses.field(default_factory=dict)
    cached_tokens: int | None = None
    draft_tokens: int = 0  # speculative decoding: drafts verified for this request
    accepted_tokens: int = 0
    done: bool = False


class Generation:
    """The engine requests of one API request; iterate ``outputs()`` once, then ``close()``.

    ``outputs()`` yields ``(prompt_index, delta)`` as deltas arrive from any engine
    request. ``close()`` is idempotent and safe under cancellation: it aborts what
    has not finished and records the metrics.
    """

    def __init__(self, client: EngineClient, requests: list[GenerateRequest], metrics: ServingMetrics,
                 protocol: str = "http"):
        self.client = client
        self.requests = requests
        self.metrics = metrics
        self.protocol = protocol
        self.start = time.monotonic()
        self.timings = [_Timing(self.start, len(r.prompt_token_ids)) for r in requests]
        self._iters = [client.generate(r) for r in requests]
        self._pending: dict[asyncio.Task, int] = {}
        self._closed = False
        self._failed = False  # an engine request raised: not a success for the metrics

    # ---- summary, for responses and the access log ------------------------
    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.timings)

    @property
    def completion_tokens(self) -> int:
        return sum(t.generated for t in self.timings)

    @property
    def cached_tokens(self) -> int | None:
        known = [t.cached_tokens for t in self.timings if t.cached_tokens is not None]
        return sum(known) if known else None

    @property
    def spec_tokens(self) -> tuple[int, int]:
        """(draft tokens verified, of which accepted) over the engine requests."""
        return sum(t.draft_tokens for t in self.timings), sum(t.accepted_tokens for t in self.timings)

    @property
    def ttft(self) -> float | None:
        firsts = [t.first_output for t in self.timings if t.first_output is not None]
        return min(firsts) - self.start if firsts else None

    @property
    def finish_reasons(self) -> list[str]:
        return [r for t in self.timings for _, r in sorted(t.finish_reasons.items())]

    # ---- running ----------------------------------------------------------
    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        self._pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(self._iters)}
        while self._pending:
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=self._pending.__getitem__):
                i = self._pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    self.timings[i].done = True
                    continue
                except BaseException as e:
                    self._failed = True
                    if isinstance(e, EngineOverloaded):
                        self.metrics.observe_rejected(self.protocol, "overloaded")
                    raise
                self._observe(i, out)
                if out.finished:
                    self.timings[i].done = True
                else:  # fetch the next delta while the caller handles this one
                    self._pending[asyncio.ensure_future(anext(self._iters[i]))] = i
                yield i, out

    def _observe(self, i: int, out: RequestOutput) -> None:
        t, now = self.timings[i], time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        if new_tokens:
            if t.first_output is None:
                t.first_output = now
                self.metrics.observe_first_token(self.protocol, now - t.arrival)
            else:
                self.metrics.observe_inter_token(self.protocol, now - t.last_output)
            t.last_output = now
            t.generated += new_tokens
        for c in out.outputs:
            if c.finish_reason is not None:
                t.finish_reasons[c.index] = c.finish_reason
        m = out.metrics
        if m is not None:
            t.cached_tokens = m.num_cached_tokens
            t.draft_tokens, t.accepted_tokens = m.num_draft_tokens, m.num_accepted_tokens
            if m.scheduled_time is not None:
                t.queue_seconds = max(0.0, m.scheduled_time - m.arrival_time)

    async def close(self) -> None:
        """Abort unfinished engine requests, stop their streams and record metrics (once, unless one failed)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):  # runs even while the caller is being cancelled
            unfinished = [r.request_id for r, t in zip(self.requests, self.timings) if not t.done]
            for request_id in unfinished:
                await self.client.abort(request_id)
            for task in self._pending:
                task.cancel()
            await asyncio.gather(*self._pending, return_exceptions=True)
            self._pending = {}
            for it in self._iters:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    await aclose()
        if not self._failed:
            self._record()

    def _record(self) -> None:
        """Metrics per engine request; a completion that never finished counts as "abort"."""
        now = time.monotonic()
        for r, t in zip(self.requests, self.timings):
            for k in range(r.sampling_params.n):
                t.finish_reasons.setdefault(k, "abort")
            self.metrics.observe_finished(
                self.protocol, prompt_tokens=t.prompt_tokens, generation_tokens=t.generated,
                e2e_seconds=(t.last_output if t.done and t.last_output else now) - t.arrival,
                queue_seconds=t.queue_seconds, finish_reasons=[v for _, v in sorted(t.finish_reasons.items())])

"""The PD ``EngineClient``: one request's lifecycle across a prefill and a decode worker.

States of a sequence, in order (the router is the single owner)::

    queued → prefilling → transferring → decoding → finished | aborted | failed

* **queued**: pick a decode worker (``Policy.decode_order``: least KV in use + running)
  and *reserve* its capacity for prompt + max tokens first (``DecodeWorker.reserve``),
  so decode never runs out of blocks for a request already prefilled. No worker in
  rotation → ``EngineError`` at once (HTTP 503); every reservation refused →
  ``EngineOverloaded`` (429).
* **prefilling**: pick a prefill worker (``Policy.pick_prefill``: least queued prompt
  tokens, prefix affinity) and call ``prefill``. A worker that dies or does not answer
  in ``prefill_timeout_s`` leaves rotation and the request goes to another one, up to
  ``max_prefill_retries``. If the first token ends the request, it is sent and the
  reservation dropped.
* **transferring**: ``DecodeWorker.start_decode(rid, [ObjectRef])`` pulls the payload
  from the object store (``deploy.kv_transfer``: pending → transferring → done |
  failed, with a timeout). Failed → prefill again (counts as a prefill retry).
* **decoding**: long-poll ``DecodeWorker.poll`` for deltas and stream them. The first
  delta repeats the first token, so the decode stream alone is the whole output.
  A decode worker that dies or stalls (no poll answer in ``poll_wait_s +
  stall_timeout_s``) leaves rotation; the sequence *resumes*: prompt + tokens already
  sent are prefilled again and decoded on another worker, up to ``max_resumes``;
  then one clean ``EngineError``. The resumed leg's params carry ``resumed_output_tokens``
  so its text (a character or stop string split across the resume point) continues exactly.
  Greedy output is unchanged by a resume; a seeded
  sampled one continues with a fresh generator state.
* Every exit (finished, client gone → ``abort``/``aclose``, error) sends ``abort`` to
  the workers that may still hold the sequence (its blocks or reservation are freed)
  and is counted in ``RouterMetrics``.

``n > 1`` fans out at the router: n sequences ``<id>#i`` with seeds ``seed + i·1000003``
(as one engine would), merged into one stream. A background health loop polls every
worker's ``load()`` each ``health_interval_s``: a failure or timeout takes it out of
rotation, an answer puts it back (re-resolving the named actor, so a re-created
worker is found); a worker that restarted has its prefix-affinity entries dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any, AsyncIterator

from engine.outputs import EngineError, EngineOverloaded, EngineStats, GenerateRequest, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from router.metrics import RouterMetrics
from router.policy import Policy, PrefixAffinity, WorkerLoad

log = logging.getLogger("pdserve.router")

NAMESPACE = "pdserve"


@dataclasses.dataclass
class RouterConfig:
    poll_wait_s: float = 0.25  # a decode poll returns at the latest after this without news
    prefill_timeout_s: float = 120.0  # the prefill call, queueing on the worker included
    reserve_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0  # the worker's own timeout; the router waits 5 s more
    stall_timeout_s: float = 10.0  # a decode poll unanswered for poll_wait_s + this = worker lost
    health_interval_s: float = 1.0
    health_timeout_s: float = 3.0
    max_prefill_retries: int = 2
    max_resumes: int = 2
    affinity_slack_tokens: int = 2048
    affinity_entries: int = 100_000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class Worker:
    name: str
    role: str
    handle: Any = None
    healthy: bool = False
    load: WorkerLoad = None  # type: ignore[assignment]
    started_at: float | None = None
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.load = self.load or WorkerLoad(self.name)


class WorkerLost(Exception):
    """A worker died, restarted or stopped answering during a call."""

    def __init__(self, worker: Worker, cause: str):
        super().__init__(f"{worker.name}: {cause}")
        self.worker = worker


class _Retry(Exception):
    """The hand-off failed; prefill again."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


class PDClient:
    """``EngineClient`` over Ray worker pools; ``await start()`` before use, ``await shutdown()`` after."""

    def __init__(self, prefill: list[str], decode: list[str], config: RouterConfig | None = None,
                 namespace: str = NAMESPACE):
        self.config = config or RouterConfig()
        self.namespace = namespace
        self.workers = {"prefill": [Worker(n, "prefill") for n in prefill],
                        "decode": [Worker(n, "decode") for n in decode]}
        self.metrics = RouterMetrics(self.pool_health)
        self.policy: Policy | None = None
        self.model_name = ""
        self.max_model_len = 0
        self.eos_token_ids: list[int] = []
        self._active: dict[str, dict[str, list[Worker | None]]] = {}  # user rid -> seq rid -> [prefill, decode]
        self._health_task: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the workers, read the model's facts from one of them, start the health loop."""
        await self.refresh()
        for w in self.workers["decode"] + self.workers["prefill"]:
            if w.healthy:
                info = await asyncio.wait_for(w.handle.info.remote(), self.config.health_timeout_s)
                break
        else:
            raise EngineError("no worker answered; start the pools first (pdserve up)")
        self.model_name, self.max_model_len = info["model_name"], info["max_model_len"]
        self.eos_token_ids = info["eos_token_ids"]
        self.policy = Policy(PrefixAffinity(info["block_size"], self.config.affinity_entries),
                             self.config.affinity_slack_tokens)
        self._health_task = asyncio.ensure_future(self._health_loop())

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        for seqs in list(self._active.values()):
            for seq_id, (prefill, decode) in seqs.items():
                self._abort_on(prefill, seq_id)
                self._abort_on(decode, seq_id)

    # ---- health ------------------------------------------------------------------------
    def pool_health(self) -> dict[str, tuple[int, int]]:
        return {role: (len(ws), sum(w.healthy for w in ws)) for role, ws in self.workers.items()}

    async def refresh(self) -> None:
        """Probe every worker once (``load()``): in rotation if it answers, out otherwise."""
        await asyncio.gather(*(self._probe(w) for ws in self.workers.values() for w in ws))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("health round failed")

    async def _probe(self, w: Worker) -> None:
        import ray

        try:
            if w.handle is None:
                loop = asyncio.get_running_loop()
                w.handle = await loop.run_in_executor(
                    None, functools.partial(ray.get_actor, w.name, namespace=self.namespace))
            d = await asyncio.wait_for(w.handle.load.remote(), self.config.health_timeout_s)
        except Exception as e:  # dead, restarting, unknown name, timeout: all mean "not now"
            self._mark_down(w, f"{type(e).__name__}: {e}".splitlines()[0][:200])
            return
        if not d.get("alive", False):
            self._mark_down(w, "its engine thread failed")
            return
        if w.started_at is not None and d["started_at"] != w.started_at and self.policy is not None:
            self.policy.affinity.forget(w.name)  # a new incarnation: its prefix cache is empty
        if not w.healthy:
            log.info("%s is back in rotation", w.name)
        w.started_at, w.load, w.healthy, w.last_error = d["started_at"], WorkerLoad.from_dict(d), True, None

    def _mark_down(self, w: Worker, why: str) -> None:
        if w.healthy:
            log.warning("%s out of rotation: %s", w.name, why)
        w.healthy, w.handle, w.last_error = False, None, why

    def _healthy(self, role: str, exclude: set[str] = frozenset()) -> list[Worker]:
        return [w for w in self.workers[role] if w.healthy and w.handle is not None and w.name not in exclude]

    # ---- EngineClient ----------------------------------------------------------------
    async def health(self) -> bool:
        return bool(self._healthy("prefill")) and bool(self._healthy("decode"))

    def stats(self) -> EngineStats:
        s = EngineStats()
        for w in (w for ws in self.workers.values() for w in ws if w.healthy):
            s.num_running += w.load.num_running
            s.num_waiting += w.load.num_waiting
            s.kv_blocks_total += w.load.kv_blocks_total
            s.kv_blocks_used += w.load.kv_blocks_used
        return s

    async def abort(self, request_id: str) -> None:
        for seq_id, (prefill, decode) in list(self._active.get(request_id, {}).items()):
            self._abort_on(prefill, seq_id)
            self._abort_on(decode, seq_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.policy is None:
            raise EngineError("the router is not started")
        sp = request.sampling_params
        self._active[request.request_id] = {}
        try:
            if sp.n == 1:
                async for out in self._sequence(request, request.request_id, sp, 0):
                    yield out
            else:
                async for out in self._fan_out(request):
                    yield out
        finally:
            self._active.pop(request.request_id, None)

    async def _fan_out(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """n sequences of one request, merged; the delta that ends the last one has ``finished``."""
        sp = request.sampling_params
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            seed = None if sp.seed is None else (sp.seed + i * 1_000_003) % 2**63
            try:
                async for out in self._sequence(request, f"{request.request_id}#{i}", sp.clone(n=1, seed=seed), i):
                    await q.put(out)
            except BaseException as e:
                await q.put(e)

        tasks = [asyncio.ensure_future(pump(i)) for i in range(sp.n)]
        finished = 0
        try:
            while finished < sp.n:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished += item.finished
                item.finished = finished == sp.n
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one sequence: queued → prefilling → transferring → decoding ----------------------
    async def _sequence(self, request: GenerateRequest, seq_id: str, params: SamplingParams,
                        index: int) -> AsyncIterator[RequestOutput]:
        cfg, m = self.config, self.metrics
        prompt = request.prompt_token_ids
        metrics = RequestMetrics(arrival_time=time.time())
        arrival = time.monotonic()
        sent: list[int] = []
        slot: list[Worker | None] = [None, None]  # the workers that may hold this sequence: [prefill, decode]
        self._active[request.request_id][seq_id] = slot
        prefill_failures = resumes = 0
        outcome = "aborted"
        try:
            while True:
                leg_prompt = prompt + sent
                leg_params = params if not sent else params.clone(
                    max_tokens=None if params.max_tokens is None else params.max_tokens - len(sent),
                    min_tokens=max(0, params.min_tokens - len(sent)), prompt_logprobs=None,
                    resumed_output_tokens=len(sent))
                budget = len(leg_prompt) + (leg_params.max_tokens or self.max_model_len - len(leg_prompt))
                try:
                    # queued
                    t0 = time.monotonic()
                    slot[1] = await self._reserve_decode(seq_id, budget)
                    # prefilling
                    metrics.scheduled_time = metrics.scheduled_time or time.time()
                    m.stage.labels("queue").observe(time.monotonic() - t0)
                    t1 = time.monotonic()
                    result = await self._prefill(seq_id, leg_prompt, leg_params, slot)
                    m.stage.labels("prefill").observe(time.monotonic() - t1)
                    if "output" in result:  # the first token ended it: no decode
                        self._abort_on(slot[1], seq_id)
                        slot[1] = None
                        out = self._fix(result["output"], request, index, metrics, first_leg=not sent)
                        outcome = "finished"
                        yield out
                        return
                    # transferring
                    t2 = time.monotonic()
                    report = await self._call(slot[1], slot[1].handle.start_decode.remote(seq_id, result["kv"]),
                                              cfg.transfer_timeout_s + 5)
                    del result  # our reference to the payload: the object store may free it now
                    if report["state"] != "done":
                        raise _Retry(f"transfer_{report['cause']}")
                    m.stage.labels("transfer").observe(time.monotonic() - t2)
                    m.transfer_bytes.inc(report["nbytes"])
                    m.transfer_seconds.observe(report["seconds"])
                    # decoding
                    t3 = time.monotonic()
                    while True:
                        out = await self._call(slot[1], slot[1].handle.poll.remote(seq_id, cfg.poll_wait_s),
                                               cfg.poll_wait_s + cfg.stall_timeout_s)
                        if out is None:
                            continue
                        out = self._fix(out, request, index, metrics, first_leg=not sent)
                        sent.extend(t for c in out.outputs for t in c.token_ids)
                        if out.finished:
                            m.stage.labels("decode").observe(time.monotonic() - t3)
                            outcome = "finished"
                            slot[1] = None
                            yield out
                            return
                        yield out
                except _Retry as e:
                    self._abort_on(slot[1], seq_id)
                    prefill_failures += 1
                    if prefill_failures > cfg.max_prefill_retries:
                        m.failures.labels("retries_exhausted").inc()
                        outcome = "failed"
                        raise EngineError(f"{seq_id}: the KV hand-off failed {prefill_failures} times ({e.cause})")
                    m.retries.labels(e.cause).inc()
                except WorkerLost as e:
                    if e.worker.role == "prefill":  # _prefill already retried elsewhere; nothing left
                        outcome = "failed"
                        raise EngineError(str(e)) from None
                    self._mark_down(e.worker, str(e))
                    self._abort_on(e.worker, seq_id)
                    resumes += 1
                    if resumes > cfg.max_resumes:
                        m.failures.labels("resumes_exhausted").inc()
                        outcome = "failed"
                        raise EngineError(f"{seq_id}: decode failed {resumes} times; last: {e}") from None
                    m.retries.labels("decode_lost").inc()
                    log.warning("%s: %s; resuming after %d tokens", seq_id, e, len(sent))
        except (EngineError, ValueError):
            outcome = "failed"
            raise
        finally:
            if outcome != "finished":
                for w in slot:
                    self._abort_on(w, seq_id)
            m.requests.labels(outcome).inc()
            log.debug("%s %s in %.3f s (%d tokens, %d resumes)", seq_id, outcome, time.monotonic() - arrival,
                      len(sent), resumes)

    def _fix(self, out: RequestOutput, request: GenerateRequest, index: int, metrics: RequestMetrics,
             first_leg: bool) -> RequestOutput:
        """A worker's delta as the client's: the user's request id, prompt, completion index and timings."""
        now = time.time()
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        if out.finished:
            metrics.finished_time = now
        for c in out.outputs:
            c.index = index
        return RequestOutput(request.request_id, request.prompt_token_ids, out.outputs, finished=out.finished,
                             prompt=request.prompt, prompt_logprobs=out.prompt_logprobs if first_leg else None,
                             metrics=dataclasses.replace(metrics))

    async def _reserve_decode(self, seq_id: str, num_tokens: int) -> Worker:
        if not self._healthy("prefill"):
            self.metrics.failures.labels("no_prefill_worker").inc()
            raise EngineError("no prefill worker is in rotation")
        candidates = self._healthy("decode")
        if not candidates:
            self.metrics.failures.labels("no_decode_worker").inc()
            raise EngineError("no decode worker is in rotation")
        refused = False
        for load in self.policy.decode_order(w.load for w in candidates):
            w = next(c for c in candidates if c.name == load.name)
            try:
                ok = await self._call(w, w.handle.reserve.remote(seq_id, num_tokens), self.config.reserve_timeout_s)
            except WorkerLost as e:
                self._mark_down(w, str(e))
                continue
            if ok:
                w.load.num_running += 1  # until the next health probe replaces the estimate
                return w
            refused = True
        if refused:
            self.metrics.failures.labels("decode_full").inc()
            raise EngineOverloaded("every decode worker's KV cache is reserved")
        self.metrics.failures.labels("no_decode_worker").inc()
        raise EngineError("no decode worker answered")

    async def _prefill(self, seq_id: str, prompt: list[int], params: SamplingParams,
                       slot: list[Worker | None]) -> dict[str, Any]:
        """Run the prompt on the best prefill worker; another one if it is lost (up to max_prefill_retries)."""
        hashes = self.policy.affinity.hashes(prompt)
        tried: set[str] = set()
        while True:
            pick = self.policy.pick_prefill(hashes, (w.load for w in self._healthy("prefill", tried)))
            if pick is None:
                cause = "retries_exhausted" if tried else "no_prefill_worker"
                self.metrics.failures.labels(cause).inc()
                raise EngineError(f"no prefill worker left for {seq_id}" + (f" (lost: {', '.join(sorted(tried))})"
                                                                            if tried else ""))
            w = next(x for x in self.workers["prefill"] if x.name == pick.name)
            slot[0] = w
            w.load.queued_prompt_tokens += len(prompt)
            try:
                result = await self._call(w, w.handle.prefill.remote(seq_id, prompt, params),
                                          self.config.prefill_timeout_s)
            except WorkerLost as e:
                self._mark_down(w, str(e))
                self._abort_on(w, seq_id)
                tried.add(w.name)
                if len(tried) > self.config.max_prefill_retries:
                    self.metrics.failures.labels("retries_exhausted").inc()
                    raise EngineError(f"{seq_id}: prefill failed on {', '.join(sorted(tried))}") from None
                self.metrics.retries.labels("prefill_lost").inc()
                continue
            finally:
                w.load.queued_prompt_tokens = max(0, w.load.queued_prompt_tokens - len(prompt))
            slot[0] = None  # exported or finished: nothing left on the prefill side
            if result.get("aborted"):
                raise WorkerLost(w, "the prefill worker aborted the request")
            self.policy.affinity.record(hashes, w.name)
            return result

    async def _call(self, w: Worker, ref: Any, timeout: float) -> Any:
        """Await one actor call; lost worker / timeout → ``WorkerLost``; the worker's request errors re-raised."""
        import ray.exceptions as rex

        try:
            return await asyncio.wait_for(ref, timeout)
        except asyncio.TimeoutError:
            raise WorkerLost(w, f"no answer within {timeout:g} s") from None
        except rex.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            if isinstance(cause, ValueError):  # the engine rejected the request (a 400 for the client)
                raise cause from None
            raise WorkerLost(w, f"{type(cause).__name__}: {cause}") from None
        except rex.RayError as e:  # actor died / unavailable, object lost
            raise WorkerLost(w, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def _abort_on(self, w: Worker | None, *seq_ids: str) -> None:
        if w is None or w.handle is None:
            return
        for seq_id in seq_ids:
            try:
                w.handle.abort.remote(seq_id)
            except Exception:  # the worker is gone: it holds nothing any more
                log.debug("abort of %s on %s not delivered", seq_id, w.name)

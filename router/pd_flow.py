"""The PD ``EngineClient``: one request's lifecycle across a prefill and a decode worker.

States of a sequence, in order (the router is the single owner)::

    queued → prefilling (+ transferring) → decoding → finished | aborted | failed

* **queued**: pick a prefill worker (``Policy.pick_prefill``: least queued prompt
  tokens, prefix affinity; see below when none is in rotation), then a decode worker
  (``Policy.decode_order``: least KV in use + running) and *reserve* its capacity before
  the prefill starts (``reserve``: blocks for the rows to come, room up to prompt + max
  tokens), so decode never runs out of blocks for a sequence already prefilled; the
  reservation is used at once, well within the decode worker's lease. No decode worker in
  rotation → ``EngineError`` at once (HTTP 503); every reservation refused →
  ``EngineOverloaded`` (429).
* **prefilling**: call ``prefill`` on the prefill worker; at the same time the decode worker's
  ``start_decode(seq, source=<prefill worker>)`` pulls the latent rows as the prefill
  worker puts them out (``deploy.kv_transfer``: all at once, or layer by layer while
  it computes) and joins the sequence to its engine after the control message. When
  no prefill worker is in rotation the request waits for one to come back (Ray
  re-creates a dead worker) up to ``prefill_timeout_s``. A prefill worker that dies or
  does not answer leaves rotation and the attempt starts again on another one (or
  the re-created one), up to ``max_prefill_retries``; so does a failed transfer. If
  the first token ends the request, it is sent and the decode side is released.
* **decoding**: read the deltas from the decode worker's feed (``router.decode_feed``: one
  long ``poll`` per worker for all of its sequences) and stream them. The first delta repeats
  the first token, so the decode stream alone is the whole output. A decode worker
  that dies or stalls (no poll answer in ``poll_wait_s + stall_timeout_s``) leaves
  rotation; the sequence *resumes* on another pair with a ``Continuation`` (the
  tokens already streamed, beside the unchanged ``SamplingParams``), up to
  ``max_resumes``; then one clean ``EngineError``. A worker that freed the sequence
  because its lease ran out (``LeaseExpired``: not polled for ``lease_s``) stays in rotation;
  the sequence resumes the same way. A resume or a retry waits (up to
  ``prefill_timeout_s``) for a decode worker when none is in rotation — e.g. while the
  only decode instance, a multi-rank one that lost a rank, is being re-created. Greedy and seeded-sampled output
  is unchanged by a resume (seeded sampling depends on seed, index and position only).
* Every exit (finished, client gone → ``abort``/``aclose``, error) sends ``abort`` to
  the workers that may still hold the sequence (blocks, reservation, outbox) and is
  counted in ``RouterMetrics``. Each retry or resume is a new *leg* with an id of its own
  on the workers (``<seq>@<attempt>``), so rows or an abort of an earlier leg still in
  flight never meet it. ``abort(request_id)`` (gRPC ``Abort``, a client gone) ends the
  request's sequences where they are and their streams end, as on one engine: what fails
  after it (the workers no longer hold them) is not taken for a lost worker, and nothing is
  retried or resumed.

``n > 1`` fans out here: n sequences ``<id>#i``, each continuing completion index i
(so its seed is ``sequence_seed(seed, i)``, as one engine would use), merged into one
stream. The context length is the smallest of the pools' (``max_model_len``); the
API layer validates requests against it once. Workers and their health:
``router.workers``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator

from deploy.contract import NAMESPACE, PrefillResult, TransferReport
from engine.outputs import (Admission, EngineError, EngineOverloaded, EngineStats, GenerateRequest, RequestMetrics,
                            RequestOutput)
from engine.sampling_params import Continuation, SamplingParams, max_new_tokens
from router.decode_feed import DecodeFeeds
from router.experts import EPLBConfig, ExpertBalancer
from router.metrics import RouterMetrics
from router.policy import Policy, PrefixAffinity
from router.workers import Worker, WorkerLost, WorkerRegistry

log = logging.getLogger("pdserve.router")


@dataclasses.dataclass
class RouterConfig:
    poll_wait_s: float = 0.25  # a decode poll returns at the latest after this without news
    prefill_timeout_s: float = 120.0  # the prefill call, queueing on the worker included
    reserve_timeout_s: float = 5.0
    transfer_timeout_s: float = 30.0  # no KV news for this long fails a hand-off
    stall_timeout_s: float = 10.0  # a decode poll unanswered for poll_wait_s + this = worker lost
    health_interval_s: float = 1.0
    health_timeout_s: float = 3.0
    max_prefill_retries: int = 2
    max_resumes: int = 2
    affinity_slack_tokens: int = 2048
    affinity_entries: int = 100_000
    eplb: dict[str, Any] = dataclasses.field(default_factory=dict)  # router.experts.EPLBConfig fields
    max_in_flight: int = 0  # sequences admitted at once (0: the decode workers' admission limits summed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class _Leg:
    """One attempt of a sequence on the workers: its id there — fresh for every retry or resume, so
    nothing an earlier attempt left in flight (rows in an outbox, an abort on its way) is taken for
    this one's — and the workers that may hold it."""

    id: str
    prefill: Worker | None = None
    decode: Worker | None = None
    decode_handle: Any = None  # the decode actor as reserved on: the health loop may drop ``decode.handle``

    def abort(self, registry: WorkerRegistry) -> None:
        for w in (self.prefill, self.decode):
            registry.abort_on(w, self.id)


class _Retry(Exception):
    """This attempt failed before decoding started; reserve and prefill again."""

    def __init__(self, cause: str, lost: Worker | None = None):
        super().__init__(cause)
        self.cause = cause
        self.lost = lost


class PDClient:
    """``EngineClient`` over Ray worker pools; ``await start()`` before use, ``await shutdown()`` after."""

    def __init__(self, prefill: list[str], decode: list[str], config: RouterConfig | None = None,
                 namespace: str = NAMESPACE):
        self.config = config or RouterConfig()
        self.registry = WorkerRegistry({"prefill": prefill, "decode": decode}, namespace,
                                       self.config.health_interval_s, self.config.health_timeout_s)
        self.workers = self.registry.workers
        self.metrics = RouterMetrics(self.registry.pool_health)
        self.experts = ExpertBalancer(self.registry, EPLBConfig.from_dict(self.config.eplb))
        self.policy: Policy | None = None
        self.model_name = ""
        self.max_model_len = 0
        self.pool_max_model_len: dict[str, int] = {}
        self.eos_token_ids: list[int] = []
        self._active: dict[str, dict[str, _Leg]] = {}  # user rid -> seq rid -> its current leg
        self._aborted: set[str] = set()  # user rids aborted while in flight: what fails next is the abort
        self.feeds = DecodeFeeds(self.registry, self.config.poll_wait_s, self.config.stall_timeout_s)
        self.admission = Admission()  # its limit is learnt in start()

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the workers, learn each pool's facts, start the health loop."""
        await self.registry.refresh()
        infos = {role: await self.registry.pool_info(role) for role in ("prefill", "decode")}
        missing = [role for role, found in infos.items() if not found]
        if missing:
            raise EngineError(f"no {' or '.join(missing)} worker answered; start the pools first (pdserve up)")
        for role, found in infos.items():
            lengths = {i.max_model_len for i in found}
            if len(lengths) > 1:
                log.warning("%s workers disagree on max_model_len %s; using the smallest", role, sorted(lengths))
            self.pool_max_model_len[role] = min(lengths)
        info = infos["decode"][0]
        self.model_name, self.eos_token_ids = info.model_name, info.eos_token_ids
        self.max_model_len = min(self.pool_max_model_len.values())
        self.admission.limit = self.config.max_in_flight or sum(i.admission_limit for i in infos["decode"])
        block_size = infos["prefill"][0].block_size
        self.policy = Policy(PrefixAffinity(block_size, self.config.affinity_entries),
                             self.config.affinity_slack_tokens)
        self.registry.on_restart = lambda w: self.policy.affinity.forget(w.name)
        self.registry.on_load = self.experts.observe
        self.registry.start()
        self.experts.start()

    async def shutdown(self) -> None:
        await self.experts.stop()
        await self.registry.stop()
        await self.feeds.close()
        for seqs in list(self._active.values()):
            for leg in seqs.values():
                leg.abort(self.registry)

    # ---- EngineClient ----------------------------------------------------------------
    async def health(self) -> bool:
        return bool(self.registry.healthy("prefill")) and bool(self.registry.healthy("decode"))

    def stats(self) -> EngineStats:
        s = EngineStats()
        for w in (w for w in self.registry.all() if w.healthy):
            s.num_running += w.load.num_running
            s.num_waiting += w.load.num_waiting
            s.kv_blocks_total += w.load.kv_blocks_total
            s.kv_blocks_used += w.load.kv_blocks_used
            s.kv_blocks_reserved += w.load.kv_blocks_reserved
            s.prefix_cache_queries += w.load.prefix_cache_queries
            s.prefix_cache_hits += w.load.prefix_cache_hits
            s.num_preemptions += w.load.num_preemptions
        return s

    async def abort(self, request_id: str) -> None:
        """End the request: its sequences stop where they are (no retry, no resume) and their streams end,
        as a request aborted on one engine does."""
        legs = self._active.get(request_id)
        if legs is None:
            return
        self._aborted.add(request_id)
        for leg in list(legs.values()):
            leg.abort(self.registry)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Admission as on one engine (``Admission``): past its limit of sequences in flight a request is answered
        ``EngineOverloaded`` (429 with Retry-After) at once, so an admitted one's wait stays bounded."""
        if self.policy is None:
            raise EngineError("the router is not started")
        sp = request.sampling_params
        try:
            slot = self.admission.admit(sp.n)
        except EngineOverloaded:
            self.metrics.failures.labels("overloaded").inc()
            raise
        self._active[request.request_id] = {}
        try:
            outputs = (self._sequence(request, request.request_id, sp, 0) if sp.n == 1 else self._fan_out(request))
            async for out in outputs:
                if out.finished:
                    slot.release()
                yield out
        finally:
            slot.release()
            self._active.pop(request.request_id, None)
            self._aborted.discard(request.request_id)

    async def _fan_out(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """n sequences of one request, merged; the delta that ends the last one has ``finished``."""
        sp = request.sampling_params
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                done = False
                async for out in self._sequence(request, f"{request.request_id}#{i}", sp.clone(n=1), i):
                    done = out.finished
                    await q.put(out)
                if not done:
                    await q.put(None)  # it ended unfinished: the request was aborted
            except BaseException as e:
                await q.put(e)

        tasks = [asyncio.ensure_future(pump(i)) for i in range(sp.n)]
        finished = 0
        try:
            while finished < sp.n:
                item = await q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished += item.finished
                item.finished = finished == sp.n
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- one sequence --------------------------------------------------------------------
    async def _sequence(self, request: GenerateRequest, seq_id: str, params: SamplingParams,
                        index: int) -> AsyncIterator[RequestOutput]:
        cfg, m = self.config, self.metrics
        prompt = request.prompt_token_ids
        metrics = RequestMetrics(arrival_time=time.time())
        arrival = time.monotonic()
        sent: list[int] = []
        cumulative = 0.0
        leg = _Leg(seq_id)
        self._active[request.request_id][seq_id] = leg
        tried: set[tuple[str, float]] = set()  # prefill incarnations that failed this sequence
        failures = resumes = 0
        outcome = "aborted"
        try:
            while request.request_id not in self._aborted:
                cont = Continuation(index, tuple(sent), cumulative)
                attempt = failures + resumes
                leg.id = f"{seq_id}@{attempt}" if attempt else seq_id
                try:
                    result = await self._prefill_and_transfer(leg, prompt, params, cont, tried,
                                                              patient=bool(sent or failures or resumes))
                    metrics.scheduled_time = metrics.scheduled_time or time.time()
                    if not sent:  # the user's prompt on its first prefill (a resume re-reads its own rows)
                        metrics.num_cached_tokens = max(metrics.num_cached_tokens, result.num_cached_tokens)
                    if result.output is not None:  # the first token ended it: no decode
                        out = self._fix(result.output, request, index, metrics, first_leg=not sent)
                        outcome = "finished"
                        yield out
                        return
                    # decoding
                    t3 = time.monotonic()
                    handle = leg.decode_handle
                    feed = self.feeds.subscribe(leg.decode, handle, leg.id)
                    try:
                        while True:
                            out = self._fix(await feed.next(), request, index, metrics, first_leg=not sent)
                            for c in out.outputs:
                                sent.extend(c.token_ids)
                                cumulative = c.cumulative_logprob if c.cumulative_logprob is not None else cumulative
                            if out.finished:
                                m.stage.labels("decode").observe(time.monotonic() - t3)
                                outcome = "finished"
                                leg.decode = None
                                yield out
                                return
                            yield out
                    finally:
                        self.feeds.unsubscribe(handle, leg.id)
                except _Retry as e:
                    if request.request_id in self._aborted:  # the abort made it fail: not the worker
                        return
                    leg.abort(self.registry)
                    leg.prefill = leg.decode = None
                    if e.lost is not None:
                        self.registry.mark_down(e.lost, e.cause)
                        tried.add(e.lost.incarnation)
                    failures += 1
                    if failures > cfg.max_prefill_retries:
                        m.failures.labels("retries_exhausted").inc()
                        outcome = "failed"
                        raise EngineError(f"{seq_id}: prefill and KV hand-off failed {failures} times "
                                          f"(last: {e.cause})") from None
                    m.retries.labels(e.cause).inc()
                    log.warning("%s: %s; trying again (%d/%d)", seq_id, e, failures, cfg.max_prefill_retries)
                except WorkerLost as e:  # the decode worker, while decoding (or its lease on the sequence ran out)
                    if request.request_id in self._aborted:  # the abort made it fail: not the worker
                        return
                    if not e.lease_expired:
                        self.registry.mark_down(e.worker, str(e))
                    self.registry.abort_on(e.worker, leg.id)
                    leg.decode = None
                    resumes += 1
                    if resumes > cfg.max_resumes:
                        m.failures.labels("resumes_exhausted").inc()
                        outcome = "failed"
                        raise EngineError(f"{seq_id}: decode failed {resumes} times; last: {e}") from None
                    m.retries.labels("lease_expired" if e.lease_expired else "decode_lost").inc()
                    log.warning("%s: %s; resuming after %d tokens", seq_id, e, len(sent))
        except (EngineError, ValueError):
            outcome = "failed"
            raise
        finally:
            if outcome != "finished":
                leg.abort(self.registry)
            m.requests.labels(outcome).inc()
            log.debug("%s %s in %.3f s (%d tokens, %d resumes)", seq_id, outcome, time.monotonic() - arrival,
                      len(sent), resumes)

    async def _prefill_and_transfer(self, leg: _Leg, prompt: list[int], params: SamplingParams,
                                    cont: Continuation, tried: set[tuple[str, float]], patient: bool) -> PrefillResult:
        """queued → prefilling (+ the decode worker pulling the rows) → running on the decode worker.

        Returns the prefill's result: ``output`` set when the first token ended the sequence.
        Raises ``_Retry`` when this attempt failed in a way another attempt can fix. ``patient``
        (a retry or a resume: the sequence is under way) waits for a decode worker to come back."""
        cfg, m = self.config, self.metrics
        kv_tokens = len(prompt) + len(cont.output_token_ids)
        total = len(prompt) + max_new_tokens(params.max_tokens, len(prompt), self.max_model_len)
        t0 = time.monotonic()
        wait_s = cfg.prefill_timeout_s if patient else 0.0
        # the prefill worker first (it may take a wait): the reservation is then used at once, well
        # within the decode worker's lease
        seq_id = leg.id
        prefill = await self._pick_prefill(seq_id, prompt + list(cont.output_token_ids), tried)
        handle = prefill.handle  # the registry may drop it while we reserve; a dead one fails the call below
        decode, leg.decode_handle = await self._reserve_decode(seq_id, kv_tokens, total, wait_s)
        leg.decode = decode
        leg.prefill = prefill
        m.stage.labels("queue").observe(time.monotonic() - t0)
        t1 = time.monotonic()
        prefill.load.queued_prompt_tokens += kv_tokens
        pulling = asyncio.ensure_future(self.registry.call(
            decode, leg.decode_handle.start_decode.remote(seq_id, prefill.name),
            cfg.prefill_timeout_s + cfg.transfer_timeout_s + 5))
        try:
            try:
                result: PrefillResult = await self.registry.call(
                    prefill, handle.prefill.remote(seq_id, prompt, params, cont), cfg.prefill_timeout_s)
            except WorkerLost as e:
                raise _Retry("prefill_lost", lost=e.worker) from None
            finally:
                prefill.load.queued_prompt_tokens = max(0, prefill.load.queued_prompt_tokens - kv_tokens)
            if result.aborted:
                raise _Retry("prefill_aborted", lost=prefill)
            self.policy.affinity.record(self.policy.affinity.hashes(prompt), prefill.name)
            m.stage.labels("prefill").observe(time.monotonic() - t1)
            if not result.handed_off:  # finished by its first token: release the decode side
                self.registry.abort_on(decode, seq_id)
                leg.prefill = leg.decode = None
                return result
            try:  # until the decode side took the rows, the prefill side's outbox holds them (a retry drops them)
                report: TransferReport = await pulling
            except WorkerLost as e:
                raise _Retry("decode_lost", lost=e.worker) from None
            if report.state != "done":
                log.warning("%s: KV hand-off %s -> %s failed: %s", seq_id, prefill.name, decode.name, report.message)
                # "lost": the prefill worker's pull_kv failed (it died): out of rotation, like a lost prefill;
                # "sink": the decode worker's own engine failed while loading the rows: that one goes out
                lost = {"lost": prefill, "sink": decode}.get(report.cause or "")
                raise _Retry(f"transfer_{report.cause}", lost=lost)
            leg.prefill = None  # the prefill side holds nothing once its control message is out
            m.stage.labels("handoff").observe(max(report.done_at - result.finished_at, 0.0))
            m.transfer_bytes.inc(report.nbytes)
            m.transfer_seconds.observe(report.seconds)
            return result
        finally:
            if not pulling.done():
                pulling.cancel()
            await asyncio.gather(pulling, return_exceptions=True)

    def _fix(self, out: RequestOutput, request: GenerateRequest, index: int, metrics: RequestMetrics,
             first_leg: bool) -> RequestOutput:
        """A worker's delta as the client's: the user's request id, prompt, completion index and timings."""
        now = time.time()
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        if out.finished:
            metrics.finished_time = now
        if out.metrics is not None:
            metrics.num_cached_tokens = max(metrics.num_cached_tokens, out.metrics.num_cached_tokens)
        for c in out.outputs:
            c.index = index
        return RequestOutput(request.request_id, request.prompt_token_ids, out.outputs, finished=out.finished,
                             prompt=request.prompt, prompt_logprobs=out.prompt_logprobs if first_leg else None,
                             metrics=dataclasses.replace(metrics))

    async def _reserve_decode(self, seq_id: str, num_kv_tokens: int, num_total_tokens: int,
                              wait_s: float = 0.0) -> tuple[Worker, Any]:
        """The decode worker that took the reservation, and the actor handle it took it on; waits up to
        ``wait_s`` for one in rotation (and answering)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            candidates = await self.registry.wait_for("decode", set(), max(deadline - loop.time(), 0.0))
            if not candidates:
                self.metrics.failures.labels("no_decode_worker").inc()
                raise EngineError("no decode worker is in rotation")
            refused = False
            for load in self.policy.decode_order(w.load for w in candidates):
                w = next(c for c in candidates if c.name == load.name)
                # counted before the call, so a burst of requests spreads over the DP ranks instead of all
                # ranking on the same stale load; the next health probe replaces the estimate
                w.load.num_running += 1
                handle = w.handle  # kept: a dead one fails its calls, a slow health probe must not fail ours
                try:
                    ok = await self.registry.call(w, handle.reserve.remote(seq_id, num_kv_tokens, num_total_tokens),
                                                  self.config.reserve_timeout_s)
                except WorkerLost as e:
                    w.load.num_running -= 1
                    self.registry.mark_down(w, str(e))
                    continue
                except asyncio.CancelledError:  # the client left: the reservation may have been taken
                    w.load.num_running -= 1
                    self.registry.abort_on(w, seq_id)
                    raise
                if ok:
                    return w, handle
                w.load.num_running -= 1
                refused = True
            if refused:
                self.metrics.failures.labels("decode_full").inc()
                raise EngineOverloaded("every decode worker's KV cache is reserved")
            if loop.time() >= deadline:
                self.metrics.failures.labels("no_decode_worker").inc()
                raise EngineError("no decode worker answered")

    async def _pick_prefill(self, seq_id: str, tokens: list[int], tried: set[tuple[str, float]]) -> Worker:
        """The policy's prefill worker; when none is in rotation (but the ones that failed this
        sequence), wait for one to come back, up to the prefill timeout."""
        candidates = await self.registry.wait_for("prefill", tried, self.config.prefill_timeout_s)
        if not candidates:
            cause = "retries_exhausted" if tried else "no_prefill_worker"
            self.metrics.failures.labels(cause).inc()
            raise EngineError(f"no prefill worker came into rotation within {self.config.prefill_timeout_s:g} s "
                              f"for {seq_id}")
        pick = self.policy.pick_prefill(self.policy.affinity.hashes(tokens), (w.load for w in candidates))
        return next(w for w in candidates if w.name == pick.name)

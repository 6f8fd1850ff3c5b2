"""The cheapest prefill/decode layout that meets the SLOs for a load.

Candidates per phase: instances of 1-16 nodes (or fewer GPUs than a node), attention
TP 1 or more (the rest data-parallel), EP over every GPU of the instance or none,
redundant experts (the fewest that make the slots divide, and one more per GPU), dual-batch
overlap on or off, and for prefill a step budget per replica. For each:

* decode: the largest batch per replica that meets the per-user speed and fits the KV
  memory; the concurrency the load needs (Little's law: rate x E[output] / speed) over
  that batch gives the replicas, hence the instances;
* prefill: the busiest utilisation at which the p99 TTFT stays under the SLO
  (TTFT p99 = the step in progress + the steps of a p99-long prompt + queueing, an M/D/1
  tail, + the KV hand-off over the NIC + the first decode step), hence the instances.

Prefill and decode are priced independently (GPU-hours x price) and the cheapest of each
is the plan; ties go to the layout with more throughput per GPU.
"""

from __future__ import annotations

import dataclasses
import math

from planner.hardware import Device
from planner.model_shape import BYTES, ModelShape
from planner.simulator import Features, Parallel, Simulator, StepResult
from planner.workload import Load

PREFILL_BUDGETS = (2048, 4096, 8192, 16384, 32768)  # new tokens per replica per step


class PlanError(ValueError):
    """No candidate meets the SLOs; the message says what the best one reaches."""


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_p99_s: float
    user_tok_s: float


@dataclasses.dataclass(frozen=True)
class Options:
    mtp_drafts: int = 1  # 0 if the model has no MTP layer
    mtp_acceptance: float = 0.85
    fp8: bool = True
    kv_dtype: str | None = None
    eplb: bool = True
    popularity_cv: float = 1.0
    skew: float | None = None  # measured max/mean per EP rank, overrides the popularity model
    max_nodes: int = 16
    reserve_gb: float = 8.0
    price_per_hour: float | None = None  # None = the device table's


@dataclasses.dataclass
class Candidate:
    phase: str
    parallel: Parallel
    dbo: bool
    per_replica: float  # prefill step tokens / decode sequences per replica
    step: StepResult
    instances: int
    utilisation: float  # load / capacity of the instances chosen
    features: Features = dataclasses.field(default_factory=Features)
    ttft_p99_s: float = 0.0  # prefill only
    kv_capacity_tokens: float = 0.0

    @property
    def gpus(self) -> int:
        return self.instances * self.parallel.gpus

    @property
    def capacity_per_gpu(self) -> float:
        """Tokens/s per GPU at full load (prefill: computed input tokens; decode: output tokens)."""
        return self.step.tokens_per_gpu_s

    def label(self) -> str:
        p = self.parallel
        return (f"{p.gpus} GPUs tp{p.tp} dp{p.dp} ep{p.ep} +{p.redundant} dbo={'on' if self.dbo else 'off'} "
                f"{'tok' if self.phase == 'prefill' else 'seq'}/replica={self.per_replica:,.0f}")


@dataclasses.dataclass
class Plan:
    prefill: Candidate
    decode: Candidate
    prefill_candidates: list[Candidate]
    decode_candidates: list[Candidate]
    load: Load
    slo: SLO
    device: Device
    price_per_hour: float
    mtp_drafts: int

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    @property
    def cost_per_hour(self) -> float:
        return self.gpus * self.price_per_hour

    def cost_per_million(self, tokens_per_s: float) -> float:
        return self.cost_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else math.inf


# ---- layouts ---------------------------------------------------------------------------------
def layouts(shape: ModelShape, device: Device, max_nodes: int) -> list[tuple[Parallel, bool]]:
    """(parallel, dbo) candidates for one instance (this machine's CPU: one rank, as pdserve runs today)."""
    if device.name == "cpu":
        return [(Parallel(), False)]
    per_node = device.gpus_per_node
    sizes = [g for g in (1, 2, 4) if g < per_node] + [per_node * n for n in range(1, max_nodes + 1)
                                                      if n in (1, 2, 3, 4, 6, 8, 9, 12, 16, 18) or n == max_nodes]
    out = []
    for gpus in sorted(set(sizes)):
        for tp in (1, 2, 4, 8):
            if gpus % tp or shape.heads % tp or tp > per_node:
                continue
            dp = gpus // tp
            eps = [gpus] if gpus > 1 and shape.experts else []
            if gpus <= per_node or not shape.experts:
                eps.append(1)
            for ep in eps:
                for redundant in _redundant_choices(shape.experts, ep):
                    for dbo in ((True, False) if ep > 1 else (False,)):
                        out.append((Parallel(tp=tp, dp=dp, ep=ep, redundant=redundant), dbo))
    return out


def _redundant_choices(experts: int, ep: int) -> list[int]:
    if ep <= 1 or not experts:
        return [0]
    base = (-experts) % ep
    return sorted({r for r in (base, base + ep) if r <= max(experts // 2, base)})


# ---- prefill TTFT ----------------------------------------------------------------------------
def ttft_p99(step_s: float, budget: float, load: Load, utilisation: float, transfer_s: float,
             decode_step_s: float) -> float:
    """p99 time to first token of a prefill instance at ``utilisation`` of its capacity.

    The step in progress (up to one step), the steps a p99-long prompt's new tokens need at
    ``budget`` tokens per step, an M/D/1 queueing tail (mean rho*D/(2(1-rho)); P(W > t) ~
    rho*exp(-t*rho/mean)), the KV hand-off and the first decode step.
    """
    if utilisation >= 1:
        return math.inf
    steps = math.ceil(load.input.quantile(0.99) * (1 - load.cache_hit) / budget)
    mean_wait = utilisation * step_s / (2 * (1 - utilisation))
    wait = (mean_wait / utilisation) * math.log(100 * utilisation) if utilisation > 0.01 else 0.0
    return step_s + steps * step_s + max(wait, 0.0) + transfer_s + decode_step_s


def max_utilisation(step_s: float, budget: float, load: Load, slo_s: float, transfer_s: float,
                    decode_step_s: float) -> float:
    """Highest utilisation (0-0.99) meeting the TTFT SLO; 0 if none."""
    if ttft_p99(step_s, budget, load, 0.0, transfer_s, decode_step_s) > slo_s:
        return 0.0
    lo, hi = 0.0, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ttft_p99(step_s, budget, load, mid, transfer_s, decode_step_s) <= slo_s else (lo, mid)
    return lo


def kv_transfer_s(shape: ModelShape, device: Device, load: Load, kv_dtype: str, with_mtp: bool) -> float:
    """The p99 prompt's latent rows over one NIC (prefill -> decode)."""
    nbytes = load.input.quantile(0.99) * shape.kv_bytes_per_token(kv_dtype, with_mtp)
    return nbytes / (device.scale_out_gbps * 1e9 * device.efficiency.scale_out)


# ---- search ----------------------------------------------------------------------------------
def plan(shape: ModelShape, device: Device, load: Load, slo: SLO, opts: Options = Options()) -> Plan:
    if load.request_rate <= 0:
        raise PlanError("the load needs a request rate > 0 (requests/s)")
    price = opts.price_per_hour if opts.price_per_hour is not None else device.price_per_hour
    drafts = opts.mtp_drafts if shape.n_mtp_layers else 0
    decode_cands = _decode_candidates(shape, device, load, slo, opts, drafts)
    if not decode_cands:
        raise PlanError(_decode_failure(shape, device, load, slo, opts, drafts))
    decode = min(decode_cands, key=lambda c: (c.gpus * price, -c.capacity_per_gpu))
    prefill_cands = _prefill_candidates(shape, device, load, slo, opts, drafts, decode.step.time_s)
    if not prefill_cands:
        raise PlanError(_prefill_failure(shape, device, load, slo, opts, drafts, decode.step.time_s))
    prefill = min(prefill_cands, key=lambda c: (c.gpus * price, -c.capacity_per_gpu))
    return Plan(prefill, decode, prefill_cands, decode_cands, load, slo, device, price, drafts)


def _features(opts: Options, dbo: bool, drafts: int) -> Features:
    return Features(dbo=dbo, fp8=opts.fp8, kv_dtype=opts.kv_dtype, mtp_drafts=drafts,
                    mtp_acceptance=opts.mtp_acceptance, eplb=opts.eplb, popularity_cv=opts.popularity_cv,
                    skew=opts.skew)


def _fits(sim: Simulator, opts: Options) -> bool:
    return sim.weight_bytes_per_gpu() + opts.reserve_gb * 1e9 < sim.device.memory_gb * 1e9


def _decode_candidates(shape, device, load, slo, opts, drafts) -> list[Candidate]:
    out = []
    for par, dbo in layouts(shape, device, opts.max_nodes):
        sim = Simulator(shape, device, par, _features(opts, dbo, drafts))
        if not _fits(sim, opts):
            continue
        capacity = sim.kv_capacity_tokens(opts.reserve_gb)
        cap = int(capacity / load.decode_kv_mean)
        batch = sim.max_decode_batch(load, slo.user_tok_s, cap)
        if batch < 1:
            continue
        step = sim.decode_step(batch, load)
        concurrency = load.request_rate * load.output.mean / step.user_tok_s
        instances = max(1, math.ceil(concurrency / batch / par.dp))
        out.append(Candidate("decode", par, dbo, batch, step, instances,
                             concurrency / (instances * par.dp * batch), sim.feat, kv_capacity_tokens=capacity))
    return out


def _prefill_candidates(shape, device, load, slo, opts, drafts, decode_step_s) -> list[Candidate]:
    kv = opts.kv_dtype or device.compute_dtype
    transfer = kv_transfer_s(shape, device, load, kv, drafts > 0)
    act = BYTES[device.compute_dtype]
    out = []
    for par, dbo in layouts(shape, device, opts.max_nodes):
        sim = Simulator(shape, device, par, _features(opts, dbo, drafts))
        if not _fits(sim, opts):
            continue
        free = device.memory_gb * 1e9 - sim.weight_bytes_per_gpu() - opts.reserve_gb * 1e9
        for budget in PREFILL_BUDGETS:
            # the step's activations (~16 hidden-sized rows per token) and its KV must fit
            per_token = 16 * shape.cfg.hidden_size * act + shape.kv_bytes_per_token(kv, drafts > 0) / (1 - load.cache_hit)
            if budget / par.tp * per_token > free:
                continue
            step = sim.prefill_step(budget, load)
            rho = max_utilisation(step.time_s, budget, load, slo.ttft_p99_s, transfer, decode_step_s)
            if rho <= 0:
                continue
            capacity = step.tokens_per_gpu_s * par.gpus  # new tokens/s per instance
            new_rate = load.request_rate * load.new_tokens_per_request
            instances = max(1, math.ceil(new_rate / (capacity * rho)))
            util = new_rate / (capacity * instances)
            out.append(Candidate("prefill", par, dbo, budget, step, instances, util, sim.feat,
                                 ttft_p99(step.time_s, budget, load, util, transfer, decode_step_s)))
    return out


def decode_curve(shape: ModelShape, device: Device, cand: Candidate, load: Load,
                 points: int = 24) -> tuple[list[float], list[float]]:
    """(tokens/s per user, output tokens/s per GPU) of a decode candidate as its batch per replica grows."""
    sim = Simulator(shape, device, cand.parallel, dataclasses.replace(cand.features))
    top = max(int(cand.kv_capacity_tokens / load.decode_kv_mean), 1)
    batches = sorted({max(1, round(top ** (i / (points - 1)))) for i in range(points)})
    steps = [sim.decode_step(b, load) for b in batches]
    return [s.user_tok_s for s in steps], [s.tokens_per_gpu_s for s in steps]


def _decode_failure(shape, device, load, slo, opts, drafts) -> str:
    best = 0.0
    for par, dbo in layouts(shape, device, opts.max_nodes):
        sim = Simulator(shape, device, par, _features(opts, dbo, drafts))
        if _fits(sim, opts) and sim.kv_capacity_tokens(opts.reserve_gb) >= load.decode_kv_mean:
            best = max(best, sim.decode_step(1, load).user_tok_s)
    if best == 0:
        return (f"no decode instance of up to {opts.max_nodes} nodes of {device.name} holds the weights plus one "
                f"sequence of {load.decode_kv_mean:,.0f} tokens")
    return (f"no decode layout on {device.name} reaches {slo.user_tok_s:g} tok/s per user; the fastest reaches "
            f"{best:.1f} tok/s at batch 1")


def _prefill_failure(shape, device, load, slo, opts, drafts, decode_step_s) -> str:
    kv = opts.kv_dtype or device.compute_dtype
    transfer = kv_transfer_s(shape, device, load, kv, drafts > 0)
    best = math.inf
    for par, dbo in layouts(shape, device, opts.max_nodes):
        sim = Simulator(shape, device, par, _features(opts, dbo, drafts))
        if _fits(sim, opts):
            for budget in PREFILL_BUDGETS:
                step = sim.prefill_step(budget, load)
                best = min(best, ttft_p99(step.time_s, budget, load, 0.0, transfer, decode_step_s))
    if math.isinf(best):
        return f"no prefill instance of up to {opts.max_nodes} nodes of {device.name} holds the weights"
    return (f"no prefill layout on {device.name} meets TTFT p99 <= {slo.ttft_p99_s:g} s; the best reaches "
            f"{best:.2f} s even when idle (p99 prompt {load.input.quantile(0.99):,.0f} tokens)")

"""The simulator against the figures DeepSeek and SGLang published for their deployments.

Each ``Scenario`` is a published layout and load, written down from the source before
the simulator was run on it; nothing here is tuned to the published result.

* DeepSeek, "Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview"
  (github.com/deepseek-ai/open-infra-index, 202502OpenSourceWeek): H800; prefill unit
  EP32/DP32 on 4 nodes, decode unit EP144/DP144 on 18 nodes, 32 redundant experts each;
  FP8 matmuls and dispatch, BF16 MLA and combine, dual-batch overlap. Over 24 h: 608B
  input tokens (56.3% prefix-cache hits), 168B output tokens, 20-22 tok/s per user,
  average KV length per output token 4,989; ~73.7k input tok/s per node while prefilling
  (cache hits included), ~14.8k output tok/s per node while decoding. The operating
  batch comes from DeepSeek's profile-data README (16K tokens per GPU for prefill, "in
  line with" the online deployment); MTP acceptance 85% from the DeepSeek-V3 report.
  Lengths: the published totals fix E[input]/E[output] = 608/168 and the KV length per
  output token E[I] + E[O^2]/(2E[O]) = 4,989; with log-normal lengths of cv 1 (assumed;
  Mooncake's public trace has cv 0.85 over its first 94 requests) that is E[I] = 3,909
  and E[O] = 1,080.
* SGLang, "Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism
  on 96 H100 GPUs" (lmsys.org/blog/2025-05-05-large-scale-ep): 52.3k input / 22.3k output
  tok/s per node for 2,000-token inputs; prefill EP32 on 4 nodes with 16,384 tokens per
  GPU (two-batch overlap), decode EP72 on 9 nodes at 256 requests per GPU and KV length
  2,000, 32 redundant experts with EPLB, no MTP.
"""

from __future__ import annotations

import dataclasses

from planner.hardware import get_gpu
from planner.model_shape import DEEPSEEK_V3, ModelShape
from planner.simulator import Features, Parallel, Simulator, StepResult
from planner.workload import Lengths, Load

RESERVE_GB = 8.0  # per GPU beyond weights and KV: CUDA context, all_to_all buffers, graphs, activations (assumed)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    source: str
    gpu: str
    phase: str  # prefill | decode
    parallel: Parallel
    features: Features
    load: Load
    per_replica: float | None  # tokens (prefill) or sequences (decode) per replica; None = the SLO sets it
    user_tok_s_slo: float | None
    published: float  # per node: input tok/s incl. cache hits (prefill), output tok/s (decode)


def _day6_load() -> Load:
    ratio = 608 / 168  # input / output tokens over the day
    out = 4989 / (ratio + Lengths(1.0, 1.0).moment(2) / 2)  # E[I] + E[O^2]/(2E[O]) = 4,989 with cv 1
    return Load(Lengths(ratio * out, 1.0), Lengths(out, 1.0), cache_hit=0.563)


SCENARIOS = (
    Scenario("DeepSeek Day 6 prefill", "deepseek-ai/open-infra-index Day 6", "H800", "prefill",
             Parallel(tp=1, dp=32, ep=32, redundant=32), Features(mtp_drafts=1), _day6_load(), 16384, None, 73.7e3),
    Scenario("DeepSeek Day 6 decode", "deepseek-ai/open-infra-index Day 6", "H800", "decode",
             Parallel(tp=1, dp=144, ep=144, redundant=32), Features(mtp_drafts=1, mtp_acceptance=0.85),
             _day6_load(), None, 20.0, 14.8e3),
    Scenario("SGLang 96xH100 prefill", "lmsys.org/blog/2025-05-05-large-scale-ep", "H100", "prefill",
             Parallel(tp=1, dp=32, ep=32, redundant=32), Features(), Load(Lengths(2000, 0), Lengths(100, 0)),
             16384, None, 52.3e3),
    Scenario("SGLang 96xH100 decode", "lmsys.org/blog/2025-05-05-large-scale-ep", "H100", "decode",
             Parallel(tp=1, dp=72, ep=72, redundant=32), Features(), Load(Lengths(1950, 0), Lengths(100, 0)),
             256, None, 22.3e3),
)


@dataclasses.dataclass
class CheckRow:
    scenario: Scenario
    result: StepResult
    simulated: float  # per node, same unit as published

    @property
    def ratio(self) -> float:
        return self.simulated / self.scenario.published

    def dominant_terms(self, n: int = 3) -> list[tuple[str, float]]:
        """The largest terms of the step, as shares of the step time (serial sums, before overlap)."""
        terms = sorted(self.result.terms.items(), key=lambda kv: -kv[1])[:n]
        return [(name, seconds / self.result.time_s) for name, seconds in terms]


def run(scenario: Scenario) -> CheckRow:
    shape = ModelShape.load(DEEPSEEK_V3)
    device = get_gpu(scenario.gpu)
    sim = Simulator(shape, device, scenario.parallel, scenario.features)
    load = scenario.load
    if scenario.phase == "prefill":
        r = sim.prefill_step(scenario.per_replica or 16384, load)
        per_node = r.tokens_per_gpu_s / (1 - load.cache_hit) * device.gpus_per_node
    else:
        batch = scenario.per_replica
        if batch is None:
            cap = int(sim.kv_capacity_tokens(RESERVE_GB) / load.decode_kv_mean)
            batch = sim.max_decode_batch(load, scenario.user_tok_s_slo or 0.0, cap)
        r = sim.decode_step(batch, load)
        per_node = r.tokens_per_gpu_s * device.gpus_per_node
    return CheckRow(scenario, r, per_node)


def run_all() -> list[CheckRow]:
    return [run(s) for s in SCENARIOS]


def format_table(rows: list[CheckRow]) -> str:
    lines = [f"{'check':<26} {'published':>10} {'simulated':>10} {'ratio':>6}  batch/replica  step     "
             "largest terms (share of step, before overlap)"]
    for row in rows:
        r = row.result
        size = f"{r.per_replica:,.0f} tok" if r.phase == "prefill" else f"{r.per_replica:,.0f} seq"
        terms = ", ".join(f"{name} {share:.0%}" for name, share in row.dominant_terms())
        extra = f" ({r.user_tok_s:.1f} tok/s/user)" if r.phase == "decode" else ""
        lines.append(f"{row.scenario.name:<26} {row.scenario.published / 1e3:>9.1f}k {row.simulated / 1e3:>9.1f}k "
                     f"{row.ratio:>6.2f}  {size:>13}  {r.time_s * 1e3:>6.1f} ms  {terms}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run_all()))

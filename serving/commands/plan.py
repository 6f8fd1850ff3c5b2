"""``pdserve plan``: the cheapest prefill/decode layout for a model, a GPU type, SLOs and a load.

    pdserve plan [--model CONFIG_OR_DIR] --gpu H800|H100|H200|B200|cpu \\
                 --ttft-p99 S --user-tok-s N --rate REQ_PER_S --input-len MEAN[:CV] --output-len MEAN[:CV] \\
                 [--cache-hit F] [--mtp-drafts N] [--mtp-acceptance A] [--no-fp8] [--kv-cache-dtype fp8] \\
                 [--no-eplb] [--expert-cv CV | --skew MAX_OVER_MEAN] [--max-nodes N] [--gpu-hour-cost USD] \\
                 [--out pools.yaml] [--yaml-model PATH] [--plot plan.png] [--json plan.json]
    pdserve plan --check-published

It prints the chosen prefill and decode instance shapes and counts, EP degree, redundant
experts, batch sizes, throughput per GPU and cost per million tokens; ``--out`` writes the
pools YAML of ``pdserve up`` (validated by ``deploy.config.parse_config`` first); ``--plot``
draws throughput per GPU against per-user speed for the decode candidates.
``--check-published`` prints the simulator against DeepSeek's and SGLang's published
figures. Pure Python (the simulator in ``planner/``); ``--gpu cpu`` probes this machine.
Bad input, an unknown GPU, a missing config.json or SLOs no layout meets: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from serving.cli import CLIError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="size prefill/decode pools for a load and SLOs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="config.json or a checkpoint directory (default: DeepSeek-V3's config, bundled)")
    p.add_argument("--gpu", default="H800", help="H800, H100, H200, B200, or cpu (this machine, probed)")
    p.add_argument("--ttft-p99", type=float, default=5.0, help="p99 time to first token, seconds (default 5)")
    p.add_argument("--user-tok-s", type=float, default=20.0, help="decode tokens/s each user sees (default 20)")
    p.add_argument("--rate", type=float, default=None, help="requests/s to sustain (required unless --check-published)")
    p.add_argument("--input-len", default="2000:1", help="input tokens MEAN[:CV], log-normal (default 2000:1)")
    p.add_argument("--output-len", default="500:1", help="output tokens MEAN[:CV] (default 500:1)")
    p.add_argument("--cache-hit", type=float, default=0.0, help="fraction of input tokens hitting the prefix cache")
    p.add_argument("--mtp-drafts", type=int, default=1, help="MTP draft tokens per step (0 = off; default 1)")
    p.add_argument("--mtp-acceptance", type=float, default=0.85, help="acceptance per draft (default 0.85)")
    p.add_argument("--no-fp8", action="store_true", help="BF16 weights and matmuls instead of FP8")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    p.add_argument("--no-eplb", action="store_true", help="no expert load balancer (placement by expert id)")
    p.add_argument("--expert-cv", type=float, default=1.0, help="expert popularity cv (default 1.0)")
    p.add_argument("--skew", type=float, default=None, help="measured max/mean token copies per EP rank (overrides)")
    p.add_argument("--max-nodes", type=int, default=18, help="largest instance, in nodes (default 18)")
    p.add_argument("--gpu-hour-cost", type=float, default=None, help="USD per GPU-hour (default: the device table's)")
    p.add_argument("--out", default=None, help="write the pools YAML of `pdserve up` here")
    p.add_argument("--yaml-model", default=None, help="model path written into the YAML (default: --model's directory)")
    p.add_argument("--plot", default=None, help="PNG of throughput per GPU vs per-user speed (needs matplotlib)")
    p.add_argument("--json", default=None, help="write the plan and every candidate as JSON")
    p.add_argument("--check-published", action="store_true",
                   help="print the simulator against DeepSeek's Day 6 and SGLang's published figures")
    p.set_defaults(func=run_plan)


def _lengths(text: str, flag: str):
    from planner.workload import Lengths

    try:
        mean, _, cv = text.partition(":")
        return Lengths(float(mean), float(cv) if cv else 1.0)
    except ValueError as e:
        raise CLIError(f"{flag}: expected MEAN[:CV] with MEAN > 0 and CV >= 0, got {text!r}") from e


def _positive(value: float | None, flag: str, allow_zero: bool = False) -> None:
    if value is None or math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise CLIError(f"{flag}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def run_plan(ns: argparse.Namespace) -> int:
    from planner import published

    if ns.check_published:
        print(published.format_table(published.run_all()))
        return 0
    from engine.model.config import ConfigError
    from planner.hardware import get_gpu
    from planner.model_shape import DEEPSEEK_V3, ModelShape
    from planner.plan import SLO, Options, PlanError, plan
    from planner.workload import Load

    if ns.rate is None:
        raise CLIError("--rate: the load's requests/s is required")
    for value, flag in ((ns.rate, "--rate"), (ns.ttft_p99, "--ttft-p99"), (ns.user_tok_s, "--user-tok-s"),
                        (ns.mtp_acceptance, "--mtp-acceptance"), (ns.max_nodes, "--max-nodes")):
        _positive(value, flag)
    if ns.mtp_acceptance > 1:
        raise CLIError(f"--mtp-acceptance: must be in (0, 1], got {ns.mtp_acceptance}")
    if ns.mtp_drafts < 0 or ns.mtp_drafts > 8:
        raise CLIError(f"--mtp-drafts: must be in [0, 8], got {ns.mtp_drafts}")
    if ns.skew is not None and ns.skew < 1:
        raise CLIError(f"--skew: max/mean is >= 1, got {ns.skew}")
    _positive(ns.expert_cv, "--expert-cv", allow_zero=True)
    if ns.gpu_hour_cost is not None:
        _positive(ns.gpu_hour_cost, "--gpu-hour-cost", allow_zero=True)
    model_path = ns.model or DEEPSEEK_V3
    try:
        shape = ModelShape.load(model_path)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    device = _device(ns.gpu, get_gpu)
    try:
        load = Load(_lengths(ns.input_len, "--input-len"), _lengths(ns.output_len, "--output-len"),
                    cache_hit=ns.cache_hit, request_rate=ns.rate)
    except ValueError as e:
        raise CLIError(str(e)) from e
    opts = Options(mtp_drafts=ns.mtp_drafts, mtp_acceptance=ns.mtp_acceptance, fp8=not ns.no_fp8,
                   kv_dtype="fp8" if ns.kv_cache_dtype == "fp8" else None, eplb=not ns.no_eplb,
                   popularity_cv=ns.expert_cv, skew=ns.skew, max_nodes=ns.max_nodes,
                   price_per_hour=ns.gpu_hour_cost)
    slo = SLO(ttft_p99_s=ns.ttft_p99, user_tok_s=ns.user_tok_s)
    try:
        result = plan(shape, device, load, slo, opts)
    except PlanError as e:
        raise CLIError(str(e)) from e
    print(format_plan(result, shape, model_path))
    if ns.out:
        yaml_model = ns.yaml_model or (model_path if os.path.isdir(model_path) else os.path.dirname(
            os.path.abspath(model_path)))
        _write_yaml(result, shape, ns.out, yaml_model)
        print(f"wrote {ns.out} (pdserve up --config {ns.out})")
    if ns.plot:
        _plot(result, shape, ns.plot)
        print(f"wrote {ns.plot}")
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as f:
            json.dump(plan_to_dict(result), f, indent=2)
        print(f"wrote {ns.json}")
    return 0


def _device(name: str, get_gpu):
    if name.lower() == "cpu":
        from planner.hardware import PDSERVE_CPU_BACKEND, cpu_device, probe_cpu

        try:
            return cpu_device(probe_cpu(), **PDSERVE_CPU_BACKEND)
        except ImportError as e:
            raise CLIError(f"--gpu cpu probes this machine with torch: {e}") from e
    try:
        return get_gpu(name)
    except KeyError as e:
        raise CLIError(f"--gpu: {e.args[0]}") from e


# ---- output ----------------------------------------------------------------------------------
def format_plan(p, shape, model_path: str) -> str:
    load, slo, dev = p.load, p.slo, p.device
    lines = [f"model: {shape.describe()} ({model_path})",
             f"GPU: {dev.name}, {dev.memory_gb:g} GB, {dev.gpus_per_node} per node, USD {p.price_per_hour:.2f}/GPU-hour",
             f"load: {load.request_rate:g} req/s, input {load.input.mean:,.0f} tokens (cv {load.input.cv:g}, "
             f"{load.cache_hit:.0%} prefix-cache hits), output {load.output.mean:,.0f} tokens (cv {load.output.cv:g})",
             f"SLO: TTFT p99 <= {slo.ttft_p99_s:g} s, >= {slo.user_tok_s:g} tok/s per user", "",
             f"{'pool':<8} {'instances x GPUs':>16} {'tp':>3} {'dp':>4} {'ep':>4} {'redundant':>9} {'DBO':>4} "
             f"{'batch/replica':>15} {'latency':>14} {'util':>5} {'tok/s/GPU':>24}"]
    pre, dec = p.prefill, p.decode
    hit = 1 - load.cache_hit
    lines.append(f"{'prefill':<8} {pre.instances:>7} x {pre.parallel.gpus:<6} {pre.parallel.tp:>3} {pre.parallel.dp:>4} "
                 f"{pre.parallel.ep:>4} {pre.parallel.redundant:>9} {'on' if pre.dbo else 'off':>4} "
                 f"{pre.per_replica:>8,.0f} tokens {pre.ttft_p99_s:>8.2f} s p99 {pre.utilisation:>5.0%} "
                 f"{pre.capacity_per_gpu:>9,.0f} in ({pre.capacity_per_gpu / hit:,.0f} w/ hits)")
    lines.append(f"{'decode':<8} {dec.instances:>7} x {dec.parallel.gpus:<6} {dec.parallel.tp:>3} {dec.parallel.dp:>4} "
                 f"{dec.parallel.ep:>4} {dec.parallel.redundant:>9} {'on' if dec.dbo else 'off':>4} "
                 f"{dec.per_replica:>10,.0f} seqs {dec.step.user_tok_s:>7.1f} tok/s {dec.utilisation:>5.0%} "
                 f"{dec.capacity_per_gpu:>9,.0f} out")
    out_rate, in_rate = load.output_token_rate, load.input_token_rate
    cost = (f"cost: USD {p.cost_per_million(out_rate):.3f} per 1M output tokens, "
            f"USD {p.cost_per_million(out_rate + in_rate):.3f} per 1M input+output tokens "
            f"(at {in_rate:,.0f} input + {out_rate:,.0f} output tok/s)") if p.price_per_hour else \
        "cost: no price for this device (--gpu-hour-cost USD)"
    lines += ["", f"total: {p.gpus} GPUs ({pre.gpus} prefill + {dec.gpus} decode, about "
                  f"{math.ceil(p.gpus / dev.gpus_per_node)} nodes), USD {p.cost_per_hour:,.2f}/hour", cost,
              f"candidates meeting the SLOs: {len(p.prefill_candidates)} prefill, {len(p.decode_candidates)} decode"]
    return "\n".join(lines)


def plan_to_dict(p) -> dict:
    def cand(c) -> dict:
        return {"phase": c.phase, "tp": c.parallel.tp, "dp": c.parallel.dp, "ep": c.parallel.ep,
                "redundant_experts": c.parallel.redundant, "dbo": c.dbo, "per_replica": c.per_replica,
                "instances": c.instances, "gpus": c.gpus, "utilisation": c.utilisation,
                "tokens_per_gpu_s": c.capacity_per_gpu, "step_s": c.step.time_s, "user_tok_s": c.step.user_tok_s,
                "ttft_p99_s": c.ttft_p99_s, "terms_s": c.step.terms}

    return {"device": p.device.name, "price_per_hour": p.price_per_hour, "gpus": p.gpus,
            "cost_per_hour": p.cost_per_hour, "prefill": cand(p.prefill), "decode": cand(p.decode),
            "prefill_candidates": [cand(c) for c in p.prefill_candidates],
            "decode_candidates": [cand(c) for c in p.decode_candidates]}


def pools_yaml(p, shape, model: str) -> dict:
    """The ``pdserve up`` deployment file of a plan (``deploy/config.py`` format)."""
    engine: dict[str, Any] = {"dtype": "float32" if p.device.compute_dtype == "float32" else "bfloat16"}
    kv_dtype = p.decode.features.kv_dtype
    if kv_dtype == "fp8":
        engine["kv_cache_dtype"] = "fp8"
    pools = {}
    for c in (p.prefill, p.decode):
        par = c.parallel
        pool_engine: dict[str, Any] = {}
        if c.phase == "prefill":
            pool_engine["max_num_batched_tokens"] = int(c.per_replica * par.dp)
        else:
            pool_engine["max_num_seqs"] = int(c.per_replica * par.dp)
            kv_bytes = shape.kv_bytes_per_token(kv_dtype or p.device.compute_dtype, p.mtp_drafts > 0)
            pool_engine["kv_cache_memory_gb"] = round(c.kv_capacity_tokens * kv_bytes / 1e9, 2)  # per GPU
            if p.mtp_drafts:
                pool_engine["speculative"] = "mtp"
                pool_engine["num_speculative_tokens"] = p.mtp_drafts
        pools[c.phase] = {"instances": c.instances,
                          "parallel": {"tp": par.tp, "sp": par.tp > 1, "dp": par.dp, "ep": par.ep,
                                       "num_redundant_experts": par.redundant},
                          "engine": pool_engine, "max_restarts": 3}
    return {"model": model, "engine": engine,
            "ray": {"address": None if p.device.name == "cpu" else "auto"},
            "router": {"host": "127.0.0.1", "port": 8000}, "pools": pools}


def _write_yaml(p, shape, path: str, model: str) -> None:
    import yaml

    from deploy.config import DeployConfigError, parse_config

    doc = pools_yaml(p, shape, model)
    try:
        parse_config(doc, source=path)
    except DeployConfigError as e:  # the planner's own output must be what `pdserve up` accepts
        raise CLIError(f"internal error: the planned deployment does not validate: {e}") from e
    header = (f"# pdserve plan: {p.device.name}, {p.gpus} GPUs, TTFT p99 <= {p.slo.ttft_p99_s:g} s, "
              f">= {p.slo.user_tok_s:g} tok/s per user, {p.load.request_rate:g} req/s\n"
              "# pdserve up --config THIS_FILE\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(doc, sort_keys=False))


def _plot(p, shape, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CLIError("--plot needs matplotlib (pip install matplotlib)") from e
    from planner.plan import decode_curve

    fig, ax = plt.subplots(figsize=(8, 5))
    shown = sorted(p.decode_candidates, key=lambda c: -c.capacity_per_gpu)[:8]
    if p.decode not in shown:
        shown.append(p.decode)
    for c in shown:
        speeds, tput = decode_curve(shape, p.device, c, p.load)
        style = {"linewidth": 2.5, "color": "black"} if c is p.decode else {"linewidth": 1, "alpha": 0.8}
        ax.plot(speeds, tput, label=c.label() + (" (chosen)" if c is p.decode else ""), **style)
    ax.axvline(p.slo.user_tok_s, color="red", linestyle="--", label=f"SLO {p.slo.user_tok_s:g} tok/s")
    ax.scatter([p.decode.step.user_tok_s], [p.decode.capacity_per_gpu], color="red", zorder=5)
    ax.set_xlabel("tokens/s per user")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_title(f"{p.device.name}: decode candidates (batch per replica swept)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

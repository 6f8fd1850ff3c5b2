"""Item 4 of issue #17: the simulator with this machine's CPU profile against ``pdserve bench``.

    python -m planner.cpu_check --model CKPT [--mode up|serve] [--concurrency 8,16] [--json OUT]

1. Profile the CPU with the threads one rank uses (``planner.hardware.probe_cpu``: fp32 GEMM
   GFLOP/s at 256 and 8 rows, a small batched GEMM, GEMV read bandwidth, one tiny torch op;
   ``probe_collectives``: gloo all_to_all between two processes: its cost between compute segments,
   as lock-step ranks call it, and its idle latency and rate).
2. Count, from pdserve's own engine, the torch calls one decode step makes inside the model and
   outside it at the batch one decode replica runs (a structural count: what ops the code
   launches, no timing), and route random hidden states through the checkpoint's gates for the
   expert popularity cv.
3. Predict per concurrency (``predict``): the decode step of the deployment's decode instance
   from the simulator, TPOT, decode tok/s (concurrency / TPOT) and the bench's output tok/s.
4. Start the deployment and measure with ``pdserve bench`` (random prompts, ``--ignore-eos``):
   ``up``    = ``pdserve up`` on deploy/examples/local-cpu.yaml as it is (model path and port
               replaced): prefill TP2 + SP + EP2, decode DP2 + EP2 with 2 redundant experts, one
               Ray actor and one torch thread per rank, gloo, float32; inside a loopback-only
               network namespace (``unshare -n``) as the PD tests do;
   ``serve`` = ``pdserve serve --dtype float32`` colocated (one engine, every core).
   Measured decode tok/s = concurrency / mean TPOT. A probe is taken before and after each
   level (the machine is shared); the prediction uses their mean.

``--predict-only`` skips step 4 (what CI runs, on the tiny preset).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from engine.args import EngineArgs
from engine.model.dispatch import padded_fits
from engine.model.layers import KERNEL_MAX_ROWS
from planner.hardware import (CollectiveProbe, CPUProbe, cpu_device, cpu_flags, cpu_model_name, probe_collectives,
                              probe_cpu)
from planner.model_shape import ModelShape
from planner.simulator import Features, Parallel, Simulator
from planner.workload import Lengths, Load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_YAML = os.path.join(REPO, "deploy", "examples", "local-cpu.yaml")


@dataclasses.dataclass
class OpCount:
    in_model_per_layer: float  # torch calls per decode step inside the model, per layer (MTP layer included)
    outside_model: float  # torch calls per decode step outside the model (input prep, sampling)
    weight_read_dtype: str = "float32"  # what the engine's CPU kernel reads weights as (bf16 copies of a bf16 checkpoint)


def count_ops(model_dir: str, batch: int, input_len: int, threads: int) -> OpCount:
    """Torch calls of one decode step of pdserve's engine at ``batch`` sequences (counted, not timed)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from engine.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    with contextlib.redirect_stderr(io.StringIO()):  # the checkpoint-loading bar
        engine = LLMEngine(EngineArgs(model=model_dir, dtype="float32", max_num_seqs=max(batch, 1),
                                      kv_cache_memory_gb=0.5, enable_prefix_caching=False))
    vocab = engine.config.vocab_size
    params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0)
    for i in range(batch):
        engine.add_request(f"r{i}", [(7 * i + 13 * j) % (vocab - 2) + 2 for j in range(input_len)], params)
    for _ in range(batch + 2):  # prefill every prompt (chunks of the step budget) and take one decode step
        engine.step()

    counts = {"in": 0, "out": 0}
    inside = [False]

    class Counter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            counts["in" if inside[0] else "out"] += 1
            return func(*args, **(kwargs or {}))

    model = engine.runner.model
    pre = model.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    post = model.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    steps = 3
    with Counter():
        for _ in range(steps):
            engine.step()
    pre.remove()
    post.remove()
    layers = model.num_cache_layers
    read = "bfloat16" if any(w.dtype == torch.bfloat16 for w in model.kernel_weights()) else "float32"
    return OpCount(counts["in"] / steps / layers, counts["out"] / steps, read)


def router_popularity_cv(model_dir: str, tokens: int = 8192) -> float:
    """Expert popularity cv of the checkpoint's routers on unit-variance hidden states (Poisson noise removed)."""
    import torch
    from safetensors import safe_open

    from engine.model.config import ModelConfig
    from engine.model.moe import Gate

    cfg = ModelConfig.from_dir(model_dir)
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)
    cvs = []
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        gate = Gate(cfg)
        prefix = f"model.layers.{layer}.mlp.gate."
        for f in files:
            with safe_open(os.path.join(model_dir, f), "pt") as st:
                for name in st.keys():
                    if name.startswith(prefix):
                        getattr(gate, name[len(prefix):]).data = st.get_tensor(name).float()
        ids, _ = gate(x)
        counts = torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts).float()
        mean = counts.mean()
        var = max(float(counts.var()) - float(mean), 0.0)  # minus the Poisson part
        cvs.append(var ** 0.5 / float(mean))
    return sum(cvs) / len(cvs) if cvs else 0.0


@dataclasses.dataclass(frozen=True)
class Local:
    """What the prediction needs of deploy/examples/local-cpu.yaml (``up``) or of one engine (``serve``)."""

    decode: Parallel  # the decode instance's layout (serve: one rank)
    prefill: Parallel
    prefill_budget: int  # new tokens per prefill step
    threads: int  # torch threads per rank
    colocated: bool = False  # serve: one engine prefills and decodes

    @property
    def ranks(self) -> int:
        return self.decode.gpus + (0 if self.colocated else self.prefill.gpus)

    @property
    def lockstep(self) -> bool:
        return self.decode.dp > 1 and self.decode.ep > 1


def local_layout(mode: str, cores: int) -> Local:
    if mode == "serve":
        return Local(Parallel(), Parallel(), EngineArgs.max_num_batched_tokens, cores, colocated=True)
    with open(LOCAL_YAML, encoding="utf-8") as f:
        pools = yaml.safe_load(f)["pools"]

    def par(role: str) -> Parallel:
        p = pools[role]["parallel"]
        return Parallel(p.get("tp", 1), p.get("dp", 1), p.get("ep", 1), p.get("num_redundant_experts", 0))

    budget = pools["prefill"].get("engine", {}).get("max_num_batched_tokens", EngineArgs.max_num_batched_tokens)
    threads = max(1, int(pools["decode"].get("resources", {}).get("num_cpus", 0)))  # deploy.pool: threads per rank
    return Local(par("decode"), par("prefill"), budget, threads)


@dataclasses.dataclass
class Prediction:
    concurrency: int
    decode_step_s: float  # the decode instance's step with every rank on a core of its own
    tpot_s: float  # what a client sees between tokens
    ttft_s: float
    decode_tok_s: float  # concurrency / TPOT
    output_tok_s: float  # bench's output tok/s


def predict(shape: ModelShape, probe: CPUProbe, comm: CollectiveProbe | None, ops: dict[int, OpCount],
            popularity_cv: float, mode: str, local: Local, concurrency: int, input_len: int, output_len: int,
            cores: int) -> Prediction:
    """Decode and end-to-end throughput at ``concurrency`` closed-loop clients.

    The bench's clients start together and every request has the same lengths
    (``--ignore-eos``), so requests move in waves: a wave's C prompts are prefilled in
    steps of the prefill budget, then the C sequences decode side by side (C / dp per
    replica: the router places by KV in use) and finish together.

    ``serve``: one engine; its prefill steps stop decoding (TTFT), TPOT = the decode step.
    ``up``: the decode instance's ranks have a core each while the prefill instance is idle;
    while the wave's later prompt chunks are prefilled, decode and prefill ranks share the
    cores (each rank gets cores / busy ranks). TPOT = the step plus that slowdown spread
    over the output tokens.
    """
    count = ops[concurrency]
    load = Load(Lengths(input_len, 0.0), Lengths(output_len, 0.0))
    feat = Features(dbo=False, fp8=False, mtp_drafts=0, eplb=True, popularity_cv=popularity_cv)

    def sim(par: Parallel, step_collectives: int = 0, dispatch_collectives: int = 2) -> Simulator:
        device = cpu_device(probe, round(count.in_model_per_layer), count.outside_model,
                            comm if par.gpus > 1 else None, step_collectives, dispatch_collectives,
                            count.weight_read_dtype, KERNEL_MAX_ROWS)
        return Simulator(shape, device, par, feat)

    per_replica = math.ceil(concurrency / local.decode.dp)
    # lock-step replicas agree on a bound on every pass's tokens: a small dispatch is one padded exchange
    slots_per_rank = (shape.experts + local.decode.redundant) // max(local.decode.ep, 1)
    one_exchange = local.lockstep and padded_fits(local.decode.ep, per_replica, shape.top_k, slots_per_rank,
                                                  shape.cfg.hidden_size * 4)
    decode = sim(local.decode, 1 if local.lockstep else 0, 1 if one_exchange else 2)
    step = decode.decode_step(per_replica, load).time_s
    tokens = concurrency * input_len
    chunk = min(local.prefill_budget, tokens)
    chunks = math.ceil(tokens / chunk)
    prefill = sim(local.prefill).prefill_step(chunk, load).time_s
    if mode == "serve":
        ttft = prefill * (chunks + 1) / 2  # a prompt's first token comes with the step that ends it
        cycle = chunks * prefill + (output_len - 1) * step
        return Prediction(concurrency, step, step, ttft, concurrency / step, concurrency * output_len / cycle)
    share = min(1.0, cores / local.ranks)  # every rank busy: prefill chunks 2.. overlap the first chunks' decode
    overlap = (chunks - 1) * prefill / share  # wall time of the overlapping prefill steps
    tpot = step + overlap * (1 - share) / (output_len - 1)  # decode ran at `share` speed through it
    ttft = prefill + (chunks - 1) / 2 * prefill / share + step
    cycle = ttft + (output_len - 1) * tpot
    return Prediction(concurrency, step, tpot, ttft, concurrency / tpot, concurrency * output_len / cycle)


def _layout(p: Parallel) -> str:
    return f"tp{p.tp} dp{p.dp} ep{p.ep}" + (f" +{p.redundant} redundant" if p.redundant else "")


def mean_probe(a: CPUProbe, b: CPUProbe) -> CPUProbe:
    """Field-wise mean of two probes (taken before and after a measurement on a shared machine)."""
    mean = {f.name: (getattr(a, f.name) + getattr(b, f.name)) / 2 for f in dataclasses.fields(CPUProbe)
            if isinstance(getattr(a, f.name), float)}
    return dataclasses.replace(a, **mean)


def _probe_line(p: CPUProbe) -> str:
    return (f"GEMM {p.matmul_gflops:.0f}/{p.small_matmul_gflops:.1f} GFLOP/s (256/8 rows), bmm {p.small_bmm_gflops:.1f}, "
            f"read {p.read_gbps:.1f} GB/s, op {p.op_us:.1f} us")


def format_report(report: dict) -> str:
    lines = [f"{'C':>4} {'pred TPOT ms':>12} {'meas TPOT ms':>12} {'pred decode tok/s':>17} {'meas decode tok/s':>17} "
             f"{'ratio':>6} {'pred out tok/s':>14} {'meas out tok/s':>14} {'ratio':>6}"]
    for lv in report["levels"]:
        p, m = lv["prediction"], lv["measured"]
        row = f"{lv['concurrency']:>4} {p['tpot_s'] * 1e3:>12.1f} "
        if m:
            decode = lv["concurrency"] * 1000 / m["tpot_ms"]["mean"]
            row += (f"{m['tpot_ms']['mean']:>12.1f} {p['decode_tok_s']:>17.1f} {decode:>17.1f} "
                    f"{p['decode_tok_s'] / decode:>6.2f} {p['output_tok_s']:>14.1f} {m['output_throughput']:>14.1f} "
                    f"{p['output_tok_s'] / m['output_throughput']:>6.2f}")
        else:
            row += f"{'-':>12} {p['decode_tok_s']:>17.1f} {'-':>17} {'-':>6} {p['output_tok_s']:>14.1f} {'-':>14} {'-':>6}"
        lines.append(row)
    return "\n".join(lines)


# ---- measurement ---------------------------------------------------------------------------
def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def start(mode: str, model_dir: str, port: int, workdir: str) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "pdserve")
    log = open(os.path.join(workdir, f"{mode}.log"), "w")
    if mode == "serve":
        cmd = [exe, "serve", "--model", model_dir, "--dtype", "float32", "--port", str(port), "--log-level",
               "warning", "--max-num-seqs", "64", "--kv-cache-memory-gb", "1"]
    else:
        with open(LOCAL_YAML, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        cfg["model"] = os.path.abspath(model_dir)
        cfg["engine"]["dtype"] = "float32"
        cfg["router"]["port"] = port
        path = os.path.join(workdir, "local-cpu-float32.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        cmd = [exe, "up", "--config", path, "--state-file", os.path.join(workdir, "up.json"), "--log-level",
               "warning"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PDSERVE_STATE_DIR": workdir}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench(port: int, concurrency: int, num_prompts: int, input_len: int, output_len: int, vocab: int,
          out: str) -> dict:
    """``pdserve bench`` at one concurrency; its JSON (per-request TTFT and inter-token gaps) goes to ``out``."""
    exe = os.path.join(os.path.dirname(sys.executable), "pdserve")
    cmd = [exe, "bench", "--base-url", f"http://127.0.0.1:{port}", "--dataset", "random", "--input-len",
           str(input_len), "--output-len", str(output_len), "--ignore-eos", "--vocab-size", str(vocab), "--seed", "0",
           "--concurrency", str(concurrency), "--num-prompts", str(num_prompts), "--json", out, "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as f:
        return json.load(f)["runs"][0]["summary"]


def _in_loopback_namespace() -> bool:
    return os.environ.get("PDSERVE_LOOPBACK_NS") == "1"


def _reexec_in_namespace(argv: list[str]) -> int:
    """Re-run this script in a network namespace with only ``lo`` (Ray would use the interface address)."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("ip") is None:
        print("planner.cpu_check: --mode up needs unshare and ip (a loopback-only network namespace)",
              file=sys.stderr)
        return 2
    flags = ["-n"] if os.geteuid() == 0 else ["-rn"]
    inner = " ".join(["exec", sys.executable, "-m", "planner.cpu_check", *(f"'{a}'" for a in argv)])
    env = {**os.environ, "PDSERVE_LOOPBACK_NS": "1"}
    return subprocess.run([unshare, *flags, "sh", "-c", f"ip link set lo up && {inner}"], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m planner.cpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (pdserve checkpoint make-random DIR --preset bench)")
    ap.add_argument("--mode", choices=("up", "serve"), default="up")
    ap.add_argument("--concurrency", default="8,32", help="comma-separated closed-loop concurrencies")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=18231)
    ap.add_argument("--predict-only", action="store_true", help="profile, count and predict; start nothing")
    ap.add_argument("--json", default=None, help="write probe, counts, predictions and measurements here "
                    "(and each level's pdserve bench JSON beside it, OUT-cC.json)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.mode == "up" and not args.predict_only and not _in_loopback_namespace():
        return _reexec_in_namespace(argv)

    shape = ModelShape.load(args.model)
    cores = os.cpu_count() or 1
    local = local_layout(args.mode, cores)
    threads = local.threads
    ops = {c: count_ops(args.model, math.ceil(c / local.decode.dp), args.input_len, threads) for c in levels}
    cv = router_popularity_cv(args.model)
    comm = probe_collectives(local.decode.gpus) if local.decode.gpus > 1 else None
    print(f"CPU: {cpu_model_name()}, {cores} cores, flags {' '.join(cpu_flags())}; mode {args.mode}: "
          f"decode {_layout(local.decode)}, prefill {_layout(local.prefill)}, {threads} thread(s) per rank")
    counts = ", ".join(f"C={c}: {o.in_model_per_layer:.0f} torch calls/layer + {o.outside_model:.0f} outside"
                       for c, o in ops.items())
    counts += f"; decode-sized matmuls read {next(iter(ops.values())).weight_read_dtype} weights"
    gloo = (f"; gloo all_to_all {comm.latency_s * 1e6:.0f} us between compute ({comm.idle_latency_s * 1e6:.0f} us "
            f"idle) + {comm.gbps:.2f} GB/s ({comm.ranks} ranks)" if comm else "")
    print(f"engine: {counts}; router popularity cv {cv:.2f}{gloo}")
    report = {"mode": args.mode, "cpu": cpu_model_name(), "flags": cpu_flags(), "cores": cores,
              "ops": {c: dataclasses.asdict(o) for c, o in ops.items()}, "popularity_cv": cv,
              "collectives": dataclasses.asdict(comm) if comm else None, "levels": []}

    def one_level(c: int, measure) -> dict:
        before = probe_cpu(threads=threads)
        load_before = os.getloadavg()[0]
        measured = measure(c) if measure else None
        load_after = os.getloadavg()[0]
        after = probe_cpu(threads=threads) if measure else before
        probe = mean_probe(before, after)
        pred = predict(shape, probe, comm, ops, cv, args.mode, local, c, args.input_len, args.output_len, cores)
        print(f"  C={c}: probe {_probe_line(before)} | after {_probe_line(after)} | 1-min load {load_before:.2f} "
              f"before, {load_after:.2f} after")
        return {"concurrency": c, "probe_before": dataclasses.asdict(before), "probe_after": dataclasses.asdict(after),
                "loadavg_1min": [load_before, load_after], "prediction": dataclasses.asdict(pred),
                "measured": measured}

    if args.predict_only:
        report["levels"] = [one_level(c, None) for c in levels]
    else:
        with tempfile.TemporaryDirectory(prefix="planner-cpu-") as work:
            proc = start(args.mode, args.model, args.port, work)
            try:
                bench(args.port, levels[0], levels[0], args.input_len, args.output_len, shape.cfg.vocab_size,
                      os.path.join(work, "warmup.json"))
                keep = os.path.splitext(args.json)[0] if args.json else os.path.join(work, "bench")
                report["levels"] = [one_level(c, lambda c: bench(args.port, c, args.num_prompts, args.input_len,
                                                                 args.output_len, shape.cfg.vocab_size,
                                                                 f"{keep}-c{c}.json"))
                                    for c in levels]
            finally:
                stop(proc)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

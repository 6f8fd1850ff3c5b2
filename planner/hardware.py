"""Devices the simulator runs on: peak figures with their sources, and achievable fractions.

A ``Device`` holds datasheet peaks (dense tensor-core FLOPS, HBM, scale-up and
scale-out bandwidth per GPU and direction). An ``Efficiency`` holds what kernels
reach of those peaks; there is one set per GPU family, fixed before the published
checks were run (docs/PLANNER.md) and never fitted to them. A ``Backend`` holds the
traits of the kernels that run the model (how routed experts are batched, how many
small kernels a layer launches, what a step costs outside the model).

``probe_cpu()`` + ``cpu_device()`` build a device for the machine it runs on from fp32
GEMMs at 256, 8 and 1 rows (compute peak, small-row efficiency, read bandwidth) and the
cost of one tiny torch op, in under 2 s; ``probe_collectives()`` adds gloo's all_to_all
latency and rate between processes of the machine, for multi-rank CPU instances.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of a device's peaks.

    A GEMM of FLOPs F reading B bytes takes (t_c^p + t_m^p)^(1/p) with
    t_c = F / (peak x gemm_compute x K/(K + gemm_k_overhead) x tile use) and
    t_m = B / (HBM x gemm_memory); tile use is the fraction of the SMs' output tiles
    (64/128 rows x 64-256 columns, in whole waves) that holds real rows and columns.
    Core attention uses the same rule with attn_compute / attn_memory.
    """

    gemm_compute: float
    gemm_k_overhead: float  # per-tile pipeline fill, in K elements
    gemm_memory: float
    roofline_p: float  # how compute and memory time combine (1 = add, large = max)
    tile_waves: bool  # count whole waves of output tiles over the SMs
    gemm_rows_half: float  # CPU GEMMs: rows at which half the peak is reached (x M/(M + this)); 0 = no such term
    bmm_rows_half: float  # the same for batched GEMMs (padded experts, attention)
    attn_compute: float
    attn_memory: float
    scale_out: float  # fraction of the NIC's bandwidth an all_to_all reaches
    scale_up: float  # fraction of NVLink's per-direction bandwidth
    comm_latency_s: float  # fixed cost of one all_to_all (network round trip, kernel)
    note: str


# Hopper (H800, H100, H200). Every factor from a micro-benchmark that is not one of the checks:
#  - GEMM: least squares (log error) over the 28 FP8 shapes of DeepGEMM's README table on H800
#    (planner/data/deepgemm_h800.csv; dense, contiguous-grouped and masked-grouped, M from 64 to
#    8192 rows): gemm_compute 0.74, K overhead 512, gemm_memory 0.85, p 1.5 reproduce the table
#    with an 8% RMS error (tests/test_planner.py checks it).
#  - Attention: FlashMLA README (Feb 2025, H800 SXM5): 580 TFLOPS BF16 compute-bound (0.59 of 989),
#    3,000 GB/s memory-bound (0.90 of 3,350). The same 0.59 is used for prefill attention.
#  - all_to_all: DeepEP README (V1, H800 + CX7 400 Gb/s): normal kernels 43-58 GB/s, low-latency
#    kernels 39-48 GB/s at EP 32-256, of a ~50 GB/s NIC: 0.80. NVLink: DeepSeek-V3 report
#    (arXiv 2412.19437, section 3.2.2) 160 GB/s achievable of H800's 200 GB/s per direction: 0.80.
#  - 10 us per all_to_all: an assumption (IB round trip + kernel start), not measured.
HOPPER = Efficiency(gemm_compute=0.74, gemm_k_overhead=512.0, gemm_memory=0.85, roofline_p=1.5, tile_waves=True,
                    gemm_rows_half=0.0, bmm_rows_half=0.0,
                    attn_compute=0.59, attn_memory=0.90, scale_out=0.80, scale_up=0.80, comm_latency_s=10e-6,
                    note="DeepGEMM, FlashMLA and DeepEP README figures on H800 (see planner/hardware.py)")
# Blackwell: no published DeepGEMM/FlashMLA/DeepEP tables were used; Hopper's fractions are assumed
# and no check exists for this family.
BLACKWELL = dataclasses.replace(HOPPER, note="Hopper's fractions assumed; not checked against any published number")


@dataclasses.dataclass(frozen=True)
class Backend:
    """Traits of the kernels that run the model on a device."""

    moe_kernel: str  # "grouped": cost follows each expert's rows | "padded": every local expert x the busiest one's rows
    padded_max_rows: int  # "padded" applies up to this many rows per expert (above it: grouped)
    attn_kv_passes: float  # times the attention reads the cached latent rows (FlashMLA: once)
    small_kernels_per_layer: int  # norms, rope, quantization, routing, residuals...
    kernel_floor_s: float  # the least one small kernel / op costs
    comm_sms_prefill: int  # SMs the all_to_all kernels hold while they overlap compute (prefill)
    step_overhead_s: float  # per step, outside the model: scheduling, sampling, graph launch
    dispatch_collectives: int = 1  # collectives per dispatch (pdserve's gloo path: the per-slot counts, then the rows)


# 24 comm SMs in prefill, 0 in decode: DeepSeek's Day 6 overlap figures (computation 108 SMs +
# communication 24 SMs while prefilling; communication 0 SMs while decoding). 20 small kernels of
# >= 2 us each and 1 ms per step outside the model: assumptions (CUDA-graph replay of tiny
# kernels; an overlapped scheduler), not measured.
GPU_BACKEND = Backend(moe_kernel="grouped", padded_max_rows=0, attn_kv_passes=1.0, small_kernels_per_layer=20,
                      kernel_floor_s=2e-6, comm_sms_prefill=24, step_overhead_s=1e-3)


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    fp8_tflops: float | None  # dense; None = no FP8 tensor cores (FP8 weights run at compute_dtype's peak)
    bf16_tflops: float  # dense
    fp32_tflops: float | None  # dense GEMM at fp32 (the CPU profile's measured figure)
    memory_gb: float
    hbm_gbps: float
    scale_up_gbps: float  # NVLink per GPU and direction
    scale_out_gbps: float  # NIC per GPU and direction
    gpus_per_node: int
    sms: int
    price_per_hour: float  # USD per GPU-hour, for cost per million tokens
    efficiency: Efficiency
    backend: Backend
    sources: dict[str, str]
    compute_dtype: str = "bfloat16"  # what non-FP8 GEMMs and attention run in
    # what a GEMM of at most ``weight_read_max_rows`` rows per weight reads its compute_dtype weights as, where
    # narrower: pdserve's CPU kernel reads bf16 copies of a bf16 checkpoint run in fp32 (None: compute_dtype)
    weight_read_dtype: str | None = None
    weight_read_max_rows: int = 0

    def matmul_tflops(self, dtype: str) -> float:
        if dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        if dtype == "float32" and self.fp32_tflops:
            return self.fp32_tflops
        return self.bf16_tflops if dtype != "float32" else (self.fp32_tflops or self.bf16_tflops / 2)


_H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet, SXM5: 1,979 TFLOPS BF16 and 3,958 TFLOPS FP8 "
                   "with sparsity (dense = half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s")
_HOPPER_SOURCES = {"fp8_tflops": _H100_DATASHEET, "bf16_tflops": _H100_DATASHEET, "sms": "132 SMs (SXM5)"}
_CX7 = ("one ConnectX-7 400 Gb/s (50 GB/s) NIC per GPU: DeepEP README (H800 test bed) and DeepSeek-V3 report "
        "section 3.2.2 (IB 50 GB/s)")

GPUS: dict[str, Device] = {
    "H800": Device(
        name="H800", fp8_tflops=1979.0, bf16_tflops=989.0, fp32_tflops=None, memory_gb=80.0, hbm_gbps=3350.0,
        scale_up_gbps=200.0, scale_out_gbps=50.0, gpus_per_node=8, sms=132, price_per_hour=2.0,
        efficiency=HOPPER, backend=GPU_BACKEND,
        sources={**_HOPPER_SOURCES,
                 "memory_gb": "80 GB HBM3, same memory system as H100 SXM5 (DeepSeek-V3 report: H800 nodes)",
                 "hbm_gbps": "3.35 TB/s (H100 SXM5 datasheet; FlashMLA reaches 3,000 GB/s on H800)",
                 "scale_up_gbps": "NVLink 400 GB/s bidirectional on H800 = 200 GB/s per direction "
                                  "(DeepSeek-V3 report: 160 GB/s achievable)",
                 "scale_out_gbps": _CX7,
                 "price_per_hour": "USD 2 per GPU-hour: the lease price DeepSeek's Day 6 post assumes"}),
    "H100": Device(
        name="H100", fp8_tflops=1979.0, bf16_tflops=989.0, fp32_tflops=None, memory_gb=80.0, hbm_gbps=3350.0,
        scale_up_gbps=450.0, scale_out_gbps=50.0, gpus_per_node=8, sms=132, price_per_hour=2.0,
        efficiency=HOPPER, backend=GPU_BACKEND,
        sources={**_HOPPER_SOURCES, "memory_gb": _H100_DATASHEET, "hbm_gbps": _H100_DATASHEET,
                 "scale_up_gbps": "NVLink 900 GB/s bidirectional = 450 GB/s per direction (datasheet)",
                 "scale_out_gbps": _CX7 + "; SGLang's 12-node H100 cluster: InfiniBand, NIC speed assumed the same",
                 "price_per_hour": "assumed equal to H800's USD 2 (override with --gpu-hour-cost)"}),
    "H200": Device(
        name="H200", fp8_tflops=1979.0, bf16_tflops=989.0, fp32_tflops=None, memory_gb=141.0, hbm_gbps=4800.0,
        scale_up_gbps=450.0, scale_out_gbps=50.0, gpus_per_node=8, sms=132, price_per_hour=2.5,
        efficiency=HOPPER, backend=GPU_BACKEND,
        sources={**_HOPPER_SOURCES,
                 "memory_gb": "NVIDIA H200 datasheet: 141 GB HBM3e", "hbm_gbps": "NVIDIA H200 datasheet: 4.8 TB/s",
                 "scale_up_gbps": "NVLink 900 GB/s bidirectional = 450 GB/s per direction (H200 datasheet)",
                 "scale_out_gbps": _CX7 + " (assumed for HGX H200)",
                 "price_per_hour": "assumed USD 2.5 (override with --gpu-hour-cost)"}),
    "B200": Device(
        name="B200", fp8_tflops=4500.0, bf16_tflops=2250.0, fp32_tflops=None, memory_gb=180.0, hbm_gbps=8000.0,
        scale_up_gbps=900.0, scale_out_gbps=50.0, gpus_per_node=8, sms=148, price_per_hour=4.0,
        efficiency=BLACKWELL, backend=GPU_BACKEND,
        sources={"fp8_tflops": "NVIDIA HGX B200 (1,000 W) spec: 4.5 PFLOPS FP8 dense (9 with sparsity)",
                 "bf16_tflops": "NVIDIA HGX B200 spec: 2.25 PFLOPS BF16 dense",
                 "memory_gb": "NVIDIA DGX B200 datasheet: 1,440 GB per 8 GPUs = 180 GB HBM3e",
                 "hbm_gbps": "8 TB/s HBM3e (B200 spec)",
                 "scale_up_gbps": "NVLink 5: 1.8 TB/s bidirectional = 900 GB/s per direction",
                 "scale_out_gbps": "DGX B200: 8x ConnectX-7 400 Gb/s, one per GPU",
                 "sms": "148 SMs (two dies)",
                 "price_per_hour": "assumed USD 4 (override with --gpu-hour-cost)"}),
}


def get_gpu(name: str) -> Device:
    key = name.upper()
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} (or 'cpu' for this machine)")
    return GPUS[key]


# ---- this machine ---------------------------------------------------------------------------
def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The vector ISA flags that decide matmul speed (avx2, avx512f, avx512_bf16, amx...)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


@dataclasses.dataclass(frozen=True)
class CPUProbe:
    matmul_gflops: float  # fp32 GEMM, 256 rows x 1024 @ 1024 x 16384 (compute-bound)
    small_matmul_gflops: float  # the same with 8 rows (decode-sized)
    small_bmm_gflops: float  # batched: 32 x (4 rows x 1024 @ 1024 x 512), as padded experts run
    read_gbps: float  # 1 row x 1024 @ 1024 x 16384: weight bytes read per second (a GEMV streams them)
    op_us: float  # one tiny torch op (add of 8 floats)
    threads: int
    cpu: str
    flags: tuple[str, ...]


def probe_cpu(seconds: float = 1.0, threads: int | None = None) -> CPUProbe:
    """fp32 GEMM GFLOP/s at 256 and 8 rows, a small batched GEMM, GEMV read bandwidth, a tiny op;
    the matmuls through the engine's own kernel (``engine.model.layers.linear``, prepacked on CPU).

    Each probe takes the best of a few runs over weights used in turn that together are
    several times the L3 of the CPUs seen here, so weights come from DRAM as in a decode
    step (which streams the whole model once).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    weights = [torch.full((16384, 1024), 0.5) for _ in range(2)]  # nn.Linear layout [out, in], 64 MB each
    experts = [torch.full((32, 1024, 512), 0.5) for _ in range(2)]  # 64 MB each

    def best(fn, budget: float) -> float:
        fn(0)  # warm up
        times, start, i = [], time.perf_counter(), 0
        while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 48):
            i += 1
            t0 = time.perf_counter()
            fn(i % 2)
            times.append(time.perf_counter() - t0)
        return min(times)

    from engine.kernels import cpu_gemm
    from engine.model.layers import linear as engine_linear
    from engine.model.layers import pack_weight

    packed = [pack_weight(w) for w in weights]  # the engine's kernels: its own for few rows, else oneDNN-prepacked
    kernel = cpu_gemm.kernel()

    def linear(rows: int):
        x = torch.ones(rows, 1024)
        return lambda i: engine_linear(x, weights[i], packed[i], kernel)

    xb = torch.ones(32, 4, 1024)
    share = seconds / 5
    t_big, t_small, t_one = best(linear(256), share), best(linear(8), share), best(linear(1), share)
    t_bmm = best(lambda i: torch.bmm(xb, experts[i]), share)
    x, t_op = torch.zeros(8), math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(100):
            torch.add(x, 1.0)
        t_op = min(t_op, (time.perf_counter() - t0) / 100)
    flops = 2 * 1024 * 16384
    return CPUProbe(matmul_gflops=256 * flops / t_big / 1e9, small_matmul_gflops=8 * flops / t_small / 1e9,
                    small_bmm_gflops=2 * 32 * 4 * 1024 * 512 / t_bmm / 1e9, read_gbps=16384 * 1024 * 4 / t_one / 1e9,
                    op_us=t_op * 1e6, threads=torch.get_num_threads(), cpu=cpu_model_name(), flags=tuple(cpu_flags()))


# pdserve's own CPU kernels (engine/model/): routed experts as one padded bmm while every expert gets
# <= 64 rows (engine/model/moe.py Experts.PADDED_MAX_ROWS) and more than half the slots have rows (else
# expert by expert: fewer weights read); decode attention gathers the context rows
# (a read and a write) then reads them in two bmm (engine/model/attention.py): 4 passes.
# Torch calls of one decode step of pdserve's engine, counted (not timed) by planner.cpu_check.count_ops
# on the bench preset at batch 8 (2026-12-02): 175 per layer inside the model, 53 outside it (inputs, sampling).
PDSERVE_CPU_BACKEND = {"small_kernels_per_layer": 175, "outside_calls_per_step": 53}


@dataclasses.dataclass(frozen=True)
class CollectiveProbe:
    """gloo between processes of this machine (one torch thread each), as pdserve's ranks talk."""

    # what one all_to_all_single of a few 1,024-float rows per peer adds to a step: every rank computes
    # between calls, as lock-step ranks do (time per segment + call, minus per segment alone)
    latency_s: float
    gbps: float  # bytes one rank sends per second beyond the idle latency (1 MB per peer)
    ranks: int
    idle_latency_s: float | None = None  # the same call on idle ranks, straight after a barrier


def _collective_rank(rank: int, ranks: int, init_method: str, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=ranks)

    def timed(rows: int) -> float:
        x = torch.ones(ranks * rows, 1024)
        y = torch.empty_like(x)
        for _ in range(5):
            dist.all_to_all_single(y, x)
        times = []
        for _ in range(40):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    small, large = timed(1), timed(256)
    # Between compute: a decode-sized matmul (4 rows over 16 MB of weights, from DRAM) before each call.
    # Idle ranks answer a call at once; busy ones do not, and a rank that reaches the call first waits for
    # its peer to finish computing and for its gloo thread to get a core: on a 2-core VM that is several
    # times the idle latency (docs/PLANNER.md, run 10).
    weights = [torch.full((4096, 1024), 0.5) for _ in range(4)]
    x, send = torch.ones(4, 1024), torch.ones(ranks * 4, 1024)
    recv = torch.empty_like(send)

    def per_segment(call: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(30):
            torch.nn.functional.linear(x, weights[i % 4])
            if call:
                dist.all_to_all_single(recv, send)
        return (time.perf_counter() - t0) / 30

    alone, busy = [], []
    for _ in range(8):  # the median of 8 alternated pairs: what the ranks pay typically, not at best
        alone.append(per_segment(False))
        busy.append(per_segment(True))
    if rank == 0:
        added = sorted(b - a for a, b in zip(alone, busy))  # per pair of blocks: drift between pairs cancels
        out.put((small, large, max(added[len(added) // 2], small)))
    dist.destroy_process_group()


def probe_collectives(ranks: int = 2) -> CollectiveProbe:
    """gloo on 127.0.0.1: all_to_all_single's cost between compute segments on every rank (``latency_s``),
    and its median time on idle ranks at 1 and 256 rows of 1,024 floats per peer (idle latency, rate)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_collective_rank, args=(r, ranks, f"tcp://127.0.0.1:{port}", out))
             for r in range(ranks)]
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the children inherit it: gloo on loopback, as the local deployment
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved
    small, large, busy = out.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    sent = 256 * 1024 * 4 * (ranks - 1)  # bytes a rank sends to its peers in the large call
    return CollectiveProbe(latency_s=busy, gbps=sent / max(large - small, 1e-9) / 1e9, ranks=ranks,
                           idle_latency_s=small)


def cpu_device(probe: CPUProbe, small_kernels_per_layer: int, outside_calls_per_step: float,
               comm: CollectiveProbe | None = None, step_collectives: int = 0,
               dispatch_collectives: int = 2, weight_read_dtype: str | None = None,
               weight_read_max_rows: int = 0) -> Device:
    """This machine as a device: the probe's figures are what kernels reach (fractions 1, rows term measured).

    ``comm``: ranks in processes of this machine talking over gloo (pdserve's multi-rank CPU
    instances): every all_to_all costs its latency plus bytes at its rate; a dispatch is
    ``dispatch_collectives`` of them (counts, rows; or one padded exchange where the ranks agree on
    a bound: ``engine.model.dispatch.padded_fits``); ``step_collectives`` more per step (DP
    lock-step's "anyone busy"). ``weight_read_dtype``: what the kernel reads weights as at up to
    ``weight_read_max_rows`` rows per weight (``Device.weight_read_dtype``)."""
    # M/(M + h) = small / large at the probe's row count
    rows_half = 8 * max(probe.matmul_gflops / probe.small_matmul_gflops - 1, 0.0)
    bmm_half = 4 * max(probe.matmul_gflops / probe.small_bmm_gflops - 1, 0.0)
    eff = Efficiency(gemm_compute=1.0, gemm_k_overhead=0.0, gemm_memory=1.0, roofline_p=math.inf, tile_waves=False,
                     gemm_rows_half=rows_half, bmm_rows_half=bmm_half,
                     attn_compute=1.0, attn_memory=1.0, scale_out=1.0, scale_up=1.0,
                     comm_latency_s=comm.latency_s if comm else 0.0,
                     note="measured on this machine: fp32 GEMM rates and GEMV read bandwidth are the achievable figures")
    step_s = outside_calls_per_step * probe.op_us * 1e-6 + step_collectives * (comm.latency_s if comm else 0.0)
    backend = Backend(moe_kernel="padded", padded_max_rows=64, attn_kv_passes=4.0,
                      small_kernels_per_layer=small_kernels_per_layer, kernel_floor_s=probe.op_us * 1e-6,
                      comm_sms_prefill=0, step_overhead_s=step_s, dispatch_collectives=dispatch_collectives)
    tflops = probe.matmul_gflops / 1e3
    link = comm.gbps if comm else probe.read_gbps
    return Device(name="cpu", fp8_tflops=None, bf16_tflops=tflops, fp32_tflops=tflops, memory_gb=_memory_gb(),
                  hbm_gbps=probe.read_gbps, scale_up_gbps=link, scale_out_gbps=link,
                  gpus_per_node=1024, sms=1, price_per_hour=0.0, efficiency=eff, backend=backend,
                  compute_dtype="float32", weight_read_dtype=weight_read_dtype,
                  weight_read_max_rows=weight_read_max_rows,
                  sources={"all": f"measured by planner.hardware.probe_cpu on {probe.cpu} ({probe.threads} threads, "
                                  f"{' '.join(probe.flags)})"})


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return 16.0

"""pdserve's own CPU kernel for the matmuls of decode-sized batches: an fp32 grouped GEMM for x86-64
with AVX2 + FMA (``cpu_gemm.cpp``), ``y[t] = x[t] @ w[e(t)].T`` with the rows of ``x`` grouped by
``e`` (an expert, a head, or one weight for a plain projection).

Why: a decode step reads every weight it uses once (the routed experts: 1-4 rows each at batch 8-32 on
the bench preset; the projections and heads: one row per sequence), and MKL's ``bmm`` / ``sgemm`` and
oneDNN's prepacked matmul at 1-16 rows run far below the machine's memory bandwidth. The kernel streams
each weight's rows once, skips experts with no rows (no padding) and spreads (expert, block of weight
rows) items over torch's intra-op threads (compiled with OpenMP: without it ``at::parallel_for`` is a
serial loop). Used by the routed experts (``engine/model/moe.py``) and every fp32 projection, head and
router at up to ``layers.KERNEL_MAX_ROWS`` rows (``engine/model/layers.py``). The same module holds
what a decode step calls around them, each one call where torch makes several: ``head_gemm`` (the
absorbed MLA products per head, on strided views, ``engine/model/attention.py``), ``mla_decode`` (decode
attention itself, reading the latent rows where they lie in the paged cache), ``mla_prefill`` (a prefill
chunk's causal attention on the projections' views: fp32, or bf16 by AVX512-BF16), ``rms_norm``, ``route``
(the V3 router's top-k after its matmul) and ``moe_experts`` (a small step's routed experts, sort to
weighted sum); ``cpu_gemm.cpp`` says how each works. Measured side by side
on a 2-core AMD EPYC (AVX2 + FMA, no AVX-512 / AVX512-BF16 / AMX), fp32: 32 experts of the bench preset's ``w13``
[512, 1024] (67 MB, from DRAM), 4 rows per expert 3.6 ms vs ``bmm`` 7.7 ms, 1 row 3.3 vs 3.6 ms,
32 rows 21.6 vs 17.2 ms (hence ``GROUPED_MAX_ROWS`` in ``engine/model/moe.py``); the projections:
``layers.KERNEL_MAX_ROWS``.

A bf16 model on a CPU with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later)
has its bf16 rows multiplied by VDPBF16PS (32 bf16 pairs per instruction into fp32 sums) rather than widened
to fp32 for AVX2 FMAs: the experts, the absorbed products, the decode attention for every decode query, and
the projections at up to ``layers.DOT_MAX_ROWS`` rows (``bf16_dot()``; ``PDSERVE_CPU_KERNEL_BF16_DOT=0`` turns
it off). Side by side on a 2-core AMD EPYC with AVX512-BF16 (no AMX), bench preset, bf16: its routed experts at 8
tokens 0.5x the widened path's time, decode attention over 300 keys 0.5x. Its results equal the fp32
arithmetic on the same values to bf16's precision, not bit for bit.

An fp32 model's weights are also kept in column tiles (``col_layout``: 32 output columns a tile, each a
contiguous stream of K vectors, multiplied as outer products) for the projections, heads, router, routed experts
and W_UK / W_UV at decode sizes (``col_tiles()``; ``PDSERVE_CPU_KERNEL_COL_TILES=0`` turns them off); the code runs
in 16 lanes on a CPU with AVX-512 and in 8 elsewhere (``avx512()``), as do the fp32 prefill attention and the
decode attention's heads-in-lanes path (AVX-512 only). ``PDSERVE_CPU_MAX_ISA=avx2`` (``engine/dtype_choice.py``)
keeps the kernel to its AVX2 + FMA code, as on a CPU without AVX-512.

Built on first use by ``torch.utils.cpp_extension`` (a C++ compiler and ninja; ~40 s on 2 cores,
once: the build is cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``,
and concurrent processes wait on its lock). ``load()`` returns the module or None; when the CPU
lacks AVX2/FMA, the build fails or ``PDSERVE_CPU_KERNELS=0``, the reason is logged once and the
callers keep torch's kernels.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import ModuleType

import torch

from engine.dtype_choice import cpu_flags

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemm.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": ModuleType | None once tried, "reason": why not


def _why_not() -> str | None:
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        return "PDSERVE_CPU_KERNELS=0"
    flags = cpu_flags()
    if flags is None:
        return "the CPU's flags are unreadable (no /proc/cpuinfo), AVX2 + FMA unknown"
    missing = {"avx2", "fma"} - flags
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return None


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as build

    # torch runs `ninja` from PATH; the `ninja` dependency installs it beside this interpreter, which
    # is not on PATH when the venv is not activated.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
    try:
        # No -march=native: the cached binary may be loaded on another CPU model of the same image;
        # AVX2 + FMA is what the kernel needs and what _why_not() checked. -fopenmp: without it
        # at::parallel_for's pragma compiles to a serial loop (one thread: half the bandwidth of two on
        # a 2-core EPYC); the OpenMP runtime it binds to is the libgomp.so.1 torch has loaded already.
        return build("pdserve_cpu_gemm", [_SOURCE], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                     extra_ldflags=["-fopenmp"], verbose=False)
    finally:
        os.environ["PATH"] = path


def load() -> ModuleType | None:
    """The built kernel module, or None (the reason logged once, and kept in ``unavailable_reason()``)."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module, reason = None, _why_not()
        if reason is None:
            try:
                module = _build()
            except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a failed build: keep torch's kernels)
                last = (str(e).strip().splitlines() or [""])[-1][:300]  # the compiler's last line
                reason = f"the kernel did not build ({type(e).__name__}: {last})"
        if module is None:
            log.warning("CPU kernel off, decode-sized matmuls use torch's bmm/sgemm/oneDNN: %s", reason)
        else:
            # The C++ side asks the CPU itself; cpu_flags() also knows PDSERVE_CPU_MAX_ISA.
            flags = cpu_flags() or set()
            if os.environ.get("PDSERVE_CPU_KERNEL_BF16_DOT", "1") == "0" or "avx512_bf16" not in flags:
                module.set_bf16_dot(False)
            if not {"avx512f", "avx512bw"} <= flags:
                module.set_avx512(False)
            if os.environ.get("PDSERVE_CPU_KERNEL_COL_TILES", "1") == "0":
                module.set_col_tiles(False)
            log.info("CPU kernel loaded for decode-sized matmuls (engine/kernels/cpu_gemm.cpp, AVX2 + FMA%s%s%s)",
                     ", AVX-512" if module.avx512_enabled() else "",
                     "; a bf16 model's products by AVX512-BF16" if module.bf16_dot_enabled() else "",
                     "; an fp32 model's weights in column tiles" if module.col_tiles_enabled() else "")
        _state.update(module=module, reason=reason)
        return module


def unavailable_reason() -> str | None:
    return _state.get("reason")  # type: ignore[return-value]


def bf16_dot() -> bool:
    """Whether the loaded kernel runs bf16 rows times bf16 weights through AVX512-BF16's VDPBF16PS (where the CPU
    has it, unless ``PDSERVE_CPU_KERNEL_BF16_DOT=0`` or ``set_bf16_dot(False)``), rather than widening them."""
    module = _state.get("module")
    return module is not None and module.bf16_dot_enabled()  # type: ignore[attr-defined]


def set_bf16_dot(on: bool) -> bool:
    """Turn the AVX512-BF16 products on (only where the CPU has them) or off, for side-by-side runs and tests;
    returns the previous setting. ``load()`` must have succeeded."""
    return _module().set_bf16_dot(on)  # type: ignore[attr-defined]


def kernel():
    """``grouped_gemm`` once ``load()`` succeeds (building it if needed), else None."""
    return grouped_gemm if load() is not None else None


def _module() -> ModuleType:
    module = _state.get("module")
    if module is None:
        raise RuntimeError(f"CPU kernel unavailable: {unavailable_reason() or 'load() not called'}")
    return module  # type: ignore[return-value]


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x [T, K]`` (rows grouped by expert, ``counts[e]`` each, in expert order) times ``w [E, N, K]``
    -> ``[T, N]`` in x's dtype: row t times ``w[expert of t].T``. CPU tensors: ``w`` fp32 or bf16, ``x`` fp32,
    or bf16 (AVX512-BF16 products with bf16 weights where ``bf16_dot()``, else widened to fp32 and the result
    rounded back); ``w`` may be in ``col_layout`` (``[E, N/32, K, 32]``, while ``col_tiles()``; bf16 ``x`` widened).
    ``load()`` must have succeeded."""
    if w.dim() == 3 and (w.stride(2) != 1 or w.stride(1) != w.shape[2]):
        w = w.contiguous()  # experts may sit apart (a stride between them), each one's rows must be dense
    return _module().grouped_gemm(x.contiguous(), w, counts)  # type: ignore[attr-defined]


def gemm_argmax(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``grouped_gemm(x, w[None], [T]).argmax(-1)`` without the ``[T, N]`` product: the column of each row's
    largest value, the values compared as ``grouped_gemm`` returns them (a bf16 ``x``'s rounded to bf16) and the
    first of equal ones taken -> ``[T]`` int64 (a draft head's tokens). ``w [N, K]``; ``load()`` must have
    succeeded."""
    return _module().gemm_argmax(x.contiguous(), w[None])  # type: ignore[attr-defined]


def moe_experts(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                load: torch.Tensor | None = None) -> torch.Tensor:
    """A step's routed experts on one rank, whole: ``x [T, D]``, each token's ``slots [T, k]`` (int64) and
    ``weights [T, k]`` -> ``[T, D]``, the weighted sum of its experts' SiLU MLPs (``w13 [E, 2I, D]`` = gate
    then up, ``w2 [E, D, I]``; fp32 or bf16 holding exact values; both may be in ``col_layout``, as in
    ``grouped_gemm``); ``load [E]`` (int64), where given, gets
    each slot's copies added. ``x`` fp32, or bf16 (as in ``grouped_gemm``); the result in x's dtype. ``load()``
    must have succeeded."""
    return _module().moe_experts(x.contiguous(), slots, weights, w13, w2, load)  # type: ignore[attr-defined]


def head_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, H, K]`` times each head's ``w [H, N, K]`` transposed -> ``[M, H, N]``, written into ``out`` where
    given (any row and head strides, the last dim dense: e.g. a slice of a wider tensor), read from ``x`` in
    place. ``x`` fp32, or bf16 (as in ``grouped_gemm``); ``out`` fp32; ``w`` fp32 or bf16 holding exact values,
    or bf16 in ``pair_layout`` (bf16 ``x`` by the AVX512-BF16 products while ``bf16_dot()``, else widened to
    fp32), or either in ``col_layout`` (while ``col_tiles()``; bf16 ``x`` widened). ``load()`` must have
    succeeded."""
    if out is None:
        n = w.shape[1] * (PAIR_TILE if w.dim() == 5 else COL_TILE) if w.dim() > 3 else w.shape[1]
        out = x.new_empty(x.shape[0], x.shape[1], n, dtype=torch.float32)
    _module().head_gemm(x, w, out)  # type: ignore[attr-defined]
    return out


PAIR_TILE = 32  # weight rows per tile of pair_layout
COL_TILE = 32  # weight rows (output columns) per tile of col_layout


def col_tiles() -> bool:
    """Whether the loaded kernel takes weights in ``col_layout`` (unless ``PDSERVE_CPU_KERNEL_COL_TILES=0`` or
    ``set_col_tiles(False)``): AVX-512 code where ``avx512()``, else AVX2 + FMA."""
    module = _state.get("module")
    return module is not None and module.col_tiles_enabled()  # type: ignore[attr-defined]


def set_col_tiles(on: bool) -> bool:
    """Turn the column-tile layout on or off, for side-by-side runs and tests; returns the previous setting.
    Weights already laid out keep their layout, which the kernel refuses while the tiles are off: lay them out
    again (the model's ``use_cpu_kernels()``). ``load()`` must have succeeded."""
    return _module().set_col_tiles(on)  # type: ignore[attr-defined]


def avx512() -> bool:
    """Whether the loaded kernel's fp32 paths written for both vector widths (column tiles, prefill attention)
    and its decode attention with the heads in the lanes run AVX-512 code: a CPU with AVX-512F and BW, unless
    ``PDSERVE_CPU_MAX_ISA=avx2`` or ``set_avx512(False)``."""
    module = _state.get("module")
    return module is not None and module.avx512_enabled()  # type: ignore[attr-defined]


def set_avx512(on: bool) -> bool:
    """Turn that AVX-512 code on (only where the CPU has it) or off, for side-by-side runs and tests; returns the
    previous setting. Results are the same bit for bit either way. ``load()`` must have succeeded."""
    return _module().set_avx512(on)  # type: ignore[attr-defined]


def col_fits(w: torch.Tensor) -> bool:
    """Whether ``col_layout`` takes this per-head weight ``[H, N, K]``: fp32 or bf16, N a multiple of 32, and
    the kernel's column tiles on (``col_tiles()``)."""
    return (w.dim() == 3 and w.dtype in (torch.float32, torch.bfloat16) and w.shape[1] % COL_TILE == 0
            and col_tiles())


# head_gemm on column tiles up to this many rows, torch's bmm past it. Bench preset's W_UK / W_UV (16 heads),
# fp32, weights from memory, 2-core AMD EPYC with AVX-512 and AVX512-BF16, no AMX, side by side in one process:
# 8 rows 0.72x / 0.52x the time of grouped_gemm's tiles (the path to 16 rows before), 32 rows 0.72x / 0.62x
# bmm's, 512 rows 0.91x / 0.81x, 2048 rows 1.13x / 0.86x. The same machine capped at AVX2 (both products of 4
# layers together, against bmm): 8 rows 0.50x, 32 rows 0.74x, 128 rows 0.91x, 512 rows 0.94x, 2048 rows 1.08x
COL_MAX_ROWS = 512


def col_layout(w: torch.Tensor) -> torch.Tensor:
    """Per-head weights ``w [H, N, K]`` as the kernel's column tiles read them (fp32 rows):
    ``[H, N/32, K, 32]``, each tile of 32 weight rows one contiguous stream of K vectors of its 32 columns
    (``cpu_gemm.cpp`` says why). A copy; ``col_fits(w)`` must hold."""
    heads, n, k = w.shape
    return w.detach().reshape(heads, n // COL_TILE, COL_TILE, k).transpose(2, 3).contiguous()


def pair_fits(w: torch.Tensor) -> bool:
    """Whether ``pair_layout`` takes this per-head weight ``[H, N, K]``: bf16, N a multiple of 32, K of 8."""
    return w.dim() == 3 and w.dtype == torch.bfloat16 and w.shape[1] % PAIR_TILE == 0 and w.shape[2] % 8 == 0


def pair_layout(w: torch.Tensor) -> torch.Tensor:
    """Per-head weights ``w [H, N, K]`` (bf16) as ``head_gemm``'s AVX512-BF16 products read them fastest:
    ``[H, N/32, K/2, 32, 2]``, each tile of 32 weight rows one stream of K/2 vectors holding the 32 rows'
    weights at k = 2i, 2i + 1 side by side (``cpu_gemm.cpp`` says why). A copy; ``pair_fits(w)`` must hold."""
    heads, n, k = w.shape
    return (w.detach().reshape(heads, n // PAIR_TILE, PAIR_TILE, k // 2, 2).permute(0, 1, 3, 2, 4)
            .contiguous())


def mla_decode(q: torch.Tensor, cache_rows: torch.Tensor, slots: torch.Tensor, seq: torch.Tensor, keys: torch.Tensor,
               rank: int, scale: float) -> torch.Tensor:
    """Absorbed MLA decode attention, reading the latent rows where they lie in the paged cache:
    ``q [M, H, R + Dr]`` (absorbed queries), ``cache_rows [S, R + Dr]`` (a layer's cache, flat), query m
    attends the first ``keys[m]`` rows listed in ``slots[seq[m]]`` -> ``[M, H, R]`` (latent outputs,
    before ``W_UV``). fp32 queries; the cache fp32, or bf16 (rows widened to fp32 in registers); ``load()`` must
    have succeeded."""
    return _module().mla_decode(q.contiguous(), cache_rows, slots.contiguous(), seq, keys, rank,  # type: ignore[attr-defined]
                                scale)


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
    """MLA's expanded (naive) attention of a prefill chunk, causal: ``q_nope [Q, H, Dn]``, ``q_pe [Q, H, Dr]``,
    ``k_nope [L, H, Dn]``, ``k_pe [L, Dr]`` (shared by the heads), ``v [L, H, Dv]``, views with any row and head
    strides (the last dim dense); query i sits at position L - Q + i and attends keys 0 .. L - Q + i.
    -> ``[Q, H, Dv]`` in their dtype: fp32 by AVX2 + FMA (AVX-512 where ``avx512()``), or bf16 by the
    AVX512-BF16 products (only while ``bf16_dot()``; Dn, Dr even). Dv a multiple of 32 (``prefill_fits``)."""
    return _module().mla_prefill(q_nope, q_pe, k_nope, k_pe, v, scale)  # type: ignore[attr-defined]


# fp32 prefill attention through mla_prefill up to this many keys; torch's fused attention past it. Bench preset
# (16 heads, causal, the naive pass's views), fp32, 2-core AMD EPYC with AVX-512 and AVX512-BF16, no AMX, one
# after the other:
# 256 keys 3.1-4.2 vs 8.3-11.0 ms, 1024 51-67 vs 81 ms, 2048 193-230 vs 200-218 ms, 4096 860-990 vs 830 ms
# (the kernel re-reads a head's keys for every 16 queries, from L3 once they outgrow L2)
FP32_PREFILL_MAX_KEYS = 2048


def prefill_fits(q_nope: torch.Tensor, q_pe: torch.Tensor, v_dim: int, keys: int) -> bool:
    """Whether ``mla_prefill`` takes this pass: CPU tensors, values a multiple of 32 wide, and fp32 over at
    most ``FP32_PREFILL_MAX_KEYS`` keys, or bf16 with even key dims while the AVX512-BF16 products are on."""
    if q_nope.device.type != "cpu" or v_dim % 32:
        return False
    if q_nope.dtype == torch.float32:
        return keys <= FP32_PREFILL_MAX_KEYS
    return q_nope.dtype == torch.bfloat16 and q_nope.shape[-1] % 2 == 0 and q_pe.shape[-1] % 2 == 0 and bf16_dot()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of fp32 rows ``x [..., D]`` (rows may sit apart, the last dim dense) with ``weight [D]``: one
    call instead of ATen's six on the CPU (``cpu_gemm.cpp`` says what it saves). ``load()`` must have succeeded."""
    return _module().rms_norm(x, weight, eps)  # type: ignore[attr-defined]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """``x [T, ..., dim]`` (fp32 or bf16) rotated by ``cos``, ``sin [T, dim / 2]`` (fp32): what
    ``RotaryEmbedding.forward`` computes, rounded the same, in one call. ``load()`` must have succeeded."""
    return _module().rope(x, cos, sin, interleave)  # type: ignore[attr-defined]


def route(logits: torch.Tensor, bias: torch.Tensor | None, groups: int, topk_groups: int, k: int, renormalize: bool,
          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing after the router matmul, one call for all tokens: ``logits [T, E]`` fp32 ->
    (``ids [T, k]`` int64, ``weights [T, k]`` fp32), what ``Gate.forward``'s sigmoid path computes (sigmoid
    scores, ``bias`` added for the choice, ``topk_groups`` of ``groups`` kept, the ``k`` best, their scores
    renormalized or not, times ``scaling``). ``load()`` must have succeeded."""
    return _module().route(logits, bias, groups, topk_groups, k, renormalize, scaling)  # type: ignore[attr-defined]


if __name__ == "__main__":  # build (or find) the kernel once: tools/dev.sh setup runs this
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load()

"""Step time of one prefill instance and one decode instance, layer by layer.

An instance is ``tp x dp`` GPUs: ``dp`` attention replicas (data-parallel attention,
each a TP group of ``tp`` GPUs; MLA caches the latent once per replica, so TP does not
split the KV cache) and the routed experts spread over ``ep`` of them. Sizes are
counted per *replica* (tokens or sequences one attention replica handles per step) and
every time is the busiest GPU's, because ranks meet at each layer's all_to_all.

Per layer, for one micro-batch on the busiest GPU (``LayerOps``):

    attn_in   q down/up projections, kv down projection, W_UK absorption (decode), the
              layer's small kernels (norms, rope, quantization, routing, residuals)
    attn_core core attention (FlashMLA-style absorbed over the latent in decode, naive
              multi-head over expanded K/V in prefill) x data-parallel imbalance,
              W_UV absorption, output projection, TP all-reduce, router gate
    shared    shared experts (dense MLP on dense layers)
    experts   routed experts of the busiest EP rank (x expert skew)
    dispatch, combine   all_to_all over NVLink inside a node and the NIC across nodes

and the layer takes, with dual-batch overlap (DeepSeek's Day 6 figures, half batches):

    prefill: max(A+S, C) + max(A, D) + max(E, D) + max(E+S, C)   compute on SMs - comm SMs
    decode:  2 x [max(S+A0, D) + E + max(A1, C)]                  comm holds no SMs

and without it A0 + A1 + S + E + D + C on the whole batch. A step adds the MTP draft
layer(s), the LM head and a fixed per-step cost. GEMMs follow a roofline with the
device family's efficiency (``planner.hardware``); skew comes from ``planner.experts``.
"""

from __future__ import annotations

import dataclasses
import math

from planner.experts import eplb_policy, expert_rows_max, skews
from planner.hardware import Device
from planner.model_shape import BYTES, ModelShape
from planner.workload import Load, dp_imbalance

TERMS = ("attention", "projections", "shared+dense MLP", "routed experts", "dispatch", "combine", "TP comm",
         "small kernels", "LM head", "step overhead")


@dataclasses.dataclass(frozen=True)
class Parallel:
    tp: int = 1
    dp: int = 1
    ep: int = 1
    redundant: int = 0

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    def validate(self, shape: ModelShape) -> None:
        if min(self.tp, self.dp, self.ep) < 1 or self.redundant < 0:
            raise ValueError(f"bad parallel layout {self}")
        if self.ep not in (1, self.gpus):
            raise ValueError(f"ep must be 1 or tp x dp = {self.gpus}, got {self.ep}")
        if self.redundant and self.ep == 1:
            raise ValueError("redundant experts need ep > 1")
        if shape.experts and (shape.experts + self.redundant) % self.ep:
            raise ValueError(f"{shape.experts} + {self.redundant} redundant experts do not divide over ep={self.ep}")
        if shape.heads % self.tp:
            raise ValueError(f"{shape.heads} heads do not split over tp={self.tp}")


@dataclasses.dataclass(frozen=True)
class Features:
    dbo: bool = True  # dual-batch overlap
    fp8: bool = True  # FP8 weights and matmuls (where the device has FP8 tensor cores)
    fp8_dispatch: bool = True  # FP8 dispatch payload; combine stays BF16
    kv_dtype: str | None = None  # None = the device's compute dtype; "fp8" = FlashMLA's FP8 layout
    mtp_drafts: int = 0  # MTP draft tokens verified per step
    mtp_acceptance: float = 0.85  # acceptance of each draft position (DeepSeek-V3 report: 85-90% for the 2nd token)
    eplb: bool = True
    popularity_cv: float = 1.0  # expert popularity spread (planner.experts)
    skew: float | None = None  # measured max/mean token copies per EP rank; None = modelled from the two above
    kv_balancer: bool = True  # requests placed on the least-loaded attention replica

    @property
    def tokens_per_step(self) -> float:
        """Accepted tokens per sequence per decode step: 1 + a + a^2 + ... over the drafts."""
        return 1.0 + sum(self.mtp_acceptance ** i for i in range(1, self.mtp_drafts + 1))


@dataclasses.dataclass
class StepResult:
    phase: str
    time_s: float
    per_replica: float  # prefill: new tokens per replica per step; decode: sequences per replica
    tokens_per_gpu_s: float  # prefill: computed tokens/s; decode: output tokens/s
    user_tok_s: float  # decode: tokens/s one sequence sees; prefill: 0
    terms: dict[str, float]  # seconds per term, as if nothing overlapped
    skew: float
    dp_imbalance: float

    @property
    def hidden_s(self) -> float:
        """Time the overlap hid: the serial sum of the terms minus the step."""
        return sum(self.terms.values()) - self.time_s


@dataclasses.dataclass
class LayerOps:
    attn_in: float = 0.0
    attn_core: float = 0.0
    shared: float = 0.0
    experts: float = 0.0
    dispatch: float = 0.0
    combine: float = 0.0
    skew: float = 1.0  # busiest EP rank's token copies / the mean
    terms: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))

    def add(self, slot: str, term: str, seconds: float) -> None:
        setattr(self, slot, getattr(self, slot) + seconds)
        self.terms[term] += seconds


def roofline(t_compute: float, t_memory: float, p: float) -> float:
    if math.isinf(p):
        return max(t_compute, t_memory)
    return (t_compute ** p + t_memory ** p) ** (1 / p)


def rows_use(m: float, rows_half: float) -> float:
    """CPU GEMM efficiency at ``m`` rows; one row runs as a GEMV (bandwidth-bound, not slowed)."""
    return 1.0 if rows_half <= 0 or m <= 1 else m / (m + rows_half)


def tile_use(groups: float, m: float, n: float, sms: float) -> float:
    """Best fraction of useful work over whole waves of output tiles (tile shapes as DeepGEMM picks them)."""
    best = 0.0
    sms = max(int(sms), 1)
    for bm in ((64,) if m <= 64 else (64, 128)):
        for bn in (64, 96, 128, 160, 192, 256):
            tiles = math.ceil(groups) * math.ceil(m / bm) * math.ceil(n / bn)
            best = max(best, groups * m * n / (math.ceil(tiles / sms) * sms * bm * bn))
    return best


class Simulator:
    def __init__(self, shape: ModelShape, device: Device, par: Parallel, feat: Features):
        par.validate(shape)
        self.shape, self.device, self.par, self.feat = shape, device, par, feat
        self.eff, self.backend = device.efficiency, device.backend
        self.act = device.compute_dtype  # activations, attention, LM head
        self.w = "fp8" if feat.fp8 and device.fp8_tflops else device.compute_dtype
        self.kv = feat.kv_dtype or device.compute_dtype
        self.nodes = math.ceil(par.gpus / device.gpus_per_node)

    # ---- primitives ---------------------------------------------------------------------
    def gemm(self, m: float, n: float, k: float, dtype: str, count: float = 1.0, share: float = 1.0) -> float:
        """Time of ``count`` [m x k] @ [k x n] GEMMs reading [k x n] weights of ``dtype`` on ``share`` of the SMs."""
        if m <= 0 or count <= 0:
            return 0.0
        a, e, d = BYTES[self.act], self.eff, self.device
        flops = 2.0 * m * n * k * count
        read = d.weight_read_dtype if d.weight_read_dtype and dtype == d.compute_dtype and m <= d.weight_read_max_rows \
            else dtype
        nbytes = count * (n * k * BYTES[read] + m * k * a + m * n * a)
        if e.tile_waves:
            use = tile_use(count, m, n, self.device.sms * share)
        else:
            use = rows_use(m, e.bmm_rows_half if count > 1 else e.gemm_rows_half)
        peak = self.device.matmul_tflops(dtype) * 1e12 * e.gemm_compute * share * k / (k + e.gemm_k_overhead) * use
        return roofline(flops / peak, nbytes / (self.device.hbm_gbps * 1e9 * e.gemm_memory), e.roofline_p)

    def attention(self, flops: float, nbytes: float, share: float, rows: float) -> float:
        """Core attention; ``rows`` = query rows one context is multiplied with (heads x queries)."""
        e = self.eff
        use = rows_use(rows, e.bmm_rows_half)
        return roofline(flops / (self.device.matmul_tflops(self.act) * 1e12 * e.attn_compute * share * use),
                        nbytes / (self.device.hbm_gbps * 1e9 * e.attn_memory), e.roofline_p)

    @property
    def eplb_policy(self) -> str:
        """The EPLB policy DeepSeek's rule picks for this instance (planner.experts.eplb_policy)."""
        c = self.shape.cfg
        return eplb_policy(self.shape.experts, c.n_group or 1, self.nodes, self.feat.eplb)

    def remote_nodes_per_token(self) -> float:
        """Remote nodes one token's experts lie on (what a node-deduplicating dispatch sends over the NIC).

        Global placement: the top-k experts sit on independent random nodes. Hierarchical
        placement: they lie in ``topk_group`` of ``n_group`` groups, whole groups per node,
        so a remote node is reached when one of its groups is among the chosen ones.
        """
        n, c = self.nodes, self.shape.cfg
        if n <= 1:
            return 0.0
        if self.eplb_policy == "hierarchical" and c.topk_method in ("noaux_tc", "group_limited_greedy"):
            per_node = c.n_group // n
            return (n - 1) * (1 - math.comb(c.n_group - per_node, c.topk_group) / math.comb(c.n_group, c.topk_group))
        return (n - 1) * (1 - (1 - 1 / n) ** self.shape.top_k)

    def all_to_all(self, copies: float, tokens: float, msg_bytes: float, rank_skew: float, node_skew: float,
                   dedup_nodes: bool) -> float:
        """One dispatch or combine on the busiest rank: ``copies`` token copies of ``msg_bytes`` each.

        Low-latency kernels (decode) send every copy straight to the expert's rank, so the
        busiest rank's NIC sets the time (rank skew). Normal kernels (prefill) send a token once
        per remote node to the same-index GPU there and fan it out over NVLink (DeepEP): the
        NIC traffic follows the busiest node (node skew), the NVLink leg the busiest rank.
        """
        if self.par.ep <= 1 or copies <= 0:
            return 0.0
        n = self.nodes
        nic_skew = rank_skew
        if n <= 1:
            nic, nvl = 0.0, copies * msg_bytes * (1 - 1 / self.par.ep)
        elif dedup_nodes:
            nic, nvl = tokens * self.remote_nodes_per_token() * msg_bytes, copies * msg_bytes
            nic_skew = node_skew
        else:
            nic, nvl = copies * msg_bytes * (n - 1) / n, copies * msg_bytes / n
        t = max(nic * nic_skew / (self.device.scale_out_gbps * 1e9 * self.eff.scale_out),
                nvl * rank_skew / (self.device.scale_up_gbps * 1e9 * self.eff.scale_up))
        return self.eff.comm_latency_s + t

    # ---- one layer ----------------------------------------------------------------------
    def layer(self, rows: float, phase: str, moe: bool, attn: dict[str, float], share: float) -> LayerOps:
        """Ops of one layer for ``rows`` tokens of one replica (one micro-batch)."""
        s, c, tp = self.shape, self.shape.cfg, self.par.tp
        a = BYTES[self.act]
        ops = LayerOps()
        heads = s.heads / tp
        # attention in: q / kv projections (q_a and kv_a are replicated over TP)
        proj = (self.gemm(rows, c.q_lora_rank, c.hidden_size, self.w, share=share) if c.q_lora_rank else 0.0)
        proj += self.gemm(rows, s.q_b_params / (c.q_lora_rank or c.hidden_size) / tp, c.q_lora_rank or c.hidden_size,
                          self.w, share=share)
        proj += self.gemm(rows, s.latent_width, c.hidden_size, self.w, share=share)
        if phase == "decode":  # q_nope @ W_UK per head
            proj += self.gemm(rows, c.kv_lora_rank, c.qk_nope_head_dim, self.act, count=heads, share=share)
        ops.add("attn_in", "projections", proj)
        inter = (c.num_experts_per_tok * c.moe_intermediate_size + c.moe_intermediate_size * c.n_shared_experts
                 if moe else c.intermediate_size)
        small_bytes = rows * a * (12 * c.hidden_size + (2 * c.num_experts_per_tok * c.hidden_size if moe else 0)
                                  + 3 * inter)
        small = max(small_bytes / (self.device.hbm_gbps * 1e9 * self.eff.gemm_memory),
                    self.backend.small_kernels_per_layer * self.backend.kernel_floor_s)
        ops.add("attn_in", "small kernels", small)
        # core attention (x imbalance across replicas), output side
        ops.add("attn_core", "attention",
                self.attention(attn["flops"] / tp, attn["bytes"], share, attn["rows"] / tp) * attn["imbalance"])
        out = 0.0
        if phase == "decode":  # latent @ W_UV per head
            out += self.gemm(rows, c.v_head_dim, c.kv_lora_rank, self.act, count=heads, share=share)
        else:  # naive prefill: expand the context's latent (new + cached rows) through kv_b
            out += self.gemm(attn["expand_rows"], s.kv_b_params / c.kv_lora_rank / tp, c.kv_lora_rank, self.w,
                             share=share)
        out += self.gemm(rows, c.hidden_size, s.o_params / c.hidden_size / tp, self.w, share=share)
        if moe:
            out += self.gemm(rows / tp, s.experts, c.hidden_size, "float32", share=share)  # router, fp32
        ops.add("attn_core", "projections", out)
        if tp > 1:
            ar = rows * c.hidden_size * a * 2 * (tp - 1) / tp
            ops.add("attn_core", "TP comm",
                    self.eff.comm_latency_s + ar / (self.device.scale_up_gbps * 1e9 * self.eff.scale_up))
        # shared experts / dense MLP (split over TP)
        mlp = c.moe_intermediate_size * c.n_shared_experts if moe else c.intermediate_size
        if mlp:
            ops.add("shared", "shared+dense MLP",
                    self.gemm(rows, 2 * mlp / tp, c.hidden_size, self.w, share=share)
                    + self.gemm(rows, c.hidden_size, mlp / tp, self.w, share=share))
        if moe:
            self._moe(ops, rows / tp, phase, share)
        return ops

    def _moe(self, ops: LayerOps, tokens: float, phase: str, share: float) -> None:
        """Routed experts and their all_to_all for ``tokens`` tokens per GPU."""
        s, c, f, par = self.shape, self.shape.cfg, self.feat, self.par
        k = s.top_k
        slots = (s.experts + par.redundant) // par.ep if par.ep > 1 else s.experts
        copies = tokens * k
        if f.skew is not None:
            skew = node_skew = f.skew
        else:
            skew, node_skew = skews(s.experts, par.redundant, par.ep, f.popularity_cv, f.eplb, copies, self.nodes,
                                    c.n_group or 1)
        hot = copies * skew
        rows = hot / slots
        b = self.backend
        if b.moe_kernel == "padded":
            max_rows = expert_rows_max(s.experts, par.redundant, par.ep, f.popularity_cv, f.eplb, tokens, k)
            if max_rows <= b.padded_max_rows:
                rows = max_rows
        ops.add("experts", "routed experts",
                self.gemm(rows, 2 * c.moe_intermediate_size, c.hidden_size, self.w, count=slots, share=share)
                + self.gemm(rows, c.hidden_size, c.moe_intermediate_size, self.w, count=slots, share=share))
        a = BYTES[self.act]
        dispatch_msg = c.hidden_size * (1 + 4 / 128) if f.fp8_dispatch and self.w == "fp8" else c.hidden_size * a
        dedup = phase == "prefill"
        if par.ep > 1:  # collectives ahead of the rows (pdserve's gloo path exchanges per-slot counts first)
            ops.add("dispatch", "dispatch", (b.dispatch_collectives - 1) * self.eff.comm_latency_s)
        ops.add("dispatch", "dispatch", self.all_to_all(copies, tokens, dispatch_msg, skew, node_skew, dedup))
        ops.add("combine", "combine", self.all_to_all(copies, tokens, c.hidden_size * a, skew, node_skew, dedup))
        ops.skew = skew

    # ---- layer schedules ----------------------------------------------------------------
    def moe_layer_time(self, rows: float, phase: str, attn: dict[str, float]) -> tuple[float, LayerOps]:
        overlap = self.feat.dbo and self.par.ep > 1
        if not overlap:
            ops = self.layer(rows, phase, True, attn, 1.0)
            return (ops.attn_in + ops.attn_core + ops.shared + ops.experts + ops.dispatch + ops.combine), ops
        half = {key: (v / 2 if key in ("flops", "bytes", "expand_rows") else v) for key, v in attn.items()}
        if phase == "prefill":
            share = 1 - self.backend.comm_sms_prefill / self.device.sms
            o = self.layer(rows / 2, phase, True, half, share)
            a_, s_, e_, d_, c_ = o.attn_in + o.attn_core, o.shared, o.experts, o.dispatch, o.combine
            t = max(a_ + s_, c_) + max(a_, d_) + max(e_, d_) + max(e_ + s_, c_)
        else:
            o = self.layer(rows / 2, phase, True, half, 1.0)
            t = 2 * (max(o.shared + o.attn_in, o.dispatch) + o.experts + max(o.attn_core, o.combine))
        o.terms = {key: 2 * v for key, v in o.terms.items()}  # two micro-batches
        return t, o

    def dense_layer_time(self, rows: float, phase: str, attn: dict[str, float]) -> tuple[float, LayerOps]:
        ops = self.layer(rows, phase, False, attn, 1.0)
        return ops.attn_in + ops.attn_core + ops.shared, ops

    def _forward(self, rows: float, phase: str, attn: dict[str, float], layers_moe: int, layers_dense: int,
                 terms: dict[str, float]) -> tuple[float, float]:
        total, skew = 0.0, 1.0
        for count, fn in ((layers_moe, self.moe_layer_time), (layers_dense, self.dense_layer_time)):
            if count:
                t, ops = fn(rows, phase, attn)
                total += count * t
                skew = max(skew, ops.skew)
                for key, v in ops.terms.items():
                    terms[key] += count * v
        return total, skew

    def head(self, rows: float) -> float:
        c = self.shape.cfg
        return self.gemm(rows, c.vocab_size / self.par.tp, c.hidden_size, self.act)

    # ---- steps --------------------------------------------------------------------------
    def prefill_step(self, tokens_per_replica: float, load: Load) -> StepResult:
        s, f = self.shape, self.feat
        h = load.cache_hit
        requests = tokens_per_replica / load.new_tokens_per_request
        imb = dp_imbalance(requests, self.par.dp, load.input.cv,
                           load.input.quantile(1 - 1 / max(2.0, requests * self.par.dp)) / load.input.mean,
                           f.kv_balancer)
        ctx = load.prefill_context_per_new_token
        cached = tokens_per_replica * h / (1 - h)
        attn = {"flops": tokens_per_replica * ctx * s.attn_flops_per_ctx(absorbed=False),
                "bytes": cached * s.latent_width * BYTES[self.kv], "expand_rows": tokens_per_replica + cached,
                "imbalance": imb, "rows": s.heads * min(tokens_per_replica, load.new_tokens_per_request)}
        terms = dict.fromkeys(TERMS, 0.0)
        mtp = s.n_mtp_layers if f.mtp_drafts else 0  # the prompt's MTP-layer KV is prefilled too
        t, skew = self._forward(tokens_per_replica, "prefill", attn, s.n_moe_layers + mtp, s.n_dense_layers, terms)
        head = self.head(requests)
        terms["LM head"] += head
        terms["step overhead"] += self.backend.step_overhead_s
        t += head + self.backend.step_overhead_s
        return StepResult("prefill", t, tokens_per_replica, tokens_per_replica / self.par.tp / t, 0.0, terms, skew,
                          imb)

    def decode_step(self, seqs_per_replica: float, load: Load) -> StepResult:
        s, f = self.shape, self.feat
        b = seqs_per_replica
        q = 1 + f.mtp_drafts  # query tokens per sequence (verify)
        kv = load.decode_kv_mean
        imb = dp_imbalance(b, self.par.dp, load.decode_kv_cv,
                           load.decode_kv_quantile_over_mean(1 - 1 / max(2.0, b * self.par.dp)), f.kv_balancer)
        kv_bytes = b * kv * s.latent_width * BYTES[self.kv] * self.backend.attn_kv_passes
        if self.kv == "fp8":
            kv_bytes *= 656 / (s.latent_width * BYTES["fp8"])
        attn = {"flops": b * q * kv * s.attn_flops_per_ctx(absorbed=True), "bytes": kv_bytes, "expand_rows": 0.0,
                "imbalance": imb, "rows": s.heads * q}
        terms = dict.fromkeys(TERMS, 0.0)
        t, skew = self._forward(b * q, "decode", attn, s.n_moe_layers, s.n_dense_layers, terms)
        head = self.head(b * q)
        if f.mtp_drafts and s.n_mtp_layers:  # each draft: eh_proj, one MoE layer, the shared head
            c = s.cfg
            draft_attn = {**attn, "flops": b * kv * s.attn_flops_per_ctx(absorbed=True), "rows": s.heads}
            for _ in range(f.mtp_drafts):
                layer_t, ops = self.moe_layer_time(b, "decode", draft_attn)
                t += layer_t
                for key, v in ops.terms.items():
                    terms[key] += v
                proj = self.gemm(b, c.hidden_size, 2 * c.hidden_size, self.w)
                terms["projections"] += proj
                t += proj
                head += self.head(b)
        terms["LM head"] += head
        terms["step overhead"] += self.backend.step_overhead_s
        t += head + self.backend.step_overhead_s
        per_seq = f.tokens_per_step
        return StepResult("decode", t, b, b * per_seq / self.par.tp / t, per_seq / t, terms, skew, imb)

    def max_decode_batch(self, load: Load, user_tok_s: float, cap: int) -> int:
        """Largest sequences per replica (<= cap) whose per-user speed still meets ``user_tok_s``; 0 if none."""
        if cap < 1 or self.decode_step(1, load).user_tok_s < user_tok_s:
            return 0
        lo, hi = 1, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.decode_step(mid, load).user_tok_s >= user_tok_s else (lo, mid - 1)
        return lo

    # ---- memory -------------------------------------------------------------------------
    def weight_bytes_per_gpu(self) -> float:
        s, c, par = self.shape, self.shape.cfg, self.par
        w = BYTES[self.w]
        slots = (s.experts + par.redundant) // par.ep if par.ep > 1 else s.experts
        layer_attn = s.attention_params(par.tp) * w
        moe_layer = (s.shared_params / par.tp + slots * s.expert_params) * w + s.gate_params * 4
        total = (s.n_layers * layer_attn + s.n_dense_layers * s.dense_mlp_params / par.tp * w
                 + s.n_moe_layers * moe_layer + 2 * s.vocab_params * BYTES[self.act] / par.tp)
        if self.feat.mtp_drafts:
            total += s.n_mtp_layers * (layer_attn + moe_layer + s.mtp_proj_params * w)
        return total

    def kv_capacity_tokens(self, reserve_gb: float) -> float:
        """Tokens of latent cache one replica can hold (every GPU of a TP group holds the same latent)."""
        free = self.device.memory_gb * 1e9 - self.weight_bytes_per_gpu() - reserve_gb * 1e9
        return max(free, 0.0) / self.shape.kv_bytes_per_token(self.kv, with_mtp=self.feat.mtp_drafts > 0)

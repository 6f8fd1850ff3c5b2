// pdserve's fp32 grouped GEMM for few rows per weight (x86-64, AVX2 + FMA): the routed experts of a
// decode step. See engine/kernels/cpu_gemm.py for when it is used and why.
//
// y[t, n] = sum_k x[t, k] * w[e(t), n, k]: the rows of x are grouped by expert (counts[e] rows each,
// in expert order), w is [E, N, K] row-major (a stack of nn.Linear weights), y is [T, N].
// w is fp32, or bf16 holding values that are exactly bf16 (a bf16 checkpoint run in fp32): each bf16
// weight widens to the same fp32 value in a register (its 16 bits shifted up), so the FMAs, their
// order and the result are the fp32 kernel's, bit for bit, from half the bytes read.
//
// Work items are (active expert, block of kBlockN weight rows), spread over torch's intra-op threads.
// An item walks its weight rows two at a time; for each pair it takes the expert's rows four at a
// time, keeping 4 x 2 accumulators of 8 lanes, so each weight vector loaded serves up to four FMAs.
// The block (kBlockN rows of K floats, 256 KiB at K = 1024) stays in L2 while the rows past the first
// four re-read it. The next pairs' rows are prefetched: the per-pair streams are too short (one
// weight row) for the hardware prefetcher to ramp up on its own.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;       // weight rows per work item
constexpr int kPairs = 2;             // weight rows per tile
constexpr int kPrefetchTiles = 2;     // prefetch the rows this many tiles ahead

// 8 weights as fp32 lanes: fp32 loaded as is, bf16 widened exactly (bf16 is fp32's upper half)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m * ldy + n] = dot(x row m, w[n]) for m < MB, n < NB; K % 8 == 0. `ahead` is where NB rows
// K weights apart that a later tile reads start (prefetched), or null.
template <int MB, int NB, typename W>
inline void tile(const float* x, const W* const* w, int64_t K, float* y, int64_t ldy, const W* ahead) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per 64-byte cache line
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load8(w[n] + k);
    if (ahead != nullptr && (k & (kLine - 1)) == 0)  // one prefetch per 64-byte line
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(ahead + n * K + k), _MM_HINT_T0);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = hsum(acc[m][n]);
}

template <int NB, typename W>
inline void row_tile(int64_t mb, const float* x, const W* const* w, int64_t K, float* y, int64_t ldy,
                     const W* ahead) {
  switch (mb) {
    case 1: tile<1, NB>(x, w, K, y, ldy, ahead); break;
    case 2: tile<2, NB>(x, w, K, y, ldy, ahead); break;
    case 3: tile<3, NB>(x, w, K, y, ldy, ahead); break;
    default: tile<4, NB>(x, w, K, y, ldy, ahead); break;
  }
}

// rows x [rows, K] times weight rows [n0, n1) of w [N, K] -> columns [n0, n1) of y [rows, N]
template <typename W>
void block(const float* x, int64_t rows, const W* w, int64_t n0, int64_t n1, int64_t N, int64_t K, float* y) {
  for (int64_t n = n0; n < n1;) {
    const int nb = n + kPairs <= n1 ? kPairs : 1;
    const int64_t next = n + kPrefetchTiles * kPairs;
    const W* ahead = next + nb <= N ? w + next * K : nullptr;
    const W* pair[kPairs] = {w + n * K, w + (n + 1) * K};  // the second only read when nb == kPairs
    for (int64_t r = 0; r < rows; r += 4) {
      const int64_t mb = std::min<int64_t>(4, rows - r);
      if (nb == kPairs)
        row_tile<kPairs, W>(mb, x + r * K, pair, K, y + r * N + n, N, r == 0 ? ahead : nullptr);
      else
        row_tile<1, W>(mb, x + r * K, pair, K, y + r * N + n, N, nullptr);
    }
    n += nb;
  }
}

torch::Tensor grouped_gemm(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& counts) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "grouped_gemm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 &&
              (w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16),
              "grouped_gemm: x float32, w float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3, "grouped_gemm: x [T, K] and w [E, N, K]");
  // w's experts may sit apart (stride(0) >= N * K: per-head blocks of a larger matrix), each one dense
  TORCH_CHECK(x.is_contiguous() && w.stride(2) == 1 && w.stride(1) == w.size(2) && w.stride(0) >= w.size(1) * w.size(2),
              "grouped_gemm: x contiguous and w's rows dense, got w strides ", w.strides());
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2), ldE = w.stride(0);
  TORCH_CHECK(x.size(1) == K, "grouped_gemm: x has ", x.size(1), " columns, w rows have ", K);
  TORCH_CHECK(K % 8 == 0, "grouped_gemm: K must be a multiple of 8, got ", K);
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "grouped_gemm: ", counts.size(), " counts for ", E, " experts");
  std::vector<int64_t> start(E + 1, 0);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(counts[e] >= 0, "grouped_gemm: negative count");
    start[e + 1] = start[e] + counts[e];
    if (counts[e] > 0) active.push_back(e);
  }
  TORCH_CHECK(start[E] == x.size(0), "grouped_gemm: counts sum to ", start[E], ", x has ", x.size(0), " rows");
  auto y = torch::empty({x.size(0), N}, x.options());
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    at::parallel_for(0, static_cast<int64_t>(active.size()) * blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t e = active[b / blocks], n0 = (b % blocks) * kBlockN;
        block(xp + start[e] * K, counts[e], wp + e * ldE, n0, std::min(N, n0 + kBlockN), N, K, yp + start[e] * N);
      }
    });
  };
  if (w.scalar_type() == torch::kBFloat16)
    run(w.data_ptr<at::BFloat16>());
  else
    run(w.data_ptr<float>());
  return y;
}

// ---- MLA decode attention over the paged latent cache ---------------------------------------------
//
// Absorbed MLA is multi-query attention with one latent "head" of width D = R + Dr shared by every
// query head: for query m (heads h), keys are the first keys[m] cache rows listed in slots[seq[m]],
//   p[h, j] = softmax_j(scale * q[m, h] . row_j)        out[m, h] = sum_j p[h, j] * row_j[:R]
// Items are (query, group of kHeadGroup heads), over torch's threads. Each item reads its rows from
// the cache where they lie (no gathered copy) into two small GEMMs: scores with grouped_gemm's tiles
// (4 heads x 2 rows of accumulators), the output with 4 heads x 16 columns, the item's probabilities in a per-item buffer.

constexpr int64_t kHeadGroup = 8;

// out[h * R + c .. + 16] = sum_j p[h * ldp + j] * keys[j][c .. + 16] for h < MB.
template <int MB>
inline void value_tile(const float* p, int64_t ldp, const float* const* keys, int64_t n, int64_t c, float* out,
                       int64_t R) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 v0 = _mm256_loadu_ps(keys[j] + c), v1 = _mm256_loadu_ps(keys[j] + c + 8);
    for (int m = 0; m < MB; ++m) {
      const __m256 pm = _mm256_broadcast_ss(p + m * ldp + j);
      acc[m][0] = _mm256_fmadd_ps(pm, v0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(pm, v1, acc[m][1]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    _mm256_storeu_ps(out + m * R + c, acc[m][0]);
    _mm256_storeu_ps(out + m * R + c + 8, acc[m][1]);
  }
}

void attend(const float* q, int64_t heads, int64_t D, const float* const* keys, int64_t n, int64_t R, float scale,
            float* p, float* out) {
  for (int64_t h = 0; h < heads; h += 4) {  // scores
    const int64_t mb = std::min<int64_t>(4, heads - h);
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) row_tile<2, float>(mb, q + h * D, keys + j, D, p + h * n + j, n, nullptr);
    if (j < n) row_tile<1, float>(mb, q + h * D, keys + j, D, p + h * n + j, n, nullptr);
  }
  for (int64_t h = 0; h < heads; ++h) {  // softmax, in place
    float* row = p + h * n;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) top = std::max(top, row[j] * scale);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] * scale - top));
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
  for (int64_t h = 0; h < heads; h += 4) {  // p @ values
    const int64_t mb = std::min<int64_t>(4, heads - h);
    for (int64_t c = 0; c < R; c += 16) {
      switch (mb) {
        case 1: value_tile<1>(p + h * n, n, keys, n, c, out + h * R, R); break;
        case 2: value_tile<2>(p + h * n, n, keys, n, c, out + h * R, R); break;
        case 3: value_tile<3>(p + h * n, n, keys, n, c, out + h * R, R); break;
        default: value_tile<4>(p + h * n, n, keys, n, c, out + h * R, R); break;
      }
    }
  }
}

torch::Tensor mla_decode(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& slots,
                         const torch::Tensor& seq, const torch::Tensor& keys, int64_t R, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "mla_decode: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && cache.scalar_type() == torch::kFloat32, "mla_decode: float32 only");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "mla_decode: q [M, H, D] contiguous");
  TORCH_CHECK(cache.dim() == 2 && cache.is_contiguous(), "mla_decode: cache rows [S, D] contiguous");
  TORCH_CHECK(slots.dim() == 2 && slots.is_contiguous() && slots.scalar_type() == torch::kLong, "mla_decode: slots [B, L] int64");
  const int64_t M = q.size(0), H = q.size(1), D = q.size(2), L = slots.size(1), S = cache.size(0);
  TORCH_CHECK(cache.size(1) == D, "mla_decode: cache rows are ", cache.size(1), " wide, queries ", D);
  TORCH_CHECK(D % 8 == 0 && R % 16 == 0 && R <= D, "mla_decode: D % 8 == 0 and R % 16 == 0, R <= D; got D=", D, " R=", R);
  TORCH_CHECK(seq.numel() == M && keys.numel() == M && seq.scalar_type() == torch::kLong &&
              keys.scalar_type() == torch::kLong, "mla_decode: seq and keys: one int64 per query");
  auto seq_c = seq.contiguous(), keys_c = keys.contiguous();
  const int64_t* sq = seq_c.data_ptr<int64_t>();
  const int64_t* kn = keys_c.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(0 <= sq[m] && sq[m] < slots.size(0), "mla_decode: query ", m, " names sequence ", sq[m]);
    TORCH_CHECK(0 < kn[m] && kn[m] <= L, "mla_decode: query ", m, " has ", kn[m], " keys, slots hold ", L);
    for (int64_t j = 0; j < kn[m]; ++j)
      TORCH_CHECK(0 <= sl[sq[m] * L + j] && sl[sq[m] * L + j] < S, "mla_decode: slot out of the cache");
  }
  auto out = torch::empty({M, H, R}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* cp = cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t groups = (H + kHeadGroup - 1) / kHeadGroup;
  at::parallel_for(0, M * groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<const float*> rows;
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / groups, h0 = (i % groups) * kHeadGroup, hn = std::min(H, h0 + kHeadGroup) - h0;
      const int64_t n = kn[m];
      rows.resize(n);
      for (int64_t j = 0; j < n; ++j) rows[j] = cp + sl[sq[m] * L + j] * D;
      p.resize(hn * n);
      attend(qp + (m * H + h0) * D, hn, D, rows.data(), n, R, static_cast<float>(scale), p.data(),
             op + (m * H + h0) * R);
    }
  });
  return out;
}

// How many threads grouped_gemm's at::parallel_for runs on over `items` work items: the number torch
// was told to use, unless the build lost OpenMP (then 1). A test checks it.
int64_t parallel_threads(int64_t items) {
  std::vector<int> used(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  int64_t n = 0;
  for (int u : used) n += u;
  return n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_gemm", &grouped_gemm, "y[t] = x[t] @ w[expert of t].T, rows of x grouped by expert");
  m.def("mla_decode", &mla_decode, "absorbed MLA decode attention over the paged latent cache");
  m.def("parallel_threads", &parallel_threads, "threads grouped_gemm's parallel_for spreads `items` over");
}

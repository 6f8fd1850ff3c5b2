// pdserve's fp32 grouped GEMM for few rows per weight (x86-64, AVX2 + FMA): the routed experts of a
// decode step. See engine/kernels/cpu_gemm.py for when it is used and why.
//
// y[t, n] = sum_k x[t, k] * w[e(t), n, k]: the rows of x are grouped by expert (counts[e] rows each,
// in expert order), w is [E, N, K] row-major (a stack of nn.Linear weights), y is [T, N].
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
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;       // weight rows per work item
constexpr int kPairs = 2;             // weight rows per tile
constexpr int kPrefetchTiles = 2;     // prefetch the rows this many tiles ahead

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m * ldy + n] = dot(x row m, w row n) for m < MB, n < NB; K % 8 == 0. `ahead` is where the
// rows of a later tile start (prefetched), or null.
template <int MB, int NB>
inline void tile(const float* x, const float* w, int64_t K, float* y, int64_t ldy, const float* ahead) {
  __m256 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = _mm256_loadu_ps(w + n * K + k);
    if (ahead != nullptr && (k & 15) == 0)  // one prefetch per 64-byte line
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(ahead + n * K + k), _MM_HINT_T0);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = hsum(acc[m][n]);
}

template <int NB>
inline void row_tile(int64_t mb, const float* x, const float* w, int64_t K, float* y, int64_t ldy,
                     const float* ahead) {
  switch (mb) {
    case 1: tile<1, NB>(x, w, K, y, ldy, ahead); break;
    case 2: tile<2, NB>(x, w, K, y, ldy, ahead); break;
    case 3: tile<3, NB>(x, w, K, y, ldy, ahead); break;
    default: tile<4, NB>(x, w, K, y, ldy, ahead); break;
  }
}

// rows x [rows, K] times weight rows [n0, n1) of w [N, K] -> columns [n0, n1) of y [rows, N]
void block(const float* x, int64_t rows, const float* w, int64_t n0, int64_t n1, int64_t N, int64_t K, float* y) {
  for (int64_t n = n0; n < n1;) {
    const int nb = n + kPairs <= n1 ? kPairs : 1;
    const int64_t next = n + kPrefetchTiles * kPairs;
    const float* ahead = next + nb <= N ? w + next * K : nullptr;
    for (int64_t r = 0; r < rows; r += 4) {
      const int64_t mb = std::min<int64_t>(4, rows - r);
      if (nb == kPairs)
        row_tile<kPairs>(mb, x + r * K, w + n * K, K, y + r * N + n, N, r == 0 ? ahead : nullptr);
      else
        row_tile<1>(mb, x + r * K, w + n * K, K, y + r * N + n, N, nullptr);
    }
    n += nb;
  }
}

torch::Tensor grouped_gemm(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& counts) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "grouped_gemm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "grouped_gemm: float32 only");
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
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(active.size()) * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = active[b / blocks], n0 = (b % blocks) * kBlockN;
      block(xp + start[e] * K, counts[e], wp + e * ldE, n0, std::min(N, n0 + kBlockN), N, K, yp + start[e] * N);
    }
  });
  return y;
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
  m.def("parallel_threads", &parallel_threads, "threads grouped_gemm's parallel_for spreads `items` over");
}

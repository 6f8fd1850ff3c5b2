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
// An item walks its weight rows two at a time (one at a time for at most 4 rows: see block()); for each
// pair it takes the expert's rows four at a time, keeping 4 x 2 accumulators of 8 lanes, so each weight
// vector loaded serves up to four FMAs.
// The block (kBlockN rows of K floats, 256 KiB at K = 1024) stays in L2 while the rows past the first
// four re-read it. The next pairs' rows are prefetched: the per-pair streams are too short (one
// weight row) for the hardware prefetcher to ramp up on its own.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;       // weight rows per work item
constexpr int kPairs = 2;             // weight rows per tile
constexpr int kPrefetchTiles = 2;     // prefetch the rows this many tiles ahead
constexpr int64_t kOneStreamRows = 4; // up to this many rows: one weight row at a time (block, dot_block)

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

// e^x for 8 lanes, x clamped to [-87.3, 88.3] (~1e-38 below, ~2e38 above: never denormal, never inf):
// x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf coefficients), 2^n through the
// exponent bits. Within 2 ulp of std::exp; a scalar std::exp per attention score was ~a third of
// mla_decode's time.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// ---- vector widths: AVX2 + FMA (8 lanes) or AVX-512 (16) ---------------------------------------------
//
// Code written once for both widths takes one of these as its template parameter (the column tiles, the fp32
// prefill attention). The AVX-512 instance is called from a function with the AVX-512 target and `flatten`,
// so its helpers inline into AVX-512 code while the 8-lane one stays AVX2 code; the binary is built for
// AVX2 + FMA and takes the AVX-512 paths only where the CPU has them (g_avx512).

#define PDSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

PDSERVE_AVX512 inline __m512 exp16(__m512 x) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(exp8(_mm512_castps512_ps256(x))),
                            exp8(_mm512_extractf32x8_ps(x, 1)), 1);
}

struct Lanes8 {  // AVX2 + FMA
  using V = __m256;
  static constexpr int kLanes = 8, kScoreKeys = 4, kValueQueries = 2, kColRows = 3;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) { return load8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V exp(V x) { return exp8(x); }
  // -inf in the lanes l where base + l < first (keys past those queries' positions)
  static V mask_before(V row, int32_t base, int32_t first) {
    const __m256i qi = _mm256_add_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(base));
    return _mm256_blendv_ps(row, set1(-INFINITY), _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(first), qi)));
  }
  static V zero_where_ninf(V p, V row) { return _mm256_blendv_ps(p, zero(), _mm256_cmp_ps(row, set1(-INFINITY), _CMP_EQ_OQ)); }
};

struct Lanes16 {  // AVX-512
  using V = __m512;
  static constexpr int kLanes = 16, kScoreKeys = 6, kValueQueries = 4, kColRows = 8;
  PDSERVE_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  PDSERVE_AVX512 static V load(const at::BFloat16* p) {  // widened exactly, as load8
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  PDSERVE_AVX512 static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  PDSERVE_AVX512 static V set1(float x) { return _mm512_set1_ps(x); }
  PDSERVE_AVX512 static V zero() { return _mm512_setzero_ps(); }
  PDSERVE_AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PDSERVE_AVX512 static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  PDSERVE_AVX512 static V max(V a, V b) { return _mm512_max_ps(a, b); }
  PDSERVE_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  PDSERVE_AVX512 static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  PDSERVE_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  PDSERVE_AVX512 static V exp(V x) { return exp16(x); }
  PDSERVE_AVX512 static V mask_before(V row, int32_t base, int32_t first) {
    const __m512i qi = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(base));
    return _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(qi, _mm512_set1_epi32(first)), row, set1(-INFINITY));
  }
  PDSERVE_AVX512 static V zero_where_ninf(V p, V row) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(row, set1(-INFINITY), _CMP_EQ_OQ), p, zero());
  }
};

// y[m * ldy + n] = dot(x row m, w[n]) for m < MB, n < NB; K % 8 == 0. `ahead` is where NB rows
// K weights apart that a later tile reads start (prefetched), or null. kHoldX: each step's x in a register, loaded
// once (else GCC folds the load into every FMA that reads it, NB loads a step: the same speed for the GEMMs, which
// wait on their weights' memory, but ~10% slower fp32 attention scores, whose rows come from L2; 2-core AMD EPYC
// with AVX512-BF16, no AMX)
template <int MB, int NB, typename W, bool kHoldX = false>
inline void tile(const float* x, int64_t ldx, const W* const* w, int64_t K, float* y, int64_t ldy, const W* ahead) {
  if constexpr (MB * NB == 1) {  // one output: two chains of FMAs (even and odd steps), not one waiting on each
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w[0] + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w[0] + k + 8), a1);
    }
    if (k < K) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w[0] + k), a0);
    y[0] = hsum(_mm256_add_ps(a0, a1));
    return;
  }
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
      __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      if constexpr (kHoldX) asm("" : "+x"(xv));
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) y[m * ldy + n] = hsum(acc[m][n]);
}

template <int NB, typename W, bool kHoldX = false>
inline void row_tile(int64_t mb, const float* x, int64_t ldx, const W* const* w, int64_t K, float* y, int64_t ldy,
                     const W* ahead) {
  switch (mb) {
    case 1: tile<1, NB, W, kHoldX>(x, ldx, w, K, y, ldy, ahead); break;
    case 2: tile<2, NB, W, kHoldX>(x, ldx, w, K, y, ldy, ahead); break;
    case 3: tile<3, NB, W, kHoldX>(x, ldx, w, K, y, ldy, ahead); break;
    default: tile<4, NB, W, kHoldX>(x, ldx, w, K, y, ldy, ahead); break;
  }
}

// rows x [rows, K] (rows ldx apart) times weight rows [n0, n1) of w [N, K] -> columns [n0, n1) of y [rows, N]
// (rows ldy apart)
template <typename W>
void block(const float* x, int64_t ldx, int64_t rows, const W* w, int64_t n0, int64_t n1, int64_t N, int64_t K,
           float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1;) {
    // up to 4 rows (a decode step's rows per routed expert): one weight row at a time, as dot_block does. Two
    // rows side by side stream slower from memory; an fp32 model's experts (bf16 copies) at 4-16 tokens took
    // 0.60-0.72x the time, 1 token 0.85x (builds alternated in one process, 2-core AMD EPYC with AVX512-BF16,
    // no AMX; float32, this AVX2 path)
    const int nb = rows > kOneStreamRows && n + kPairs <= n1 ? kPairs : 1;
    const int64_t next = n + kPrefetchTiles * kPairs;
    const W* ahead = next + nb <= N ? w + next * K : nullptr;
    const W* pair[kPairs] = {w + n * K, w + (n + 1) * K};  // the second only read when nb == kPairs
    for (int64_t r = 0; r < rows; r += 4) {
      const int64_t mb = std::min<int64_t>(4, rows - r);
      if (nb == kPairs)
        row_tile<kPairs, W>(mb, x + r * ldx, ldx, pair, K, y + r * ldy + n, ldy, r == 0 ? ahead : nullptr);
      else
        row_tile<1, W>(mb, x + r * ldx, ldx, pair, K, y + r * ldy + n, ldy, nullptr);
    }
    n += nb;
  }
}

// item(e, r, n0, n1) for every active expert e (its rows r .. r + counts[e] of the grouped rows) and block
// [n0, n1) of kBlockN of its weight rows, over torch's threads
template <typename Item>
void expert_blocks(const std::vector<int64_t>& counts, int64_t N, const Item& item) {
  const int64_t E = static_cast<int64_t>(counts.size());
  std::vector<int64_t> start(E + 1, 0);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    start[e + 1] = start[e] + counts[e];
    if (counts[e] > 0) active.push_back(e);
  }
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, static_cast<int64_t>(active.size()) * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e = active[b / blocks], n0 = (b % blocks) * kBlockN;
      item(e, start[e], n0, std::min(N, n0 + kBlockN));
    }
  });
}

// y [T, N] = rows of x [T, K] (grouped by expert, counts[e] each, in expert order) times their expert's
// w [E, N, K] (experts ldE apart, rows dense) transposed.
template <typename W>
void grouped(const float* xp, const std::vector<int64_t>& counts, const W* wp, int64_t ldE, int64_t N, int64_t K,
             float* yp) {
  expert_blocks(counts, N, [&](int64_t e, int64_t r, int64_t n0, int64_t n1) {
    block(xp + r * K, K, counts[e], wp + e * ldE, n0, n1, N, K, yp + r * N, N);
  });
}

// ---- AVX512-BF16: a bf16 model's rows times bf16 weights ---------------------------------------------
//
// Where the CPU has AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later) and
// the model runs in bf16, VDPBF16PS multiplies 32 bf16 pairs and adds them into 16 fp32 lanes: one
// instruction where the AVX2 tiles widen 8 weights and issue one FMA per row, ~4x fewer instructions per
// weight, which is what bounds the AVX2 tiles at 8-32 rows. The rows are bf16, as a bf16 model's
// activations are in torch's own bf16 matmul (fp32 rows, e.g. the SiLU product between the experts' GEMMs,
// are rounded to nearest even first); the sums are fp32, in another order than the AVX2 tiles' (the
// results agree to bf16 rounding, not bit for bit). These functions carry a target attribute (the rest of
// the file stays AVX2 + FMA, the build has no -march) and run only where the CPU reports the instructions
// (bf16_dot_enabled()); an fp32 model, or bf16 rows on a CPU without them, take the AVX2 tiles as before.

#define PDSERVE_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

bool g_bf16_dot = __builtin_cpu_supports("avx512bf16");  // set_bf16_dot() turns it off (and on) for A/B runs

bool bf16_dot_enabled() { return g_bf16_dot; }

bool set_bf16_dot(bool on) {
  TORCH_CHECK(!on || __builtin_cpu_supports("avx512bf16"), "set_bf16_dot: this CPU has no AVX512-BF16");
  const bool was = g_bf16_dot;
  g_bf16_dot = on;
  return was;
}

constexpr int kDotRows = 4;  // rows per tile
constexpr int kDotCols = 4;  // weight rows per tile: 16 accumulators, 4 weight and 1 row register of 32

// The lane sums of 16 vectors as one: out[i] = sum of a[i]'s 16 lanes, ~45 shuffles and adds where 16
// separate reductions take ~130 (a 4 x 4 tile over K = 384 spends as much on those as on its products).
PDSERVE_BF16_DOT inline __m512 sum16(const __m512* a) {
  __m512 v8[8], v4[4];
  for (int i = 0; i < 8; ++i)  // in 128-bit quarters: [a0 a1 b0 b1] + [a2 a3 b2 b3]
    v8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // quarter q of v4[i]: four partial sums of a[4i + q]
    v4[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v8[2 * i], v8[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(v8[2 * i], v8[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 h1 = _mm512_add_ps(_mm512_shuffle_ps(v4[0], v4[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_ps(v4[0], v4[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 h2 = _mm512_add_ps(_mm512_shuffle_ps(v4[2], v4[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_ps(v4[2], v4[3], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 h = _mm512_add_ps(_mm512_shuffle_ps(h1, h2, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(h1, h2, _MM_SHUFFLE(3, 1, 3, 1)));  // h[4q + j]: a[4j + q]'s sum
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), h);
}

// y[m * ldy + n] = dot(x row m, w[n]) for m < MB, n < NB over K bf16 values (K % 8 == 0: steps of 32, the
// last one, where partial, by masked loads, the missing pairs zeros; a masked load in every step halved the
// tile's rate in one process, 2-core AMD EPYC with AVX512-BF16, no AMX). `ahead`: where NB rows K apart that the next tile reads
// start (one prefetch per cache line), or null.
template <int MB, int NB>
PDSERVE_BF16_DOT inline void dot_tile(const at::BFloat16* x, int64_t ldx, const at::BFloat16* const* w, int64_t K,
                                      float* y, int64_t ldy, const at::BFloat16* ahead) {
  if constexpr (MB * NB == 1) {  // one output: two chains (even and odd steps), not one waiting on each product
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w[0] + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(w[0] + k + 32));
    }
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(mask, w[0] + k));
    }
    y[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    return;
  }
  __m512 acc[MB * NB];
  for (int i = 0; i < MB * NB; ++i) acc[i] = _mm512_setzero_ps();
  auto step = [&](const __m512i* wv, const __m512i* xv) PDSERVE_BF16_DOT {
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) acc[m * NB + n] = _mm512_dpbf16_ps(acc[m * NB + n], (__m512bh)xv[m], (__m512bh)wv[n]);
  };
  __m512i wv[NB], xv[MB];
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int n = 0; n < NB; ++n) wv[n] = _mm512_loadu_si512(w[n] + k);
    if (ahead != nullptr)  // 32 bf16 = one 64-byte line per row
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(ahead + n * K + k), _MM_HINT_T0);
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + k);
    step(wv, xv);
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32(1) << (K - k)) - 1;
    for (int n = 0; n < NB; ++n) wv[n] = _mm512_maskz_loadu_epi16(mask, w[n] + k);
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
    step(wv, xv);
  }
  if constexpr (MB * NB == 16) {
    float sums[16];
    _mm512_storeu_ps(sums, sum16(acc));
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) y[m * ldy + n] = sums[m * NB + n];
  } else {
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < NB; ++n) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m * NB + n]);
  }
}

template <int NB>
PDSERVE_BF16_DOT inline void dot_row_tile(int64_t mb, const at::BFloat16* x, int64_t ldx,
                                          const at::BFloat16* const* w, int64_t K, float* y, int64_t ldy,
                                          const at::BFloat16* ahead) {
  switch (mb) {
    case 1: dot_tile<1, NB>(x, ldx, w, K, y, ldy, ahead); break;
    case 2: dot_tile<2, NB>(x, ldx, w, K, y, ldy, ahead); break;
    case 3: dot_tile<3, NB>(x, ldx, w, K, y, ldy, ahead); break;
    default: dot_tile<4, NB>(x, ldx, w, K, y, ldy, ahead); break;
  }
}

// block() for bf16 rows: x [rows, K] (ldx apart) times weight rows [n0, n1) of w [N, K] -> y (fp32, ldy apart)
PDSERVE_BF16_DOT void dot_block(const at::BFloat16* x, int64_t ldx, int64_t rows, const at::BFloat16* w, int64_t n0,
                                int64_t n1, int64_t N, int64_t K, float* y, int64_t ldy) {
  // up to kOneStreamRows rows (a decode step's rows per routed expert): a weight row at a time. Four weight
  // rows read side by side streamed ~0.6x the bytes per second of one (single thread, from memory, 2-core AMD
  // EPYC with AVX512-BF16, no AMX, bf16): the hardware prefetcher follows one stream better than four, and so
  // few rows do not need the tile's reuse of each row vector
  const int64_t cols_per_tile = rows <= kOneStreamRows ? 1 : kDotCols;
  for (int64_t n = n0; n < n1;) {
    const int nb = n + cols_per_tile <= n1 ? cols_per_tile : 1;
    const at::BFloat16* cols[kDotCols];
    for (int i = 0; i < kDotCols; ++i) cols[i] = w + std::min(n + i, N - 1) * K;
    const at::BFloat16* ahead = n + nb + kDotCols <= N ? w + (n + nb) * K : nullptr;
    for (int64_t r = 0; r < rows; r += kDotRows) {
      const int64_t mb = std::min<int64_t>(kDotRows, rows - r);
      if (nb == kDotCols)
        dot_row_tile<kDotCols>(mb, x + r * ldx, ldx, cols, K, y + r * ldy + n, ldy, r == 0 ? ahead : nullptr);
      else
        dot_row_tile<1>(mb, x + r * ldx, ldx, cols, K, y + r * ldy + n, ldy, nullptr);
    }
    n += nb;
  }
}

// dst[r * K + i] = bf16(src[r * lds + i]) (round to nearest even) for r < rows, i < K
PDSERVE_BF16_DOT void round_rows(const float* src, int64_t lds, int64_t rows, int64_t K, at::BFloat16* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    at::BFloat16* d = dst + r * K;
    int64_t i = 0;
    for (; i + 16 <= K; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i)));
    for (; i < K; ++i) d[i] = at::BFloat16(s[i]);
  }
}

// grouped() for bf16 rows and weights (bf16_dot_enabled() only)
void dot_grouped(const at::BFloat16* xp, const std::vector<int64_t>& counts, const at::BFloat16* wp, int64_t ldE,
                 int64_t N, int64_t K, float* yp) {
  expert_blocks(counts, N, [&](int64_t e, int64_t r, int64_t n0, int64_t n1) {
    dot_block(xp + r * K, K, counts[e], wp + e * ldE, n0, n1, N, K, yp + r * N, N);
  });
}

// ---- head_gemm from weights in pair layout (AVX512-BF16) --------------------------------------------
//
// The absorbed MLA products multiply short rows (K = Dn = 128 for q . W_UK) by many weight rows per head;
// dot_tile's 4 x 4 tiles spend as long on the lane sums of their 16 accumulators as on the products at
// such K. In pair layout (pair_layout() in cpu_gemm.py: w [H, N, K] -> [H, N/32, K/2, 32, 2]) a tile of 32
// weight rows is one contiguous stream of K/2 vectors, vector i holding the 32 rows' weights at k = 2i and
// 2i + 1 side by side: VDPBF16PS of it with x's pair (x[2i], x[2i + 1]) broadcast adds both products to 16
// columns' sums at once, so the sums sit in the lanes as outputs and nothing is reduced across lanes. Up to
// kPairRows rows share each weight vector loaded (2 * kPairRows accumulators). Bench preset, bf16, 2-core AMD
// EPYC with AVX512-BF16, no AMX: at 8 rows, weights in cache, q . W_UK 50 vs 107 us and o . W_UV 43 vs 80 us
// (dot_tile's path, one process); the decode step with both layouts alternated step by step in one engine:
// 0.97x the time at batch 8, 0.96x at batch 32, even at batch 1.
constexpr int kPairRows = 8;

// acc[m] += row m's first 2 * pairs values times a 32-row tile w [pairs][32][2] (32 sums in two vectors), for
// m < MB; row(m) points at row m
template <int MB, typename Row>
PDSERVE_BF16_DOT inline void pair_accumulate(const Row& row, int64_t pairs, const at::BFloat16* w, __m512 (*acc)[2]) {
  for (int64_t i = 0; i < pairs; ++i) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i * 64), w1 = (__m512bh)_mm512_loadu_si512(w + i * 64 + 32);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, row(m) + 2 * i, sizeof(pair));
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xp, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xp, w1);
    }
  }
}

// acc's MB rows of 32 sums -> y (rows ldy apart)
template <int MB>
PDSERVE_BF16_DOT inline void store_pairs(__m512 (*acc)[2], float* y, int64_t ldy) {
  for (int m = 0; m < MB; ++m) {
    _mm512_storeu_ps(y + m * ldy, acc[m][0]);
    _mm512_storeu_ps(y + m * ldy + 16, acc[m][1]);
  }
}

template <int MB>
PDSERVE_BF16_DOT inline void pair_tile(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* y,
                                       int64_t ldy) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  pair_accumulate<MB>([&](int m) { return x + m * ldx; }, K / 2, w, acc);
  store_pairs<MB>(acc, y, ldy);
}

// rows x [M, K] (ldx apart) times one 32-row tile w [K/2, 32, 2] -> y [M, 32] (ldy apart)
PDSERVE_BF16_DOT void pair_rows(const at::BFloat16* x, int64_t ldx, int64_t M, const at::BFloat16* w, int64_t K,
                                float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; m += kPairRows) {
    const at::BFloat16* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (std::min<int64_t>(kPairRows, M - m)) {
      case 1: pair_tile<1>(xm, ldx, w, K, ym, ldy); break;
      case 2: pair_tile<2>(xm, ldx, w, K, ym, ldy); break;
      case 3: pair_tile<3>(xm, ldx, w, K, ym, ldy); break;
      case 4: pair_tile<4>(xm, ldx, w, K, ym, ldy); break;
      case 5: pair_tile<5>(xm, ldx, w, K, ym, ldy); break;
      case 6: pair_tile<6>(xm, ldx, w, K, ym, ldy); break;
      case 7: pair_tile<7>(xm, ldx, w, K, ym, ldy); break;
      default: pair_tile<kPairRows>(xm, ldx, w, K, ym, ldy); break;
    }
  }
}

// ---- weights in column-tile layout (fp32 rows; AVX2 + FMA or AVX-512) ---------------------------------
//
// The absorbed MLA products of an fp32 model: K = Dn = 128 for q . W_UK, and every row meets every weight
// row of its head. grouped_gemm's tiles (dot products along K, then a sum across the 8 lanes per output)
// spend a third of their time on those sums at K = 128, and stop at KERNEL_MAX_ROWS rows (torch's bmm past
// them). In column-tile layout (col_layout() in cpu_gemm.py: w [H, N, K] -> [H, N/32, K, 32]) an item's
// weights are one contiguous stream of K vectors of 32 columns: each row's x[k] broadcast times the tile's
// vectors adds into 32 outputs at once (outer products: nothing summed across lanes), up to kColPass rows
// sharing each weight vector loaded (AVX-512: 8 rows x 2 vectors, 16 accumulators; AVX2: 3 rows x 4 vectors,
// 12 of its 16 registers, the weights read by the FMAs from L1; bf16 weights in AVX2: 2 rows beside the 4 vectors
// widened once into registers, where 3 rows widened every vector for each row: the bench preset's decode step
// capped at AVX2 took 1.04x the grouped-GEMM tiles' time that way, 0.90-0.95x with 2); past them the next rows
// read the item's tile again from L1 / L2, the rows split evenly over the passes. The same layout serves both
// widths, so it does not depend on the CPU. Rows are fp32; weights fp32 or bf16 holding exact values (widened
// in registers: the same products and sums in k order, bit for bit, at either width).

constexpr int64_t kColTile = 32;  // columns per tile

bool g_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
bool g_col_tiles = true;

bool avx512_enabled() { return g_avx512; }

bool set_avx512(bool on) {
  TORCH_CHECK(!on || (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")),
              "set_avx512: this CPU has no AVX-512");
  const bool was = g_avx512;
  g_avx512 = on;
  return was;
}

bool col_tiles_enabled() { return g_col_tiles; }

bool set_col_tiles(bool on) {
  const bool was = g_col_tiles;
  g_col_tiles = on;
  return was;
}

// y[m * ldy + c] = sum_k x[m * ldx + k] * w[k * 32 + c] for m < MB, c < 32, the sums in k order
template <typename L, int MB, typename W>
inline void col_tile(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy) {
  constexpr int NV = kColTile / L::kLanes;
  typename L::V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = L::zero();
  for (int64_t k = 0; k < K; ++k, w += kColTile) {
    if constexpr (std::is_same_v<W, float>) {
      for (int m = 0; m < MB; ++m) {
        const typename L::V xv = L::set1(x[m * ldx + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] = L::fmadd(xv, L::load(w + v * L::kLanes), acc[m][v]);
      }
    } else {  // bf16: each vector widened once into a register
      typename L::V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = L::load(w + v * L::kLanes);
      for (int m = 0; m < MB; ++m) {
        const typename L::V xv = L::set1(x[m * ldx + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] = L::fmadd(xv, wv[v], acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) L::store(y + m * ldy + v * L::kLanes, acc[m][v]);
}

// rows a pass: L::kColRows, but 2 for bf16 weights in 8 lanes (8 accumulators beside the 4 widened vectors)
template <typename L, typename W>
constexpr int kColPass = (L::kLanes == 8 && !std::is_same_v<W, float>) ? 2 : L::kColRows;

// col_tile for `rows` <= MB rows
template <typename L, typename W, int MB = kColPass<L, W>>
inline void col_tile_of(int64_t rows, const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy) {
  if constexpr (MB > 1) {
    if (rows < MB) return col_tile_of<L, W, MB - 1>(rows, x, ldx, w, K, y, ldy);
  }
  col_tile<L, MB, W>(x, ldx, w, K, y, ldy);
}

// rows x [M, K] (ldx apart) times one tile w [K, 32] -> y [M, 32] (ldy apart)
template <typename L, typename W>
inline void col_rows_of(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, float* y, int64_t ldy) {
  const int64_t passes = (M + kColPass<L, W> - 1) / kColPass<L, W>;
  for (int64_t p = 0, m = 0; p < passes; ++p) {
    const int64_t rows = (M - m + passes - p - 1) / (passes - p);
    col_tile_of<L, W>(rows, x + m * ldx, ldx, w, K, y + m * ldy, ldy);
    m += rows;
  }
}

template <typename W>
void col_rows8(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, float* y, int64_t ldy) {
  col_rows_of<Lanes8, W>(x, ldx, M, w, K, y, ldy);
}

template <typename W>  // flatten: the 16-lane helpers inlined into this AVX-512 function
PDSERVE_AVX512 __attribute__((flatten)) void col_rows16(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K,
                                                        float* y, int64_t ldy) {
  col_rows_of<Lanes16, W>(x, ldx, M, w, K, y, ldy);
}

template <typename W>
void col_rows(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, float* y, int64_t ldy) {
  if (g_avx512)
    col_rows16(x, ldx, M, w, K, y, ldy);
  else
    col_rows8(x, ldx, M, w, K, y, ldy);
}

// grouped() for weights in column-tile layout, w [E, N/32, K, 32] (experts contiguous): items of (active expert,
// kBlockN columns), each column tile by col_rows
template <typename W>
void grouped_cols(const float* xp, const std::vector<int64_t>& counts, const W* wp, int64_t N, int64_t K, float* yp) {
  const int64_t tiles = N / kColTile;
  expert_blocks(counts, N, [&](int64_t e, int64_t r, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n += kColTile)
      col_rows(xp + r * K, K, counts[e], wp + (e * tiles + n / kColTile) * K * kColTile, K, yp + r * N + n, N);
  });
}

// N of weights [E, N, K], or of weights in column-tile layout [E, N/32, K, 32]
int64_t weight_rows(const torch::Tensor& w) { return w.dim() == 4 ? w.size(1) * kColTile : w.size(1); }

void check_weights(const torch::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16),
              what, ": weights float32 or bfloat16 on the CPU");
  if (w.dim() == 4) {  // column-tile layout
    TORCH_CHECK(g_col_tiles, what, ": weights in column-tile layout while the column tiles are off (col_tiles_enabled())");
    TORCH_CHECK(w.is_contiguous() && w.size(3) == kColTile, what,
                ": weights in column-tile layout are [E, N/32, K, 32], contiguous");
    return;
  }
  // experts may sit apart (stride(0) >= N * K: per-head blocks of a larger matrix), each one dense
  TORCH_CHECK(w.dim() == 3 && w.stride(2) == 1 && w.stride(1) == w.size(2) && w.stride(0) >= w.size(1) * w.size(2),
              what, ": w [E, N, K] with dense rows, got strides ", w.strides());
  TORCH_CHECK(w.size(2) % 8 == 0, what, ": K must be a multiple of 8, got ", w.size(2));
}

// grouped() over w as its dtype says
void grouped_any(const float* xp, const std::vector<int64_t>& counts, const torch::Tensor& w, float* yp) {
  if (w.dim() == 4 && w.scalar_type() == torch::kBFloat16)
    grouped_cols(xp, counts, w.data_ptr<at::BFloat16>(), weight_rows(w), w.size(2), yp);
  else if (w.dim() == 4)
    grouped_cols(xp, counts, w.data_ptr<float>(), weight_rows(w), w.size(2), yp);
  else if (w.scalar_type() == torch::kBFloat16)
    grouped(xp, counts, w.data_ptr<at::BFloat16>(), w.stride(0), w.size(1), w.size(2), yp);
  else
    grouped(xp, counts, w.data_ptr<float>(), w.stride(0), w.size(1), w.size(2), yp);
}

// The fp32 sums of grouped_gemm(): x fp32 (the AVX2 tiles), or bf16 (AVX512-BF16 products with bf16 weights
// where enabled, else widened to fp32 first)
torch::Tensor grouped_sums(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& counts,
                           const char* what) {
  check_weights(w, what);
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              x.dim() == 2 && x.is_contiguous(), what, ": x [T, K] float32 or bfloat16, contiguous");
  const int64_t E = w.size(0), N = weight_rows(w), K = w.size(2);
  TORCH_CHECK(x.size(1) == K, what, ": x has ", x.size(1), " columns, w rows have ", K);
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, what, ": ", counts.size(), " counts for ", E, " experts");
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, what, ": negative count");
    total += c;
  }
  TORCH_CHECK(total == x.size(0), what, ": counts sum to ", total, ", x has ", x.size(0), " rows");
  auto y = torch::empty({x.size(0), N}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kFloat32)
    grouped_any(x.data_ptr<float>(), counts, w, y.data_ptr<float>());
  else if (w.dim() == 3 && w.scalar_type() == torch::kBFloat16 && g_bf16_dot)
    dot_grouped(x.data_ptr<at::BFloat16>(), counts, w.data_ptr<at::BFloat16>(), w.stride(0), N, K, y.data_ptr<float>());
  else
    grouped_any(x.to(torch::kFloat32).data_ptr<float>(), counts, w, y.data_ptr<float>());
  return y;
}

// grouped_sums() in x's dtype
torch::Tensor grouped_gemm(const torch::Tensor& x, const torch::Tensor& w, const std::vector<int64_t>& counts) {
  auto y = grouped_sums(x, w, counts, "grouped_gemm");
  return x.scalar_type() == torch::kFloat32 ? y : y.to(torch::kBFloat16);
}

// 8 fp32 lanes rounded to bf16 values (to nearest even, NaN kept a NaN), as fp32 with the low 16 bits clear
inline __m256 round8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
}

// The column of each row's largest value of grouped_gemm(x, w, {T}) (one weight [1, N, K]), compared as
// grouped_gemm returns the values (a bf16 x's rounded to bf16) and the first of equal ones taken, as
// torch.argmax takes it -> [T] int64. A draft head's tokens without its logits: no rounded copy of them,
// no argmax op. Each lane keeps its own largest value and first column (strictly greater replaces), then
// the lanes' largest value's smallest column wins.
torch::Tensor gemm_argmax(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 3 && w.size(0) == 1, "gemm_argmax: w [1, N, K] (one weight)");
  const auto y = grouped_sums(x, w, {x.size(0)}, "gemm_argmax");
  const bool round = x.scalar_type() == torch::kBFloat16;
  const int64_t T = y.size(0), N = y.size(1);
  auto out = torch::empty({T}, x.options().dtype(torch::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* row = yp + t * N;
    float best = -std::numeric_limits<float>::infinity();
    int64_t at = 0;
    int64_t n = 0;
    if (N >= 8) {
      __m256 bv = _mm256_set1_ps(best);
      __m256i bi = _mm256_setzero_si256();
      __m256i col = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (; n + 8 <= N; n += 8) {
        __m256 v = _mm256_loadu_ps(row + n);
        if (round) v = round8(v);
        const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);
        bv = _mm256_blendv_ps(bv, v, gt);
        bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(col), gt));
        col = _mm256_add_epi32(col, _mm256_set1_epi32(8));
      }
      alignas(32) float lane_v[8];
      alignas(32) int32_t lane_i[8];
      _mm256_store_ps(lane_v, bv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lane_i), bi);
      for (int l = 0; l < 8; ++l)
        if (lane_v[l] > best || (lane_v[l] == best && lane_i[l] < at)) best = lane_v[l], at = lane_i[l];
    }
    for (; n < N; ++n) {
      const float v = round ? static_cast<float>(at::BFloat16(row[n])) : row[n];
      if (v > best) best = v, at = n;
    }
    op[t] = at;
  }
  return out;
}

// ---- the routed experts of a small step, whole ------------------------------------------------------
//
// out[t] = sum_j weights[t, j] * expert_{slots[t, j]}(x[t]), expert_e(v) = w2[e] @ (silu(gate) * up) with
// [gate; up] = w13[e] @ v: the copies sorted by slot (a counting sort, stable), both GEMMs through
// grouped()'s tiles, SiLU(gate) * up in 8 lanes, then each token's copies weighted and summed in slot order
// (the order, product and sum of the dispatcher's index_add_). One call where the dispatcher, the expert
// module and the combine make ~18 ATen ops; for one rank's step of few tokens (engine/model/moe.py decides).
// load [E] int64, where given, gets each slot's copies added (the expert-load sample). x fp32, or bf16:
// bf16 rows and weights through the AVX512-BF16 products where enabled (the SiLU product rounded to bf16
// between the GEMMs, as torch's bf16 experts round it), else x widened to fp32; the result in x's dtype.

torch::Tensor moe_experts(const torch::Tensor& x, const torch::Tensor& slots, const torch::Tensor& weights,
                          const torch::Tensor& w13, const torch::Tensor& w2, const c10::optional<torch::Tensor>& load) {
  check_weights(w13, "moe_experts");
  check_weights(w2, "moe_experts");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              x.dim() == 2 && x.is_contiguous(), "moe_experts: x [T, D] float32 or bfloat16, contiguous");
  const bool dot = x.scalar_type() == torch::kBFloat16 && w13.scalar_type() == torch::kBFloat16 &&
                   w2.scalar_type() == torch::kBFloat16 && w13.dim() == 3 && w2.dim() == 3 && g_bf16_dot;
  if (x.scalar_type() == torch::kBFloat16 && !dot)
    return moe_experts(x.to(torch::kFloat32), slots, weights, w13, w2, load).to(torch::kBFloat16);
  const auto f32 = x.options().dtype(torch::kFloat32);
  const int64_t T = x.size(0), D = x.size(1), E = w13.size(0), I = weight_rows(w13) / 2;
  TORCH_CHECK(w13.size(2) == D && weight_rows(w13) == 2 * I && w2.size(0) == E && weight_rows(w2) == D &&
              w2.size(2) == I,
              "moe_experts: w13 [E, 2I, D] and w2 [E, D, I] for D = ", D, ", got ", w13.sizes(), " and ", w2.sizes());
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 2 && slots.size(0) == T &&
              weights.scalar_type() == torch::kFloat32 && weights.sizes() == slots.sizes(),
              "moe_experts: slots [T, k] int64 and weights [T, k] float32");
  const int64_t k = slots.size(1), copies = T * k;
  const auto sc = slots.contiguous();
  const auto wc = weights.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const float* wp = wc.data_ptr<float>();
  std::vector<int64_t> counts(E, 0);
  for (int64_t c = 0; c < copies; ++c) {
    TORCH_CHECK(0 <= sp[c] && sp[c] < E, "moe_experts: slot ", sp[c], " outside the ", E, " slots");
    ++counts[sp[c]];
  }
  std::vector<int64_t> next(E, 0), position(copies);  // position[copy]: its row in slot order
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + counts[e - 1];
  for (int64_t c = 0; c < copies; ++c) position[c] = next[sp[c]]++;
  auto rows = torch::empty({copies, D}, x.options());  // x's copies in slot order
  auto gather = [&](const auto* xp, auto* rp) {
    for (int64_t c = 0; c < copies; ++c) std::copy(xp + (c / k) * D, xp + (c / k + 1) * D, rp + position[c] * D);
  };
  auto h = torch::empty({copies, 2 * I}, f32);
  if (dot) {
    gather(x.data_ptr<at::BFloat16>(), rows.data_ptr<at::BFloat16>());
    dot_grouped(rows.data_ptr<at::BFloat16>(), counts, w13.data_ptr<at::BFloat16>(), w13.stride(0), 2 * I, D,
                h.data_ptr<float>());
  } else {
    gather(x.data_ptr<float>(), rows.data_ptr<float>());
    grouped_any(rows.data_ptr<float>(), counts, w13, h.data_ptr<float>());
  }
  auto act = torch::empty({copies, I}, f32);
  float* hp = h.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t r = 0; r < copies; ++r) {  // silu(gate) * up = gate / (1 + e^-gate) * up
    const float* g = hp + r * 2 * I;
    float* a = ap + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(g + I + i)));
    }
    for (; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
  }
  auto y = torch::empty({copies, D}, f32);
  if (dot) {
    auto act_bf16 = torch::empty({copies, I}, x.options());
    round_rows(ap, I, copies, I, act_bf16.data_ptr<at::BFloat16>());
    dot_grouped(act_bf16.data_ptr<at::BFloat16>(), counts, w2.data_ptr<at::BFloat16>(), w2.stride(0), D, I,
                y.data_ptr<float>());
  } else {
    grouped_any(ap, counts, w2, y.data_ptr<float>());
  }
  auto out = torch::zeros({T, D}, f32);
  const float* yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> mine(k);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) mine[j] = t * k + j;
    std::sort(mine.begin(), mine.end(), [&](int64_t a, int64_t b) { return position[a] < position[b]; });
    float* o = op + t * D;
    for (int64_t c : mine) {
      const float* yr = yp + position[c] * D;
      const __m256 wv = _mm256_set1_ps(wp[c]);
      int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_mul_ps(_mm256_loadu_ps(yr + d), wv)));
      for (; d < D; ++d) o[d] += yr[d] * wp[c];
    }
  }
  if (load.has_value()) {
    TORCH_CHECK(load->scalar_type() == torch::kLong && load->numel() == E && load->is_contiguous(),
                "moe_experts: load [E] int64, contiguous");
    int64_t* lp = load->data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) lp[e] += counts[e];
  }
  return dot ? out.to(torch::kBFloat16) : out;
}

// pair_rows() for fp32 rows (bf16 rows widened first: the products off), AVX2: each weight widened exactly in
// a register (even lanes: k = 2i, odd: 2i + 1), 8 columns and up to 4 rows at a time, the sums in k order
void wide_pair_rows(const float* x, int64_t ldx, int64_t M, const at::BFloat16* w, int64_t K, float* y, int64_t ldy) {
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mb = std::min<int64_t>(4, M - m0);
    for (int64_t c = 0; c < 32; c += 8) {
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < K; k += 2) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32 + c * 2));
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int64_t m = 0; m < mb; ++m) {
          const float* xm = x + (m0 + m) * ldx + k;
          acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(xm[0]), even, acc[m]);
          acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(xm[1]), odd, acc[m]);
        }
      }
      for (int64_t m = 0; m < mb; ++m) _mm256_storeu_ps(y + (m0 + m) * ldy + c, acc[m]);
    }
  }
}

// head_gemm for weights in pair layout, w [H, N/32, K/2, 32, 2] bf16: bf16 rows by AVX512-BF16 where
// bf16_dot_enabled(), else the rows in fp32 (wide_pair_rows)
void head_gemm_pairs(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(3) == 32 && w.size(4) == 2,
              "head_gemm: weights in pair layout are bfloat16 [H, N/32, K/2, 32, 2], contiguous");
  const int64_t M = x.size(0), H = x.size(1), K = x.size(2), tiles = w.size(1), N = tiles * 32;
  TORCH_CHECK(w.size(0) == H && w.size(2) * 2 == K && y.size(0) == M && y.size(1) == H && y.size(2) == N,
              "head_gemm: x ", x.sizes(), ", w ", w.sizes(), ", y ", y.sizes(), " do not agree");
  TORCH_CHECK(x.stride(2) == 1 && y.stride(2) == 1, "head_gemm: last dims dense");
  if (M == 0) return;
  const bool dot = x.scalar_type() == torch::kBFloat16 && g_bf16_dot;
  if (!dot && x.scalar_type() == torch::kBFloat16) return head_gemm_pairs(x.to(torch::kFloat32), w, y);
  const at::BFloat16* wb = w.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, H * tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t h = b / tiles, t = b % tiles;
      const at::BFloat16* wt = wb + (h * tiles + t) * K * 32;
      float* yt = yp + h * y.stride(1) + t * 32;
      if (dot)
        pair_rows(x.data_ptr<at::BFloat16>() + h * x.stride(1), x.stride(0), M, wt, K, yt, y.stride(0));
      else
        wide_pair_rows(x.data_ptr<float>() + h * x.stride(1), x.stride(0), M, wt, K, yt, y.stride(0));
    }
  });
}

// head_gemm for weights in column-tile layout, w [H, N/32, K, 32] fp32 or bf16: fp32 rows (bf16 rows widened
// first); items are (head, tile) over torch's threads
void head_gemm_cols(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  TORCH_CHECK(g_col_tiles, "head_gemm: weights in column-tile layout while the column tiles are off (col_tiles_enabled())");
  TORCH_CHECK(w.is_contiguous() && w.size(3) == kColTile,
              "head_gemm: weights in column-tile layout are [H, N/32, K, 32], contiguous");
  const int64_t M = x.size(0), H = x.size(1), K = x.size(2), tiles = w.size(1), N = tiles * kColTile;
  TORCH_CHECK(w.size(0) == H && w.size(2) == K && y.size(0) == M && y.size(1) == H && y.size(2) == N,
              "head_gemm: x ", x.sizes(), ", w ", w.sizes(), ", y ", y.sizes(), " do not agree");
  TORCH_CHECK(x.stride(2) == 1 && y.stride(2) == 1, "head_gemm: last dims dense");
  if (M == 0) return;
  if (x.scalar_type() == torch::kBFloat16) return head_gemm_cols(x.to(torch::kFloat32), w, y);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    at::parallel_for(0, H * tiles, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t h = b / tiles, t = b % tiles;
        col_rows(xp + h * x.stride(1), x.stride(0), M, wp + (h * tiles + t) * K * kColTile, K,
                 yp + h * y.stride(1) + t * kColTile, y.stride(0));
      }
    });
  };
  if (w.scalar_type() == torch::kBFloat16)
    run(w.data_ptr<at::BFloat16>());
  else
    run(w.data_ptr<float>());
}

// y[m, h] = w[h] @ x[m, h] for every row m and head h: x [M, H, K] and y [M, H, N] with any row and head
// strides (their last dims dense), w [H, N, K]. The absorbed MLA products per head (q_nope . W_UK into the
// query's latent part, the latent output . W_UV), read and written in place: no copy of x into head-major
// rows and none of y back, and y may be a slice of a wider tensor. Items are (head, block of kBlockN weight
// rows) as in grouped_gemm. x fp32, or bf16 (AVX512-BF16 products with bf16 weights where enabled, else
// widened first); y fp32.
// w may be in pair layout (head_gemm_pairs) or column-tile layout (head_gemm_cols).
void head_gemm(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && y.device().is_cpu(), "head_gemm: CPU tensors only");
  TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
              y.scalar_type() == torch::kFloat32 &&
              (w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16),
              "head_gemm: x float32 or bfloat16, y float32, w float32 or bfloat16");
  TORCH_CHECK(x.dim() == 3 && w.dim() >= 3 && w.dim() <= 5 && y.dim() == 3,
              "head_gemm: x [M, H, K], w [H, N, K] (or pair layout [H, N/32, K/2, 32, 2], or column-tile layout "
              "[H, N/32, K, 32]), y [M, H, N]");
  if (w.dim() == 5) return head_gemm_pairs(x, w, y);
  if (w.dim() == 4) return head_gemm_cols(x, w, y);
  const int64_t M = x.size(0), H = x.size(1), K = x.size(2), N = w.size(1);
  TORCH_CHECK(w.size(0) == H && w.size(2) == K && y.size(0) == M && y.size(1) == H && y.size(2) == N,
              "head_gemm: x ", x.sizes(), ", w ", w.sizes(), ", y ", y.sizes(), " do not agree");
  TORCH_CHECK(x.stride(2) == 1 && y.stride(2) == 1 && w.stride(2) == 1 && w.stride(1) == K && K % 8 == 0,
              "head_gemm: last dims dense, w's rows dense, K a multiple of 8");
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  float* yp = y.data_ptr<float>();
  auto run = [&](const auto* wp) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, H * blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t h = b / blocks, n0 = (b % blocks) * kBlockN;
        block(xp + h * x.stride(1), x.stride(0), M, wp + h * w.stride(0), n0, std::min(N, n0 + kBlockN), N, K,
              yp + h * y.stride(1), y.stride(0));
      }
    });
  };
  if (M == 0) return;
  if (x.scalar_type() == torch::kBFloat16) {
    if (w.scalar_type() != torch::kBFloat16 || !g_bf16_dot) return head_gemm(x.to(torch::kFloat32), w, y);
    const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
    const at::BFloat16* wb = w.data_ptr<at::BFloat16>();
    at::parallel_for(0, H * blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t h = b / blocks, n0 = (b % blocks) * kBlockN;
        dot_block(xb + h * x.stride(1), x.stride(0), M, wb + h * w.stride(0), n0, std::min(N, n0 + kBlockN), N, K,
                  yp + h * y.stride(1), y.stride(0));
      }
    });
  } else if (w.scalar_type() == torch::kBFloat16) {
    run(w.data_ptr<at::BFloat16>());
  } else {
    run(w.data_ptr<float>());
  }
}

// ---- MLA decode attention over the paged latent cache ---------------------------------------------
//
// Absorbed MLA is multi-query attention with one latent "head" of width D = R + Dr shared by every
// query head: for query m (heads h), keys are the first keys[m] cache rows listed in slots[seq[m]],
//   p[h, j] = softmax_j(scale * q[m, h] . row_j)        out[m, h] = sum_j p[h, j] * row_j[:R]
// Items are (query, group of heads), over torch's threads: all of a query's heads in one item where
// there are queries enough to keep the threads busy, else halves, quarters (at least 4 heads). An item
// walks its rows in blocks of kKeyBlock, reading each row from the cache where it lies (no gathered
// copy), once: the block's scores for every head of the item (grouped_gemm's tiles, 4 heads x 2 rows of
// accumulators, the 4 heads' queries held in L1 while the block's rows pass), then the block's values while
// the rows are still in L2 (16 columns of every row, from L1, for each 4 heads in turn), with an online
// softmax (running maximum and sum per head, the output rescaled when the maximum grows). A query's rows
// (~2.3 KB each at DeepSeek's D = 576) are read from memory once per item instead of once per 4 heads for
// the scores and again for the values, and while the scores of one block are computed the next block's rows
// (or, at an item's last block, the next item's first) are prefetched into L2, a slice after each tile: the
// cache streams from memory under the FMAs instead of every block's first touch waiting on it (the kernel
// 0.78x the time at 32 queries x 16 heads x ~317 keys, fp32 cache; 2-core AMD EPYC with AVX512-BF16, no AMX,
// caches flushed between calls).
// Rows are fp32, or bf16 (a bf16 model's cache) widened
// to fp32 in registers as grouped_gemm's weights are, queries and arithmetic fp32; or, for a bf16 cache where
// bf16_dot_enabled(), by AVX512-BF16 (dot_attend: bf16 queries and probabilities, fp32 sums).

constexpr int64_t kKeyBlock = 64;  // rows per block: 147 KB at D = 576, inside a 512 KB L2

// Rows to bring into L2 ahead of their use, a slice at a time: start() names them, upto(i, of) prefetches the
// first i / of of their cache lines (in order), so calls spread over `of` tiles of other work spread the traffic.
template <typename W>
struct RowPrefetch {
  const W* const* rows = nullptr;
  int64_t lines_per_row = 0, total = 0, done = 0;

  void start(const W* const* r, int64_t n, int64_t D) {
    rows = r;
    lines_per_row = (D * static_cast<int64_t>(sizeof(W)) + 63) / 64;
    total = r == nullptr ? 0 : n * lines_per_row;
    done = 0;
  }
  void upto(int64_t i, int64_t of) {
    for (const int64_t end = total * i / of; done < end; ++done)
      _mm_prefetch(reinterpret_cast<const char*>(rows[done / lines_per_row]) + (done % lines_per_row) * 64,
                   _MM_HINT_T1);
  }
  // while a block's scores run: the next block's rows, or the next item's first block after the last
  void next_block(const W* const* keys, int64_t j0, int64_t n, const W* const* next_keys, int64_t next_n,
                  int64_t D) {
    if (j0 + kKeyBlock < n)
      start(keys + j0 + kKeyBlock, std::min(kKeyBlock, n - j0 - kKeyBlock), D);
    else
      start(next_keys, std::min(kKeyBlock, next_n), D);
  }
};

// out[h * R + c .. + 16] += sum_j p[h * ldp + j] * keys[j][c .. + 16] for h < MB, j < n.
template <int MB, typename W>
inline void value_tile(const float* p, int64_t ldp, const W* const* keys, int64_t n, int64_t c, float* out,
                       int64_t R) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = _mm256_loadu_ps(out + m * R + c);
    acc[m][1] = _mm256_loadu_ps(out + m * R + c + 8);
  }
  for (int64_t j = 0; j < n; ++j) {
    const __m256 v0 = load8(keys[j] + c), v1 = load8(keys[j] + c + 8);
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

// row[j] = e^(row[j] * scale - top) for j < n; returns their sum
inline float exp_row(float* row, int64_t n, float scale, float top) {
  const __m256 vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(row + j), vs, vt));
    _mm256_storeu_ps(row + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (row[j] = std::exp(row[j] * scale - top));
  return sum;
}

// One item: heads query rows q [heads, D] over rows keys[0 .. n) -> out [heads, R]. s: [heads, kKeyBlock]
// scratch; top, sum: [heads] scratch. next_keys[0 .. next_n): the rows the thread's next item reads (prefetched
// during the last block), or null.
template <typename W>
void attend(const float* q, int64_t heads, int64_t D, const W* const* keys, int64_t n, int64_t R, float scale,
            float* s, float* top, float* sum, float* out, const W* const* next_keys, int64_t next_n) {
  std::fill(out, out + heads * R, 0.f);
  std::fill(top, top + heads, -INFINITY);
  std::fill(sum, sum + heads, 0.f);
  RowPrefetch<W> ahead;
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    const W* const* block_keys = keys + j0;
    ahead.next_block(keys, j0, n, next_keys, next_n, D);
    const int64_t tiles = (heads + 3) / 4 * ((nb + 1) / 2);
    int64_t t = 0;
    for (int64_t h = 0; h < heads; h += 4) {  // scores: 4 heads' queries (L1) against each pair of rows
      const int64_t mb = std::min<int64_t>(4, heads - h);
      for (int64_t j = 0; j < nb; j += 2, ahead.upto(++t, tiles)) {
        if (j + 2 <= nb)
          row_tile<2, W, true>(mb, q + h * D, D, block_keys + j, D, s + h * kKeyBlock + j, kKeyBlock, nullptr);
        else
          row_tile<1, W, true>(mb, q + h * D, D, block_keys + j, D, s + h * kKeyBlock + j, kKeyBlock, nullptr);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {  // online softmax: the block's probabilities against the running maximum
      float* row = s + h * kKeyBlock;
      float block_top = -INFINITY;
      for (int64_t j = 0; j < nb; ++j) block_top = std::max(block_top, row[j] * scale);
      if (block_top > top[h]) {
        const float shrink = std::exp(top[h] - block_top);  // 0 for the first block
        sum[h] *= shrink;
        if (top[h] != -INFINITY)
          for (int64_t c = 0; c < R; ++c) out[h * R + c] *= shrink;
        top[h] = block_top;
      }
      sum[h] += exp_row(row, nb, scale, top[h]);
    }
    for (int64_t c = 0; c < R; c += 16) {  // out += p @ values: 16 columns of the rows (L2, then L1), every head
      for (int64_t h = 0; h < heads; h += 4) {
        const int64_t mb = std::min<int64_t>(4, heads - h);
        switch (mb) {
          case 1: value_tile<1, W>(s + h * kKeyBlock, kKeyBlock, block_keys, nb, c, out + h * R, R); break;
          case 2: value_tile<2, W>(s + h * kKeyBlock, kKeyBlock, block_keys, nb, c, out + h * R, R); break;
          case 3: value_tile<3, W>(s + h * kKeyBlock, kKeyBlock, block_keys, nb, c, out + h * R, R); break;
          default: value_tile<4, W>(s + h * kKeyBlock, kKeyBlock, block_keys, nb, c, out + h * R, R); break;
        }
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = 1.f / sum[h];
    for (int64_t c = 0; c < R; ++c) out[h * R + c] *= inv;
  }
}

// attend() for a bf16 cache by AVX512-BF16 (bf16_dot_enabled(), R % 32 == 0): the item's queries q [heads, D]
// rounded to bf16, scores by dot_tile (4 heads x 4 rows), the block's probabilities rounded to bf16 (pb
// [heads, kKeyBlock] scratch), then the values two rows at a time: the rows' 32 columns interleaved into
// pairs (row j, row j+1), so one VDPBF16PS adds p[h, j] * row_j + p[h, j+1] * row_j+1 for 16 columns. The
// interleave leaves the columns of each 32 in the order [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31];
// `out` is kept in that order and put back at the end.
constexpr int kValueHeads = 8;  // heads per value tile: 16 accumulators, each row pair interleaved once for 8

// out[m * ldo + c .. + 32] += sum_j p[m * ldp + j] * row(j)[c .. + 32] for m < mb <= kValueHeads, j < nb: two
// rows a step, interleaved into pairs (out's columns in the interleaved order above); p bf16, p[m * ldp + nb] = 0
// where nb is odd (the last row's partner is itself, at weight 0)
template <typename Row>
PDSERVE_BF16_DOT inline void value_pairs(const at::BFloat16* p, int64_t ldp, int64_t mb, int64_t nb, const Row& row,
                                         int64_t c, float* out, int64_t ldo) {
  __m512 lo[kValueHeads], hi[kValueHeads];
  for (int64_t m = 0; m < mb; ++m) {
    lo[m] = _mm512_loadu_ps(out + m * ldo + c);
    hi[m] = _mm512_loadu_ps(out + m * ldo + c + 16);
  }
  for (int64_t j = 0; j < nb; j += 2) {
    const __m512i a = _mm512_loadu_si512(row(j) + c);
    const __m512i b = _mm512_loadu_si512(row(j + 1 < nb ? j + 1 : j) + c);
    const __m512bh plo = (__m512bh)_mm512_unpacklo_epi16(a, b), phi = (__m512bh)_mm512_unpackhi_epi16(a, b);
    for (int64_t m = 0; m < mb; ++m) {
      int32_t pair;
      std::memcpy(&pair, p + m * ldp + j, sizeof(pair));
      const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
      lo[m] = _mm512_dpbf16_ps(lo[m], plo, pp);
      hi[m] = _mm512_dpbf16_ps(hi[m], phi, pp);
    }
  }
  for (int64_t m = 0; m < mb; ++m) {
    _mm512_storeu_ps(out + m * ldo + c, lo[m]);
    _mm512_storeu_ps(out + m * ldo + c + 16, hi[m]);
  }
}

// 32 columns of a value_pairs() accumulator row (at acc) back in order, times inv: [0, 16) in lo, [16, 32) in hi
PDSERVE_BF16_DOT inline void in_order(const float* acc, __m512 inv, __m512& lo, __m512& hi) {
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  const __m512 a = _mm512_loadu_ps(acc), b = _mm512_loadu_ps(acc + 16);
  lo = _mm512_mul_ps(_mm512_permutex2var_ps(a, first, b), inv);
  hi = _mm512_mul_ps(_mm512_permutex2var_ps(a, second, b), inv);
}

PDSERVE_BF16_DOT void dot_attend(const float* qf, int64_t heads, int64_t D, const at::BFloat16* const* keys, int64_t n,
                                 int64_t R, float scale, at::BFloat16* q, float* s, at::BFloat16* pb, float* top,
                                 float* sum, float* out, const at::BFloat16* const* next_keys, int64_t next_n) {
  round_rows(qf, D, heads, D, q);
  std::fill(out, out + heads * R, 0.f);
  std::fill(top, top + heads, -INFINITY);
  std::fill(sum, sum + heads, 0.f);
  RowPrefetch<at::BFloat16> ahead;  // as attend()
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    const at::BFloat16* const* block_keys = keys + j0;
    ahead.next_block(keys, j0, n, next_keys, next_n, D);
    const int64_t tiles = (nb + kDotCols - 1) / kDotCols;
    for (int64_t j = 0, t = 0; j < nb; j += kDotCols, ahead.upto(++t, tiles)) {  // scores
      for (int64_t h = 0; h < heads; h += kDotRows) {
        const int64_t mb = std::min<int64_t>(kDotRows, heads - h);
        if (j + kDotCols <= nb)
          dot_row_tile<kDotCols>(mb, q + h * D, D, block_keys + j, D, s + h * kKeyBlock + j, kKeyBlock, nullptr);
        else
          for (int64_t jj = j; jj < nb; ++jj)
            dot_row_tile<1>(mb, q + h * D, D, block_keys + jj, D, s + h * kKeyBlock + jj, kKeyBlock, nullptr);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {  // online softmax, as attend()
      float* row = s + h * kKeyBlock;
      __m512 most = _mm512_set1_ps(-INFINITY);
      int64_t j = 0;
      for (; j + 16 <= nb; j += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(row + j));
      float block_top = _mm512_reduce_max_ps(most);
      for (; j < nb; ++j) block_top = std::max(block_top, row[j]);
      block_top *= scale;  // scale > 0: the largest score scaled is the largest scaled score
      if (block_top > top[h]) {
        const float shrink = std::exp(top[h] - block_top);
        sum[h] *= shrink;
        if (top[h] != -INFINITY)
          for (int64_t c = 0; c < R; ++c) out[h * R + c] *= shrink;
        top[h] = block_top;
      }
      sum[h] += exp_row(row, nb, scale, top[h]);
      round_rows(row, kKeyBlock, 1, nb, pb + h * kKeyBlock);
      if (nb % 2) pb[h * kKeyBlock + nb] = at::BFloat16(0.f);  // the odd row's partner: weight 0
    }
    for (int64_t h = 0; h < heads; h += kValueHeads)  // out += p @ values, two rows per step
      for (int64_t c = 0; c < R; c += 32)
        value_pairs(pb + h * kKeyBlock, kKeyBlock, std::min<int64_t>(kValueHeads, heads - h), nb,
                    [&](int64_t j) { return block_keys[j]; }, c, out + h * R, R);
  }
  for (int64_t h = 0; h < heads; ++h) {  // columns back in order, divided by the softmax's sum
    const __m512 inv = _mm512_set1_ps(1.f / sum[h]);
    for (int64_t c = 0; c < R; c += 32) {
      __m512 lo, hi;
      in_order(out + h * R + c, inv, lo, hi);
      _mm512_storeu_ps(out + h * R + c, lo);
      _mm512_storeu_ps(out + h * R + c + 16, hi);
    }
  }
}

// ---- the same attention with the heads in the lanes (AVX-512, fp32 cache) ----------------------------
//
// attend() keeps a head's scores as dot products along D (each summed across the 8 lanes at its end) and
// adds values 4 heads x 16 columns at a time. With AVX-512, 16 heads fit one vector: the item's queries are
// transposed once (qT [D][16], 36 KB at D = 576), and a key row's score for all 16 heads is sum_d qT[d] *
// row[d] broadcast: 16 keys' scores accumulate in 16 registers side by side (outer products, nothing summed
// across lanes), the online softmax runs down the keys with each head's running maximum and sum in its lane
// (vector max, exp, add: no per-head loops), and the values add 16 columns of a row times each head's
// probability broadcast into 16 heads' accumulators. Same blocks of kKeyBlock rows and prefetching as
// attend(). Items are (query, 16 heads); where a query has more heads, its items follow each other on a
// thread, the next one reading the rows the last left in L2 (at most 1 MB / 2.3 KB ~ 450 of them).

constexpr int64_t kLaneHeads = 16;

// s[t * 16 + h] = qT[., h] . keys[t] for t < KB: KB key rows' scores, 16 heads in the lanes. The rows' D
// values are broadcast one at a time; `ahead` prefetches a slice of the next block every 64 values.
template <int KB>
PDSERVE_AVX512 inline void lane_scores(const float* qT, const float* const* keys, int64_t D, float* s,
                                       RowPrefetch<float>& ahead, int64_t& tick, int64_t ticks) {
  __m512 acc[KB];
  for (int t = 0; t < KB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t d1 = std::min(D, d0 + 64);
    for (int64_t d = d0; d < d1; ++d) {
      const __m512 qv = _mm512_loadu_ps(qT + d * kLaneHeads);
      for (int t = 0; t < KB; ++t) acc[t] = _mm512_fmadd_ps(qv, _mm512_set1_ps(keys[t][d]), acc[t]);
    }
    ahead.upto(++tick, ticks);
  }
  for (int t = 0; t < KB; ++t) _mm512_storeu_ps(s + t * kLaneHeads, acc[t]);
}

// One item of lane_attend: 16 heads' queries q [16, D] (rows D apart) over rows keys[0 .. n) -> out [16, R]
// (rows R apart). qT: [D][16] scratch; s: [kKeyBlock][16] scratch.
PDSERVE_AVX512 void lane_attend(const float* q, int64_t D, const float* const* keys, int64_t n, int64_t R,
                                float scale, float* qT, float* s, float* out, const float* const* next_keys,
                                int64_t next_n) {
  for (int64_t h = 0; h < kLaneHeads; ++h)
    for (int64_t d = 0; d < D; ++d) qT[d * kLaneHeads + h] = q[h * D + d];
  std::fill(out, out + kLaneHeads * R, 0.f);
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
  RowPrefetch<float> ahead;
  const int64_t chunks = (D + 63) / 64;
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    const float* const* block_keys = keys + j0;
    ahead.next_block(keys, j0, n, next_keys, next_n, D);
    // scores, 16 keys at a time (then 8, 4, 2, 1 for the block's tail)
    int64_t tick = 0;
    const int64_t ticks = chunks * ((nb + 15) / 16 + 4);
    for (int64_t t = 0; t < nb;) {
      const int64_t left = nb - t;
      float* st = s + t * kLaneHeads;
      if (left >= 16) { lane_scores<16>(qT, block_keys + t, D, st, ahead, tick, ticks); t += 16; }
      else if (left >= 8) { lane_scores<8>(qT, block_keys + t, D, st, ahead, tick, ticks); t += 8; }
      else if (left >= 4) { lane_scores<4>(qT, block_keys + t, D, st, ahead, tick, ticks); t += 4; }
      else if (left >= 2) { lane_scores<2>(qT, block_keys + t, D, st, ahead, tick, ticks); t += 2; }
      else { lane_scores<1>(qT, block_keys + t, D, st, ahead, tick, ticks); t += 1; }
    }
    ahead.upto(1, 1);
    // online softmax down the keys, every head in its lane
    __m512 block_top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < nb; ++t)
      block_top = _mm512_max_ps(block_top, _mm512_mul_ps(_mm512_loadu_ps(s + t * kLaneHeads), vscale));
    const __m512 new_top = _mm512_max_ps(top, block_top);
    if (_mm512_cmp_ps_mask(new_top, top, _CMP_GT_OQ) != 0) {
      const __m512 shrink = exp16(_mm512_sub_ps(top, new_top));  // ~1e-38 for the first block: out and sum are 0
      sum = _mm512_mul_ps(sum, shrink);
      if (j0 > 0) {
        alignas(64) float f[kLaneHeads];
        _mm512_store_ps(f, shrink);
        for (int64_t h = 0; h < kLaneHeads; ++h) {
          const __m512 fh = _mm512_set1_ps(f[h]);
          for (int64_t c = 0; c < R; c += 16)
            _mm512_storeu_ps(out + h * R + c, _mm512_mul_ps(_mm512_loadu_ps(out + h * R + c), fh));
        }
      }
      top = new_top;
    }
    for (int64_t t = 0; t < nb; ++t) {
      const __m512 p = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + t * kLaneHeads), vscale, top));
      _mm512_storeu_ps(s + t * kLaneHeads, p);
      sum = _mm512_add_ps(sum, p);
    }
    // out[h, c .. + 16] += sum_t p[t, h] * row_t[c .. + 16]: 16 heads' accumulators per 16 columns
    for (int64_t c = 0; c < R; c += 16) {
      __m512 acc[kLaneHeads];
      for (int64_t h = 0; h < kLaneHeads; ++h) acc[h] = _mm512_loadu_ps(out + h * R + c);
      for (int64_t t = 0; t < nb; ++t) {
        const __m512 v = _mm512_loadu_ps(block_keys[t] + c);
        const float* pt = s + t * kLaneHeads;
        for (int64_t h = 0; h < kLaneHeads; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(pt[h]), v, acc[h]);
      }
      for (int64_t h = 0; h < kLaneHeads; ++h) _mm512_storeu_ps(out + h * R + c, acc[h]);
    }
  }
  alignas(64) float inv[kLaneHeads];
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
  for (int64_t h = 0; h < kLaneHeads; ++h) {
    const __m512 ih = _mm512_set1_ps(inv[h]);
    for (int64_t c = 0; c < R; c += 16)
      _mm512_storeu_ps(out + h * R + c, _mm512_mul_ps(_mm512_loadu_ps(out + h * R + c), ih));
  }
}

// mla_decode's work items over the threads, for cache rows of type W.
template <typename W>
void decode_items(const float* qp, const W* cp, const int64_t* sq, const int64_t* kn, const int64_t* sl, int64_t M,
                  int64_t H, int64_t D, int64_t L, int64_t R, double scale, float* op) {
  // heads per item: all of them while the queries alone give each thread two items, else halves, quarters
  int64_t group = H;
  while (group % 2 == 0 && group / 2 >= 4 && M * (H / group) < 2 * at::get_num_threads()) group /= 2;
  const int64_t groups = H / group;
  const bool dot = std::is_same_v<W, at::BFloat16> && g_bf16_dot && R % 32 == 0;
  auto query_rows = [&](int64_t m, std::vector<const W*>& rows) {  // query m's rows, where they lie in the cache
    rows.resize(kn[m]);
    for (int64_t j = 0; j < kn[m]; ++j) rows[j] = cp + sl[sq[m] * L + j] * D;
  };
  if constexpr (std::is_same_v<W, float>) {
    // an fp32 cache with AVX-512: 16 heads in the lanes (lane_attend), items of (query, 16 heads) where they
    // give every thread one
    if (g_avx512 && H % kLaneHeads == 0 && M * (H / kLaneHeads) >= at::get_num_threads()) {
      const int64_t slices = H / kLaneHeads;
      at::parallel_for(0, M * slices, 1, [&](int64_t i0, int64_t i1) {
        std::vector<const float*> rows, next;  // this item's rows and the next one's (prefetched during this one)
        std::vector<float> qT(D * kLaneHeads), s(kKeyBlock * kLaneHeads);
        query_rows(i0 / slices, next);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t m = i / slices, h0 = (i % slices) * kLaneHeads;
          std::swap(rows, next);
          if (i + 1 < i1)
            query_rows((i + 1) / slices, next);
          else
            next.clear();
          lane_attend(qp + (m * H + h0) * D, D, rows.data(), kn[m], R, static_cast<float>(scale), qT.data(),
                      s.data(), op + (m * H + h0) * R, next.data(), static_cast<int64_t>(next.size()));
        }
      });
      return;
    }
  }
  at::parallel_for(0, M * groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<const W*> rows, next;  // this item's rows and the next one's (prefetched during this one)
    std::vector<float> s(group * kKeyBlock), top(group), sum(group);
    std::vector<at::BFloat16> qb(dot ? group * D : 0), pb(dot ? group * kKeyBlock : 0);
    query_rows(i0 / groups, next);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / groups, h0 = (i % groups) * group;
      const int64_t n = kn[m];
      std::swap(rows, next);
      if (i + 1 < i1)
        query_rows((i + 1) / groups, next);
      else
        next.clear();
      if constexpr (std::is_same_v<W, at::BFloat16>) {
        if (dot) {
          dot_attend(qp + (m * H + h0) * D, group, D, rows.data(), n, R, static_cast<float>(scale), qb.data(),
                     s.data(), pb.data(), top.data(), sum.data(), op + (m * H + h0) * R, next.data(),
                     static_cast<int64_t>(next.size()));
          continue;
        }
      }
      attend(qp + (m * H + h0) * D, group, D, rows.data(), n, R, static_cast<float>(scale), s.data(), top.data(),
             sum.data(), op + (m * H + h0) * R, next.data(), static_cast<int64_t>(next.size()));
    }
  });
}

torch::Tensor mla_decode(const torch::Tensor& q, const torch::Tensor& cache, const torch::Tensor& slots,
                         const torch::Tensor& seq, const torch::Tensor& keys, int64_t R, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "mla_decode: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 &&
              (cache.scalar_type() == torch::kFloat32 || cache.scalar_type() == torch::kBFloat16),
              "mla_decode: float32 queries, a float32 or bfloat16 cache");
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
  float* op = out.data_ptr<float>();
  if (cache.scalar_type() == torch::kBFloat16)  // rows widened to fp32 in registers, as grouped_gemm's weights
    decode_items(qp, cache.data_ptr<at::BFloat16>(), sq, kn, sl, M, H, D, L, R, scale, op);
  else
    decode_items(qp, cache.data_ptr<float>(), sq, kn, sl, M, H, D, L, R, scale, op);
  return out;
}

// ---- MLA prefill attention (AVX512-BF16) -------------------------------------------------------------
//
// The naive (expanded) pass of a prefill chunk: Q new queries of a sequence whose L keys end with them (query
// i at position L - Q + i attends keys 0 .. L - Q + i), per head h
//   s[i, j] = scale * (q_nope[i, h] . k_nope[j, h] + q_pe[i, h] . k_pe[j])     out[i, h] = softmax_j(s) @ v[j, h]
// reading q, k and v where the projections left them (strided views: no concatenation of the two key parts,
// no padding of V to the key width as torch's fused CPU attention needs). torch's fused kernel took ~5.6 ms a
// layer for 256 tokens x 16 heads of the bench preset, causal or not, bf16 no faster than fp32 (2-core AMD EPYC
// with AVX512-BF16, no AMX). Items are (head, block of kPrefillQueries queries), over the threads; an item's
// queries go into pair layout (as head_gemm's weights: vector i holds the queries' dims 2i, 2i + 1), so the
// scores of a key against all of them are VDPBF16PS of the key's pairs broadcast, their sums in the lanes; the
// keys in blocks of kKeyBlock with an online softmax vectorized over the queries (scores kept [key][query]);
// values as dot_attend adds them (two key rows interleaved into pairs, the probabilities rounded to bf16).
// Keys past a query's position (the diagonal blocks) weigh exactly 0. Same machine, bench preset, 256 tokens:
// 1.6-2.6 ms vs 6.8-7.9 ms for torch's path with its copies; 2048 tokens 92-114 vs 194-222 ms; a prefill step of
// 8 x 256 tokens 0.81x the time (the two alternated in one engine).
constexpr int64_t kPrefillQueries = 32;

template <typename T>
struct PrefillViewsOf {
  // q_nope [Q, H, Dn], q_pe [Q, H, Dr], k_nope [L, H, Dn], k_pe [L, Dr], v [L, H, Dv]
  const T *qn, *qr, *kn, *kr, *v;
  int64_t qn0, qn1, qr0, qr1, kn0, kn1, kr0, v0, v1;  // their strides (last dims dense)
  int64_t Q, L, H, Dn, Dr, Dv;
};
using PrefillViews = PrefillViewsOf<at::BFloat16>;

// scores of keys [j, j + MB) of head h against the item's queries in pair layout qp [(Dn + Dr) / 2][32][2]
// -> s[(jj) * 32 + q] for jj < MB
template <int MB>
PDSERVE_BF16_DOT inline void prefill_score_tile(const PrefillViews& a, int64_t h, int64_t j, const at::BFloat16* qp,
                                                float* s) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  pair_accumulate<MB>([&](int m) { return a.kn + (j + m) * a.kn0 + h * a.kn1; }, a.Dn / 2, qp, acc);
  pair_accumulate<MB>([&](int m) { return a.kr + (j + m) * a.kr0; }, a.Dr / 2, qp + a.Dn * 32, acc);
  store_pairs<MB>(acc, s, 32);
}

struct PrefillScratch {
  std::vector<at::BFloat16> qp, pb;
  std::vector<float> s, out;
  PrefillScratch(int64_t D, int64_t Dv)
      : qp(D * kPrefillQueries), pb(kPrefillQueries * (kKeyBlock + 2)), s(kKeyBlock * kPrefillQueries),
        out(kPrefillQueries * Dv) {}
};

// one item: head h, queries [q0, q0 + qb) -> o [Q, H, Dv] bf16
PDSERVE_BF16_DOT void prefill_item(const PrefillViews& a, int64_t h, int64_t q0, int64_t qb, float scale,
                                   PrefillScratch& w, at::BFloat16* o) {
  constexpr int64_t QB = kPrefillQueries;
  const int64_t D = a.Dn + a.Dr, Dv = a.Dv, past = a.L - a.Q;
  at::BFloat16* qp = w.qp.data();
  for (int64_t q = 0; q < QB; ++q) {  // the queries in pair layout, missing ones zero
    const at::BFloat16* qn = a.qn + (q0 + q) * a.qn0 + h * a.qn1;
    const at::BFloat16* qr = a.qr + (q0 + q) * a.qr0 + h * a.qr1;
    for (int64_t d = 0; d < D; d += 2) {
      at::BFloat16* dst = qp + (d / 2) * 64 + q * 2;
      if (q >= qb) {
        dst[0] = dst[1] = at::BFloat16(0.f);
      } else {
        const at::BFloat16* src = d < a.Dn ? qn + d : qr + (d - a.Dn);
        dst[0] = src[0];
        dst[1] = src[1];
      }
    }
  }
  float* s = w.s.data();
  float* out = w.out.data();
  at::BFloat16* pb = w.pb.data();
  constexpr int64_t ldp = kKeyBlock + 2;
  std::fill(out, out + QB * Dv, 0.f);
  __m512 top[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
  __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t n = past + q0 + qb;  // keys any of the item's queries attends
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    int64_t jj = 0;
    for (; jj + 8 <= nb; jj += 8) prefill_score_tile<8>(a, h, j0 + jj, qp, s + jj * QB);
    for (; jj < nb; ++jj) prefill_score_tile<1>(a, h, j0 + jj, qp, s + jj * QB);
    // key j0 + jj is past query q's position where j0 + jj > past + q0 + q, i.e. q < j0 + jj - past - q0
    const bool diagonal = j0 + nb - 1 > past + q0;
    __m512 most[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
    for (jj = 0; jj < nb; ++jj) {
      for (int half = 0; half < 2; ++half) {
        __m512 row = _mm512_loadu_ps(s + jj * QB + half * 16);
        if (diagonal) {
          const __m512i qi = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(half * 16)));
          const __m512i first_past = _mm512_set1_epi32(static_cast<int32_t>(j0 + jj - past - q0));
          const __mmask16 past_key = _mm512_cmplt_epi32_mask(qi, first_past);
          row = _mm512_mask_mov_ps(row, past_key, _mm512_set1_ps(-INFINITY));
          _mm512_storeu_ps(s + jj * QB + half * 16, row);
        }
        most[half] = _mm512_max_ps(most[half], row);
      }
    }
    __m512 shrink[2];
    for (int half = 0; half < 2; ++half) {  // every query has key 0, so its top is finite after the first block
      const __m512 block_top = _mm512_mul_ps(most[half], vscale);
      const __m512 new_top = _mm512_max_ps(top[half], block_top);
      shrink[half] = exp16(_mm512_sub_ps(top[half], new_top));  // ~1e-38 for the first block: out and sum are 0
      top[half] = new_top;
      sum[half] = _mm512_mul_ps(sum[half], shrink[half]);
    }
    alignas(64) float shrink_q[QB];
    _mm512_store_ps(shrink_q, shrink[0]);
    _mm512_store_ps(shrink_q + 16, shrink[1]);
    for (int64_t q = 0; q < qb; ++q) {
      const __m512 f = _mm512_set1_ps(shrink_q[q]);
      for (int64_t c = 0; c < Dv; c += 16)
        _mm512_storeu_ps(out + q * Dv + c, _mm512_mul_ps(_mm512_loadu_ps(out + q * Dv + c), f));
    }
    for (jj = 0; jj < nb; ++jj) {
      for (int half = 0; half < 2; ++half) {
        const __m512 row = _mm512_loadu_ps(s + jj * QB + half * 16);
        __m512 p = exp16(_mm512_fmsub_ps(row, vscale, top[half]));
        p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(row, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), _mm512_setzero_ps());
        sum[half] = _mm512_add_ps(sum[half], p);
        _mm512_storeu_ps(s + jj * QB + half * 16, p);
      }
    }
    for (int64_t q = 0; q < qb; ++q) {  // probabilities [query][key] in bf16, an odd block's last pair partner 0
      for (jj = 0; jj < nb; ++jj) pb[q * ldp + jj] = at::BFloat16(s[jj * QB + q]);
      pb[q * ldp + nb] = at::BFloat16(0.f);
    }
    const at::BFloat16* vh = a.v + j0 * a.v0 + h * a.v1;
    for (int64_t g = 0; g < qb; g += kValueHeads)  // out += p @ v, as dot_attend
      for (int64_t c = 0; c < Dv; c += 32)
        value_pairs(pb + g * ldp, ldp, std::min<int64_t>(kValueHeads, qb - g), nb,
                    [&](int64_t j) { return vh + j * a.v0; }, c, out + g * Dv, Dv);
  }
  alignas(64) float sum_q[QB];
  _mm512_store_ps(sum_q, sum[0]);
  _mm512_store_ps(sum_q + 16, sum[1]);
  for (int64_t q = 0; q < qb; ++q) {  // columns back in order, / sum, rounded to bf16
    const __m512 inv = _mm512_set1_ps(1.f / sum_q[q]);
    at::BFloat16* dst = o + ((q0 + q) * a.H + h) * Dv;
    for (int64_t c = 0; c < Dv; c += 32) {
      __m512 lo, hi;
      in_order(out + q * Dv + c, inv, lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c + 16), (__m256i)_mm512_cvtneps_pbh(hi));
    }
  }
}

// ---- MLA prefill attention (fp32: AVX2 + FMA, or AVX-512) --------------------------------------------------
//
// The same pass for an fp32 model, in 8 lanes (AVX2 + FMA) or, on a CPU with AVX-512 (g_avx512),
// 16: an item's 2 x lanes queries go in transposed ([D][queries]), so a key's scores against them are FMAs of its
// dims broadcast, L::kScoreKeys keys a tile (each query vector loaded serving all of them); the same online
// softmax over the queries' lanes; out += p @ v L::kValueQueries queries by 32 value columns at a time, each
// probability broadcast, from the block's values copied side by side. Per lane the two widths do the same
// arithmetic in the same order (their results are equal bit for bit). Sums in fp32 in another order than
// torch's: equal to its attention within fp32 rounding. Bench preset (16 heads, causal), fp32, 2-core AMD EPYC
// with AVX-512 and AVX512-BF16, no AMX, 8 lanes: 256 tokens 3.1-4.2 ms (80-108 GFLOP/s) vs 8.3-11.0 ms for
// torch's fused attention with the copies it needs (the keys' two parts concatenated, V padded to the key
// width); 1024 tokens 51-67 vs 81 ms; 4096 tokens 860-990 vs 830 ms, where the keys a 16-query item re-reads
// come from L3 (hence cpu_gemm.FP32_PREFILL_MAX_KEYS); 32 queries an item (4 vectors, 2 or 3 keys a tile) was
// no faster there. 16 lanes (32 queries an item, 6 keys a tile, 4 queries a value tile): 0.69x the 8 lanes' time
// at 256 tokens, 0.73x at 1024, 0.70x at 2048.
constexpr int kQueryVectors = 2;  // query vectors per item

// acc[m] += the n dims of key rows[m] broadcast times the item's queries q [n][queries], for m < MB
template <typename L, int MB>
inline void prefill_score_dims(const float* const* rows, int64_t n, const float* q, typename L::V (*acc)[kQueryVectors]) {
  constexpr int QV = kQueryVectors, QB = L::kLanes * QV;
  for (int64_t d = 0; d < n; ++d, q += QB) {
    typename L::V qv[QV];
    for (int u = 0; u < QV; ++u) qv[u] = L::load(q + L::kLanes * u);
    for (int m = 0; m < MB; ++m) {
      const typename L::V k = L::set1(rows[m][d]);
      for (int u = 0; u < QV; ++u) acc[m][u] = L::fmadd(k, qv[u], acc[m][u]);
    }
  }
}

// scores of keys [j, j + MB) of head h against the item's queries qt [D][QB] -> s[jj * QB + q]
template <typename L, int MB>
inline void prefill_score_tile(const PrefillViewsOf<float>& a, int64_t h, int64_t j, const float* qt, float* s) {
  constexpr int QV = kQueryVectors, QB = L::kLanes * QV;
  typename L::V acc[MB][QV];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < QV; ++u) acc[m][u] = L::zero();
  const float* kn[MB];
  const float* kr[MB];
  for (int m = 0; m < MB; ++m) kn[m] = a.kn + (j + m) * a.kn0 + h * a.kn1, kr[m] = a.kr + (j + m) * a.kr0;
  prefill_score_dims<L, MB>(kn, a.Dn, qt, acc);
  prefill_score_dims<L, MB>(kr, a.Dr, qt + a.Dn * QB, acc);
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < QV; ++u) L::store(s + m * QB + L::kLanes * u, acc[m][u]);
}

// out[q][c .. c + 32) += sum_jj p[jj][q] v[jj][c .. c + 32) for the NQ queries from q (p's rows QB apart)
template <typename L, int NQ>
inline void prefill_values(const float* p, int64_t nb, const float* vh, int64_t v0, int64_t q, int64_t c, float* out,
                           int64_t Dv) {
  constexpr int VV = 32 / L::kLanes, QB = L::kLanes * kQueryVectors;
  typename L::V acc[NQ][VV];
  for (int i = 0; i < NQ; ++i)
    for (int u = 0; u < VV; ++u) acc[i][u] = L::load(out + (q + i) * Dv + c + L::kLanes * u);
  for (int64_t jj = 0; jj < nb; ++jj) {
    const float* vr = vh + jj * v0 + c;
    typename L::V v[VV];
    for (int u = 0; u < VV; ++u) v[u] = L::load(vr + L::kLanes * u);
    for (int i = 0; i < NQ; ++i) {
      const typename L::V pi = L::set1(p[jj * QB + q + i]);
      for (int u = 0; u < VV; ++u) acc[i][u] = L::fmadd(pi, v[u], acc[i][u]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int u = 0; u < VV; ++u) L::store(out + (q + i) * Dv + c + L::kLanes * u, acc[i][u]);
}

template <typename L>
struct PrefillScratchF {
  static constexpr int64_t kQueries = L::kLanes * kQueryVectors;
  std::vector<float> qt, s, out, vb;
  PrefillScratchF(int64_t D, int64_t Dv) : qt(D * kQueries), s(kKeyBlock * kQueries), out(kQueries * Dv),
                                           vb(kKeyBlock * Dv) {}
};

// one item: head h, queries [q0, q0 + qb) -> o [Q, H, Dv] fp32
template <typename L>
inline void prefill_item_f(const PrefillViewsOf<float>& a, int64_t h, int64_t q0, int64_t qb, float scale,
                           PrefillScratchF<L>& w, float* o) {
  using V = typename L::V;
  constexpr int64_t QB = PrefillScratchF<L>::kQueries;
  constexpr int QV = kQueryVectors, N = L::kLanes;
  const int64_t D = a.Dn + a.Dr, Dv = a.Dv, past = a.L - a.Q;
  float* qt = w.qt.data();
  for (int64_t q = 0; q < QB; ++q) {  // transposed, missing queries zero
    const float* qn = a.qn + (q0 + q) * a.qn0 + h * a.qn1;
    const float* qr = a.qr + (q0 + q) * a.qr0 + h * a.qr1;
    for (int64_t d = 0; d < D; ++d) qt[d * QB + q] = q >= qb ? 0.f : d < a.Dn ? qn[d] : qr[d - a.Dn];
  }
  float* s = w.s.data();
  float* out = w.out.data();
  std::fill(out, out + QB * Dv, 0.f);
  V top[QV], sum[QV];
  for (int u = 0; u < QV; ++u) top[u] = L::set1(-INFINITY), sum[u] = L::zero();
  const V vscale = L::set1(scale);
  const int64_t n = past + q0 + qb;  // keys any of the item's queries attends
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - j0);
    int64_t jj = 0;
    for (; jj + L::kScoreKeys <= nb; jj += L::kScoreKeys)
      prefill_score_tile<L, L::kScoreKeys>(a, h, j0 + jj, qt, s + jj * QB);
    for (; jj < nb; ++jj) prefill_score_tile<L, 1>(a, h, j0 + jj, qt, s + jj * QB);
    // key j0 + jj is past query q's position where q < j0 + jj - past - q0 (the diagonal blocks)
    const bool diagonal = j0 + nb - 1 > past + q0;
    V most[QV];
    for (int u = 0; u < QV; ++u) most[u] = L::set1(-INFINITY);
    for (jj = 0; jj < nb; ++jj) {
      for (int u = 0; u < QV; ++u) {
        V row = L::load(s + jj * QB + u * N);
        if (diagonal) {
          row = L::mask_before(row, static_cast<int32_t>(u * N), static_cast<int32_t>(j0 + jj - past - q0));
          L::store(s + jj * QB + u * N, row);
        }
        most[u] = L::max(most[u], row);
      }
    }
    alignas(64) float shrink_q[QB];
    for (int u = 0; u < QV; ++u) {  // every query has key 0, so its top is finite after the first block
      const V new_top = L::max(top[u], L::mul(most[u], vscale));
      const V shrink = L::exp(L::sub(top[u], new_top));  // ~1e-38 for the first block: out, sum 0
      top[u] = new_top;
      sum[u] = L::mul(sum[u], shrink);
      L::store(shrink_q + u * N, shrink);
    }
    for (int64_t q = 0; q < qb; ++q) {
      const V f = L::set1(shrink_q[q]);
      for (int64_t c = 0; c < Dv; c += N) L::store(out + q * Dv + c, L::mul(L::load(out + q * Dv + c), f));
    }
    for (jj = 0; jj < nb; ++jj) {
      for (int u = 0; u < QV; ++u) {
        const V row = L::load(s + jj * QB + u * N);
        const V p = L::zero_where_ninf(L::exp(L::fmsub(row, vscale, top[u])), row);  // past keys weigh 0
        sum[u] = L::add(sum[u], p);
        L::store(s + jj * QB + u * N, p);
      }
    }
    // the block's values side by side first: each is read once per value tile and 32 columns, and a head's
    // rows lie a power of two apart in kv_b's output (16 KB in the bench preset), all in one L1 set
    float* vb = w.vb.data();
    for (jj = 0; jj < nb; ++jj) std::memcpy(vb + jj * Dv, a.v + (j0 + jj) * a.v0 + h * a.v1, Dv * sizeof(float));
    for (int64_t c = 0; c < Dv; c += 32) {
      int64_t q = 0;
      for (; q + L::kValueQueries <= qb; q += L::kValueQueries)
        prefill_values<L, L::kValueQueries>(s, nb, vb, Dv, q, c, out, Dv);
      for (; q < qb; ++q) prefill_values<L, 1>(s, nb, vb, Dv, q, c, out, Dv);
    }
  }
  alignas(64) float sum_q[QB];
  for (int u = 0; u < QV; ++u) L::store(sum_q + N * u, sum[u]);
  for (int64_t q = 0; q < qb; ++q) {
    const V inv = L::set1(1.f / sum_q[q]);
    float* dst = o + ((q0 + q) * a.H + h) * Dv;
    for (int64_t c = 0; c < Dv; c += N) L::store(dst + c, L::mul(L::load(out + q * Dv + c), inv));
  }
}

void prefill_item8(const PrefillViewsOf<float>& a, int64_t h, int64_t q0, int64_t qb, float scale,
                   PrefillScratchF<Lanes8>& w, float* o) {
  prefill_item_f<Lanes8>(a, h, q0, qb, scale, w, o);
}

// flatten: every call inlined into this AVX-512 function, the 16-lane helpers included
PDSERVE_AVX512 __attribute__((flatten)) void prefill_item16(const PrefillViewsOf<float>& a, int64_t h, int64_t q0,
                                                            int64_t qb, float scale, PrefillScratchF<Lanes16>& w,
                                                            float* o) {
  prefill_item_f<Lanes16>(a, h, q0, qb, scale, w, o);
}

template <typename T>
PrefillViewsOf<T> prefill_views(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& k_nope,
                                const torch::Tensor& k_pe, const torch::Tensor& v) {
  PrefillViewsOf<T> a{};
  a.Q = q_nope.size(0), a.H = q_nope.size(1), a.Dn = q_nope.size(2), a.Dr = q_pe.size(2);
  a.L = k_nope.size(0), a.Dv = v.size(2);
  TORCH_CHECK(q_pe.size(0) == a.Q && q_pe.size(1) == a.H && k_nope.size(1) == a.H && k_nope.size(2) == a.Dn &&
              k_pe.size(0) == a.L && k_pe.size(1) == a.Dr && v.size(0) == a.L && v.size(1) == a.H,
              "mla_prefill: shapes do not agree: q_nope ", q_nope.sizes(), ", q_pe ", q_pe.sizes(), ", k_nope ",
              k_nope.sizes(), ", k_pe ", k_pe.sizes(), ", v ", v.sizes());
  TORCH_CHECK(0 < a.Q && a.Q <= a.L, "mla_prefill: ", a.Q, " queries over ", a.L, " keys");
  a.qn = q_nope.data_ptr<T>(), a.qr = q_pe.data_ptr<T>(), a.kn = k_nope.data_ptr<T>();
  a.kr = k_pe.data_ptr<T>(), a.v = v.data_ptr<T>();
  a.qn0 = q_nope.stride(0), a.qn1 = q_nope.stride(1), a.qr0 = q_pe.stride(0), a.qr1 = q_pe.stride(1);
  a.kn0 = k_nope.stride(0), a.kn1 = k_nope.stride(1), a.kr0 = k_pe.stride(0), a.v0 = v.stride(0), a.v1 = v.stride(1);
  return a;
}

// every (head, query block) item over the threads, each with its own scratch
template <typename Views, typename Scratch, typename Item>
void prefill_items(const Views& a, int64_t per_item, const Item& item) {
  const int64_t blocks = (a.Q + per_item - 1) / per_item;
  at::parallel_for(0, a.H * blocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch w(a.Dn + a.Dr, a.Dv);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t h = b / blocks, q0 = (b % blocks) * per_item;
      item(h, q0, std::min(per_item, a.Q - q0), w);
    }
  });
}

torch::Tensor mla_prefill(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& k_nope,
                          const torch::Tensor& k_pe, const torch::Tensor& v, double scale) {
  const auto dtype = q_nope.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "mla_prefill: float32 or bfloat16 tensors");
  for (const auto* t : {&q_nope, &q_pe, &k_nope, &k_pe, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->stride(-1) == 1,
                "mla_prefill: CPU tensors of one dtype, last dims dense");
  TORCH_CHECK(q_nope.dim() == 3 && q_pe.dim() == 3 && k_nope.dim() == 3 && k_pe.dim() == 2 && v.dim() == 3,
              "mla_prefill: q_nope [Q, H, Dn], q_pe [Q, H, Dr], k_nope [L, H, Dn], k_pe [L, Dr], v [L, H, Dv]");
  auto o = torch::empty({q_nope.size(0), q_nope.size(1), v.size(2)}, q_nope.options());
  const float fscale = static_cast<float>(scale);
  if (dtype == torch::kFloat32) {
    TORCH_CHECK(v.size(2) % 32 == 0, "mla_prefill: values a multiple of 32 wide");
    const auto a = prefill_views<float>(q_nope, q_pe, k_nope, k_pe, v);
    float* op = o.data_ptr<float>();
    if (g_avx512)
      prefill_items<PrefillViewsOf<float>, PrefillScratchF<Lanes16>>(a, PrefillScratchF<Lanes16>::kQueries,
          [&](int64_t h, int64_t q0, int64_t qb, PrefillScratchF<Lanes16>& w) { prefill_item16(a, h, q0, qb, fscale, w, op); });
    else
      prefill_items<PrefillViewsOf<float>, PrefillScratchF<Lanes8>>(a, PrefillScratchF<Lanes8>::kQueries,
          [&](int64_t h, int64_t q0, int64_t qb, PrefillScratchF<Lanes8>& w) { prefill_item8(a, h, q0, qb, fscale, w, op); });
    return o;
  }
  TORCH_CHECK(g_bf16_dot, "mla_prefill: needs the AVX512-BF16 products (bf16_dot_enabled())");
  TORCH_CHECK(q_nope.size(2) % 2 == 0 && q_pe.size(2) % 2 == 0 && v.size(2) % 32 == 0,
              "mla_prefill: even key dims and values a multiple of 32 wide");
  const auto a = prefill_views<at::BFloat16>(q_nope, q_pe, k_nope, k_pe, v);
  at::BFloat16* op = o.data_ptr<at::BFloat16>();
  prefill_items<PrefillViews, PrefillScratch>(a, kPrefillQueries,
      [&](int64_t h, int64_t q0, int64_t qb, PrefillScratch& w) { prefill_item(a, h, q0, qb, fscale, w, op); });
  return o;
}

// ---- RMSNorm ---------------------------------------------------------------------------------------
//
// y = w * (x * 1 / sqrt(mean(x^2) + eps)) per row, fp32 (or bf16 rows, rounded as below). ATen's CPU rms_norm is a chain of six ops (pow,
// mean, add, rsqrt, mul, mul): at decode sizes each costs a dispatch and, right after a weight-streaming
// matmul, a cold start, ~110 us per norm where this takes ~17 (timed side by side after the same matmul on
// a 2-core AMD EPYC, AVX2 + FMA, no AVX512-BF16 / AMX, fp32; a decode step runs ~17 norms). The sum of squares is taken in 16 lanes, so the result differs from the
// formula's in the last bits (within 1e-6 relative); rows may sit apart (a view into a wider tensor).

inline void store8(at::BFloat16* p, __m256 v) {  // round8(v), its upper halves stored
  const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round8(v)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

// one row: fp32 as the formula says; bf16 as a bf16 model's RMSNorm rounds (x * inv rounded to bf16, times
// the weight, rounded again)
template <typename T>
void rms_row(const T* r, const T* wp, int64_t D, float eps, T* o) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= D; k += 16) {
    const __m256 v0 = load8(r + k), v1 = load8(r + k + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  float squares = hsum(_mm256_add_ps(a0, a1));
  for (; k < D; ++k) squares += widen(r[k]) * widen(r[k]);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(D) + eps);
  const __m256 vi = _mm256_set1_ps(inv);
  for (k = 0; k + 8 <= D; k += 8) {
    __m256 n = _mm256_mul_ps(load8(r + k), vi);
    if constexpr (std::is_same_v<T, at::BFloat16>) n = round8(n);
    store8(o + k, _mm256_mul_ps(load8(wp + k), n));
  }
  for (; k < D; ++k) o[k] = static_cast<T>(widen(wp[k]) * widen(static_cast<T>(widen(r[k]) * inv)));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "rms_norm: x and w both float32 or both bfloat16");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.is_contiguous() && x.size(-1) == w.size(0),
              "rms_norm: x [..., D] and w [D], got ", x.sizes(), " and ", w.sizes());
  const bool direct = x.dim() == 2 && x.stride(1) == 1 && x.stride(0) >= x.size(1);  // dense rows, maybe apart
  const auto rows = direct ? x : x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t T = rows.size(0), D = rows.size(1), ld = rows.stride(0);
  auto y = torch::empty({T, D}, x.options());
  const float feps = static_cast<float>(eps);
  auto run = [&](const auto* xp, const auto* wp, auto* yp) {
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) rms_row(xp + t * ld, wp, D, feps, yp + t * D);
    });
  };
  if (x.scalar_type() == torch::kBFloat16)
    run(rows.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  else
    run(rows.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>());
  return y.view(x.sizes());
}

// ---- rotary embedding ------------------------------------------------------------------------------
//
// engine/model/rope.py's formula in one call instead of ATen's ~10 small ops (~30 us a layer at batch 1 on the
// bundled model in bf16, 2-core AMD EPYC with AVX512-BF16, no AMX):
// rows x [T, M, dim] (pairs interleaved or halves) rotated by position t's cos, sin [T, dim / 2] -> y with
// x1 * cos - x2 * sin, then x2 * cos + x1 * sin, each product and sum rounded to fp32 as ATen's separate
// ops round them (contracted into FMAs the results differ: tests/test_cpu_kernels.py), a bf16 result
// rounded to nearest even as .to() rounds it.
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rope_rows(const T* x, const float* c, const float* s, int64_t M,
                                                            int64_t dim, bool interleave, T* y) {
  const int64_t half = dim / 2;
  for (int64_t m = 0; m < M; ++m, x += dim, y += dim) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = widen(interleave ? x[2 * i] : x[i]), x2 = widen(interleave ? x[2 * i + 1] : x[half + i]);
      const float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
      y[i] = static_cast<T>(a - b);
      y[half + i] = static_cast<T>(e + f);
    }
  }
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool interleave) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "rope: x float32 or bfloat16 on the CPU");
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) % 2 == 0, "rope: x [T, ..., dim] with dim even, got ", x.sizes());
  const int64_t T = x.size(0), dim = x.size(-1);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.sizes() == sin.sizes() && cos.numel() == T * dim / 2,
              "rope: cos and sin [T, dim / 2] float32, got ", cos.sizes(), " and ", sin.sizes(), " for x ", x.sizes());
  const auto xc = x.contiguous();
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t M = T ? xc.numel() / (T * dim) : 0;
  auto y = torch::empty_like(xc);
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  auto run = [&](const auto* xp, auto* yp) {
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * dim)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        rope_rows(xp + t * M * dim, cp + t * dim / 2, sp + t * dim / 2, M, dim, interleave, yp + t * M * dim);
    });
  };
  if (x.scalar_type() == torch::kBFloat16)
    run(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  else
    run(xc.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// ---- DeepSeek-V3 routing (sigmoid scores, correction bias, group-limited top-k) ----------------------
//
// engine/model/moe.py's Gate.forward after the router matmul, per token in one call instead of ~17 small
// ATen ops (~350 us per MoE layer in a decode step, 0.05 ms a step for all three layers through this, on a
// 2-core AMD EPYC, AVX2 + FMA, no AVX512-BF16 / AMX, fp32): scores =
// sigmoid(logits); choice = scores + bias; the topk_groups groups with the largest sum of their two best
// choices stay; the k best choices among them are the experts, weighted by their scores (renormalized to
// sum 1 when asked) times `scaling`. Ties go to the lower index.

void route_row(const float* logits, const float* bias, int64_t E, int64_t groups, int64_t topk_groups, int64_t k,
               bool renormalize, float scaling, float* scores, float* choice, float* group_score, int64_t* ids,
               float* weights) {
  for (int64_t e = 0; e < E; ++e) {
    scores[e] = 1.f / (1.f + std::exp(-logits[e]));
    choice[e] = bias != nullptr ? scores[e] + bias[e] : scores[e];
  }
  if (groups > 1) {
    const int64_t size = E / groups;
    for (int64_t g = 0; g < groups; ++g) {
      float best = -INFINITY, second = -INFINITY;
      for (int64_t e = g * size; e < (g + 1) * size; ++e) {
        if (choice[e] > best) { second = best; best = choice[e]; }
        else if (choice[e] > second) second = choice[e];
      }
      group_score[g] = best + second;
    }
    for (int64_t kept = 0; kept < topk_groups; ++kept) {  // the best groups, marked by +inf
      int64_t top = -1;
      for (int64_t g = 0; g < groups; ++g)
        if (group_score[g] != INFINITY && (top < 0 || group_score[g] > group_score[top] || std::isnan(group_score[g])))
          top = g;  // NaN (from NaN logits) counts as the largest, as in torch.topk
      group_score[top] = INFINITY;
    }
    for (int64_t g = 0; g < groups; ++g)
      if (group_score[g] != INFINITY)
        for (int64_t e = g * size; e < (g + 1) * size; ++e) choice[e] = -INFINITY;
  }
  float total = 0.f;
  for (int64_t i = 0; i < k; ++i) {  // k passes: k is small (8 for DeepSeek-V3)
    int64_t top = -1;
    for (int64_t e = 0; e < E; ++e)
      if (choice[e] != -INFINITY && (top < 0 || choice[e] > choice[top] || std::isnan(choice[e]))) top = e;
    ids[i] = top;
    weights[i] = scores[top];
    total += scores[top];
    choice[top] = -INFINITY;
  }
  for (int64_t i = 0; i < k; ++i) weights[i] = (renormalize ? weights[i] / (total + 1e-20f) : weights[i]) * scaling;
}

std::tuple<torch::Tensor, torch::Tensor> route(const torch::Tensor& logits, const c10::optional<torch::Tensor>& bias,
                                               int64_t groups, int64_t topk_groups, int64_t k, bool renormalize,
                                               double scaling) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
              "route: logits [T, E] float32 on the CPU");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(groups >= 1 && E % groups == 0 && (groups == 1 || E / groups >= 2) && topk_groups >= 1 &&
              topk_groups <= groups && k >= 1 && k <= topk_groups * (E / groups),
              "route: ", E, " experts in ", groups, " groups, keeping ", topk_groups, ", choosing ", k);
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat32 && b.numel() == E, "route: bias [E] float32");
    bp = b.data_ptr<float>();
  }
  const auto l = logits.contiguous();
  auto ids = torch::empty({T, k}, logits.options().dtype(torch::kLong));
  auto weights = torch::empty({T, k}, logits.options());
  const float* lp = l.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(2 * E + groups);
    for (int64_t t = t0; t < t1; ++t)
      route_row(lp + t * E, bp, E, groups, topk_groups, k, renormalize, static_cast<float>(scaling), scratch.data(),
                scratch.data() + E, scratch.data() + 2 * E, ip + t * k, wp + t * k);
  });
  return {ids, weights};
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
  m.def("gemm_argmax", &gemm_argmax, "the column of each row's largest value of x @ w[0].T as grouped_gemm rounds it");
  m.def("moe_experts", &moe_experts, "a small step's routed experts, whole: sort, both GEMMs, SiLU, weighted sum");
  m.def("head_gemm", &head_gemm, "y[m, h] = w[h] @ x[m, h], strided x and y (the absorbed MLA products)");
  m.def("mla_decode", &mla_decode, "absorbed MLA decode attention over the paged latent cache");
  m.def("mla_prefill", &mla_prefill, "MLA prefill attention of strided views (causal): fp32 by AVX2 + FMA, "
        "bf16 by AVX512-BF16");
  m.def("rms_norm", &rms_norm, "RMSNorm of fp32 or bf16 rows: w * x / sqrt(mean(x^2) + eps)");
  m.def("rope", &rope, "rotary embedding of x [T, ..., dim] by cos, sin [T, dim / 2]: rope.py's formula, its rounding");
  m.def("route", &route, "DeepSeek-V3 routing: sigmoid scores, bias, group-limited top-k -> (ids, weights)");
  m.def("bf16_dot_enabled", &bf16_dot_enabled, "whether bf16 rows run through the AVX512-BF16 products");
  m.def("set_bf16_dot", &set_bf16_dot, "turn the AVX512-BF16 products on or off (on only where the CPU has them); "
        "returns the previous setting");
  m.def("col_tiles_enabled", &col_tiles_enabled, "whether the kernel takes weights in column-tile layout");
  m.def("set_col_tiles", &set_col_tiles, "turn the column-tile layout on or off; returns the previous setting");
  m.def("avx512_enabled", &avx512_enabled, "whether the fp32 paths written for both widths run their AVX-512 code");
  m.def("set_avx512", &set_avx512, "turn the AVX-512 code of the fp32 paths on or off (on only where the CPU has "
        "AVX-512); returns the previous setting");
  m.def("parallel_threads", &parallel_threads, "threads grouped_gemm's parallel_for spreads `items` over");
}

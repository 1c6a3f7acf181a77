// CPU kernels for the engine's fused forward pass (float32): the CPU counterparts of
// triton_kernels.py, with the same signatures, built by scripts/build_native.sh into
// python_backends/engine/_cpu_kernels*.so and loaded by cpu_kernels.py.
//
// Why: on the plain path a decode step on the CPU was ~65% matrix multiplies (oneDNN) and
// ~35% everything else, and most of that "else" is not arithmetic. Each of the ~60 small
// PyTorch ops of a layer (RMSNorm's pow/mean/rsqrt/mul, RoPE's slices and cat, SiLU and mul,
// the cache writes) costs a dispatch and a pass over memory, and decode attention first
// copies every sequence's keys and values out of the paged cache into a padded buffer. Here
// a layer's elementwise work is four calls, attention reads the cache in place through the
// block table, and the linear layers have a GEMM of their own (below).
//
// Rounding follows the PyTorch reference ops in llama.py: elementwise math is float32 with
// no fused multiply-adds (built with -ffp-contract=off), in the reference's order, so RoPE
// and the residual add round exactly as PyTorch rounds them. SiLU's exp is a polynomial
// within ~1 ulp of PyTorch's, and reductions (the RMS, the attention dot products and
// softmax sums) add in another order: both move results by float32 rounding only, as
// oneDNN's GEMMs already do against MKL's.
//
// Threads: PyTorch's own OpenMP pool (torch.set_num_threads), so these kernels never compete
// with PyTorch's ops (or one another) for cores; the GEMMs and decode attention deal their
// work out in chunks (parallel.h), the small elementwise kernels through at::parallel_for.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "blockq_gemm.h"
#include "parallel.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX2__
// e^x for 8 floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial), as in
// Sleef's and avx_mathfun's float versions; within ~1 ulp of the correctly rounded value,
// 0 for x below ~-88 (softmax's masked scores) and +inf above ~88.
inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f);
  const __m256 c2 = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 above = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, c1));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, c2));
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, one));
  __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx),
                                                        _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  y = _mm256_andnot_ps(below, y);
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), above);
}

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out[i] = e^(x[i] - shift), returning the sum of out.
float ExpShiftedSum(const float* x, float shift, float* out, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  const __m256 s = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(out + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = Sum8(acc);
#endif
  for (; i < n; ++i) {
    out[i] = std::exp(x[i] - shift);
    sum += out[i];
  }
  return sum;
}

float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef __AVX2__
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  sum = Sum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[i] += weight * x[i]
inline void Axpy(float weight, const float* x, float* acc, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 w = _mm256_set1_ps(weight);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i),
                                              _mm256_loadu_ps(acc + i)));
  }
#endif
  for (; i < n; ++i) acc[i] += weight * x[i];
}

void CheckFloat(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32,
              name, " must be a float32 CPU tensor");
}

int64_t IndexAt(const torch::Tensor& t, int64_t i) {
  return t.scalar_type() == torch::kInt32 ? t.data_ptr<int32_t>()[i]
                                          : t.data_ptr<int64_t>()[i];
}

void CheckIndex(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == torch::kInt32 || t.scalar_type() == torch::kInt64),
              name, " must be a contiguous int32 or int64 CPU tensor");
}

// ------------------------------------------------------------------ linear layers: y = x W^T
// The model's linear layers multiply through here, with each weight packed once at load.
//
// Why not oneDNN (the plain path's GEMM, with its weights also packed ahead of time): at a
// decode step's 32 rows oneDNN reached 85-100 GFLOP/s on 2 AVX2 cores, well short of the
// ~160 of large products, and the step was ~80% matrix multiplies. Measured on a whole
// SmolLM2 step's GEMMs with cold weights, paired rounds (scripts/bench_cpu_gemm.py): this
// kernel 1.2-1.4x oneDNN at 1-64 rows on both an AVX2 EPYC and an AVX-512 Xeon; at a
// prefill's 2,048 rows 1.12x on the EPYC and 0.95x on the Xeon.
//
// Layout: W [n, k] becomes panels of kPanel output columns (48 with AVX-512, 24 with AVX2),
// panel p holding W[kPanel p + j][i] at [p][i][j] (zero past n), so each step of the inner
// loop reads three contiguous vectors of weights, which a tile of rows of x multiplies
// (below, with kPanel).
//
// Loop nest, in the manner of Goto's GEMM: threads take runs of consecutive panels from a
// shared counter; within a run, k goes in blocks of at most kMaxDepth, rows in blocks of
// kRowBlock (that block of x stays in L2 while the run's panels stream past it); and
// while one panel is multiplied, the next panel's block is prefetched into L2, a cache line
// every kPrefetchEvery steps of k. The weights come from DRAM every step (the model is
// larger than a share of L3), and without that prefetch the first row tile of each panel
// waits on them.
//
// Rounding: each output sums x[r][i] * W[c][i] over i in order with FMAs, a k-block at a
// time; oneDNN and MKL add in other orders, so results differ from theirs by float32
// rounding only.
//
// The register tile follows the vector width the build targets (-march=native): with
// AVX-512, 8 x 48 in 24 of the 32 zmm registers (3 loads of W, 8 broadcasts and 24 FMAs per
// k); with AVX2, 4 x 24 in 12 of the 16 ymm registers (3 loads, 4 broadcasts, 12 FMAs). A
// panel is three vectors wide either way, and weights are packed for the build that
// multiplies them (`panel_width()` tells the width).
#if defined(__AVX512F__)
using GemmVec = __m512;
constexpr int kPanel = 48;
constexpr int kTileRows = 8;
constexpr const char* kGemmIsa = "AVX-512";
inline GemmVec GemmLoad(const float* p) { return _mm512_load_ps(p); }
inline GemmVec GemmLoadU(const float* p) { return _mm512_loadu_ps(p); }
inline void GemmStore(float* p, GemmVec v) { _mm512_storeu_ps(p, v); }
inline GemmVec GemmBroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline GemmVec GemmFma(GemmVec a, GemmVec b, GemmVec c) { return _mm512_fmadd_ps(a, b, c); }
inline GemmVec GemmZero() { return _mm512_setzero_ps(); }
// A k step reads three cache lines of W; prefetch the next panel a line every step.
constexpr int64_t kPrefetchEvery = 1;
#elif defined(__AVX2__)
using GemmVec = __m256;
constexpr int kPanel = 24;
constexpr int kTileRows = 4;
constexpr const char* kGemmIsa = "AVX2";
inline GemmVec GemmLoad(const float* p) { return _mm256_load_ps(p); }
inline GemmVec GemmLoadU(const float* p) { return _mm256_loadu_ps(p); }
inline void GemmStore(float* p, GemmVec v) { _mm256_storeu_ps(p, v); }
inline GemmVec GemmBroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline GemmVec GemmFma(GemmVec a, GemmVec b, GemmVec c) { return _mm256_fmadd_ps(a, b, c); }
inline GemmVec GemmZero() { return _mm256_setzero_ps(); }
constexpr int64_t kPrefetchEvery = 4;
#else
constexpr int kPanel = 24;
constexpr int kTileRows = 4;
constexpr const char* kGemmIsa = "scalar";
constexpr int64_t kPrefetchEvery = 4;
#endif
constexpr int kVecWidth = kPanel / 3;
// Floats of the next panel one tile prefetches per step of k (a 64-byte line every
// kPrefetchEvery steps).
constexpr int64_t kPrefetchPerStep = 16 / kPrefetchEvery;
constexpr int64_t kMaxDepth = 640;
constexpr int64_t kRowBlock = 128;
// Runs of panels per thread a product is dealt out in (see `Linear`), of at least
// kMinChunk panels (96 columns), so that the prefetch of a run's next panel mostly fetches a
// panel the same thread multiplies. Measured at 32 rows: 1.1x a fixed half per thread on an
// idle machine, 1.12x with another process taking 25% of a core.
constexpr int64_t kChunksPerThread = 8;
constexpr int64_t kMinChunk = 96 / kPanel;

template <int kRows>
inline void GemmTile(const float* x, int64_t ldx, const float* w, int64_t depth, float* y,
                     int64_t ldy, bool accumulate, const float* prefetch,
                     const float* prefetch_end) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // Named accumulators, a row's three through the template's rows: with an array the
  // compiler kept them on the stack, and with the weights as memory operands of the FMAs it
  // loaded each weight vector once per row instead of once per k.
#define GEMM_ROWS(DO) DO(0) DO(1) DO(2) DO(3) DO(4) DO(5) DO(6) DO(7)
#define GEMM_INIT(r)                                                                \
  GemmVec acc##r##0, acc##r##1, acc##r##2;                                          \
  if constexpr (r < kRows) {                                                        \
    if (accumulate) {                                                               \
      acc##r##0 = GemmLoadU(y + r * ldy);                                           \
      acc##r##1 = GemmLoadU(y + r * ldy + kVecWidth);                               \
      acc##r##2 = GemmLoadU(y + r * ldy + 2 * kVecWidth);                           \
    } else {                                                                        \
      acc##r##0 = acc##r##1 = acc##r##2 = GemmZero();                               \
    }                                                                               \
  }
#define GEMM_FMA(r)                                                                 \
  if constexpr (r < kRows) {                                                        \
    const GemmVec xr = GemmBroadcast(x + r * ldx + i);                              \
    acc##r##0 = GemmFma(xr, w0, acc##r##0);                                         \
    acc##r##1 = GemmFma(xr, w1, acc##r##1);                                         \
    acc##r##2 = GemmFma(xr, w2, acc##r##2);                                         \
  }
#define GEMM_STORE(r)                                                               \
  if constexpr (r < kRows) {                                                        \
    GemmStore(y + r * ldy, acc##r##0);                                              \
    GemmStore(y + r * ldy + kVecWidth, acc##r##1);                                  \
    GemmStore(y + r * ldy + 2 * kVecWidth, acc##r##2);                              \
  }
  static_assert(kRows <= 8, "GEMM_ROWS names eight rows");
  GEMM_ROWS(GEMM_INIT)
  for (int64_t i = 0; i < depth; ++i) {
    if (i % kPrefetchEvery == 0 && prefetch < prefetch_end) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch), _MM_HINT_T1);
      prefetch += 16;  // a 64-byte line
    }
    GemmVec w0 = GemmLoad(w), w1 = GemmLoad(w + kVecWidth), w2 = GemmLoad(w + 2 * kVecWidth);
    // Keeps the three in registers: otherwise GCC folds the loads into the FMAs.
    asm("" : "+v"(w0), "+v"(w1), "+v"(w2));
    w += kPanel;
    GEMM_ROWS(GEMM_FMA)
  }
  GEMM_ROWS(GEMM_STORE)
#undef GEMM_ROWS
#undef GEMM_INIT
#undef GEMM_FMA
#undef GEMM_STORE
#else
  for (int r = 0; r < kRows; ++r) {
    float acc[kPanel];
    for (int j = 0; j < kPanel; ++j) acc[j] = accumulate ? y[r * ldy + j] : 0.0f;
    for (int64_t i = 0; i < depth; ++i)
      for (int j = 0; j < kPanel; ++j) acc[j] += x[r * ldx + i] * w[i * kPanel + j];
    std::copy(acc, acc + kPanel, y + r * ldy);
  }
#endif
}

// A tile whose panel may hold fewer than kPanel real columns (the last panel of W).
template <int kRows>
void GemmTileAnyWidth(const float* x, int64_t ldx, const float* w, int64_t depth, float* y,
                      int64_t ldy, int width, bool accumulate, const float* prefetch,
                      const float* prefetch_end) {
  if (width == kPanel) {
    GemmTile<kRows>(x, ldx, w, depth, y, ldy, accumulate, prefetch, prefetch_end);
    return;
  }
  alignas(64) float tile[kRows * kPanel];
  for (int r = 0; r < kRows && accumulate; ++r)
    std::copy(y + r * ldy, y + r * ldy + width, tile + r * kPanel);
  GemmTile<kRows>(x, ldx, w, depth, tile, kPanel, accumulate, prefetch, prefetch_end);
  for (int r = 0; r < kRows; ++r)
    std::copy(tile + r * kPanel, tile + r * kPanel + width, y + r * ldy);
}

// Panels [first_panel, end_panel) of y = x W^T: k in blocks, rows in blocks, panels.
void MultiplyPanels(const float* xs, const float* ws, float* ys, int64_t rows, int64_t k,
                    int64_t n, int64_t block_depth, int64_t first_panel, int64_t end_panel) {
  for (int64_t k0 = 0; k0 < k; k0 += block_depth) {
    const int64_t depth = std::min(block_depth, k - k0);
    const bool accumulate = k0 > 0;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      const int64_t block_rows = std::min(kRowBlock, rows - r0);
      for (int64_t p = first_panel; p < end_panel; ++p) {
        const int width = static_cast<int>(std::min<int64_t>(kPanel, n - p * kPanel));
        const float* w = ws + (p * k + k0) * kPanel;
        // The next panel's block; prefetching past the tensor's end is harmless (a
        // prefetch never faults), and the bound stops it at one block.
        const float* prefetch = w + k * kPanel;
        const float* prefetch_end = prefetch + depth * kPanel;
        const float* xb = xs + r0 * k + k0;
        float* yb = ys + r0 * n + p * kPanel;
        int64_t r = 0;
        for (; r + kTileRows <= block_rows; r += kTileRows, prefetch += depth * kPrefetchPerStep)
          GemmTileAnyWidth<kTileRows>(xb + r * k, k, w, depth, yb + r * n, n, width,
                                      accumulate, prefetch, prefetch_end);
        if (const int64_t rest = block_rows - r; rest > 0) {
          constexpr decltype(&GemmTileAnyWidth<1>) kRemainder[] = {
              nullptr, &GemmTileAnyWidth<1>, &GemmTileAnyWidth<2>, &GemmTileAnyWidth<3>,
              &GemmTileAnyWidth<4>, &GemmTileAnyWidth<5>, &GemmTileAnyWidth<6>,
              &GemmTileAnyWidth<7>};
          static_assert(kTileRows <= 8, "kRemainder holds tiles of up to seven rows");
          kRemainder[rest](xb + r * k, k, w, depth, yb + r * n, n, width, accumulate, prefetch,
                           prefetch_end);
        }
      }
    }
  }
}

// The index of the first largest value of x[0:n), a NaN counting as larger than any number
// (torch.argmax's answer).
inline int64_t ArgmaxScalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

inline int64_t ArgmaxRow(const float* x, int64_t n) {
#ifdef __AVX512F__
  if (n < 16 || n > INT32_MAX) return ArgmaxScalar(x, n);
  // Per lane, its largest value and where (strictly greater: the first of equals stays).
  __m512 best = _mm512_loadu_ps(x);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i index = at;
  __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
  int64_t i = 16;
  for (; i + 16 <= n; i += 16) {
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, greater, v);
    at = _mm512_mask_mov_epi32(at, greater, index);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (nan) return ArgmaxScalar(x, n);  // rare: let the plain loop find the first NaN
  alignas(64) float values[16];
  alignas(64) int32_t where[16];
  _mm512_store_ps(values, best);
  _mm512_store_si512(where, at);
  int64_t winner = where[0];
  for (int lane = 1; lane < 16; ++lane) {
    if (values[lane] > x[winner] || (values[lane] == x[winner] && where[lane] < winner)) {
      winner = where[lane];
    }
  }
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[winner]) winner = i;
  }
  return winner;
#else
  return ArgmaxScalar(x, n);
#endif
}

}  // namespace

// W [n, k] -> [ceil(n / kPanel), k, kPanel], the layout `Linear` multiplies by.
torch::Tensor PackLinearWeight(torch::Tensor weight) {
  CheckFloat(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0,
              "weight must be [out_features, in_features]");
  weight = weight.contiguous();
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  torch::Tensor packed = torch::zeros({panels, k, kPanel}, weight.options());
  const float* src = weight.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t width = std::min<int64_t>(kPanel, n - p * kPanel);
      for (int64_t j = 0; j < width; ++j) {
        const float* row = src + (p * kPanel + j) * k;
        for (int64_t i = 0; i < k; ++i) dst[(p * k + i) * kPanel + j] = row[i];
      }
    }
  });
  return packed;
}

// x [rows, k] times the packed W [n, k] transposed: y [rows, n].
torch::Tensor Linear(torch::Tensor x, torch::Tensor packed, int64_t out_features) {
  CheckFloat(x, "x");
  CheckFloat(packed, "packed");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "packed must come from pack_linear_weight");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == packed.size(1), "x must be [rows, ",
              packed.size(1), "], got ", x.sizes());
  TORCH_CHECK(out_features > kPanel * (packed.size(0) - 1) &&
                  out_features <= kPanel * packed.size(0),
              "out_features ", out_features, " does not match the packed weight");
  x = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), n = out_features, panels = packed.size(0);
  torch::Tensor y = torch::empty({rows, n}, x.options());
  if (rows == 0) return y;
  const int64_t k_blocks = (k + kMaxDepth - 1) / kMaxDepth;
  const int64_t block_depth = (k + k_blocks - 1) / k_blocks;
  const float* xs = x.data_ptr<float>();
  const float* ws = packed.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  parallel::ForEachChunk(panels, parallel::ChunkSize(panels, kChunksPerThread, kMinChunk),
                         [&](int64_t first, int64_t last) {
                           MultiplyPanels(xs, ws, ys, rows, k, n, block_depth, first, last);
                         });
  return y;
}

// Softmax of row[0:length) up to its scale: each score becomes e^(score - max) in place;
// returns 1 / their sum, the scale that makes them probabilities.
inline float SoftmaxNumerators(float* row, int64_t length) {
  const float top = *std::max_element(row, row + length);
  return 1.0f / ExpShiftedSum(row, top, row, length);
}

// Calls visit(t, token) for the first `length` tokens of a paged cache, `token` pointing at
// token t's row: a block at a time, with no division per token (one per token was a third
// of decode attention's time).
template <typename Visit>
inline void ForEachCachedToken(const float* cache, const int64_t* blocks, int64_t block_size,
                               int64_t length, int64_t token_stride, Visit visit) {
  for (int64_t b = 0, t = 0; t < length; ++b) {
    const float* token = cache + blocks[b] * block_size * token_stride;
    for (const int64_t end = std::min(length, t + block_size); t < end;
         ++t, token += token_stride) {
      visit(t, token);
    }
  }
}

// One sequence's query heads that share kv head `kv` (`group` rows of q, `q_head` apart)
// over its `length` cached tokens: two passes, keys then values, each read in place through
// the block list. kDim: the head size fixed at compile time (0: `head_dim`), which keeps a
// head's weighted sum of values in registers.
template <int kDim>
void DecodeGroup(const float* query, int64_t q_head, int64_t group, int64_t length,
                 const int64_t* blocks, int64_t block_size, const float* k_cache,
                 const float* v_cache, int64_t token_stride, int64_t head_dim, float scale,
                 float* scores, float* out) {
  const int64_t dim = kDim > 0 ? kDim : head_dim;
  ForEachCachedToken(k_cache, blocks, block_size, length, token_stride,
                     [&](int64_t t, const float* key) {
                       for (int64_t g = 0; g < group; ++g) {
                         scores[g * length + t] = Dot(query + g * q_head, key, dim) * scale;
                       }
                     });
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * length;
    const float inv = SoftmaxNumerators(row, length);
    float* acc = out + g * dim;
#ifdef __AVX2__
    if constexpr (kDim > 0 && kDim % 8 == 0 && kDim <= 128) {
      constexpr int kVectors = kDim / 8;
      __m256 sum[kVectors];
      for (int i = 0; i < kVectors; ++i) sum[i] = _mm256_setzero_ps();
      ForEachCachedToken(v_cache, blocks, block_size, length, token_stride,
                         [&](int64_t t, const float* value) {
                           const __m256 w = _mm256_set1_ps(row[t]);
                           for (int i = 0; i < kVectors; ++i) {
                             sum[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + 8 * i), sum[i]);
                           }
                         });
      const __m256 scale_out = _mm256_set1_ps(inv);
      for (int i = 0; i < kVectors; ++i) {
        _mm256_storeu_ps(acc + 8 * i, _mm256_mul_ps(sum[i], scale_out));
      }
      continue;
    }
#endif
    std::fill(acc, acc + dim, 0.0f);
    ForEachCachedToken(v_cache, blocks, block_size, length, token_stride,
                       [&](int64_t t, const float* value) { Axpy(row[t], value, acc, dim); });
    for (int64_t d = 0; d < dim; ++d) acc[d] *= inv;
  }
}

#ifdef __AVX512F__
// GCC 12's _mm512_reduce_add_ps starts from a self-initialized 'undefined' vector, which
// -Wmaybe-uninitialized reports wherever it is inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// DecodeGroup with the group size and head size fixed at compile time, for AVX-512: the
// group's queries stay in registers, each key is loaded once for all of them, and the
// values are read in one pass that updates every head's sum. About a third of the
// instructions of the generic version, whose reductions and reloads of q dominated.
template <int kDim, int kGroup>
void DecodeGroupFixed(const float* query, int64_t q_head, int64_t group, int64_t length,
                      const int64_t* blocks, int64_t block_size, const float* k_cache,
                      const float* v_cache, int64_t token_stride, int64_t head_dim,
                      float scale, float* scores, float* out) {
  constexpr int kVectors = kDim / 16;
  __m512 q[kGroup][kVectors];
  for (int g = 0; g < kGroup; ++g)
    for (int v = 0; v < kVectors; ++v) q[g][v] = _mm512_loadu_ps(query + g * q_head + 16 * v);
  ForEachCachedToken(k_cache, blocks, block_size, length, token_stride,
                     [&](int64_t t, const float* key) {
                       __m512 k[kVectors];
                       for (int v = 0; v < kVectors; ++v) k[v] = _mm512_loadu_ps(key + 16 * v);
                       for (int g = 0; g < kGroup; ++g) {
                         __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
                         for (int v = 1; v < kVectors; ++v)
                           acc = _mm512_fmadd_ps(q[g][v], k[v], acc);
                         scores[g * length + t] = _mm512_reduce_add_ps(acc) * scale;
                       }
                     });
  float inv[kGroup];
  for (int g = 0; g < kGroup; ++g) inv[g] = SoftmaxNumerators(scores + g * length, length);
  __m512 sum[kGroup][kVectors];
  for (int g = 0; g < kGroup; ++g)
    for (int v = 0; v < kVectors; ++v) sum[g][v] = _mm512_setzero_ps();
  ForEachCachedToken(v_cache, blocks, block_size, length, token_stride,
                     [&](int64_t t, const float* value) {
                       __m512 x[kVectors];
                       for (int v = 0; v < kVectors; ++v) x[v] = _mm512_loadu_ps(value + 16 * v);
                       for (int g = 0; g < kGroup; ++g) {
                         const __m512 w = _mm512_set1_ps(scores[g * length + t]);
                         for (int v = 0; v < kVectors; ++v)
                           sum[g][v] = _mm512_fmadd_ps(w, x[v], sum[g][v]);
                       }
                     });
  for (int g = 0; g < kGroup; ++g) {
    const __m512 scale_out = _mm512_set1_ps(inv[g]);
    for (int v = 0; v < kVectors; ++v)
      _mm512_storeu_ps(out + g * kDim + 16 * v, _mm512_mul_ps(sum[g][v], scale_out));
  }
}
#pragma GCC diagnostic pop
#endif

using DecodeKernel = void (*)(const float*, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                              const float*, const float*, int64_t, int64_t, float, float*,
                              float*);

// The fastest DecodeGroup this build has for a head size and group size.
DecodeKernel PickDecodeKernel(int64_t dim, int64_t group) {
#ifdef __AVX512F__
  // Register budget, of the 32 zmm: the group's queries (or sums), group * dim / 16, and a
  // key (or value), dim / 16.
  if (dim == 64) {
    switch (group) {
      case 1: return &DecodeGroupFixed<64, 1>;
      case 2: return &DecodeGroupFixed<64, 2>;
      case 3: return &DecodeGroupFixed<64, 3>;
      case 4: return &DecodeGroupFixed<64, 4>;
      case 6: return &DecodeGroupFixed<64, 6>;
      default: break;
    }
  } else if (dim == 128) {
    switch (group) {
      case 1: return &DecodeGroupFixed<128, 1>;
      case 2: return &DecodeGroupFixed<128, 2>;
      default: break;
    }
  }
#endif
  return dim == 64 ? &DecodeGroup<64> : dim == 128 ? &DecodeGroup<128> : &DecodeGroup<0>;
}

// Attention of one new query token per sequence over its cached keys and values, read in
// place from the paged cache. q: [batch, heads, head_dim]; caches: [blocks, block_size,
// kv_heads, head_dim]; block_tables: [batch, >= blocks used]; context_lens: [batch].
torch::Tensor PagedDecodeAttention(torch::Tensor q, torch::Tensor k_cache,
                                   torch::Tensor v_cache, torch::Tensor block_tables,
                                   torch::Tensor context_lens, double scale,
                                   std::optional<torch::Tensor> out_arg) {
  CheckFloat(q, "q");
  CheckFloat(k_cache, "k_cache");
  CheckFloat(v_cache, "v_cache");
  CheckIndex(block_tables, "block_tables");
  CheckIndex(context_lens, "context_lens");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [batch, heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "q and cache shapes disagree");
  TORCH_CHECK(context_lens.numel() >= batch && block_tables.size(0) >= batch,
              "one block table and one context length per sequence");
  torch::Tensor out = out_arg ? *out_arg : torch::empty({batch, heads, dim}, q.options());
  CheckFloat(out, "out");
  TORCH_CHECK(out.is_contiguous() && out.numel() == batch * heads * dim, "bad out tensor");
  const int64_t group = heads / kv_heads;
  const int64_t table_width = block_tables.size(1);
  const int64_t num_blocks = k_cache.size(0);
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_seq = q.stride(0), q_head = q.stride(1);
  const int64_t token_stride = kv_heads * dim;
  const float fscale = static_cast<float>(scale);
  const DecodeKernel kernel = PickDecodeKernel(dim, group);

  // One (sequence, kv head) at a time from a shared counter: contexts differ in length.
  parallel::OnEachThread(batch * kv_heads, 1, [&](parallel::Chunks& items) {
    std::vector<float> scores;
    std::vector<int64_t> blocks;
    for (int64_t item = 0, end = 0; items.Next(item, end);) {
      const int64_t seq = item / kv_heads, kv = item % kv_heads;
      const int64_t length = IndexAt(context_lens, seq);
      float* dst = op + (seq * heads + kv * group) * dim;
      if (length <= 0) {
        std::fill(dst, dst + group * dim, 0.0f);
        continue;
      }
      const int64_t used = (length + block_size - 1) / block_size;
      TORCH_CHECK(used <= table_width, "a context is longer than its block table");
      blocks.resize(used);
      for (int64_t i = 0; i < used; ++i) {
        blocks[i] = IndexAt(block_tables, seq * table_width + i);
        TORCH_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks, "block id out of range");
      }
      scores.resize(group * length);
      const float* query = qp + seq * q_seq + kv * group * q_head;
      kernel(query, q_head, group, length, blocks.data(), block_size, kc + kv * dim,
             vc + kv * dim, token_stride, dim, fscale, scores.data(), dst);
    }
  });
  return out;
}

// Rotate q and k in place in qkv [tokens, (heads + 2 kv_heads) * head_dim] (half-split
// layout); write k and v to the cache at slot_mapping (slot < 0: no write).
void RopeAndCache(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos,
                  torch::Tensor sin, torch::Tensor slot_mapping, torch::Tensor k_cache,
                  torch::Tensor v_cache, int64_t heads, int64_t kv_heads, int64_t dim) {
  CheckFloat(qkv, "qkv");
  CheckFloat(cos, "cos");
  CheckFloat(sin, "sin");
  CheckFloat(k_cache, "k_cache");
  CheckFloat(v_cache, "v_cache");
  CheckIndex(positions, "positions");
  CheckIndex(slot_mapping, "slot_mapping");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 &&
                  qkv.size(1) == (heads + 2 * kv_heads) * dim,
              "qkv must be [tokens, (heads + 2 kv_heads) * head_dim]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == dim / 2,
              "cos/sin must be contiguous [positions, head_dim / 2]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t tokens = qkv.size(0), half = dim / 2, row_stride = qkv.stride(0);
  const int64_t max_position = cos.size(0), num_slots = k_cache.numel() / (kv_heads * dim);
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t pos = IndexAt(positions, tok);
      TORCH_CHECK(pos >= 0 && pos < max_position, "position out of the RoPE table");
      const float* c = cp + pos * half;
      const float* s = sp + pos * half;
      float* row = base + tok * row_stride;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        float* x = row + h * dim;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = x[j], x2 = x[j + half];
          x[j] = x1 * c[j] - x2 * s[j];
          x[j + half] = x2 * c[j] + x1 * s[j];
        }
      }
      const int64_t slot = IndexAt(slot_mapping, tok);
      if (slot < 0) continue;
      TORCH_CHECK(slot < num_slots, "cache slot out of range");
      const float* k = row + heads * dim;
      std::copy(k, k + kv_heads * dim, kc + slot * kv_heads * dim);
      std::copy(k + kv_heads * dim, k + 2 * kv_heads * dim, vc + slot * kv_heads * dim);
    }
  });
}

// RMSNorm of x (or of x + residual). Returns (normed, the new residual stream): x itself
// without residual, else the sum (a new tensor).
std::tuple<torch::Tensor, torch::Tensor> RmsNorm(torch::Tensor x, torch::Tensor weight,
                                                 double eps,
                                                 std::optional<torch::Tensor> residual) {
  CheckFloat(x, "x");
  CheckFloat(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "x must be [rows, hidden] and weight [hidden]");
  const int64_t rows = x.size(0), cols = x.size(1);
  torch::Tensor out = torch::empty({rows, cols}, x.options());
  torch::Tensor stream = x;
  if (residual) {
    CheckFloat(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1,
                "residual must be shaped like x");
    stream = torch::empty({rows, cols}, x.options());
  }
  const float* w = weight.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x.data_ptr<float>() + r * x.stride(0);
      float* sr = stream.data_ptr<float>() + r * stream.stride(0);
      if (residual) {
        const float* rr = residual->data_ptr<float>() + r * residual->stride(0);
        for (int64_t i = 0; i < cols; ++i) sr[i] = xr[i] + rr[i];
      }
      const float mean = Dot(sr, sr, cols) / static_cast<float>(cols);
      const float inv = 1.0f / std::sqrt(mean + feps);
      float* o = out.data_ptr<float>() + r * cols;
      for (int64_t i = 0; i < cols; ++i) o[i] = w[i] * (sr[i] * inv);
    }
  });
  return {out, stream};
}

// SiLU(x[:, :n]) * x[:, n:] for x: [tokens, 2n], in one pass over x.
torch::Tensor SiluAndMul(torch::Tensor x) {
  CheckFloat(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x must be [tokens, 2n]");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  torch::Tensor out = torch::empty({rows, n}, x.options());
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = x.data_ptr<float>() + r * x.stride(0);
      const float* up = gate + n;
      float* o = out.data_ptr<float>() + r * n;
      int64_t i = 0;
#ifdef __AVX2__
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < n; ++i) o[i] = (gate[i] / (1.0f + std::exp(-gate[i]))) * up[i];
    }
  });
  return out;
}

// Each row's argmax ([rows, n] float32 -> [rows] int64), as torch.argmax(dim=-1) answers it:
// greedy sampling's pick from the logits, which PyTorch's CPU argmax took 1.7 ms for at
// 32 x 49,152 (2 cores), ~6% of a decode step.
torch::Tensor ArgmaxRows(torch::Tensor x) {
  CheckFloat(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1,
              "x must be [rows, n] with n > 0 and rows laid out contiguously");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  torch::Tensor out = torch::empty({rows}, x.options().dtype(torch::kLong));
  const float* xs = x.data_ptr<float>();
  int64_t* os = out.data_ptr<int64_t>();
  parallel::ForEachChunk(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) os[r] = ArgmaxRow(xs + r * stride, n);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels for the engine's fused forward pass (float32)";
  // Each kernel lets go of the GIL while it runs, as PyTorch's own ops do: served, the
  // engine loop's thread spends most of a step in here, and the stub's other Python threads
  // (new requests, cancellations) would otherwise wait for it, and it for them after.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &PagedDecodeAttention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = py::none(), no_gil);
  m.def("rope_and_cache", &RopeAndCache, py::arg("qkv"), py::arg("positions"), py::arg("cos"),
        py::arg("sin"), py::arg("slot_mapping"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), no_gil);
  m.def("rms_norm", &RmsNorm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(), no_gil);
  m.def("silu_and_mul", &SiluAndMul, py::arg("x"), no_gil);
  m.def("argmax_rows", &ArgmaxRows, py::arg("x"), no_gil);
  m.def("pack_linear_weight", &PackLinearWeight, py::arg("weight"), no_gil);
  m.def("panel_width", [] { return kPanel; },
        "Output columns per panel of pack_linear_weight's layout (this build's vector width)");
  m.def("gemm_tile", [] {
    return std::to_string(kTileRows) + "x" + std::to_string(kPanel) + " " + kGemmIsa;
  }, "The GEMM's register tile (rows x columns) and instruction set, e.g. '8x48 AVX-512'");
  m.def("linear", &Linear, py::arg("x"), py::arg("packed"), py::arg("out_features"), no_gil);
  m.def("blockq_available", &blockq::Available,
        "Whether the block-quantized AMX GEMM is built and the kernel grants AMX");
  m.def("blockq_linear", &blockq::Linear, py::arg("x"), py::arg("tiles"), py::arg("scales"),
        no_gil);
}

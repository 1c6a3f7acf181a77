// The GEMM for block-quantized weights on AMX: y = x W^T where every block of 32 weights along
// a row of W is d * q + m, q small integers (a GGUF Q4_1 or Q8_0 checkpoint, dequantized to
// float32 by the loader, has exactly that form), and the result is as accurate as float32's.
//
// Why: at decode's 32 rows the float32 GEMM runs at 70-80% of the cores' FMA peak and still
// takes 40 ms of a 58 ms step (SmolLM2-135M, 2 AVX-512 cores). AMX multiplies bfloat16 tiles
// six times as fast as the FMA units multiply float32 (1,070 against 169 GFLOP/s on one core
// of the Xeon measured), and the structure makes it exact:
//   - q is an integer of at most 8 bits, so bfloat16 holds it exactly;
//   - x is split into three bfloat16 parts, x = x0 + x1 + x2 to within 2^-27 of x (each part
//     holds the next 8 bits), so every product x_i q is exact in float32;
//   - per block, sum_k x_k (d q_k + m) = d (x . q) + m sum_k x_k: AMX accumulates x . q in
//     float32, and the vector units scale it by d and add m times the block's sum of x.
// The result differs from float32's sum of x_k W_k by float32 rounding, like any other order
// of summation (measured: half the float32 GEMM's error against float64). The weights take 2
// bytes each (q as bfloat16) instead of 4.
//
// Where it stands: the faster GEMM at every row count when the weights come from memory, as
// in a decode step (SmolLM2's step: 17.7 against 20.6 ms at 1 row, 32 against 46 ms at 32),
// and 0.9-1.25x the float32 GEMM at a prefill's 2,048 rows; far from AMX's peak.
// Back-to-back tile products take 8-17 ns each, but a tile load ~30 ns, even from L1, and the
// tile unit waits for each load before the product that reads it (two independent
// load-then-product pairs: 41 ns a product). This loop does 5 loads per 6 products. Variants
// that pipelined the blocks, prefetched further ahead or into L2, loaded x once for four
// columns (slabs of weights kept in L1), or held x's parts while sweeping the columns (adding
// into y per block) measured no faster (docs/benchmarks/engine.md).
//
// Layout, made by `block_quant.pack` (Python): for the 16 output columns of tile t and the 32
// inputs of block b, `tiles[t][b]` is AMX's VNNI layout of q (512 bfloat16: row r holds inputs
// 2r and 2r+1 of each of the 16 columns) and `scales[t][b]` is d[16] then m[16].
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define CPU_KERNELS_BLOCKQ_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace blockq {

constexpr int64_t kBlock = 32;  // weights per block along k: one tile product's depth
constexpr int64_t kTile = 16;   // rows of x, and columns of y, per tile
constexpr int64_t kParts = 3;   // bfloat16 parts of x
constexpr int64_t kTileElements = kBlock * kTile;  // bfloat16 in an x or W tile
constexpr int64_t kPrefetchTiles = 4;  // blocks ahead that a column tile's weights are fetched
// Rows of x per pass over the weights: their three parts (3 x 128 x k x 2 bytes, 1.2 MB at
// k = 1,536) stay in a core's L2 while every column tile reads them.
constexpr int64_t kRowChunk = 128;
// Blocks of a row tile multiplied before their products are scaled into y: the two columns'
// products (2 x 8 KB) then stay in L1 between the tile stores and the vector loads. With
// the whole depth at once (up to 2 x 48 KB, in L2) the GEMM was 1.06-1.16x slower.
constexpr int64_t kGroup = 8;

#ifdef CPU_KERNELS_BLOCKQ_AMX

// Linux hands out AMX's tile state only to processes that ask for it.
inline bool AmxGranted() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows of 64 bytes: x's (16 rows x 32 bfloat16), W's (VNNI: 16 pairs of
// rows x 16 columns x 2) and y's (16 x 16 float32).
inline void ConfigureTiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.bytes_per_row[i] = 64;
    config.rows[i] = kTile;
  }
  _tile_loadconfig(&config);
}

// 32 floats -> 32 bfloat16 (round to nearest even), low 16 first.
inline __m512i ToBf16(__m512 low, __m512 high) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

inline __m512 FromBf16(__m256i half) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Row `x` [k] (zeros where null: padding) -> its three bfloat16 parts and its block sums. The
// parts of a row tile's block are three contiguous tiles (`kParts * kTileElements` apart from
// the next block's): each part is what the parts before it left over, rounded.
// GCC 12's _mm512_reduce_add_ps starts from a self-initialized vector, which
// -Wmaybe-uninitialized misreads (as in cpu_kernels.cc).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void SplitRow(const float* x, int64_t k, uint16_t* parts, float* sums) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m512 low = x ? _mm512_loadu_ps(x + b * kBlock) : _mm512_setzero_ps();
    __m512 high = x ? _mm512_loadu_ps(x + b * kBlock + 16) : _mm512_setzero_ps();
    sums[b] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
    for (int64_t p = 0; p < kParts; ++p) {
      const __m512i part = ToBf16(low, high);
      _mm512_storeu_si512(parts + (b * kParts + p) * kTileElements, part);
      low = _mm512_sub_ps(low, FromBf16(_mm512_castsi512_si256(part)));
      high = _mm512_sub_ps(high, FromBf16(_mm512_extracti64x4_epi64(part, 1)));
    }
  }
}
#pragma GCC diagnostic pop

// The weights stream from memory at decode's few rows: they are asked for a few blocks ahead
// (a tile load stalls the products that read it, so the hardware prefetcher alone leaves
// bandwidth unused).
inline void PrefetchTile(const uint16_t* tile) {
  for (int64_t line = 0; line < kBlock * kTile * 2; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(tile) + line, _MM_HINT_T0);
  }
}

// y[r, columns] (+)= sum over `blocks` blocks b of products[b][r] * d_b + m_b * (row r's sum of
// block b: row_sums[r * sums_stride + b]), for the 16 rows of a row tile; `accumulate` adds
// to what y holds (rows >= `valid_rows` are neither read nor written).
inline void ScaleAndSum(const float* products, const float* scales, const float* row_sums,
                        int64_t blocks, int64_t sums_stride, bool accumulate,
                        int64_t valid_rows, float* y, int64_t y_stride) {
  const int64_t valid = std::min(kTile, valid_rows);
  __m512 acc[kTile];
  for (int64_t r = 0; r < kTile; ++r) {
    acc[r] = accumulate && r < valid ? _mm512_loadu_ps(y + r * y_stride) : _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 d = _mm512_loadu_ps(scales + b * 2 * kTile);
    const __m512 m = _mm512_loadu_ps(scales + b * 2 * kTile + kTile);
    const float* c = products + b * kTile * kTile;
    for (int64_t r = 0; r < kTile; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(c + r * kTile), d, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(row_sums[r * sums_stride + b]), m, acc[r]);
    }
  }
  for (int64_t r = 0; r < valid; ++r) {
    _mm512_storeu_ps(y + r * y_stride, acc[r]);
  }
}

// One row tile times two column tiles (w0, w1: their blocks' tiles; the same pointer twice
// for a lone last tile), into products0/1 [blocks][16 x 16]. Tiles: 0 and 5 the two products,
// 1 and 6 the two weight tiles, 2-4 x's parts, each part read once for both columns. The
// block's sums and scales are applied afterwards (`ScaleAndSum`): reading a tile's store
// straight back stalls.
inline void TileProducts(const uint16_t* x, const uint16_t* w0, const uint16_t* w1,
                         int64_t blocks, bool prefetch, float* products0,
                         float* products1) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* xb = x + b * kParts * kTileElements;
    if (prefetch) {
      PrefetchTile(w0 + (b + kPrefetchTiles) * kTileElements);
      PrefetchTile(w1 + (b + kPrefetchTiles) * kTileElements);
    }
    _tile_zero(0);
    _tile_zero(5);
    _tile_loadd(1, w0 + b * kTileElements, 64);
    _tile_loadd(6, w1 + b * kTileElements, 64);
    _tile_loadd(2, xb, 64);
    _tile_loadd(3, xb + kTileElements, 64);
    _tile_loadd(4, xb + 2 * kTileElements, 64);
    _tile_dpbf16ps(0, 2, 1);
    _tile_dpbf16ps(5, 2, 6);
    _tile_dpbf16ps(0, 3, 1);
    _tile_dpbf16ps(5, 3, 6);
    _tile_dpbf16ps(0, 4, 1);
    _tile_dpbf16ps(5, 4, 6);
    _tile_stored(0, products0 + b * kTile * kTile, 64);
    _tile_stored(5, products1 + b * kTile * kTile, 64);
  }
}

#endif  // CPU_KERNELS_BLOCKQ_AMX

// Whether this build has the AMX GEMM and the kernel lets the process use AMX.
inline bool Available() {
#ifdef CPU_KERNELS_BLOCKQ_AMX
  return AmxGranted();
#else
  return false;
#endif
}

// x [rows, k] float32; tiles [n / 16, k / 32, 512] bfloat16; scales [n / 16, k / 32, 32]
// float32 -> y [rows, n].
inline torch::Tensor Linear(torch::Tensor x, torch::Tensor tiles, torch::Tensor scales) {
  TORCH_CHECK(Available(), "the block-quantized GEMM needs AMX (not built, or not granted)");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.device().is_cpu(),
              "x must be a float32 CPU matrix");
  TORCH_CHECK(tiles.dtype() == torch::kBFloat16 && tiles.dim() == 3 &&
                  tiles.size(2) == kBlock * kTile && tiles.is_contiguous(),
              "tiles must come from block_quant.pack");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.dim() == 3 &&
                  scales.size(0) == tiles.size(0) && scales.size(1) == tiles.size(1) &&
                  scales.size(2) == 2 * kTile && scales.is_contiguous(),
              "scales must come from block_quant.pack");
  const int64_t k = tiles.size(1) * kBlock, n = tiles.size(0) * kTile;
  TORCH_CHECK(x.size(1) == k, "x must be [rows, ", k, "], got ", x.sizes());
  x = x.contiguous();
  const int64_t rows = x.size(0);
  torch::Tensor y = torch::empty({rows, n}, x.options());
#ifdef CPU_KERNELS_BLOCKQ_AMX
  if (rows == 0) return y;
  const int64_t padded = (rows + kTile - 1) / kTile * kTile, blocks = k / kBlock;
  // Per row tile, per block, x's three parts as tiles (see SplitRow).
  auto parts = torch::empty({padded / kTile, blocks, kParts, kTileElements},
                            x.options().dtype(torch::kBFloat16));
  auto sums = torch::empty({padded, blocks}, x.options());
  uint16_t* part_data = reinterpret_cast<uint16_t*>(parts.data_ptr());
  float* sum_data = sums.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  at::parallel_for(0, padded, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      SplitRow(r < rows ? xs + r * k : nullptr, k,
               part_data + (r / kTile) * kParts * kTile * k + (r % kTile) * kBlock,
               sum_data + r * blocks);
    }
  });
  const uint16_t* tile_data = reinterpret_cast<const uint16_t*>(tiles.data_ptr());
  const float* scale_data = scales.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t column_tiles = n / kTile, pairs = (column_tiles + 1) / 2;
  const int64_t tile_stride = blocks * kTileElements, scale_stride = blocks * 2 * kTile;
  for (int64_t chunk = 0; chunk < padded; chunk += kRowChunk) {
    const int64_t chunk_end = std::min(padded, chunk + kRowChunk);
    // Column pairs dealt out in chunks (parallel.h), each thread's tiles configured once.
    parallel::OnEachThread(pairs, parallel::ChunkSize(pairs, 4), [&](parallel::Chunks& chunks) {
      ConfigureTiles();
      std::vector<float> buffer(2 * kGroup * kTile * kTile + 16);  // + a line, to align
      float* products0 = reinterpret_cast<float*>(
          (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
      float* products1 = products0 + kGroup * kTile * kTile;
      for (int64_t first = 0, last = 0; chunks.Next(first, last);) {
        for (int64_t pair = first; pair < last; ++pair) {
          const int64_t t0 = 2 * pair, t1 = std::min(t0 + 1, column_tiles - 1);
          for (int64_t row0 = chunk; row0 < chunk_end; row0 += kTile) {
            const float* row_sums = sum_data + row0 * blocks;
            for (int64_t g = 0; g < blocks; g += kGroup) {
              const int64_t count = std::min(kGroup, blocks - g);
              TileProducts(part_data + row0 * kParts * k + g * kParts * kTileElements,
                           tile_data + t0 * tile_stride + g * kTileElements,
                           tile_data + t1 * tile_stride + g * kTileElements, count,
                           row0 == chunk, products0, products1);
              ScaleAndSum(products0, scale_data + t0 * scale_stride + g * 2 * kTile,
                          row_sums + g, count, blocks, g > 0, rows - row0,
                          ys + row0 * n + t0 * kTile, n);
              if (t1 != t0) {
                ScaleAndSum(products1, scale_data + t1 * scale_stride + g * 2 * kTile,
                            row_sums + g, count, blocks, g > 0, rows - row0,
                            ys + row0 * n + t1 * kTile, n);
              }
            }
          }
        }
      }
      _tile_release();
    });
  }
#endif
  return y;
}

}  // namespace blockq

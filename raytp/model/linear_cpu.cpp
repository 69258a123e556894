// Linear layers y = x W^T for a few rows (decode), streaming the weight once: float32, and bfloat16 where the CPU
// has AVX512-BF16.
//
// With a handful of rows (a decode step) the product is bound by reading W from memory: every weight is read once
// for a few FMAs. oneDNN's packed GEMM reads the weight at 10-12 GB/s there on this machine's cores, where a plain
// streaming pass reaches ~25 GB/s (benchmarks/README.md); this kernel gets close to the latter. From 64 rows up
// both are at the core's FMA peak, so PackableLinear uses it for every row count (measured on a CPU without AMX:
// there oneDNN's bfloat16 tiles would likely be the faster from a few dozen rows up).
//
// float32: the weight (N, K) is packed once as (ceil(N / 16), K, 16): block b holds output columns 16b .. 16b+15,
// for each k the 16 weights that x's element k multiplies, so one 64-byte load feeds 16 columns. A tile of up to 8
// rows of x times 2 column blocks keeps 2 x 8 accumulators in registers over the whole of K: per k, 2 weight loads,
// one broadcast per row, 2 FMAs per row. The weight blocks of a column pair stream from memory once and stay in L2
// while the row tiles go over them.
//
// bfloat16 (K even): the same tiles over pairs of k. The weight is packed as (ceil(N / 16), K / 2, 16, 2): per pair
// of k, each column's two weights side by side, so one 64-byte load holds 16 columns x 2 k, and one vdpbf16ps adds
// x[2k] w[2k] + x[2k+1] w[2k+1] to 16 float32 accumulators. Half the bytes of float32 per weight, and twice the
// products per instruction; the sums stay float32 and are rounded to bfloat16 once, at the end (as oneDNN does).
// vdpbf16ps treats denormal inputs as zero.
//
// bfloat16 on a CPU with AMX tiles (K a multiple of 32): the same packing is exactly the layout AMX takes for its
// second operand (16 k pairs x 16 columns x 2 per 1 KiB tile), so x's rows (16 per tile, 32 k) and two column blocks
// go through tdpbf16ps, 32 rows x 32 columns per pass over K, the sums float32 in tiles and rounded once. There the
// product is bound by the weight's bytes up to ~32 rows (measured on a Xeon with AMX, one thread, 2026-12-05, the
// weights read from beyond L2: 1.25-1.6x oneDNN's AMX GEMM from 1 to 32 rows, 0.88-1.4x at 128, 0.76-1.19x at 256;
// benchmarks/linear_kernels.py).
//
// int8 (`quantization: int8`, where the CPU has AVX512-VNNI): the weight is quantized once per output column,
// w[n, k] ~ sw[n] * q[n, k] with q in [-127, 127], stored as q + 128 (unsigned) and packed (ceil(N / 16), K / 4,
// 16, 4): per quad of k, each column's four weights side by side. x is quantized as it comes, per row and per
// group of 32 k (as llama.cpp's Q8_0): x[m, k] ~ sx[m, g] * p[m, k], p in [-127, 127]. One vpdpbusd adds four
// products (q + 128) p to 16 int32 sums, 64 multiply-adds against vdpbf16ps's 32, and needs no conversion of the
// weight, a quarter of float32's bytes: a decode step's linears stay bound by the memory. Per group, the int32 sums
// lose the 128 * sum(p) the offset added and are scaled by sx into float32 sums; at the end by sw, then rounded to
// x's dtype once.
//
// int4 (`quantization: int4`, same CPUs): the weight is quantized per output column and per group of 32 k as
// llama.cpp's Q4_1 does, w ~ d q + mn with q in 0 .. 15 and a step d and minimum mn per group (float16), 5 bits a
// weight in all: 0.6 of int8's bytes, for the decode steps that are bound by them. Two quads of k share a byte
// (low and high nibble); two and-s and a shift unpack them for vpdpbusd. x is quantized as for int8; a group adds
// sx (d sum(p q) + mn sum(p)) to the float32 sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "amx_tiles.h"
#include "avx512_math.h"

namespace {

constexpr int64_t kBlock = 16;   // output columns per packed block (one AVX-512 register of float32)
constexpr int64_t kMaxTile = 8;  // rows of x per tile

#if defined(__AVX512F__)
// out[m, n0 .. n0+31] = x[m, :] . W[n0 .. n0+31, :] for the tile's MT rows; w0, w1: the two packed blocks (K, 16),
// columns past N are not stored (mask0, mask1).
// prefetch, lines: this tile's share of the next pair's weight (lines <= K), fetched into L2 evenly over the k.
template <int MT>
void tile(const float* x, int64_t ldx, int64_t K, const float* w0, const float* w1, float* out, int64_t ldo,
          __mmask16 mask0, __mmask16 mask1, const char* prefetch, int64_t lines) {
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t due = 0;
  for (int64_t k = 0; k < K; ++k) {
    due += lines;  // a line every K / lines steps, so the fetches keep pace with the memory, not ahead of it
    if (due >= K) {
      due -= K;
      _mm_prefetch(prefetch, _MM_HINT_T1);
      prefetch += 64;
    }
    const __m512 a = _mm512_loadu_ps(w0 + kBlock * k), b = _mm512_loadu_ps(w1 + kBlock * k);
    for (int m = 0; m < MT; ++m) {
      const __m512 xm = _mm512_set1_ps(x[m * ldx + k]);
      acc0[m] = _mm512_fmadd_ps(xm, a, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(xm, b, acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    _mm512_mask_storeu_ps(out + m * ldo, mask0, acc0[m]);
    _mm512_mask_storeu_ps(out + m * ldo + kBlock, mask1, acc1[m]);
  }
}

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, __mmask16,
                        __mmask16, const char*, int64_t);
constexpr TileFn kTiles[kMaxTile + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>,
                                         tile<8>};

#if defined(__AVX512BF16__)
// As tile(), over k pairs: x is (MT, K2 pairs) bfloat16, w0 and w1 packed blocks (K2, 16, 2); out bfloat16.
template <int MT>
void tile_bf16(const at::BFloat16* x, int64_t ldx, int64_t K2, const at::BFloat16* w0, const at::BFloat16* w1,
               at::BFloat16* out, int64_t ldo, __mmask16 mask0, __mmask16 mask1, const char* prefetch,
               int64_t lines) {
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t due = 0;
  for (int64_t k = 0; k < K2; ++k) {
    due += lines;  // a line every K2 / lines steps, so the fetches keep pace with the memory, not ahead of it
    if (due >= K2) {
      due -= K2;
      _mm_prefetch(prefetch, _MM_HINT_T1);
      prefetch += 64;
    }
    const __m512bh a = (__m512bh)_mm512_loadu_si512(w0 + 2 * kBlock * k);
    const __m512bh b = (__m512bh)_mm512_loadu_si512(w1 + 2 * kBlock * k);
    for (int m = 0; m < MT; ++m) {
      int32_t pair;  // x[m, 2k .. 2k+1] as one 32-bit lane (memcpy: x need not be 4-byte aligned)
      std::memcpy(&pair, x + m * ldx + 2 * k, sizeof(pair));
      const __m512bh xm = (__m512bh)_mm512_set1_epi32(pair);
      acc0[m] = _mm512_dpbf16_ps(acc0[m], xm, a);
      acc1[m] = _mm512_dpbf16_ps(acc1[m], xm, b);
    }
  }
  for (int m = 0; m < MT; ++m) {
    _mm256_mask_storeu_epi16(out + m * ldo, mask0, (__m256i)_mm512_cvtneps_pbh(acc0[m]));
    _mm256_mask_storeu_epi16(out + m * ldo + kBlock, mask1, (__m256i)_mm512_cvtneps_pbh(acc1[m]));
  }
}

using TileBf16Fn = void (*)(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, const at::BFloat16*,
                            at::BFloat16*, int64_t, __mmask16, __mmask16, const char*, int64_t);
constexpr TileBf16Fn kTilesBf16[kMaxTile + 1] = {nullptr, tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>,
                                                 tile_bf16<5>, tile_bf16<6>, tile_bf16<7>, tile_bf16<8>};
#endif

inline __mmask16 columns_mask(int64_t n0, int64_t N) {
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(kBlock, N - n0));
  return static_cast<__mmask16>((1u << n) - 1);
}

// Calls pair_fn(b0, b1, n0, mask0, mask1) for every pair of packed column blocks (columns n0 .. n0 + 31: blocks b0
// and b1; an odd last block is its own pair, its copy masked out), the pairs split over the threads.
template <typename PairFn>
void for_block_pairs(int64_t N, int64_t blocks, const PairFn& pair_fn) {
  const int64_t pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = 2 * p, b1 = std::min(b0 + 1, blocks - 1);
      const int64_t n0 = b0 * kBlock;
      pair_fn(b0, b1, n0, columns_mask(n0, N), b1 == b0 ? __mmask16(0) : columns_mask(n0 + kBlock, N));
    }
  });
}

// out (M, N) = x (M, K) times the packed weight, tile by tile of rows; tiles: the dtype's tile functions by row
// count, whose k runs over `k_steps` (K, or K / 2 pairs), each step reading one 64-byte line of each block.
//
// With more rows than one tile, the first tile's pass over a pair waits on memory and the others on the FMAs (the
// pair is in L2 by then), so the two never overlap: at 32 rows the product took the sum of its weight-reading and
// its compute time. So the row tiles of a pair prefetch the next pair into L2 as they go, each a share of its
// 2 k_steps lines, and the memory streams under the FMAs. One tile (<= 8 rows) is bound by the memory and left to
// the hardware's prefetcher.
template <typename T, typename TileTable>
void run_tiles(const T* xp, const T* wp, T* op, int64_t M, int64_t N, int64_t K, int64_t k_steps, int64_t blocks,
               const TileTable& tiles) {
  const int64_t row_tiles = (M + kMaxTile - 1) / kMaxTile;
  const int64_t pair_lines = 2 * k_steps;
  const int64_t share = row_tiles > 1 ? (pair_lines + row_tiles - 1) / row_tiles : 0;
  for_block_pairs(N, blocks, [&](int64_t b0, int64_t b1, int64_t n0, __mmask16 mask0, __mmask16 mask1) {
    // the next pair: blocks b0 + 2 and b0 + 3, adjacent (an odd last block alone, none after the last pair)
    const int64_t next_lines = std::clamp<int64_t>(blocks - b0 - 2, 0, 2) * k_steps;
    const char* next = reinterpret_cast<const char*>(wp + (b0 + 2) * K * kBlock);
    for (int64_t t = 0, m0 = 0; m0 < M; ++t, m0 += kMaxTile) {
      const int64_t rows = std::min(kMaxTile, M - m0);
      const int64_t first = t * share, lines = std::clamp<int64_t>(next_lines - first, 0, share);
      tiles[rows](xp + m0 * K, K, k_steps, wp + b0 * K * kBlock, wp + b1 * K * kBlock, op + m0 * N + n0, N, mask0,
                  mask1, next + 64 * first, lines);
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
using raytp_amx::TileConfig;
using raytp_amx::granted;

// The tiles' shapes (palette 1): C tiles 0..3 hold (row tile a, column block b) at 2a + b, rows x 16 float32; A tiles
// 4, 5 x's row tiles a, rows x 32 bfloat16 (16 k pairs); B tiles 6, 7 the two column blocks' 16 k pairs x 16 columns
// x 2, rows of the packed weight as they are.
// Shapes the tiles for a pass over `rows` (1 .. 32) rows of x: row tile 1 unused (unconfigured) up to 16.
void configure_tiles(int64_t rows) {
  TileConfig cfg;
  const int64_t tile_rows[2] = {std::min<int64_t>(16, rows), std::max<int64_t>(0, rows - 16)};
  for (int a = 0; a < 2; ++a) {
    if (tile_rows[a] == 0) continue;
    for (int t : {2 * a, 2 * a + 1, 4 + a}) {
      cfg.rows[t] = static_cast<uint8_t>(tile_rows[a]);
      cfg.colsb[t] = 64;
    }
  }
  for (int t : {6, 7}) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// x rounded to bfloat16 (to nearest even, as torch rounds), kept as float32.
inline __m512 round_bf16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

// c (32 x 32 float32, rows 0 .. 15 or 0 .. 31 written: kTwo) = x's rows (row stride ldx) times the packed blocks w0
// and w1 over K (a multiple of 32).
template <bool kTwo>
void amx_block_pair(const at::BFloat16* x, int64_t ldx, int64_t K, const at::BFloat16* w0, const at::BFloat16* w1,
                    float* c, const char* prefetch, int64_t lines) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwo) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t steps = K / 32;
  int64_t due = 0;
  for (int64_t k = 0; k < K; k += 32) {
    due += lines;
    while (due >= steps) {
      due -= steps;
      _mm_prefetch(prefetch, _MM_HINT_T1);
      prefetch += 64;
    }
    _tile_loadd(4, x + k, ldx * 2);
    _tile_loadd(6, w0 + k * kBlock, 64);  // k pairs k/2 .. k/2 + 15 of the block: 1 KiB from k/2 * 32 elements on
    _tile_loadd(7, w1 + k * kBlock, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwo) {
      _tile_loadd(5, x + 16 * ldx + k, ldx * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 32 * 4);
  _tile_stored(1, c + 16, 32 * 4);
  if constexpr (kTwo) {
    _tile_stored(2, c + 16 * 32, 32 * 4);
    _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
  }
}

// out (M, N) = x (M, K) times the packed bfloat16 weight on AMX tiles, K a multiple of 32: per pair of column blocks
// (split over the threads, each shaping its own tiles), 32 rows at a time; with more than 32 rows the row tiles
// prefetch the next pair into L2 as run_tiles' do (87m's gate/up at 256 rows 1.7 -> 1.6 ms). silu_mul (an MLP's
// gate and up projections, N = 2 I with I a multiple of 16): out (M, I) = silu(gate) * up instead, each pass pairing gate block
// p with up block p + I / 16, and each product rounded to bfloat16 as Hugging Face's modules round every tensor
// (gate, up, silu(gate), the product): the (M, 2 I) product is never written.
void run_amx(const at::BFloat16* xp, const at::BFloat16* wp, at::BFloat16* op, int64_t M, int64_t N, int64_t K,
             int64_t blocks, bool silu_mul) {
  const int64_t half = blocks / 2;  // silu_mul: the gate's blocks, then the up's
  at::parallel_for(0, silu_mul ? half : (blocks + 1) / 2, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float c[32 * 32];
    int64_t shaped_for = 0;  // the rows the tiles are shaped for
    const int64_t row_tiles = (M + 31) / 32;
    const int64_t share = row_tiles > 1 ? (K + row_tiles - 1) / row_tiles : 0;  // lines: 2 blocks x K / 2 pairs
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = silu_mul ? p : 2 * p, b1 = silu_mul ? p + half : std::min(b0 + 1, blocks - 1);
      // the next pair's blocks, K / 2 lines each: b0 + 2 and b0 + 3 (an odd last block alone), or for silu_mul
      // gate block p + 1 and up block p + 1 + I / 16, not adjacent
      const int64_t next_blocks = silu_mul ? (p + 1 < half ? 2 : 0) : std::clamp<int64_t>(blocks - b0 - 2, 0, 2);
      const char* next0 = reinterpret_cast<const char*>(wp + (silu_mul ? b0 + 1 : b0 + 2) * K * kBlock);
      const char* next1 = reinterpret_cast<const char*>(wp + (silu_mul ? b1 + 1 : b0 + 3) * K * kBlock);
      const int64_t n0 = b0 * kBlock;
      const __mmask16 mask0 = columns_mask(n0, N), mask1 = b1 == b0 ? __mmask16(0) : columns_mask(n0 + kBlock, N);
      for (int64_t t = 0, m0 = 0; m0 < M; ++t, m0 += 32) {
        const int64_t rows = std::min<int64_t>(32, M - m0);
        // this row tile's share of the next pair's lines, within one block (a share crossing into the second
        // block stops at the first's end: the shares divide K evenly for an even number of row tiles)
        const int64_t half_lines = K / 2, first = t * share;
        const int64_t lines = std::clamp<int64_t>(next_blocks * half_lines - first, 0, share);
        const char* pf = first < half_lines ? next0 + 64 * first : next1 + 64 * (first - half_lines);
        const int64_t pf_lines = first < half_lines ? std::min(lines, half_lines - first) : lines;
        if (rows != shaped_for) {
          configure_tiles(rows);
          shaped_for = rows;
        }
        if (rows > 16) {
          amx_block_pair<true>(xp + m0 * K, K, K, wp + b0 * K * kBlock, wp + b1 * K * kBlock, c, pf, pf_lines);
        } else {
          amx_block_pair<false>(xp + m0 * K, K, K, wp + b0 * K * kBlock, wp + b1 * K * kBlock, c, pf, pf_lines);
        }
        for (int64_t m = 0; m < rows; ++m) {
          if (silu_mul) {
            const __m512 gate = round_bf16(_mm512_load_ps(c + 32 * m));
            const __m512 up = round_bf16(_mm512_load_ps(c + 32 * m + 16));
            _mm256_storeu_epi16(op + (m0 + m) * (N / 2) + n0,
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(raytp_math::silu(gate)), up)));
            continue;
          }
          at::BFloat16* o = op + (m0 + m) * N + n0;
          _mm256_mask_storeu_epi16(o, mask0, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + 32 * m)));
          _mm256_mask_storeu_epi16(o + kBlock, mask1, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + 32 * m + 16)));
        }
      }
    }
    _tile_release();  // leave the tiles unshaped: oneDNN and torch shape their own
  });
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
constexpr int64_t kGroup = 32;      // k per activation scale
constexpr int64_t kMaxTileInt8 = 4;  // rows per int8 tile: 4 x 2 float32 and 4 x 2 int32 sums in registers

// x's rows quantized per group of 32 k: p (M, K) int8, sx (M, K / 32) float32, psum (M, K / 32) int32 = the sum of
// the group's p (int8: 128 psum is what the weights' +128 adds to a group's sums; int4: what the group's minimum
// multiplies).
struct QuantizedRows {
  std::vector<int8_t> p;
  std::vector<float> sx;
  std::vector<int32_t> psum;
};

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K) {
  const int64_t groups = K / kGroup;
  QuantizedRows r{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<int32_t>(M * groups)};
  for (int64_t i = 0; i < M * groups; ++i) {
    const T* xg = x + i * kGroup;  // rows are contiguous: group i of the whole (M, K) is row i / groups's
    float values[kGroup], absmax = 0.f;
    for (int64_t k = 0; k < kGroup; ++k) {
      values[k] = static_cast<float>(xg[k]);
      absmax = std::max(absmax, std::abs(values[k]));
    }
    const float scale = absmax / 127.f, inverse = absmax > 0.f ? 127.f / absmax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < kGroup; ++k) {
      const int32_t p = static_cast<int32_t>(std::nearbyint(values[k] * inverse));
      r.p[i * kGroup + k] = static_cast<int8_t>(p);
      sum += p;
    }
    r.sx[i] = scale;
    r.psum[i] = sum;
  }
  return r;
}

inline void store_row(float* out, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(out, mask, v); }
inline void store_row(at::BFloat16* out, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// out[m, n0 .. n0+31] for the tile's MT rows: w0, w1 the two packed blocks (K / 4, 64) of q + 128, sw0, sw1 their
// column scales; x quantized (p rows of K, sx and psum rows of K / 32).
template <int MT, typename T>
void tile_int8(const int8_t* p, const float* sx, const int32_t* psum, int64_t K, const uint8_t* w0,
               const uint8_t* w1, const float* sw0, const float* sw1, T* out, int64_t ldo, __mmask16 mask0,
               __mmask16 mask1) {
  const int64_t groups = K / kGroup;
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum0[MT], sum1[MT];
    for (int m = 0; m < MT; ++m) sum0[m] = sum1[m] = _mm512_setzero_si512();
    for (int64_t quad = g * kGroup / 4; quad < (g + 1) * kGroup / 4; ++quad) {
      const __m512i a = _mm512_loadu_si512(w0 + 64 * quad), b = _mm512_loadu_si512(w1 + 64 * quad);
      for (int m = 0; m < MT; ++m) {
        int32_t four;  // p[m, 4 quad .. 4 quad + 3] as one 32-bit lane
        std::memcpy(&four, p + m * K + 4 * quad, sizeof(four));
        const __m512i xm = _mm512_set1_epi32(four);
        sum0[m] = _mm512_dpbusd_epi32(sum0[m], a, xm);
        sum1[m] = _mm512_dpbusd_epi32(sum1[m], b, xm);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512i off = _mm512_set1_epi32(128 * psum[m * groups + g]);
      const __m512 scale = _mm512_set1_ps(sx[m * groups + g]);
      acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum0[m], off)), scale, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum1[m], off)), scale, acc1[m]);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(sw0), s1 = _mm512_loadu_ps(sw1);
  for (int m = 0; m < MT; ++m) {
    store_row(out + m * ldo, mask0, _mm512_mul_ps(acc0[m], s0));
    store_row(out + m * ldo + kBlock, mask1, _mm512_mul_ps(acc1[m], s1));
  }
}

template <typename T>
using TileInt8Fn = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*, const uint8_t*,
                            const float*, const float*, T*, int64_t, __mmask16, __mmask16);
template <typename T>
constexpr TileInt8Fn<T> kTilesInt8[kMaxTileInt8 + 1] = {nullptr, tile_int8<1, T>, tile_int8<2, T>, tile_int8<3, T>,
                                                       tile_int8<4, T>};


// int4: out[m, n0 .. n0+31] for the tile's MT rows. w0, w1: the two packed blocks (K / 8, 64): per group of 32 k,
// four 64-byte rows whose low nibbles hold quads 0-3 of the group and high nibbles quads 4-7; s0, s1: their scales
// (K / 32, 2, 16) float16, per group the 16 columns' steps d, then their minimums mn (w ~ d q + mn, q in 0 .. 15).
// Per group: sum_k sx p_k (d q_k + mn) = sx (d sum(p q) + mn psum), with sum(p q) from vpdpbusd (q unsigned, p
// signed, no offset to take off).
template <int MT, typename T>
void tile_int4(const int8_t* p, const float* sx, const int32_t* psum, int64_t K, const uint8_t* w0,
               const uint8_t* w1, const at::Half* s0, const at::Half* s1, T* out, int64_t ldo, __mmask16 mask0,
               __mmask16 mask1) {
  const int64_t groups = K / kGroup;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum0[MT], sum1[MT];
    for (int m = 0; m < MT; ++m) sum0[m] = sum1[m] = _mm512_setzero_si512();
    for (int64_t j = 0; j < 4; ++j) {
      const __m512i a = _mm512_loadu_si512(w0 + 64 * (4 * g + j)), b = _mm512_loadu_si512(w1 + 64 * (4 * g + j));
      // quads j and j + 4 of the group: the low and the high nibbles
      const __m512i a_lo = _mm512_and_si512(a, low_nibbles), a_hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), low_nibbles);
      const __m512i b_lo = _mm512_and_si512(b, low_nibbles), b_hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low_nibbles);
      for (int m = 0; m < MT; ++m) {
        int32_t lo, hi;  // p[m, k] of quads j and j + 4 as 32-bit lanes
        std::memcpy(&lo, p + m * K + kGroup * g + 4 * j, sizeof(lo));
        std::memcpy(&hi, p + m * K + kGroup * g + 4 * (j + 4), sizeof(hi));
        const __m512i x_lo = _mm512_set1_epi32(lo), x_hi = _mm512_set1_epi32(hi);
        sum0[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum0[m], a_lo, x_lo), a_hi, x_hi);
        sum1[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum1[m], b_lo, x_lo), b_hi, x_hi);
      }
    }
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s0 + 32 * g)));
    const __m512 mn0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s0 + 32 * g + kBlock)));
    const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s1 + 32 * g)));
    const __m512 mn1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s1 + 32 * g + kBlock)));
    for (int m = 0; m < MT; ++m) {
      const __m512 group_sum = _mm512_set1_ps(static_cast<float>(psum[m * groups + g]));
      const __m512 scale = _mm512_set1_ps(sx[m * groups + g]);
      const __m512 t0 = _mm512_fmadd_ps(mn0, group_sum, _mm512_mul_ps(_mm512_cvtepi32_ps(sum0[m]), d0));
      const __m512 t1 = _mm512_fmadd_ps(mn1, group_sum, _mm512_mul_ps(_mm512_cvtepi32_ps(sum1[m]), d1));
      acc0[m] = _mm512_fmadd_ps(t0, scale, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(t1, scale, acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    store_row(out + m * ldo, mask0, acc0[m]);
    store_row(out + m * ldo + kBlock, mask1, acc1[m]);
  }
}

template <typename T>
using TileInt4Fn = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const uint8_t*, const uint8_t*,
                            const at::Half*, const at::Half*, T*, int64_t, __mmask16, __mmask16);
template <typename T>
constexpr TileInt4Fn<T> kTilesInt4[kMaxTileInt8 + 1] = {nullptr, tile_int4<1, T>, tile_int4<2, T>, tile_int4<3, T>,
                                                       tile_int4<4, T>};

// out (M, N) = x (M, K) times a quantized packed weight: x quantized once, then the tiles of up to 4 rows over each
// pair of column blocks; a block is q_per_block bytes of q and s_per_block of its scales (S: float32 column scales
// for int8, float16 group steps and minimums for int4).
template <typename T, typename S, typename TileTable>
void run_quantized(const T* x, const uint8_t* q, const S* scales, T* out, int64_t M, int64_t N, int64_t K,
                   int64_t blocks, int64_t q_per_block, int64_t s_per_block, const TileTable& tiles) {
  const QuantizedRows r = quantize_rows(x, M, K);
  const int64_t groups = K / kGroup;
  for_block_pairs(N, blocks, [&](int64_t b0, int64_t b1, int64_t n0, __mmask16 mask0, __mmask16 mask1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTileInt8) {
      tiles[std::min(kMaxTileInt8, M - m0)](r.p.data() + m0 * K, r.sx.data() + m0 * groups,
                                            r.psum.data() + m0 * groups, K, q + b0 * q_per_block,
                                            q + b1 * q_per_block, scales + b0 * s_per_block,
                                            scales + b1 * s_per_block, out + m0 * N + n0, N, mask0, mask1);
    }
  });
}
#endif

#endif

}  // namespace

// Whether this build has the kernel for `dtype` ("float32": AVX-512; "bfloat16": AVX512-BF16; "int8" or "int4"
// weights, with float32 or bfloat16 x: AVX512-VNNI and AVX512-BF16); without it callers keep their other path.
bool available(const std::string& dtype) {
  if (dtype == "float32") {
#if defined(__AVX512F__)
    return true;
#endif
  } else if (dtype == "bfloat16") {
#if defined(__AVX512BF16__)
    return true;
#endif
  } else if (dtype == "int8" || dtype == "int4") {
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
    return true;
#endif
  }
  return false;
}

// Whether bfloat16 products with K a multiple of 32 run on AMX tiles: built for a CPU with them, and this process
// granted their state.
bool amx() {
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return granted();
#else
  return false;
#endif
}

// w: (N, K) float32 -> (ceil(N / 16), K, 16); bfloat16 (K even) -> (ceil(N / 16), K / 2, 32). Columns past N are
// zero.
torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w must be a 2-d float32 or bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kBlock - 1) / kBlock;
  const bool is_float = w.scalar_type() == at::kFloat;
  TORCH_CHECK(is_float || K % 2 == 0, "a bfloat16 weight needs an even number of input features (k goes in pairs)");
  auto padded = torch::zeros({blocks * kBlock, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  if (is_float) return padded.view({blocks, kBlock, K}).transpose(1, 2).contiguous();
  // (blocks, 16 columns, K / 2, 2) -> (blocks, K / 2, 16 columns, 2)
  return padded.view({blocks, kBlock, K / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({blocks, K / 2, 2 * kBlock});
}

// w: (N, K) float32 or bfloat16, K a multiple of 32 -> (q, sw): q (ceil(N / 16), K / 4, 64) uint8, the weight
// quantized per output column and offset by 128 (layout above); sw (ceil(N / 16) * 16,) float32, max |w[n]| / 127
// (0 for the padding columns and all-zero ones).
std::tuple<torch::Tensor, torch::Tensor> pack_int8(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w must be a 2-d float32 or bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kBlock - 1) / kBlock;
  TORCH_CHECK(K % 32 == 0, "an int8 weight needs a multiple of 32 input features (x is quantized per 32)");
  auto wf = torch::zeros({blocks * kBlock, K}, w.options().dtype(at::kFloat));
  wf.narrow(0, 0, N).copy_(w);
  auto sw = wf.abs().amax(1) / 127.0;  // (blocks * 16,)
  auto inverse = torch::where(sw > 0, 1.0 / sw, torch::zeros_like(sw));
  auto q = (wf * inverse.unsqueeze(1)).round_().clamp_(-127, 127).add_(128).to(at::kByte);
  q = q.view({blocks, kBlock, K / 4, 4}).permute({0, 2, 1, 3}).contiguous().view({blocks, K / 4, 4 * kBlock});
  return {q, sw.contiguous()};
}

// w: (N, K) float32 or bfloat16, K a multiple of 32 -> (q, scales): the weight quantized to 4 bits per output column
// and group of 32 k, w ~ d q + mn with q in 0 .. 15, d = (max - min) / 15 and mn = min of the group (stored as
// float16; q is rounded against the stored values). q (ceil(N / 16), K / 8, 64) uint8 and scales (ceil(N / 16),
// K / 32, 2, 16) float16, laid out as tile_int4 reads them. Columns past N are zero.
std::tuple<torch::Tensor, torch::Tensor> pack_int4(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w must be a 2-d float32 or bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kBlock - 1) / kBlock, groups = K / 32;
  TORCH_CHECK(K % 32 == 0, "an int4 weight needs a multiple of 32 input features (it is quantized per 32)");
  auto wf = torch::zeros({blocks * kBlock, K}, w.options().dtype(at::kFloat));
  wf.narrow(0, 0, N).copy_(w);
  auto grouped = wf.view({blocks * kBlock, groups, 32});
  auto mn = grouped.amin(-1).to(at::kHalf);  // (blocks * 16, groups)
  auto d = ((grouped.amax(-1) - mn.to(at::kFloat)) / 15.0).to(at::kHalf);
  auto inverse = torch::where(d.to(at::kFloat) > 0, 1.0 / d.to(at::kFloat), torch::zeros_like(d, at::kFloat));
  auto q = ((grouped - mn.to(at::kFloat).unsqueeze(-1)) * inverse.unsqueeze(-1)).round_().clamp_(0, 15).to(at::kByte);
  // (blocks, 16 columns, groups, 8 quads, 4) -> (blocks, groups, 8 quads, 16 columns, 4); quads 4-7 go high
  q = q.view({blocks, kBlock, groups, 8, 4}).permute({0, 2, 3, 1, 4});
  auto nibbles = q.narrow(2, 0, 4).bitwise_or(q.narrow(2, 4, 4).bitwise_left_shift(4)).contiguous();
  // (blocks, 16 columns, groups) d and mn -> (blocks, groups, 2, 16)
  auto scales = torch::stack({d.view({blocks, kBlock, groups}), mn.view({blocks, kBlock, groups})}, 2)
                    .permute({0, 3, 2, 1}).contiguous();
  return {nibbles.view({blocks, K / 8, 4 * kBlock}), scales};
}

namespace {

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kBlock && packed.size(1) == x.size(1) &&
                  packed.size(0) == (N + kBlock - 1) / kBlock && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "packed does not match x and N");
#if defined(__AVX512F__)
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  auto out = torch::empty({M, N}, x.options());
  run_tiles(x.data_ptr<float>(), packed.data_ptr<float>(), out.data_ptr<float>(), M, N, K, K, blocks, kTiles);
  return out;
#else
  TORCH_CHECK(false, "built without AVX-512: use available() first");
#endif
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t N, bool amx) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kBlock && 2 * packed.size(1) == x.size(1) &&
                  packed.size(0) == (N + kBlock - 1) / kBlock && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed does not match x and N");
#if defined(__AVX512BF16__)
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  auto out = torch::empty({M, N}, x.options());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (amx && K % 32 == 0 && granted()) {
    run_amx(x.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), M, N, K,
            blocks, false);
    return out;
  }
#endif
  run_tiles(x.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), M, N, K, K / 2,
            blocks, kTilesBf16);
  return out;
#else
  TORCH_CHECK(false, "built without AVX512-BF16: use available(\"bfloat16\") first");
#endif
}

}  // namespace

// x: (M, K) float32 or bfloat16, (q, sw): pack_int8(W) with W (N, K) -> x W^T (M, N) in x's dtype, x quantized per
// row and group of 32 k.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor sw, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-d float32 or bfloat16 tensor");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == 4 * kBlock && 4 * q.size(1) == x.size(1) &&
                  q.size(0) == (N + kBlock - 1) / kBlock && q.is_contiguous() && q.scalar_type() == at::kByte &&
                  sw.dim() == 1 && sw.size(0) == q.size(0) * kBlock && sw.is_contiguous() &&
                  sw.scalar_type() == at::kFloat && x.size(1) % 32 == 0,
              "q and sw do not match x and N");
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = q.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run_quantized(x.data_ptr<float>(), q.data_ptr<uint8_t>(), sw.data_ptr<float>(), out.data_ptr<float>(), M, N, K,
                  blocks, K * kBlock, kBlock, kTilesInt8<float>);
  } else {
    run_quantized(x.data_ptr<at::BFloat16>(), q.data_ptr<uint8_t>(), sw.data_ptr<float>(),
                  out.data_ptr<at::BFloat16>(), M, N, K, blocks, K * kBlock, kBlock, kTilesInt8<at::BFloat16>);
  }
  return out;
#else
  TORCH_CHECK(false, "built without AVX512-VNNI: use available(\"int8\") first");
#endif
}

// x: (M, K) float32 or bfloat16, packed: pack(W) with W (N, K) of x's dtype -> x W^T (M, N) in x's dtype. amx:
// bfloat16 on AMX tiles where amx() (and K is a multiple of 32); false: the AVX512-BF16 kernel (tests, benchmarks).
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t N, bool amx) {
  TORCH_CHECK(x.dim() == 2, "x must be a 2-d tensor");
  if (x.scalar_type() == at::kBFloat16) return linear_bf16(x, packed, N, amx);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  return linear_f32(x, packed, N);
}

// x: (M, K) bfloat16, packed: pack(W) of an MLP's gate and up projections stacked, W (2 I, K), I a multiple of 16
// and K of 32 -> silu(x W_gate^T) * x W_up^T (M, I), on AMX tiles (where amx()); each product rounded to bfloat16
// as Hugging Face's modules round (the gate, the up, the silu, the product).
torch::Tensor linear_silu_mul(torch::Tensor x, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0 && N % 32 == 0,
              "x must be (M, K) bfloat16 with K a multiple of 32, and N = 2 I with I a multiple of 16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kBlock && 2 * packed.size(1) == x.size(1) &&
                  packed.size(0) == N / kBlock && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16,
              "packed does not match x and N");
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  TORCH_CHECK(granted(), "this process may not use AMX tiles: use amx() first");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N / 2}, x.options());
  run_amx(x.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), M, N, K,
          packed.size(0), true);
  return out;
#else
  TORCH_CHECK(false, "built without AMX: use amx() first");
#endif
}

// x: (M, K) float32 or bfloat16, (q, scales): pack_int4(W) with W (N, K) -> x W^T (M, N) in x's dtype, x quantized
// per row and group of 32 k.
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-d float32 or bfloat16 tensor");
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  TORCH_CHECK(q.dim() == 3 && q.size(0) == blocks && 8 * q.size(1) == x.size(1) && q.size(2) == 4 * kBlock &&
                  q.is_contiguous() && q.scalar_type() == at::kByte && scales.dim() == 4 &&
                  scales.size(0) == blocks && 32 * scales.size(1) == x.size(1) && scales.size(2) == 2 &&
                  scales.size(3) == kBlock && scales.is_contiguous() && scales.scalar_type() == at::kHalf &&
                  x.size(1) % 32 == 0,
              "q and scales do not match x and N");
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run_quantized(x.data_ptr<float>(), q.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), out.data_ptr<float>(), M,
                  N, K, blocks, K / 2 * kBlock, K / kGroup * 2 * kBlock, kTilesInt4<float>);
  } else {
    run_quantized(x.data_ptr<at::BFloat16>(), q.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                  out.data_ptr<at::BFloat16>(), M, N, K, blocks, K / 2 * kBlock, K / kGroup * 2 * kBlock,
                  kTilesInt4<at::BFloat16>);
  }
  return out;
#else
  TORCH_CHECK(false, "built without AVX512-VNNI: use available(\"int4\") first");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the kernel for this dtype was built");
  m.def("pack", &pack, "pack a (N, K) float32 or bfloat16 weight for linear");
  m.def("pack_int8", &pack_int8, "quantize a (N, K) weight to int8 per output column and pack it for linear_int8");
  m.def("linear_int8", &linear_int8, "x W^T with W from pack_int8, x quantized per row and 32 k",
        py::call_guard<py::gil_scoped_release>());
  m.def("pack_int4", &pack_int4, "quantize a (N, K) weight to 4 bits per output column and 32 k, pack it for linear_int4");
  m.def("linear_int4", &linear_int4, "x W^T with W from pack_int4, x quantized per row and 32 k",
        py::call_guard<py::gil_scoped_release>());
  m.def("amx", &amx, "whether bfloat16 products run on AMX tiles here");
  m.def("linear_silu_mul", &linear_silu_mul, "silu(x W_gate^T) * x W_up^T from the packed [W_gate; W_up] (AMX)",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x W^T with a packed weight (float32 or bfloat16)", py::arg("x"), py::arg("packed"),
        py::arg("N"), py::arg("amx") = true, py::call_guard<py::gil_scoped_release>());
}

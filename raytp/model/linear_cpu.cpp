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
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 16;   // output columns per packed block (one AVX-512 register of float32)
constexpr int64_t kMaxTile = 8;  // rows of x per tile

#if defined(__AVX512F__)
// out[m, n0 .. n0+31] = x[m, :] . W[n0 .. n0+31, :] for the tile's MT rows; w0, w1: the two packed blocks (K, 16),
// columns past N are not stored (mask0, mask1).
template <int MT>
void tile(const float* x, int64_t ldx, int64_t K, const float* w0, const float* w1, float* out, int64_t ldo,
          __mmask16 mask0, __mmask16 mask1) {
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
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
                        __mmask16);
constexpr TileFn kTiles[kMaxTile + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>,
                                         tile<8>};

#if defined(__AVX512BF16__)
// As tile(), over k pairs: x is (MT, K2 pairs) bfloat16, w0 and w1 packed blocks (K2, 16, 2); out bfloat16.
template <int MT>
void tile_bf16(const at::BFloat16* x, int64_t ldx, int64_t K2, const at::BFloat16* w0, const at::BFloat16* w1,
               at::BFloat16* out, int64_t ldo, __mmask16 mask0, __mmask16 mask1) {
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
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
                            at::BFloat16*, int64_t, __mmask16, __mmask16);
constexpr TileBf16Fn kTilesBf16[kMaxTile + 1] = {nullptr, tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>,
                                                 tile_bf16<5>, tile_bf16<6>, tile_bf16<7>, tile_bf16<8>};
#endif

inline __mmask16 columns_mask(int64_t n0, int64_t N) {
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(kBlock, N - n0));
  return static_cast<__mmask16>((1u << n) - 1);
}

// out (M, N) = x (M, K) times the packed weight, one pair of column blocks per work item, tile by tile of rows;
// tiles: the dtype's tile functions by row count, whose k runs over `k_steps` (K, or K / 2 pairs).
template <typename T, typename TileTable>
void run_tiles(const T* xp, const T* wp, T* op, int64_t M, int64_t N, int64_t K, int64_t k_steps, int64_t blocks,
               const TileTable& tiles) {
  const int64_t pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = 2 * p, b1 = std::min(b0 + 1, blocks - 1);  // an odd last block computes itself twice
      const int64_t n0 = b0 * kBlock;
      const __mmask16 mask0 = columns_mask(n0, N), mask1 = b1 == b0 ? 0 : columns_mask(n0 + kBlock, N);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
        const int64_t rows = std::min(kMaxTile, M - m0);
        tiles[rows](xp + m0 * K, K, k_steps, wp + b0 * K * kBlock, wp + b1 * K * kBlock, op + m0 * N + n0, N, mask0,
                    mask1);
      }
    }
  });
}
#endif

}  // namespace

// Whether this build has the kernel for `dtype` ("float32": AVX-512; "bfloat16": AVX512-BF16); without it callers
// keep their other path.
bool available(const std::string& dtype) {
  if (dtype == "float32") {
#if defined(__AVX512F__)
    return true;
#endif
  } else if (dtype == "bfloat16") {
#if defined(__AVX512BF16__)
    return true;
#endif
  }
  return false;
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

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 2 * kBlock && 2 * packed.size(1) == x.size(1) &&
                  packed.size(0) == (N + kBlock - 1) / kBlock && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16,
              "packed does not match x and N");
#if defined(__AVX512BF16__)
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  auto out = torch::empty({M, N}, x.options());
  run_tiles(x.data_ptr<at::BFloat16>(), packed.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), M, N, K, K / 2,
            blocks, kTilesBf16);
  return out;
#else
  TORCH_CHECK(false, "built without AVX512-BF16: use available(\"bfloat16\") first");
#endif
}

}  // namespace

// x: (M, K) float32 or bfloat16, packed: pack(W) with W (N, K) of x's dtype -> x W^T (M, N) in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(x.dim() == 2, "x must be a 2-d tensor");
  if (x.scalar_type() == at::kBFloat16) return linear_bf16(x, packed, N);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  return linear_f32(x, packed, N);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the kernel for this dtype was built");
  m.def("pack", &pack, "pack a (N, K) float32 or bfloat16 weight for linear");
  m.def("linear", &linear, "x W^T with a packed weight (float32 or bfloat16)",
        py::call_guard<py::gil_scoped_release>());
}

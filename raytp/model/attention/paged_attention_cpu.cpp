// Variable-length paged attention on the CPU, reading the block KV cache in place.
//
// One call covers every sequence of a step, prefill chunks and decode rows
// alike. Sequence b owns query rows [query_start[b], query_start[b+1]) and has
// seq_lens[b] tokens in the cache, its new ones last, so its i-th new token
// sits at position p = seq_lens[b] - num_new + i and attends to the keys at
// positions max(0, p - window + 1) .. p (window <= 0: no sliding window).
// Keys are found through the block table: position k is slot
// block_tables[b][k / block_size] * block_size + k % block_size.
//
// Sequences flagged in skip (B,) bool are left out, their output rows
// unwritten: the caller computes those (long prompt chunks, sequences on a
// shared prefix) with torch's flash attention, which reuses each key across
// many queries (see cpu.py). The output is float32, whatever the dtype of q
// and the cache.
//
// Work items are groups of query rows whose sequences share their first cache
// block (one sequence's chunk; sequences on a cached prefix), at most 16 rows,
// all heads at once. A cache slot holds every KV head of its token
// contiguously (GQA heads share their KV head's row). Per row: scores in one
// pass, then a softmax, then the weighted sum of values (exact, no online
// rescaling). Float32 and bfloat16 on AVX-512 have their own kernel
// (attend_group_avx512; sums are float32; bfloat16 scores come from
// AVX512-BF16 dot products where the CPU has them, and bfloat16 values are
// widened to float32 as they are loaded, once for several query heads of their
// KV head), which goes over a group's keys
// tile by tile, and within a tile row by row, so rows that read the same
// blocks find them in L1; everything else runs the
// group row by row, in plain loops over head_dim, the contiguous axis, that
// the compiler vectorises. It is built with
// -ffast-math (reassociated sums vectorise, exp comes from libmvec): safe here
// because only real keys are visited, so no score is ever infinite or NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <vector>
#include "amx_tiles.h"
#include "avx512_math.h"

namespace {

#if defined(__AVX512F__)
using raytp_math::exp_nonpositive;

// s[0..n) <- softmax(s[0..n)), in place (n >= 1), 16 lanes at a time (the tail masked).
inline void softmax_(float* s, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 mx = lowest;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(lowest, m, s + j));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top));
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    _mm512_mask_storeu_ps(s + j, m, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
  }
}
#else
// s[0..n) <- softmax(s[0..n)), in place (n >= 1). exp is vectorised (-ffast-math, libmvec).
inline void softmax_(float* s, int64_t n) {
  float mx = s[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

#endif

// The cache slot of each of a row's keys first_key .. last_key, block by block (no division per key).
inline void key_slots(const int32_t* table, int64_t block_size, int64_t first_key, int64_t last_key,
                      std::vector<int64_t>& slots) {
  slots.resize(last_key - first_key + 1);
  int64_t j = 0;
  for (int64_t pos = first_key; pos <= last_key;) {
    const int64_t block = pos / block_size, offset = pos % block_size;
    const int64_t base = static_cast<int64_t>(table[block]) * block_size;
    const int64_t take = std::min(block_size - offset, last_key - pos + 1);
    for (int64_t t = 0; t < take; ++t) slots[j++] = base + offset + t;
    pos += take;
  }
}

// Rows computed together at most (see paged_attention).
constexpr int64_t kMaxGroupRows = 16;

// A query row of the step: its place in q and out, its sequence's block table, and the keys it sees.
struct Row {
  int64_t index;         // row in q and out
  const int32_t* table;  // its sequence's block table
  int64_t first_key, last_key;
};

#if defined(__AVX512F__)
// r[i] = sum of v[i]'s 16 lanes, for 16 vectors at once: three rounds of pairwise shuffles and adds (45
// instructions), instead of a full horizontal reduction per dot product.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 a[8], b[4];
  // The rounds below leave u[4m+k]'s sum in element 4k+m, so they take v in the transposed order u[4m+k] = v[4k+m].
  auto u = [v](int i) { return v[4 * (i % 4) + i / 4]; };
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: a[i] holds u[2i]'s 8 partial sums, then u[2i+1]'s
    const __m512 x = u(2 * i), y = u(2 * i + 1);
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: b[i]'s lane k holds u[4i+k]'s 4 partial sums
    const __m512 x = a[2 * i], y = a[2 * i + 1];
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // Within lane k, unpack and shuffle sum b[0..3]'s partials: element 4k+m is b[m]'s lane k, u[4m+k] = v[4k+m].
  const __m512 c01 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const __m512 c23 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(c01, c23, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_ps(c01, c23, _MM_SHUFFLE(3, 2, 3, 2)));
}

// Asks for a cache slot (n elements from p: every KV head of one token) into L2.
template <typename kv_t>
inline void prefetch_slot(const kv_t* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(kv_t)); b += 64) _mm_prefetch(bytes + b, _MM_HINT_T1);
}

// 16 cache values as float32: loaded as they are, or (bfloat16) widened, which is exact (a shift into the high half).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// dots[t] <- 16 partial sums (sum_lanes16 finishes them) of the dot product of one query head qh (head_dim = 16 * NC
// floats) with the same head of each key of a tile, keys[t] + head_offset.
template <int NC, typename kv_t>
inline void key_dots(const float* qh, const kv_t* const* keys, int64_t head_offset, __m512* dots) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<kv_t, at::BFloat16> && NC % 2 == 0) {
    // A bfloat16 cache: the query as bfloat16 pairs (exact: a bfloat16 step's q is widened from bfloat16) and
    // vdpbf16ps, 32 products added into float32 sums per instruction, the keys used as loaded. Against widening
    // each key and 16 FMAs at a time: half the instructions of the scores' pass.
    __m512bh qb[NC / 2];
    for (int c = 0; c < NC / 2; ++c)
      qb[c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qh + 32 * c + 16), _mm512_loadu_ps(qh + 32 * c));
    for (int t = 0; t < 16; ++t) {
      const kv_t* k = keys[t] + head_offset;
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < NC / 2; ++c) acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
      dots[t] = acc;
    }
    return;
  }
#endif
  __m512 qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);
  for (int t = 0; t < 16; ++t) {
    const kv_t* k = keys[t] + head_offset;
    __m512 acc = _mm512_mul_ps(qv[0], load16(k));
    for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(qv[c], load16(k + 16 * c), acc);
    dots[t] = acc;
  }
}

// The values' pass for HB query heads h0 .. h0 + HB - 1 of one KV head at a time: out[row, h] += sum over each key
// tile's keys j of p[h][j] * v_j, float32 sums. Each value is loaded (a bfloat16 one widened, exactly) once for the
// HB heads, and their HB * NC accumulators are independent chains of FMAs.
template <int NC, int HB, typename kv_t>
void value_sums(const Row* rows, int64_t R, const kv_t* v_cache, int64_t slot_stride, int64_t H, int64_t G,
                int64_t longest, int64_t tile, const std::vector<std::vector<int64_t>>& slots,
                const std::vector<std::vector<float>>& scores, float* out) {
  constexpr int64_t D = 16 * NC;
  for (int64_t j0 = 0; j0 < longest; j0 += tile) {
    for (int64_t h0 = 0; h0 < H; h0 += HB) {
      const kv_t* v_head = v_cache + (h0 / G) * D;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = slots[r].size();
        if (j0 >= n) continue;
        const float* p = scores[r].data() + h0 * n;  // head h0 + g's probabilities at p + g * n
        __m512 acc[HB][NC];
        for (int g = 0; g < HB; ++g)
          for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_setzero_ps();
        for (int64_t j = j0; j < std::min<int64_t>(j0 + tile, n); ++j) {
          const kv_t* v = v_head + slots[r][j] * slot_stride;
          __m512 vc[NC];
          for (int c = 0; c < NC; ++c) vc[c] = load16(v + 16 * c);
          for (int g = 0; g < HB; ++g) {
            const __m512 w = _mm512_set1_ps(p[g * n + j]);
            for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(w, vc[c], acc[g][c]);
          }
        }
        for (int g = 0; g < HB; ++g) {
          float* o = out + (rows[r].index * H + h0 + g) * D;
          for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_add_ps(_mm512_loadu_ps(o + 16 * c), acc[g][c]));
        }
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Query vectors per KV head (rows x query heads per KV head) from which a group's scores come from AMX tiles: a
// lone decode row's few (2-4) leave most of a tile's 16 columns empty, and its keys, read once, stream from memory
// faster through key_dots' prefetches (Xeon with AMX, 32 rows of 140-300 keys, caches cold: 0.43 against 0.53 ms
// a layer), while a shared prefix's or a chunk's are read by many vectors at once.
constexpr int64_t kMinAmxVectors = 8;

// Keys from the first that every row of the group sees, through the same cache blocks, in whole 16-key tiles
// (block_size a multiple of 16; 0 under a sliding window): the rows' scores for them come from AMX tiles, every row
// and head of a KV head at once (amx_scores).
int64_t common_keys(const Row* rows, int64_t R, int64_t block_size) {
  if (block_size % 16 != 0) return 0;
  int64_t n = rows[0].last_key + 1;
  for (int64_t r = 0; r < R; ++r) {
    if (rows[r].first_key != 0) return 0;
    n = std::min(n, rows[r].last_key + 1);
  }
  for (int64_t b = 0; b * block_size < n; ++b) {
    for (int64_t r = 1; r < R; ++r) {
      if (rows[r].table[b] != rows[0].table[b]) return b * block_size;
    }
  }
  return n - n % 16;
}

// c (16 keys x 16 query vectors, float32) = the 16 keys' D = 32 KS elements from k (rows ld bytes apart) times the
// query vectors in B tiles 4 .. 3 + KS, through tile 0 (scores) and tile 1 (a key half at a time). (Tile numbers are
// literals: the intrinsics paste them into the instruction.)
template <int KS>
inline void key_tile_scores(const at::BFloat16* k, int64_t ld, float (*c)[16]) {
  _tile_zero(0);
  _tile_loadd(1, k, ld);
  _tile_dpbf16ps(0, 1, 4);
  if constexpr (KS > 1) {
    _tile_loadd(1, k + 32, ld);
    _tile_dpbf16ps(0, 1, 5);
  }
  if constexpr (KS > 2) {
    _tile_loadd(1, k + 64, ld);
    _tile_dpbf16ps(0, 1, 6);
  }
  if constexpr (KS > 3) {
    _tile_loadd(1, k + 96, ld);
    _tile_dpbf16ps(0, 1, 7);
  }
  _tile_stored(0, c, 64);
}

// scores[r][h * n_r + j] (n_r: row r's keys) for the first `common` keys of every row of the group, head_dim
// D = 32 * KS: per KV head, the keys 16 at a time (A tiles, loaded from the cache as they are: a block's slots are
// consecutive) times the query vectors of that KV head's heads in all the rows, 16 at a time (B tiles, made once per
// group), into float32 tiles of 16 keys x 16 vectors. The same products as key_dots'
// (bfloat16 pairs, float32 sums), summed in another order.
template <int KS>
void amx_scores(const Row* rows, int64_t R, const float* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache,
                int64_t H, int64_t Hkv, float scale, int64_t common, const std::vector<std::vector<int64_t>>& slots,
                std::vector<std::vector<float>>& scores) {
  constexpr int64_t D = 32 * KS;
  const int64_t G = H / Hkv, slot_stride = Hkv * D, ld = slot_stride * 2, V = R * G;
  // All eight tiles 16 rows of 64 bytes. Tile 0: scores, 16 keys x 16 query vectors (float32); 1: 16 keys' 32
  // elements of one KV head (bfloat16, rows of the cache as they are); 4 .. 7: the 16 query vectors' elements
  // 32 ks .. 32 ks + 31 as bfloat16 pairs (16 pairs x 16 vectors x 2), one tile per ks.
  raytp_amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) uint32_t b[KS][16][16];  // [ks][pair][vector]: the B tiles
  alignas(64) float c[16][16];         // [key][vector]: a tile of scores out of tile 0
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    for (int64_t v0 = 0; v0 < V; v0 += 16) {
      const int64_t nv = std::min<int64_t>(16, V - v0);
      // Vector v0 + i is head kh * G + g of row r, v0 + i = r * G + g; missing vectors stay zero.
      std::memset(b, 0, sizeof(b));
      for (int64_t i = 0; i < nv; ++i) {
        const int64_t r = (v0 + i) / G, g = (v0 + i) % G;
        const float* qh = q + (rows[r].index * H + kh * G + g) * D;
        for (int ks = 0; ks < KS; ++ks) {
          alignas(64) uint32_t pairs[16];
          _mm512_store_si512(pairs, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(qh + 32 * ks + 16),
                                                                  _mm512_loadu_ps(qh + 32 * ks)));
          for (int p = 0; p < 16; ++p) b[ks][p][i] = pairs[p];
        }
      }
      _tile_loadd(4, b[0], 64);
      if constexpr (KS > 1) _tile_loadd(5, b[1], 64);
      if constexpr (KS > 2) _tile_loadd(6, b[2], 64);
      if constexpr (KS > 3) _tile_loadd(7, b[3], 64);
      for (int64_t j0 = 0; j0 < common; j0 += 16) {
        // Into L2 on the first KV head's pass, whole slots (every KV head: the later passes find them there): the
        // keys four tiles ahead, and this tile's values (the values' pass reads them).
        if (kh == 0 && v0 == 0) {
          for (int64_t t = 0; t < 16; ++t) {
            if (j0 + 64 + t < common) prefetch_slot(k_cache + slots[0][j0 + 64 + t] * slot_stride, slot_stride);
            prefetch_slot(v_cache + slots[0][j0 + t] * slot_stride, slot_stride);
          }
        }
        key_tile_scores<KS>(k_cache + slots[0][j0] * slot_stride + kh * D, ld, c);
        // Each vector's 16 scores are a column of the tile: gathered, scaled, stored in its row's scores.
        for (int64_t i = 0; i < nv; ++i) {
          const int64_t r = (v0 + i) / G, g = (v0 + i) % G, n = slots[r].size();
          float* dst = scores[r].data() + (kh * G + g) * n + j0;
          _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_i32gather_ps(column, &c[0][i], 4), vscale));
        }
      }
    }
  }
  _tile_release();  // leave the tiles unshaped: the linear ops, oneDNN and torch shape their own
}
#endif

// Rows (queries and output in float32, the KV cache in float32 or bfloat16) whose sequences share their first
// cache block (a cached prefix, or one sequence's chunk), all heads, head_dim = 16 * NC. The passes go key tile by
// key tile, and within a tile row by row, so that rows reading the same blocks find them in L1 instead of
// streaming the shared prefix once per row. Scores for 16 keys
// at a time (a dot product per key and head, summed 16 at once), an exact softmax per row, then the weighted sum
// of values accumulated in out.
template <int NC, typename kv_t>
void attend_group_avx512(const Row* rows, int64_t R, const float* q, const kv_t* k_cache, const kv_t* v_cache,
                         int64_t block_size, int64_t H, int64_t Hkv, float scale,
                         std::vector<std::vector<int64_t>>& slots,   // scratch: each row's key slots
                         std::vector<std::vector<float>>& scores,    // scratch: each row's (H, keys) scores
                         float* out) {
  constexpr int64_t D = 16 * NC;
  // Keys per tile of the values' pass: one KV head's values for 64 keys are 16 KiB at head_dim 64, so a group's
  // rows share them in L1, and a row's accumulators go through memory once per 64 keys.
  constexpr int64_t kValueTile = 64;
  const int64_t G = H / Hkv, slot_stride = Hkv * D;
  slots.resize(R);
  scores.resize(R);
  int64_t longest = 0;
  for (int64_t r = 0; r < R; ++r) {
    key_slots(rows[r].table, block_size, rows[r].first_key, rows[r].last_key, slots[r]);
    scores[r].resize(H * slots[r].size());
    longest = std::max<int64_t>(longest, slots[r].size());
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t first_tile = 0;  // keys before it: scores from AMX tiles
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<kv_t, at::BFloat16> && NC % 2 == 0 && NC <= 8) {
    if (raytp_amx::granted()) {
      first_tile = R * (H / Hkv) >= kMinAmxVectors ? common_keys(rows, R, block_size) : 0;
      if (first_tile > 0) amx_scores<NC / 2>(rows, R, q, k_cache, v_cache, H, Hkv, scale, first_tile, slots, scores);
    }
  }
#endif
  for (int64_t j0 = first_tile; j0 < longest; j0 += 16) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = slots[r].size();
      if (j0 >= n) continue;
      const int64_t m = std::min<int64_t>(16, n - j0);
      const kv_t* keys[16];
      for (int64_t t = 0; t < 16; ++t) keys[t] = k_cache + slots[r][j0 + std::min(t, m - 1)] * slot_stride;
      const float* qr = q + rows[r].index * H * D;
      // Into L2, a part per head so that few requests are in flight at once: the keys two tiles ahead (at the first
      // tile also the next one; the group's first tile was asked for while the group before it ran), and this tile's
      // values, read in the values' pass. This pass goes through a tile's keys a head at a time, an order the
      // hardware prefetchers do not follow. Decode rows with the KV cache cold (32 rows of 140 tokens, 30 layers'
      // caches in turn, Xeon with AMX): 6.6 GB/s, against 5.6 with the next tile's keys only and 7.8 for a plain
      // pass over the whole cache (torch's sum).
      const int64_t kf0 = j0 == first_tile ? j0 + 16 : j0 + 32, kf1 = std::min<int64_t>(n, j0 + 48);
      const int64_t nk = std::max<int64_t>(0, kf1 - kf0), total = nk + m, per_head = (total + H - 1) / H;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = h * per_head; t < std::min(total, (h + 1) * per_head); ++t) {
          prefetch_slot(t < nk ? k_cache + slots[r][kf0 + t] * slot_stride     // a key ahead
                               : v_cache + slots[r][j0 + t - nk] * slot_stride,  // a value of this tile
                        slot_stride);
        }
        __m512 dots[16];
        key_dots<NC>(qr + h * D, keys, (h / G) * D, dots);
        _mm512_mask_storeu_ps(scores[r].data() + h * n + j0, static_cast<__mmask16>((1u << m) - 1),
                              _mm512_mul_ps(sum_lanes16(dots), vscale));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = slots[r].size();
    for (int64_t h = 0; h < H; ++h) softmax_(scores[r].data() + h * n, n);
    std::fill(out + rows[r].index * H * D, out + (rows[r].index + 1) * H * D, 0.f);
  }
  // Tile by tile (a tile's values come from memory once, for every head), the query heads of a KV head in batches
  // of hb: as many of its G as divide it, up to 4, and at most 24 accumulators.
  const int64_t most = std::min<int64_t>(4, 24 / NC);
  int64_t hb = 1;
  for (int64_t b = most; b > 1 && hb == 1; --b)
    if (G % b == 0) hb = b;
  auto pass = [&](auto heads) {
    value_sums<NC, decltype(heads)::value>(rows, R, v_cache, slot_stride, H, G, longest, kValueTile, slots, scores,
                                           out);
  };
  switch (hb) {
    case 4: pass(std::integral_constant<int, 4>()); break;
    case 3: pass(std::integral_constant<int, 3>()); break;
    case 2: pass(std::integral_constant<int, 2>()); break;
    default: pass(std::integral_constant<int, 1>()); break;
  }
}
#endif

// One query row, all its heads, any dtype and head_dim: plain loops the compiler vectorises over head_dim.
template <typename scalar_t>
void attend_row_generic(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* slots,
                        int64_t n, int64_t H, int64_t Hkv, int64_t D, float scale, float* scores,
                        std::vector<float>& qf, float* out) {
  const int64_t G = H / Hkv;  // query heads per KV head (GQA)
  std::fill(out, out + H * D, 0.f);
  qf.resize(H * D);
  for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[i]);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* kslot = k_cache + slots[j] * Hkv * D;
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = qf.data() + h * D;
      const scalar_t* krow = kslot + (h / G) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * static_cast<float>(krow[d]);
      scores[h * n + j] = dot * scale;
    }
  }
  for (int64_t h = 0; h < H; ++h) softmax_(scores + h * n, n);
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* vslot = v_cache + slots[j] * Hkv * D;
    for (int64_t h = 0; h < H; ++h) {
      const float p = scores[h * n + j];
      const scalar_t* vrow = vslot + (h / G) * D;
      float* a = out + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vrow[d]);
    }
  }
}

#if defined(__AVX512F__)
// Asks for the first 16 keys of each of the rows into L2 (slot_size: a cache slot's elements; slots: scratch).
template <typename kv_t>
void prefetch_first_keys(const Row* rows, int64_t R, const kv_t* k_cache, int64_t block_size, int64_t slot_size,
                         std::vector<int64_t>& slots) {
  for (int64_t r = 0; r < R; ++r) {
    key_slots(rows[r].table, block_size, rows[r].first_key, std::min(rows[r].last_key, rows[r].first_key + 15), slots);
    for (int64_t slot : slots) prefetch_slot(k_cache + slot * slot_size, slot_size);
  }
}

// The AVX-512 kernel for head_dim = 16 * NC, NC chosen at run time (head_dim a multiple of 16 up to 128).
template <typename kv_t>
void attend_group_fast(const Row* rows, int64_t R, const float* q, const kv_t* k_cache, const kv_t* v_cache,
                       int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                       std::vector<std::vector<int64_t>>& slots, std::vector<std::vector<float>>& scores,
                       float* out) {
  switch (D) {
#define RAYTP_GROUP(NC)                                                                                          \
  case 16 * NC:                                                                                                 \
    return attend_group_avx512<NC, kv_t>(rows, R, q, k_cache, v_cache, block_size, H, Hkv, scale, slots, scores, \
                                         out);
    RAYTP_GROUP(1) RAYTP_GROUP(2) RAYTP_GROUP(3) RAYTP_GROUP(4)
    RAYTP_GROUP(5) RAYTP_GROUP(6) RAYTP_GROUP(7) RAYTP_GROUP(8)
#undef RAYTP_GROUP
  }
  TORCH_CHECK(false, "no AVX-512 attention kernel for head_dim ", D);
}
#endif

// Whether attend_group_fast serves a step of this dtype and head_dim.
bool has_fast_kernel(at::ScalarType dtype, int64_t D) {
#if defined(__AVX512F__)
  return (dtype == at::kFloat || dtype == at::kBFloat16) && D % 16 == 0 && D <= 128;
#else
  return false;
#endif
}

// A group of rows in any dtype and head_dim, row by row.
template <typename scalar_t>
void attend_group_generic(const Row* rows, int64_t R, const scalar_t* q, const scalar_t* k_cache,
                          const scalar_t* v_cache, int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale,
                          std::vector<int64_t>& slots, std::vector<float>& scores, std::vector<float>& qf,
                          float* out) {
  for (int64_t r = 0; r < R; ++r) {
    key_slots(rows[r].table, block_size, rows[r].first_key, rows[r].last_key, slots);
    const int64_t n = slots.size();
    scores.resize(H * n);
    attend_row_generic<scalar_t>(q + rows[r].index * H * D, k_cache, v_cache, slots.data(), n, H, Hkv, D, scale,
                                 scores.data(), qf, out + rows[r].index * H * D);
  }
}

}  // namespace

// q: (T, H, D); k_cache, v_cache: (slots, Hkv, D); block_tables: (B, max_blocks) int32;
// query_start: (B + 1,) int32; seq_lens: (B,) int32; skip: (B,) bool. Returns out (T, H, D) float32.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor query_start, torch::Tensor seq_lens, int64_t block_size, double scale,
                              int64_t window, torch::Tensor skip) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches must be 3-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the caches must have one dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && query_start.scalar_type() == torch::kInt32 &&
                  seq_lens.scalar_type() == torch::kInt32, "block_tables, query_start and seq_lens must be int32");
  TORCH_CHECK(skip.scalar_type() == torch::kBool && skip.numel() == seq_lens.numel(), "skip must be (B,) bool");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "head shapes do not match");
  const int64_t B = seq_lens.size(0);
  const int64_t max_blocks = block_tables.size(1);

  // The rows this call computes, grouped by their sequence's first cache block (rows of one sequence, and
  // sequences that share a cached prefix, go together); groups are the work items split across threads.
  const int32_t* qs = query_start.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  skip = skip.contiguous();
  const bool* skipped = skip.data_ptr<bool>();
  std::vector<int64_t> seqs;  // the sequences computed here, ordered by first block
  for (int64_t b = 0; b < B; ++b)
    if (!skipped[b]) seqs.push_back(b);
  std::stable_sort(seqs.begin(), seqs.end(),
                   [&](int64_t a, int64_t b) { return tables[a * max_blocks] < tables[b * max_blocks]; });
  std::vector<Row> rows;
  std::vector<int64_t> group_start;  // group g is rows[group_start[g] .. group_start[g + 1])
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t b = seqs[i];
    if (i == 0 || tables[b * max_blocks] != tables[seqs[i - 1] * max_blocks]) group_start.push_back(rows.size());
    const int64_t num_new = qs[b + 1] - qs[b];
    for (int64_t r = qs[b]; r < qs[b + 1]; ++r) {
      // A group holds at most kMaxGroupRows rows, so that its rows' scores stay in L2.
      if (static_cast<int64_t>(rows.size()) - group_start.back() == kMaxGroupRows) group_start.push_back(rows.size());
      const int64_t pos = lens[b] - num_new + (r - qs[b]);
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      rows.push_back(Row{r, tables + b * max_blocks, first, pos});
    }
  }
  group_start.push_back(rows.size());
  const int64_t num_groups = static_cast<int64_t>(group_start.size()) - 1;

  // Sums in float32; the caller rounds the output once.
  auto out = torch::empty(q.sizes(), q.options().dtype(at::kFloat));
#if defined(__AVX512F__)
  if (has_fast_kernel(q.scalar_type(), D)) {
    // Queries in float32 (a bfloat16 step's q is widened once here); the cache is read in its own dtype.
    const bool is_float = q.scalar_type() == at::kFloat;
    auto qf = is_float ? q : q.to(at::kFloat);
    auto run = [&](auto* kp, auto* vp) {
      at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
        std::vector<std::vector<int64_t>> slots;
        std::vector<std::vector<float>> scores;
        std::vector<int64_t> next_slots;
        for (int64_t g = begin; g < end; ++g) {
          if (g + 1 < end) {  // the next group's first key tile, read while this one runs
            prefetch_first_keys(rows.data() + group_start[g + 1], group_start[g + 2] - group_start[g + 1], kp,
                                block_size, Hkv * D, next_slots);
          }
          attend_group_fast(rows.data() + group_start[g], group_start[g + 1] - group_start[g], qf.data_ptr<float>(),
                            kp, vp, block_size, H, Hkv, D, static_cast<float>(scale), slots, scores,
                            out.data_ptr<float>());
        }
      });
    };
    if (is_float) {
      run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
    } else {
      run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
    }
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> slots;
      std::vector<float> scores, qf;
      for (int64_t g = begin; g < end; ++g) {
        attend_group_generic<scalar_t>(rows.data() + group_start[g], group_start[g + 1] - group_start[g], qp, kp, vp,
                                       block_size, H, Hkv, D, static_cast<float>(scale), slots, scores, qf,
                                       out.data_ptr<float>());
      }
    });
  });
  return out;
}

// Whether a bfloat16 group's scores over its common keys come from AMX tiles here (amx_scores).
bool amx() {
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return raytp_amx::granted();
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL while they run (they touch no Python object): a rank's Ray threads unpickle the next step meanwhile.
  m.def("paged_attention", &paged_attention, "varlen paged attention over a block KV cache (CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("amx", &amx, "whether bfloat16 scores over keys a group shares run on AMX tiles here");
}

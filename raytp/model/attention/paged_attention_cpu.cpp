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
// many queries (see cpu.py), except in bfloat16 on AMX tiles, where this op
// does (below). The output is float32, whatever the dtype of q and the cache.
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
// the compiler vectorises. In bfloat16 on a CPU with AMX tiles, the keys every
// row of a group sees through the same cache blocks (a cached prefix; in a
// chunk, the keys before the group's rows) go through tiles instead, scores and
// values' sums alike, from keys and values arranged for the tiles once per call
// and shared by the groups that see them (SharedTiles). It is built with
// -ffast-math (reassociated sums vectorise, exp comes from libmvec): safe here
// because only real keys are visited, so no score is ever infinite or NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>
#include "amx_tiles.h"
#include "avx512_math.h"

namespace {

#if defined(__AVX512F__)
using raytp_math::exp_nonpositive;

// s[0..n) <- softmax(s[0..n)), in place (n >= 1), 16 lanes at a time (the tail masked). The maximum in four chains
// of 16 lanes (one chain waits on each max's latency: a quarter of the function's time on a Xeon with AMX).
inline void softmax_(float* s, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 mx[4] = {lowest, lowest, lowest, lowest};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    for (int c = 0; c < 4; ++c) mx[c] = _mm512_max_ps(mx[c], _mm512_loadu_ps(s + j + 16 * c));
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    mx[0] = _mm512_max_ps(mx[0], _mm512_mask_loadu_ps(lowest, m, s + j));
  }
  const __m512 top =
      _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]))));
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
// tile's keys j (from key `first` on) of p[h][j] * v_j, float32 sums. Each value is loaded (a bfloat16 one widened,
// exactly) once for the HB heads, and their HB * NC accumulators are independent chains of FMAs.
template <int NC, int HB, typename kv_t>
void value_sums(const Row* rows, int64_t R, const kv_t* v_cache, int64_t slot_stride, int64_t H, int64_t G,
                int64_t first, int64_t longest, int64_t tile, const std::vector<std::vector<int64_t>>& slots,
                const std::vector<std::vector<float>>& scores, float* out) {
  constexpr int64_t D = 16 * NC;
  for (int64_t j0 = first; j0 < longest; j0 += tile) {
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
// And the values' pass over the common keys from these many vectors and keys (fewer keys gain nothing over the
// AVX-512 pass, whose float32 probabilities keep a short prompt's results as before). Decode rows on a shared prefix
// count: on tiles one pass serves all their vectors, where the AVX-512 pass widens and multiplies each value once per
// row (one core of a Xeon with AMX, 8 decode rows on a 768-token prefix with 32-53 keys each of their own, each
// layer's cache cold: 12 heads / 4 KV heads of 64, 0.33 ms a layer with the values' sums on AVX-512 against 0.28 on
// tiles; 9 / 3, 0.25 against 0.23; with 3 or 4 rows alike either way; 8 chunks of 32 rows on 768 keys 3.7 against
// 2.4).
constexpr int64_t kMinAmxValueVectors = 8, kMinAmxValueKeys = 128;

// Keys from the first that every row of the group sees, through the same cache blocks, in whole 16-key tiles
// (block_size a multiple of 16; 0 under a sliding window): the rows' scores for them come from AMX tiles, every row
// and head of a KV head at once (amx_scores; and amx_values).
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

// Keys or values that a group's rows share, arranged for tdpbf16ps's B tiles, for every KV head: made for the first
// group that needs them and kept (extended when a later group shares more keys) for the next groups of the same
// paged_attention call, which mostly share them (sequences on one cached prefix; one chunk's rows). Keys and values
// are kept apart: decode rows use the keys' tiles alone (amx_values needs more query vectors).
struct SharedTiles {
  uint64_t call = 0;           // the paged_attention call that made them (the cache may change between calls)
  int64_t keys = 0;            // how many keys, a multiple of 16
  std::vector<int64_t> slots;  // their slots
  std::vector<std::vector<uint32_t>> heads;  // per KV head

  // How many of the first n keys of slots s (n a multiple of 16) are made for this call: n when all of them, else
  // whole tiles of `tile` keys (a sequence's second group shares the prefix with the first group of the sequence
  // before it, not the keys after it). A tile made with keys past n counts only if n ends it: those keys would meet
  // zero probabilities, but a non-finite value times zero is still NaN.
  int64_t made(uint64_t c, const std::vector<int64_t>& s, int64_t n, int64_t tile) const {
    if (call != c) return 0;
    const int64_t limit = std::min(keys, n);
    int64_t same = 0;
    while (same < limit && slots[same] == s[same]) ++same;
    if (same == n && (keys == n || n % tile == 0)) return n;
    return same - same % tile;
  }

  // Keys from `from` on are about to be made: remember the first n slots, size each head's tiles.
  void remake(uint64_t c, const std::vector<int64_t>& s, int64_t n, int64_t Hkv, int64_t words) {
    call = c, keys = n;
    slots.assign(s.begin(), s.begin() + n);
    heads.resize(Hkv);
    for (auto& h : heads) h.resize(words);
  }
};

// r[0..16) <- their transpose, as 16 x 16 32-bit elements (r[p] element k <- r[k] element p): 32-bit, then 64-bit
// unpacks within 128-bit lanes (each lane of the result holds 4 rows' element of one column), then the lanes of four
// rows' vectors transposed.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i s[4][4];  // s[g][c] lane L: column 4 L + c of rows 4 g .. 4 g + 3
  for (int g = 0; g < 4; ++g) {
    s[g][0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    s[g][1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    s[g][2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    s[g][3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i u0 = _mm512_shuffle_i32x4(s[0][c], s[1][c], 0x44), u1 = _mm512_shuffle_i32x4(s[0][c], s[1][c], 0xEE);
    const __m512i u2 = _mm512_shuffle_i32x4(s[2][c], s[3][c], 0x44), u3 = _mm512_shuffle_i32x4(s[2][c], s[3][c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
  }
}

// Asks for the cache slots s[from .. to) (every KV head of each: slot_stride elements) into L2.
inline void prefetch_slots(const at::BFloat16* cache, const std::vector<int64_t>& s, int64_t from, int64_t to,
                           int64_t slot_stride) {
  for (int64_t j = from; j < to; ++j) prefetch_slot(cache + s[j] * slot_stride, slot_stride);
}

// keys.heads[kh][((t * KS + ks) * 16 + p) * 16 + k] = key 16 t + k's elements 32 ks + 2 p and 32 ks + 2 p + 1 as a
// bfloat16 pair, for the first n keys of the slots: each 16-key tile transposed, the B tiles of scores = q k^T
// (16 vectors x 16 keys). Head_dim D = 16 * NC = 32 * KS. Tile by tile, every KV head of a tile's keys at once (a
// slot holds them all): the keys come from memory in whole slots, asked for a tile ahead of their transposition.
template <int NC>
void arrange_keys(SharedTiles& keys, const at::BFloat16* k_cache, int64_t Hkv, const std::vector<int64_t>& s,
                  int64_t n, uint64_t call) {
  constexpr int64_t D = 16 * NC, KS = NC / 2;
  const int64_t from = keys.made(call, s, n, 16), slot_stride = Hkv * D;
  if (from == n) return;
  keys.remake(call, s, n, Hkv, n / 16 * KS * 256);
  prefetch_slots(k_cache, s, from, from + 16, slot_stride);
  for (int64_t t = from / 16; t < n / 16; ++t) {
    prefetch_slots(k_cache, s, 16 * t + 16, std::min<int64_t>(n, 16 * t + 32), slot_stride);
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      uint32_t* kt = keys.heads[kh].data() + t * KS * 256;
      for (int64_t ks = 0; ks < KS; ++ks) {
        __m512i r[16];  // key 16 t + k's elements 32 ks .. 32 ks + 31 (16 pairs), then transposed
        for (int64_t k = 0; k < 16; ++k)
          r[k] = _mm512_loadu_si512(k_cache + s[16 * t + k] * slot_stride + kh * D + 32 * ks);
        transpose16x16(r);
        for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(kt + (ks * 16 + p) * 16, r[p]);
      }
    }
  }
}

// values.heads[kh][((t * NC + c) * 16 + p) * 16 + d] = keys 32 t + 2 p and 32 t + 2 p + 1's value element 16 c + d
// as a bfloat16 pair, for the first n keys of the slots (zero past them): the B tiles of out = p v (16 vectors x 16
// elements). Head_dim D = 16 * NC, NC even.
template <int NC>
void arrange_values(SharedTiles& values, const at::BFloat16* v_cache, int64_t Hkv, const std::vector<int64_t>& s,
                    int64_t n, uint64_t call) {
  constexpr int64_t D = 16 * NC;
  const int64_t from = values.made(call, s, n, 32), slot_stride = Hkv * D;
  if (from == n) return;
  values.remake(call, s, n, Hkv, (n + 31) / 32 * NC * 256);
  // Two keys' elements 32 m .. 32 m + 31 (a, b) -> their first 16 interleaved a0 b0 a1 b1 ... (lo), the last 16 (hi)
  alignas(64) int16_t lo_index[32], hi_index[32];
  for (int d = 0; d < 16; ++d) {
    lo_index[2 * d] = d, lo_index[2 * d + 1] = 32 + d;
    hi_index[2 * d] = 16 + d, hi_index[2 * d + 1] = 48 + d;
  }
  const __m512i lo = _mm512_load_si512(lo_index), hi = _mm512_load_si512(hi_index);
  prefetch_slots(v_cache, s, from, std::min<int64_t>(n, from + 32), slot_stride);
  for (int64_t t = from / 32; t < (n + 31) / 32; ++t) {
    prefetch_slots(v_cache, s, 32 * t + 32, std::min<int64_t>(n, 32 * t + 64), slot_stride);
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      uint32_t* vt = values.heads[kh].data();
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t j = 32 * t + 2 * p;
        const at::BFloat16* a = j < n ? v_cache + s[j] * slot_stride + kh * D : nullptr;
        const at::BFloat16* b = j + 1 < n ? v_cache + s[j + 1] * slot_stride + kh * D : nullptr;
        for (int m = 0; m < NC / 2; ++m) {
          const __m512i va = a ? _mm512_loadu_si512(a + 32 * m) : _mm512_setzero_si512();
          const __m512i vb = b ? _mm512_loadu_si512(b + 32 * m) : _mm512_setzero_si512();
          uint32_t* dst = vt + ((t * NC + 2 * m) * 16 + p) * 16;
          _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(va, lo, vb));
          _mm512_storeu_si512(dst + 256, _mm512_permutex2var_epi16(va, hi, vb));
        }
      }
    }
  }
}

// Shapes tiles 0 .. count - 1 as 16 rows of 64 bytes each (all of raytp's attention tiles).
inline void configure_tiles(int count) {
  raytp_amx::TileConfig cfg;
  for (int t = 0; t < count; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Tile 0 += A tiles 4 .. 3 + KS times the B tiles at b, b + 256, ... (one per A, 1 KiB each, loaded into tile 1 in
// turn): a tile of scores over KS element chunks. (Tile numbers are literals: the intrinsics paste them into the
// instruction.)
template <int KS>
inline void score_tile_products(const uint32_t* b) {
  _tile_loadd(1, b, 64);
  _tile_dpbf16ps(0, 4, 1);
  if constexpr (KS > 1) {
    _tile_loadd(1, b + 256, 64);
    _tile_dpbf16ps(0, 5, 1);
  }
  if constexpr (KS > 2) {
    _tile_loadd(1, b + 512, 64);
    _tile_dpbf16ps(0, 6, 1);
  }
  if constexpr (KS > 3) {
    _tile_loadd(1, b + 768, 64);
    _tile_dpbf16ps(0, 7, 1);
  }
}

// Tiles 4 .. 3 + NB += (A tile 0 + A tile 2) times the B tiles at b, b + 256, ... (1 KiB each, loaded into tile 1
// in turn): NB tiles of values' sums, for probabilities split into a bfloat16 and the bfloat16 of its remainder.
template <int NB>
inline void value_tile_products(const uint32_t* b) {
  _tile_loadd(1, b, 64);
  _tile_dpbf16ps(4, 0, 1);
  _tile_dpbf16ps(4, 2, 1);
  if constexpr (NB > 1) {
    _tile_loadd(1, b + 256, 64);
    _tile_dpbf16ps(5, 0, 1);
    _tile_dpbf16ps(5, 2, 1);
  }
  if constexpr (NB > 2) {
    _tile_loadd(1, b + 512, 64);
    _tile_dpbf16ps(6, 0, 1);
    _tile_dpbf16ps(6, 2, 1);
  }
  if constexpr (NB > 3) {
    _tile_loadd(1, b + 768, 64);
    _tile_dpbf16ps(7, 0, 1);
    _tile_dpbf16ps(7, 2, 1);
  }
}

// The 32 bfloat16 of x (lanes 0 .. 15 from lo, 16 .. 31 from hi) and of what rounding to them left of x: their sum is
// x to ~16 bits, where one bfloat16 keeps 8.
inline void split_bf16(__m512 lo, __m512 hi, __m512i& head, __m512i& rest) {
  head = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  auto widen = [](__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); };
  rest = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(hi, widen(_mm512_extracti64x4_epi64(head, 1))),
                                      _mm512_sub_ps(lo, widen(_mm512_extracti64x4_epi64(head, 0))));
}

// scores[r][h * n_r + j] (n_r: row r's keys) for the first `common` keys of every row of the group, head_dim
// D = 32 * KS: per KV head, 16 query vectors at a time (rows x query heads of that KV head; A tiles 4 .. 3 + KS, an
// element chunk of 32 each, as bfloat16) times the shared keys 16 at a time (B tiles, arrange_keys), into a float32
// tile of 16 vectors x 16 keys (tile 0), which goes straight into the vectors' scores. The same products as key_dots'
// (bfloat16 pairs, float32 sums), summed in another order.
template <int KS>
void amx_scores(const Row* rows, int64_t R, const float* q, int64_t H, int64_t Hkv, float scale, int64_t common,
                const SharedTiles& keys, const std::vector<std::vector<int64_t>>& slots,
                std::vector<std::vector<float>>& scores) {
  constexpr int64_t D = 32 * KS;
  const int64_t G = H / Hkv, V = R * G;
  configure_tiles(8);
  alignas(64) uint16_t a[KS][16][32];  // [ks][vector][element]: the A tiles
  alignas(64) float c[16][16];         // [vector][key]: a tile of scores out of tile 0
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    const uint32_t* key_tiles = keys.heads[kh].data();
    for (int64_t v0 = 0; v0 < V; v0 += 16) {
      // Vector v0 + i is head kh * G + g of row r, v0 + i = r * G + g; A's rows past nv are not read back.
      const int64_t nv = std::min<int64_t>(16, V - v0);
      float* dst[16];  // vector i's scores (found once: a division per vector and key tile cost more than its products)
      for (int64_t i = 0; i < nv; ++i) {
        const int64_t r = (v0 + i) / G, g = (v0 + i) % G;
        dst[i] = scores[r].data() + (kh * G + g) * slots[r].size();
        const float* qh = q + (rows[r].index * H + kh * G + g) * D;
        for (int ks = 0; ks < KS; ++ks)
          _mm512_store_si512(a[ks][i], (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(qh + 32 * ks + 16),
                                                                     _mm512_loadu_ps(qh + 32 * ks)));
      }
      _tile_loadd(4, a[0], 64);
      if constexpr (KS > 1) _tile_loadd(5, a[1], 64);
      if constexpr (KS > 2) _tile_loadd(6, a[2], 64);
      if constexpr (KS > 3) _tile_loadd(7, a[3], 64);
      for (int64_t t = 0; t < common / 16; ++t) {
        _tile_zero(0);
        score_tile_products<KS>(key_tiles + t * KS * 256);
        _tile_stored(0, c, 64);
        for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(dst[i] + 16 * t, _mm512_mul_ps(_mm512_load_ps(c[i]), vscale));
      }
    }
  }
  _tile_release();  // leave the tiles unshaped: the linear ops, oneDNN and torch shape their own
}

// out[row, h] += sum over the first `common` keys j of p[h][j] * v_j (every row of the group sees them through the
// same slots), head_dim D = 16 * NC (NC even), on AMX tiles: per KV head, the probabilities of 16 query vectors
// (rows x query heads of that KV head) for 32 keys, as two bfloat16 (A tiles 0 and 2: split_bf16, so that they count
// to ~16 bits as the AVX-512 pass's float32 probabilities do, where one bfloat16 would round them as torch's flash
// attention does), times the shared values (B tiles, arrange_values), into float32 tiles 4 .. 7 of 16 vectors x 16
// elements.
template <int NC>
void amx_values(const Row* rows, int64_t R, int64_t H, int64_t Hkv, int64_t common, const SharedTiles& values,
                const std::vector<std::vector<int64_t>>& slots, const std::vector<std::vector<float>>& scores,
                float* out) {
  constexpr int64_t D = 16 * NC;
  const int64_t G = H / Hkv, V = R * G, tiles = (common + 31) / 32;
  configure_tiles(8);
  alignas(64) uint16_t a[16][32], a_rest[16][32];  // [vector][key]: the A tiles
  alignas(64) float c[4][16][16];                    // [tile][vector][element]: sums out of tiles 4 .. 7
  for (int64_t kh = 0; kh < Hkv; ++kh) {
    const uint32_t* value_tiles = values.heads[kh].data();
    for (int64_t v0 = 0; v0 < V; v0 += 16) {
      const int64_t nv = std::min<int64_t>(16, V - v0);  // A's rows past nv are not read back
      const float* probs[16];  // vector i's probabilities and output (found once, as in amx_scores)
      float* dst[16];
      for (int64_t i = 0; i < nv; ++i) {
        const int64_t r = (v0 + i) / G, g = (v0 + i) % G;
        probs[i] = scores[r].data() + (kh * G + g) * slots[r].size();
        dst[i] = out + (rows[r].index * H + kh * G + g) * D;
      }
      for (int64_t c0 = 0; c0 < NC; c0 += 4) {  // elements 16 c0 .. 16 c0 + 63
        const int nb = static_cast<int>(std::min<int64_t>(4, NC - c0));
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t t = 0; t < tiles; ++t) {
          // `common` is whole 16-key tiles, so the last tile may have 16 keys of 32: the other 16 get probability 0
          // (their pairs may hold values).
          const __mmask16 second_half = common - 32 * t >= 32 ? 0xFFFF : 0;
          for (int64_t i = 0; i < nv; ++i) {
            const float* p = probs[i] + 32 * t;
            __m512i head, rest;
            split_bf16(_mm512_loadu_ps(p), _mm512_maskz_loadu_ps(second_half, p + 16), head, rest);
            _mm512_store_si512(a[i], head);
            _mm512_store_si512(a_rest[i], rest);
          }
          _tile_loadd(0, a, 64);
          _tile_loadd(2, a_rest, 64);
          const uint32_t* b = value_tiles + (t * NC + c0) * 256;
          switch (nb) {
            case 4: value_tile_products<4>(b); break;
            case 3: value_tile_products<3>(b); break;
            case 2: value_tile_products<2>(b); break;
            default: value_tile_products<1>(b); break;
          }
        }
        _tile_stored(4, c[0], 64);
        if (nb > 1) _tile_stored(5, c[1], 64);
        if (nb > 2) _tile_stored(6, c[2], 64);
        if (nb > 3) _tile_stored(7, c[3], 64);
        for (int64_t i = 0; i < nv; ++i) {
          float* o = dst[i] + 16 * c0;
          for (int b = 0; b < nb; ++b)
            _mm512_storeu_ps(o + 16 * b, _mm512_add_ps(_mm512_loadu_ps(o + 16 * b), _mm512_load_ps(c[b][i])));
        }
      }
    }
  }
  _tile_release();
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
                         uint64_t call,                              // which paged_attention call (SharedTiles)
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
  int64_t first_tile = 0;    // keys before it: scores from AMX tiles
  int64_t values_first = 0;  // keys before it: the values' sums from AMX tiles
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  // What the tiles take: a bfloat16 cache, head_dim a multiple of 32 up to 128
  constexpr bool kOnTiles = std::is_same_v<kv_t, at::BFloat16> && NC % 2 == 0 && NC <= 8;
  // The keys and values groups share, arranged for the tiles and kept for the next groups of the call
  thread_local SharedTiles shared_keys, shared_values;
  if constexpr (kOnTiles) {
    if (raytp_amx::granted()) {
      first_tile = R * (H / Hkv) >= kMinAmxVectors ? common_keys(rows, R, block_size) : 0;
      if (first_tile > 0) {
        arrange_keys<NC>(shared_keys, k_cache, Hkv, slots[0], first_tile, call);
        amx_scores<NC / 2>(rows, R, q, H, Hkv, scale, first_tile, shared_keys, slots, scores);
      }
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
      // tile also the next one; a group's first tile at key 0 was asked for while the group before it ran), and this
      // tile's values, read in the values' pass. This pass goes through a tile's keys a head at a time, an order the
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
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (kOnTiles) {
    values_first = R * (H / Hkv) >= kMinAmxValueVectors && first_tile >= kMinAmxValueKeys ? first_tile : 0;
    if (values_first > 0) {
      arrange_values<NC>(shared_values, v_cache, Hkv, slots[0], values_first, call);
      amx_values<NC>(rows, R, H, Hkv, values_first, shared_values, slots, scores, out);
    }
  }
#endif
  // Tile by tile (a tile's values come from memory once, for every head), the query heads of a KV head in batches
  // of hb: as many of its G as divide it, up to 4, and at most 24 accumulators.
  const int64_t most = std::min<int64_t>(4, 24 / NC);
  int64_t hb = 1;
  for (int64_t b = most; b > 1 && hb == 1; --b)
    if (G % b == 0) hb = b;
  auto pass = [&](auto heads) {
    value_sums<NC, decltype(heads)::value>(rows, R, v_cache, slot_stride, H, G, values_first, longest, kValueTile,
                                           slots, scores, out);
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
                       int64_t block_size, int64_t H, int64_t Hkv, int64_t D, float scale, uint64_t call,
                       std::vector<std::vector<int64_t>>& slots, std::vector<std::vector<float>>& scores,
                       float* out) {
  switch (D) {
#define RAYTP_GROUP(NC)                                                                                          \
  case 16 * NC:                                                                                                 \
    return attend_group_avx512<NC, kv_t>(rows, R, q, k_cache, v_cache, block_size, H, Hkv, scale, call, slots,  \
                                         scores, out);
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
    static std::atomic<uint64_t> calls{0};
    const uint64_t call = ++calls;
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
                            kp, vp, block_size, H, Hkv, D, static_cast<float>(scale), call, slots, scores,
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

// Whether a bfloat16 group's scores and values' sums over its common keys come from AMX tiles here (amx_scores,
// amx_values): cpu.py then keeps every bfloat16 row in this op.
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
  m.def("amx", &amx, "whether bfloat16 attention over keys a group shares runs on AMX tiles here");
}

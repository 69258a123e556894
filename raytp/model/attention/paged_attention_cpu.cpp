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
// unwritten: the caller computes those long prompt chunks with GEMMs, which
// reuse each key across many queries (see cpu.py).
//
// Work items are query rows, all heads at once: a cache slot holds every KV
// head of its token contiguously, so each row reads the slots it needs once,
// in order (GQA heads share their KV head's row). Scores are computed in one pass, then a softmax, then the weighted sum
// of values (exact, no online rescaling). Inner loops run over head_dim, the
// contiguous axis, so the compiler vectorises them. It is built with
// -ffast-math (reassociated sums vectorise, exp comes from libmvec): safe here
// because only real keys are visited, so no score is ever infinite or NaN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

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

// One query row, all its heads. Each key's (and value's) slot holds all KV heads
// contiguously, so a row reads every slot it needs once, front to back.
template <typename scalar_t>
void attend_row(const scalar_t* q,            // (H, D) this row's query heads
                const scalar_t* k_cache,      // (slots, Hkv, D)
                const scalar_t* v_cache,      // (slots, Hkv, D)
                const int32_t* table, int64_t block_size, int64_t first_key, int64_t last_key,
                int64_t H, int64_t Hkv, int64_t D, float scale,
                std::vector<float>& scores,  // scratch (H * keys)
                std::vector<float>& acc,     // scratch (H * D)
                std::vector<float>& qf,      // scratch (H * D)
                scalar_t* out) {             // (H, D)
  const int64_t n = last_key - first_key + 1;  // >= 1: a query always sees itself
  const int64_t G = H / Hkv;                   // query heads per KV head (GQA)
  scores.resize(H * n);
  acc.assign(H * D, 0.f);
  qf.resize(H * D);
  for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(q[i]);

  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = first_key + j;
    const int64_t slot = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
    const scalar_t* kslot = k_cache + slot * Hkv * D;
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = qf.data() + h * D;
      const scalar_t* krow = kslot + (h / G) * D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * static_cast<float>(krow[d]);
      scores[h * n + j] = dot * scale;
    }
  }
  for (int64_t h = 0; h < H; ++h) softmax_(scores.data() + h * n, n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = first_key + j;
    const int64_t slot = static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
    const scalar_t* vslot = v_cache + slot * Hkv * D;
    for (int64_t h = 0; h < H; ++h) {
      const float p = scores[h * n + j];
      const scalar_t* vrow = vslot + (h / G) * D;
      float* a = acc.data() + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(vrow[d]);
    }
  }
  for (int64_t i = 0; i < H * D; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

}  // namespace

// q: (T, H, D); k_cache, v_cache: (slots, Hkv, D); block_tables: (B, max_blocks) int32;
// query_start: (B + 1,) int32; seq_lens: (B,) int32. Returns (T, H, D).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start, torch::Tensor seq_lens,
                              int64_t block_size, double scale, int64_t window, torch::Tensor skip) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches must be 3-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && query_start.scalar_type() == torch::kInt32 &&
                  seq_lens.scalar_type() == torch::kInt32, "block_tables, query_start and seq_lens must be int32");
  TORCH_CHECK(skip.scalar_type() == torch::kBool && skip.numel() == seq_lens.numel(), "skip must be (B,) bool");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "head shapes do not match");
  const int64_t B = seq_lens.size(0);
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);

  // Row -> sequence, so that work items can be split evenly across threads.
  const int32_t* qs = query_start.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  skip = skip.contiguous();
  const bool* skipped = skip.data_ptr<bool>();
  std::vector<int32_t> rows, row_seq;  // the rows this call computes, and each one's sequence
  rows.reserve(T);
  row_seq.reserve(T);
  for (int64_t b = 0; b < B; ++b) {
    if (skipped[b]) continue;
    for (int64_t r = qs[b]; r < qs[b + 1]; ++r) {
      rows.push_back(static_cast<int32_t>(r));
      row_seq.push_back(static_cast<int32_t>(b));
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int32_t* tables = block_tables.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc, qf;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = rows[i], b = row_seq[i];
        const int64_t num_new = qs[b + 1] - qs[b];
        const int64_t pos = lens[b] - num_new + (row - qs[b]);
        const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        attend_row<scalar_t>(qp + row * H * D, kp, vp, tables + b * max_blocks, block_size, first, pos, H, Hkv, D,
                             static_cast<float>(scale), scores, acc, qf, op + row * H * D);
      }
    });
  });
  return out;
}

// The softmax of a long chunk's scores, in place, with its causal (and sliding-window) mask applied on the fly.
// scores (R, L_pad) float32 holds G blocks of M_pad rows (G query heads, each with rows for the chunk's M new
// tokens, then padding) against the chunk's context of num_keys keys, its new tokens last, then padding keys.
// Row r is token i = r % M_pad at position p = num_keys - M + i, which sees keys max(0, p - window + 1) .. p;
// a padding row (i >= M) sees every real key, so that it stays finite. Everything else becomes 0 (padding keys
// included: they then add nothing to the output). Cheaper than masked_fill + softmax: one pass over the visible
// keys.
void causal_softmax_(torch::Tensor scores, int64_t num_new, int64_t rows_per_head, int64_t num_keys,
                     int64_t window) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
              "scores must be a contiguous 2-d float32 tensor");
  const int64_t R = scores.size(0), L = scores.size(1);
  TORCH_CHECK(num_new >= 1 && num_new <= rows_per_head && R % rows_per_head == 0 && num_new <= num_keys &&
                  num_keys <= L, "bad num_new, rows_per_head or num_keys for these scores");
  float* base = scores.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* s = base + r * L;
      const int64_t p = std::min(num_keys - num_new + r % rows_per_head, num_keys - 1);
      const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      softmax_(s + first, p - first + 1);
      std::fill(s, s + first, 0.f);
      std::fill(s + p + 1, s + L, 0.f);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "varlen paged attention over a block KV cache (CPU)");
  m.def("causal_softmax_", &causal_softmax_, "in-place causal (sliding-window) softmax of a chunk's scores");
}

// The small per-token ops of a decoder layer on the CPU, each in one pass, float32 or bfloat16: RMSNorm (alone, and
// after the residual add), rotary embedding of q and k with the KV cache write, and SiLU(gate) * up; and the row
// argmax that greedy sampling takes of the logits.
//
// In torch each of these is several ops (RMSNorm: pow, mean, add, rsqrt, mul, mul; rotary: two slices, a negation,
// a concatenation, two products and a sum, then a split and two index_copy_ into the cache), each a few
// microseconds of dispatch for a decode step's few rows: a 30-layer model's decode step spent about as long in
// them as in its linears' arithmetic. Here each is one call.
//
// The roundings follow Hugging Face's Llama modules, the reference raytp is tested against, op by op: in bfloat16
// every torch op rounds its result to bfloat16, so each intermediate below that was a tensor there is rounded
// here (round_trip); sums of squares are float32, as there.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// float <-> the dtype, in plain integer arithmetic so that the loops below vectorise (c10::BFloat16's own
// conversions do not): bfloat16 is a float's high half, rounded to nearest even (the values here are finite).
inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16); }
inline float round_to(float v, float) { return v; }
inline at::BFloat16 round_to(float v, at::BFloat16) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  return at::BFloat16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16), at::BFloat16::from_bits());
}
inline float round_trip(float v, float) { return v; }
inline float round_trip(float v, at::BFloat16) {  // v rounded to bfloat16, as a float
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  return __builtin_bit_cast(float, (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
}

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* w, scalar_t* out, int64_t rows, int64_t H, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * H;
      scalar_t* o = out + r * H;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < H; ++i) {
        const float v = to_float(xr[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(H) + eps);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) {
        const float normed = round_trip(to_float(xr[i]) * inv, scalar_t());  // rounded to the dtype
        o[i] = round_to(to_float(w[i]) * normed, scalar_t());
      }
    }
  });
}

template <typename scalar_t>
void add_rms_norm_rows(scalar_t* x, const scalar_t* h, const scalar_t* w, scalar_t* out, int64_t rows, int64_t H,
                       float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* xr = x + r * H;
      const scalar_t* hr = h + r * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) xr[i] = round_to(to_float(xr[i]) + to_float(hr[i]), scalar_t());
    }
  });
  rms_norm_rows(x, w, out, rows, H, eps);
}

// Rotary embedding (Hugging Face's rotate-half convention) of each row's q and k heads, k and v stored in the cache.
template <typename scalar_t>
void rotary_rows(const scalar_t* qkv, const scalar_t* cos, const scalar_t* sin, const int64_t* slots, scalar_t* q,
                 scalar_t* k_cache, scalar_t* v_cache, int64_t T, int64_t H, int64_t Hkv, int64_t D) {
  const int64_t half = D / 2, width = (H + 2 * Hkv) * D;
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = qkv + t * width;
      const scalar_t *c = cos + t * D, *s = sin + t * D;
      for (int64_t head = 0; head < H + Hkv; ++head) {
        const scalar_t* x = row + head * D;
        scalar_t* dst = head < H ? q + (t * H + head) * D : k_cache + (slots[t] * Hkv + head - H) * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) {
          const float rotated = i < half ? -to_float(x[i + half]) : to_float(x[i - half]);
          const float a = round_trip(to_float(x[i]) * to_float(c[i]), scalar_t());
          const float b = round_trip(rotated * to_float(s[i]), scalar_t());
          dst[i] = round_to(a + b, scalar_t());
        }
      }
      std::copy(row + (H + Hkv) * D, row + width, v_cache + slots[t] * Hkv * D);
    }
  });
}

template <typename scalar_t>
void silu_mul_rows(const scalar_t* gate_up, scalar_t* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t *g = gate_up + r * 2 * I, *u = g + I;
      scalar_t* o = out + r * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float gi = to_float(g[i]);
        const float silu = round_trip(gi / (1.f + std::exp(-gi)), scalar_t());
        o[i] = round_to(silu * to_float(u[i]), scalar_t());
      }
    }
  });
}

void check_dtype(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16");
}

// ATen's dispatch over the two dtypes these ops have: the lambda sees the C++ type as scalar_t.
#define DISPATCH_FLOAT_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

// x: (..., H) float32 or bfloat16, weight: (H,) of x's dtype -> weight * x / sqrt(mean(x^2) + eps), x's shape.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_dtype(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == x.scalar_type() && weight.size(0) == x.size(-1),
              "weight must be (hidden,) in x's dtype");
  x = x.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(x);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, H,
                  static_cast<float>(eps));
  });
  return out;
}

// x, h: (T, H) contiguous, one dtype: x += h (rounded to the dtype) in place; returns rms_norm(x, weight, eps).
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor h, torch::Tensor weight, double eps) {
  check_dtype(x, "x");
  TORCH_CHECK(x.is_contiguous() && h.is_contiguous() && x.sizes() == h.sizes() && h.scalar_type() == x.scalar_type(),
              "x and h must be contiguous tensors of one shape and dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == x.scalar_type() && weight.size(0) == x.size(-1) &&
                  weight.is_contiguous(),
              "weight must be (hidden,) in x's dtype");
  auto out = torch::empty_like(x);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  DISPATCH_FLOAT_BF16(x.scalar_type(), "add_rms_norm_", [&] {
    add_rms_norm_rows(x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), rows, H, static_cast<float>(eps));
  });
  return out;
}

// qkv: (T, (H + 2 Hkv) D) contiguous (q heads, k heads, v heads), cos, sin: (T, D), k_cache, v_cache: (slots, Hkv,
// D) contiguous, slots: (T,) int64, all of one dtype but slots -> q (T, H, D) rotated; k rotated and v stored at
// each row's slot.
torch::Tensor rotary_write_kv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                              torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  check_dtype(qkv, "qkv");
  const int64_t T = qkv.size(0), Hkv = k_cache.size(1), D = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (heads + 2 * Hkv) * D && D % 2 == 0,
              "qkv must be (T, (heads + 2 kv_heads) head_dim), contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must be (T, head_dim) in qkv's dtype, contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.dim() == 3 && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "k_cache and v_cache must be (slots, kv_heads, head_dim) in qkv's dtype, contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be (T,) int64");
  auto q = torch::empty({T, heads, D}, qkv.options());
  DISPATCH_FLOAT_BF16(qkv.scalar_type(), "rotary_write_kv", [&] {
    rotary_rows(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), T, heads, Hkv, D);
  });
  return q;
}

// gate_up: (T, 2 I) contiguous, gate then up -> silu(gate) * up (T, I).
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_dtype(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be (T, 2 intermediate), contiguous");
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({rows, I}, gate_up.options());
  DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_rows(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, I);
  });
  return out;
}

// Row r of logits (a float32 (B, V) matrix, rows `stride` apart: a slice of a padded vocabulary is one) ->
// the index of its first largest value, as torch.argmax (a NaN counts as the largest). torch's own takes ~27 us per
// 32,000-entry row here, near scalar speed; this reads the row once, vectorised, in chunks (below): ~5 us.
// It compares integer keys, not floats: this file is built with -ffast-math, under which the compiler may assume
// no NaN and no infinity (a row of -inf, every token banned, is a real case).
inline bool is_nan_bits(float v) { return (__builtin_bit_cast(uint32_t, v) & 0x7FFFFFFFu) > 0x7F800000u; }
inline int32_t order_key(float v) {  // ordered as the floats are (NaN aside), -0 equal to +0
  int32_t bits = __builtin_bit_cast(int32_t, v);
  bits = bits == INT32_MIN ? 0 : bits;
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be a float32 (rows, vocab) matrix with contiguous rows");
  const int64_t B = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  auto out = torch::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  // A row in chunks small enough to stay in L1: each chunk's maximum vectorised, and only a chunk that raises the
  // row's best is searched again (from L1) for where; so the row is read from memory once.
  constexpr int64_t kChunk = 2048;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * stride;
      int32_t best = INT32_MIN;
      int64_t best_index = 0;
      for (int64_t c = 0; c < V; c += kChunk) {
        const float* chunk = row + c;
        const int64_t n = std::min(kChunk, V - c);
        int32_t top = INT32_MIN;
        int32_t nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
        for (int64_t i = 0; i < n; ++i) {
          top = std::max(top, order_key(chunk[i]));
          nan |= static_cast<int32_t>(is_nan_bits(chunk[i]));
        }
        if (nan) {  // the first NaN is the answer
          int64_t i = 0;
          while (!is_nan_bits(chunk[i])) ++i;
          best_index = c + i;
          break;
        }
        if (top > best) {  // strictly larger: an equal maximum later does not move the first one
          int64_t i = 0;
          while (order_key(chunk[i]) != top) ++i;  // the maximum is one of the chunk's keys
          best = top;
          best_index = c + i;
        }
      }
      o[r] = best_index;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (float32 or bfloat16)", py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm_", &add_rms_norm_, "x += h in place, then RMSNorm of each row of x",
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_write_kv", &rotary_write_kv, "rotary embedding of q and k; k and v written to the KV cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of each row", py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "each row's index of its first largest value (float32 logits)",
        py::call_guard<py::gil_scoped_release>());
}

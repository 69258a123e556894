// Vectorised math for raytp's CPU ops (attention/paged_attention_cpu.cpp, linear_cpu.cpp), 16 float32 lanes at a
// time. cpu_ops.py hashes this file with each source, so a change here rebuilds them.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace raytp_math {

// exp(x) for x <= 0 (a score less its row's maximum; -|x|), 16 at a time: x = n ln2 + r with |r| <= ln2 / 2, e^r from
// its Taylor polynomial to degree 6 (relative error below 2e-7), times 2^n by vscalefps (which also takes e^x to 0
// far below the range of float32 without a separate clamp).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2's high bits: n * hi exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     // and the rest of ln2
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// silu(x) = x / (1 + e^-x), 16 at a time, from e = e^-|x| (never overflows): x / (1 + e) for x >= 0, x e / (1 + e)
// below.
inline __m512 silu(__m512 x) {
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
  const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                                                            _mm512_set1_ps(1.f), e),
                                       _mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mul_ps(x, sigmoid);
}

}  // namespace raytp_math
#endif

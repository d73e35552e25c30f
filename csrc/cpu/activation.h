// Vectorized fp32 activations and their derivatives, shared by the CPU kernels (bias_gelu and the
// fused epilogues of conv, causal_conv1d and text_cnn_pool).
//
// Codes (bignlp_fast/ops/_activation.py): 0 identity, 1 relu, 2 gelu (erf form), 3 silu, 4 tanh.
// Kernels are instantiated once per activation through dispatch_activation, so the inner loops hold
// no switch.
//
// GELU (erf form): with AVX-512 or AVX2, piecewise polynomials of the Gaussian tail, each lane's
// coefficients picked by a register permute (gelu_table.h: no erf, exp or division; within 1e-7 of
// float64, and about twice as fast as the erf route). Without either, ATen's erf approximation
// (Abramowitz & Stegun) with ATen's polynomial exp_u20, arranged so the backward's Gaussian comes from
// the exp erf already computes. tanh is ATen's (Sleef).
#pragma once

#include <type_traits>

#include <ATen/cpu/vec/vec.h>

#include "cpu/force_inline.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include "cpu/gelu_table.h"
#endif

namespace bignlp_fast::cpu {

namespace act_detail {
using fVec = at::vec::Vectorized<float>;
constexpr float kSqrt1_2 = 0.70710678118654752440f;    // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1/sqrt(2*pi)
}  // namespace act_detail

enum Activation : int { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4 };

#if defined(CPU_CAPABILITY_AVX512)
// 1 / d for d in [1, 2]: the 14-bit estimate and one Newton step (relative error ~2^-27, under an
// fp32 ulp), three instructions where a division keeps the divider busy for ~5 cycles a vector.
BIGNLP_FAST_VEC_INLINE __m512 reciprocal_1_2(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}
#endif

// 2^t for t <= 0, the exponent of a softmax (t = (s - max) * log2(e)). With AVX-512 or AVX2: t = n + f
// with n = round(t) and |f| <= 1/2, 2^f by a degree-5 polynomial (fitted to 2^f on [-1/2, 1/2];
// relative error 2.2e-7 in fp32, below exp_u20's), and 2^n applied by vscalefps (AVX-512) or a
// multiply by 2^n built from its exponent bits (AVX2); t <= -126, including the -inf of a masked key,
// gives exactly 0 (NaN stays NaN). Ten instructions against exp_u20's ~16. Elsewhere exp_u20.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace act_detail {
// t = n + f, n = round(t), |f| <= 1/2; returns q with 2^f ~ 1.0000001192 + f q (the fit's terms past
// the constant, shared by exp2_nonpositive and exp2m1_nonpositive). at::vec's round is vrndscaleps /
// vroundps to nearest.
BIGNLP_FAST_VEC_INLINE fVec exp2_split(const fVec& t, fVec& n, fVec& f) {
  n = t.round();
  f = t - n;
  fVec q(1.3266970636323094e-3f);
  q = at::vec::fmadd(q, f, fVec(9.675459936261177e-3f));
  q = at::vec::fmadd(q, f, fVec(5.550742521882057e-2f));
  q = at::vec::fmadd(q, f, fVec(2.4022121727466583e-1f));
  return at::vec::fmadd(q, f, fVec(6.931469440460205e-1f));
}
}  // namespace act_detail
#endif
#if defined(CPU_CAPABILITY_AVX2)
// AVX2 has no vscalefps: 2^n is built from its exponent bits (n in [-126, 0] where the result is
// kept; lanes outside are replaced by the callers' blends).
namespace act_detail {
BIGNLP_FAST_VEC_INLINE __m256 pow2i(__m256 n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
// t > -126 or t NaN: the lanes whose result is computed rather than set
BIGNLP_FAST_VEC_INLINE __m256 above_m126(__m256 t) { return _mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_NLE_UQ); }
}  // namespace act_detail
#endif
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> exp2_nonpositive(const at::vec::Vectorized<float>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  act_detail::fVec n, f;
  const __m512 q = act_detail::exp2_split(t, n, f);
  const __m512 p = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_NLE_UQ), p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  act_detail::fVec n, f;
  const __m256 q = act_detail::exp2_split(t, n, f);
  const __m256 p = _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0000001192092896f));
  return _mm256_and_ps(act_detail::above_m126(t), _mm256_mul_ps(p, act_detail::pow2i(n)));
#else
  return (t * at::vec::Vectorized<float>(0.69314718055994531f)).exp_u20();
#endif
}
constexpr float kLog2e = 1.44269504088896340736f;

// 2^t - 1 for t <= 0 without the cancellation of 2^t - 1 near t = 0: (2^n - 1) + 2^n (f q), where
// 2^n - 1 is exact and f q carries 2^f - 1 to its own relative precision (a tanh of a tiny v
// stays tiny). t <= -126 gives -1 exactly; NaN stays NaN. AVX-512 and AVX2 only.
#if defined(CPU_CAPABILITY_AVX512)
BIGNLP_FAST_VEC_INLINE __m512 exp2m1_nonpositive(__m512 t) {
  act_detail::fVec n, f;
  const __m512 q = act_detail::exp2_split(act_detail::fVec(t), n, f);
  const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(1.f), n);  // 2^n
  const __m512 em1 = _mm512_fmadd_ps(s, _mm512_mul_ps(f, q), _mm512_sub_ps(s, _mm512_set1_ps(1.f)));
  // far below (t = -inf included, where f is NaN): -1
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_NLE_UQ), _mm512_set1_ps(-1.f), em1);
}
#elif defined(CPU_CAPABILITY_AVX2)
BIGNLP_FAST_VEC_INLINE __m256 exp2m1_nonpositive(__m256 t) {
  act_detail::fVec n, f;
  const __m256 q = act_detail::exp2_split(act_detail::fVec(t), n, f);
  const __m256 s = act_detail::pow2i(n);
  const __m256 em1 = _mm256_fmadd_ps(s, _mm256_mul_ps(f, q), _mm256_sub_ps(s, _mm256_set1_ps(1.f)));
  return _mm256_blendv_ps(_mm256_set1_ps(-1.f), em1, act_detail::above_m126(t));
}
#endif

// sigmoid(v) = 1 / (1 + exp(-v)). With AVX-512 or AVX2: e = exp(-|v|) = 2^(-|v| log2 e) by
// exp2_nonpositive, r = 1 / (1 + e) with d in [1, 2] (reciprocal_1_2 under AVX-512, a division under
// AVX2, whose 12-bit estimate and one Newton step would miss by ~1.4e-7), and sigmoid = r for v >= 0,
// e r below: no overflow anywhere, ends exact (-inf gives 0, +inf 1), NaN stays NaN; within 2e-7 of
// float64. Elsewhere ATen's exp_u20 (a few ulp; it saturates at FLT_MAX
// for v < -88, giving 0 as it should). Sleef's exp costs about twice as much, and silu is what keeps
// the memory-bound causal conv from copy speed.
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> sigmoid(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m512 e = exp2_nonpositive(fVec(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-kLog2e))));
  const __m512 r = reciprocal_1_2(_mm512_add_ps(_mm512_set1_ps(1.f), e));
  return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e, r);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  const __m256 e = exp2_nonpositive(fVec(_mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), x), _mm256_set1_ps(-kLog2e))));
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
#else
  return fVec(1.f) / (fVec(1.f) + (fVec(0.f) - v).exp_u20());
#endif
}

// tanh(v) = sign(v) (1 - e) / (1 + e) with e = exp(-2|v|) under AVX-512 or AVX2, 1 - e from
// exp2m1_nonpositive (within 1.4e-7 absolute of tanh, and a tiny v gives a tiny tanh; NaN stays NaN);
// elsewhere 1 - 2 / (exp(2v) + 1) on exp_u20 (within ~1e-7 absolute; the relative error grows near 0,
// and exp_u20's clamp turns NaN into 1), about 3x cheaper than Sleef's tanh. Both ends saturate correctly.
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> tanh_fast(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m512 em1 = exp2m1_nonpositive(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-2.f * kLog2e)));  // e - 1
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), em1),
                                 reciprocal_1_2(_mm512_add_ps(_mm512_set1_ps(2.f), em1)));  // (1 - e) / (1 + e)
  // the sign of x onto |tanh|; NaN: a is NaN, e and t follow
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(t), _mm512_castps_si512(x),
                                                       _mm512_set1_epi32(0x7fffffff), 0xe4));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v, sign = _mm256_set1_ps(-0.f);
  const __m256 em1 = exp2m1_nonpositive(_mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(-2.f * kLog2e)));
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(_mm256_setzero_ps(), em1), _mm256_add_ps(_mm256_set1_ps(2.f), em1));
  return _mm256_or_ps(t, _mm256_and_ps(sign, x));  // t >= 0 or NaN; the sign of x onto it
#else
  return fVec(1.f) - fVec(2.f) / ((v + v).exp_u20() + fVec(1.f));
#endif
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// For a = |v|: the tail polynomial (a gelu_table.h table, one interval per lane) at a, 0 past kAMax.
// NaN stays NaN: min keeps a NaN second operand, and t carries it into the polynomial.
#if defined(CPU_CAPABILITY_AVX512)
template <int C>
BIGNLP_FAST_VEC_INLINE __m512 gaussian_tail(__m512 v, const float (&table)[C][16]) {
  const __m512 a = _mm512_min_ps(_mm512_set1_ps(gelu_table::kAMax), _mm512_abs_ps(v));
  const __m512 u = _mm512_mul_ps(a, _mm512_set1_ps(16 / gelu_table::kAMax));
  const __m512i idx = _mm512_min_epi32(_mm512_cvttps_epi32(u), _mm512_set1_epi32(15));
  const __m512 t = _mm512_fmsub_ps(_mm512_sub_ps(u, _mm512_cvtepi32_ps(idx)), _mm512_set1_ps(2.f), _mm512_set1_ps(1.f));
  __m512 acc = _mm512_permutexvar_ps(idx, _mm512_load_ps(table[C - 1]));
  for (int k = C - 2; k >= 0; --k) acc = _mm512_fmadd_ps(acc, t, _mm512_permutexvar_ps(idx, _mm512_load_ps(table[k])));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(gelu_table::kAMax), _CMP_GE_OQ), acc,
                              _mm512_setzero_ps());
}
// tail for v < 0, 1 - tail otherwise.
BIGNLP_FAST_VEC_INLINE __m512 mirror_tail(__m512 v, __m512 tail) {
  const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.f), tail), tail);
}
#else
template <int C>
BIGNLP_FAST_VEC_INLINE __m256 gaussian_tail(__m256 v, const float (&table)[C][8]) {
  const __m256 a = _mm256_min_ps(_mm256_set1_ps(gelu_table::kAMax), _mm256_andnot_ps(_mm256_set1_ps(-0.f), v));
  const __m256 u = _mm256_mul_ps(a, _mm256_set1_ps(8 / gelu_table::kAMax));
  const __m256i idx = _mm256_min_epi32(_mm256_cvttps_epi32(u), _mm256_set1_epi32(7));
  const __m256 t = _mm256_fmsub_ps(_mm256_sub_ps(u, _mm256_cvtepi32_ps(idx)), _mm256_set1_ps(2.f), _mm256_set1_ps(1.f));
  __m256 acc = _mm256_permutevar8x32_ps(_mm256_load_ps(table[C - 1]), idx);
  for (int k = C - 2; k >= 0; --k) acc = _mm256_fmadd_ps(acc, t, _mm256_permutevar8x32_ps(_mm256_load_ps(table[k]), idx));
  return _mm256_blendv_ps(acc, _mm256_setzero_ps(), _mm256_cmp_ps(a, _mm256_set1_ps(gelu_table::kAMax), _CMP_GE_OQ));
}
BIGNLP_FAST_VEC_INLINE __m256 mirror_tail(__m256 v, __m256 tail) {
  const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), tail), tail, negative);
}
#endif

// The tail tables of each ISA (gelu_table.h): for fp32 results 16 intervals of degree 5 (AVX-512) or
// 8 of degree 7 (AVX2), ~5e-8 from float64. For results rounded to bfloat16, shorter ones: AVX-512's
// "16d3" within 3.6e-6 (q) and 1.8e-5 (r) of float64 relative to max(1, |value|), below bf16's rounding
// of values near 1 by 1000x (tiny values of the negative tail can land a few bf16 steps off: 1.3% of
// all bf16 inputs in [-10, 10] are not correctly rounded, 2.1% for torch's bf16 GELU; bias_gelu's bf16
// forward, one Zen 5 core: 13.4-15.1 -> 10.7-11.4 cycles per 16 values); AVX2's "8d4" for q (3.5e-6)
// and "8d5" for r (1.8e-6), three and two permutes and FMAs a vector fewer than degree 7 (Zen 3:
// bias_gelu's bf16 forward 1.32x).
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr const auto& kTailQ = gelu_table::kTailQ16;
inline constexpr const auto& kTailR = gelu_table::kTailR16;
inline constexpr const auto& kTailQBf16 = gelu_table::kTailQ16d3;
inline constexpr const auto& kTailRBf16 = gelu_table::kTailR16d3;
#else
inline constexpr const auto& kTailQ = gelu_table::kTailQ8;
inline constexpr const auto& kTailR = gelu_table::kTailR8;
inline constexpr const auto& kTailQBf16 = gelu_table::kTailQ8d4;
inline constexpr const auto& kTailRBf16 = gelu_table::kTailR8d5;
#endif

// gelu(v) = v Phi(v), Phi(v) = 1 - q(|v|) or q(|v|), with the q table given.
template <typename Table>
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_with(const at::vec::Vectorized<float>& v, const Table& q) {
  return v * at::vec::Vectorized<float>(mirror_tail(v, gaussian_tail(v, q)));
}
// gelu'(v) = Phi(v) + v phi(v) = 1 - r(|v|) or r(|v|), with the r table given.
template <typename Table>
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_grad_with(const at::vec::Vectorized<float>& v, const Table& r) {
  return mirror_tail(v, gaussian_tail(v, r));
}
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf(const at::vec::Vectorized<float>& v) { return gelu_with(v, kTailQ); }
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_grad(const at::vec::Vectorized<float>& v) {
  return gelu_grad_with(v, kTailR);
}
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_bf16(const at::vec::Vectorized<float>& v) {
  return gelu_with(v, kTailQBf16);
}
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_grad_bf16(const at::vec::Vectorized<float>& v) {
  return gelu_grad_with(v, kTailRBf16);
}
#else
// erf(v / sqrt(2)) and exp(-v^2 / 2) together. Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7):
// erf(|x|) = 1 - t * poly(t) * exp(-x^2), t = 1 / (1 + p |x|); with x = v / sqrt(2), exp(-x^2) is
// the Gaussian the GELU derivative needs, so one exp serves both.
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> erf_and_gauss(const at::vec::Vectorized<float>& v,
                                                at::vec::Vectorized<float>& gauss) {
  using act_detail::fVec;
  const fVec x = v * fVec(act_detail::kSqrt1_2);
  const fVec t = fVec(1.f) / at::vec::fmadd(fVec(0.3275911f), x.abs(), fVec(1.f));
  fVec poly = at::vec::fmadd(fVec(1.061405429f), t, fVec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, fVec(1.421413741f));
  poly = at::vec::fmadd(poly, t, fVec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, fVec(0.254829592f)) * t;
  gauss = (fVec(-0.5f) * v * v).exp_u20();  // 2-ulp exp: far below the approximation's own error
  const fVec erf_abs = fVec(1.f) - poly * gauss;
  return fVec::blendv(erf_abs, fVec(0.f) - erf_abs, x < fVec(0.f));
}

BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  fVec gauss;
  return fVec(0.5f) * v * (fVec(1.f) + erf_and_gauss(v, gauss));
}

BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_grad(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  fVec gauss;
  const fVec cdf = fVec(0.5f) * (fVec(1.f) + erf_and_gauss(v, gauss));
  return at::vec::fmadd(v * fVec(act_detail::kInvSqrt2Pi), gauss, cdf);
}
#endif

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_bf16(const at::vec::Vectorized<float>& v) { return gelu_erf(v); }
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> gelu_erf_grad_bf16(const at::vec::Vectorized<float>& v) { return gelu_erf_grad(v); }
#endif

template <int A>
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> activate(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  if constexpr (A == kRelu) {
    return at::vec::maximum(v, fVec(0.f));
  } else if constexpr (A == kGelu) {
    return gelu_erf(v);
  } else if constexpr (A == kSilu) {
    return v * sigmoid(v);
  } else if constexpr (A == kTanh) {
    return v.tanh();
  } else {
    return v;
  }
}

// d activate<A>(v) / dv (relu's is 0 at 0, as torch's).
template <int A>
BIGNLP_FAST_VEC_INLINE at::vec::Vectorized<float> activate_grad(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  if constexpr (A == kRelu) {
    return fVec::blendv(fVec(0.f), fVec(1.f), v > fVec(0.f));
  } else if constexpr (A == kGelu) {
    return gelu_erf_grad(v);
  } else if constexpr (A == kSilu) {
    const fVec s = sigmoid(v);
    return s * at::vec::fmadd(v, fVec(1.f) - s, fVec(1.f));
  } else if constexpr (A == kTanh) {
    const fVec t = v.tanh();
    return fVec(1.f) - t * t;
  } else {
    return fVec(1.f);
  }
}

// Calls f(std::integral_constant<int, A>{}) for the runtime code, so f's body is compiled per activation.
template <typename F>
inline void dispatch_activation(int64_t code, F&& f) {
  switch (code) {
    case kIdentity: f(std::integral_constant<int, kIdentity>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kSilu: f(std::integral_constant<int, kSilu>{}); break;
    case kTanh: f(std::integral_constant<int, kTanh>{}); break;
    default: TORCH_CHECK(false, "activation code must be 0..4 (none, relu, gelu, silu, tanh), got ", code);
  }
}

}  // namespace bignlp_fast::cpu

// Vectorized fp32 activations and their derivatives, shared by the CPU kernels (bias_gelu and the
// fused epilogues of conv, causal_conv1d and text_cnn_pool).
//
// Codes (bignlp_fast/ops/_activation.py): 0 identity, 1 relu, 2 gelu (erf form), 3 silu, 4 tanh.
// Kernels are instantiated once per activation through dispatch_activation, so the inner loops hold
// no switch.
//
// erf uses the same approximation as ATen's vectorized erf (PyTorch's own CPU GELU) with ATen's
// polynomial exp_u20, arranged so the backward's Gaussian comes from the exp erf already computes;
// tanh is ATen's (Sleef).
#pragma once

#include <type_traits>

#include <ATen/cpu/vec/vec.h>

namespace bignlp_fast::cpu {

namespace act_detail {
using fVec = at::vec::Vectorized<float>;
constexpr float kSqrt1_2 = 0.70710678118654752440f;    // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1/sqrt(2*pi)
}  // namespace act_detail

enum Activation : int { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4 };

// erf(v / sqrt(2)) and exp(-v^2 / 2) together. Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7):
// erf(|x|) = 1 - t * poly(t) * exp(-x^2), t = 1 / (1 + p |x|); with x = v / sqrt(2), exp(-x^2) is
// the Gaussian the GELU derivative needs, so one exp serves both.
inline at::vec::Vectorized<float> erf_and_gauss(const at::vec::Vectorized<float>& v,
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

// sigmoid(v) = 1 / (1 + exp(-v)) with ATen's polynomial exp_u20 (a few ulp; it saturates at FLT_MAX
// for v < -88, giving 0 as it should). Sleef's exp costs about twice as much, and silu is what keeps
// the memory-bound causal conv from copy speed.
inline at::vec::Vectorized<float> sigmoid(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  return fVec(1.f) / (fVec(1.f) + (fVec(0.f) - v).exp_u20());
}

template <int A>
inline at::vec::Vectorized<float> activate(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  if constexpr (A == kRelu) {
    return at::vec::maximum(v, fVec(0.f));
  } else if constexpr (A == kGelu) {
    fVec gauss;
    return fVec(0.5f) * v * (fVec(1.f) + erf_and_gauss(v, gauss));
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
inline at::vec::Vectorized<float> activate_grad(const at::vec::Vectorized<float>& v) {
  using act_detail::fVec;
  if constexpr (A == kRelu) {
    return fVec::blendv(fVec(0.f), fVec(1.f), v > fVec(0.f));
  } else if constexpr (A == kGelu) {
    fVec gauss;
    const fVec cdf = fVec(0.5f) * (fVec(1.f) + erf_and_gauss(v, gauss));
    return at::vec::fmadd(v * fVec(act_detail::kInvSqrt2Pi), gauss, cdf);
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

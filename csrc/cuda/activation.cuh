// The activations a fused CUDA epilogue can apply (conv, causal_conv1d), and their derivatives, in
// fp32: act<ACT>(v) and act_grad<ACT>(v) with ACT a compile-time code as in
// bignlp_fast/ops/_activation.py: 0 none, 1 relu, 2 gelu (erf form), 3 silu, 4 tanh.
// dispatch_activation turns the runtime code into a compile-time one once per launch, so a kernel is
// instantiated per activation and has no per-element switch.
//
// --use_fast_math (set by setup.py) turns expf into ex2.approx(x * log2(e)), tanhf into tanh.approx
// (about 11 bits) and '/' into an approximate division, so none of them is used here: exp goes through
// an argument reduction (act_exp_nonpositive), tanh is built on it (and a series near 0), and the only
// quotients, by 1 + e with e in [0, 1], use act_rcp (no special cases to handle, and unlike __frcp_rn
// no call to a slow path, which makes ptxas spill). erff is not affected.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/Exception.h>

namespace bignlp_fast::cuda {

enum ActivationCode : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3, kActTanh = 4 };

// exp(x) for x <= 0 to a few ulp, whatever --use_fast_math does to expf: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two so that n * ln2_hi is exact) leaves ex2.approx a small argument,
// and ldexpf scales by 2^n exactly.
__device__ __forceinline__ float act_exp_nonpositive(float x) {
  x = fmaxf(x, -104.f);  // exp(-104) rounds to 0 in fp32; keeps n in int range
  const float n = rintf(x * 1.44269504f);
  float r = fmaf(n, -0.693145752f, x);  // ln2_hi = 0x3f317200
  r = fmaf(n, -1.42860677e-6f, r);      // ln2_lo = ln2 - ln2_hi
  return ldexpf(exp2f(r * 1.44269504f), static_cast<int>(n));
}

// 1 / d for d in [1, 2]: rcp.approx (within 1 ulp) refined by one Newton step, to about 0.5 ulp.
__device__ __forceinline__ float act_rcp(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return fmaf(r, fmaf(-d, r, 1.f), r);
}

// tanh(v) to a few ulp. |v| < 0.25: the odd series up to v^11 (truncation below 1e-9 relative);
// else (1 - e) / (1 + e) with e = exp(-2|v|) <= 0.61, so 1 - e loses nothing. NaN stays NaN.
__device__ __forceinline__ float act_tanh(float v) {
  const float a = fabsf(v);
  if (a < 0.25f) {
    const float v2 = v * v;
    float p = -1382.f / 155925.f;
    p = fmaf(p, v2, 62.f / 2835.f);
    p = fmaf(p, v2, -17.f / 315.f);
    p = fmaf(p, v2, 2.f / 15.f);
    p = fmaf(p, v2, -1.f / 3.f);
    return fmaf(v, v2 * p, v);
  }
  if (isnan(v)) return v;
  const float e = act_exp_nonpositive(-2.f * a);
  return copysignf((1.f - e) * act_rcp(1.f + e), v);
}

// sigmoid(v) and 1 - sigmoid(v), each without cancellation: with e = exp(-|v|) in (0, 1],
// sigmoid = 1 / (1 + e) for v >= 0 and e / (1 + e) for v < 0. NaN gives NaN (fmaxf in
// act_exp_nonpositive would drop it: e = exp(-104), and sigmoid(NaN) would be 0).
__device__ __forceinline__ void act_sigmoid(float v, float& sig, float& one_minus_sig) {
  if (isnan(v)) {
    sig = one_minus_sig = v;
    return;
  }
  const float e = act_exp_nonpositive(-fabsf(v));
  const float r = act_rcp(1.f + e);
  const bool pos = v >= 0.f;
  sig = pos ? r : e * r;
  one_minus_sig = pos ? e * r : r;
}

constexpr float kActSqrtHalf = 0.7071067811865476f;    // 1 / sqrt(2)
constexpr float kActInvSqrt2Pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)

// act(v).
template <int ACT>
__device__ __forceinline__ float act(float v) {
  static_assert(ACT >= kActNone && ACT <= kActTanh, "activation code must be 0..4");
  if constexpr (ACT == kActRelu) {
    return v < 0.f ? 0.f : v;  // NaN passes through, as torch.relu
  } else if constexpr (ACT == kActGelu) {
    return v * (0.5f * (1.f + erff(v * kActSqrtHalf)));  // v Phi(v)
  } else if constexpr (ACT == kActSilu) {
    float sig, unused;
    act_sigmoid(v, sig, unused);
    return v * sig;
  } else if constexpr (ACT == kActTanh) {
    return act_tanh(v);
  } else {
    return v;
  }
}

// d act(v) / dv (relu' is 0 at 0, as torch's).
template <int ACT>
__device__ __forceinline__ float act_grad(float v) {
  static_assert(ACT >= kActNone && ACT <= kActTanh, "activation code must be 0..4");
  if constexpr (ACT == kActRelu) {
    return v > 0.f ? 1.f : 0.f;
  } else if constexpr (ACT == kActGelu) {
    // Phi(v) + v phi(v), phi(v) = exp(-v^2 / 2) / sqrt(2 pi).
    const float cdf = 0.5f * (1.f + erff(v * kActSqrtHalf));
    return cdf + v * kActInvSqrt2Pi * act_exp_nonpositive(-0.5f * v * v);
  } else if constexpr (ACT == kActSilu) {
    // sigmoid(v) (1 + v (1 - sigmoid(v))).
    float sig, one_minus_sig;
    act_sigmoid(v, sig, one_minus_sig);
    return sig * fmaf(v, one_minus_sig, 1.f);
  } else if constexpr (ACT == kActTanh) {
    const float t = act_tanh(v);
    return fmaf(-t, t, 1.f);
  } else {
    return 1.f;
  }
}

// Calls f(std::integral_constant<int, ACT>()) for the runtime code `activation` (0..4); any other
// code is an error naming `op`.
// The same with a runtime code: for memory-bound kernels, where a warp-uniform switch per element
// costs nothing measurable and one instantiation instead of five keeps the build short.
__device__ __forceinline__ float act_any(int code, float v) {
  switch (code) {
    case kActRelu: return act<kActRelu>(v);
    case kActGelu: return act<kActGelu>(v);
    case kActSilu: return act<kActSilu>(v);
    case kActTanh: return act<kActTanh>(v);
    default: return v;
  }
}

__device__ __forceinline__ float act_grad_any(int code, float v) {
  switch (code) {
    case kActRelu: return act_grad<kActRelu>(v);
    case kActGelu: return act_grad<kActGelu>(v);
    case kActSilu: return act_grad<kActSilu>(v);
    case kActTanh: return act_grad<kActTanh>(v);
    default: return 1.f;
  }
}

template <typename F>
void dispatch_activation(int64_t activation, const char* op, const F& f) {
  switch (activation) {
    case kActNone: f(std::integral_constant<int, kActNone>()); break;
    case kActRelu: f(std::integral_constant<int, kActRelu>()); break;
    case kActGelu: f(std::integral_constant<int, kActGelu>()); break;
    case kActSilu: f(std::integral_constant<int, kActSilu>()); break;
    case kActTanh: f(std::integral_constant<int, kActTanh>()); break;
    default:
      TORCH_CHECK(false, op, ": activation code must be 0 (none), 1 (relu), 2 (gelu), 3 (silu) or 4 (tanh), got ",
                  activation);
  }
}

}  // namespace bignlp_fast::cuda

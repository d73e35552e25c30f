// bias_gelu on the CPU: y = gelu(x + bias), erf or tanh form.
//
// Forward reads x once and writes y once. Backward reads grad_y and x once and writes grad_x once,
// summing grad_x into per-chunk bias-gradient partials on the way (deterministic, see common.h).
// Both prefetch ahead in software (common.h: the GELU arithmetic otherwise leaves a core waiting).
// The erf form's arithmetic is cpu/activation.h's (shared with the conv epilogues).
#include <cmath>
#include <type_traits>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

constexpr float kTanhScale = 0.79788456080286535588f;   // sqrt(2/pi)
constexpr float kTanhCubic = 0.044715f;

// The form is a template parameter: with a runtime flag tested per vector, the erf form's forward ran
// ~25% slower (0.83 against 0.65 ms for 8192x768 bf16 on the AMD EPYC of session 7). So is the output
// dtype: the erf form of a result rounded to bf16 takes the shorter polynomials (activation.h).
template <bool kTanhApprox, typename T>
inline fVec gelu(const fVec& v) {
  const fVec half(0.5f), one(1.f);
  if constexpr (kTanhApprox) {
    const fVec inner = fVec(kTanhScale) * at::vec::fmadd(fVec(kTanhCubic) * v, v * v, v);
    return half * v * (one + inner.tanh());
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return cpu::gelu_erf_bf16(v);
  }
  return cpu::activate<cpu::kGelu>(v);
}

template <bool kTanhApprox, typename T>
inline fVec gelu_grad(const fVec& v) {
  const fVec half(0.5f), one(1.f);
  if constexpr (kTanhApprox) {
    const fVec v2 = v * v;
    const fVec t = (fVec(kTanhScale) * at::vec::fmadd(fVec(kTanhCubic) * v, v2, v)).tanh();
    const fVec dinner = fVec(kTanhScale) * at::vec::fmadd(fVec(3.f * kTanhCubic), v2, one);
    return half * (one + t) + half * v * (one - t * t) * dinner;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return cpu::gelu_erf_grad_bf16(v);
  }
  return cpu::activate_grad<cpu::kGelu>(v);
}

// f(std::bool_constant<tanh_approx>{}): the loops compiled once per form.
template <typename F>
inline void dispatch_form(bool tanh_approx, F&& f) {
  if (tanh_approx) f(std::true_type{});
  else f(std::false_type{});
}

// The loops over rows, as functions of their own: every pointer and size a local value. Read through
// a parallel_for lambda's captured references, each is loaded again after every vector store (the
// intrinsics' vector types may alias anything; see add_layer_norm.cpp: bwd_chunks).
// Rows [r0, r1) of the forward; b is the fp32 bias in split lane order.
template <bool kTanhApprox, typename T>
void fwd_rows(int64_t r0, int64_t r1, const T* xp, const float* b, T* yp, int64_t H, bool stream) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < H; j += kStep) {
      cpu::prefetch_ahead(xp + r * H + j);
      if (!stream) cpu::prefetch_ahead(yp + r * H + j, /*for_write=*/true);
      fVec a, c;
      cpu::load2_split(xp + r * H + j, H - j, a, c);
      a = gelu<kTanhApprox, T>(a + fVec::loadu(b + j));
      c = gelu<kTanhApprox, T>(c + fVec::loadu(b + j + fVec::size()));
      cpu::store2_split(yp + r * H + j, H - j, a, c, stream);
    }
  }
  cpu::stream_fence();
}

// Chunks [c0, c1) of `chunk` rows of the backward; each chunk's bias gradient to pdb_all + c * Hp
// (when pdb_all is given).
template <bool kTanhApprox, typename T>
void bwd_chunks(int64_t c0, int64_t c1, const T* xp, const T* gp, const float* b, T* dxp, float* pdb_all, int64_t rows,
                int64_t H, int64_t chunk, bool stream) {
  const int64_t Hp = cpu::round_up_to_step(H);
  for (int64_t c = c0; c < c1; ++c) {
    float* pdb = pdb_all ? pdb_all + c * Hp : nullptr;
    if (pdb) std::fill(pdb, pdb + Hp, 0.f);  // the caller's buffer is uninitialised (see bias_gelu_bwd_cpu)
    for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
      for (int64_t j = 0; j < H; j += kStep) {
        const int64_t h = fVec::size();
        cpu::prefetch_ahead(xp + r * H + j);
        cpu::prefetch_ahead(gp + r * H + j);
        if (!stream) cpu::prefetch_ahead(dxp + r * H + j, /*for_write=*/true);
        fVec xa, xc, ga, gc;
        cpu::load2_split(xp + r * H + j, H - j, xa, xc);
        cpu::load2_split(gp + r * H + j, H - j, ga, gc);
        const fVec da = ga * gelu_grad<kTanhApprox, T>(xa + fVec::loadu(b + j));
        const fVec dc = gc * gelu_grad<kTanhApprox, T>(xc + fVec::loadu(b + j + h));
        cpu::store2_split(dxp + r * H + j, H - j, da, dc, stream);
        if (pdb) {  // padding lanes have grad_y = 0, so they add nothing
          (fVec::loadu(pdb + j) + da).store(pdb + j);
          (fVec::loadu(pdb + j + h) + dc).store(pdb + j + h);
        }
      }
    }
    if (pdb) cpu::split_columns<T>(pdb, Hp, /*back=*/true);  // this chunk's partial sums back in column order
  }
  cpu::stream_fence();
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias, const char* xname) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "bias_gelu: ", xname,
              " must be a contiguous 2-D CPU tensor, got shape ", x.sizes(), " on ", x.device());
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous(),
                "bias_gelu: bias must be a contiguous CPU vector of size ", x.size(1), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias_gelu: bias has dtype ", bias->scalar_type(),
                " but ", xname, " has ", x.scalar_type());
  }
}

}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_inputs(x, bias, "x");
  const int64_t rows = x.size(0), H = x.size(1), Hp = cpu::round_up_to_step(H);
  at::Tensor y = cpu::cached_empty_like(x);
  at::Tensor b32 = at::empty({Hp}, x.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "bias_gelu_fwd_cpu", [&] {
    using T = scalar_t;
    float* b = b32.data_ptr<float>();
    cpu::to_padded_float(bias ? bias->const_data_ptr<T>() : nullptr, H, b, Hp, 0.f);
    cpu::split_columns<T>(b, Hp);  // rows are read and written in split lane order (common.h)
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const bool stream = cpu::stream_ok(yp, H * sizeof(T), rows * H * static_cast<int64_t>(sizeof(T)));
    dispatch_form(tanh_approx, [&](auto form) {
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(Hp, 1)), [&](int64_t r0, int64_t r1) {
        fwd_rows<decltype(form)::value, T>(r0, r1, xp, b, yp, H, stream);
      });
    });
  });
  return y;
}

std::vector<at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                          const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_inputs(x, bias, "x");
  check_inputs(grad_y, std::nullopt, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "bias_gelu: grad_y must match x (", x.sizes(), ", ", x.scalar_type(), "), got ", grad_y.sizes(), ", ",
              grad_y.scalar_type());
  const int64_t rows = x.size(0), H = x.size(1), Hp = cpu::round_up_to_step(H);
  const int64_t chunk = cpu::rows_per_chunk(rows);
  const int64_t n_chunks = std::max<int64_t>(1, (rows + chunk - 1) / chunk);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = cpu::cached_empty_like(x);
  at::Tensor b32 = at::empty({Hp}, f32);
  // Each chunk zeroes its own row, in L1 just before adding to it: at::zeros was a separate pass over
  // fresh pages (glibc maps a buffer this size anew each call).
  at::Tensor partial = bias ? cpu::cached_empty({n_chunks, Hp}, f32) : at::Tensor();
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "bias_gelu_bwd_cpu", [&] {
    using T = scalar_t;
    float* b = b32.data_ptr<float>();
    cpu::to_padded_float(bias ? bias->const_data_ptr<T>() : nullptr, H, b, Hp, 0.f);
    cpu::split_columns<T>(b, Hp);  // split lane order, as the forward
    const T* xp = x.const_data_ptr<T>();
    const T* gp = grad_y.const_data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
    float* pdb_all = bias ? partial.data_ptr<float>() : nullptr;
    const bool stream = cpu::stream_ok(dxp, H * sizeof(T), rows * H * static_cast<int64_t>(sizeof(T)));
    dispatch_form(tanh_approx, [&](auto form) {
      at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
        bwd_chunks<decltype(form)::value, T>(c0, c1, xp, gp, b, dxp, pdb_all, rows, H, chunk, stream);
      });
    });
  });
  at::Tensor db = bias ? cpu::reduce_partials(partial, H, x.scalar_type()) : at::empty({0}, x.options());
  return {dx, db};
}

}  // namespace bignlp_fast

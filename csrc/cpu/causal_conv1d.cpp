// Depthwise causal conv1d on the CPU, widths 2-4, with fused bias and activation:
//   y[b, c, t] = act(bias[c] + sum_j w[c, j] * xx[b, c, t + j]),  xx = cat(initial_state, x).
//
// Each (b, c) row is independent: the forward streams x once and writes y once, W shifted vector
// loads per step (they hit L1), so it runs at the speed of a copy. The backward recomputes the
// pre-activation, keeps gp = grad_y * act'(pre) for the row in a zero-padded buffer, and writes
// grad_x[t] = sum_j w[j] gp[t + W-1 - j]; the weight and bias gradients are per-row fp32 partials
// summed over the batch in a fixed order (deterministic).
#include <vector>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& init) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(), "causal_conv1d: x must be a contiguous ",
              "[B, C, L] CPU tensor, got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) >= 2 && w.size(1) <= 4 && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d: weight must be a contiguous [C, W] tensor of x's dtype with W in 2..4, got ", w.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "causal_conv1d: bias must be a contiguous [C] vector of x's dtype, got ", bias->sizes());
  }
  if (init) {
    TORCH_CHECK(init->dim() == 3 && init->size(0) == x.size(0) && init->size(1) == x.size(1) &&
                    init->size(2) == w.size(1) - 1 && init->is_contiguous() && init->scalar_type() == x.scalar_type(),
                "causal_conv1d: initial_state must be a contiguous [B, C, W-1] tensor of x's dtype, got ",
                init->sizes());
  }
}

// One row of xx = cat(head, x) as fp32, with room for vector over-reads: [W-1 + L + kStep].
template <int W, typename T>
void load_row(const T* head, const T* x, int64_t L, cpu::LineVector<float>& xx) {
  xx.assign(W - 1 + L + kStep, 0.f);
  if (head) cpu::to_float(head, xx.data(), W - 1);
  cpu::to_float(x, xx.data() + W - 1, L);
}

// Rows [r0, r1) (r = b * C + c) of the forward. The loops over rows of both passes are functions of
// their own, so that every pointer and size is a local value: read through parallel_for's captured
// references, each would be loaded again after every vector store (see add_layer_norm.cpp: bwd_chunks).
template <int W, int A, typename T>
void forward_rows(int64_t r0, int64_t r1, const T* x, const T* w, const T* bias, const T* init, T* y, int64_t C,
                  int64_t L) {
  cpu::LineVector<float> xx;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    fVec wj[W];
    for (int j = 0; j < W; ++j) wj[j] = fVec(static_cast<float>(w[c * W + j]));
    const fVec b(bias ? static_cast<float>(bias[c]) : 0.f);
    const T* xr = x + r * L;
    T* yr = y + r * L;
    // y[t] reads xx[t .. t+W-1] = x[t-W+1 .. t]: from x itself once t >= W-1, from the head before.
    const int64_t head_steps = std::min<int64_t>(L, W - 1);
    if (head_steps > 0) {
      load_row<W>(init ? init + r * (W - 1) : static_cast<const T*>(nullptr), xr, std::min<int64_t>(L, kStep), xx);
      fVec a(b), cc(b);
      for (int j = 0; j < W; ++j) {
        a = at::vec::fmadd(wj[j], fVec::loadu(xx.data() + j), a);
        cc = at::vec::fmadd(wj[j], fVec::loadu(xx.data() + j + fVec::size()), cc);
      }
      cpu::store2_any(yr, std::min<int64_t>(L, kStep), cpu::activate<A>(a), cpu::activate<A>(cc));
    }
    for (int64_t t = std::min<int64_t>(L, kStep); t < L; t += kStep) {
      fVec a(b), cc(b);
      for (int j = 0; j < W; ++j) {
        fVec lo, hi;
        const int64_t s = t - (W - 1) + j;  // >= 0 here since t >= kStep > W - 1
        cpu::load2_any(xr + s, L - s, lo, hi);
        a = at::vec::fmadd(wj[j], lo, a);
        cc = at::vec::fmadd(wj[j], hi, cc);
      }
      cpu::store2_any(yr + t, L - t, cpu::activate<A>(a), cpu::activate<A>(cc));
    }
  }
}

template <int W, int A, typename T>
void forward(const T* x, const T* w, const T* bias, const T* init, T* y, int64_t B, int64_t C, int64_t L) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    forward_rows<W, A>(r0, r1, x, w, bias, init, y, C, L);
  });
}

// Rows [r0, r1) of the backward (see forward_rows).
template <int W, int A, typename T>
void backward_rows(int64_t r0, int64_t r1, const T* gy, const T* x, const T* w, const T* bias, const T* init, T* gx,
                   T* ginit, float* partial, int64_t C, int64_t L) {
  cpu::LineVector<float> xx, gpp;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    fVec wj[W];
    for (int j = 0; j < W; ++j) wj[j] = fVec(static_cast<float>(w[c * W + j]));
    const fVec b(bias ? static_cast<float>(bias[c]) : 0.f);
    load_row<W>(init ? init + r * (W - 1) : static_cast<const T*>(nullptr), x + r * L, L, xx);
    // gpp = [W-1 zeros, gp[0 .. L), zeros]: grad_xx[u] = sum_j w[j] gpp[u + W-1 - j] needs no bounds.
    gpp.assign(2 * (W - 1) + L + kStep, 0.f);
    const float* xd = xx.data();  // locals: the vectors' own pointers would be reloaded after each store
    float* gd = gpp.data();
    float* gp = gd + (W - 1);
    fVec dw[W], db(0.f);
    for (int j = 0; j < W; ++j) dw[j] = fVec(0.f);
    for (int64_t t = 0; t < L; t += fVec::size()) {
      const int64_t n = L - t;
      fVec pre(b);
      for (int j = 0; j < W; ++j) pre = at::vec::fmadd(wj[j], fVec::loadu(xd + t + j), pre);
      const fVec g = cpu::load_any(gy + r * L + t, n) * cpu::activate_grad<A>(pre);  // 0 past L
      cpu::store_any(gp + t, g, n);
      db = db + g;
      for (int j = 0; j < W; ++j) dw[j] = at::vec::fmadd(g, fVec::loadu(xd + t + j), dw[j]);
    }
    for (int j = 0; j < W; ++j) partial[r * (W + 1) + j] = cpu::hsum(dw[j]);
    partial[r * (W + 1) + W] = cpu::hsum(db);
    // grad_xx[u] for u in [0, W-1 + L): the head (initial_state) then x.
    auto grad_at = [&](int64_t u) {
      fVec acc(0.f);
      for (int j = 0; j < W; ++j) acc = at::vec::fmadd(wj[j], fVec::loadu(gd + u + (W - 1) - j), acc);
      return acc;
    };
    if (ginit) {
      float head[fVec::size()];
      grad_at(0).store(head);
      for (int u = 0; u < W - 1; ++u) ginit[r * (W - 1) + u] = static_cast<T>(head[u]);
    }
    for (int64_t t = 0; t < L; t += fVec::size()) cpu::store_any(gx + r * L + t, grad_at(t + W - 1), L - t);
  }
}

template <int W, int A, typename T>
void backward(const T* gy, const T* x, const T* w, const T* bias, const T* init, T* gx, T* ginit, float* partial,
              int64_t B, int64_t C, int64_t L) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, 8192 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    backward_rows<W, A>(r0, r1, gy, x, w, bias, init, gx, ginit, partial, C, L);
  });
}

template <typename F>
void dispatch_width(int64_t W, F&& f) {
  switch (W) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "causal_conv1d: kernel width must be 2, 3 or 4, got ", W);
  }
}

}  // namespace

at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check(x, w, bias, initial_state);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  at::Tensor y = cpu::cached_empty_like(x);
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "causal_conv1d_fwd_cpu", [&] {
    using T = scalar_t;
    dispatch_width(w.size(1), [&](auto width) {
      cpu::dispatch_activation(activation, [&](auto act) {
        forward<decltype(width)::value, decltype(act)::value, T>(
            x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias ? bias->const_data_ptr<T>() : nullptr,
            initial_state ? initial_state->const_data_ptr<T>() : nullptr, y.data_ptr<T>(), B, C, L);
      });
    });
  });
  return y;
}

std::vector<at::Tensor> causal_conv1d_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check(x, w, bias, initial_state);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type(),
              "causal_conv1d: grad_y must be contiguous and match x, got ", grad_y.sizes());
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), W = w.size(1);
  at::Tensor gx = cpu::cached_empty_like(x);
  at::Tensor ginit = initial_state ? at::empty_like(*initial_state) : at::empty({0}, x.options());
  at::Tensor partial = at::empty({B, C, W + 1}, x.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "causal_conv1d_bwd_cpu", [&] {
    using T = scalar_t;
    dispatch_width(W, [&](auto width) {
      cpu::dispatch_activation(activation, [&](auto act) {
        backward<decltype(width)::value, decltype(act)::value, T>(
            grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(),
            bias ? bias->const_data_ptr<T>() : nullptr, initial_state ? initial_state->const_data_ptr<T>() : nullptr,
            gx.data_ptr<T>(), initial_state ? ginit.data_ptr<T>() : nullptr, partial.data_ptr<float>(), B, C, L);
      });
    });
  });
  at::Tensor sums = partial.sum(0);  // [C, W + 1], a fixed-order sum over the batch
  at::Tensor gw = sums.slice(1, 0, W).contiguous().to(x.scalar_type());
  at::Tensor gb = bias ? sums.select(1, W).contiguous().to(x.scalar_type()) : at::empty({0}, x.options());
  return {gx, gw, gb, ginit};
}

}  // namespace bignlp_fast

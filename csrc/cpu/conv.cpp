// conv1d / conv2d on the CPU with a fused epilogue: out = act(conv(x) + bias) + residual.
//
// The convolution itself is ATen's (oneDNN), called without its bias; what follows it is one pass
// over the output, viewed as [B * C_out, S] rows (S the spatial size; the bias is per row % C_out).
// The backward's epilogue pass computes gp = grad_out * act'(pre + bias) and per-row sums of gp for
// the bias gradient (reduced per channel over the batch in a fixed order: deterministic), then hands
// gp to ATen's convolution_backward for grad_x and grad_w.
#include <vector>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && (x.dim() == 3 || x.dim() == 4), "conv: x must be a 3-D or 4-D CPU tensor, got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(w.dim() == x.dim() && w.scalar_type() == x.scalar_type(), "conv: weight must be ", x.dim(),
              "-D with x's dtype, got ", w.sizes(), " ", w.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(),
                "conv: bias must be a contiguous [", w.size(0), "] vector of x's dtype, got ", bias->sizes());
  }
}

// out[r, :] = act(pre[r, :] + bias[r % C]) (+ res[r, :]); out may be pre.
template <int A, typename T>
void epilogue_fwd(const T* pre, const T* bias, const T* res, T* out, int64_t rows, int64_t C, int64_t S) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const fVec b(bias ? static_cast<float>(bias[r % C]) : 0.f);
      const int64_t o = r * S;
      for (int64_t s = 0; s < S; s += kStep) {
        fVec a, c;
        cpu::load2_any(pre + o + s, S - s, a, c);
        a = cpu::activate<A>(a + b);
        c = cpu::activate<A>(c + b);
        if (res) {
          fVec ra, rc;
          cpu::load2_any(res + o + s, S - s, ra, rc);
          a = a + ra;
          c = c + rc;
        }
        cpu::store2_any(out + o + s, S - s, a, c);
      }
    }
  });
}

// gp[r, :] = g[r, :] * act'(pre[r, :] + bias[r % C]); row_sums[r] = sum of gp[r, :] (fp32).
template <int A, typename T>
void epilogue_bwd(const T* g, const T* pre, const T* bias, T* gp, float* row_sums, int64_t rows, int64_t C,
                  int64_t S) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const fVec b(bias ? static_cast<float>(bias[r % C]) : 0.f);
      const int64_t o = r * S;
      fVec sum(0.f);
      for (int64_t s = 0; s < S; s += kStep) {
        fVec ga, gc, pa, pc;
        cpu::load2_any(g + o + s, S - s, ga, gc);  // lanes past S load 0: they add nothing below
        cpu::load2_any(pre + o + s, S - s, pa, pc);
        ga = ga * cpu::activate_grad<A>(pa + b);
        gc = gc * cpu::activate_grad<A>(pc + b);
        cpu::store2_any(gp + o + s, S - s, ga, gc);
        sum = sum + ga + gc;
      }
      row_sums[r] = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, sum);
    }
  });
}

}  // namespace

std::vector<at::Tensor> conv_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual, std::vector<int64_t> stride,
                                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                     int64_t activation, bool save_pre) {
  check(x, w, bias);
  const std::vector<int64_t> output_padding(stride.size(), 0);
  at::Tensor pre = at::convolution(x, w, std::nullopt, stride, padding, dilation, false, output_padding, groups)
                       .contiguous();
  if (residual) {
    TORCH_CHECK(residual->sizes() == pre.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(),
                "conv: residual must be a contiguous tensor of the output's shape ", pre.sizes(), ", got ",
                residual->sizes());
  }
  at::Tensor out = save_pre ? at::empty_like(pre) : pre;
  const int64_t C = pre.size(1), S = pre.numel() / std::max<int64_t>(1, pre.size(0) * C);
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "conv_fwd_cpu", [&] {
    using T = scalar_t;
    cpu::dispatch_activation(activation, [&](auto act) {
      epilogue_fwd<decltype(act)::value, T>(pre.const_data_ptr<T>(), bias ? bias->const_data_ptr<T>() : nullptr,
                                            residual ? residual->const_data_ptr<T>() : nullptr, out.data_ptr<T>(),
                                            pre.size(0) * C, C, S);
    });
  });
  return {out, save_pre ? pre : at::empty({0}, x.options())};
}

std::vector<at::Tensor> conv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t groups, int64_t activation) {
  check(x, w, bias);
  TORCH_CHECK(pre.sizes() == grad_out.sizes() && pre.is_contiguous() && grad_out.is_contiguous(),
              "conv: pre and grad_out must be contiguous and of one shape, got ", pre.sizes(), " and ",
              grad_out.sizes());
  const int64_t B = pre.size(0), C = pre.size(1), S = pre.numel() / std::max<int64_t>(1, B * C);
  at::Tensor gp = grad_out, grad_bias = at::empty({0}, x.options());
  if (activation != cpu::kIdentity || bias) {
    gp = at::empty_like(grad_out);
    at::Tensor row_sums = at::empty({B, C}, x.options().dtype(at::kFloat));
    BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "conv_bwd_cpu", [&] {
      using T = scalar_t;
      cpu::dispatch_activation(activation, [&](auto act) {
        epilogue_bwd<decltype(act)::value, T>(grad_out.const_data_ptr<T>(), pre.const_data_ptr<T>(),
                                              bias ? bias->const_data_ptr<T>() : nullptr, gp.data_ptr<T>(),
                                              row_sums.data_ptr<float>(), B * C, C, S);
      });
    });
    if (bias) grad_bias = row_sums.sum(0).to(x.scalar_type());  // a fixed-order sum over the batch
  }
  const std::vector<int64_t> output_padding(stride.size(), 0);
  auto [grad_x, grad_w, unused] = at::convolution_backward(gp, x, w, std::nullopt, stride, padding, dilation, false,
                                                           output_padding, groups, {true, true, false});
  return {grad_x, grad_w, grad_bias};
}

}  // namespace bignlp_fast

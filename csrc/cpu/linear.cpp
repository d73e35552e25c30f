// y = x W^T + b on the CPU, forward and backward, float32 and bfloat16 (fp32 accumulation), on
// cpu::packed_gemm (gemm.h). On AMD CPUs, where MKL's sgemm does not take its AVX-512 path, this is
// about twice as fast as torch.mm; the RNN layers use it for their input projection, the one large
// GEMM over all time steps.
#include <vector>

#include "../ops.h"
#include "common.h"
#include "gemm.h"

namespace bignlp_fast {
namespace {

void check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: x must be [M, K] and w [N, K]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == w.scalar_type(),
              "linear: x and w must be contiguous, of one dtype");
}

}  // namespace

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  check(x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "linear_fwd_cpu", [&] {
    const scalar_t* bias = b.has_value() ? b->const_data_ptr<scalar_t>() : nullptr;
    cpu::packed_gemm<scalar_t, scalar_t>(M, N, K, {x.const_data_ptr<scalar_t>(), K, 1}, {w.const_data_ptr<scalar_t>(), 1, K}, bias,
                             y.data_ptr<scalar_t>(), N);
  });
  return y;
}

std::vector<at::Tensor> linear_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                       bool has_bias) {
  check(x, w);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor dx = at::empty({M, K}, x.options()), dw = at::empty({N, K}, w.options());
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "linear_bwd_cpu", [&] {
    const scalar_t* g = gy.const_data_ptr<scalar_t>();
    // dx = dy W: [M, N] x [N, K];  dW = dy^T x: [N, M] x [M, K]
    cpu::packed_gemm<scalar_t, scalar_t>(M, K, N, {g, N, 1}, {w.const_data_ptr<scalar_t>(), K, 1}, nullptr,
                             dx.data_ptr<scalar_t>(), K);
    cpu::packed_gemm<scalar_t, scalar_t>(N, K, M, {g, 1, N}, cpu::Strided<scalar_t>{x.const_data_ptr<scalar_t>(), K, 1}, nullptr,
                             dw.data_ptr<scalar_t>(), K);
  });
  at::Tensor db = has_bias ? gy.to(at::kFloat).sum(0).to(w.scalar_type()) : at::empty({0}, w.options());
  return {dx, dw, db};
}

}  // namespace bignlp_fast

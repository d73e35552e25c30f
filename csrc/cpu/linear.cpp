// y = x W^T + b on the CPU, forward and backward, float32 and bfloat16 (fp32 accumulation), on the
// small GEMM of gemm.h: a parallel, packed GEMM. Both operands are packed to fp32 once per call:
// B in column panels of kPanel floats ([K, kPanel] each, contiguous), A in row blocks of kRows rows,
// transposed ([K, kRows], so the micro-kernel broadcasts consecutive floats). Tasks are (row block,
// group of panels); each writes its own part of C. On AMD CPUs, where MKL's sgemm does not take its
// AVX-512 path, this is about twice as fast as torch.mm; the RNN layers use it for their input
// projection, the one large GEMM over all time steps.
#include <vector>

#include "../ops.h"
#include "common.h"
#include "gemm.h"

namespace bignlp_fast {
namespace {

constexpr int64_t kPanel = 2 * cpu::fVec::size();  // columns per B panel (32 with AVX-512)
constexpr int64_t kRows = 64;                        // rows per A block

// A strided operand: element (r, c) at p[r * rs + c * cs].
template <typename T>
struct Strided {
  const T* p;
  int64_t rs, cs;
  float at(int64_t r, int64_t c) const { return static_cast<float>(p[r * rs + c * cs]); }
};

// C[M, N] (= or +=) A[M, K] B[K, N] (+ bias[N]), C of type Out with row stride ldc.
template <typename T, typename Out>
void gemm(int64_t M, int64_t N, int64_t K, Strided<T> A, Strided<T> B, const T* bias, Out* C, int64_t ldc) {
  const int64_t panels = (N + kPanel - 1) / kPanel, blocks = (M + kRows - 1) / kRows;
  std::vector<float> bp(panels * K * kPanel);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t u = 0; u < kPanel; ++u) {
          const int64_t n = p * kPanel + u;
          bp[(p * K + k) * kPanel + u] = n < N ? B.at(k, n) : 0.f;
        }
  });
  // Enough tasks for every thread: split the panels into groups when row blocks are few.
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min(panels, std::max<int64_t>(1, (4 * threads + blocks - 1) / blocks));
  const int64_t per_group = (panels + groups - 1) / groups;
  at::parallel_for(0, blocks * groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> a_t(K * kRows), tile(kRows * kPanel);
    int64_t packed_block = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / groups, grp = t % groups;
      const int64_t m0 = blk * kRows, mc = std::min(kRows, M - m0);
      if (blk != packed_block) {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t r = 0; r < mc; ++r) a_t[k * kRows + r] = A.at(m0 + r, k);
        packed_block = blk;
      }
      for (int64_t p = grp * per_group; p < std::min(panels, (grp + 1) * per_group); ++p) {
        cpu::small_gemm(mc, kPanel, K, a_t.data(), 1, kRows, bp.data() + p * K * kPanel, kPanel, tile.data(), kPanel,
                        1.f, false);
        const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
        for (int64_t r = 0; r < mc; ++r)
          for (int64_t u = 0; u < nc; ++u)
            C[(m0 + r) * ldc + n0 + u] =
                static_cast<Out>(tile[r * kPanel + u] + (bias ? static_cast<float>(bias[n0 + u]) : 0.f));
      }
    }
  });
}

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
    gemm<scalar_t, scalar_t>(M, N, K, {x.const_data_ptr<scalar_t>(), K, 1}, {w.const_data_ptr<scalar_t>(), 1, K}, bias,
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
    gemm<scalar_t, scalar_t>(M, K, N, {g, N, 1}, {w.const_data_ptr<scalar_t>(), K, 1}, nullptr,
                             dx.data_ptr<scalar_t>(), K);
    gemm<scalar_t, scalar_t>(N, K, M, {g, 1, N}, {x.const_data_ptr<scalar_t>(), K, 1}, nullptr,
                             dw.data_ptr<scalar_t>(), K);
  });
  at::Tensor db = has_bias ? gy.to(at::kFloat).sum(0).to(w.scalar_type()) : at::empty({0}, w.options());
  return {dx, dw, db};
}

}  // namespace bignlp_fast

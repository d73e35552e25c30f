// y = x W^T + b on the CPU, forward and backward, float32 and bfloat16 (fp32 accumulation).
// Up to kSkinnyRows rows of x (decoding; kSkinnyRowsTiled for a [N, K] weight) on the streaming
// kernels of skinny_gemm.h, which read W once at memory speed; more rows on cpu::packed_gemm
// (gemm.h). On AMD CPUs, where MKL's sgemm does not take its AVX-512 path, the packed GEMM is about
// twice as fast as torch.mm; the RNN layers use it for their input projection, the one large GEMM
// over all time steps.
//
// The forward also takes W as the transpose of a contiguous [K, N] tensor (transformers' Conv1D
// layout), read in place; the backward wants it contiguous.
#include <vector>

#include "../ops.h"
#include "common.h"
#include "gemm.h"
#include "skinny_gemm.h"

namespace bignlp_fast {
namespace {

void check(const at::Tensor& x, const at::Tensor& w, bool w_transposed_ok) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear: x must be [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x and w must have one dtype");
  TORCH_CHECK(x.is_contiguous() && (w.is_contiguous() || (w_transposed_ok && w.t().is_contiguous())),
              "linear: x must be contiguous and w contiguous", w_transposed_ok ? " or the transpose of a contiguous tensor" : "");
}

}  // namespace

namespace cpu {
// MKL takes its AVX-512 kernels on Intel CPUs only, and where this build has no AVX-512, MKL's AVX2
// kernels (it has some for AMD's Zen) beat packed_gemm's 6 x 16 tiles too. Measured: on an Intel Xeon
// F.linear 196 GFLOP/s against packed_gemm's 161 at [4096, 512] x [512, 2048]; on an AMD EPYC Zen 3
// (AVX2) MKL 1.00-1.12x at the LSTM's and BERT's shapes, forward and backward (in-process,
// interleaved); on an AMD EPYC Zen 5 (AVX-512) packed_gemm ~2x. The models and modules ask this
// through bignlp_fast.ops.linear_is_faster; the recurrent ops' weight gradients through gemm_tn.
int64_t linear_streaming_rows(bool prepacked) { return prepacked ? kSkinnyRowsPrepacked : kSkinnyRowsTiled; }

// prepacked_rows_gemm (gemm.h) beat both packed_gemm and MKL from the streaming rows up to 256 rows on
// an Intel Xeon with AVX-512 (MKL from 384 rows on). Not measured on AMD CPUs, where packed_gemm takes
// packed weights as before; nor in AVX2 builds.
int64_t linear_prepacked_direct_rows() { return fVec::size() >= 16 && blas_sgemm_is_fast() ? 256 : 0; }

bool blas_sgemm_is_fast() {
  static const bool fast = [] {
    if (!at::hasMKL()) return false;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    // no AVX-512 in this build: MKL's AVX2 kernels, except on Zen 1 / Zen 2, where the packed GEMM ran
    // 1.06-1.24x MKL's (EPYC Rome, session 29; on a Zen 3 MKL ran 1.00-1.12x the packed GEMM)
    if (fVec::size() < 16) return !(__builtin_cpu_is("znver1") || __builtin_cpu_is("znver2"));
    return __builtin_cpu_is("intel") != 0;
#else
    return fVec::size() < 16;
#endif
  }();
  return fast;
}
}  // namespace cpu

namespace {
// The packed form of w for packed_gemm, as linear_pack_cpu makes it: fp32 column panels (pack_b), or
// bf16 pairs (pack_b_bf16, held as int32) for a bf16 weight where bf16_dot() holds.
bool packs_pairs(at::ScalarType dtype) { return dtype == at::kBFloat16 && cpu::bf16_dot(); }
int64_t packed_numel(int64_t N, int64_t K, bool pairs) {
  const int64_t panels = (N + cpu::gemm_detail::kPanel - 1) / cpu::gemm_detail::kPanel;
  return panels * (pairs ? (K + 1) / 2 : K) * cpu::gemm_detail::kPanel;
}
}  // namespace

bool linear_packed_fits(const at::Tensor& packed, const at::Tensor& w) {
  if (w.dim() != 2) return false;
  const bool pairs = packs_pairs(w.scalar_type());
  return packed.device().is_cpu() && packed.is_contiguous() &&
         packed.scalar_type() == (pairs ? at::kInt : at::kFloat) &&
         packed.numel() == packed_numel(w.size(0), w.size(1), pairs);
}

at::Tensor linear_pack_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "linear_pack: w must be [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "linear_pack: w must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous() || w.t().is_contiguous(),
              "linear_pack: w must be contiguous or the transpose of a contiguous tensor");
  const int64_t N = w.size(0), K = w.size(1);
  const bool pairs = packs_pairs(w.scalar_type());
  at::Tensor packed = at::empty({packed_numel(N, K, pairs)}, w.options().dtype(pairs ? at::kInt : at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(w.scalar_type(), "linear_pack_cpu", [&] {
    const cpu::Strided<scalar_t> B{w.const_data_ptr<scalar_t>(), w.stride(1), w.stride(0)};  // B = w^T [K, N]
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (pairs) return cpu::pack_b_bf16(N, K, B, reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()));
    }
    cpu::pack_b(N, K, B, packed.data_ptr<float>());
  });
  return packed;
}

at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& packed) {
  check(x, w, /*w_transposed_ok=*/true);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool rows = w.is_contiguous();  // else w.t() is: W^T stored [K, N]
  if (packed.has_value()) {
    TORCH_CHECK(linear_packed_fits(*packed, w), "linear: packed does not hold w [", N, ", ", K,
                "] packed for this build and setting (", packs_pairs(w.scalar_type()) ? "bf16 pairs" : "fp32 panels",
                "): pack it again with linear_pack");
  }
  if (M == 0 || K == 0) {  // nothing to multiply: the bias, or zeros (the streaming kernels divide K)
    at::Tensor y = at::zeros({M, N}, x.options());
    return b.has_value() ? y.add_(*b) : y;
  }
  at::Tensor y = cpu::cached_empty({M, N}, x.options());  // written once: from the buffer cache
  const at::Tensor bias_c = b.has_value() ? b->contiguous() : at::Tensor();
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "linear_fwd_cpu", [&] {
    const scalar_t* bias = b.has_value() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const int64_t streaming_rows = rows ? cpu::linear_streaming_rows(packed.has_value()) : cpu::kSkinnyRows;
    if (M <= streaming_rows) {  // (a packed w is not needed there)
      cpu::LineVector<float> xf(M * K);
      cpu::to_float(x.const_data_ptr<scalar_t>(), xf.data(), M * K);
      if (rows) cpu::skinny_gemm_rows(M, N, K, xf.data(), wp, bias, y.data_ptr<scalar_t>());
      else cpu::skinny_gemm_cols(M, N, K, xf.data(), wp, bias, y.data_ptr<scalar_t>());
      return;
    }
    // (the dispatch's lambda is no template: both branches compile for bf16, where this one never runs)
    if (std::is_same_v<scalar_t, float> && packed.has_value() && M <= cpu::linear_prepacked_direct_rows()) {
      cpu::prepacked_rows_gemm(M, N, K, x.const_data_ptr<float>(), K, packed->const_data_ptr<float>(),
                               reinterpret_cast<const float*>(bias), y.data_ptr<float>(), N);
      return;
    }
    cpu::packed_gemm<scalar_t, scalar_t>(M, N, K, {x.const_data_ptr<scalar_t>(), K, 1}, {wp, w.stride(1), w.stride(0)},
                                         bias, y.data_ptr<scalar_t>(), N,
                                         packed.has_value() ? packed->const_data_ptr() : nullptr);
  });
  return y;
}

std::vector<at::Tensor> linear_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                       bool has_bias) {
  check(x, w, /*w_transposed_ok=*/false);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor dx = cpu::cached_empty({M, K}, x.options()), dw = cpu::cached_empty({N, K}, w.options());
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

// TextCNN block on CUDA: text_cnn_pool_fwd_cuda / text_cnn_pool_bwd_cuda (see ops.h; the contract is
// stated in bignlp_fast/ops/text_cnn_pool.py).
//
//   out[b, off + c] = max over p in [0, len_b - k] of act(bias[c] + sum_j sum_e x[b, p + j, e] W[c, e, j])
//
// Forward, one launch per width k, writing columns [off, off + C) of the [B, sum C] outputs: a block of
// 256 threads per (sequence b, block of kTC = 64 channels) walks the sequence's valid positions in
// tiles of kTP = 64. A tile is a [kTP, kTC] product accumulated over j < k and blocks of kTE = 16
// embedding columns; each step stages x's rows p + j (as fp32, transposed) and W[:, :, j] (from a
// [k, E, C] copy, so that the channel index is contiguous) in shared memory, and each thread adds the
// outer products of its 4 positions (ty + 16 i) and 4 channels (tx + 16 i): conflict-free shared reads,
// fp32 FMAs on the CUDA cores. The bias and activation follow in registers, and each thread keeps a
// running maximum over its positions (the first of equal ones: it sees them in increasing order); at
// the end the 16 threads of each channel reduce theirs in shared memory (the larger value, on a tie
// the lower position), so out is the first position's value, as on the other backends. Sequences
// without a window (len_b < k) give out 0, argmax -1, pre 0. Lengths past L count as L.
//
// Backward (gp[b, c] = grad_out * act'(pre), 0 where argmax < 0, in one elementwise kernel):
// - grad_b[c] = sum_b gp[b, c]: a thread per column adds the rows in order;
// - grad_w[c, e, j] = sum_b gp[b, c] x[b, argmax + j, e]: a thread per (c, e) adds the sequences in order;
// - grad_x[b, p, e] += gp[b, c] W[c, e, p - argmax[b, c]] over the k rows of each channel's window: a
//   thread per (b, e) walks the channels in order, adding into an fp32 buffer it alone touches at that
//   (b, e); the widths run in order on one stream. No atomics anywhere: the gradients are the same from
//   run to run.
//
// This kernel has been checked on the CPU emulation of CUDA (tests/cuda_emu) but has not run on a GPU:
// the Triton kernel (tensor cores through tl.dot) stays the automatic choice on CUDA tensors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/activation.cuh"
#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;

constexpr int kTP = 64;         // positions per tile
constexpr int kTC = 64;         // channels per block
constexpr int kTE = 16;         // embedding columns per shared-memory step
constexpr int kThreads = 256;   // 16 x 16 threads, each 4 positions x 4 channels
constexpr int kPerThread = 4;
static_assert(kTP == 16 * kPerThread && kTC == 16 * kPerThread && kThreads == 256, "16 x 16 threads");

// Valid window starts of sequence b: min(len_b, L) - K + 1 (<= 0: none).
__device__ __forceinline__ int64_t window_count(const int64_t* __restrict__ lengths, int b, int64_t L, int K) {
  int64_t len = lengths ? lengths[b] : L;
  len = len < 0 ? 0 : (len > L ? L : len);
  return len - K + 1;
}

template <typename T, int ACT>
__global__ void __launch_bounds__(kThreads)
    text_cnn_pool_fwd_kernel(const T* __restrict__ x, const T* __restrict__ wt, const T* __restrict__ bias,
                             const int64_t* __restrict__ lengths, T* __restrict__ out, int32_t* __restrict__ argmax,
                             float* __restrict__ pre, int64_t L, int E, int C, int K, int CT, int off) {
  __shared__ float xs[kTE][kTP + 1];  // x[b, p0 + pp + j, e0 + ee] at [ee][pp] (+1: conflict-free stores)
  __shared__ float ws[kTE][kTC];      // W[c0 + cc, e0 + ee, j] at [ee][cc]
  __shared__ float red_v[16][kTC];    // each thread row's best value, position and pre-activation
  __shared__ int32_t red_p[16][kTC];
  __shared__ float red_pre[16][kTC];

  const int b = blockIdx.x;
  const int c0 = blockIdx.y * kTC;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n_pos = window_count(lengths, b, L, K);
  const T* xb = x + int64_t{b} * L * E;

  float bias_c[kPerThread], best[kPerThread], best_pre[kPerThread];
  int32_t best_p[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int c = c0 + tx + 16 * k;
    bias_c[k] = bias != nullptr && c < C ? static_cast<float>(bias[c]) : 0.f;
    best[k] = -INFINITY;
    best_pre[k] = 0.f;
    best_p[k] = -1;
  }

  for (int64_t p0 = 0; p0 < n_pos; p0 += kTP) {
    float acc[kPerThread][kPerThread] = {};  // [position i][channel k]
    for (int j = 0; j < K; ++j) {
      for (int e0 = 0; e0 < E; e0 += kTE) {
        for (int idx = tid; idx < kTE * kTP; idx += kThreads) {  // 16 consecutive columns of a row per 16 threads
          const int ee = idx % kTE, pp = idx / kTE;
          const int64_t p = p0 + pp;
          const int e = e0 + ee;
          xs[ee][pp] = p < n_pos && e < E ? static_cast<float>(xb[(p + j) * E + e]) : 0.f;
        }
        for (int idx = tid; idx < kTE * kTC; idx += kThreads) {  // 64 consecutive channels per 64 threads
          const int cc = idx % kTC, ee = idx / kTC;
          const int c = c0 + cc, e = e0 + ee;
          ws[ee][cc] = c < C && e < E ? static_cast<float>(wt[(int64_t{j} * E + e) * C + c]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int ee = 0; ee < kTE; ++ee) {
          float a[kPerThread], w[kPerThread];
#pragma unroll
          for (int i = 0; i < kPerThread; ++i) a[i] = xs[ee][ty + 16 * i];
#pragma unroll
          for (int k = 0; k < kPerThread; ++k) w[k] = ws[ee][tx + 16 * k];
#pragma unroll
          for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
            for (int k = 0; k < kPerThread; ++k) acc[i][k] = fmaf(a[i], w[k], acc[i][k]);
          }
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {  // positions ty + 16 i: increasing, so '>' keeps the first
      const int64_t p = p0 + ty + 16 * i;
      if (p >= n_pos) continue;
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const float v = acc[i][k] + bias_c[k];
        const float y = act<ACT>(v);
        if (y > best[k] || (isnan(y) && !isnan(best[k]))) {  // a NaN is the maximum, as torch's amax
          best[k] = y;
          best_pre[k] = v;
          best_p[k] = static_cast<int32_t>(p);
        }
      }
    }
  }

#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    red_v[ty][tx + 16 * k] = best[k];
    red_p[ty][tx + 16 * k] = best_p[k];
    red_pre[ty][tx + 16 * k] = best_pre[k];
  }
  __syncthreads();
  if (tid < kTC && c0 + tid < C) {
    float v = 0.f, pv = 0.f;
    int32_t p = -1;
    for (int r = 0; r < 16; ++r) {  // the larger value (NaN above all); on a tie the lower position
      const int32_t q = red_p[r][tid];
      const float u = red_v[r][tid];
      const bool larger = u > v || (isnan(u) && !isnan(v)), tie = u == v || (isnan(u) && isnan(v));
      if (q >= 0 && (p < 0 || larger || (tie && q < p))) {
        v = u;
        p = q;
        pv = red_pre[r][tid];
      }
    }
    const int64_t o = int64_t{b} * CT + off + c0 + tid;
    out[o] = static_cast<T>(p >= 0 ? v : 0.f);
    argmax[o] = p;
    pre[o] = p >= 0 ? pv : 0.f;
  }
}

// gp[i] = grad_out[i] * act'(pre[i]), 0 where argmax[i] < 0 (no window), over all B * CT outputs.
template <typename T>
__global__ void text_cnn_pool_gp_kernel(const T* __restrict__ grad_out, const int32_t* __restrict__ argmax,
                                        const float* __restrict__ pre, float* __restrict__ gp, int64_t n,
                                        int activation) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < n) gp[i] = argmax[i] >= 0 ? static_cast<float>(grad_out[i]) * act_grad_any(activation, pre[i]) : 0.f;
}

// sums[c] = sum over b, in order, of gp[b, c] (every column of [B, CT]).
__global__ void text_cnn_pool_column_sum_kernel(const float* __restrict__ gp, int B, int CT, float* __restrict__ sums) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= CT) return;
  float total = 0.f;
  for (int b = 0; b < B; ++b) total += gp[int64_t{b} * CT + c];
  sums[c] = total;
}

// grad_w[c, e, j] = sum over b, in order, of gp[b, off + c] x[b, argmax[b, off + c] + j, e]; a thread per
// (e, c) of a 32 x 8 block (consecutive e: coalesced reads of x's rows).
template <typename T>
__global__ void text_cnn_pool_bwd_w_kernel(const float* __restrict__ gp, const int32_t* __restrict__ argmax,
                                           const T* __restrict__ x, T* __restrict__ grad_w, int B, int64_t L, int E,
                                           int C, int K, int CT, int off) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  const int c = blockIdx.y * blockDim.y + threadIdx.y;
  if (e >= E || c >= C) return;
  for (int j = 0; j < K; ++j) {
    float acc = 0.f;
    for (int b = 0; b < B; ++b) {
      const int64_t o = int64_t{b} * CT + off + c;
      const int32_t a = argmax[o];
      if (a >= 0) acc = fmaf(gp[o], static_cast<float>(x[(int64_t{b} * L + a + j) * E + e]), acc);
    }
    grad_w[(int64_t{c} * E + e) * K + j] = static_cast<T>(acc);
  }
}

// dx[b, argmax + j, e] += gp[b, off + c] W[c, e, j] for every channel c in order and j < K; wt2 is W as
// [C, K, E] (consecutive e contiguous). A thread per (b, e): it alone touches dx[b, :, e] in a launch.
template <typename T>
__global__ void text_cnn_pool_bwd_x_kernel(const float* __restrict__ gp, const int32_t* __restrict__ argmax,
                                           const T* __restrict__ wt2, float* __restrict__ dx, int64_t L, int E, int C,
                                           int K, int CT, int off) {
  const int b = blockIdx.x;
  const int e = blockIdx.y * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float* dxb = dx + int64_t{b} * L * E + e;
  for (int c = 0; c < C; ++c) {
    const int64_t o = int64_t{b} * CT + off + c;
    const int32_t a = argmax[o];
    if (a < 0) continue;
    const float g = gp[o];
    const T* w = wt2 + int64_t{c} * K * E + e;
    for (int j = 0; j < K; ++j) dxb[(int64_t{a} + j) * E] += g * static_cast<float>(w[int64_t{j} * E]);
  }
}

// ---- argument checks (second line of defence: the Python op validates first) -------------------

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              "text_cnn_pool: ", name, " must be a contiguous ", x.scalar_type(), " tensor on ", x.device(),
              " (as x), got ", t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : ", non-contiguous");
}

int64_t check_args(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                   const std::optional<std::vector<at::Tensor>>& biases) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(),
              "text_cnn_pool: x must be a contiguous 3-D CUDA tensor [B, L, E], got shape ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "text_cnn_pool: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!weights.empty(), "text_cnn_pool: weights must hold at least one conv kernel");
  TORCH_CHECK(!biases || biases->size() == weights.size(), "text_cnn_pool: one bias per weight");
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  TORCH_CHECK(B <= INT32_MAX && L <= INT32_MAX && E <= INT32_MAX, "text_cnn_pool: x too large, got ", x.sizes());
  int64_t CT = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    check_like_x(w, "weights[i]", x);
    TORCH_CHECK(w.dim() == 3 && w.size(1) == E && w.size(2) >= 1,
                "text_cnn_pool: weights[", i, "] must be [C, E=", E, ", k], got ", w.sizes());
    TORCH_CHECK(ceil_div(w.size(0), kTC) <= 65535, "text_cnn_pool: at most ", 65535 * kTC, " channels per width");
    if (biases) {
      check_like_x((*biases)[i], "biases[i]", x);
      TORCH_CHECK((*biases)[i].dim() == 1 && (*biases)[i].size(0) == w.size(0), "text_cnn_pool: biases[", i,
                  "] must have shape (", w.size(0), ",)");
    }
    CT += w.size(0);
  }
  TORCH_CHECK(CT <= INT32_MAX && B * CT <= INT32_MAX, "text_cnn_pool: too many outputs (B x channels)");
  return CT;
}

}  // namespace

std::vector<at::Tensor> text_cnn_pool_fwd_cuda(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                               const std::optional<std::vector<at::Tensor>>& biases,
                                               const std::optional<at::Tensor>& lengths, int64_t activation) {
  const int64_t CT = check_args(x, weights, biases);
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  if (lengths) {
    TORCH_CHECK(lengths->device() == x.device() && lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                    lengths->size(0) == B && lengths->is_contiguous(),
                "text_cnn_pool: lengths must be a contiguous int64 [B] tensor on ", x.device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, CT}, x.options());
  at::Tensor argmax = at::empty({B, CT}, x.options().dtype(at::kInt));
  at::Tensor pre = at::empty({B, CT}, x.options().dtype(at::kFloat));
  if (B == 0 || CT == 0) return {out, argmax, pre};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "text_cnn_pool_fwd_cuda", [&] {
    using T = scalar_t;
    dispatch_activation(activation, "text_cnn_pool", [&](auto act_code) {
      int64_t off = 0;
      for (size_t i = 0; i < weights.size(); ++i) {
        const int64_t C = weights[i].size(0), K = weights[i].size(2);
        if (C > 0) {
          const at::Tensor wt = weights[i].permute({2, 1, 0}).contiguous();  // [K, E, C]
          const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(C, kTC)));
          text_cnn_pool_fwd_kernel<T, decltype(act_code)::value><<<grid, kThreads, 0, stream>>>(
              x.data_ptr<T>(), wt.data_ptr<T>(), biases ? (*biases)[i].data_ptr<T>() : nullptr,
              lengths ? lengths->data_ptr<int64_t>() : nullptr, out.data_ptr<T>(), argmax.data_ptr<int32_t>(),
              pre.data_ptr<float>(), L, static_cast<int>(E), static_cast<int>(C), static_cast<int>(K),
              static_cast<int>(CT), static_cast<int>(off));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        off += C;
      }
    });
  });
  return {out, argmax, pre};
}

std::vector<at::Tensor> text_cnn_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                               const std::vector<at::Tensor>& weights,
                                               const std::optional<std::vector<at::Tensor>>& biases,
                                               const at::Tensor& argmax, const at::Tensor& pre, int64_t activation) {
  const int64_t CT = check_args(x, weights, biases);
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  check_like_x(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == B && grad_out.size(1) == CT,
              "text_cnn_pool: grad_out must be [B, sum C] = [", B, ", ", CT, "], got ", grad_out.sizes());
  TORCH_CHECK(argmax.device() == x.device() && argmax.scalar_type() == at::kInt && argmax.is_contiguous() &&
                  argmax.sizes() == grad_out.sizes(),
              "text_cnn_pool: argmax must be the forward's contiguous int32 [B, sum C] on ", x.device());
  TORCH_CHECK(pre.device() == x.device() && pre.scalar_type() == at::kFloat && pre.is_contiguous() &&
                  pre.sizes() == grad_out.sizes(),
              "text_cnn_pool: pre must be the forward's contiguous float32 [B, sum C] on ", x.device());
  TORCH_CHECK(activation >= 0 && activation <= 4, "text_cnn_pool: activation code must be 0..4, got ", activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dx = at::zeros({B, L, E}, x.options().dtype(at::kFloat));
  at::Tensor gp = at::empty({B, CT}, x.options().dtype(at::kFloat));
  at::Tensor bias_sums = at::zeros({CT}, x.options().dtype(at::kFloat));
  std::vector<at::Tensor> grad_ws;
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "text_cnn_pool_bwd_cuda", [&] {
    using T = scalar_t;
    const int64_t n = B * CT;
    if (n > 0) {
      text_cnn_pool_gp_kernel<T><<<static_cast<unsigned>(ceil_div(n, 256)), 256, 0, stream>>>(
          grad_out.data_ptr<T>(), argmax.data_ptr<int32_t>(), pre.data_ptr<float>(), gp.data_ptr<float>(), n,
          static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (biases) {
        text_cnn_pool_column_sum_kernel<<<static_cast<unsigned>(ceil_div(CT, 128)), 128, 0, stream>>>(
            gp.data_ptr<float>(), static_cast<int>(B), static_cast<int>(CT), bias_sums.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    int64_t off = 0;
    for (const at::Tensor& w : weights) {
      const int64_t C = w.size(0), K = w.size(2);
      at::Tensor grad_w = at::zeros(w.sizes(), w.options());
      if (n > 0 && C > 0 && E > 0) {
        const dim3 wgrid(static_cast<unsigned>(ceil_div(E, 32)), static_cast<unsigned>(ceil_div(C, 8)));
        text_cnn_pool_bwd_w_kernel<T><<<wgrid, dim3(32, 8), 0, stream>>>(
            gp.data_ptr<float>(), argmax.data_ptr<int32_t>(), x.data_ptr<T>(), grad_w.data_ptr<T>(),
            static_cast<int>(B), L, static_cast<int>(E), static_cast<int>(C), static_cast<int>(K),
            static_cast<int>(CT), static_cast<int>(off));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const at::Tensor wt2 = w.permute({0, 2, 1}).contiguous();  // [C, K, E]
        const dim3 xgrid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(E, 128)));
        text_cnn_pool_bwd_x_kernel<T><<<xgrid, 128, 0, stream>>>(
            gp.data_ptr<float>(), argmax.data_ptr<int32_t>(), wt2.data_ptr<T>(), dx.data_ptr<float>(), L,
            static_cast<int>(E), static_cast<int>(C), static_cast<int>(K), static_cast<int>(CT),
            static_cast<int>(off));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_ws.push_back(grad_w);
      off += C;
    }
  });
  std::vector<at::Tensor> grads{dx.to(x.scalar_type())};
  grads.insert(grads.end(), grad_ws.begin(), grad_ws.end());
  if (biases) {
    int64_t off = 0;
    for (const at::Tensor& b : *biases) {
      // a copy even in float32: views of one buffer would alias each other as outputs of the op
      grads.push_back(bias_sums.narrow(0, off, b.size(0)).to(b.scalar_type(), /*non_blocking=*/false, /*copy=*/true));
      off += b.size(0);
    }
  }
  return grads;
}

}  // namespace bignlp_fast

// Depthwise causal conv1d with a fused bias and activation on CUDA: causal_conv1d_fwd_cuda /
// causal_conv1d_bwd_cuda (see ops.h; the contract is stated in bignlp_fast/ops/causal_conv1d.py).
//
//   y[b, c, t] = act(bias[c] + sum_j w[c, j] * xx[b, c, t + j]),  j = 0 .. W-1,  xx = cat(initial_state, x)
//
// Work layout: a block handles one row (b, c) of x [B, C, L] and one chunk of blockDim.x * kPer
// consecutive positions; thread i owns the kPer positions from i * kPer. The block stages the chunk
// of x in shared memory as fp32, behind a left halo of kHalo slots (the W-1 <= 3 inputs before the
// chunk: x, initial_state or zeros) and, in the backward, a right halo of kHalo slots. Each thread
// reads its window of kPer + kHalo inputs from shared memory as float4s, so the global accesses stay
// coalesced 16-byte vectors (kVec = 16 bytes / sizeof(T) when L and the pointers allow it) and each
// input is read from global memory once (plus the halos).
//
// Backward: pre is recomputed, gp = grad_y * act'(pre) for the chunk and the W-1 positions after it
// (a right halo, so that grad_x needs no other block's work), kept in shared memory;
// grad_x[t] = sum_j w[j] gp[t + W-1 - j]; grad_initial_state[r] = sum_{j <= r} w[j] gp[r - j] (first
// chunk). grad_w[c, j] = sum gp[t] xx[t + j] and grad_bias[c] = sum gp[t]: each block sums its chunk
// in fp32 (thread: its positions in order; warp: a shuffle tree; block: the warps in order) and
// writes one row of partials; causal_conv1d_reduce_kernel adds the rows of each channel in a fixed
// order (no atomics), so the result is the same from run to run. All math is fp32. The activation is
// a runtime argument (act_any: a warp-uniform switch; the kernels are memory-bound), which keeps the
// instantiations to dtype x width x vector width.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/activation.cuh"
#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;

constexpr int kPer = 8;                         // positions per thread
constexpr int kHalo = 4;                        // halo slots (>= W-1, and keeps windows 16-byte aligned)
constexpr int kMaxThreads = 128;                // threads per block at most
constexpr int kMaxChunk = kMaxThreads * kPer;   // positions per block at most
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kWindow = kPer + kHalo;           // window of a thread, in floats
static_assert(kPer % 8 == 0 && kHalo % 4 == 0 && kWindow % 4 == 0, "windows are read as float4s");

// ---- device helpers ---------------------------------------------------------------------------

// dst[i] = row[start + i] as fp32 for i in [0, len), 0 at positions >= L. With kVec > 1, L % kVec == 0,
// row is 16-byte aligned, and start, len and dst (16-byte aligned) allow whole vectors.
template <int kVec, typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t start, int len, int64_t L,
                                           float* __restrict__ dst) {
  for (int v = threadIdx.x; v < len / kVec; v += blockDim.x) {
    const int64_t t = start + int64_t{v} * kVec;
    float vals[kVec] = {};
    if (t < L) load_vec<kVec>(row + t, 0, vals);
    if constexpr (kVec % 4 == 0) {
#pragma unroll
      for (int q = 0; q < kVec / 4; ++q) {
        reinterpret_cast<float4*>(dst + v * kVec)[q] =
            make_float4(vals[4 * q], vals[4 * q + 1], vals[4 * q + 2], vals[4 * q + 3]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[v * kVec + e] = vals[e];
    }
  }
}

// out[k] = src[k] for k in [0, N), N a multiple of 4, src 16-byte aligned.
template <int N>
__device__ __forceinline__ void read_window(const float* src, float (&out)[N]) {
  static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 v = reinterpret_cast<const float4*>(src)[q];
    out[4 * q] = v.x;
    out[4 * q + 1] = v.y;
    out[4 * q + 2] = v.z;
    out[4 * q + 3] = v.w;
  }
}

// xx at position t < L of a row (t < 0: initial_state[t + W-1] for t >= -(W-1), when given; else 0).
template <int W, typename T>
__device__ __forceinline__ float input_at(const T* __restrict__ xrow, const T* __restrict__ init_row, int64_t t) {
  if (t >= 0) return static_cast<float>(xrow[t]);
  if (init_row && t >= -(W - 1)) return static_cast<float>(init_row[t + (W - 1)]);
  return 0.f;
}

// Stores the kPer values of thread threadIdx.x (positions start + threadIdx.x * kPer + e) to row.
// kVec > 1: directly, as vectors. kVec == 1: through stage (>= blockDim.x * kPer floats, 16-byte
// aligned, which no thread may still be reading) so that the stores are coalesced; synchronizes the
// block, so every thread must call it.
template <int kVec, typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int64_t start, int64_t L, const float (&vals)[kPer],
                                            float* stage) {
  const int p0 = threadIdx.x * kPer;
  if constexpr (kVec > 1) {
#pragma unroll
    for (int q = 0; q < kPer / kVec; ++q) {
      const int64_t t = start + p0 + q * kVec;
      if (t < L) {
        float v[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] = vals[q * kVec + e];
        store_vec<kVec>(row + t, 0, v);
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < kPer / 4; ++q) {
      reinterpret_cast<float4*>(stage + p0)[q] =
          make_float4(vals[4 * q], vals[4 * q + 1], vals[4 * q + 2], vals[4 * q + 3]);
    }
    __syncthreads();
    const int len = blockDim.x * kPer;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      if (start + i < L) row[start + i] = static_cast<T>(stage[i]);
    }
  }
}

// ---- kernels ----------------------------------------------------------------------------------
// Grid: blockIdx.x = row * nchunks + chunk, row = b * channels + c (< 2^31), chunks of
// blockDim.x * kPer positions. blockDim.x: a multiple of 32, at most kMaxThreads.

template <typename T, int W, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                             const T* __restrict__ init, T* __restrict__ y, int channels, int64_t L,
                             unsigned nchunks, int act_code) {
  static_assert(W >= 2 && W - 1 <= kHalo, "kernel width 2..kHalo+1");
  // sx[i] = xx at position start - kHalo + i.
  __shared__ alignas(16) float sx[kHalo + kMaxChunk];
  const unsigned row = blockIdx.x / nchunks;
  const unsigned chunk = blockIdx.x - row * nchunks;
  const int c = static_cast<int>(row % static_cast<unsigned>(channels));
  const int len = blockDim.x * kPer;
  const int64_t start = int64_t{chunk} * len;
  const T* xrow = x + int64_t{row} * L;
  const T* init_row = init ? init + int64_t{row} * (W - 1) : nullptr;

  float w[W];
#pragma unroll
  for (int j = 0; j < W; ++j) w[j] = static_cast<float>(weight[int64_t{c} * W + j]);
  const float b = bias ? static_cast<float>(bias[c]) : 0.f;

  load_chunk<kVec>(xrow, start, len, L, sx + kHalo);
  if (threadIdx.x < kHalo) sx[threadIdx.x] = input_at<W>(xrow, init_row, start - kHalo + threadIdx.x);
  __syncthreads();

  // Position start + p0 + e needs xx at start + p0 + e - (W-1) + j: window index e + kHalo - (W-1) + j.
  const int p0 = threadIdx.x * kPer;
  float win[kWindow];
  read_window(sx + p0, win);
  float out[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    float acc = b;
#pragma unroll
    for (int j = 0; j < W; ++j) acc = fmaf(w[j], win[e + kHalo - (W - 1) + j], acc);
    out[e] = act_any(act_code, acc);
  }
  if constexpr (kVec == 1) __syncthreads();  // sx becomes the staging buffer; all windows are read
  store_chunk<kVec>(y + int64_t{row} * L, start, L, out, sx + kHalo);
}

// Writes grad_x, grad_initial_state (first chunk, when init), and partials row
// (b * nchunks + chunk) * channels + c of [B * nchunks * channels, W + 1]: this block's sums of
// gp * xx[t + j] (j < W) and of gp (j = W).
template <typename T, int W, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_bwd_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ weight,
                             const T* __restrict__ bias, const T* __restrict__ init, T* __restrict__ grad_x,
                             T* __restrict__ grad_init, float* __restrict__ partials, int channels, int64_t L,
                             unsigned nchunks, int act_code) {
  static_assert(W >= 2 && W - 1 <= kHalo, "kernel width 2..kHalo+1");
  // sx[i] = xx at position start - kHalo + i, i < kHalo + len + kHalo.
  // sg[i] = grad_y, then gp, at position start + i, i < len + kHalo (0 at positions >= L).
  __shared__ alignas(16) float sx[kHalo + kMaxChunk + kHalo];
  __shared__ alignas(16) float sg[kMaxChunk + kHalo];
  __shared__ float red[kMaxWarps][W + 1];
  const unsigned row = blockIdx.x / nchunks;
  const unsigned chunk = blockIdx.x - row * nchunks;
  const unsigned batch = row / static_cast<unsigned>(channels);
  const int c = static_cast<int>(row - batch * static_cast<unsigned>(channels));
  const int len = blockDim.x * kPer;
  const int64_t start = int64_t{chunk} * len;
  const T* xrow = x + int64_t{row} * L;
  const T* gyrow = grad_y + int64_t{row} * L;
  const T* init_row = init ? init + int64_t{row} * (W - 1) : nullptr;
  const int tid = threadIdx.x;

  float w[W];
#pragma unroll
  for (int j = 0; j < W; ++j) w[j] = static_cast<float>(weight[int64_t{c} * W + j]);
  const float b = bias ? static_cast<float>(bias[c]) : 0.f;

  load_chunk<kVec>(xrow, start, len, L, sx + kHalo);
  load_chunk<kVec>(gyrow, start, len, L, sg);
  if (tid < kHalo) {  // left halo of x
    sx[tid] = input_at<W>(xrow, init_row, start - kHalo + tid);
  } else if (tid < 2 * kHalo) {  // right halo of x
    const int r = tid - kHalo;
    const int64_t t = start + len + r;
    sx[kHalo + len + r] = t < L ? static_cast<float>(xrow[t]) : 0.f;
  } else if (tid < 3 * kHalo) {  // right halo of grad_y
    const int r = tid - 2 * kHalo;
    const int64_t t = start + len + r;
    sg[len + r] = t < L ? static_cast<float>(gyrow[t]) : 0.f;
  }
  __syncthreads();

  // gp at the thread's positions (in place of its grad_y slots, which no other thread reads), and the
  // sums for grad_w and grad_bias. Position start + p0 + e needs xx at window index e + kHalo - (W-1) + j.
  const int p0 = tid * kPer;
  float acc[W + 1] = {};
  {
    float win[kWindow];
    read_window(sx + p0, win);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      float pre = b;
#pragma unroll
      for (int j = 0; j < W; ++j) pre = fmaf(w[j], win[e + kHalo - (W - 1) + j], pre);
      // 0 at positions >= L (explicitly: act' of a pre made of inf inputs may be NaN there).
      const float g = start + p0 + e < L ? sg[p0 + e] * act_grad_any(act_code, pre) : 0.f;
      sg[p0 + e] = g;
#pragma unroll
      for (int j = 0; j < W; ++j) acc[j] = fmaf(g, win[e + kHalo - (W - 1) + j], acc[j]);
      acc[W] += g;
    }
  }
  if (tid < W - 1) {  // gp in the right halo: position start + len + tid
    float pre = b;
#pragma unroll
    for (int j = 0; j < W; ++j) pre = fmaf(w[j], sx[len + tid + kHalo - (W - 1) + j], pre);
    sg[len + tid] = start + len + tid < L ? sg[len + tid] * act_grad_any(act_code, pre) : 0.f;
  }
  __syncthreads();  // gp complete; sx is no longer read, and serves as staging for grad_x below

  // grad_x at position start + p0 + e = sum_j w[j] gp[start + p0 + e + W-1 - j].
  float gx[kPer];
  {
    float win[kWindow];
    read_window(sg + p0, win);
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < W; ++j) s = fmaf(w[j], win[e + (W - 1) - j], s);
      gx[e] = s;
    }
  }
  if (grad_init && chunk == 0 && tid < W - 1) {  // xx index tid: sum over j <= tid of w[j] gp[tid - j]
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      if (j <= tid) s = fmaf(w[j], sg[tid - j], s);
    }
    grad_init[int64_t{row} * (W - 1) + tid] = static_cast<T>(s);
  }

  // Block sums in a fixed order: shuffle tree in each warp, then the warps in order.
  const int lane = tid % 32;
  const int warp = tid / 32;
#pragma unroll
  for (int k = 0; k <= W; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], offset);
    if (lane == 0) red[warp][k] = acc[k];
  }
  __syncthreads();
  if (tid <= W) {
    float total = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += red[i][tid];
    partials[((int64_t{batch} * nchunks + chunk) * channels + c) * (W + 1) + tid] = total;
  }

  store_chunk<kVec>(grad_x + int64_t{row} * L, start, L, gx, sx + kHalo);
}

// grad_w[c, j] (j < W) and grad_bias[c] (j = W, when grad_bias) = sum over i of partials[i][c][j],
// partials [num, channels, W + 1] fp32. Thread row y adds i = y, y + 16, ... in order, then the 16
// results are added in order: the same order on every run.
template <typename T, int W>
__global__ void causal_conv1d_reduce_kernel(const float* __restrict__ partials, int64_t num, int channels,
                                            T* __restrict__ grad_w, T* __restrict__ grad_bias) {
  __shared__ float smem[16][33];
  const int64_t cols = int64_t{channels} * (W + 1);
  const int64_t h = int64_t{blockIdx.x} * 32 + threadIdx.x;
  float acc = 0.f;
  if (h < cols) {
    for (int64_t i = threadIdx.y; i < num; i += 16) acc += partials[i * cols + h];
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && h < cols) {
    float total = 0.f;
    for (int y = 0; y < 16; ++y) total += smem[y][threadIdx.x];
    const int64_t c = h / (W + 1);
    const int j = static_cast<int>(h - c * (W + 1));
    if (j < W) {
      grad_w[c * W + j] = static_cast<T>(total);
    } else if (grad_bias) {
      grad_bias[c] = static_cast<T>(total);
    }
  }
}

// ---- launch helpers ---------------------------------------------------------------------------

struct Launch {
  int threads;        // block size
  unsigned nchunks;   // chunks per row
  unsigned blocks;    // rows * nchunks
};

Launch make_launch(int64_t rows, int64_t L) {
  const int64_t need = ceil_div(ceil_div(L, kPer), 32) * 32;
  const int threads = static_cast<int>(std::clamp<int64_t>(need, 32, kMaxThreads));
  const int64_t nchunks = ceil_div(L, int64_t{threads} * kPer);
  TORCH_CHECK(rows * nchunks <= INT32_MAX, "causal_conv1d: x too large (", rows, " rows of ", L,
              " positions); at most 2^31 - 1 blocks of ", threads * kPer, " positions");
  return {threads, static_cast<unsigned>(nchunks), static_cast<unsigned>(rows * nchunks)};
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Calls f(std::integral_constant<int, W>()) for W in 2..4.
template <typename F>
void dispatch_width(int64_t width, const F& f) {
  switch (width) {
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    default: TORCH_CHECK(false, "causal_conv1d: kernel width must be 2, 3 or 4, got ", width);
  }
}

template <typename T>
const T* opt_data(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// ---- argument checks (second line of defence: the Python op validates first) -------------------

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous(),
              "causal_conv1d: ", name, " must be a contiguous ", x.scalar_type(), " tensor on ", x.device(),
              " (as x), got ", t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : ", non-contiguous");
}

void check_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& initial_state, int64_t activation) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(),
              "causal_conv1d: x must be a contiguous 3-D CUDA tensor [B, C, L], got a ",
              x.is_contiguous() ? "" : "non-contiguous ", x.dim(), "-D tensor of shape ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "causal_conv1d: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(C <= INT32_MAX && B * C <= INT32_MAX, "causal_conv1d: x must have fewer than 2^31 rows (B * C), got ",
              x.sizes());
  check_like_x(w, "weight", x);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == C && w.size(1) >= 2 && w.size(1) <= 4,
              "causal_conv1d: weight must be [C, W] with C = ", C, " and W in 2..4, got shape ", w.sizes());
  if (bias) {
    check_like_x(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "causal_conv1d: bias must have shape (", C, ",), got ",
                bias->sizes());
  }
  if (initial_state) {
    check_like_x(*initial_state, "initial_state", x);
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == B && initial_state->size(1) == C &&
                    initial_state->size(2) == w.size(1) - 1,
                "causal_conv1d: initial_state must be [B, C, W-1] = [", B, ", ", C, ", ", w.size(1) - 1, "], got ",
                initial_state->sizes());
  }
  TORCH_CHECK(activation >= 0 && activation <= 4, "causal_conv1d: activation code must be 0..4, got ", activation);
}

}  // namespace

at::Tensor causal_conv1d_fwd_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check_args(x, w, bias, initial_state, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;

  const int channels = static_cast<int>(x.size(1));
  const int64_t L = x.size(2);
  const Launch launch = make_launch(x.size(0) * x.size(1), L);
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv1d_fwd_cuda", [&] {
    using T = scalar_t;
    const bool vectorized = L % (16 / sizeof(T)) == 0 && aligned16(x) && aligned16(y);
    dispatch_width(w.size(1), [&](auto width) {
      dispatch_vec<T>(vectorized, [&](auto vec) {
        causal_conv1d_fwd_kernel<T, decltype(width)::value, decltype(vec)::value>
            <<<launch.blocks, launch.threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                x.data_ptr<T>(), w.data_ptr<T>(), opt_data<T>(bias), opt_data<T>(initial_state), y.data_ptr<T>(),
                channels, L, launch.nchunks, static_cast<int>(activation));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::vector<at::Tensor> causal_conv1d_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check_args(x, w, bias, initial_state, activation);
  check_like_x(grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "causal_conv1d: grad_y must have x's shape ", x.sizes(), ", got ",
              grad_y.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(w.sizes(), w.options());
  at::Tensor grad_bias = bias ? at::empty({x.size(1)}, bias->options()) : at::empty({0}, x.options());
  at::Tensor grad_init =
      initial_state ? at::empty(initial_state->sizes(), initial_state->options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {  // no positions (or no rows): every gradient is 0
    grad_w.zero_();
    grad_bias.zero_();
    grad_init.zero_();
    return {grad_x, grad_w, grad_bias, grad_init};
  }

  const int channels = static_cast<int>(x.size(1));
  const int64_t L = x.size(2);
  const Launch launch = make_launch(x.size(0) * x.size(1), L);
  const int64_t width = w.size(1);
  const int64_t num = x.size(0) * int64_t{launch.nchunks};  // partial rows per channel
  at::Tensor partials = at::empty({num, channels, width + 1}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "causal_conv1d_bwd_cuda", [&] {
    using T = scalar_t;
    const bool vectorized = L % (16 / sizeof(T)) == 0 && aligned16(x) && aligned16(grad_y) && aligned16(grad_x);
    dispatch_width(width, [&](auto width_c) {
      constexpr int W = decltype(width_c)::value;
      dispatch_vec<T>(vectorized, [&](auto vec) {
        causal_conv1d_bwd_kernel<T, W, decltype(vec)::value><<<launch.blocks, launch.threads, 0, stream>>>(
            grad_y.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<T>(), opt_data<T>(bias), opt_data<T>(initial_state),
            grad_x.data_ptr<T>(), initial_state ? grad_init.data_ptr<T>() : nullptr, partials.data_ptr<float>(),
            channels, L, launch.nchunks, static_cast<int>(activation));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      const auto blocks = static_cast<unsigned>(ceil_div(int64_t{channels} * (W + 1), 32));
      causal_conv1d_reduce_kernel<T, W><<<blocks, dim3(32, 16), 0, stream>>>(
          partials.data_ptr<float>(), num, channels, grad_w.data_ptr<T>(), bias ? grad_bias.data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_w, grad_bias, grad_init};
}

}  // namespace bignlp_fast

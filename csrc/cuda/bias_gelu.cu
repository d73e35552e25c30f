// Fused bias add + GELU on CUDA: bias_gelu_fwd_cuda / bias_gelu_bwd_cuda (see ops.h).
//
// Forward: y = gelu(x + bias). Backward: grad_x = grad_y * gelu'(x + bias), and grad_bias, the column
// sums of grad_x: each block accumulates its rows in registers and writes one row of fp32 partial
// sums [blocks, H]; sum_partials_kernel adds those rows in a fixed order (no atomics), so the result
// is the same from run to run.
//
// Work layout (ColumnTiling): blockDim.x threads cover a tile of the columns of a row, one vector of
// kVec elements each, and blockDim.y rows; gridDim.x tiles cover a row and blocks grid-stride over the
// rows, so a thread loads its bias vector once and always owns the same columns. kVec = 16 bytes /
// sizeof(T) when H and every pointer allow 16-byte accesses, 1 otherwise. All math is fp32.
//
// --use_fast_math (set by setup.py) turns expf into ex2.approx(x * log2(e)) and tanhf into
// tanh.approx (about 11 bits), so the tanh form is computed through an accurate exp instead:
// 0.5 (1 + tanh(u)) = sigmoid(2u). erff and the __f*_rn intrinsics are not affected.
#include <algorithm>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;  // threads per block


// exp(x) for x <= 0 to a few ulp, whatever --use_fast_math does to expf: the reduction
// x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two so that n * ln2_hi is exact) leaves ex2.approx a
// small argument, whose rounding no longer grows with |x|; ldexpf scales by 2^n exactly.
__device__ __forceinline__ float exp_nonpositive(float x) {
  x = fmaxf(x, -104.f);  // exp(-104) rounds to 0 in fp32; keeps n in int range (also for -inf)
  const float n = rintf(x * 1.44269504f);
  float r = fmaf(n, -0.693145752f, x);  // ln2_hi = 0x3f317200
  r = fmaf(n, -1.42860677e-6f, r);      // ln2_lo = ln2 - ln2_hi
  return ldexpf(exp2f(r * 1.44269504f), static_cast<int>(n));
}

// y = gelu(v) and dydv = gelu'(v), erf form or tanh form. Callers that need only y let the compiler
// drop dydv.
template <bool kTanh>
__device__ __forceinline__ void gelu(float v, float& y, float& dydv) {
  if constexpr (kTanh) {
    // y = 0.5 v (1 + tanh(u)) = v sigmoid(z), z = 2u, u = sqrt(2/pi) (v + 0.044715 v^3). With
    // e = exp(-|z|) in (0, 1], which cannot overflow: sigmoid(z) = 1 / (1 + e) for z >= 0 and
    // e / (1 + e) for z < 0, and sigmoid'(z) = e / (1 + e)^2 for both.
    constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kKappa = 0.044715f;
    const float z = 2.f * (kBeta * (v + kKappa * v * v * v));
    const float e = exp_nonpositive(-fabsf(z));
    const float r = __frcp_rn(1.f + e);
    const float sig = z >= 0.f ? r : e * r;
    y = v * sig;
    dydv = sig + v * (e * r * r) * (2.f * kBeta) * (1.f + 3.f * kKappa * v * v);
  } else {
    // y = v Phi(v), Phi(v) = 0.5 (1 + erf(v / sqrt(2))); y' = Phi(v) + v exp(-v^2 / 2) / sqrt(2 pi).
    constexpr float kSqrtHalf = 0.7071067811865476f;    // 1 / sqrt(2)
    constexpr float kInvSqrt2Pi = 0.3989422804014327f;  // 1 / sqrt(2 pi)
    const float cdf = 0.5f * (1.f + erff(v * kSqrtHalf));
    y = v * cdf;
    dydv = cdf + v * kInvSqrt2Pi * exp_nonpositive(-0.5f * v * v);
  }
}

// ---- kernels ----------------------------------------------------------------------------------

// y = gelu(x + bias). x, y: [rows, nvec * kVec]; bias: [nvec * kVec] or null.
template <typename T, int kVec, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y, int64_t rows,
                         int nvec) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;  // vector column
  if (col >= nvec) return;
  float b[kVec] = {};
  if (bias) load_vec<kVec>(bias, col, b);
  for (int64_t row = int64_t{blockIdx.y} * blockDim.y + threadIdx.y; row < rows;
       row += int64_t{gridDim.y} * blockDim.y) {
    float v[kVec], out[kVec], unused;
    load_vec<kVec>(x, row * nvec + col, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) gelu<kTanh>(v[e] + b[e], out[e], unused);
    store_vec<kVec>(y, row * nvec + col, out);
  }
}

// grad_x = grad_y * gelu'(x + bias). grad_y, x, grad_x: [rows, nvec * kVec]; bias: [nvec * kVec] or
// null. With bias, also writes this block's column sums of grad_x (fp32, before rounding to T) as
// row blockIdx.y of bias_partials [gridDim.y, nvec * kVec].
template <typename T, int kVec, bool kTanh>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_bwd_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                         T* __restrict__ grad_x, float* __restrict__ bias_partials, int64_t rows, int nvec) {
  __shared__ float smem[kThreads * kVec];  // [blockDim.y, blockDim.x * kVec] column sums per thread row
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = col < nvec;  // no early return: the block synchronizes below
  float b[kVec] = {};
  if (bias && active) load_vec<kVec>(bias, col, b);
  float acc[kVec] = {};
  for (int64_t row = int64_t{blockIdx.y} * blockDim.y + threadIdx.y; active && row < rows;
       row += int64_t{gridDim.y} * blockDim.y) {
    float dy[kVec], v[kVec], dx[kVec], unused;
    load_vec<kVec>(grad_y, row * nvec + col, dy);
    load_vec<kVec>(x, row * nvec + col, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float dgelu;
      gelu<kTanh>(v[e] + b[e], unused, dgelu);
      dx[e] = dy[e] * dgelu;
      acc[e] += dx[e];
    }
    store_vec<kVec>(grad_x, row * nvec + col, dx);
  }
  if (!bias_partials) return;  // the same for every thread of the block

  // Add the blockDim.y thread rows' sums in order.
  const int width = blockDim.x * kVec;
#pragma unroll
  for (int e = 0; e < kVec; ++e) smem[threadIdx.y * width + threadIdx.x * kVec + e] = acc[e];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float total = 0.f;
      for (int r = 0; r < blockDim.y; ++r) total += smem[r * width + threadIdx.x * kVec + e];
      bias_partials[int64_t{blockIdx.y} * nvec * kVec + col * kVec + e] = total;
    }
  }
}


// ---- launchers --------------------------------------------------------------------------------

// Block shape and column tiles for rows of nvec vectors: up to kThreads vectors per tile, tiles of
// equal width, and as many rows per block as fill kThreads threads.
struct ColumnTiling {
  dim3 block;
  int tiles;
};

ColumnTiling make_tiling(int nvec) {
  const int tiles = static_cast<int>(ceil_div(nvec, kThreads));
  const int width = static_cast<int>(ceil_div(nvec, tiles));
  return {dim3(width, std::max(1, kThreads / width)), tiles};
}

// Row blocks (gridDim.y) of a grid-stride launch: at most what the rows need and 65535, and for
// the backward at most what fits on the device at once, so that each block sums many rows.
template <typename Kernel>
unsigned row_blocks(Kernel kernel, const ColumnTiling& t, int64_t rows, bool fit_device) {
  int64_t blocks = std::min<int64_t>(ceil_div(rows, t.block.y), 65535);
  if (fit_device) {
    int per_sm = 0;
    int sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, t.block.x * t.block.y, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, int64_t{std::max(per_sm, 1)} * sms / t.tiles));
  }
  return static_cast<unsigned>(blocks);
}

template <typename T, int kVec, bool kTanh>
void launch_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int nvec = static_cast<int>(x.size(1) / kVec);
  const ColumnTiling t = make_tiling(nvec);
  const auto kernel = bias_gelu_fwd_kernel<T, kVec, kTanh>;
  const dim3 grid(t.tiles, row_blocks(kernel, t, x.size(0), false));
  kernel<<<grid, t.block, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>(), x.size(0), nvec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the backward; returns the [row blocks, H] partial sums of grad_bias (undefined without bias).
template <typename T, int kVec, bool kTanh>
at::Tensor launch_bwd(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                      at::Tensor& grad_x) {
  const int nvec = static_cast<int>(x.size(1) / kVec);
  const ColumnTiling t = make_tiling(nvec);
  const auto kernel = bias_gelu_bwd_kernel<T, kVec, kTanh>;
  const dim3 grid(t.tiles, row_blocks(kernel, t, x.size(0), bias.has_value()));
  at::Tensor partials;
  if (bias) partials = at::empty({grid.y, x.size(1)}, x.options().dtype(at::kFloat));
  kernel<<<grid, t.block, 0, at::cuda::getCurrentCUDAStream()>>>(
      grad_y.data_ptr<T>(), x.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, grad_x.data_ptr<T>(),
      bias ? partials.data_ptr<float>() : nullptr, x.size(0), nvec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

// Calls f(std::integral_constant<int, kVec>(), std::bool_constant<tanh>()) with kVec = 16 bytes of T
// when every tensor allows 16-byte accesses, else 1.
template <typename T, typename F>
void dispatch_vec_tanh(bool vectorized, bool tanh_approx, const F& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (vectorized) {
    tanh_approx ? f(std::integral_constant<int, kVec>(), std::true_type())
                : f(std::integral_constant<int, kVec>(), std::false_type());
  } else {
    tanh_approx ? f(std::integral_constant<int, 1>(), std::true_type())
                : f(std::integral_constant<int, 1>(), std::false_type());
  }
}

// ---- argument checks (second line of defence: the Python op validates first) -------------------

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), "bias_gelu: ", name,
              " must be a contiguous 2-D CUDA tensor, got a ", t.is_contiguous() ? "" : "non-contiguous ", t.dim(),
              "-D tensor of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "bias_gelu: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= INT32_MAX, "bias_gelu: ", name, " must have fewer than 2^31 columns, got ", t.size(1));
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous() &&
                  bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
              "bias_gelu: bias must be a contiguous 1-D tensor of ", x.size(1), " ", x.scalar_type(), " on ",
              x.device(), ", got shape ", bias->sizes(), ", ", bias->scalar_type(), ", ", bias->device(),
              bias->is_contiguous() ? "" : ", non-contiguous");
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool vectorizable(int64_t hidden, int64_t vec, std::initializer_list<const at::Tensor*> tensors) {
  return hidden % vec == 0 &&
         std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) { return !t || aligned16(*t); });
}

}  // namespace

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_rows(x, "x");
  check_bias(bias, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;

  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "bias_gelu_fwd_cuda", [&] {
    using T = scalar_t;
    const bool vectorized = vectorizable(x.size(1), 16 / sizeof(T), {&x, bias ? &*bias : nullptr, &y});
    dispatch_vec_tanh<T>(vectorized, tanh_approx, [&](auto vec, auto use_tanh) {
      launch_fwd<T, decltype(vec)::value, decltype(use_tanh)::value>(x, bias, y);
    });
  });
  return y;
}

std::vector<at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                           const std::optional<at::Tensor>& bias, bool tanh_approx) {
  check_rows(x, "x");
  check_rows(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "bias_gelu: grad_y must match x (shape ", x.sizes(), ", ", x.scalar_type(), ", ", x.device(),
              "), got shape ", grad_y.sizes(), ", ", grad_y.scalar_type(), ", ", grad_y.device());
  check_bias(bias, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_bias = bias ? at::empty({x.size(1)}, bias->options()) : at::empty({0}, x.options());
  if (x.size(0) == 0 || x.size(1) == 0) return {grad_x, grad_bias.zero_()};

  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "bias_gelu_bwd_cuda", [&] {
    using T = scalar_t;
    const bool vectorized =
        vectorizable(x.size(1), 16 / sizeof(T), {&grad_y, &x, bias ? &*bias : nullptr, &grad_x});
    at::Tensor partials;
    dispatch_vec_tanh<T>(vectorized, tanh_approx, [&](auto vec, auto use_tanh) {
      partials = launch_bwd<T, decltype(vec)::value, decltype(use_tanh)::value>(grad_y, x, bias, grad_x);
    });
    if (bias) sum_partials(partials, grad_bias);
  });
  return {grad_x, grad_bias};
}

}  // namespace bignlp_fast

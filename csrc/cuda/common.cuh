// Pieces shared by the CUDA kernels: the dtype dispatch, 16-byte vector loads and stores with fp32
// math, and the deterministic column sum of per-block partial sums (weight and bias gradients).
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace bignlp_fast::cuda {

// The three dtypes the kernels take; all arithmetic is fp32.
#define BIGNLP_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(std::integral_constant<int, kVec>()) with kVec = 16 bytes of T when vectorized, else 1.
template <typename T, typename F>
void dispatch_vec(bool vectorized, const F& f) {
  if (vectorized) {
    f(std::integral_constant<int, 16 / static_cast<int>(sizeof(T))>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

// ---- device helpers ---------------------------------------------------------------------------

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Element vector i (kVec elements starting at p + i * kVec) as fp32, and back.
template <int kVec, typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, float (&out)[kVec]) {
  const Vec<T, kVec> in = reinterpret_cast<const Vec<T, kVec>*>(p)[i];
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = static_cast<float>(in.v[e]);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const float (&in)[kVec]) {
  Vec<T, kVec> out;
#pragma unroll
  for (int e = 0; e < kVec; ++e) out.v[e] = static_cast<T>(in[e]);
  reinterpret_cast<Vec<T, kVec>*>(p)[i] = out;
}

// out[h] = sum over i of partials[i][h], fp32 partials [num, hidden]. Thread row y adds i = y, y + 16,
// ... in order, then the 16 results are added in order: the same order on every run.
template <typename W>
__global__ void sum_partials_kernel(const float* __restrict__ partials, W* __restrict__ out, int64_t num,
                                    int hidden) {
  __shared__ float smem[16][33];
  const int h = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (h < hidden) {
    for (int64_t i = threadIdx.y; i < num; i += 16) acc += partials[i * hidden + h];
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && h < hidden) {
    float total = 0.f;
    for (int y = 0; y < 16; ++y) total += smem[y][threadIdx.x];
    out[h] = static_cast<W>(total);
  }
}

// out [hidden] = column sums of partials [num, hidden].
inline void sum_partials(const at::Tensor& partials, at::Tensor& out) {
  const int hidden = static_cast<int>(out.numel());
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "sum_partials", [&] {
    const auto blocks = static_cast<unsigned>(ceil_div(hidden, 32));
    sum_partials_kernel<scalar_t><<<blocks, dim3(32, 16), 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<float>(), out.data_ptr<scalar_t>(), partials.size(0), hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace bignlp_fast::cuda

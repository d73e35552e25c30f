// A CUDA execution model on the CPU, for running csrc/cuda/*.cu where no GPU is present (tests only).
//
// The kernels are compiled by the host compiler after a small source rewrite (tests/cuda_emu/build.py):
// `kernel<<<grid, block, smem, stream>>>(args)` becomes `::emu::launch(kernel, grid, block, smem,
// stream)(args)`, `extern __shared__ T name[];` a pointer to the block's dynamic shared memory, PTX `asm`
// statements calls into emu::ptx, and `.is_cuda()` `.is_cpu()` (the tensors are CPU tensors). Headers
// named like CUDA's (cuda_fp16.h, mma.h, c10/cuda/*.h) are shadowed by the ones beside this file.
//
// Execution: the blocks of a grid run one after another; the threads of a block are fibers on one OS
// thread, each running until it reaches a synchronisation point (__syncthreads, __syncwarp, a shuffle, a
// WMMA load / store / mma), in thread order or, with emu::configure(reverse=true), in reverse. That is
// stricter than a GPU where it matters to correctness: a thread reads what another wrote only after a
// synchronisation both took part in, so a missing __syncthreads / __syncwarp shows up as stale data.
// Checked and reported as errors: launch limits (grid and block dimensions, shared memory, the opt-in
// attribute above 48 KiB, empty grids), __syncthreads reached from different lines by one block, warp
// operations reached by some lanes of a warp and not others, a lane exiting while its warp still
// shuffles, deadlocks, WMMA pointer alignment and leading dimensions. Shared memory starts as 0xff bytes
// (NaN as float or half) in every block, so reading what no thread wrote shows up.
// Not modelled: timing, memory coalescing, register limits, races between blocks, the tensor cores'
// rounding (mma accumulates in fp32 in k order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// ---- language ----------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __constant__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- 16-bit types: ATen's, whose conversions round to nearest even as CUDA's _rn intrinsics --------
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half(float x) { return __half(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

// ---- math --------------------------------------------------------------------------------------------
using std::isinf;
using std::isnan;
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float rsqrtf(float x) { return __frsqrt_rn(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// ---- runtime API -------------------------------------------------------------------------------------
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace emu {

// The emulated device: an H100-like sm_90 by default, with few SMs so that grids sized by the SM count
// stay small (configure() changes both).
struct Device {
  int sms = 4, major = 9, minor = 0;
  int max_shared_optin = 232448;  // 227 KiB
  int max_shared_default = 49152;
  int max_threads_per_sm = 2048, max_blocks_per_sm = 32;
  size_t shared_per_sm = 233472;
};
Device& device();

[[noreturn]] void fail(const std::string& message);

int device_attribute(cudaDeviceAttr attr);
void set_max_dynamic_shared(const void* kernel, int bytes);
int occupancy(const void* kernel, int threads, size_t dynamic_shared);

struct Config {
  dim3 grid, block;
  size_t shared;
};
// Runs body once per thread of every block of cfg's grid (body reads threadIdx, blockIdx, ...).
void run_grid(const Config& cfg, const void* kernel, const std::function<void()>& body);
// The current block's dynamic shared memory.
void* dynamic_shared();
// Called by every thread right after a static __shared__ declaration: fills it with 0xff once a block.
void poison_static_shared(void* p, size_t bytes);

// Synchronisation points (the current fiber waits for its block or warp).
void syncthreads(int line);
void syncwarp(unsigned mask, int line);
// Every lane in mask passes `bits`; the value of lane src (of this lane's warp) comes back.
uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane, int line);
int lane_id();
// A __syncwarp that returns the warp's sequence number of the operation, and scratch memory of the
// current warp for it: *first is true for the first lane that asks, which fills it for the others
// (WMMA loads and products are computed once per warp).
constexpr size_t kWarpScratchBytes = 16 * 16 * 4;
uint64_t syncwarp_seq(int line);
void* warp_scratch(uint64_t seq, size_t bytes, bool* first);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  Config cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // copied, as CUDA does
    run_grid(cfg, reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, Config{grid, block, shared}};
}

struct CurrentStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

namespace ptx {
// rcp.approx.ftz.f32: an approximate reciprocal (within 1 ulp), subnormals flushed to zero.
inline void rcp_approx_ftz_f32(float& r, float d) {
  if (std::fpclassify(d) == FP_SUBNORMAL) d = std::copysign(0.f, d);
  r = 1.f / d;
  if (std::fpclassify(r) == FP_SUBNORMAL) r = std::copysign(0.f, r);
}
}  // namespace ptx

}  // namespace emu

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = emu::device_attribute(attr);
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute /*attr*/, int value) {
  emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K* kernel, int threads, size_t shared) {
  *blocks = emu::occupancy(reinterpret_cast<const void*>(kernel), threads, shared);
  return cudaSuccess;
}

// ---- intrinsics that synchronise ------------------------------------------------------------------------
#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __syncwarp(...) ::emu::syncwarp(::emu::mask_or_all(__VA_ARGS__), __LINE__)
namespace emu {
inline unsigned mask_or_all() { return 0xffffffffu; }
inline unsigned mask_or_all(unsigned mask) { return mask; }
}  // namespace emu

namespace emu {
template <typename T>
T shuffle(int line, unsigned mask, T value, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(mask, bits, src, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline int xor_lane(int lane_mask, int width = 32) {
  const int lane = lane_id();
  return (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
}
inline int src_lane(int src, int width = 32) { return (lane_id() & ~(width - 1)) | (src & (width - 1)); }
}  // namespace emu

// Macros, so that the emulation's messages name the kernel's line.
#define __shfl_xor_sync(mask, value, ...) ::emu::shuffle(__LINE__, mask, value, ::emu::xor_lane(__VA_ARGS__))
#define __shfl_sync(mask, value, ...) ::emu::shuffle(__LINE__, mask, value, ::emu::src_lane(__VA_ARGS__))

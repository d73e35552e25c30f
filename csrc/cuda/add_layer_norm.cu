// Fused residual add + LayerNorm on CUDA: add_layer_norm_fwd_cuda / add_layer_norm_bwd_cuda (see ops.h).
//
// Forward, per row: s = x + residual added in fp32 and rounded to T, mean and rstd of that s (two passes over the row held in
// registers, never E[s^2] - mean^2), out = (s - mean) * rstd * weight + bias.
// Backward, per row: with g = grad_out * weight and xhat = (s - mean) * rstd,
// grad_s = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat)) + grad_residual_out. grad_weight and
// grad_bias are column sums: each block accumulates its rows in registers and writes one row of
// fp32 partial sums [blocks, H]; sum_partials_kernel adds those rows in a fixed order (no atomics),
// so the result is the same from run to run.
//
// Work layout (RowTiling): a row is handled by a team of `team` threads, a power of two from 1 to
// kMaxThreads; blocks of max(team, kMinThreads) threads hold several teams, each on its own row, and
// grid-stride over the rows. A thread keeps `kIters` vectors of kVec elements of its row in registers:
// kVec = 16 bytes / sizeof(T) when the hidden size and every pointer allow 16-byte accesses, 1
// otherwise. Team sums use warp shuffles, and shared memory between the warps of a team wider than 32.
// A row too long for one block's registers is split into column chunks (gridDim.y); its row
// statistics then come from a separate pass over the row (the *_stats kernels).
#include <algorithm>
#include <cstdint>
#include <type_traits>

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

constexpr int kMaxThreads = 512;  // largest block, and largest team
constexpr int kMinThreads = 256;  // teams smaller than this share a block of this size
constexpr int kMaxWarps = kMaxThreads / 32;
// Register budget per thread: at most kElems row elements (fp32) in at most kMaxIters vectors (each
// vector also costs an address and a predicate, which makes long scalar rows spill).
constexpr int kFwdElems = 32, kFwdMaxIters = 8;  // forward: one cached value per element
constexpr int kBwdElems = 16, kBwdMaxIters = 4;  // backward: two cached values and two column sums


// A thread's share of a row: vectors first + k * stride for k < kIters, of which those with
// k * stride < count exist.
//
// load_slice calls f(k, e, value) for element e of each vector of p in the share (0 for the vectors
// that do not exist). All loads are issued before the first f: a loop body of one predicated load
// lets the compiler keep every load in flight at once, where a branch around each vector's load and
// math would cost one memory round trip per vector.
template <int kVec, int kIters, typename T, typename F>
__device__ __forceinline__ void load_slice(const T* p, int64_t first, int stride, int count, F f) {
  Vec<T, kVec> raw[kIters] = {};
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    if (k * stride < count) raw[k] = reinterpret_cast<const Vec<T, kVec>*>(p)[first + k * stride];
  }
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) f(k, e, static_cast<float>(raw[k].v[e]));
  }
}

template <int kVec, int kIters, typename T>
__device__ __forceinline__ void store_slice(T* p, int64_t first, int stride, int count,
                                            const float (&in)[kIters][kVec]) {
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    if (k * stride < count) store_vec<kVec>(p, first + k * stride, in[k]);
  }
}

// acc += element vector i of p, and acc *= element vector i of p.
template <int kVec, typename T>
__device__ __forceinline__ void add_vec(const T* p, int64_t i, float (&acc)[kVec]) {
  float in[kVec];
  load_vec<kVec>(p, i, in);
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] += in[e];
}

template <int kVec, typename T>
__device__ __forceinline__ void mul_vec(const T* p, int64_t i, float (&acc)[kVec]) {
  float in[kVec];
  load_vec<kVec>(p, i, in);
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] *= in[e];
}

// Sums each v[k] over the `team` threads of a row and gives every one of them the total. The order
// of the additions depends only on the team size. Every thread of the block must call it (it
// synchronizes the block when team > 32); smem holds K * kMaxWarps floats.
template <int K>
__device__ __forceinline__ void team_sum(float (&v)[K], int team, float* smem) {
  for (int offset = min(team, 32) / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  if (team <= 32) return;
  const int warp = threadIdx.x / 32;
  const int team_warps = team / 32;
  const int first = warp / team_warps * team_warps;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * kMaxWarps + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float total = 0.f;
    for (int w = first; w < first + team_warps; ++w) total += smem[k * kMaxWarps + w];
    v[k] = total;
  }
  __syncthreads();  // smem is reused by the next call
}

// How rows of `nvec` vectors are spread over threads (see the comment at the top of the file).
struct RowTiling {
  int64_t rows;
  int nvec;   // vectors of kVec elements per row
  int team;   // threads per row; blockDim.x / team rows per block
  int chunk;  // vectors per column chunk; gridDim.y = ceil(nvec / chunk) chunks
  int iters;  // vectors per thread per chunk, a power of two (the kernels' kIters; host only)
};

// The smallest team that holds a row with at most max_iters vectors per thread; rows longer than
// kMaxThreads * max_iters vectors are split into equal column chunks that each fit.
RowTiling make_tiling(int64_t rows, int nvec, int max_iters) {
  const int chunks = static_cast<int>(ceil_div(nvec, kMaxThreads * max_iters));
  TORCH_CHECK(chunks <= 65535, "add_layer_norm: rows of ", nvec, " vectors are too long for the CUDA kernels");
  const int chunk = static_cast<int>(ceil_div(nvec, chunks));
  int team = 1;
  while (ceil_div(chunk, team) > max_iters) team *= 2;
  int iters = 1;
  while (iters * team < chunk) iters *= 2;
  return {rows, nvec, team, chunk, iters};
}

// Calls f(std::integral_constant<int, iters>()) for iters a power of two <= kMax.
template <int kMax, int kIters = 1, typename F>
void dispatch_iters(int iters, const F& f) {
  if (iters == kIters) {
    f(std::integral_constant<int, kIters>());
  } else if constexpr (kIters < kMax) {
    dispatch_iters<kMax, kIters * 2>(iters, f);
  } else {
    TORCH_INTERNAL_ASSERT(false, "add_layer_norm: no kernel for ", iters, " vectors per thread");
  }
}

// Blocks of a grid-stride kernel that fit on the current device at once (at least one per SM).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t smem_bytes) {
  int per_sm = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return int64_t{std::max(per_sm, 1)} * sms;
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
struct FwdParams {
  const T* x;         // [rows, hidden]
  const T* residual;  // [rows, hidden], or null: s = x
  const T* weight;    // [hidden], or null: 1
  const T* bias;      // [hidden], or null: 0
  T* out;             // [rows, hidden]
  T* residual_out;    // [rows, hidden]: s in T, written when residual is given
  float* mean;        // [rows]
  float* rstd;        // [rows]
  float inv_hidden;   // 1 / hidden
  float eps;
};

// Rounds an fp32 value to T's precision (round to nearest even) and back; identity for float.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// s = x + residual for element vector i of the [rows, hidden] inputs: added in fp32, rounded to T.
// The rounded s is what residual_out stores and what the backward sees, so it is what is normalised.
template <int kVec, typename T>
__device__ __forceinline__ void load_s(const FwdParams<T>& p, int64_t i, float (&s)[kVec]) {
  load_vec<kVec>(p.x, i, s);
  if (p.residual) {
    add_vec<kVec>(p.residual, i, s);
#pragma unroll
    for (int e = 0; e < kVec; ++e) s[e] = round_to<T>(s[e]);
  }
}

// out and residual_out for the columns of chunk blockIdx.y of each row; one team per row. Thread
// `lane` of a team holds vectors lane + k * team (k < kIters) of the chunk. Without stats_ready,
// mean and rstd are computed from the registers and written; with it (rows split into chunks) they
// were written by add_layer_norm_stats_kernel and are read.
template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kMaxThreads)
    add_layer_norm_fwd_kernel(FwdParams<T> p, RowTiling t, bool stats_ready) {
  __shared__ float smem[kMaxWarps];
  const int rows_per_block = blockDim.x / t.team;
  const int slot = threadIdx.x / t.team;
  const int lane = threadIdx.x % t.team;
  const int col0 = blockIdx.y * t.chunk;
  const int ncols = min(t.chunk, t.nvec - col0);

  // The loop bound is the same for the whole block: team_sum may synchronize it.
  for (int64_t first = int64_t{blockIdx.x} * rows_per_block; first < t.rows;
       first += int64_t{gridDim.x} * rows_per_block) {
    const int64_t row = first + slot;
    const bool valid = row < t.rows;
    const int count = (valid ? ncols : 0) - lane;  // this thread holds vector k when k * team < count
    const int64_t pos = row * t.nvec + col0 + lane;  // its first vector in [rows, nvec]
    const int64_t col = col0 + lane;                // and that vector's column in [nvec]

    float s[kIters][kVec];
    load_slice<kVec, kIters>(p.x, pos, t.team, count, [&](int k, int e, float v) { s[k][e] = v; });
    if (p.residual) {
      load_slice<kVec, kIters>(p.residual, pos, t.team, count,
                               [&](int k, int e, float v) { s[k][e] = round_to<T>(s[k][e] + v); });
      store_slice<kVec, kIters>(p.residual_out, pos, t.team, count, s);
    }

    float mean, rstd;
    if (stats_ready) {
      mean = valid ? p.mean[row] : 0.f;
      rstd = valid ? p.rstd[row] : 0.f;
    } else {
      float sum[1] = {0.f};  // s is 0 in the vectors this thread does not hold
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum[0] += s[k][e];
      }
      team_sum(sum, t.team, smem);
      mean = sum[0] * p.inv_hidden;
      float sq[1] = {0.f};
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
        if (k * t.team < count) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sq[0] += (s[k][e] - mean) * (s[k][e] - mean);
        }
      }
      team_sum(sq, t.team, smem);
      rstd = __frsqrt_rn(sq[0] * p.inv_hidden + p.eps);
      if (valid && lane == 0) {
        p.mean[row] = mean;
        p.rstd[row] = rstd;
      }
    }

    // s becomes out = (s - mean) * rstd * weight + bias.
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) s[k][e] = (s[k][e] - mean) * rstd;
    }
    if (p.weight) {
      load_slice<kVec, kIters>(p.weight, col, t.team, count, [&](int k, int e, float v) { s[k][e] *= v; });
    }
    if (p.bias) {
      load_slice<kVec, kIters>(p.bias, col, t.team, count, [&](int k, int e, float v) { s[k][e] += v; });
    }
    store_slice<kVec, kIters>(p.out, pos, t.team, count, s);
  }
}

// mean and rstd of s = x + residual for rows split into column chunks: one block per row, two passes
// over the row (the second rereads x and residual, mostly from L2).
template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    add_layer_norm_stats_kernel(FwdParams<T> p, int64_t rows, int nvec) {
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float sum[1] = {0.f};
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      float s[kVec];
      load_s<kVec>(p, row * nvec + j, s);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum[0] += s[e];
    }
    team_sum(sum, blockDim.x, smem);
    const float mean = sum[0] * p.inv_hidden;
    float sq[1] = {0.f};
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      float s[kVec];
      load_s<kVec>(p, row * nvec + j, s);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float d = s[e] - mean;
        sq[0] += d * d;
      }
    }
    team_sum(sq, blockDim.x, smem);
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = __frsqrt_rn(sq[0] * p.inv_hidden + p.eps);
    }
  }
}

template <typename T, int kVec>
void launch_fwd(const FwdParams<T>& p, int64_t rows, int hidden) {
  constexpr int kMaxIters = std::min(kFwdElems / kVec, kFwdMaxIters);
  const RowTiling t = make_tiling(rows, hidden / kVec, kMaxIters);
  const int chunks = static_cast<int>(ceil_div(t.nvec, t.chunk));
  const int threads = std::max(t.team, kMinThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (chunks > 1) {
    const auto kernel = add_layer_norm_stats_kernel<T, kVec>;
    const auto blocks = static_cast<unsigned>(std::min(rows, resident_blocks(kernel, kMaxThreads, 0)));
    kernel<<<blocks, kMaxThreads, 0, stream>>>(p, rows, t.nvec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dispatch_iters<kMaxIters>(t.iters, [&](auto iters) {
    const auto kernel = add_layer_norm_fwd_kernel<T, kVec, decltype(iters)::value>;
    const int64_t row_groups = ceil_div(rows, threads / t.team);
    const auto blocks = static_cast<unsigned>(
        std::min(row_groups, std::max<int64_t>(1, resident_blocks(kernel, threads, 0) / chunks)));
    kernel<<<dim3(blocks, chunks), threads, 0, stream>>>(p, t, chunks > 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T>
struct BwdParams {
  const T* grad_out;           // [rows, hidden]
  const T* grad_residual_out;  // [rows, hidden], or null
  const T* s;                  // [rows, hidden]: residual_out (or x) of the forward
  const float* mean;           // [rows]
  const float* rstd;           // [rows]
  const T* weight;             // [hidden], or null: 1
  T* grad_s;                   // [rows, hidden]
  float* weight_partials;      // [gridDim.x, hidden]: column sums of grad_out * xhat, or null
  float* bias_partials;        // [gridDim.x, hidden]: column sums of grad_out, or null
  const float2* row_means;     // [rows]: {mean_H(g), mean_H(g * xhat)} for chunked rows, else null
  float inv_hidden;            // 1 / hidden
};

// Adds the per-team column sums `acc` of this block's teams in slot order and writes them to row
// blockIdx.x of `partials` [gridDim.x, hidden], columns of chunk blockIdx.y. col_smem holds
// rows_per_block * ncols * kVec floats. Every thread of the block must call it.
template <int kVec, int kIters>
__device__ void write_column_partials(const float (&acc)[kIters][kVec], float* partials, float* col_smem,
                                      const RowTiling& t, int col0, int ncols) {
  const int rows_per_block = blockDim.x / t.team;
  const int slot = threadIdx.x / t.team;
  const int lane = threadIdx.x % t.team;
  const int width = ncols * kVec;
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    const int j = lane + k * t.team;
    if (j < ncols) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) col_smem[slot * width + j * kVec + e] = acc[k][e];
    }
  }
  __syncthreads();
  float* out = partials + int64_t{blockIdx.x} * t.nvec * kVec + col0 * kVec;
  for (int c = threadIdx.x; c < width; c += blockDim.x) {
    float total = 0.f;
    for (int r = 0; r < rows_per_block; ++r) total += col_smem[r * width + c];
    out[c] = total;
  }
  __syncthreads();  // col_smem is reused by the next call
}

// grad_s for the columns of chunk blockIdx.y of each row, one team per row (same layout as the
// forward), and the column partial sums of grad_out * xhat and grad_out over the rows of the block.
// Without row_means, the row sums of g and g * xhat come from the registers; with it (rows split
// into chunks) they were written by add_layer_norm_bwd_stats_kernel.
template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kMaxThreads) add_layer_norm_bwd_kernel(BwdParams<T> p, RowTiling t) {
  __shared__ float smem[2 * kMaxWarps];
  extern __shared__ float col_smem[];  // [rows_per_block, ncols * kVec] when partials are written
  const int rows_per_block = blockDim.x / t.team;
  const int slot = threadIdx.x / t.team;
  const int lane = threadIdx.x % t.team;
  const int col0 = blockIdx.y * t.chunk;
  const int ncols = min(t.chunk, t.nvec - col0);

  float dweight[kIters][kVec] = {};  // column sums of grad_out * xhat over this team's rows
  float dbias[kIters][kVec] = {};    // column sums of grad_out
  for (int64_t first = int64_t{blockIdx.x} * rows_per_block; first < t.rows;
       first += int64_t{gridDim.x} * rows_per_block) {
    const int64_t row = first + slot;
    const bool valid = row < t.rows;
    const int count = (valid ? ncols : 0) - lane;
    const int64_t pos = row * t.nvec + col0 + lane;
    const int64_t col = col0 + lane;
    const float mean = valid ? p.mean[row] : 0.f;
    const float rstd = valid ? p.rstd[row] : 0.f;

    // grad_out, xhat, and g = grad_out * weight; all are 0 in the vectors this thread does not hold.
    float g[kIters][kVec], xhat[kIters][kVec];
    load_slice<kVec, kIters>(p.grad_out, pos, t.team, count, [&](int k, int e, float v) { g[k][e] = v; });
    load_slice<kVec, kIters>(p.s, pos, t.team, count, [&](int k, int e, float v) {
      xhat[k][e] = k * t.team < count ? (v - mean) * rstd : 0.f;
    });
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dweight[k][e] += g[k][e] * xhat[k][e];
        dbias[k][e] += g[k][e];
      }
    }
    if (p.weight) {
      load_slice<kVec, kIters>(p.weight, col, t.team, count, [&](int k, int e, float v) { g[k][e] *= v; });
    }

    float mean_g, mean_gx;
    if (p.row_means) {
      const float2 m = valid ? p.row_means[row] : make_float2(0.f, 0.f);
      mean_g = m.x;
      mean_gx = m.y;
    } else {
      float sums[2] = {0.f, 0.f};  // row sums of g and g * xhat
#pragma unroll
      for (int k = 0; k < kIters; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          sums[0] += g[k][e];
          sums[1] += g[k][e] * xhat[k][e];
        }
      }
      team_sum(sums, t.team, smem);
      mean_g = sums[0] * p.inv_hidden;
      mean_gx = sums[1] * p.inv_hidden;
    }

    // g becomes grad_s.
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) g[k][e] = rstd * (g[k][e] - mean_g - xhat[k][e] * mean_gx);
    }
    if (p.grad_residual_out) {
      load_slice<kVec, kIters>(p.grad_residual_out, pos, t.team, count,
                               [&](int k, int e, float v) { g[k][e] += v; });
    }
    store_slice<kVec, kIters>(p.grad_s, pos, t.team, count, g);
  }

  if (p.weight_partials) write_column_partials(dweight, p.weight_partials, col_smem, t, col0, ncols);
  if (p.bias_partials) write_column_partials(dbias, p.bias_partials, col_smem, t, col0, ncols);
}

// row_means[r] = {mean_H(g), mean_H(g * xhat)} for rows split into column chunks: one block per row.
template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads) add_layer_norm_bwd_stats_kernel(BwdParams<T> p, float2* row_means,
                                                                                int64_t rows, int nvec) {
  __shared__ float smem[2 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];
    float sums[2] = {0.f, 0.f};
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
      float g[kVec], s[kVec];
      load_vec<kVec>(p.grad_out, row * nvec + j, g);
      if (p.weight) mul_vec<kVec>(p.weight, j, g);
      load_vec<kVec>(p.s, row * nvec + j, s);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        sums[0] += g[e];
        sums[1] += g[e] * ((s[e] - mean) * rstd);
      }
    }
    team_sum(sums, blockDim.x, smem);
    if (threadIdx.x == 0) row_means[row] = make_float2(sums[0] * p.inv_hidden, sums[1] * p.inv_hidden);
  }
}



// Launches the backward; returns the [blocks, hidden] partial sums of grad_weight and grad_bias
// (undefined tensors when not wanted).
template <typename T, int kVec>
std::pair<at::Tensor, at::Tensor> launch_bwd(BwdParams<T> p, int64_t rows, int hidden, bool want_weight,
                                             bool want_bias, const at::TensorOptions& float_opts) {
  constexpr int kMaxIters = std::min(kBwdElems / kVec, kBwdMaxIters);
  const RowTiling t = make_tiling(rows, hidden / kVec, kMaxIters);
  const int chunks = static_cast<int>(ceil_div(t.nvec, t.chunk));
  const int threads = std::max(t.team, kMinThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor row_means;
  if (chunks > 1) {
    row_means = at::empty({rows, 2}, float_opts);
    float2* means = reinterpret_cast<float2*>(row_means.data_ptr<float>());
    const auto kernel = add_layer_norm_bwd_stats_kernel<T, kVec>;
    const auto blocks = static_cast<unsigned>(std::min(rows, resident_blocks(kernel, kMaxThreads, 0)));
    kernel<<<blocks, kMaxThreads, 0, stream>>>(p, means, rows, t.nvec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    p.row_means = means;
  }

  at::Tensor weight_partials, bias_partials;
  dispatch_iters<kMaxIters>(t.iters, [&](auto iters) {
    const auto kernel = add_layer_norm_bwd_kernel<T, kVec, decltype(iters)::value>;
    const size_t smem_bytes =
        want_weight || want_bias ? sizeof(float) * (threads / t.team) * t.chunk * kVec : 0;
    const int64_t row_groups = ceil_div(rows, threads / t.team);
    const auto blocks = static_cast<unsigned>(
        std::min(row_groups, std::max<int64_t>(1, resident_blocks(kernel, threads, smem_bytes) / chunks)));
    if (want_weight) {
      weight_partials = at::empty({blocks, hidden}, float_opts);
      p.weight_partials = weight_partials.data_ptr<float>();
    }
    if (want_bias) {
      bias_partials = at::empty({blocks, hidden}, float_opts);
      p.bias_partials = bias_partials.data_ptr<float>();
    }
    kernel<<<dim3(blocks, chunks), threads, smem_bytes, stream>>>(p, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weight_partials, bias_partials};
}

// ---- argument checks (second line of defence: the Python op validates first) -------------------

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), "add_layer_norm: ", name,
              " must be a contiguous 2-D CUDA tensor, got a ", t.is_contiguous() ? "" : "non-contiguous ", t.dim(),
              "-D tensor of shape ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "add_layer_norm: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_rows(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type() && t.device() == ref.device(),
              "add_layer_norm: ", name, " must match ", ref_name, " (shape ", ref.sizes(), ", ", ref.scalar_type(),
              ", ", ref.device(), "), got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
}

void check_vector(const at::Tensor& t, const char* name, int64_t size, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size && t.is_contiguous() && t.scalar_type() == dtype &&
                  t.device() == device,
              "add_layer_norm: ", name, " must be a contiguous 1-D tensor of ", size, " ", dtype, " on ", device,
              ", got shape ", t.sizes(), ", ", t.scalar_type(), ", ", t.device(),
              t.is_contiguous() ? "" : ", non-contiguous");
}

void check_hidden(int64_t hidden) {
  TORCH_CHECK(hidden >= 1 && hidden <= INT32_MAX, "add_layer_norm: the hidden size must be in [1, 2^31), got ",
              hidden);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool aligned16(const std::optional<at::Tensor>& t) { return !t || aligned16(*t); }

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> add_layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0);
  const int64_t hidden = x.size(1);
  check_hidden(hidden);
  if (residual) check_like(*residual, "residual", x, "x");
  if (weight) check_vector(*weight, "weight", hidden, x.scalar_type(), x.device());
  if (bias) check_vector(*bias, "bias", hidden, x.scalar_type(), x.device());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor residual_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, residual_out, mean, rstd};

  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "add_layer_norm_fwd_cuda", [&] {
    using T = scalar_t;
    const FwdParams<T> p{x.data_ptr<T>(),
                         ptr_or_null<T>(residual),
                         ptr_or_null<T>(weight),
                         ptr_or_null<T>(bias),
                         out.data_ptr<T>(),
                         residual ? residual_out.data_ptr<T>() : nullptr,
                         mean.data_ptr<float>(),
                         rstd.data_ptr<float>(),
                         static_cast<float>(1.0 / static_cast<double>(hidden)),
                         static_cast<float>(eps)};
    constexpr int kVec = 16 / sizeof(T);
    const bool vectorized = hidden % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) &&
                            aligned16(bias) && aligned16(out) && (!residual || aligned16(residual_out));
    if (vectorized) {
      launch_fwd<T, kVec>(p, rows, static_cast<int>(hidden));
    } else {
      launch_fwd<T, 1>(p, rows, static_cast<int>(hidden));
    }
  });
  return {out, residual_out, mean, rstd};
}

std::vector<at::Tensor> add_layer_norm_bwd_cuda(const at::Tensor& grad_out,
                                                const std::optional<at::Tensor>& grad_residual_out,
                                                const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight, bool has_bias) {
  check_rows(grad_out, "grad_out");
  const int64_t rows = grad_out.size(0);
  const int64_t hidden = grad_out.size(1);
  check_hidden(hidden);
  check_like(s, "s", grad_out, "grad_out");
  if (grad_residual_out) check_like(*grad_residual_out, "grad_residual_out", grad_out, "grad_out");
  check_vector(mean, "mean", rows, at::kFloat, grad_out.device());
  check_vector(rstd, "rstd", rows, at::kFloat, grad_out.device());
  if (weight) check_vector(*weight, "weight", hidden, grad_out.scalar_type(), grad_out.device());

  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto param_opts = weight ? weight->options() : grad_out.options();
  at::Tensor grad_s = at::empty_like(grad_out);
  at::Tensor grad_weight = at::empty({weight ? hidden : 0}, param_opts);
  at::Tensor grad_bias = at::empty({has_bias ? hidden : 0}, param_opts);
  if (rows == 0) return {grad_s, grad_weight.zero_(), grad_bias.zero_()};

  BIGNLP_DISPATCH_FLOAT_HALF_BF16(grad_out.scalar_type(), "add_layer_norm_bwd_cuda", [&] {
    using T = scalar_t;
    const BwdParams<T> p{grad_out.data_ptr<T>(),
                         ptr_or_null<T>(grad_residual_out),
                         s.data_ptr<T>(),
                         mean.data_ptr<float>(),
                         rstd.data_ptr<float>(),
                         ptr_or_null<T>(weight),
                         grad_s.data_ptr<T>(),
                         nullptr,
                         nullptr,
                         nullptr,
                         static_cast<float>(1.0 / static_cast<double>(hidden))};
    constexpr int kVec = 16 / sizeof(T);
    const bool vectorized = hidden % kVec == 0 && aligned16(grad_out) && aligned16(grad_residual_out) &&
                            aligned16(s) && aligned16(weight) && aligned16(grad_s);
    const auto float_opts = grad_out.options().dtype(at::kFloat);
    const auto [weight_partials, bias_partials] =
        vectorized ? launch_bwd<T, kVec>(p, rows, static_cast<int>(hidden), weight.has_value(), has_bias, float_opts)
                   : launch_bwd<T, 1>(p, rows, static_cast<int>(hidden), weight.has_value(), has_bias, float_opts);
    if (weight) sum_partials(weight_partials, grad_weight);
    if (has_bias) sum_partials(bias_partials, grad_bias);
  });
  return {grad_s, grad_weight, grad_bias};
}

}  // namespace bignlp_fast

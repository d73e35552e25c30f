// Flash attention on CUDA tensor cores: attention_fwd_cuda / attention_bwd_cuda (see ops.h; the contract,
// masks, varlen, causal modes and the dropout mask are stated in bignlp_fast/ops/attention.py, whose
// attention_{fwd,bwd}_torch is the specification).
//
// float16 and bfloat16 operands, fp32 accumulation and softmax, head dims up to 256 (padded with zeros to
// 64, 128 or 256 in shared memory, so 40, 80 or 33 run too). sm_80 or newer (bf16 tensor cores).
//
// The scheme is FlashAttention-2's, written plainly on the WMMA API (16 x 16 x 16 fragments):
// - forward: one block per (query block, sequence, head); each warp owns 16 query rows. Per key block,
//   S = Q K^T goes to shared memory as fp32, and the online softmax runs there with a lane pair per
//   row (each lane half of the keys; the running max and sum, in base 2, in registers; one shuffle per
//   reduction); P is written back as T and O += P V accumulates in an fp32 tile in shared memory,
//   rescaled row by row before each block's product. Out = O / l, lse = ln-sum-exp.
// - backward, three kernels as kernels/attention.py: delta = rowsum(dO * O); one block per (key block,
//   sequence, kv head) recomputes P^T from lse over the query heads of its group and their query
//   blocks and accumulates dK, dV; one block per (query block, sequence, head) accumulates dQ. Each
//   gradient element is written by one block (no atomics): the backward is deterministic.
// - causal: key blocks past a query block's last visible key are skipped (and query blocks before a key
//   block's first viewer, in the dK/dV kernel); element masks handle the blocks the diagonal crosses.
// - dropout: the keep mask of dropout_keep (Philox-4x32-10 on the element number), drawn again in the
//   backward, so every backend drops the same elements.
//
// Why fragments round-trip through shared memory: WMMA's accumulator layout is opaque, so the per-row
// softmax and rescaling cannot be done in registers. That costs shared-memory bandwidth against a
// register-resident mma.sync kernel; it keeps this first CUDA kernel short and checkable. It was written
// and compile-checked on a machine without a GPU: the automatic choice for CUDA tensors stays the triton
// kernel until this one has been measured (bignlp_fast/ops/attention.py, AUTO_ORDER); backend="cuda"
// runs it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;
namespace wmma = nvcuda::wmma;

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
constexpr float kBiasFloor = -1e38f;            // see score2
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 256;

// ---- types ------------------------------------------------------------------------------------
template <typename T>
struct Device;  // the CUDA type of an ATen 16-bit type
template <>
struct Device<at::Half> {
  using type = __half;
};
template <>
struct Device<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- dropout: word n % 4 of Philox-4x32-10 at counter n / 4 (ops/attention.py: dropout_keep) ---------
__device__ __forceinline__ uint32_t philox_word(uint64_t n, uint32_t k0, uint32_t k1) {
  const uint64_t counter = n >> 2;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint32_t w = static_cast<uint32_t>(n & 3);
  return w == 0 ? c0 : w == 1 ? c1 : w == 2 ? c2 : c3;
}

// ---- parameters -------------------------------------------------------------------------------
// Strides are in elements, [batch, head, row] (the last dimension has stride 1).
struct Params {
  const void* q;
  const void* k;
  const void* v;
  const float* bias;  // [B, Hq, Lq, Lk] view, any strides; null when absent
  const int* cu_q;    // varlen offsets, or null
  const int* cu_k;
  int64_t sq[3], sk[3], sv[3], sb[4];
  int hq, group, max_q, max_k, d, dv, causal;
  int row_blocks;  // row blocks (query blocks; key blocks in dK / dV) per sequence-head in this launch
  float scale, scale_log2;  // scale and scale * log2(e)
  bool dropout, vec;        // vec: 16-byte loads are valid for every operand (pointers, strides, d, dv)
  uint32_t seed_lo, seed_hi, threshold;
  float drop_scale;
  // forward
  void* out;
  float* lse;
  int64_t so[3], sl[2];
  // backward
  const void* dout;
  float* delta;  // [B, Hq, Lq] contiguous, as lse in the backward (so it shares lse's strides)
  void* dq;
  void* dk;
  void* dvv;
  int64_t sdo[3], sdq[3], sdk[3], sdv[3];
};

// One sequence: its batch index and first rows on the L axes (varlen: batch 0 and the cu offsets).
struct Sequence {
  int64_t batch, q_start, k_start;
  int q_len, k_len, offset;  // key j is visible to query i iff j <= i + offset (causal)
};

__device__ __forceinline__ Sequence sequence(const Params& p, int seq) {
  Sequence s;
  if (p.cu_q != nullptr) {
    s.batch = 0;
    s.q_start = p.cu_q[seq];
    s.q_len = p.cu_q[seq + 1] - p.cu_q[seq];
    s.k_start = p.cu_k[seq];
    s.k_len = p.cu_k[seq + 1] - p.cu_k[seq];
  } else {
    s.batch = seq;
    s.q_start = s.k_start = 0;
    s.q_len = p.max_q;
    s.k_len = p.max_k;
  }
  s.offset = p.causal == 2 ? s.k_len - s.q_len : 0;
  return s;
}

// The score of query i, key j of (sequence s, head h) in base 2 from the raw q.k product, -inf where
// the key is past the sequence, after the causal limit, or masked by the bias.
__device__ __forceinline__ float score2(const Params& p, const Sequence& s, int h, int i, int j, float qk) {
  if (i >= s.q_len || j >= s.k_len || (p.causal != 0 && j > i + s.offset)) return -INFINITY;
  float x = qk * p.scale_log2;
  if (p.bias != nullptr) {
    // A finite bias below kBiasFloor counts as kBiasFloor (-inf stays -inf): finfo(dtype).min, the masking
    // value of transformers, times log2(e) overflows to -inf, which would make a row masked by it at every
    // key fully masked (zeros) where torch's SDPA averages the values. As the CPU and Triton kernels. The
    // backward's P of such a row comes from its log-sum-exp, which at -1e38 cannot hold log(sum): P = 1,
    // not 1 / sum (torch's fused kernels do the same); exp2f's argument is clamped to 0 for that case.
    const float b = p.bias[s.batch * p.sb[0] + h * p.sb[1] + int64_t{i} * p.sb[2] + int64_t{j} * p.sb[3]];
    // (not fmaxf(b, kBiasFloor): it returns the floor for a NaN mask value, and the NaN was lost)
    x += (b == -INFINITY ? b : (b < kBiasFloor ? kBiasFloor : b)) * kLog2e;
  }
  return x;
}

// This block's sequence-head (sequence * heads + head) and row block. The grid is one-dimensional (CUDA caps
// grid dimensions y and z at 65535: row blocks there would cap a sequence at 4M queries) with the row
// block varying fastest, so that neighbouring blocks read the same K and V.
__device__ __forceinline__ void block_coords(const Params& p, int& seq_head, int& row_block) {
  seq_head = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.row_blocks));
  row_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.row_blocks));
}

// Whether dropout keeps element (sequence, head h, query i, key j); always without dropout.
__device__ __forceinline__ bool kept(const Params& p, int seq, int h, int i, int j) {
  if (!p.dropout) return true;
  const uint64_t n = ((static_cast<uint64_t>(seq) * p.hq + h) * p.max_q + i) * p.max_k + j;
  return philox_word(n, p.seed_lo, p.seed_hi) >= p.threshold;
}

// The last key (exclusive) any of the query rows [m0, m0 + rows) may see.
__device__ __forceinline__ int key_end(const Params& p, const Sequence& s, int m0, int rows) {
  if (p.causal == 0) return s.k_len;
  return min(max(min(m0 + rows, s.q_len) + s.offset, 0), s.k_len);
}

// ---- shared-memory tiles ----------------------------------------------------------------------
// rows [0, ROWS) x columns [0, DP) of an operand whose row r is at g + r * rs, into s (leading dimension
// ld); zeros where r >= rows_valid or the column >= width (the padding must be zeros, not garbage: a
// NaN there would reach the products through 0 * NaN).
template <int ROWS, int DP, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* s, int ld, const T* g, int64_t rs, int rows_valid, int width, bool vec) {
  if (vec) {  // width % 8 == 0: a chunk of 8 is all inside or all outside
    constexpr int kChunks = DP / 8;
    for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_valid && c < width) val = *reinterpret_cast<const uint4*>(g + r * rs + c);
      *reinterpret_cast<uint4*>(s + r * ld + c) = val;
    }
  } else {
    const T zero = from_f<T>(0.f);
    for (int i = threadIdx.x; i < ROWS * DP; i += THREADS) {
      const int r = i / DP, c = i % DP;
      s[r * ld + c] = (r < rows_valid && c < width) ? g[r * rs + c] : zero;
    }
  }
}

template <int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void zero_tile(float* s, int ld) {
  for (int i = threadIdx.x; i < ROWS * COLS; i += THREADS) s[(i / COLS) * ld + i % COLS] = 0.f;
}

// One warp: C[16, N] = A[16, K] B^T, with B stored [N, K] row-major (so read as a col-major K x N), into
// fp32 c (row-major, ldc). A, B: T in shared memory.
template <int N, int K, typename T>
__device__ __forceinline__ void warp_gemm_nt(const T* a, int lda, const T* b, int ldb, float* c, int ldc) {
#pragma unroll 1
  for (int n0 = 0; n0 < N; n0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + k0, lda);
      wmma::load_matrix_sync(fb, b + n0 * ldb + k0, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n0, acc, ldc, wmma::mem_row_major);
  }
}

// One warp: C[16, N] += A[16, K] B, B stored [K, N] row-major; C fp32 in shared memory.
template <int N, int K, typename T>
__device__ __forceinline__ void warp_gemm_nn_acc(const T* a, int lda, const T* b, int ldb, float* c, int ldc) {
#pragma unroll 1
  for (int n0 = 0; n0 < N; n0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, c + n0, ldc, wmma::mem_row_major);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a + k0, lda);
      wmma::load_matrix_sync(fb, b + k0 * ldb + n0, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n0, acc, ldc, wmma::mem_row_major);
  }
}

// Leading dimensions: T tiles of DP columns are padded by 8 elements and fp32 tiles by 4 (a multiple of
// 16 bytes, as WMMA and the 16-byte loads need, and off the 128-byte bank period). Every region size is
// a multiple of 256 bytes (rows come in multiples of 16), so every tile starts 256-byte aligned.
template <int COLS>
constexpr int ld_half() { return COLS + 8; }
template <int COLS>
constexpr int ld_float() { return COLS + 4; }

// Row r of (batch b, head h) of a [B, H, L, D] operand with strides st (the last one 1).
template <typename T, typename Base>
__device__ __forceinline__ T* row_ptr(Base* base, const int64_t (&st)[3], int64_t b, int64_t h, int64_t r) {
  return static_cast<T*>(base) + b * st[0] + h * st[1] + r * st[2];
}

// The K and V tiles of keys n0 .. n0 + BN of sequence s and kv head kv_head (zeros past its keys).
template <int BN, int DP, int THREADS, typename T>
__device__ __forceinline__ void load_kv(T* ks, T* vs, const Params& p, const Sequence& s, int kv_head, int n0) {
  const int64_t row = s.k_start + n0;
  load_tile<BN, DP, THREADS>(ks, ld_half<DP>(), row_ptr<const T>(p.k, p.sk, s.batch, kv_head, row), p.sk[2],
                             s.k_len - n0, p.d, p.vec);
  load_tile<BN, DP, THREADS>(vs, ld_half<DP>(), row_ptr<const T>(p.v, p.sv, s.batch, kv_head, row), p.sv[2],
                             s.k_len - n0, p.dv, p.vec);
}

// ---- forward ----------------------------------------------------------------------------------
template <int DP, int BM, int BN>
constexpr size_t fwd_smem(size_t t_bytes) {
  return t_bytes * (BM + 2 * BN) * ld_half<DP>() + 4 * BM * ld_float<BN>() + t_bytes * BM * ld_half<BN>() +
         4 * BM * ld_float<DP>() + 4 * 2 * BM;
}

template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(BM * 2) attn_fwd_kernel(const Params p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kThreads = BM * 2, LDT = ld_half<DP>(), LDS = ld_float<BN>(), LDP = ld_half<BN>(),
                LDO = ld_float<DP>();
  extern __shared__ __align__(256) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + BM * LDT;
  T* vs = ks + BN * LDT;
  float* ss = reinterpret_cast<float*>(vs + BN * LDT);
  T* ps = reinterpret_cast<T*>(ss + BM * LDS);
  float* os = reinterpret_cast<float*>(ps + BM * LDP);
  float* row_m = os + BM * LDO;  // each row's final max (base 2) and sum, for the epilogue
  float* row_l = row_m + BM;

  int seq_head, row_block;
  block_coords(p, seq_head, row_block);
  const int seq = seq_head / p.hq, head = seq_head % p.hq, kv_head = head / p.group;
  const Sequence s = sequence(p, seq);
  const int m0 = row_block * BM;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

  load_tile<BM, DP, kThreads>(qs, LDT, row_ptr<const T>(p.q, p.sq, s.batch, head, s.q_start + m0), p.sq[2],
                              s.q_len - m0, p.d, p.vec);
  zero_tile<BM, DP, kThreads>(os, LDO);
  __syncthreads();  // the Q tile and the zeroed O are in (a warp's rows were set by other threads)
  // the softmax's lane pair: row r0 + lane / 2 of the block (query i), keys c_lo .. c_lo + BN / 2 of each
  // key block and O columns d_lo .. d_lo + DP / 2; the running max (base 2) and sum in registers
  const int srow = r0 + lane / 2, si = m0 + srow, c_lo = (lane & 1) * (BN / 2), d_lo = (lane & 1) * (DP / 2);
  float m_i = -INFINITY, l_i = 0.f;
  const int hi = key_end(p, s, m0, BM);
  for (int n0 = 0; n0 < hi; n0 += BN) {
    if (n0 > 0) __syncthreads();  // every warp is done with the previous ks / vs
    load_kv<BN, DP, kThreads>(ks, vs, p, s, kv_head, n0);
    __syncthreads();
    warp_gemm_nt<BN, DP>(qs + r0 * LDT, LDT, ks, LDT, ss + r0 * LDS, LDS);
    __syncwarp();
    {  // online softmax: the lane pair (2r, 2r + 1) owns row `srow`, each lane half of the block's keys
      float* sr = ss + srow * LDS;
      float mx = -INFINITY;
      for (int c = c_lo; c < c_lo + BN / 2; ++c) {  // scores in base 2, masked; kept for the exp below
        const float x = score2(p, s, head, si, n0 + c, sr[c]);
        sr[c] = x;
        mx = fmaxf(mx, x);  // passes over a NaN score, but its exp2f below is NaN: the row's sum, and so the row
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_new = fmaxf(m_i, mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: exp2(-inf) = 0
      float sum = 0.f;
      for (int c = c_lo; c < c_lo + BN / 2; ++c) {
        const float e = exp2f(sr[c] - m_safe);
        sum += e;  // the row sum is of the undropped probabilities
        ps[srow * LDP + c] = from_f<T>(kept(p, seq, head, si, n0 + c) ? e : 0.f);  // 1 / (1 - p) at the end
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      const float alpha = exp2f(m_i - m_safe);
      l_i = l_i * alpha + sum;
      m_i = m_new;
      for (int c = d_lo; c < d_lo + DP / 2; ++c) os[srow * LDO + c] *= alpha;  // this row's O, this lane's half
    }
    __syncwarp();
    warp_gemm_nn_acc<DP, BN>(ps + r0 * LDP, LDP, vs, LDT, os + r0 * LDO, LDO);
  }
  if ((lane & 1) == 0) {
    row_m[srow] = m_i;
    row_l[srow] = l_i;
  }
  __syncwarp();
  // out = O / l (times 1 / (1 - p) with dropout); rows without a visible key: 0 and lse +inf
  T* og = row_ptr<T>(p.out, p.so, s.batch, head, 0);
  for (int r = 0; r < 16; ++r) {
    const int row = r0 + r, i = m0 + row;
    if (i >= s.q_len) break;
    const float l = row_l[row], inv = l == 0.f ? 0.f : p.drop_scale / l;
    for (int c = lane; c < p.dv; c += 32) og[(s.q_start + i) * p.so[2] + c] = from_f<T>(os[row * LDO + c] * inv);
  }
  if (lane < 16 && m0 + r0 + lane < s.q_len) {
    const int row = r0 + lane;
    const float l = row_l[row];
    p.lse[s.batch * p.sl[0] + head * p.sl[1] + s.q_start + m0 + row] =
        l == 0.f ? INFINITY : (row_m[row] + log2f(l)) * kLn2;
  }
#endif
}

// ---- backward ---------------------------------------------------------------------------------
// delta[b, h, i] = sum over c of dO * O (fp32), one warp per row of the L axis.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const Params p, int64_t rows, int64_t len) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t b = row / (p.hq * len), h = row / len % p.hq, i = row % len;
  const T* o = row_ptr<const T>(p.out, p.so, b, h, i);
  const T* g = row_ptr<const T>(p.dout, p.sdo, b, h, i);
  float acc = 0.f;
  for (int c = lane; c < p.dv; c += 32) acc += to_f(o[c]) * to_f(g[c]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

template <int DP, int BN, int BM>
constexpr size_t dkdv_smem(size_t t_bytes) {
  return t_bytes * (2 * BN + 2 * BM) * ld_half<DP>() + 4 * 2 * BN * ld_float<BM>() +
         t_bytes * 2 * BN * ld_half<BM>() + 4 * 2 * BN * ld_float<DP>() + 4 * 2 * BM;
}

// dK, dV of one key block (BN keys; each warp owns 16 of them) over every query head of its group.
template <typename T, int DP, int BN, int BM>
__global__ void __launch_bounds__(BN * 2) attn_bwd_dkdv_kernel(const Params p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kThreads = BN * 2, LDT = ld_half<DP>(), LDQ = ld_float<BM>(), LDP = ld_half<BM>(),
                LDO = ld_float<DP>();
  extern __shared__ __align__(256) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + BN * LDT;
  T* qs = vs + BN * LDT;
  T* dos = qs + BM * LDT;
  float* st = reinterpret_cast<float*>(dos + BM * LDT);  // S^T, then read for P^T
  float* dpt = st + BN * LDQ;                            // dP^T = V dO^T
  T* pt = reinterpret_cast<T*>(dpt + BN * LDQ);          // dropped P^T, the A operand of dV
  T* dst = pt + BN * LDP;                                // dS^T, the A operand of dK
  float* dks = reinterpret_cast<float*>(dst + BN * LDP);
  float* dvs = dks + BN * LDO;
  float* lse_s = dvs + BN * LDO;  // lse in base 2 of the block's query rows (+inf past the sequence)
  float* delta_s = lse_s + BM;

  const int hk = p.hq / p.group;
  int seq_head, row_block;
  block_coords(p, seq_head, row_block);
  const int seq = seq_head / hk, kv_head = seq_head % hk;
  const Sequence s = sequence(p, seq);
  const int n0 = row_block * BN;
  if (n0 >= s.k_len) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

  load_kv<BN, DP, kThreads>(ks, vs, p, s, kv_head, n0);
  zero_tile<BN, DP, kThreads>(dks, LDO);
  zero_tile<BN, DP, kThreads>(dvs, LDO);
  __syncthreads();  // also when no query block follows: the epilogue reads rows other threads zeroed
  // the first query that sees key n0: i + offset >= n0
  const int lo = p.causal != 0 ? max(n0 - s.offset, 0) / BM * BM : 0;
  for (int g = 0; g < p.group; ++g) {
    const int head = kv_head * p.group + g;
    const T* qg = row_ptr<const T>(p.q, p.sq, s.batch, head, s.q_start);
    const T* dog = row_ptr<const T>(p.dout, p.sdo, s.batch, head, s.q_start);
    const float* lseg = p.lse + s.batch * p.sl[0] + head * p.sl[1] + s.q_start;
    const float* deltag = p.delta + s.batch * p.sl[0] + head * p.sl[1] + s.q_start;
    for (int m0 = lo; m0 < s.q_len; m0 += BM) {
      __syncthreads();  // the previous query block's products are done with qs / dos / lse_s
      load_tile<BM, DP, kThreads>(qs, LDT, qg + m0 * p.sq[2], p.sq[2], s.q_len - m0, p.d, p.vec);
      load_tile<BM, DP, kThreads>(dos, LDT, dog + m0 * p.sdo[2], p.sdo[2], s.q_len - m0, p.dv, p.vec);
      for (int c = threadIdx.x; c < BM; c += kThreads) {
        const bool in = m0 + c < s.q_len;
        lse_s[c] = in ? lseg[m0 + c] * kLog2e : INFINITY;
        delta_s[c] = in ? deltag[m0 + c] : 0.f;
      }
      __syncthreads();
      warp_gemm_nt<BM, DP>(ks + r0 * LDT, LDT, qs, LDT, st + r0 * LDQ, LDQ);
      warp_gemm_nt<BM, DP>(vs + r0 * LDT, LDT, dos, LDT, dpt + r0 * LDQ, LDQ);
      __syncwarp();
      for (int e = lane; e < 16 * BM; e += 32) {
        const int row = r0 + e / BM, c = e % BM, j = n0 + row, i = m0 + c;
        const float x = score2(p, s, head, i, j, st[row * LDQ + c]);
        const float pr = x == -INFINITY ? 0.f : exp2f(fminf(x - lse_s[c], 0.f));  // p <= 1: see score2
        const float z = kept(p, seq, head, i, j) ? p.drop_scale : 0.f;
        const float ds = pr * (dpt[row * LDQ + c] * z - delta_s[c]);
        pt[row * LDP + c] = from_f<T>(pr * z);
        dst[row * LDP + c] = from_f<T>(ds);
      }
      __syncwarp();
      warp_gemm_nn_acc<DP, BM>(pt + r0 * LDP, LDP, dos, LDT, dvs + r0 * LDO, LDO);
      warp_gemm_nn_acc<DP, BM>(dst + r0 * LDP, LDP, qs, LDT, dks + r0 * LDO, LDO);
    }
  }
  __syncwarp();
  T* dkg = row_ptr<T>(p.dk, p.sdk, s.batch, kv_head, 0);
  T* dvg = row_ptr<T>(p.dvv, p.sdv, s.batch, kv_head, 0);
  for (int r = 0; r < 16; ++r) {
    const int row = r0 + r, j = n0 + row;
    if (j >= s.k_len) break;
    for (int c = lane; c < p.d; c += 32) dkg[(s.k_start + j) * p.sdk[2] + c] = from_f<T>(dks[row * LDO + c] * p.scale);
    for (int c = lane; c < p.dv; c += 32) dvg[(s.k_start + j) * p.sdv[2] + c] = from_f<T>(dvs[row * LDO + c]);
  }
#endif
}

template <int DP, int BM, int BN>
constexpr size_t dq_smem(size_t t_bytes) {
  return t_bytes * (2 * BM + 2 * BN) * ld_half<DP>() + 4 * 2 * BM * ld_float<BN>() + t_bytes * BM * ld_half<BN>() +
         4 * BM * ld_float<DP>() + 4 * 2 * BM;
}

// dQ of one query block (each warp owns 16 rows) over the key blocks it sees.
template <typename T, int DP, int BM, int BN>
__global__ void __launch_bounds__(BM * 2) attn_bwd_dq_kernel(const Params p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kThreads = BM * 2, LDT = ld_half<DP>(), LDS = ld_float<BN>(), LDP = ld_half<BN>(),
                LDO = ld_float<DP>();
  extern __shared__ __align__(256) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* dos = qs + BM * LDT;
  T* ks = dos + BM * LDT;
  T* vs = ks + BN * LDT;
  float* ss = reinterpret_cast<float*>(vs + BN * LDT);
  float* dps = ss + BM * LDS;
  T* dss = reinterpret_cast<T*>(dps + BM * LDS);
  float* dqs = reinterpret_cast<float*>(dss + BM * LDP);
  float* lse_s = dqs + BM * LDO;
  float* delta_s = lse_s + BM;

  int seq_head, row_block;
  block_coords(p, seq_head, row_block);
  const int seq = seq_head / p.hq, head = seq_head % p.hq, kv_head = head / p.group;
  const Sequence s = sequence(p, seq);
  const int m0 = row_block * BM;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r0 = warp * 16;

  const int64_t q_row0 = s.q_start + m0;
  load_tile<BM, DP, kThreads>(qs, LDT, row_ptr<const T>(p.q, p.sq, s.batch, head, q_row0), p.sq[2], s.q_len - m0,
                              p.d, p.vec);
  load_tile<BM, DP, kThreads>(dos, LDT, row_ptr<const T>(p.dout, p.sdo, s.batch, head, q_row0), p.sdo[2],
                              s.q_len - m0, p.dv, p.vec);
  zero_tile<BM, DP, kThreads>(dqs, LDO);
  const float* lseg = p.lse + s.batch * p.sl[0] + head * p.sl[1] + q_row0;
  const float* deltag = p.delta + s.batch * p.sl[0] + head * p.sl[1] + q_row0;
  for (int c = threadIdx.x; c < BM; c += kThreads) {
    const bool in = m0 + c < s.q_len;
    lse_s[c] = in ? lseg[c] * kLog2e : INFINITY;
    delta_s[c] = in ? deltag[c] : 0.f;
  }
  __syncthreads();
  const int hi = key_end(p, s, m0, BM);
  for (int n0 = 0; n0 < hi; n0 += BN) {
    __syncthreads();  // every warp is done with the previous ks / vs (and the first time: the Q, dO tiles)
    load_kv<BN, DP, kThreads>(ks, vs, p, s, kv_head, n0);
    __syncthreads();
    warp_gemm_nt<BN, DP>(qs + r0 * LDT, LDT, ks, LDT, ss + r0 * LDS, LDS);
    warp_gemm_nt<BN, DP>(dos + r0 * LDT, LDT, vs, LDT, dps + r0 * LDS, LDS);
    __syncwarp();
    for (int e = lane; e < 16 * BN; e += 32) {
      const int row = r0 + e / BN, c = e % BN, i = m0 + row, j = n0 + c;
      const float x = score2(p, s, head, i, j, ss[row * LDS + c]);
      const float pr = x == -INFINITY ? 0.f : exp2f(fminf(x - lse_s[row], 0.f));
      const float z = kept(p, seq, head, i, j) ? p.drop_scale : 0.f;
      dss[row * LDP + c] = from_f<T>(pr * (dps[row * LDS + c] * z - delta_s[row]));
    }
    __syncwarp();
    warp_gemm_nn_acc<DP, BN>(dss + r0 * LDP, LDP, ks, LDT, dqs + r0 * LDO, LDO);
  }
  __syncwarp();
  T* dqg = row_ptr<T>(p.dq, p.sdq, s.batch, head, 0);
  for (int r = 0; r < 16; ++r) {
    const int row = r0 + r, i = m0 + row;
    if (i >= s.q_len) break;
    for (int c = lane; c < p.d; c += 32) dqg[(s.q_start + i) * p.sdq[2] + c] = from_f<T>(dqs[row * LDO + c] * p.scale);
  }
#endif
}

// ---- host side --------------------------------------------------------------------------------
// Tile shapes per padded head dim: rows per block (16 per warp) and keys per step, chosen so that the
// shared memory stays under the 163 KiB an A100 block may take (H100: 227 KiB).
//   forward  DP  64: 64 x 64 (68 KiB at 2 bytes)  128: 64 x 64 (111 KiB)  256: 32 x 64 (128 KiB)
//   dK/dV    DP  64: 64 keys x 64 queries (123 KiB) 128: 64 x 32 (145 KiB) 256: 32 x 32 (145 KiB)
//   dQ       DP  64: 64 x 64 (97 KiB)   128: 64 x 64 (145 KiB) 256: 32 x 32 (110 KiB)
int padded_dim(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// kernel over row_blocks blocks of rows for each of seq_heads sequence-heads (block_coords).
template <typename Kernel>
void launch(Kernel kernel, int64_t seq_heads, int64_t row_blocks, int threads, size_t smem, Params p) {
  if (seq_heads == 0 || row_blocks == 0) return;
  TORCH_CHECK(seq_heads * row_blocks <= int64_t{2147483647}, "attention (cuda): ", seq_heads, " sequence-heads x ",
              row_blocks, " row blocks are past CUDA's 2^31 - 1 blocks of a grid");
  p.row_blocks = static_cast<int>(row_blocks);
  const dim3 grid(static_cast<unsigned>(seq_heads * row_blocks));
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= static_cast<size_t>(max_smem), "attention (cuda): this kernel needs ", smem,
              " bytes of shared memory per block at this head dim, and this GPU allows ", max_smem,
              " (the tiles are sized for A100 and H100; sm_86 / sm_89 GPUs have 99 KiB): use backend=\"triton\"");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void strides3(const at::Tensor& t, int64_t out[3]) {
  for (int i = 0; i < 3; ++i) out[i] = t.stride(i);
}

bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.stride(i) % 8 != 0) return false;
  return true;
}

// Checks and the parameters both passes share; the number of sequences in *nseq.
Params common_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cu_q,
                     const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t causal,
                     double dropout_p, const std::optional<at::Tensor>& seed, int64_t* nseq) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "attention (cuda): q, k and v must be CUDA tensors on one device");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention (cuda): runs float16 and bfloat16 (float32 runs on the triton backend), got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention (cuda): q, k and v must have one dtype");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention (cuda): q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention (cuda): q, k and v need stride 1 in their last dimension");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && v.size(3) <= kMaxHeadDim && k.size(3) == q.size(3),
              "attention (cuda): head dims up to ", kMaxHeadDim, ", got ", q.size(3), " and ", v.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0 && k.size(1) == v.size(1),
              "attention (cuda): Hk must be positive and divide Hq");
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, "attention (cuda): needs compute capability 8.0 or newer (bf16 tensor cores), "
              "this GPU is ", major, ".", minor);
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides3(q, p.sq);
  strides3(k, p.sk);
  strides3(v, p.sv);
  p.hq = static_cast<int>(q.size(1));
  p.group = static_cast<int>(q.size(1) / k.size(1));
  p.d = static_cast<int>(q.size(3));
  p.dv = static_cast<int>(v.size(3));
  p.causal = static_cast<int>(causal);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.vec = aligned16(q) && aligned16(k) && aligned16(v) && p.d % 8 == 0 && p.dv % 8 == 0;
  if (bias.has_value()) {
    TORCH_CHECK(!cu_q.has_value(), "attention (cuda): bias cannot be combined with cu_seqlens");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->device() == q.device() && bias->dim() == 4,
                "attention (cuda): bias must be a float32 [B, Hq, Lq, Lk] view on q's device");
    p.bias = bias->data_ptr<float>();
    for (int i = 0; i < 4; ++i) p.sb[i] = bias->stride(i);
  }
  if (cu_q.has_value()) {
    TORCH_CHECK(cu_k.has_value() && q.size(0) == 1, "attention (cuda): varlen needs both cu_seqlens and B == 1");
    TORCH_CHECK(cu_q->scalar_type() == at::kInt && cu_k->scalar_type() == at::kInt && cu_q->device() == q.device() &&
                    cu_k->device() == q.device() && cu_q->is_contiguous() && cu_k->is_contiguous() &&
                    cu_q->numel() == cu_k->numel(),
                "attention (cuda): cu_seqlens must be contiguous int32 [nseq + 1] on q's device");
    p.cu_q = cu_q->data_ptr<int>();
    p.cu_k = cu_k->data_ptr<int>();
    *nseq = cu_q->numel() - 1;
    p.max_q = static_cast<int>(max_q);
    p.max_k = static_cast<int>(max_k);
  } else {
    *nseq = q.size(0);
    p.max_q = static_cast<int>(q.size(2));
    p.max_k = static_cast<int>(k.size(2));
  }
  TORCH_CHECK(q.size(2) < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31) && *nseq * p.hq < (int64_t{1} << 31),
              "attention (cuda): sizes past 2^31 rows or sequence-heads");
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 1, "attention (cuda): dropout needs a seed tensor");
    const uint64_t sd = static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>());
    p.dropout = true;
    p.seed_lo = static_cast<uint32_t>(sd);
    p.seed_hi = static_cast<uint32_t>(sd >> 32);
    p.threshold = static_cast<uint32_t>(std::min<double>(std::floor(dropout_p * 4294967296.0), 4294967295.0));
    p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  } else {
    p.drop_scale = 1.f;
  }
  return p;
}

template <typename AT, int DP>
void run_forward(const Params& p, int64_t nseq) {
  using T = typename Device<AT>::type;
  constexpr int BM = DP == 256 ? 32 : 64, BN = 64;
  launch(attn_fwd_kernel<T, DP, BM, BN>, nseq * p.hq, ceil_div(p.max_q, BM), BM * 2, fwd_smem<DP, BM, BN>(sizeof(T)), p);
}

template <typename AT, int DP>
void run_backward(const Params& p, int64_t nseq, int64_t rows, int64_t len) {
  using T = typename Device<AT>::type;
  if (rows > 0) {
    const auto blocks = static_cast<unsigned>(ceil_div(rows * 32, 256));
    attn_bwd_delta_kernel<T><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(p, rows, len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    constexpr int BN = DP == 256 ? 32 : 64, BM = DP == 64 ? 64 : 32;
    launch(attn_bwd_dkdv_kernel<T, DP, BN, BM>, nseq * (p.hq / p.group), ceil_div(p.max_k, BN), BN * 2,
           dkdv_smem<DP, BN, BM>(sizeof(T)), p);
  }
  {
    constexpr int BM = DP == 256 ? 32 : 64, BN = DP == 256 ? 32 : 64;
    launch(attn_bwd_dq_kernel<T, DP, BM, BN>, nseq * p.hq, ceil_div(p.max_q, BM), BM * 2, dq_smem<DP, BM, BN>(sizeof(T)),
           p);
  }
}

#define BIGNLP_DISPATCH_HALF_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename F>
void dispatch_dim(int dp, const F& f) {
  if (dp == 64) {
    f(std::integral_constant<int, 64>());
  } else if (dp == 128) {
    f(std::integral_constant<int, 128>());
  } else {
    f(std::integral_constant<int, 256>());
  }
}

}  // namespace

std::vector<at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                           const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  int64_t nseq = 0;
  Params p = common_params(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                           dropout_p, seed, &nseq);
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides3(out, p.so);
  p.sl[0] = lse.stride(0);
  p.sl[1] = lse.stride(1);
  BIGNLP_DISPATCH_HALF_BF16(q.scalar_type(), "attention_fwd_cuda", [&] {
    dispatch_dim(padded_dim(std::max(p.d, p.dv)), [&](auto dp) { run_forward<scalar_t, decltype(dp)::value>(p, nseq); });
  });
  return {out, lse};
}

std::vector<at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                           const std::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(q.device());
  int64_t nseq = 0;
  Params p = common_params(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                           dropout_p, seed, &nseq);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type() && grad_out.stride(3) == 1 && out.stride(3) == 1,
              "attention (cuda): grad_out and out must be [B, Hq, Lq, Dv] in q's dtype with stride 1 in the last dim");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "attention (cuda): lse must be contiguous float32 [B, Hq, Lq]");
  p.vec = p.vec && aligned16(grad_out);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  strides3(out, p.so);
  p.sl[0] = lse.stride(0);
  p.sl[1] = lse.stride(1);
  p.dout = grad_out.data_ptr();
  strides3(grad_out, p.sdo);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dvv = dv.data_ptr();
  strides3(dq, p.sdq);
  strides3(dk, p.sdk);
  strides3(dv, p.sdv);
  TORCH_CHECK(dq.stride(3) == 1 && dk.stride(3) == 1 && dv.stride(3) == 1, "attention (cuda): gradient layout");
  const int64_t rows = q.size(0) * q.size(1) * q.size(2);
  BIGNLP_DISPATCH_HALF_BF16(q.scalar_type(), "attention_bwd_cuda", [&] {
    dispatch_dim(padded_dim(std::max(p.d, p.dv)),
                 [&](auto dp) { run_backward<scalar_t, decltype(dp)::value>(p, nseq, rows, q.size(2)); });
  });
  return {dq, dk, dv};
}

}  // namespace bignlp_fast

// A small fp32 GEMM for blocks that live in cache: C[M, N] (+)= alpha * A[M, K] * B[K, N].
//
// Fused kernels (attention's tiles, and later the RNN and convolution blocks) multiply small
// matrices thousands of times; a BLAS call per tile costs microseconds of overhead and, on AMD
// CPUs, MKL does not take its AVX-512 path. This register-blocked kernel is short: the classic
// "broadcast A, stream B" micro-kernel holding an MR x (NV vectors) tile of C in registers
// (8 x 32 floats = 16 zmm with AVX-512; 6 x 16 floats = 12 ymm with AVX2), built on at::vec so it compiles at every ISA level.
//
// Operands:
//   A: element (m, k) at a[m * a_rs + k * a_cs]: any strides, so a transposed view costs nothing
//      (A^T of a row-major P is a_rs = 1, a_cs = ld).
//   B: row-major [K, ldb], columns padded to a multiple of the vector width (values in the padding
//      only reach C's padding).
//   C: row-major [M, ldc]; N is a multiple of fVec::size() (the caller pads).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "amx.h"
#include "common.h"
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

namespace bignlp_fast::cpu {

namespace gemm_detail {

using fVec = at::vec::Vectorized<float>;
// Rows of the C tile held in registers: MR x 2 vectors of accumulators, plus 2 vectors of B and one
// broadcast of A, must fit the register file: 8 rows with AVX-512 (32 registers: 16 + 3), 6 rows
// with AVX2 (16 registers: 12 + 3; 8 rows would spill).
constexpr int kMR = fVec::size() >= 16 ? 8 : 6;

template <int MR, int NV>
inline void tile(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c,
                 int64_t ldc, float alpha, bool accumulate) {
  constexpr int VS = fVec::size();
  fVec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = fVec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    fVec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = fVec::loadu(b + k * ldb + v * VS);
      // one load, not one per row (common.h); the full-height tile keeps its loads in registers
      // itself, and pinning them there measured 0.91-0.96x (its loads less free to move)
      if constexpr (MR > 1 && MR < kMR) in_register(bv[v]);
    }
    const float* ak = a + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const fVec ar(ak[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  const fVec va(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * VS;
      const fVec out = accumulate ? at::vec::fmadd(acc[r][v], va, fVec::loadu(cp)) : acc[r][v] * va;
      out.store(cp);
    }
}

// A tile of fewer than kMR rows (rows in [0, kMR): 0 does nothing).
template <int NV>
inline void short_tile(int64_t rows, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                       int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  switch (rows) {
    case 1: tile<1, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 2: tile<2, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 3: tile<3, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 4: tile<4, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 5: tile<5, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 6: tile<6, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    case 7: tile<7, NV>(K, a, a_rs, a_cs, b, ldb, c, ldc, alpha, accumulate); break;
    default: break;
  }
}

// Rows [0, M) of one column panel, in ceil(M / kMR) tiles whose heights differ by at most one row
// (the taller ones last). A tile of r rows spends at least L cycles a k whatever r (each accumulator
// waits out the FMA latency L: 4 cycles on Zen 3, Zen 4 and the Intel CPUs seen, 5 on Zen 2) and r
// once its 2r FMAs fill both FMA ports: short tiles are the costly ones, and balanced heights leave
// the fewest. AVX2 (kMR = 6), 32 rows: 5+5+5+5+6+6 is 32 cycles a k at L = 4 or 5, where 6+6+6+6+4+4
// (the remainder merged with the last full tile and split in halves, the rule before) took 34 on Zen 2.
// Measured on one Zen 2 core, the LSTM step's 4 x 16 panels of K = 512 (W_hh streaming from L3):
// B32 95.8 -> 100.7 GFLOP/s, B20 92.0 -> 99.7, B16 95.4 -> 99.4, B24 and B64 unchanged; the B32 H512
// LSTM forward 1.04x on two cores.
template <int NV>
inline void panel(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                  float* c, int64_t ldc, float alpha, bool accumulate) {
  const int64_t tiles = (M + kMR - 1) / kMR;
  for (int64_t i = 0, m = 0; i < tiles; ++i) {
    const int64_t rows = (M - m) / (tiles - i);
    if (rows == kMR) tile<kMR, NV>(K, a + m * a_rs, a_rs, a_cs, b, ldb, c + m * ldc, ldc, alpha, accumulate);
    else short_tile<NV>(rows, K, a + m * a_rs, a_rs, a_cs, b, ldb, c + m * ldc, ldc, alpha, accumulate);
    m += rows;
  }
}

}  // namespace gemm_detail

// C (+)= alpha * A * B for N a multiple of the vector width (see the top of this file). With K == 0
// the product is zero: C is zeroed, or left as it is when accumulating.
// Long K runs in slices of kKC rows of B, so that a column panel of B (kKC x 32 floats, 32 KiB)
// stays in L1 while every row tile of C passes over it; C accumulates across slices.
inline void small_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                       const float* b, int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  using namespace gemm_detail;
  constexpr int64_t VS = fVec::size();
  constexpr int64_t kKC = 256;
  int64_t k0 = 0;
  do {
    const int64_t kc = std::min(kKC, K - k0);
    const float* ak = a + k0 * a_cs;
    const float* bk = b + k0 * ldb;
    int64_t n = 0;
    for (; n + 2 * VS <= N; n += 2 * VS) panel<2>(M, kc, ak, a_rs, a_cs, bk + n, ldb, c + n, ldc, alpha, accumulate);
    if (n < N) panel<1>(M, kc, ak, a_rs, a_cs, bk + n, ldb, c + n, ldc, alpha, accumulate);
    accumulate = true;
    k0 += kKC;
  } while (k0 < K);
}

// dst[i] = lo[i] | hi[i] << 16 for i < n: two rows of bf16 (hi == nullptr: zeros) as pairs, the
// operand layout of the bf16 GEMMs below (and of attention's VNNI packing); 16 at a time with AVX-512.
inline void interleave_pairs_bf16(const c10::BFloat16* lo, const c10::BFloat16* hi, int64_t n, uint32_t* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo + i));
    const __m512i h = hi == nullptr ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi + i));
    _mm512_mask_storeu_epi32(dst + i, m, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = lo[i].x | (hi != nullptr ? static_cast<uint32_t>(hi[i].x) << 16 : 0u);
#endif
}

// ---- bf16 operands on the CPU's bf16 dot products -------------------------------------------------
// Where the build targets AVX512_BF16 (vdpbf16ps: each fp32 lane adds the products of one pair of
// bf16 values from each operand), C[M, N] = A[M, K] B[K, N] with bf16 A and B and fp32 sums, at twice
// the multiply rate of fp32 FMA and half the bytes of B. Operands are packed in pairs of k:
//   A: a[m * a_rs + kp * a_cs] is a uint32 holding A[m, 2kp] (low half) and A[m, 2kp + 1] (high
//      half): a k-major pair layout (a_rs = 1), or a row-major bf16 matrix read as pairs (a_cs = 1);
//   B: b[(kp * ldb + n) * 2 + k % 2] for row pair kp, column n (ldb columns per pair row), the
//      VNNI layout of amx.h;
// K2 = ceil(K / 2) pairs, an odd K padded with zeros in both. N is a multiple of 16; C is written,
// or accumulated into with `accumulate`.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define BIGNLP_FAST_BF16_DOT 1
namespace gemm_detail {
template <int MR, int NV>
inline void tile_bf16(int64_t K2, const uint32_t* a, int64_t a_rs, int64_t a_cs, const c10::BFloat16* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + (kp * ldb + v * 16) * 2);
    const uint32_t* ak = a + kp * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[r * a_rs]));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * 16;
      _mm512_storeu_ps(cp, accumulate ? _mm512_add_ps(_mm512_loadu_ps(cp), acc[r][v]) : acc[r][v]);
    }
}

template <int NV>
inline void panel_bf16(int64_t M, int64_t K2, const uint32_t* a, int64_t a_rs, int64_t a_cs, const c10::BFloat16* b,
                       int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) tile_bf16<8, NV>(K2, a + m * a_rs, a_rs, a_cs, b, ldb, c + m * ldc, ldc, accumulate);
  const uint32_t* am = a + m * a_rs;
  float* cm = c + m * ldc;
  switch (M - m) {
    case 1: tile_bf16<1, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 2: tile_bf16<2, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 3: tile_bf16<3, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 4: tile_bf16<4, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 5: tile_bf16<5, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 6: tile_bf16<6, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    case 7: tile_bf16<7, NV>(K2, am, a_rs, a_cs, b, ldb, cm, ldc, accumulate); break;
    default: break;
  }
}
}  // namespace gemm_detail

// Long K runs in slices of kKC2 pairs, so that a column panel of B (kKC2 x 32 pairs, 16 KiB) stays
// in L1 while every row tile of C passes over it.
inline void small_gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t a_rs, int64_t a_cs,
                            const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc, bool accumulate = false) {
  constexpr int64_t kKC2 = 128;
  int64_t k0 = 0;
  do {
    const int64_t kc = std::min(kKC2, K2 - k0);
    const uint32_t* ak = a + k0 * a_cs;
    const c10::BFloat16* bk = b + k0 * ldb * 2;
    int64_t n = 0;
    for (; n + 32 <= N; n += 32) gemm_detail::panel_bf16<2>(M, kc, ak, a_rs, a_cs, bk + n * 2, ldb, c + n, ldc, accumulate);
    if (n < N) gemm_detail::panel_bf16<1>(M, kc, ak, a_rs, a_cs, bk + n * 2, ldb, c + n, ldc, accumulate);
    accumulate = true;
    k0 += kKC2;
  } while (k0 < K2);
}

// A [K, M] fp32 operand (k-major, as the recurrent state is kept) as bf16 pairs of k for
// small_gemm_bf16: out[kp * M + m] = (bf16(a[2kp * M + m]), bf16(a[(2kp + 1) * M + m]) or 0).
inline void pack_pairs_bf16(const float* a, int64_t K, int64_t M, uint32_t* out) {
  for (int64_t kp = 0; kp < (K + 1) / 2; ++kp)
    for (int64_t m = 0; m < M; ++m) {
      const uint32_t lo = c10::BFloat16(a[2 * kp * M + m]).x;
      const uint32_t hi = 2 * kp + 1 < K ? c10::BFloat16(a[(2 * kp + 1) * M + m]).x : 0;
      out[kp * M + m] = lo | (hi << 16);
    }
}
#else
// Built without AVX512_BF16: callers check cpu::bf16_dot() (amx.h), which is false here.
inline void small_gemm_bf16(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const c10::BFloat16*, int64_t,
                            float*, int64_t, bool = false) {
  TORCH_INTERNAL_ASSERT(false, "small_gemm_bf16: this build does not target AVX512_BF16");
}
inline void pack_pairs_bf16(const float*, int64_t, int64_t, uint32_t*) {
  TORCH_INTERNAL_ASSERT(false, "pack_pairs_bf16: this build does not target AVX512_BF16");
}
#endif

namespace gemm_detail {
constexpr int64_t kPanel = 2 * at::vec::Vectorized<float>::size();  // columns per B panel (32 with AVX-512)
constexpr int64_t kRows = 8 * kMR;                                   // rows per A block of packed_gemm
}  // namespace gemm_detail

// A strided operand: element (r, c) at p[r * rs + c * cs].
template <typename T>
struct Strided {
  const T* p;
  int64_t rs, cs;
  float at(int64_t r, int64_t c) const { return static_cast<float>(p[r * rs + c * cs]); }
};

namespace gemm_detail {
// The tasks of packed_gemm, shared by its fp32 and bf16 tiles: (row block, group of B panels), each
// writing its own part of C. K is the depth in the packed operands' units (floats, or bf16 pairs),
// taken in slices of at most kc_max: pack_a(m0, mc, k0, kc, a) packs rows [m0, m0 + mc), depths
// [k0, k0 + kc) of A into a thread's buffer of kc_max * kRows elements of type AT; tile(mc, p, k0,
// kc, a, out, ldo, accumulate) computes (or adds, after the first slice) that slice's product for
// panel p, [mc, kPanel], into out (row stride ldo): straight into a float C where the panel is whole,
// else into a scratch tile; the bias is added and the result stored once the last slice is in.
//
// Why slices: a row block of A packed whole is kRows * K floats, 1 MiB for the weight gradient of an
// LSTM layer (K = T * B = 4096), which filled the 1 MiB L2 of a Zen 5 core, so that the B panels
// streaming through evicted it and every tile read its A from L3. A slice of 512 (128 KiB) stays in
// L2. (With the packing below, that GEMM went from 353-365 to 404 GFLOP/s on 2 Zen 5 cores.)
template <typename AT, typename T, typename Out, typename PackA, typename Tile>
void packed_gemm_tasks(int64_t M, int64_t N, int64_t K, int64_t kc_max, const T* bias, Out* C, int64_t ldc,
                       PackA pack_a, Tile tile) {
  const int64_t panels = (N + kPanel - 1) / kPanel, blocks = (M + kRows - 1) / kRows;
  // Enough tasks for every thread: split the panels into groups when row blocks are few. And while
  // the tasks are few, a whole number of them per thread: 3 row blocks in 3 groups left one thread 5
  // tasks and the other 4 (M = 128 or 144 rows); with 4 groups each takes 6. On 2 Zen 2 cores, builds
  // alternated, medians of 41 calls: 128 and 144 rows x 768 -> 3072 1.05-1.13x, 128 x 3072 -> 768
  // 1.04-1.09x, 128 x 768 -> 768 1.04-1.07x.
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::min(panels, std::max<int64_t>(1, (4 * threads + blocks - 1) / blocks));
  while (blocks * groups < 16 * threads && (blocks * groups) % threads != 0 && groups < panels) ++groups;
  const int64_t per_group = (panels + groups - 1) / groups, tasks = blocks * groups;
  // Each thread claims its next task from a shared counter rather than taking a fixed half: where
  // another process slows one of the cores (as compile jobs did on the 2-core Zen 5), the fast core
  // takes more tasks instead of waiting at the region's end (perf of an LSTM forward: 6% of its time
  // in libgomp's join wait with fixed halves).
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, tasks), 1, [&](int64_t, int64_t) {
    LineVector<AT> a_t(std::max<int64_t>(1, std::min(kc_max, K)) * kRows);
    // The panels that do not go straight into C, held across the K slices: every panel of a bf16 C,
    // only the last, partial one of a float C. Uninitialised: the first slice writes them.
    constexpr bool kFloatC = std::is_same_v<Out, float>;
    const int64_t scratch_panels = kFloatC ? 1 : per_group, ldo = scratch_panels * kPanel;
    const LineBuffer<float> out = line_buffer<float>(kRows * ldo);
    auto scratch = [&](int64_t p, int64_t p0) { return out.get() + (kFloatC ? 0 : p - p0) * kPanel; };
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t blk = t / groups, grp = t % groups;
      const int64_t m0 = blk * kRows, mc = std::min(kRows, M - m0);
      const int64_t p0 = grp * per_group, p1 = std::min(panels, p0 + per_group);
      auto direct = [&](int64_t p) { return kFloatC && p * kPanel + kPanel <= N; };
      int64_t k0 = 0;
      do {  // once with K == 0: the tiles then write zeros
        const int64_t kc = std::min(kc_max, K - k0);
        pack_a(m0, mc, k0, kc, a_t.data());
        for (int64_t p = p0; p < p1; ++p) {
          if (!direct(p)) {
            tile(mc, p, k0, kc, a_t.data(), scratch(p, p0), ldo, k0 > 0);
            continue;
          }
          float* c = reinterpret_cast<float*>(C) + m0 * ldc + p * kPanel;
          tile(mc, p, k0, kc, a_t.data(), c, ldc, k0 > 0);
          // The bias, added to the panel's tile of C right after its last slice, while the tile is in
          // L1. (Added in a pass over the row block's C at the end, up to 512 KiB, it found C in L2 or
          // L3: [4096, 512] x [512, 2048] took 42.0 ms that way, 41.0 this way, on a Zen 4.)
          if (bias && k0 + kc == K)
            for (int64_t r = 0; r < mc; ++r)
              for (int64_t u = 0; u < kPanel; u += fVec::size())
                (fVec::loadu(c + r * ldc + u) + load_any(bias + p * kPanel + u, fVec::size())).store(c + r * ldc + u);
        }
        k0 += kc;
      } while (k0 < K);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
        if (direct(p)) continue;
        const float* o = scratch(p, p0);
        for (int64_t r = 0; r < mc; ++r)
          for (int64_t u = 0; u < nc; u += fVec::size()) {
            const int64_t w = std::min<int64_t>(fVec::size(), nc - u);
            const fVec v = load_any(o + r * ldo + u, w);
            store_any(C + (m0 + r) * ldc + n0 + u, bias ? v + load_any(bias + n0 + u, w) : v, w);
          }
      }
    }
  });
}
// Depth of the A slices packed per task (see packed_gemm_tasks): 512 floats, 256 bf16 pairs with
// AVX-512 (kRows = 64: 128 KiB). With AVX2, 1024 (kRows = 48: 192 KiB, in a Zen 3's 512 KiB L2): K = 768
// in one pass instead of two, 1.08x for the 1024 x 768 x 3072 product (in-process A/B; 0.99-1.01x at
// K = 512, where nothing changes, and for the LSTM's K = 4096 weight gradients).
constexpr int64_t kSliceK = at::vec::Vectorized<float>::size() >= 16 ? 512 : 1024;
}  // namespace gemm_detail

namespace gemm_detail {
// (low, high) bf16 bits of elements (r, k) and (r, k + 1) of an operand read as S(r, k) (rows) or
// S(k, r) (!rows); 0 past K
template <typename T>
inline uint32_t bf16_pair(const Strided<T>& S, int64_t K, int64_t r, int64_t k, bool rows) {
  const T* e = rows ? S.p + r * S.rs + k * S.cs : S.p + k * S.rs + r * S.cs;
  const int64_t step = rows ? S.cs : S.rs;  // from element k to k + 1
  if (k + 1 < K) {
    if (step == 1) {  // the pair is one uint32 in memory (x's rows, linear's weight)
      uint32_t v;
      std::memcpy(&v, e, sizeof(v));
      return v;
    }
    return static_cast<uint32_t>(e[0].x) | (static_cast<uint32_t>(e[step].x) << 16);
  }
  return e[0].x;  // k == K - 1 of an odd K: the high half is 0
}
}  // namespace gemm_detail

// B [K, N] (bf16) as packed_gemm_bf16 reads it: VNNI column panels of bf16 pairs of k, panel p at
// bp + p * K2 * kPanel as [K2, kPanel] uint32 (columns past N: 0). Packed once per call, or once for
// all calls by linear_pack_cpu (a weight used for inference).
// The packing moves whole vectors where the layout allows (element by element it was ~13% of a
// [1024, 768] x [768, 3072] product on a Zen 4, against ~3% for the fp32 path's): pairs that are one
// uint32 of a row (W of W^T) by 32-bit transposes; pairs from two rows of a row-major operand (W in
// dx = dG W) by interleaving the two rows.
template <typename T>
void pack_b_bf16(int64_t N, int64_t K, Strided<T> B, uint32_t* bp) {
  using gemm_detail::kPanel;
  const int64_t panels = (N + kPanel - 1) / kPanel, K2 = (K + 1) / 2;
  const bool b_pairs_in_rows = B.rs == 1 && K % 2 == 0 && B.cs % 2 == 0;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* dst = bp + p * K2 * kPanel;
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      if (b_pairs_in_rows) {  // B = W^T of a row-major W [N, K]: W's rows n0.. as uint32 [nc, K2], transposed
        transpose_32bit(reinterpret_cast<const uint32_t*>(B.p + n0 * B.cs), B.cs / 2, dst, kPanel, nc, K2, kPanel);
        continue;
      }
      for (int64_t kp = 0; kp < K2; ++kp) {
        uint32_t* row = dst + kp * kPanel;
        if (B.cs == 1) {  // row-major B: its rows 2kp and 2kp + 1, columns n0..
          interleave_pairs_bf16(B.p + 2 * kp * B.rs + n0, 2 * kp + 1 < K ? B.p + (2 * kp + 1) * B.rs + n0 : nullptr,
                                nc, row);
          std::fill(row + nc, row + kPanel, 0u);
          continue;
        }
        for (int64_t u = 0; u < kPanel; ++u) row[u] = u < nc ? gemm_detail::bf16_pair(B, K, n0 + u, 2 * kp, false) : 0u;
      }
    }
  });
}

// packed_gemm for bf16 operands where bf16_dot() holds (amx.h): the same tasks, with both operands
// packed as bf16 pairs of k instead of fp32 (B in VNNI column panels [K2, kPanel, 2], A per row block
// as [K2, kRows] uint32 pairs) and the tiles on small_gemm_bf16; the sums are fp32, the products of
// bf16 values exact, so the result matches the fp32 path up to summation order. b_packed: B already
// packed by pack_b_bf16, or nullptr.
template <typename T, typename Out>
void packed_gemm_bf16(int64_t M, int64_t N, int64_t K, Strided<T> A, Strided<T> B, const T* bias, Out* C, int64_t ldc,
                      const uint32_t* b_packed = nullptr) {
  using gemm_detail::kPanel;
  using gemm_detail::kRows;
  const int64_t panels = (N + kPanel - 1) / kPanel, K2 = (K + 1) / 2;
  // every element is written by pack_b_bf16: from the buffer cache (buffer_cache.h)
  const at::Tensor bp_t = cached_empty({b_packed ? 0 : panels * K2 * kPanel}, at::TensorOptions().dtype(at::kInt));
  const uint32_t* bp = b_packed;
  if (!b_packed) {
    pack_b_bf16(N, K, B, reinterpret_cast<uint32_t*>(bp_t.data_ptr<int32_t>()));
    bp = reinterpret_cast<const uint32_t*>(bp_t.data_ptr<int32_t>());
  }
  // A by the same means: 32-bit transposes of a row-major A (x), interleaved rows of A = X^T (dG^T)
  const bool a_pairs_in_rows = A.cs == 1 && K % 2 == 0 && A.rs % 2 == 0;
  gemm_detail::packed_gemm_tasks<uint32_t>(M, N, K2, gemm_detail::kSliceK / 2, bias, C, ldc,
      [&](int64_t m0, int64_t mc, int64_t k0, int64_t kc, uint32_t* a) {
    if (a_pairs_in_rows) {  // row-major A: rows m0.. as uint32 [mc, kc] from pair k0, transposed
      transpose_32bit(reinterpret_cast<const uint32_t*>(A.p + m0 * A.rs) + k0, A.rs / 2, a, kRows, mc, kc, mc);
      return;
    }
    if (A.rs == 1) {  // A = X^T of a row-major X: X's rows 2k and 2k + 1, columns m0..
      for (int64_t kp = 0; kp < kc; ++kp) {
        const int64_t k = 2 * (k0 + kp);
        interleave_pairs_bf16(A.p + k * A.cs + m0, k + 1 < K ? A.p + (k + 1) * A.cs + m0 : nullptr, mc, a + kp * kRows);
      }
      return;
    }
    for (int64_t r = 0; r < mc; ++r)
      for (int64_t kp = 0; kp < kc; ++kp) a[kp * kRows + r] = gemm_detail::bf16_pair(A, K, m0 + r, 2 * (k0 + kp), true);
  }, [&](int64_t mc, int64_t p, int64_t k0, int64_t kc, const uint32_t* a, float* out, int64_t ldo, bool acc) {
    small_gemm_bf16(mc, kPanel, kc, a, 1, kRows,
                    reinterpret_cast<const c10::BFloat16*>(bp + (p * K2 + k0) * kPanel), kPanel, out, ldo, acc);
  });
}

namespace gemm_detail {
// packed_gemm's tiles for one panel and one slice of K: the row block's micro-panels a ([kc, kMR]
// each, kMR rows apart in a) against the panel b, the whole slice in one pass per tile (small_gemm
// would cut it into pieces of 256). Out of line on purpose: inlined into packed_gemm_tasks' loop,
// where GCC kept the loop's integers in vector registers, the 8-row tile had one B vector spilled to
// the stack and reloaded by every FMA, ten 64-byte loads for sixteen FMAs a k; a Zen 4, which takes
// one 64-byte load a cycle, ran [4096, 512] x [512, 2048] at 166 GFLOP/s (71% of its FMA peak), and
// at 194 with this call (2 loads, 8 broadcasts, 16 FMAs a k).
inline __attribute__((noinline)) void micro_panel_tiles(int64_t mc, int64_t kc, const float* a, const float* b, int64_t ldb,
                                                        float* out, int64_t ldo, bool accumulate) {
  for (int64_t m = 0; m < mc; m += kMR) {
    const int64_t rows = std::min<int64_t>(kMR, mc - m);
    panel<2>(rows, kc, a + m * kc, 1, kMR, b, ldb, out + m * ldo, ldo, 1.f, accumulate);
  }
}
}  // namespace gemm_detail

// B [K, N] as packed_gemm reads it: column panels of kPanel floats, panel p at bp + p * K * kPanel as
// [K, kPanel] (columns past N: 0). Packed once per call, or once for all calls by linear_pack_cpu (a
// weight used for inference). The packing is a transpose (B = W^T of a row-major W) or a copy of
// rows; for float operands with one unit stride the transposes move 16 x 16 or 8 x 8 blocks through
// registers (transpose_f32).
template <typename T>
void pack_b(int64_t N, int64_t K, Strided<T> B, float* bp) {
  using gemm_detail::kPanel;
  constexpr bool kFloat = std::is_same_v<T, float>;
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = bp + p * K * kPanel;
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      if (B.rs == 1) {  // B = W^T of a row-major W [N, K]: transpose nc rows of W (columns past N: 0)
        transpose_to_float(B.p + n0 * B.cs, B.cs, dst, kPanel, nc, K, kPanel);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        if (kFloat && B.cs == 1 && nc == kPanel) {  // row-major B: a copy of each row's columns
          std::memcpy(dst + k * kPanel, reinterpret_cast<const float*>(B.p) + k * B.rs + n0, kPanel * sizeof(float));
          continue;
        }
        for (int64_t u = 0; u < kPanel; ++u) dst[k * kPanel + u] = u < nc ? B.at(k, n0 + u) : 0.f;
      }
    }
  });
}

// C[M, N] = A[M, K] B[K, N] (+ bias[N]), C of type Out with row stride ldc: a parallel GEMM for large
// operands. Both are packed to fp32 once per call: B in column panels of kPanel floats (pack_b), A per
// row block of kRows rows in micro-panels of kMR rows, transposed ([kc, kMR] each: the micro-kernel
// then broadcasts consecutive floats). Tasks are (row block, group of panels), each writing its own
// part of C (gemm_detail::packed_gemm_tasks). bf16 operands take packed_gemm_bf16 where bf16_dot()
// holds. b_packed: B packed already (by pack_b; by pack_b_bf16 for bf16 operands where bf16_dot()
// holds), or nullptr.
template <typename T, typename Out>
void packed_gemm(int64_t M, int64_t N, int64_t K, Strided<T> A, Strided<T> B, const T* bias, Out* C, int64_t ldc,
                 const void* b_packed = nullptr) {
  using gemm_detail::kPanel;
  using gemm_detail::kRows;
  if (M == 0 || N == 0) return;  // (an empty batch: nothing to plan tasks for)
  if (K == 0) {                  // an empty sum: C = bias, or 0 (the weight gradient of an empty batch)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = static_cast<Out>(bias ? static_cast<float>(bias[n]) : 0.f);
    return;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_dot()) return packed_gemm_bf16(M, N, K, A, B, bias, C, ldc, static_cast<const uint32_t*>(b_packed));
  }
  const int64_t panels = (N + kPanel - 1) / kPanel;
  constexpr bool kFloat = std::is_same_v<T, float>;
  // A row-major float B [K, N] of whole panels (GPT-2's Conv1D weights, W^T) against one row block of A
  // (a prompt of up to kRows tokens): the tiles read B in place, each element used at most kRows times;
  // packing it would read and write all of B once more first. GPT-2's prompt products, 32 rows, in-process
  // A/B, medians of 5: 1.17-1.44x (a copy of each panel's slice into a contiguous buffer: 1.12-1.26x).
  const bool direct_b = !b_packed && kFloat && B.cs == 1 && N % kPanel == 0 && M <= kRows;
  // A [N, K] B^T (nn.Linear's weight) against one row block: each panel's slice of K is packed by the
  // task that needs it, into a thread's buffer that stays in L2, just before its tiles (the one row
  // block packs each slice once, as pack_b would). Packed whole first, B went out to L3 and came back:
  // 17-64 rows of [768 -> 3072], [3072 -> 768], [768 -> 768], [512 -> 2048] on 2 Zen 4 cores against
  // F.linear, alternated processes, medians of 41: 0.58-1.47x before, 1.00-1.70x (mostly 1.1-1.5x) after.
  const bool local_b = !b_packed && !direct_b && B.rs == 1 && M <= kRows;
  const bool pack_whole = !b_packed && !direct_b && !local_b;
  // every element is written by pack_b: from the buffer cache (buffer_cache.h)
  const at::Tensor bp_t =
      cached_empty({pack_whole ? panels * K * kPanel : 0}, at::TensorOptions().dtype(at::kFloat));
  const float* bp = static_cast<const float*>(b_packed);
  if (pack_whole) {
    pack_b(N, K, B, bp_t.data_ptr<float>());
    bp = bp_t.data_ptr<float>();
  }
  // A's packing below: transposes, or copies of rows. Read element by element, a row-major A whose
  // rows lie a power of two apart (x [4096, 512], dG [4096, 2048]) put all 64 rows of a block into
  // one or two L1 sets: dx = dG W of an LSTM layer ran at 66% of the micro-kernel's rate (305 GFLOP/s
  // on 2 Zen 5 cores; 390 with the block transposes).
  // A's block in micro-panels, one per tile of kMR rows: a[m * kc + k * kMR + r] = A(m0 + m + r, k0 + k), so
  // that a tile reads its A as one contiguous stream. (A [kc, kRows] block instead, each tile's kMR floats
  // of a k a row of the block apart, took a line of L1 for every k: on a Zen 3, AVX2, the 1024 x 768 x
  // 3072 product ran at 150 GFLOP/s that way and 167 with micro-panels, prototype measured in one process.)
  using gemm_detail::kMR;
  gemm_detail::packed_gemm_tasks<float>(M, N, K, gemm_detail::kSliceK, bias, C, ldc,
      [&](int64_t m0, int64_t mc, int64_t k0, int64_t kc, float* a) {
    if (kFloat && A.rs == 1 && A.cs != 1) {
      // A = X^T of a row-major X (a weight gradient's dG^T): row k of X holds the block's mc values of
      // depth k side by side, kMR of them for each micro-panel. Walked row by row, each of X's lines is
      // read once, whole, and asked for 8 rows ahead (the rows are a power of two apart, beyond what the
      // hardware prefetcher follows). Micro-panel by micro-panel, with a memcpy of a variable size
      // (compiled to `rep movs`, ~30 cycles for 32 bytes), the packing was 18% of the LSTM's weight
      // gradient [2048, 4096] x [4096, 512] on a Zen 4: 49.0 -> 41.9 ms (medians of 7, alternated).
      constexpr int64_t kAhead = 8;
      const float* x = reinterpret_cast<const float*>(A.p) + m0;
      for (int64_t k = 0; k < kc; ++k) {
        const float* xk = x + (k0 + k) * A.cs;
        if (k + kAhead < kc)
          for (int64_t q = 0; q < mc; q += 64 / sizeof(float)) __builtin_prefetch(xk + kAhead * A.cs + q, 0, 1);
        int64_t m = 0;
        for (; m + kMR <= mc; m += kMR) std::memcpy(a + m * kc + k * kMR, xk + m, kMR * sizeof(float));
        if (m < mc) std::memcpy(a + m * kc + k * kMR, xk + m, (mc - m) * sizeof(float));
      }
      return;
    }
    for (int64_t m = 0; m < mc; m += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, mc - m);
      float* micro = a + m * kc;  // this tile's [kc, kMR] micro-panel
      if (A.cs == 1) {  // row-major A: transposes
        transpose_to_float(A.p + (m0 + m) * A.rs + k0, A.rs, micro, kMR, rows, kc, rows);
      } else {
        for (int64_t k = 0; k < kc; ++k)
          for (int64_t r = 0; r < rows; ++r) micro[k * kMR + r] = A.at(m0 + m + r, k0 + k);
      }
    }
  }, [&](int64_t mc, int64_t p, int64_t k0, int64_t kc, const float* a, float* out, int64_t ldo, bool acc) {
    if (local_b) {  // this panel's slice [kc, kPanel], packed here (see local_b): 64 KiB a thread with AVX-512
      static thread_local LineVector<float> buf(gemm_detail::kSliceK * kPanel);  // (kc <= kSliceK)
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      transpose_to_float(B.p + n0 * B.cs + k0, B.cs, buf.data(), kPanel, nc, kc, kPanel);
      gemm_detail::micro_panel_tiles(mc, kc, a, buf.data(), kPanel, out, ldo, acc);
      return;
    }
    const float* b =
        direct_b ? reinterpret_cast<const float*>(B.p) + k0 * B.rs + p * kPanel : bp + (p * K + k0) * kPanel;
    gemm_detail::micro_panel_tiles(mc, kc, a, b, direct_b ? B.rs : kPanel, out, ldo, acc);
  });
}

// C[M, N] = A[M, K] B[K, N] (+ bias) for a float A read in place (row-major, row stride lda) and B
// packed already by pack_b (a weight packed once: linear_pack_cpu): each thread takes a fixed range of
// B's panels and multiplies every row of A by them (small_gemm: K in slices whose part of the panel
// stays in L1 while the row tiles pass over it), onto the bias. No packing at all, where packed_gemm
// packs each row block of A once per group of panels and hands out tasks from a counter: for a few
// hundred rows that packing and those tasks cost more than they save. 2-core Xeon (AMX build),
// in-process medians, GFLOP/s against packed_gemm's on the same packed B and MKL's (F.linear): 32 rows
// of [768, 768] 310 / 141 / 155, 64 rows of [3072, 768] 287 / 160 / 201, 128 rows of [768, 3072]
// 296 / 195 / 263, 256 rows of [3072, 768] 275 / 242 / 292 (MKL ahead from there on: 384 rows and up).
// For the cells on packed weights (rnn.cpp) the same loop runs fused with their update.
inline void prepacked_rows_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* bp,
                                const float* bias, float* C, int64_t ldc) {
  using gemm_detail::kPanel;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // a thread's share is at least ~1M multiply-adds (~4 us), else waking the pool costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, M * K * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    LineBuffer<float> part;  // the last, partial panel ([M, kPanel]: its columns past N are not C's)
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      if (nc < kPanel && !part) part = line_buffer<float>(M * kPanel);
      float* c = nc == kPanel ? C + n0 : part.get();
      const int64_t ldo = nc == kPanel ? ldc : kPanel;
      for (int64_t m = 0; m < M; ++m) {
        float* row = c + m * ldo;
        if (bias != nullptr) std::copy_n(bias + n0, nc, row);
        std::fill(row + (bias != nullptr ? nc : 0), row + kPanel, 0.f);
      }
      small_gemm(M, kPanel, K, a, lda, 1, bp + p * K * kPanel, kPanel, c, ldo, 1.f, true);
      if (nc < kPanel)
        for (int64_t m = 0; m < M; ++m) std::copy_n(part.get() + m * kPanel, nc, C + m * ldc + n0);
    }
  });
}

// Whether torch's fp32 GEMM (MKL) beats packed_gemm on this machine and build (linear.cpp).
bool blas_sgemm_is_fast();
// The most rows of x that linear_fwd_cpu runs on the streaming kernels for a [N, K] weight (skinny_gemm.h),
// packed already (linear_pack_cpu) or not.
int64_t linear_streaming_rows(bool prepacked);
// The most rows of float32 x that linear_fwd_cpu multiplies by a packed weight on prepacked_rows_gemm
// (past the streaming rows), 0 where it is not used (linear.cpp).
int64_t linear_prepacked_direct_rows();

// a^T b for fp32 a [R, X] and b [R, Y]: [X, Y] fp32 (the weight gradients of the recurrent ops: a sum
// over every (step, row)) on packed_gemm, or on torch's GEMM where that is the faster one.
inline at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b) {
  if (blas_sgemm_is_fast()) return at::mm(a.t(), b);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t R = ac.size(0), X = ac.size(1), Y = bc.size(1);
  at::Tensor c = cached_empty({X, Y}, ac.options());
  packed_gemm<float, float>(X, Y, R, {ac.const_data_ptr<float>(), 1, X}, {bc.const_data_ptr<float>(), Y, 1}, nullptr,
                            c.data_ptr<float>(), Y);
  return c;
}

inline int64_t round_up_to_vec(int64_t n) {
  constexpr int64_t VS = at::vec::Vectorized<float>::size();
  return (n + VS - 1) / VS * VS;
}

}  // namespace bignlp_fast::cpu

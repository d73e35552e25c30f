// y[M, N] = x[M, K] W^T + b for a few rows (M <= kSkinnyRows, or kSkinnyRowsTiled in the rows layout
// below): the matrix products of decoding,
// one token per sequence, where the whole cost is reading W from memory once. BLAS libraries do
// this well for M = 1 (a GEMV) but fall to a fraction of the memory bandwidth for M = 2..16; here
// every M streams W exactly once, each weight used for all M rows while it is in registers or L1.
//
// W comes in either layout, without a copy:
//   rows: W [N, K] with K contiguous (torch.nn.Linear's weight). Each output is a dot product. One
//         or two rows of x: a thread reads its rows of W one after the other, front to back; three:
//         kRowsNR rows of W at a time as parallel streams; four and more: kRowsTileNR rows of W
//         against register tiles of 4 rows of x, the next rows prefetched.
//   cols: W^T stored [K, N] with N contiguous (transformers' Conv1D weight). Outputs accumulate
//         axpy-style: K is cut into chunks, a thread reads its chunks' rows front to back, kColsKB
//         adjacent rows at a time (parallel streams) across all N columns, adding x[m, k] * W^T[k, :]
//         into the chunk's fp32 partial sums [M, N] (in L1/L2); the partials are added at the end.
// x is converted to fp32 once; sums are fp32; T (x, W, bias, y) is float or bfloat16.
#pragma once

#include <memory>
#include <vector>

#include "common.h"

namespace bignlp_fast::cpu {

constexpr int64_t kSkinnyRows = 16;  // up to this many rows of x the skinny kernels beat a packed GEMM
// The rows layout where fVec is 8 wide (AVX2 builds: the ones that run ops.linear's fp32 products on
// Zen 1 / Zen 2 only, MKL's being the faster elsewhere, and its bf16 products on CPUs without AVX-512):
// up to this many rows of x, skinny_gemm_rows_tiled (W read once; each block of kRowsTileNR rows of W
// met by every row of x from L1) beats packed_gemm, which first packs all of W, every call. Zen 2, 2
// cores, 24 to 64 rows against [768, 768], [2048, 512] and [768, 3072] weights, in-process medians:
// fp32 1.07-1.7x F.linear where packed_gemm ran 0.72-0.97x; bf16 3.6-7.4x where it ran 2.0-3.1x. At
// 128 rows the two were level. AVX-512 builds keep kSkinnyRows (not measured beyond it).
constexpr int64_t kSkinnyRowsTiled = fVec::size() == 8 ? 64 : kSkinnyRows;
// ... and with the weight packed once already (linear_pack_cpu), which spares packed_gemm its per-call
// packing: Zen 2, 2 cores, [768, 768], [768, 3072] and [3072, 768], in-process medians, fp32 and bf16:
// the prepacked GEMM 1.0-1.3x the streaming kernels at 48 and 64 rows, 0.8-1.3x at 24 and 32.
constexpr int64_t kSkinnyRowsPrepacked = std::min<int64_t>(kSkinnyRowsTiled, 32);
constexpr int64_t kRowsNR = 8;       // rows layout: weight rows per task step
constexpr int64_t kColsKB = 8;       // cols layout: weight rows (k) per pass, read as parallel streams

// rows layout, one or two rows of x against NR rows of w from k = 0 (three rows of x: a pair and one):
// the dot products' fp32 sums. One accumulator per (row of x, row of w), both vectors of a step
// chained into it. (For one and two rows of x the sequential dot_row_1 / dot_row_2 below are faster.)
template <int NR, bool kTwo, typename T>
inline void dot_rows(int64_t K, const float* x0, const float* x1, const T* const* wr, float* s0, float* s1) {
  const int64_t K_main = K / kStep * kStep;
  fVec acc0[NR], acc1[NR];
  for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = fVec(0.f);
  for (int64_t k = 0; k < K_main; k += kStep) {
    fVec xa0, xb0, xa1, xb1;
    load2(x0 + k, xa0, xb0);
    if (kTwo) load2(x1 + k, xa1, xb1);
    for (int r = 0; r < NR; ++r) {
      fVec wa, wb;
      load2(wr[r] + k, wa, wb);
      acc0[r] = at::vec::fmadd(xb0, wb, at::vec::fmadd(xa0, wa, acc0[r]));
      if (kTwo) acc1[r] = at::vec::fmadd(xb1, wb, at::vec::fmadd(xa1, wa, acc1[r]));
    }
  }
  // horizontal sums: lanes to memory, then scalar adds across the lanes
  for (int r = 0; r < NR; ++r) {
    alignas(64) float lanes[2][fVec::size()];
    acc0[r].store(lanes[0]);
    if (kTwo) acc1[r].store(lanes[1]);
    float t0 = 0.f, t1 = 0.f;
    for (int64_t l = 0; l < fVec::size(); ++l) {
      t0 += lanes[0][l];
      if (kTwo) t1 += lanes[1][l];
    }
    for (int64_t k = K_main; k < K; ++k) {  // the ragged tail of K
      const float wk = static_cast<float>(wr[r][k]);
      t0 += x0[k] * wk;
      if (kTwo) t1 += x1[k] * wk;
    }
    s0[r] = t0;
    s1[r] = t1;
  }
}

// rows layout, one or two rows of x against one row of w: the dot products' fp32 sums. A thread
// reads its rows of w one after the other, front to back. On the Zen 5 machine, against kRowsNR
// parallel streams (dot_rows), in-process A/B runs minutes apart: GPT-2's lm_head 1.12-1.41x at one
// row, 1.28-1.63x at two; 12 weights 3072 x 768 from memory 1.13-1.41x and 1.36-1.86x (the more
// bandwidth the machine gave, the larger the gain); in cache 0.87-1.15x. One row
// keeps four sums, so that enough multiply-adds are in flight (a version shared with two rows,
// written with compile-time loops, read the lm_head 0.94-0.96x as fast as this one).
template <typename T>
inline float dot_row_1(int64_t K, const float* x, const T* w) {
  const int64_t K2 = K / (2 * kStep) * (2 * kStep), K_main = K / kStep * kStep;
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t k = 0;
  for (; k < K2; k += 2 * kStep) {
    fVec xa, xb, xc, xd, wa, wb, wc, wd;
    load2(x + k, xa, xb);
    load2(x + k + kStep, xc, xd);
    load2(w + k, wa, wb);
    load2(w + k + kStep, wc, wd);
    a0 = at::vec::fmadd(xa, wa, a0);
    a1 = at::vec::fmadd(xb, wb, a1);
    a2 = at::vec::fmadd(xc, wc, a2);
    a3 = at::vec::fmadd(xd, wd, a3);
  }
  for (; k < K_main; k += kStep) {
    fVec xa, xb, wa, wb;
    load2(x + k, xa, xb);
    load2(w + k, wa, wb);
    a0 = at::vec::fmadd(xa, wa, a0);
    a1 = at::vec::fmadd(xb, wb, a1);
  }
  float t = hsum((a0 + a1) + (a2 + a3));
  for (; k < K; ++k) t += x[k] * static_cast<float>(w[k]);  // the ragged tail of K
  return t;
}
// Two rows of x (K apart) against one row of w: s[0], s[1]. (dot_rows<1, true>, which chains both
// vectors of a step into one sum per row, ran 0.78-1.09x as fast as this.)
template <typename T>
inline void dot_row_2(int64_t K, const float* x, const T* w, float* s) {
  const int64_t K_main = K / kStep * kStep;
  fVec a0(0.f), a1(0.f), b0(0.f), b1(0.f);
  for (int64_t k = 0; k < K_main; k += kStep) {
    fVec wa, wb, xa, xb, ya, yb;
    load2(w + k, wa, wb);
    load2(x + k, xa, xb);
    load2(x + K + k, ya, yb);
    a0 = at::vec::fmadd(xa, wa, a0);
    a1 = at::vec::fmadd(xb, wb, a1);
    b0 = at::vec::fmadd(ya, wa, b0);
    b1 = at::vec::fmadd(yb, wb, b1);
  }
  float t0 = hsum(a0 + a1), t1 = hsum(b0 + b1);
  for (int64_t k = K_main; k < K; ++k) {  // the ragged tail of K
    const float wk = static_cast<float>(w[k]);
    t0 += x[k] * wk;
    t1 += x[K + k] * wk;
  }
  s[0] = t0;
  s[1] = t1;
}

// rows layout, MR rows of x against kRowsTileNR rows of w (4 or more rows of x): MR x 4 dot products
// in registers (16 sums at MR = 4, each step's two vectors chained into one), the horizontal sums once
// at the end. dot_rows' pairs of rows of x re-read every row of w per pair and sum 16 lanes per pair:
// at 8 rows of x it read GPT-2's lm_head at ~25 GB/s.
constexpr int64_t kRowsTileNR = 4;
template <int MR, bool kPrefetch, typename T>
inline void dot_tile(int64_t K, const float* x, const T* w, float* s) {
  constexpr int NR = kRowsTileNR;
  const int64_t K_main = K / kStep * kStep;
  fVec acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[i][r] = fVec(0.f);
  for (int64_t k = 0; k < K_main; k += kStep) {
    fVec wa[NR], wb[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      load2(w + r * K + k, wa[r], wb[r]);
      in_register(wa[r]), in_register(wb[r]);  // read once, not once per row of x (common.h)
    }
    if (kPrefetch) {  // the next block's rows, NR * K ahead (see skinny_gemm_rows_tiled)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const char* next = reinterpret_cast<const char*>(w + (NR + r) * K + k);
        __builtin_prefetch(next);
        __builtin_prefetch(next + 64);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      fVec xa, xb;
      load2(x + i * K + k, xa, xb);
      in_register(xa), in_register(xb);  // (with only w pinned, GCC folded x instead: 40 loads again)
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[i][r] = at::vec::fmadd(xb, wb[r], at::vec::fmadd(xa, wa[r], acc[i][r]));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      float t = hsum(acc[i][r]);
      for (int64_t k = K_main; k < K; ++k) t += x[i * K + k] * static_cast<float>(w[r * K + k]);  // ragged tail
      s[i * NR + r] = t;
    }
}

// rows layout, 4..kSkinnyRows rows of x (at 3 the pairs below were faster): a task takes kRowsTileNR
// rows of w (a block), and every block of 4 rows of x meets them (read from memory once, from L1
// after); the first block of rows of x prefetches the next block of w. From memory, against the pairs
// of dot_rows: 1.47x / 1.62x / 1.30x at 4 / 8 / 16 rows of x (1.21x / 1.11x / 1.17x without the
// prefetch), 768 x 3072 weights, both builds in one process, medians of 5.
template <typename T>
void skinny_gemm_rows_tiled(int64_t M, int64_t N, int64_t K, const float* xf, const T* w, const T* bias, T* y) {
  constexpr int64_t NR = kRowsTileNR;
  const int64_t blocks = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (NR * K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NR, nr = std::min(NR, N - n0);
      // the last block's missing rows: the last row again (its sums are dropped)
      LineVector<T> padded;
      const T* wb = w + n0 * K;
      if (nr < NR) {
        padded.resize(NR * K);
        for (int64_t r = 0; r < NR; ++r) std::copy_n(w + (n0 + std::min(r, nr - 1)) * K, K, padded.data() + r * K);
        wb = padded.data();
      }
      float s[4 * NR];
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m0);
        const float* x = xf + m0 * K;
        // the first block of rows of x fetches the next block of w ahead (the others find it in L1)
        const bool first = m0 == 0 && blk + 1 < b1;
        switch (mr) {
          case 4: first ? dot_tile<4, true>(K, x, wb, s) : dot_tile<4, false>(K, x, wb, s); break;
          case 3: first ? dot_tile<3, true>(K, x, wb, s) : dot_tile<3, false>(K, x, wb, s); break;
          case 2: first ? dot_tile<2, true>(K, x, wb, s) : dot_tile<2, false>(K, x, wb, s); break;
          default: first ? dot_tile<1, true>(K, x, wb, s) : dot_tile<1, false>(K, x, wb, s); break;
        }
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t r = 0; r < nr; ++r)
            y[(m0 + i) * N + n0 + r] = static_cast<T>(s[i * NR + r] + (bias ? static_cast<float>(bias[n0 + r]) : 0.f));
      }
    }
  });
}

// rows layout: y[m, n] = sum_k xf[m, k] w[n, k] + bias[n]. One or two rows of x: the rows of w one
// after the other (dot_row_1 / dot_row_2); four or more: skinny_gemm_rows_tiled; three: a task takes
// kRowsNR rows of w (kRowsNR parallel streams) and the rows of x meet them as a pair and one, the
// weights re-read from L1/L2 (with 16 vector registers, AVX2, half of the rows at a time so that the
// sums stay in registers).
template <typename T>
void skinny_gemm_rows(int64_t M, int64_t N, int64_t K, const float* xf, const T* w, const T* bias, T* y) {
  if (M == 0) return;  // (no rows of x: nothing to write)
  if (M >= 4) return skinny_gemm_rows_tiled(M, N, K, xf, w, bias, y);
  if (M <= 2) {  // one row of w after the other, each thread's rows front to back
    at::parallel_for(0, N, std::max<int64_t>(1, (64 << 10) / (K * static_cast<int64_t>(sizeof(T)))),
                     [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        float s[2];
        if (M == 1) s[0] = dot_row_1(K, xf, w + n * K);
        else dot_row_2(K, xf, w + n * K, s);
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(s[m] + (bias ? static_cast<float>(bias[n]) : 0.f));
      }
    });
    return;
  }
  constexpr int kPair = fVec::size() >= 16 ? kRowsNR : kRowsNR / 2;  // rows of w per pair of rows of x
  const int64_t blocks = (N + kRowsNR - 1) / kRowsNR;
  // at::parallel_for gives each thread one contiguous range; the grain only keeps a thread from
  // waking for less than ~64 KB of weights
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRowsNR * K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRowsNR, nr = std::min(kRowsNR, N - n0);
      const T* wr[kRowsNR];
      for (int64_t r = 0; r < kRowsNR; ++r) wr[r] = w + (n0 + std::min(r, nr - 1)) * K;  // tail: repeat a row
      float s0[kRowsNR], s1[kRowsNR];
      auto put = [&](int64_t m, const float* s) {
        for (int64_t r = 0; r < nr; ++r)
          y[m * N + n0 + r] = static_cast<T>(s[r] + (bias ? static_cast<float>(bias[n0 + r]) : 0.f));
      };
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const bool two = m0 + 1 < M;
        if (!two) {
          dot_rows<kRowsNR, false>(K, xf + m0 * K, nullptr, wr, s0, s1);
        } else {
          for (int h = 0; h < kRowsNR; h += kPair)
            dot_rows<kPair, true>(K, xf + m0 * K, xf + (m0 + 1) * K, wr + h, s0 + h, s1 + h);
        }
        put(m0, s0);
        if (two) put(m0 + 1, s1);
      }
    }
  });
}

// cols layout: K is cut into at most kColsChunks chunks of whole passes (a function of K alone, so the
// sums' order, and the result, never depend on the thread count); a thread takes consecutive chunks,
// so its share of W^T is one contiguous region, read front to back. A chunk's fp32 partial sums
// [M, ld] stay in L1/L2; the partials are added in chunk order at the end.
constexpr int64_t kColsChunks = 8;
constexpr int64_t kColsMinRows = 64;  // rows of W^T per chunk at least

// One pass over kb (<= kColsKB) rows of W^T for one row of x (decoding at batch 1), for the NS steps
// of columns at w (row stride ldw): acc[:NS*kStep] += sum_j xv[j] * w[j, :], xv the pass's values of
// x broadcast once for all the column blocks; the sums stay in registers during the pass.
template <int NS, typename T>
inline void cols_pass_1(int64_t kb, const fVec* xv, const T* w, int64_t ldw, float* acc) {
  fVec s[2 * NS];
  for (int v = 0; v < NS; ++v) load2(acc + v * kStep, s[2 * v], s[2 * v + 1]);
  for (int64_t j = 0; j < kb; ++j) {
    for (int v = 0; v < NS; ++v) {
      fVec wa, wb;
      load2(w + j * ldw + v * kStep, wa, wb);
      s[2 * v] = at::vec::fmadd(xv[j], wa, s[2 * v]);
      s[2 * v + 1] = at::vec::fmadd(xv[j], wb, s[2 * v + 1]);
    }
  }
  for (int v = 0; v < NS; ++v) store2(acc + v * kStep, s[2 * v], s[2 * v + 1]);
}

// One step of columns for MB rows of x and KB rows of W^T, every size known at compile time so that
// the MB x 2 sums, the weights and the broadcast x stay in registers:
// acc[i, :kStep] += sum_j x[i, j] * w[j, :] for i < MB, j < KB (x row stride ldx, w's ldw, acc's ld).
// (With the pass's weights in arrays across a call and a runtime pass length, GCC kept them and the
// sums on the stack: in cache, 768x1024 at 8 and 16 rows ran 1.2x and 1.35x slower than this.)
// GCC folds the loads of wa and wb into each row's multiply-add; pinning them in registers
// (in_register, common.h) ran 1.16-1.21x faster in cache at 8 rows but 0.96x on GPT-2's 12 layers read
// from memory (greedy generation at batch 8: 0.97-0.98x), so they are left to the compiler.
template <int MB, int KB, typename T>
inline void cols_tile(const float* x, int64_t ldx, const T* w, int64_t ldw, float* acc, int64_t ld) {
  fVec sa[MB], sb[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) load2(acc + i * ld, sa[i], sb[i]);
#pragma GCC unroll 8
  for (int j = 0; j < KB; ++j) {
    fVec wa, wb;
    load2(w + j * ldw, wa, wb);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const fVec xv(x[i * ldx + j]);
      sa[i] = at::vec::fmadd(xv, wa, sa[i]);
      sb[i] = at::vec::fmadd(xv, wb, sb[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) store2(acc + i * ld, sa[i], sb[i]);
}

// cols_tile for all M rows of x, kb <= kColsKB rows of W^T from k0: a full pass in one tile per block
// of rows, a ragged one (the last rows of K) a row at a time. Blocks of 4 rows: the weights, read from
// memory for the first block, come from L1 for the others; from memory, one block of 8 rows read W
// slower than two of 4 (0.84x at M = 8), though 1.1x faster in cache.
template <int MB, typename T>
inline void cols_tile_rows(const float* x, int64_t K, int64_t kb, const T* w, int64_t ldw, float* acc, int64_t ld) {
  if (kb == kColsKB) {
    cols_tile<MB, kColsKB>(x, K, w, ldw, acc, ld);
  } else {
    for (int64_t j = 0; j < kb; ++j) cols_tile<MB, 1>(x + j, K, w + j * ldw, ldw, acc, ld);
  }
}
template <typename T>
inline void cols_pass_m(int64_t M, int64_t K, int64_t k0, int64_t kb, const float* xf, const T* w, int64_t ldw,
                        float* acc, int64_t ld) {
  // the pass's rows 4 steps of columns ahead: from memory (12 cold 768x3072 weights, in-process A/B,
  // medians of 5, four runs) 1.05-1.19x / 1.20-1.38x / 1.18-1.30x at 2 / 4 / 8 rows of x, 1.05-1.07x at
  // 16; in cache (768x1024) 0.92x / 0.97x / 1.00x / 0.99x
  for (int64_t j = 0; j < kb; ++j) {
    const char* next = reinterpret_cast<const char*>(w + j * ldw + 4 * kStep);
    __builtin_prefetch(next);
    __builtin_prefetch(next + 64);
  }
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) cols_tile_rows<4>(xf + m0 * K + k0, K, kb, w, ldw, acc + m0 * ld, ld);
  const float* x = xf + m0 * K + k0;
  float* a = acc + m0 * ld;
  switch (M - m0) {
    case 3: cols_tile_rows<3>(x, K, kb, w, ldw, a, ld); break;
    case 2: cols_tile_rows<2>(x, K, kb, w, ldw, a, ld); break;
    case 1: cols_tile_rows<1>(x, K, kb, w, ldw, a, ld); break;
    default: break;
  }
}

// cols layout: y[m, n] = sum_k xf[m, k] wt[k, n] + bias[n], wt row-major [K, N]
template <typename T>
void skinny_gemm_cols(int64_t M, int64_t N, int64_t K, const float* xf, const T* wt, const T* bias, T* y) {
  // the partial sums' row stride: a whole number of steps, and not a multiple of 4 KiB, where every row
  // of a tile would fall in one set of L1 with the pass's weight rows (1 KiB would do as well)
  const int64_t ld = round_up_to_step(N) + (round_up_to_step(N) % 256 == 0 ? kStep : 0), full = N / kStep * kStep;
  const int64_t passes = (K + kColsKB - 1) / kColsKB;
  const int64_t chunks = std::clamp<int64_t>(K / kColsMinRows, 1, kColsChunks);
  const int64_t per_chunk = (passes + chunks - 1) / chunks * kColsKB;  // rows of W^T per chunk
  const int64_t chunk_bytes = per_chunk * N * static_cast<int64_t>(sizeof(T));
  // [chunks, M, ld], each chunk zeroed by the thread that fills it (a zero-initialised vector would
  // be one single-threaded pass over it before the parallel region)
  const LineBuffer<float> partial = line_buffer<float>(chunks * M * ld);
  // at::parallel_for gives each thread one contiguous range of chunks; the grain only keeps a thread
  // from waking for less than ~64 KB of weights
  at::parallel_for(0, chunks, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, chunk_bytes)),
                   [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      float* acc = partial.get() + ch * M * ld;
      std::fill(acc, acc + M * ld, 0.f);
      float ragged[kColsKB][kStep];
      for (int64_t k0 = ch * per_chunk; k0 < std::min(K, (ch + 1) * per_chunk); k0 += kColsKB) {
        const int64_t kb = std::min(kColsKB, K - k0);
        const T* w = wt + k0 * N;
        int64_t c = 0;
        if (M == 1) {
          fVec xv[kColsKB];
          for (int64_t j = 0; j < kb; ++j) xv[j] = fVec(xf[k0 + j]);
          for (; c + 2 * kStep <= full; c += 2 * kStep) cols_pass_1<2>(kb, xv, w + c, N, acc + c);
          for (; c < full; c += kStep) cols_pass_1<1>(kb, xv, w + c, N, acc + c);
        }
        for (; c < full; c += kStep) cols_pass_m(M, K, k0, kb, xf, w + c, N, acc + c, ld);
        if (c < N) {  // the ragged last columns: a zero-padded fp32 copy
          for (int64_t j = 0; j < kb; ++j)
            for (int64_t i = 0; i < kStep; ++i) ragged[j][i] = c + i < N ? static_cast<float>(w[j * N + c + i]) : 0.f;
          cols_pass_m(M, K, k0, kb, xf, &ragged[0][0], kStep, acc + c, ld);
        }
      }
    }
  });
  // y = bias + the chunks' partial sums in chunk order, in parallel over steps of columns (a pass
  // over chunks * M * N floats in L2: ~10 us single-threaded at M = 1, N = 3072, a tenth of the call)
  const int64_t steps = ld / kStep;
  at::parallel_for(0, M * steps, 32, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / steps, c = i % steps * kStep;
      fVec sa(0.f), sb(0.f);
      if (bias) load2_any(bias + c, N - c, sa, sb);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        fVec pa, pb;
        load2(partial.get() + (ch * M + m) * ld + c, pa, pb);
        sa = sa + pa;
        sb = sb + pb;
      }
      store2_any(y + m * N + c, N - c, sa, sb);
    }
  });
}

}  // namespace bignlp_fast::cpu

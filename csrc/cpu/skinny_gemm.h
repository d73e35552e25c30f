// y[M, N] = x[M, K] W^T + b for a few rows (M <= kSkinnyRows): the matrix products of decoding,
// one token per sequence, where the whole cost is reading W from memory once. BLAS libraries do
// this well for M = 1 (a GEMV) but fall to a fraction of the memory bandwidth for M = 2..16; here
// every M streams W exactly once, each weight used for all M rows while it is in registers or L1.
//
// W comes in either layout, without a copy:
//   rows: W [N, K] with K contiguous (torch.nn.Linear's weight). Each output is a dot product;
//         a task takes kRowsNR weight rows at a time and reads them as kRowsNR parallel streams.
//   cols: W^T stored [K, N] with N contiguous (transformers' Conv1D weight). Outputs accumulate
//         axpy-style: a thread owns a range of columns and reads kColsKB weight rows of it at a time
//         (kColsKB parallel streams), one column step at a time; each step's weights are used for
//         every row of x before the next is read, adding x[m, k] * W^T[k, cols] into fp32 sums in L1/L2.
// x is converted to fp32 once; sums are fp32; T (x, W, bias, y) is float or bfloat16.
#pragma once

#include <vector>

#include "common.h"

namespace bignlp_fast::cpu {

constexpr int64_t kSkinnyRows = 16;  // up to this many rows of x the skinny kernels beat a packed GEMM
constexpr int64_t kRowsNR = 4;       // rows layout: weight rows per task step
constexpr int64_t kColsKB = 8;       // cols layout: weight rows (k) per pass

// rows layout, one or two rows of x against kRowsNR rows of w from k = 0: the dot products' fp32 sums.
template <bool kTwo, typename T>
inline void dot_rows(int64_t K, const float* x0, const float* x1, const T* const* wr, float* s0, float* s1) {
  const int64_t K_main = K / kStep * kStep;
  fVec acc0[kRowsNR], acc1[kRowsNR];
  for (int64_t r = 0; r < kRowsNR; ++r) acc0[r] = acc1[r] = fVec(0.f);
  for (int64_t k = 0; k < K_main; k += kStep) {
    fVec xa0, xb0, xa1, xb1;
    load2(x0 + k, xa0, xb0);
    if (kTwo) load2(x1 + k, xa1, xb1);
    for (int64_t r = 0; r < kRowsNR; ++r) {
      fVec wa, wb;
      load2(wr[r] + k, wa, wb);
      acc0[r] = at::vec::fmadd(xa0, wa, at::vec::fmadd(xb0, wb, acc0[r]));
      if (kTwo) acc1[r] = at::vec::fmadd(xa1, wa, at::vec::fmadd(xb1, wb, acc1[r]));
    }
  }
  // horizontal sums, all rows at once: lanes to memory, then vector adds across the lanes
  alignas(64) float lanes[2][kRowsNR][fVec::size()];
  for (int64_t r = 0; r < kRowsNR; ++r) {
    acc0[r].store(lanes[0][r]);
    if (kTwo) acc1[r].store(lanes[1][r]);
  }
  for (int64_t r = 0; r < kRowsNR; ++r) {
    float t0 = 0.f, t1 = 0.f;
    for (int64_t i = 0; i < fVec::size(); ++i) {
      t0 += lanes[0][r][i];
      if (kTwo) t1 += lanes[1][r][i];
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

// rows layout: y[m, n] = sum_k xf[m, k] w[n, k] + bias[n]
template <typename T>
void skinny_gemm_rows(int64_t M, int64_t N, int64_t K, const float* xf, const T* w, const T* bias, T* y) {
  const int64_t blocks = (N + kRowsNR - 1) / kRowsNR;
  // at::parallel_for gives each thread one contiguous range; the grain only keeps a thread from
  // waking for less than ~64 KB of weights
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRowsNR * K * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRowsNR, nr = std::min(kRowsNR, N - n0);
      const T* wr[kRowsNR];
      for (int64_t r = 0; r < kRowsNR; ++r) wr[r] = w + (n0 + std::min(r, nr - 1)) * K;  // tail: repeat a row
      for (int64_t m0 = 0; m0 < M; m0 += 2) {  // rows of x in pairs: w's rows are re-read from L1/L2
        const bool two = m0 + 1 < M;
        float s0[kRowsNR], s1[kRowsNR];
        if (two) dot_rows<true>(K, xf + m0 * K, xf + (m0 + 1) * K, wr, s0, s1);
        else dot_rows<false>(K, xf + m0 * K, nullptr, wr, s0, s1);
        for (int64_t r = 0; r < nr; ++r) {
          const float b = bias ? static_cast<float>(bias[n0 + r]) : 0.f;
          y[m0 * N + n0 + r] = static_cast<T>(s0[r] + b);
          if (two) y[(m0 + 1) * N + n0 + r] = static_cast<T>(s1[r] + b);
        }
      }
    }
  });
}

// cols layout, rows m0..m0+MB of x: acc[m, c..c+kStep) += sum_j x[m, k0 + j] * w[j], w the step's
// kb weight rows (fp32, in L1), acc [M, ld] the fp32 sums. The MB rows' sums stay in registers.
template <int MB>
inline void axpy_rows(const float* xf, int64_t K, int64_t m0, int64_t k0, int64_t kb, const fVec* wa, const fVec* wb,
                      float* acc, int64_t ld) {
  fVec sa[MB], sb[MB];
  for (int i = 0; i < MB; ++i) load2(acc + (m0 + i) * ld, sa[i], sb[i]);
  for (int64_t j = 0; j < kb; ++j) {
    for (int i = 0; i < MB; ++i) {
      const fVec xv(xf[(m0 + i) * K + k0 + j]);
      sa[i] = at::vec::fmadd(xv, wa[j], sa[i]);
      sb[i] = at::vec::fmadd(xv, wb[j], sb[i]);
    }
  }
  for (int i = 0; i < MB; ++i) store2(acc + (m0 + i) * ld, sa[i], sb[i]);
}

// cols layout: y[m, n] = sum_k xf[m, k] wt[k, n] + bias[n], wt row-major [K, N]
template <typename T>
void skinny_gemm_cols(int64_t M, int64_t N, int64_t K, const float* xf, const T* wt, const T* bias, T* y) {
  constexpr int kMB = 4;  // rows of x whose sums are held in registers at once
  const int64_t steps = (N + kStep - 1) / kStep;  // column steps of kStep
  // one contiguous column range per thread (so each weight row is read in long runs); the grain
  // only keeps a thread from waking for less than ~64 KB of weights
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (K * kStep * static_cast<int64_t>(sizeof(T))));
  at::parallel_for(0, steps, grain, [&](int64_t s0, int64_t s1) {
    const int64_t c0 = s0 * kStep, c1 = std::min(s1 * kStep, N), width = c1 - c0;
    const int64_t ld = round_up_to_step(width);
    std::vector<float> acc(M * ld, 0.f);  // [M, ld] fp32 sums of this thread's columns
    float ragged[kStep];
    for (int64_t k0 = 0; k0 < K; k0 += kColsKB) {
      const int64_t kb = std::min(kColsKB, K - k0);
      for (int64_t c = 0; c < width; c += kStep) {
        // the step's weights, read from memory once: kb rows (kb parallel streams) of kStep columns
        fVec wa[kColsKB], wb[kColsKB];
        const int64_t n = std::min(kStep, width - c);
        for (int64_t j = 0; j < kb; ++j) {
          const T* src = wt + (k0 + j) * N + c0 + c;
          if (n == kStep) {
            load2(src, wa[j], wb[j]);
          } else {  // the ragged last step of the matrix: a zero-padded copy
            for (int64_t i = 0; i < kStep; ++i) ragged[i] = i < n ? static_cast<float>(src[i]) : 0.f;
            load2(ragged, wa[j], wb[j]);
          }
        }
        float* a = acc.data() + c;
        int64_t m0 = 0;
        for (; m0 + kMB <= M; m0 += kMB) axpy_rows<kMB>(xf, K, m0, k0, kb, wa, wb, a, ld);
        switch (M - m0) {
          case 3: axpy_rows<3>(xf, K, m0, k0, kb, wa, wb, a, ld); break;
          case 2: axpy_rows<2>(xf, K, m0, k0, kb, wa, wb, a, ld); break;
          case 1: axpy_rows<1>(xf, K, m0, k0, kb, wa, wb, a, ld); break;
          default: break;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < width; ++c)
        y[m * N + c0 + c] = static_cast<T>(acc[m * ld + c] + (bias ? static_cast<float>(bias[c0 + c]) : 0.f));
  });
}

}  // namespace bignlp_fast::cpu

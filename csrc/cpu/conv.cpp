// conv1d / conv2d on the CPU with a fused epilogue: out = act(conv(x) + bias) + residual.
//
// conv1d in float32 with stride 1 and groups 1 (the layers of sequence models), over at least 128
// output positions, runs on the project's own implicit GEMM below, the epilogue applied to each task's
// output tile while it is in cache; with three taps and dilation 1 (the common case) the tasks run
// Winograd's F(2, 3) instead, 2/3 of the multiplies. Its backward computes grad_x the same way (a
// convolution of the gradient with the reversed, transposed weight) and, over long enough reductions,
// grad_w on a GEMM of its own (implicit_grad_weight), else on oneDNN. conv2d 3 x 3 with stride 1 runs
// Winograd's F(2x2, 3x3) where that measured faster (winograd2_applies): forward, grad_x, and grad_w
// through the same transforms (winograd2_grad_weight). Depthwise convolutions (groups = C_in = C_out,
// stride 1; conv1d and conv2d, float32 and bfloat16) run per plane on kernels of their own, forward
// and backward (depthwise_conv).
// Everything else (other conv2d, bfloat16, strided, grouped or short convolutions) calls ATen's
// (oneDNN) convolution with its bias, v = conv(x) + bias, and then one epilogue pass over the output,
// viewed as [B * C_out, S] rows (S the spatial size). The saved pre-activation is v in x's dtype (on
// every path: see the contract in bignlp_fast/ops/conv.py).
// The backward's epilogue pass computes gp = grad_out * act'(pre) and per-row sums of gp for the bias
// gradient (reduced per channel over the batch in a fixed order: deterministic), then hands gp to the
// convolution's backward.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/gemm.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;
using cpu::seq_channels_last;

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && (x.dim() == 3 || x.dim() == 4), "conv: x must be a 3-D or 4-D CPU tensor, got ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(w.dim() == x.dim() && w.scalar_type() == x.scalar_type(), "conv: weight must be ", x.dim(),
              "-D with x's dtype, got ", w.sizes(), " ", w.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->is_contiguous(),
                "conv: bias must be a contiguous [", w.size(0), "] vector of x's dtype, got ", bias->sizes());
  }
}

// out[0, n) = act(pre[0, n) + b) (+ res[0, n)) for n elements (a step of kStep or fewer).
template <int A, typename S, typename T>
inline void epilogue_step(const S* pre, int64_t n, const fVec& b, const T* res, T* out) {
  fVec a, c;
  cpu::load2_any(pre, n, a, c);
  a = cpu::activate<A>(a + b);
  c = cpu::activate<A>(c + b);
  if (res) {
    fVec ra, rc;
    cpu::load2_any(res, n, ra, rc);
    a = a + ra;
    c = c + rc;
  }
  cpu::store2_any(out, n, a, c);
}

// The epilogues of oneDNN's convolution, whose output pre = conv(x) + bias already holds the bias.
// out[r, :] = act(pre[r, :]) (+ res[r, :]) for rows [r0, r1); out may be pre. The loops over rows of
// both epilogues are functions of their own, so that every pointer and size is a local value (read
// through parallel_for's captured references, each would be loaded again after every vector store:
// see add_layer_norm.cpp, bwd_chunks).
template <int A, typename T>
void epilogue_fwd_rows(int64_t r0, int64_t r1, const T* pre, const T* res, T* out, int64_t S) {
  const fVec zero(0.f);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * S;
    for (int64_t s = 0; s < S; s += kStep)
      epilogue_step<A>(pre + o + s, std::min(kStep, S - s), zero, res ? res + o + s : nullptr, out + o + s);
  }
}

template <int A, typename T>
void epilogue_fwd(const T* pre, const T* res, T* out, int64_t rows, int64_t S) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    epilogue_fwd_rows<A>(r0, r1, pre, res, out, S);
  });
}

// gp[r, :] = g[r, :] * act'(pre[r, :]); row_sums[r] = sum of gp[r, :] (fp32), rows [r0, r1).
template <int A, typename T>
void epilogue_bwd_rows(int64_t r0, int64_t r1, const T* g, const T* pre, T* gp, float* row_sums, int64_t S) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * S;
    fVec sum(0.f);
    for (int64_t s = 0; s < S; s += kStep) {
      fVec ga, gc, pa, pc;
      cpu::load2_any(g + o + s, S - s, ga, gc);  // lanes past S load 0: they add nothing below
      cpu::load2_any(pre + o + s, S - s, pa, pc);
      ga = ga * cpu::activate_grad<A>(pa);
      gc = gc * cpu::activate_grad<A>(pc);
      cpu::store2_any(gp + o + s, S - s, ga, gc);
      sum = sum + ga + gc;
    }
    row_sums[r] = cpu::hsum(sum);
  }
}

template <int A, typename T>
void epilogue_bwd(const T* g, const T* pre, T* gp, float* row_sums, int64_t rows, int64_t S) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    epilogue_bwd_rows<A>(r0, r1, g, pre, gp, row_sums, S);
  });
}

// ---- channels-last outputs: [P, C] with P = B * H * W positions, the channels contiguous --------
// out[p, :] = act(pre[p, :]) (+ res[p, :]) for positions [p0, p1).
template <int A, typename T>
void epilogue_fwd_cl_rows(int64_t p0, int64_t p1, const T* pre, const T* res, T* out, int64_t C) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p * C;
    for (int64_t c = 0; c < C; c += kStep) {
      const int64_t n = std::min(kStep, C - c);
      fVec a, b;
      cpu::load2_any(pre + o + c, n, a, b);
      a = cpu::activate<A>(a);
      b = cpu::activate<A>(b);
      if (res) {
        fVec ra, rb;
        cpu::load2_any(res + o + c, n, ra, rb);
        a = a + ra;
        b = b + rb;
      }
      cpu::store2_any(out + o + c, n, a, b);
    }
  }
}

template <int A, typename T>
void epilogue_fwd_cl(const T* pre, const T* res, T* out, int64_t P, int64_t C) {
  at::parallel_for(0, P, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t p0, int64_t p1) {
    epilogue_fwd_cl_rows<A>(p0, p1, pre, res, out, C);
  });
}

// gp[p, :] = g[p, :] * act'(pre[p, :]) for positions [p0, p1); adds gp's columns (fp32) to sums[C].
template <int A, typename T>
void epilogue_bwd_cl_rows(int64_t p0, int64_t p1, const T* g, const T* pre, T* gp, float* sums, int64_t C) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p * C;
    for (int64_t c = 0; c < C; c += kStep) {
      const int64_t n = std::min(kStep, C - c);
      fVec ga, gb, pa, pb, sa, sb;
      cpu::load2_any(g + o + c, n, ga, gb);  // lanes past C load 0: they add nothing below
      cpu::load2_any(pre + o + c, n, pa, pb);
      ga = ga * cpu::activate_grad<A>(pa);
      gb = gb * cpu::activate_grad<A>(pb);
      cpu::store2_any(gp + o + c, n, ga, gb);
      if (sums) {
        cpu::load2_any(sums + c, n, sa, sb);
        cpu::store2_any(sums + c, n, sa + ga, sb + gb);
      }
    }
  }
}

// The backward epilogue over [P, C]: the positions are cut into chunks of cpu::rows_per_chunk(P) (a
// function of the shape only), each chunk sums its gp columns into its own row of `partial`
// [chunks, C] (when given), and the caller adds the rows in chunk order: a deterministic bias gradient.
template <int A, typename T>
void epilogue_bwd_cl(const T* g, const T* pre, T* gp, float* partial, int64_t P, int64_t C) {
  const int64_t chunk = cpu::rows_per_chunk(P), chunks = (P + chunk - 1) / chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* sums = partial ? partial + k * C : nullptr;
      if (sums) std::fill(sums, sums + C, 0.f);
      epilogue_bwd_cl_rows<A>(k * chunk, std::min(P, (k + 1) * chunk), g, pre, gp, sums, C);
    }
  });
}

// A 4-D tensor laid out channels-last (and not also plain contiguous, as tensors with C = 1 or H = W = 1 are).
bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Our own main loops pay off with 16-wide vectors (AVX-512). With 8-wide ones (an AVX2 build) oneDNN's
// convolution beat the plain implicit GEMM (conv1d k = 1, 5 and k = 3 dilated: 0.83-0.93x forward,
// 0.87-0.97x with the backward) and Winograd's F(2x2, 3x3) (0.85-1.03x) on an AVX2 EPYC, fair
// allocator, session 29; Winograd's F(2, 3) for conv1d still won there (1.16x / 1.14x), so only that
// one stays on such builds. set_conv_own_loops overrides the choice (tests reach every path on one
// machine; measurements compare both). Session 35 found F(2x2, 3x3) ahead on AVX2 from 128 input
// channels (kWinograd2MinChannelsNarrow), a shape range session 29 had not measured.
constexpr bool kWideVectors = fVec::size() >= 16;
std::atomic<int> g_own_loops{-1};  // -1: by the vector width; 0 / 1: set_conv_own_loops

bool own_loops_now() {
  const int mode = g_own_loops.load(std::memory_order_relaxed);
  return mode < 0 ? kWideVectors : mode == 1;
}

// Winograd's F(2x2, 3x3) with 8-wide vectors, by input channels (the same Zen 2, session 35, with the
// transforms vectorized for AVX2; forward / forward + backward with bias + GELU + residual, against
// oneDNN + the epilogue, medians of 5 alternating rounds in one process): from 128 channels it won,
// 4x128x32x32 1.21x / 1.24x, 4x192x28x28 1.15x / 1.09x, 2x256x32x32 1.32-1.39x / 1.14-1.18x,
// 4x256x28x28 1.23x / 1.15x, 8x128x28x28 1.00-1.03x / 1.00-1.06x; below it was even or lost,
// 16x64x32x32 0.98x / 1.07x, 4x64x56x56 0.98x / 0.99x, 8x48x56x56 0.94x / 0.98x. So AVX2 builds take
// it from 128 input channels by default.
constexpr int64_t kWinograd2MinChannelsNarrow = 128;

bool winograd2_on(int64_t in_channels) {
  const bool by_default = g_own_loops.load(std::memory_order_relaxed) < 0;
  return own_loops_now() || (by_default && in_channels >= kWinograd2MinChannelsNarrow);
}

// ---- the implicit GEMM: conv1d, float32, stride 1, groups 1 ----------------------------------------
// With x zero-padded by p on both sides, output position q reads padded input positions q + j * d for
// the taps j: every tap is one GEMM, W_j [C_out, C_in] times the same [C_in, L] operand shifted by
// j * d, and the convolution is their sum.
//
// A task is (sequence, run of kTaskCols output positions[, group of output channels]). It copies the
// input columns its taps read (the run plus the largest shift, zero in the padding) into a [C_in, ldb]
// buffer once. The micro-kernel (tap_tile) holds a kMR x kPanel tile of the output in registers and
// runs over every tap and channel of a slice of channels; per slice the run's input columns stay in L1
// while every row block of the weight passes over them. Then bias, activation and residual are
// applied to the task's [C_out, kTaskCols] tile while it is in cache. The weight is packed once per
// call as [C_out / kMR][tap][C_in][kMR] (rows past C_out zero). Tasks are claimed from a shared counter.
//
// The same scheme runs conv2d (a padded image flattened to a grid of rows, taps i * Wp + j apart); it
// measured even with oneDNN forward (0.90-1.07x over runs, 16x64x32x32, 3x3) and slower forward +
// backward (0.91-0.95x), so this code is 1-D only; conv2d 3 x 3 has Winograd's F(2x2, 3x3) below.
using cpu::gemm_detail::kMR;
using cpu::gemm_detail::kPanel;

struct Grid {
  int64_t B, Cin, Cout, L, pad, Lout;
  int64_t touched;              // input floats per channel that one panel's taps read
  std::vector<int64_t> shifts;  // input offset of each tap
};

Grid make_grid(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
               const std::vector<int64_t>& dilation) {
  Grid g;
  g.B = x.size(0);
  g.Cin = x.size(1);
  g.Cout = w.size(0);
  g.L = x.size(2);
  g.pad = padding[0];
  const int64_t k = w.size(2), d = dilation[0];
  g.Lout = g.L + 2 * g.pad - d * (k - 1);
  g.touched = kPanel + d * (k - 1);
  for (int64_t j = 0; j < k; ++j) g.shifts.push_back(j * d);
  return g;
}

constexpr int64_t kTaskCols = 4 * kPanel;

// The tasks of a forward pass: (piece of the output's positions, group of row blocks of output
// channels), claimed by the threads from a shared counter. Few pieces (short sequences, small images,
// small batches): the output channels are split into groups too, so that every thread has several
// tasks to claim (each group transforms or packs the piece's input again: cheap).
struct TaskSplit {
  int64_t groups, per_group, blocks, tasks, threads;
  TaskSplit(int64_t pieces, int64_t row_blocks) : blocks(row_blocks) {
    const int64_t nthreads = at::get_num_threads();
    groups = std::clamp<int64_t>((4 * nthreads + pieces - 1) / std::max<int64_t>(pieces, 1), 1, blocks);
    per_group = (blocks + groups - 1) / groups;
    tasks = pieces * groups;
    threads = std::min<int64_t>(nthreads, tasks);
  }
  int64_t piece(int64_t t) const { return t / groups; }
  int64_t mb0(int64_t t) const { return t % groups * per_group; }
  int64_t mb1(int64_t t) const { return std::min(blocks, mb0(t) + per_group); }
};

// conv1d's: the pieces are (sequence, run of kTaskCols output positions).
struct TaskPlan : TaskSplit {
  int64_t runs, Lout;
  TaskPlan(const Grid& g, int64_t row_blocks)
      : TaskSplit(g.B * ((g.Lout + kTaskCols - 1) / kTaskCols), row_blocks),
        runs((g.Lout + kTaskCols - 1) / kTaskCols), Lout(g.Lout) {}
  struct Task {
    int64_t b, q0, nq, mb0, mb1;  // sequence, first output position and their count, row blocks [mb0, mb1)
  };
  Task task(int64_t t) const {
    const int64_t q0 = piece(t) % runs * kTaskCols;
    return {piece(t) / runs, q0, std::min(kTaskCols, Lout - q0), mb0(t), mb1(t)};
  }
};

// A row stride of at least n floats with an odd number of cache lines, so that the rows of a GEMM
// panel spread over the L1's sets.
inline int64_t odd_line_stride(int64_t n) {
  const int64_t ld = (n + 15) / 16 * 16;
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// One output channel's run of nq positions from its convolution v: pre (when saved) = v + bias, and
// out = act(v + bias) (+ res), at offset o of both.
template <int A>
inline void finish_row(const float* v, int64_t nq, int64_t o, float bias, const float* res, float* out, float* pre) {
  const fVec bv(bias);
  if (pre) {
    constexpr int64_t V = fVec::size();
    for (int64_t u = 0; u < nq; u += V) {
      const int64_t m = std::min(V, nq - u);
      (fVec::loadu(v + u, m) + bv).store(pre + o + u, m);
    }
  }
  for (int64_t u = 0; u < nq; u += kStep)
    epilogue_step<A>(v + u, std::min(kStep, nq - u), bv, res ? res + o + u : nullptr, out + o + u);
}

// dst[0, n) = src[0, n), or zeros without src, in vectors (runs of a few floats at the edges).
inline void copy_run(const float* src, float* dst, int64_t n) {
  constexpr int64_t V = fVec::size();
  for (int64_t i = 0; i < n; i += V) {
    const int64_t m = std::min(V, n - i);
    (src ? fVec::loadu(src + i, m) : fVec(0.f)).store(dst + i, m);
  }
}

// dst[j] = padded input position q0 + j of one channel xc of a sequence, j in [0, n): 0 in the padding.
// x comes from memory, read once by columns of all channels: the same range of the channel kAhead on
// is prefetched (without it the loads' latency was 15% of the time, measured on the 2-D form).
constexpr int64_t kAhead = 4;
inline void padded_run(const float* xc, const Grid& g, int64_t q0, int64_t n, float* dst, bool prefetch_ahead) {
  const int64_t lo = std::clamp(g.pad - q0, int64_t{0}, n), hi = std::clamp(g.pad + g.L - q0, lo, n);
  const float* src = xc + q0 + lo - g.pad;
  if (prefetch_ahead)
    for (int64_t f = 0; f < hi - lo; f += 64 / sizeof(float)) __builtin_prefetch(src + kAhead * g.L + f);
  copy_run(nullptr, dst, lo);
  copy_run(src, dst + lo, hi - lo);
  copy_run(nullptr, dst + hi, n - hi);
}

// dst[c, j] = padded input position q0 + j of channel c of sequence xb, j in [0, n): 0 in the padding.
void pack_columns(const float* xb, const Grid& g, int64_t q0, int64_t n, float* dst, int64_t ldb) {
  for (int64_t c = 0; c < g.Cin; ++c) padded_run(xb + c * g.L, g, q0, n, dst + c * ldb, c + kAhead < g.Cin);
}

// c[kMR, kPanel] (row stride ldc) (+)= sum over taps s and channels k < kc of a[s * a_tap + k * kMR + r] *
// b[k * ldb + shifts[s] + (0 .. kPanel)]: the accumulators stay in registers across taps.
inline void tap_tile(int64_t taps, const int64_t* shifts, int64_t kc, const float* a, int64_t a_tap, const float* b,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int VS = fVec::size();
  fVec acc[kMR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = fVec(0.f);
  for (int64_t s = 0; s < taps; ++s) {
    const float* as = a + s * a_tap;
    const float* bs = b + shifts[s];
    for (int64_t k = 0; k < kc; ++k) {
      const fVec b0 = fVec::loadu(bs + k * ldb), b1 = fVec::loadu(bs + k * ldb + VS);
      const float* ak = as + k * kMR;
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        const fVec ar(ak[r]);
        acc[r][0] = at::vec::fmadd(ar, b0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(ar, b1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {  // the slice's sum added to the others': shorter sums, smaller rounding
    float* cr = c + r * ldc;
    (accumulate ? acc[r][0] + fVec::loadu(cr) : acc[r][0]).store(cr);
    (accumulate ? acc[r][1] + fVec::loadu(cr + VS) : acc[r][1]).store(cr + VS);
  }
}

template <int A>
void implicit_gemm_fwd(const float* x, const float* wp, const float* bias, const float* res, float* out, float* pre,
                       const Grid& g) {
  const int64_t taps = static_cast<int64_t>(g.shifts.size()), max_shift = g.shifts.back();
  const int64_t blocks = (g.Cout + kMR - 1) / kMR, a_tap = g.Cin * kMR;
  // Channels per slice: at most 32, so that each output sums at most 32 * taps products before they are
  // added to the other slices' (float64 error on par with oneDNN's; a single sum over 768 products
  // was 3-4x oneDNN's), and the slice's input columns within ~32 KiB of L1.
  const int64_t kc = std::clamp<int64_t>((32 << 10) / (g.touched * int64_t{sizeof(float)}), 8, 32);
  const int64_t ldb = odd_line_stride(kTaskCols + max_shift);
  const TaskPlan plan(g, blocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, plan.threads, 1, [&](int64_t, int64_t) {
    cpu::LineVector<float> cols(g.Cin * ldb), tile(blocks * kMR * kTaskCols);
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < plan.tasks;) {
      const auto [b, q0, nq, mb0, mb1] = plan.task(t);
      pack_columns(x + b * g.Cin * g.L, g, q0, (nq + kPanel - 1) / kPanel * kPanel + max_shift, cols.data(),
                   ldb);
      for (int64_t k0 = 0; k0 < g.Cin; k0 += kc) {
        const int64_t kn = std::min(kc, g.Cin - k0);
        for (int64_t mb = mb0; mb < mb1; ++mb) {
          // A large weight (C_in * C_out * taps past L2) is read from L3 or memory in short runs, one
          // per tap and block: fetch the next block's while this one computes.
          if (mb + 1 < mb1)
            for (int64_t s = 0; s < taps; ++s)
              for (int64_t f = 0; f < kn * kMR; f += 64 / sizeof(float))
                __builtin_prefetch(wp + (mb + 1) * taps * a_tap + s * a_tap + k0 * kMR + f);
          for (int64_t p = 0; p < nq; p += kPanel)
            tap_tile(taps, g.shifts.data(), kn, wp + mb * taps * a_tap + k0 * kMR, a_tap, cols.data() + k0 * ldb + p,
                     ldb, tile.data() + mb * kMR * kTaskCols + p, kTaskCols, k0 > 0);
        }
      }
      for (int64_t co = mb0 * kMR; co < std::min(g.Cout, mb1 * kMR); ++co)
        finish_row<A>(tile.data() + co * kTaskCols, nq, (b * g.Cout + co) * g.Lout + q0, bias ? bias[co] : 0.f, res,
                      out, pre);
    }
  });
}

// ---- Winograd F(2, 3): conv1d with three taps, dilation 1 -----------------------------------------
// Two outputs y[q], y[q + 1] of a 3-tap convolution read four inputs d0..d3 = x_pad[q .. q + 3];
// Lavin and Gray's minimal filtering F(2, 3) (interpolation points 0, 1, -1 and infinity) computes
// them from four products instead of six:
//   V = (d0 - d2, d1 + d2, d2 - d1, d3 - d1)                the input's transform, per channel and tile
//   U = (g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2)     the weight's, once per call (in double)
//   M_i = sum over input channels of U_i V_i                 one GEMM per point i = 0..3
//   y[q] = M0 + M1 + M2,  y[q + 1] = M1 - M2 + M3.
// So the GEMMs do 2/3 of the direct form's multiply-adds; the transforms are a few additions per
// input and output element. The task is the implicit GEMM's (TaskPlan: kTaskCols outputs, kTiles
// tiles of two), the GEMMs its micro-kernel (one "tap"; the four points' U packed as four taps), over
// slices of input channels (below). The rounding stays on par with the direct sum: the largest error
// against float64, relative to the largest output, was 1.75e-7 on 4 x 256 x 512 -> 256 (oneDNN's
// direct 2.2e-7) and 1.5-2.1e-7 on smaller shapes (oneDNN 1.3-2.0e-7). F(4, 3) would take half the
// multiplies, but in a model of it (float32 einsums) its error was 4.2x the direct sum's: past the
// tests' bound of twice PyTorch's own error, and a loss a user would not expect from a drop-in.
// Measured on 2 Zen 5 cores, forward alone, against the implicit GEMM: 1.36-1.46x (32 x 256 x 512 ->
// 256: 14.2 -> 9.8 ms; 8 x 768 x 128 -> 768, 16 x 64 x 1024 -> 64, 64 x 300 x 256 -> 100,
// 32 x 512 x 256 -> 512); even (0.93-0.96x) where a task holds few outputs (2 x 256 x 140, tiny
// channel counts).
constexpr int64_t kPoints = 4, kTiles = kTaskCols / 2;

// v[i * ld + t] = point i of the input transform of tile t, for t in [0, nt): tile t reads elements
// 2t .. 2t + 3 of a padded row, read in place: its element k is src[first + k] where 0 <= first + k < n,
// else 0 (src == nullptr: a row of zeros). Lanes outside [0, n) are masked off (not read), so the row
// needs no padded copy. With AVX-512, 16 tiles at a time: the even and odd elements of 32 are d0 and
// d1 of the 16 tiles; d2 and d3 are those moved down a tile, with the next tile's d0 / d1 coming in at
// the top.
inline void winograd_input(const float* src, int64_t first, int64_t n, int64_t nt, float* v, int64_t ld) {
  if (src == nullptr) {
    for (int64_t i = 0; i < 4; ++i) std::fill(v + i * ld, v + i * ld + nt, 0.f);
    return;
  }
  auto at = [&](int64_t k) { const int64_t p = first + k; return p >= 0 && p < n ? src[p] : 0.f; };
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto load = [&](int64_t k) {  // padded elements k .. k + 15
    const int64_t p = first + k;
    if (p >= 0 && p + 16 <= n) return _mm512_loadu_ps(src + p);
    const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(p)), lane);
    const __mmask16 m = _mm512_cmpge_epi32_mask(pos, _mm512_setzero_si512()) &
                        _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32(static_cast<int32_t>(n)));
    return _mm512_maskz_loadu_ps(m, src + p);
  };
  for (; t + 16 <= nt; t += 16) {
    const __m512 lo = load(2 * t), hi = load(2 * t + 16);
    const __m512 d0 = _mm512_permutex2var_ps(lo, even, hi), d1 = _mm512_permutex2var_ps(lo, odd, hi);
    const __m512 d2 = _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(_mm512_set1_ps(at(2 * t + 32))), _mm512_castps_si512(d0), 1));
    const __m512 d3 = _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(_mm512_set1_ps(at(2 * t + 33))), _mm512_castps_si512(d1), 1));
    _mm512_storeu_ps(v + t, _mm512_sub_ps(d0, d2));
    _mm512_storeu_ps(v + ld + t, _mm512_add_ps(d1, d2));
    _mm512_storeu_ps(v + 2 * ld + t, _mm512_sub_ps(d2, d1));
    _mm512_storeu_ps(v + 3 * ld + t, _mm512_sub_ps(d3, d1));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // 8 tiles at a time: d0 / d1 are the even / odd elements of the 16 from 2t on (ATen's deinterleave2:
  // cross-lane shuffles), d2 / d3 those of the 16 from 2t + 2 on. A vector that crosses the row's ends
  // is gathered element by element (a row's first or last vector only).
  constexpr int64_t VS = fVec::size();
  float edge[VS];
  auto load = [&](int64_t k) {  // padded elements k .. k + VS - 1
    const int64_t p = first + k;
    if (p >= 0 && p + VS <= n) return fVec::loadu(src + p);
    for (int64_t i = 0; i < VS; ++i) edge[i] = at(k + i);
    return fVec::loadu(edge);
  };
  for (; t + VS <= nt; t += VS) {
    const auto [d0, d1] = at::vec::deinterleave2(load(2 * t), load(2 * t + VS));
    const auto [d2, d3] = at::vec::deinterleave2(load(2 * t + 2), load(2 * t + 2 + VS));
    (d0 - d2).store(v + t);
    (d1 + d2).store(v + ld + t);
    (d2 - d1).store(v + 2 * ld + t);
    (d3 - d1).store(v + 3 * ld + t);
  }
#endif
  for (; t < nt; ++t) {
    const float d0 = at(2 * t), d1 = at(2 * t + 1), d2 = at(2 * t + 2), d3 = at(2 * t + 3);
    v[t] = d0 - d2;
    v[ld + t] = d1 + d2;
    v[2 * ld + t] = d2 - d1;
    v[3 * ld + t] = d3 - d1;
  }
}

// out[2t], out[2t + 1] for the tiles t in [0, nt) from the points' products m[i * ld + t].
inline void winograd_output(const float* m, int64_t ld, int64_t nt, float* out) {
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (; t + 16 <= nt; t += 16) {
    const __m512 m0 = _mm512_loadu_ps(m + t), m1 = _mm512_loadu_ps(m + ld + t);
    const __m512 m2 = _mm512_loadu_ps(m + 2 * ld + t), m3 = _mm512_loadu_ps(m + 3 * ld + t);
    const __m512 y0 = _mm512_add_ps(_mm512_add_ps(m0, m1), m2), y1 = _mm512_add_ps(_mm512_sub_ps(m1, m2), m3);
    _mm512_storeu_ps(out + 2 * t, _mm512_permutex2var_ps(y0, first, y1));  // y0[t] y1[t] y0[t + 1] ...
    _mm512_storeu_ps(out + 2 * t + 16, _mm512_permutex2var_ps(y0, second, y1));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t VS = fVec::size();
  for (; t + VS <= nt; t += VS) {  // y0 and y1 of 8 tiles, interleaved by ATen's interleave2
    const fVec m0 = fVec::loadu(m + t), m1 = fVec::loadu(m + ld + t);
    const fVec m2 = fVec::loadu(m + 2 * ld + t), m3 = fVec::loadu(m + 3 * ld + t);
    const auto [first, second] = at::vec::interleave2(m0 + m1 + m2, m1 - m2 + m3);
    first.store(out + 2 * t);
    second.store(out + 2 * t + VS);
  }
#endif
  for (; t < nt; ++t) {
    const float m0 = m[t], m1 = m[ld + t], m2 = m[2 * ld + t], m3 = m[3 * ld + t];
    out[2 * t] = m0 + m1 + m2;
    out[2 * t + 1] = m1 - m2 + m3;
  }
}

// F(2, 3)'s weight transform G: rows the points 0, 1, -1 and infinity, columns the taps.
constexpr double kWinogradG[4][3] = {{1., 0., 0.}, {.5, .5, .5}, {.5, -.5, .5}, {0., 0., 1.}};

// [C_out, C_in, 3] or [C_out, C_in, 3, 3] -> U as [C_out / kMR][point][C_in][kMR] fp32 (rows past C_out
// zero), the layout of pack_weight with the points as taps: U = G g (four points) or G g G^T (16 points,
// point 4 p + a for row point p and column point a); computed in double and rounded once.
at::Tensor pack_winograd_weight(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const bool two_d = w.dim() == 4;
  const int64_t Cout = w.size(0), Cin = w.size(1), blocks = (Cout + kMR - 1) / kMR;
  const int64_t points = two_d ? 16 : 4, taps = two_d ? 9 : 3;
  at::Tensor packed = at::empty({blocks * points * Cin * kMR}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  // Separably (G along the rows of taps, then along the columns), the kMR rows of a block side by side
  // in the innermost loops (vectorized): 256 x 256 x 3 x 3 took ~1.5 ms a call as 144 scalar
  // multiply-adds per channel pair.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    double g[9][kMR], t[4][3][kMR], u[kMR];
    for (int64_t mb = b0; mb < b1; ++mb)
      for (int64_t ci = 0; ci < Cin; ++ci) {
        for (int64_t r = 0; r < kMR; ++r) {
          const int64_t row = mb * kMR + r;
          for (int64_t k = 0; k < taps; ++k) g[k][r] = row < Cout ? src[(row * Cin + ci) * taps + k] : 0.;
        }
        for (int64_t p = 0; p < (two_d ? 4 : 1); ++p)  // t[p][kw] = sum over kh of G[p][kh] g[kh][kw]
          for (int64_t kw = 0; kw < 3; ++kw)
            for (int64_t r = 0; r < kMR; ++r)
              t[p][kw][r] = two_d ? kWinogradG[p][0] * g[kw][r] + kWinogradG[p][1] * g[3 + kw][r] +
                                        kWinogradG[p][2] * g[6 + kw][r]
                                  : g[kw][r];
        for (int64_t P = 0; P < points; ++P) {
          const int64_t p = P / 4, a = P % 4;
          for (int64_t r = 0; r < kMR; ++r)
            u[r] = kWinogradG[a][0] * t[p][0][r] + kWinogradG[a][1] * t[p][1][r] + kWinogradG[a][2] * t[p][2][r];
          float* d = dst + ((mb * points + P) * Cin + ci) * kMR;
          for (int64_t r = 0; r < kMR; ++r) d[r] = static_cast<float>(u[r]);
        }
      }
  });
  return packed;
}

// The points' GEMMs for one slice of kn input channels [k0, k0 + kn): m[P][rows][kTiles] (+)= U_P's rows
// of blocks [mb0, mb1) times V_P (point P's slice at v + P * ld_point, rows ld_v apart), over `panels`
// panels of tiles; the slices' sums are added (k0 > 0). U as pack_winograd_weight packs it.
inline void winograd_point_gemms(int64_t points, const float* up, int64_t a_point, int64_t k0, int64_t kn, int64_t mb0,
                                 int64_t mb1, const float* v, int64_t ld_point, int64_t ld_v, int64_t panels, float* m,
                                 int64_t rows) {
  const int64_t zero_shift = 0;
  for (int64_t P = 0; P < points; ++P)
    for (int64_t mb = mb0; mb < mb1; ++mb) {
      const float* a = up + (mb * points + P) * a_point + k0 * kMR;
      if (mb + 1 < mb1)  // the next block's slice of U (see implicit_gemm_fwd)
        for (int64_t f = 0; f < kn * kMR; f += 64 / sizeof(float)) __builtin_prefetch(a + points * a_point + f);
      for (int64_t p = 0; p < panels; ++p)
        tap_tile(1, &zero_shift, kn, a, 0, v + P * ld_point + p * kPanel, ld_v,
                 m + (P * rows + mb * kMR) * kTiles + p * kPanel, kTiles, k0 > 0);
    }
}

template <int A>
void winograd_fwd(const float* x, const float* up, const float* bias, const float* res, float* out, float* pre,
                  const Grid& g) {
  const int64_t blocks = (g.Cout + kMR - 1) / kMR, rows = blocks * kMR, a_point = g.Cin * kMR;
  // Input channels per slice: 64. Each point's products are summed in registers over a slice, then
  // added to the other slices' (32 x 256 x 512 -> 256: slices of 32 / 64 / 128 / 256 took 10.7 / 10.1 /
  // 10.2 / 10.8 ms, with errors against float64 of 1.4 / 1.75 / 2.7 / 5.0e-7 of the largest output;
  // oneDNN's 2.2e-7). A slice of V, 64 channels x kTiles, is 16 KiB: it stays in L1 while every row
  // block of U passes over it.
  constexpr int64_t kc = 64;
  const int64_t ld_v = odd_line_stride(kTiles);  // V [point][C_in][ld_v]
  const TaskPlan plan(g, blocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, plan.threads, 1, [&](int64_t, int64_t) {
    // v: the task's transformed input; m: the points' products [point][rows][kTiles]; row: one channel's
    // padded inputs, then one channel's outputs
    cpu::LineVector<float> v(kPoints * g.Cin * ld_v), m(kPoints * rows * kTiles), row(kTaskCols + 2 + 2 * kStep);
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < plan.tasks;) {
      const auto [b, q0, nq, mb0, mb1] = plan.task(t);
      const int64_t nt = (nq + 1) / 2, panels = (nt + kPanel - 1) / kPanel;
      // the padded input positions [q0, q0 + 2 nt + 2), one channel at a time, copied (3-13% faster
      // than reading x in place here, unlike conv2d's short rows)
      const int64_t n_in = 2 * nt + 2;
      for (int64_t c = 0; c < g.Cin; ++c) {
        padded_run(x + (b * g.Cin + c) * g.L, g, q0, n_in, row.data(), c + kAhead < g.Cin);
        winograd_input(row.data(), 0, n_in, nt, v.data() + c * ld_v, g.Cin * ld_v);
      }
      for (int64_t k0 = 0; k0 < g.Cin; k0 += kc) {
        const int64_t kn = std::min(kc, g.Cin - k0);
        winograd_point_gemms(kPoints, up, a_point, k0, kn, mb0, mb1, v.data() + k0 * ld_v, g.Cin * ld_v, ld_v, panels,
                             m.data(), rows);
      }
      const int64_t co1 = std::min(g.Cout, mb1 * kMR);
      for (int64_t co = mb0 * kMR; co < co1; ++co) {
        // the residual's run kAhead channels on: runs L_out apart, which no hardware prefetcher follows
        // (32x256x512 k=3 + GELU + residual on the Zen 2: 1.08-1.13x eager -> 1.10-1.15x, 3 alternating rounds)
        if (res && co + kAhead < co1)
          for (int64_t f = 0; f < nq; f += 64 / sizeof(float))
            __builtin_prefetch(res + (b * g.Cout + co + kAhead) * g.Lout + q0 + f);
        winograd_output(m.data() + co * kTiles, rows * kTiles, nt, row.data());
        finish_row<A>(row.data(), nq, (b * g.Cout + co) * g.Lout + q0, bias ? bias[co] : 0.f, res, out, pre);
      }
    }
  });
}

bool winograd_applies(const at::Tensor& w, const std::vector<int64_t>& dilation) {
  return w.size(2) == 3 && dilation[0] == 1;
}

// Where the implicit GEMM runs: conv1d in float32 with stride 1, groups 1 and at least one task of
// output positions. Shorter outputs fill a panel only in part (8 positions compute 32): there oneDNN
// was faster (C_in = C_out = 768, L 16-40: 0.73-0.90x of it), so they keep the ATen path.
bool implicit_gemm_applies(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride,
                           const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  if (x.dim() != 3 || x.scalar_type() != at::kFloat || groups != 1 || stride[0] != 1) return false;
  if (x.size(0) == 0 || x.size(1) == 0 || w.size(0) == 0) return false;  // empty: ATen's (no tasks to plan)
  return make_grid(x, w, padding, dilation).Lout >= kTaskCols;
}

// [C_out, C_in, taps...] -> [C_out / kMR][tap][C_in][kMR] fp32, rows past C_out zero: the A operand.
// One parallel pass (per call: for a large weight and a short input it is a visible part of the time).
at::Tensor pack_weight(const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const int64_t Cout = w.size(0), Cin = w.size(1), taps = w.numel() / std::max<int64_t>(1, Cout * Cin);
  const int64_t blocks = (Cout + kMR - 1) / kMR;
  at::Tensor packed = at::empty({blocks * taps * Cin * kMR}, w.options());
  const float* src = w.const_data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb)
      for (int64_t s = 0; s < taps; ++s)
        for (int64_t ci = 0; ci < Cin; ++ci)
          for (int64_t r = 0; r < kMR; ++r) {
            const int64_t row = mb * kMR + r;
            dst[((mb * taps + s) * Cin + ci) * kMR + r] = row < Cout ? src[(row * Cin + ci) * taps + s] : 0.f;
          }
  });
  return packed;
}

// The outputs of our own convolutions: {out, pre (or [0] unless save_pre)}, once residual (if any) is
// checked against the output's shape.
std::pair<at::Tensor, at::Tensor> own_outputs(const at::Tensor& x, const std::vector<int64_t>& shape,
                                              const std::optional<at::Tensor>& residual, bool save_pre) {
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape) && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(),
                "conv: residual must be a contiguous tensor of the output's shape ", shape, ", got ", residual->sizes());
  }
  return {cpu::cached_empty(shape, x.options()),
          save_pre ? cpu::cached_empty(shape, x.options()) : at::empty({0}, x.options())};
}

// The implicit GEMM's convolution: {out, pre (or [0] unless save_pre)}.
std::vector<at::Tensor> implicit_conv(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
                                      const std::vector<int64_t>& dilation, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, int64_t activation, bool save_pre) {
  TORCH_CHECK(w.size(1) == x.size(1), "conv: weight expects ", w.size(1), " input channels, x has ", x.size(1));
  const at::Tensor xc = x.contiguous();
  const Grid g = make_grid(xc, w, padding, dilation);
  const std::vector<int64_t> shape{g.B, g.Cout, g.Lout};
  at::Tensor out, pre;
  std::tie(out, pre) = own_outputs(x, shape, residual, save_pre);
  const bool winograd = winograd_applies(w, dilation);
  const at::Tensor wp = winograd ? pack_winograd_weight(w) : pack_weight(w);
  cpu::dispatch_activation(activation, [&](auto act) {
    constexpr int A = decltype(act)::value;
    const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
    const float* rp = residual ? residual->const_data_ptr<float>() : nullptr;
    float* pp = save_pre ? pre.data_ptr<float>() : nullptr;
    if (winograd)
      winograd_fwd<A>(xc.const_data_ptr<float>(), wp.const_data_ptr<float>(), bp, rp, out.data_ptr<float>(), pp, g);
    else
      implicit_gemm_fwd<A>(xc.const_data_ptr<float>(), wp.const_data_ptr<float>(), bp, rp, out.data_ptr<float>(), pp, g);
  });
  return {out, pre};
}

// ---- Winograd F(2x2, 3x3): conv2d with 3 x 3 taps, stride 1, dilation 1 -----------------------------
// F(2, 3) along both axes: a tile of 2 x 2 outputs reads 4 x 4 padded inputs d; its transform is
// V = B^T d B (F(2, 3)'s input transform on each of the four input rows, then across the rows), the
// weight's U = G g G^T, and Y = A^T M A with M_P = sum over input channels of U_P V_P for the 16
// points P = 4 p + a (p the row point, a the column point): 16 products per 4 outputs instead of 36,
// so the GEMMs do 4/9 of the direct form's multiply-adds. A task is (image, block of R tile rows x a
// segment of J tiles of a row, group of row blocks of output channels), at most kTiles tiles; per slice
// of 64 input channels it transforms the slice's inputs (V: [point][channel][tile], 320 KiB) and runs
// the 16 GEMMs on the 1-D engine's micro-kernel, summing slices as there; the output transform and the
// epilogue run per output channel and tile row.
struct Grid2 {
  int64_t B, Cin, Cout, H, W, ph, pw, Hout, Wout;
  int64_t th, tw;          // tiles of 2 x 2 outputs, down and across
  int64_t J, R, segs, rbs;  // a task: R tile rows x J tiles of a row; segs segments, rbs row blocks
  int64_t pieces() const { return B * rbs * segs; }
  struct Piece {
    int64_t b, i0, ni, j0, nj;  // image, tile rows [i0, i0 + ni), tiles [j0, j0 + nj) of each
  };
  Piece piece(int64_t p) const {
    const int64_t i0 = p / segs % rbs * R, j0 = p % segs * J;
    return {p / (segs * rbs), i0, std::min(R, th - i0), j0, std::min(J, tw - j0)};
  }
};

Grid2 make_grid2(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding) {
  Grid2 g;
  g.B = x.size(0), g.Cin = x.size(1), g.H = x.size(2), g.W = x.size(3), g.Cout = w.size(0);
  g.ph = padding[0], g.pw = padding[1];
  g.Hout = g.H + 2 * g.ph - 2, g.Wout = g.W + 2 * g.pw - 2;
  g.th = (g.Hout + 1) / 2, g.tw = (g.Wout + 1) / 2;
  g.J = std::min<int64_t>(std::max<int64_t>(g.tw, 1), kTiles);
  g.R = std::clamp<int64_t>(kTiles / g.J, 1, std::max<int64_t>(g.th, 1));
  g.segs = (g.tw + g.J - 1) / g.J, g.rbs = (g.th + g.R - 1) / g.R;
  return g;
}

constexpr int64_t kPoints2 = 16;

// F(2, 3)'s input transform across four rows d0..d3 of n floats each: point i of it to dst + i * ld_dst.
inline void winograd_combine_in(const float* d0p, const float* d1p, const float* d2p, const float* d3p, int64_t n,
                                float* dst, int64_t ld_dst) {
  constexpr int64_t VS = fVec::size();
  for (int64_t t = 0; t < n; t += VS) {
    const int64_t k = std::min(VS, n - t);
    const fVec d0 = fVec::loadu(d0p + t, k), d1 = fVec::loadu(d1p + t, k);
    const fVec d2 = fVec::loadu(d2p + t, k), d3 = fVec::loadu(d3p + t, k);
    (d0 - d2).store(dst + t, k);
    (d1 + d2).store(dst + ld_dst + t, k);
    (d2 - d1).store(dst + 2 * ld_dst + t, k);
    (d3 - d1).store(dst + 3 * ld_dst + t, k);
  }
}

// The input transform of a task's tiles (tile rows [i0, i0 + ni), tiles [j0, j0 + nj) of a row) for
// channels [0, kn) of x (one image, from its channel k0 on): point P of channel c, tile (i - i0) nj + t
// at v[P * ld_point + c * ld_v + (i - i0) nj + t]. tr (16 ld_t floats) is scratch: padded input row pr
// (columns [2 j0, 2 j0 + 2 nj + 2), read in place) after the transform along the row goes to slot
// pr % 4 of tr, since tile row i reads rows 2i .. 2i + 3 and the next one two of them again.
inline void winograd2_input(const float* x, int64_t kn, const Grid2& g, int64_t i0, int64_t ni, int64_t j0,
                            int64_t nj, float* v, int64_t ld_v, int64_t ld_point, float* tr, int64_t ld_t) {
  for (int64_t c = 0; c < kn; ++c) {
    const float* xc = x + c * g.H * g.W;
    for (int64_t i = i0; i < i0 + ni; ++i) {
      for (int64_t pr = i == i0 ? 2 * i : 2 * i + 2; pr < 2 * i + 4; ++pr) {
        const int64_t sr = pr - g.ph;
        winograd_input(sr >= 0 && sr < g.H ? xc + sr * g.W : nullptr, 2 * j0 - g.pw, g.W, nj,
                            tr + pr % 4 * 4 * ld_t, ld_t);
      }
      auto row = [&](int64_t r, int64_t a) { return tr + ((2 * i + r) % 4 * 4 + a) * ld_t; };
      for (int64_t a = 0; a < 4; ++a)  // across the rows: point 4 p + a
        winograd_combine_in(row(0, a), row(1, a), row(2, a), row(3, a), nj, v + a * ld_point + c * ld_v + (i - i0) * nj,
                            4 * ld_point);
    }
  }
}

template <int A>
void winograd2_fwd(const float* x, const float* up, const float* bias, const float* res, float* out, float* pre,
                   const Grid2& g) {
  const int64_t blocks = (g.Cout + kMR - 1) / kMR, rows = blocks * kMR, a_point = g.Cin * kMR;
  constexpr int64_t kc = 64;  // input channels per slice (see winograd_fwd)
  const int64_t ld_v = odd_line_stride(kTiles), ld_t = (g.J + 15) / 16 * 16, spatial = g.Hout * g.Wout;
  const TaskSplit split(g.pieces(), blocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, split.threads, 1, [&](int64_t, int64_t) {
    // v: a slice's transformed input [point][channel][tile]; m: the points' products [point][rows][kTiles];
    // tr: four rows' column transforms [row slot][point][ld_t]; pts / orow: a tile row's outputs after
    // the transform across rows [output row][point][ld_t], and one output row after the one across columns
    cpu::LineVector<float> v(kPoints2 * kc * ld_v), m(kPoints2 * rows * kTiles), tr(16 * ld_t);
    cpu::LineVector<float> pts(8 * ld_t), orow(2 * g.J);
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < split.tasks;) {
      const auto [b, i0, ni, j0, nj] = g.piece(split.piece(task));
      const int64_t nt = ni * nj, panels = (nt + kPanel - 1) / kPanel, mb0 = split.mb0(task), mb1 = split.mb1(task);
      for (int64_t k0 = 0; k0 < g.Cin; k0 += kc) {
        const int64_t kn = std::min(kc, g.Cin - k0);
        winograd2_input(x + (b * g.Cin + k0) * g.H * g.W, kn, g, i0, ni, j0, nj, v.data(), ld_v, kc * ld_v,
                        tr.data(), ld_t);
        winograd_point_gemms(kPoints2, up, a_point, k0, kn, mb0, mb1, v.data(), kc * ld_v, ld_v, panels, m.data(),
                             rows);
      }
      constexpr int64_t VS = fVec::size();
      for (int64_t co = mb0 * kMR; co < std::min(g.Cout, mb1 * kMR); ++co) {
        const float* mc = m.data() + co * kTiles;
        const int64_t ld_m = rows * kTiles;
        for (int64_t i = i0; i < i0 + ni; ++i) {
          const int64_t t0 = (i - i0) * nj;
          for (int64_t a = 0; a < 4; ++a)  // across the rows: output rows 0 and 1 at column point a
            for (int64_t t = 0; t < nj; t += VS) {
              const int64_t k = std::min(VS, nj - t);
              auto at_ = [&](int64_t p) { return fVec::loadu(mc + (p * 4 + a) * ld_m + t0 + t, k); };
              const fVec m0 = at_(0), m1 = at_(1), m2 = at_(2), m3 = at_(3);
              (m0 + m1 + m2).store(pts.data() + a * ld_t + t, k);
              (m1 - m2 + m3).store(pts.data() + (4 + a) * ld_t + t, k);
            }
          const int64_t nw = std::min(2 * nj, g.Wout - 2 * j0);
          for (int64_t u = 0; u < 2 && 2 * i + u < g.Hout; ++u) {
            winograd_output(pts.data() + 4 * u * ld_t, ld_t, nj, orow.data());
            finish_row<A>(orow.data(), nw, (b * g.Cout + co) * spatial + (2 * i + u) * g.Wout + 2 * j0,
                          bias ? bias[co] : 0.f, res, out, pre);
          }
        }
      }
    }
  });
}

// Where F(2x2, 3x3) runs: conv2d in float32, 3 x 3, stride 1, dilation 1, groups 1, at least one whole
// task of tiles per image, and where it measured faster than oneDNN's direct convolution. Forward
// alone, 2 Zen 5 cores, medians of 5 alternating rounds, ours / oneDNN: 16x64x32x32 -> 64 1.66x,
// 8x128x28x28 -> 128 1.70x, 8x64x28x28 -> 128 1.71x, 4x64x64x64 -> 64 1.17x, 2x256x32x32 -> 256
// 1.14x, 4x128x32x32 -> 64 1.09x, 16x48x32x32 -> 48 1.07x. Outside the rule it lost: with fewer
// than 48 input channels the transforms outweigh the short GEMMs (8x32x56x56 -> 64 0.81x,
// 8x16x56x56 -> 32 0.66x); past 256 channels U (16 C_in C_out floats) is streamed from L3 by every
// task (2x512x16x16 -> 512 0.57x, measured with a per-call weight packing since made ~2.4x faster; in
// a later probe 2x512x32x32 -> 512 won 1.65x forward but its grad_w lost 0.54x); with tile rows that fill less than 7/8 of the 16-lane vectors
// (images 16-24 wide: 8 to 12 tiles a row) the transforms and the panels run part empty
// (8x96x20x20 -> 96 0.76x). (Winograd needs 4/9 of the multiplies, but this engine's GEMMs run at
// about half the core's FMA rate: the transforms, and a K of one slice, keep it there.)
bool winograd2_applies(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  if (x.dim() != 4 || x.scalar_type() != at::kFloat || groups != 1 || w.size(2) != 3 || w.size(3) != 3) return false;
  if (!winograd2_on(x.size(1))) return false;  // see kWideVectors and kWinograd2MinChannelsNarrow
  if (stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1 || x.size(0) == 0) return false;
  if (x.size(1) < 48 || x.size(1) > 256 || w.size(0) > 256) return false;
  const Grid2 g = make_grid2(x, w, padding);
  const int64_t lanes = (g.J + 15) / 16 * 16;
  return g.Hout >= 2 && g.Wout >= 2 && g.th * g.tw >= kTiles && 8 * g.J >= 7 * lanes;
}

std::vector<at::Tensor> winograd2_conv(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
                                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                       int64_t activation, bool save_pre) {
  TORCH_CHECK(w.size(1) == x.size(1), "conv: weight expects ", w.size(1), " input channels, x has ", x.size(1));
  const at::Tensor xc = x.contiguous();
  const Grid2 g = make_grid2(xc, w, padding);
  const std::vector<int64_t> shape{g.B, g.Cout, g.Hout, g.Wout};
  at::Tensor out, pre;
  std::tie(out, pre) = own_outputs(x, shape, residual, save_pre);
  const at::Tensor wp = pack_winograd_weight(w);
  cpu::dispatch_activation(activation, [&](auto act) {
    winograd2_fwd<decltype(act)::value>(xc.const_data_ptr<float>(), wp.const_data_ptr<float>(),
                                        bias ? bias->const_data_ptr<float>() : nullptr,
                                        residual ? residual->const_data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                        save_pre ? pre.data_ptr<float>() : nullptr, g);
  });
  return {out, pre};
}

// The weight gradient through F(2x2, 3x3). The forward is linear in U = G g G^T, and per tile
// Y = A^T (U . V) A, so dL/dU_P = sum over images and tiles of Z_P V_P with Z = A gY A^T (the 2 x 2
// gradient tile taken to the 16 points), and dL/dg = G^T (dL/dU) G. dU_P [C_out, C_in] is one GEMM per
// point with the tiles as the reduction: A = Z_P [C_out][tiles], B = V_P transposed [tiles][C_in].
// Each task is the forward's (image, block of tiles); tasks are cut into kChunks chunks in order, each
// chunk sums its tasks into its own dU, and the chunks are added in chunk order at the end: the result
// does not depend on which thread took which chunk, nor on the number of threads.
// A^T's transpose along a row of the gradient: for the tiles t in [0, nt), (gy0, gy0 + gy1, gy0 - gy1,
// gy1) of its outputs gy0 = row[2t], gy1 = row[2t + 1] to c + i * ld; the row's element k is src[k]
// for k < n, else 0 (src == nullptr: zeros), read in place (masked loads).
inline void winograd_grad_cols(const float* src, int64_t n, int64_t nt, float* c, int64_t ld) {
  if (src == nullptr) n = 0;
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  auto load = [&](int64_t k) {  // elements k .. k + 15
    if (k + 16 <= n) return _mm512_loadu_ps(src + k);
    const int64_t m = std::clamp<int64_t>(n - k, 0, 16);
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1), m > 0 ? src + k : src);
  };
  for (; t + 16 <= nt; t += 16) {
    const __m512 lo = load(2 * t), hi = load(2 * t + 16);
    const __m512 e = _mm512_permutex2var_ps(lo, even, hi), o = _mm512_permutex2var_ps(lo, odd, hi);
    _mm512_storeu_ps(c + t, e);
    _mm512_storeu_ps(c + ld + t, _mm512_add_ps(e, o));
    _mm512_storeu_ps(c + 2 * ld + t, _mm512_sub_ps(e, o));
    _mm512_storeu_ps(c + 3 * ld + t, o);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t VS = fVec::size();
  auto load = [&](int64_t k) {  // elements k .. k + VS - 1, zero from n on
    if (k + VS <= n) return fVec::loadu(src + k);
    return k < n ? fVec::loadu(src + k, n - k) : fVec(0.f);
  };
  for (; t + VS <= nt; t += VS) {
    const auto [e, o] = at::vec::deinterleave2(load(2 * t), load(2 * t + VS));
    e.store(c + t);
    (e + o).store(c + ld + t);
    (e - o).store(c + 2 * ld + t);
    o.store(c + 3 * ld + t);
  }
#endif
  for (; t < nt; ++t) {
    const float e = 2 * t < n ? src[2 * t] : 0.f, o = 2 * t + 1 < n ? src[2 * t + 1] : 0.f;
    c[t] = e, c[ld + t] = e + o, c[2 * ld + t] = e - o, c[3 * ld + t] = o;
  }
}

at::Tensor winograd2_grad_weight(const at::Tensor& gp, const at::Tensor& x, const Grid2& g) {
  // kBatch tasks' tiles make one GEMM's reduction (up to 256 deep: with a task's 64 alone, C = dU_P
  // was loaded and stored for every 64 products, 3x slower at 256 channels)
  constexpr int64_t VS = fVec::size(), kChunks = 4, kBatch = 4, ldk = kBatch * kTiles;
  const int64_t ci_pad = (g.Cin + VS - 1) / VS * VS;
  const int64_t tasks = g.pieces(), chunks = std::min(kChunks, tasks), du_floats = kPoints2 * g.Cout * ci_pad;
  at::Tensor du = cpu::cached_empty({chunks, du_floats}, x.options());  // each chunk's dU
  const int64_t ld_t = (g.J + 15) / 16 * 16;
  const float* xp = x.const_data_ptr<float>();
  const float* gpp = gp.const_data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    // v: V [point][C_in][ldk]; vt: V_P transposed [ldk][ci_pad]; z: Z [point][C_out][ldk]
    cpu::LineVector<float> v(kPoints2 * g.Cin * ldk), vt(ldk * ci_pad, 0.f), z(kPoints2 * g.Cout * ldk);
    cpu::LineVector<float> tr(16 * ld_t), cols(8 * ld_t);
    for (int64_t ch; (ch = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      float* dch = du.data_ptr<float>() + ch * du_floats;
      std::fill(dch, dch + du_floats, 0.f);
      const int64_t first = tasks * ch / chunks, last = tasks * (ch + 1) / chunks;
      for (int64_t t0 = first; t0 < last; t0 += kBatch) {
        int64_t K = 0;  // the batch's tiles so far
        for (int64_t task = t0; task < std::min(last, t0 + kBatch); ++task) {
          const auto [b, i0, ni, j0, nj] = g.piece(task);
          winograd2_input(xp + b * g.Cin * g.H * g.W, g.Cin, g, i0, ni, j0, nj, v.data() + K, ldk, g.Cin * ldk,
                          tr.data(), ld_t);
          // Z: per output channel and tile row, the gradient's rows 2i, 2i + 1 (zero past the output)
          // along the columns (gy0, gy0 + gy1, gy0 - gy1, gy1), then the same across the two rows
          for (int64_t co = 0; co < g.Cout; ++co)
            for (int64_t i = i0; i < i0 + ni; ++i) {
              for (int64_t u = 0; u < 2; ++u) {
                const int64_t yr = 2 * i + u, n = std::clamp<int64_t>(g.Wout - 2 * j0, 0, 2 * nj);
                winograd_grad_cols(yr < g.Hout ? gpp + ((b * g.Cout + co) * g.Hout + yr) * g.Wout + 2 * j0 : nullptr, n,
                                   nj, cols.data() + u * 4 * ld_t, ld_t);
              }
              const int64_t ldp = 4 * g.Cout * ldk;  // point 4 p + a at + p ldp
              for (int64_t a = 0; a < 4; ++a) {
                const float* r0 = cols.data() + a * ld_t;
                const float* r1 = cols.data() + (4 + a) * ld_t;
                float* zp = z.data() + (a * g.Cout + co) * ldk + K + (i - i0) * nj;
                for (int64_t t = 0; t < nj; t += VS) {
                  const int64_t k = std::min(VS, nj - t);
                  const fVec y0 = fVec::loadu(r0 + t, k), y1 = fVec::loadu(r1 + t, k);
                  y0.store(zp + t, k);
                  (y0 + y1).store(zp + ldp + t, k);
                  (y0 - y1).store(zp + 2 * ldp + t, k);
                  y1.store(zp + 3 * ldp + t, k);
                }
              }
            }
          K += ni * nj;
        }
        for (int64_t P = 0; P < kPoints2; ++P) {
          cpu::transpose_f32(v.data() + P * g.Cin * ldk, ldk, vt.data(), ci_pad, g.Cin, K);
          cpu::small_gemm(g.Cout, ci_pad, K, z.data() + P * g.Cout * ldk, ldk, 1, vt.data(), ci_pad,
                          dch + P * g.Cout * ci_pad, ci_pad, 1.f, true);
        }
      }
    }
  });
  // the chunks' dU added in chunk order, then dg = G^T dU G (in double)
  const at::Tensor u_t = cpu::reduce_partials(du, du_floats, at::kFloat);
  const float* u = u_t.const_data_ptr<float>();
  at::Tensor grad_w = at::empty({g.Cout, g.Cin, 3, 3}, x.options());
  float* dw = grad_w.data_ptr<float>();
  at::parallel_for(0, g.Cout, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co)
      for (int64_t ci = 0; ci < g.Cin; ++ci)
        for (int64_t kh = 0; kh < 3; ++kh)
          for (int64_t kw = 0; kw < 3; ++kw) {
            double d = 0.;
            for (int64_t P = 0; P < kPoints2; ++P)
              d += kWinogradG[P / 4][kh] * kWinogradG[P % 4][kw] * u[(P * g.Cout + co) * ci_pad + ci];
            dw[((co * g.Cin + ci) * 3 + kh) * 3 + kw] = static_cast<float>(d);
          }
  });
  return grad_w;
}

// ---- depthwise: groups = C_in = C_out, stride 1 (conv1d and conv2d; float32 and bfloat16) ------------
// Each (b, c) plane is a convolution of its own with KH x KW taps (KH = 1 for conv1d): a few
// multiply-adds per output, so the op is bound by memory, not arithmetic. A thread copies each of its
// planes, as fp32, into a zero-padded buffer (its borders zeroed once per call) that stays in L1 / L2,
// and computes the outputs from it, every tap a shifted vector load; bias, activation and residual are
// applied before each output vector is stored. x is read once, out (and pre) written once. A conv1d's
// x laid out [B, L, C] is read as it is, 16 channels' planes at a time (dw_each_plane).
// The backward reads grad_out, pre and x once and writes grad_x once, per plane: gp = grad_out *
// act'(pre) into a zero-padded buffer (with the bias gradient's sum), the weight gradient's sums of gp
// against the padded x, then grad_x, the convolution of gp with the reversed taps (both from L1). The
// per-plane sums are reduced over the batch in a fixed order.
// Before, ATen's depthwise convolution (oneDNN) ran with the epilogue after it: 16x128x56x56, 3 x 3 +
// bias + SiLU, float32, on 2 Zen 4 cores (the bench, session 47), forward 7.9 ms and forward + backward
// 23.6 ms, within 1% of eager PyTorch; this way 2.7-2.8 ms and 9.0-10.7 ms (2.7x / 2.3-2.6x eager).
// An AVX2 build of these kernels ran 1.9-2.3x / 1.6-2.1x eager's AVX-512 oneDNN on the same CPU.
inline int64_t round_up_to_two_steps(int64_t n) { return (n + 2 * kStep - 1) / (2 * kStep) * (2 * kStep); }

struct DwGrid {
  int64_t B, C, H, W, KH, KW, ph, pw, dh, dw, Ho, Wo;
  bool x_nlc;       // x laid out [B, L, C] (seq_channels_last), else contiguous
  int64_t hx, ldx;  // the padded x plane: hx rows of ldx floats, x[i, j] at row ph + i, column pw + j
  int64_t hg, ldg;  // the padded gp plane (backward): gp[i, j] at row (KH - 1) dh + i, column (KW - 1) dw + j
};

DwGrid make_dw_grid(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
                    const std::vector<int64_t>& dilation) {
  const bool two = x.dim() == 4;
  DwGrid g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.H = two ? x.size(2) : 1;
  g.W = x.size(-1);
  g.KH = two ? w.size(2) : 1;
  g.KW = w.size(-1);
  g.ph = two ? padding[0] : 0;
  g.pw = padding.back();
  g.dh = two ? dilation[0] : 1;
  g.dw = dilation.back();
  g.Ho = g.H + 2 * g.ph - g.dh * (g.KH - 1);
  g.Wo = g.W + 2 * g.pw - g.dw * (g.KW - 1);
  g.x_nlc = seq_channels_last(x);
  // Outputs are computed a whole step (kStep columns) at a time, and a plane of one row two steps at a
  // time (dw_two_blocks): the loads of the last ones read up to round_up(Wo, 2 kStep) - 1 + (KW - 1) dw,
  // zeros past the data.
  g.hx = g.H + 2 * g.ph;
  g.ldx = round_up_to_two_steps(g.Wo) + g.dw * (g.KW - 1);  // >= W + 2 pw
  // grad_x[i, j] = sum over taps of w[kh, kw] gp[i + ph - kh dh, j + pw - kw dw]: in the buffer, row
  // i + ph + (KH - 1 - kh) dh, column j + pw + (KW - 1 - kw) dw, read up to
  // round_up(W, 2 kStep) - 1 + pw + (KW - 1) dw
  g.hg = g.Ho + 2 * g.dh * (g.KH - 1);
  g.ldg = std::max(round_up_to_two_steps(g.W) + g.pw, g.Wo) + g.dw * (g.KW - 1);
  return g;
}

bool depthwise_applies(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride, int64_t groups) {
  const bool dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  return dtype && groups == x.size(1) && w.size(0) == groups && w.size(1) == 1 &&
         std::all_of(stride.begin(), stride.end(), [](int64_t s) { return s == 1; });
}

// The plane's x as fp32 into the padded buffer (its borders are zeros already). (A memcpy of each
// 56-float row took 7% of the 16x128x56x56 forward + backward.)
template <typename T>
inline void dw_load_plane(const T* x, const DwGrid& g, float* xb) {
  for (int64_t i = 0; i < g.H; ++i) {
    const T* src = x + i * g.W;
    float* dst = xb + (g.ph + i) * g.ldx + g.pw;
    for (int64_t j = 0; j < g.W; j += fVec::size()) cpu::store_any(dst + j, cpu::load_any(src + j, g.W - j), g.W - j);
  }
}

// The sums of two blocks of outputs, kStep columns each: s[0], s[1] for the block whose taps start at
// `row` of a padded buffer, s[2], s[3] for the block `second` floats on (the row below, or in a plane of
// one row the next kStep columns: conv1d); tap (kh, kw) reads row + kh * rs + kw * cs (forward:
// rs = dh * ld, cs = dw; the backward's grad_x walks the taps reversed, rs, cs < 0). Four independent
// sums: one would wait out the FMA latency at every tap.
// KH_, KW_ > 0 fix the taps at compile time (3 x 3, and conv1d's 3: unrolled), 0 takes g's.
template <int KH_, int KW_>
BIGNLP_FAST_VEC_INLINE void dw_two_blocks(const DwGrid& g, const float* row, int64_t second, int64_t rs, int64_t cs,
                                          const float* wf, fVec (&s)[4]) {
  const int64_t KH = KH_ > 0 ? KH_ : g.KH, KW = KW_ > 0 ? KW_ : g.KW;
  constexpr int64_t VS = fVec::size();
#pragma GCC unroll 8
  for (int64_t kh = 0; kh < KH; ++kh)
#pragma GCC unroll 8
    for (int64_t kw = 0; kw < KW; ++kw) {
      const fVec wv(wf[kh * KW + kw]);
      const float* t = row + kh * rs + kw * cs;
      s[0] = at::vec::fmadd(wv, fVec::loadu(t), s[0]);
      s[1] = at::vec::fmadd(wv, fVec::loadu(t + VS), s[1]);
      s[2] = at::vec::fmadd(wv, fVec::loadu(t + second), s[2]);
      s[3] = at::vec::fmadd(wv, fVec::loadu(t + second + VS), s[3]);
    }
}

// Channels a group of planes loaded together from an x laid out [B, L, C] (a 64-byte line of fp32 per
// position), and the positions transposed a chunk at a time while the next chunk's are prefetched
// (the strided reads waited on memory: forward 5.6-7.2 -> 3.8-4.4 ms, 32x512x512).
constexpr int64_t kDwGroup = 16;
constexpr int64_t kDwAhead = 64;

// Calls body(p, xb, next) for the planes [p0, p1) (p = b * C + c) in order: xb the plane's x as fp32 in a
// padded buffer (hx + 1 rows of ldx floats: one row more than the plane, which the second row of a
// last, single output row reads and does not store), next the plane after it in x for the body to
// prefetch, or nullptr. A contiguous x is loaded a plane at a time; one laid out [B, L, C] (conv1d: one
// row) kDwGroup channels at a time, its positions transposed into the group's buffers kDwAhead at a
// time (next is nullptr: the load prefetches for itself).
template <typename T, typename Body>
inline void dw_each_plane(int64_t p0, int64_t p1, const DwGrid& g, const T* x, Body&& body) {
  const int64_t in_plane = g.H * g.W, buf = (g.hx + 1) * g.ldx;
  if (!g.x_nlc) {
    cpu::LineVector<float> xp(buf, 0.f);
    for (int64_t p = p0; p < p1; ++p) {
      dw_load_plane(x + p * in_plane, g, xp.data());
      body(p, xp.data(), p + 1 < p1 ? x + (p + 1) * in_plane : nullptr);
    }
    return;
  }
  cpu::LineVector<float> xp(kDwGroup * buf, 0.f);
  const int64_t L = in_plane;  // positions
  for (int64_t p = p0; p < p1;) {
    const int64_t b = p / g.C, c0 = p % g.C, n = std::min({p1 - p, kDwGroup, g.C - c0});
    const T* src = x + b * L * g.C + c0;  // x[b, :, c0 .. c0 + n): each position's channels contiguous
    for (int64_t t0 = 0; t0 < L; t0 += kDwAhead) {
      for (int64_t t = t0 + kDwAhead; t < std::min(L, t0 + 2 * kDwAhead); ++t) __builtin_prefetch(src + t * g.C);
      const int64_t m = std::min(kDwAhead, L - t0);
      cpu::transpose_to_float(src + t0 * g.C, g.C, xp.data() + g.ph * g.ldx + g.pw + t0, buf, m, n, m);
    }
    for (int64_t k = 0; k < n; ++k) body(p + k, xp.data() + k * buf, static_cast<const T*>(nullptr));
    p += n;
  }
}

// Planes [p0, p1) of the forward. (The loops over planes are functions of their own: see
// epilogue_fwd_rows.)
template <int KH_, int KW_, int A, typename T>
void depthwise_fwd_planes(int64_t p0, int64_t p1, const DwGrid& g, const T* x, const T* w, const T* bias,
                          const T* res, T* out, T* pre) {
  const int64_t taps = g.KH * g.KW, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
  cpu::LineVector<float> wf(taps);
  dw_each_plane(p0, p1, g, x, [&](int64_t p, const float* xb, const T* next) {
    const int64_t c = p % g.C;
    cpu::to_float(w + c * taps, wf.data(), taps);
    const fVec bv(bias ? static_cast<float>(bias[c]) : 0.f);
    T* op = out + p * out_plane;
    T* pp = pre ? pre + p * out_plane : nullptr;
    auto finish = [&](int64_t i, int64_t j, fVec a, fVec b) {
      const int64_t o = i * g.Wo + j, n = g.Wo - j;
      if (pp) cpu::store2_any(pp + o, n, a, b);  // pre = v rounded to T; the activation takes v itself
      a = cpu::activate<A>(a);
      b = cpu::activate<A>(b);
      if (res) {
        fVec ra, rb;
        cpu::load2_any(res + p * out_plane + o, n, ra, rb);
        a = a + ra;
        b = b + rb;
      }
      cpu::store2_any(op + o, n, a, b);
    };
    // two rows at a time, or in a plane of one output row two steps of columns
    const bool wide = g.Ho == 1;
    const int64_t pairs = (g.Ho + 1) / 2, dj = wide ? 2 * kStep : kStep;
    for (int64_t i = 0; i < g.Ho; i += 2) {
      if (next) cpu::prefetch_share(next, in_plane * int64_t{sizeof(T)}, i / 2, pairs);
      for (int64_t j = 0; j < g.Wo; j += dj) {
        fVec s[4] = {bv, bv, bv, bv};
        dw_two_blocks<KH_, KW_>(g, xb + i * g.ldx + j, wide ? kStep : g.ldx, g.dh * g.ldx, g.dw, wf.data(), s);
        finish(i, j, s[0], s[1]);
        if (wide ? j + kStep < g.Wo : i + 1 < g.Ho) finish(wide ? i : i + 1, wide ? j + kStep : j, s[2], s[3]);
      }
    }
  });
}

// The weight gradient's sums of taps (kh, kw0 .. kw0 + NW - 1): over the plane's outputs, gp (in its
// padded buffer, zeros past Wo) times x at the tap's offset, into out[0 .. NW). NW taps a pass keep
// 2 NW sums in registers (an array of them for all KH x KW taps lived on the stack: GCC keeps no
// array of 18 vectors in registers, and every FMA loaded and stored its sum).
template <int NW>
inline void dw_tap_sums(const DwGrid& g, const float* gb, int64_t gr0, int64_t gc0, const float* xb, int64_t kh,
                        int64_t kw0, float* out) {
  constexpr int64_t VS = fVec::size();
  fVec s[2 * NW];
#pragma GCC unroll 16
  for (int u = 0; u < 2 * NW; ++u) s[u] = fVec(0.f);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* grow = gb + (gr0 + i) * g.ldg + gc0;
    const float* xrow = xb + (i + kh * g.dh) * g.ldx + kw0 * g.dw;
    for (int64_t j = 0; j < g.Wo; j += kStep) {
      const fVec ga = fVec::loadu(grow + j), gc = fVec::loadu(grow + j + VS);
#pragma GCC unroll 8
      for (int u = 0; u < NW; ++u) {
        s[2 * u] = at::vec::fmadd(ga, fVec::loadu(xrow + j + u * g.dw), s[2 * u]);
        s[2 * u + 1] = at::vec::fmadd(gc, fVec::loadu(xrow + j + u * g.dw + VS), s[2 * u + 1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < NW; ++u) out[u] = cpu::hsum(s[2 * u] + s[2 * u + 1]);
}

// Planes [p0, p1) of the backward: grad_x, and per plane the taps' weight-gradient sums and the bias
// gradient's, partial[p, 0 .. taps]. Three passes over the plane, in L1 after the first: gp (from
// grad_out and pre, read once from memory) and its sum; the taps' sums, a row of taps a pass (KW_
// fixed) or one tap a pass; grad_x.
template <int KH_, int KW_, int A, typename T>
void depthwise_bwd_planes(int64_t p0, int64_t p1, const DwGrid& g, const T* gy, const T* x, const T* w,
                          const T* pre, T* gx, float* partial) {
  const int64_t KH = KH_ > 0 ? KH_ : g.KH, KW = KW_ > 0 ? KW_ : g.KW;
  const int64_t taps = KH * KW, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
  const int64_t gr0 = (KH - 1) * g.dh, gc0 = (KW - 1) * g.dw;
  // (one row more than the planes: see dw_each_plane)
  cpu::LineVector<float> gpp((g.hg + 1) * g.ldg, 0.f), wf(taps);
  float* gb = gpp.data();
  dw_each_plane(p0, p1, g, x, [&](int64_t p, const float* xb, const T* next) {
    const int64_t c = p % g.C;
    cpu::to_float(w + c * taps, wf.data(), taps);
    fVec db(0.f);
    for (int64_t i = 0; i < g.Ho; ++i) {
      if (p + 1 < p1) {  // the next plane's operands, a share a row
        cpu::prefetch_share(gy + (p + 1) * out_plane, out_plane * int64_t{sizeof(T)}, i, g.Ho);
        cpu::prefetch_share(pre + (p + 1) * out_plane, out_plane * int64_t{sizeof(T)}, i, g.Ho);
        if (next) cpu::prefetch_share(next, in_plane * int64_t{sizeof(T)}, i, g.Ho);
      }
      const int64_t o = p * out_plane + i * g.Wo;
      float* grow = gb + (gr0 + i) * g.ldg + gc0;
      for (int64_t j = 0; j < g.Wo; j += kStep) {
        const int64_t n = g.Wo - j;
        fVec ga, gc, pa, pc;
        cpu::load2_any(gy + o + j, n, ga, gc);  // lanes past Wo load 0: they add nothing below
        cpu::load2_any(pre + o + j, n, pa, pc);
        ga = ga * cpu::activate_grad<A>(pa);
        gc = gc * cpu::activate_grad<A>(pc);
        cpu::store2_any(grow + j, n, ga, gc);  // the buffer's columns past Wo stay 0
        db = db + ga + gc;
      }
    }
    float* sums = partial + p * (taps + 1);
    for (int64_t kh = 0; kh < KH; ++kh) {
      if constexpr (KW_ > 0) {
        dw_tap_sums<KW_>(g, gb, gr0, gc0, xb, kh, 0, sums + kh * KW);
      } else {
        for (int64_t kw = 0; kw < KW; ++kw) dw_tap_sums<1>(g, gb, gr0, gc0, xb, kh, kw, sums + kh * KW + kw);
      }
    }
    sums[taps] = cpu::hsum(db);
    // grad_x[i, j] = sum over taps of w[kh, kw] gp[i + ph - kh dh, j + pw - kw dw]: tap (0, 0) at the
    // buffer's row i + ph + (KH - 1) dh, column j + pw + (KW - 1) dw, the others back from there
    T* gxp = gx + p * in_plane;
    const bool wide = g.H == 1;  // (as the forward's blocks)
    for (int64_t i = 0; i < g.H; i += 2)
      for (int64_t j = 0; j < g.W; j += wide ? 2 * kStep : kStep) {
        fVec s[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
        dw_two_blocks<KH_, KW_>(g, gb + (i + g.ph + gr0) * g.ldg + j + g.pw + gc0, wide ? kStep : g.ldg,
                                -g.dh * g.ldg, -g.dw, wf.data(), s);
        cpu::store2_any(gxp + i * g.W + j, g.W - j, s[0], s[1]);
        if (wide ? j + kStep < g.W : i + 1 < g.H) {
          const int64_t i2 = wide ? i : i + 1, j2 = wide ? j + kStep : j;
          cpu::store2_any(gxp + i2 * g.W + j2, g.W - j2, s[2], s[3]);
        }
      }
  });
}

// Calls f(KH_, KW_) as integral constants: the fixed-tap kernels for 3 x 3 and conv1d's 3, else (0, 0).
template <typename F>
inline void dispatch_dw_taps(const DwGrid& g, F&& f) {
  using C0 = std::integral_constant<int, 0>;
  using C1 = std::integral_constant<int, 1>;
  using C3 = std::integral_constant<int, 3>;
  if (g.KH == 3 && g.KW == 3) f(C3{}, C3{});
  else if (g.KH == 1 && g.KW == 3) f(C1{}, C3{});
  else f(C0{}, C0{});
}

// Planes per parallel_for chunk: about 16 K outputs.
inline int64_t dw_grain(const DwGrid& g) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.Ho * g.Wo)); }

// f(KH_, KW_, A, p0, p1) over all planes in parallel chunks [p0, p1), the first three integral
// constants: the taps (dispatch_dw_taps) and the activation.
template <typename F>
void dw_parallel(const DwGrid& g, int64_t activation, F&& f) {
  dispatch_dw_taps(g, [&](auto kh, auto kw) {
    cpu::dispatch_activation(activation, [&](auto act) {
      at::parallel_for(0, g.B * g.C, dw_grain(g), [&](int64_t p0, int64_t p1) { f(kh, kw, act, p0, p1); });
    });
  });
}

std::vector<at::Tensor> depthwise_conv(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
                                       const std::vector<int64_t>& dilation, const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& residual, int64_t activation, bool save_pre) {
  const at::Tensor xc = seq_channels_last(x) ? x : x.contiguous(), wc = w.contiguous();
  const DwGrid g = make_dw_grid(xc, wc, padding, dilation);
  std::vector<int64_t> shape{g.B, g.C};
  if (x.dim() == 4) shape.push_back(g.Ho);
  shape.push_back(g.Wo);
  at::Tensor out, pre;
  std::tie(out, pre) = own_outputs(x, shape, residual, save_pre);
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "depthwise_conv", [&] {
    using T = scalar_t;
    const T* xp = xc.const_data_ptr<T>();
    const T* wp = wc.const_data_ptr<T>();
    const T* bp = bias ? bias->const_data_ptr<T>() : nullptr;
    const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    T* pp = save_pre ? pre.data_ptr<T>() : nullptr;
    dw_parallel(g, activation, [&](auto kh, auto kw, auto act, int64_t p0, int64_t p1) {
      depthwise_fwd_planes<decltype(kh)::value, decltype(kw)::value, decltype(act)::value>(p0, p1, g, xp, wp, bp, rp,
                                                                                           op, pp);
    });
  });
  return {out, pre};
}

// {grad_x, grad_w, grad_bias (or [0] without a bias)} from grad_out and the saved pre.
std::vector<at::Tensor> depthwise_conv_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& pre, bool has_bias, const std::vector<int64_t>& padding,
                                                const std::vector<int64_t>& dilation, int64_t activation) {
  const at::Tensor xc = seq_channels_last(x) ? x : x.contiguous(), wc = w.contiguous();
  const DwGrid g = make_dw_grid(xc, wc, padding, dilation);
  const int64_t taps = g.KH * g.KW;
  at::Tensor gx = cpu::cached_empty(xc.sizes(), x.options());  // contiguous, whatever x's layout
  at::Tensor partial = at::empty({g.B, g.C, taps + 1}, x.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "depthwise_conv_backward", [&] {
    using T = scalar_t;
    const T* gyp = grad_out.const_data_ptr<T>();
    const T* xp = xc.const_data_ptr<T>();
    const T* wp = wc.const_data_ptr<T>();
    const T* pp = pre.const_data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    float* part = partial.data_ptr<float>();
    dw_parallel(g, activation, [&](auto kh, auto kw, auto act, int64_t p0, int64_t p1) {
      depthwise_bwd_planes<decltype(kh)::value, decltype(kw)::value, decltype(act)::value>(p0, p1, g, gyp, xp, wp, pp,
                                                                                           gxp, part);
    });
  });
  const at::Tensor sums = partial.sum(0);  // [C, taps + 1], a fixed-order sum over the batch
  at::Tensor gw = sums.narrow(1, 0, taps).reshape(w.sizes()).to(x.scalar_type());
  at::Tensor gb = has_bias ? sums.select(1, taps).contiguous().to(x.scalar_type()) : at::empty({0}, x.options());
  return {gx, gw, gb};
}

// The project's own convolution where it applies (depthwise: per plane; conv1d: the implicit GEMM or
// F(2, 3); conv2d: F(2x2, 3x3)): "depthwise", "implicit_gemm", "winograd", or "aten" for oneDNN's.
std::string own_path(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride,
                     const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups) {
  if (depthwise_applies(x, w, stride, groups)) return "depthwise";
  if (winograd2_applies(x, w, stride, padding, dilation, groups)) return "winograd";
  if (!implicit_gemm_applies(x, w, stride, padding, dilation, groups)) return "aten";
  if (winograd_applies(w, dilation)) return "winograd";
  return own_loops_now() ? "implicit_gemm" : "aten";
}

std::vector<at::Tensor> own_conv(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, int64_t activation, bool save_pre) {
  if (x.dim() == 4) return winograd2_conv(x, w, padding, bias, residual, activation, save_pre);
  return implicit_conv(x, w, padding, dilation, bias, residual, activation, save_pre);
}

// The implicit GEMM's weight gradient: dW[co, ci, j] = sum over sequences b and output positions q of
// gp[b, co, q] * x_pad[b, ci, q + shifts[j]]: for every tap one GEMM C_j [C_in, C_out] = A_j B with
// A_j[ci, (b, q)] = x_pad[b, ci, q + shifts[j]] and B[(b, q), co] = gp[b, co, q], reduced over all
// B * L_out positions.
//
// The reduction is long and C small (K = 16384 against 768 x 256 for 32 x 256 x 512, k = 3), so the
// work is split along K: the positions are cut into slices of one sequence (at most 512 deep), the
// slices into chunks that threads claim from a shared counter, and each chunk sums its slices into
// its own C; the chunks' Cs are added in chunk order at the end (the result does not depend on which
// thread took which chunk). Per slice the task packs B's slice ([kc, C_out], 512 KiB at most: it
// stays in L2 for every row block) and, per block of kRows input channels, x's rows over the slice's
// positions widened by the largest shift, transposed: tap j's A is that buffer from row shifts[j] on,
// so the taps share one packing.
//
// Measured on 2 Zen 5 cores against oneDNN's backward-weights (grad_w alone, medians): 32 x 256 x 512
// k = 3: 385-400 GFLOP/s against 350-365; 32 x 64 x 1024 -> 64: 1.3x; 64 x 300 x 256 -> 100, k = 5:
// 1.03x. With few slices per thread (a handful of long sequences, or a large C that leaves room for
// few chunks) it was slower (0.78-0.95x: 8 x 768 x 128, 2 x 512 x 1024, 1 x 256 x 4096), so there
// oneDNN computes grad_w. (packed_gemm's order, a task per row block with the whole of B streamed
// from L3 by each: ~300 GFLOP/s.)
struct GradWeightPlan {
  int64_t Np;      // C_out rounded up to whole panels
  int64_t run;     // positions per slice (a sequence's positions in equal runs of at most 512)
  int64_t per_seq; // slices per sequence
  int64_t slices, chunks;
  int64_t c_floats;  // one chunk's C: taps * C_in * Np
};

GradWeightPlan plan_grad_weight(const Grid& g) {
  GradWeightPlan w;
  w.Np = (g.Cout + kPanel - 1) / kPanel * kPanel;
  const int64_t kc_max = std::clamp<int64_t>((128 << 10) / w.Np, 64, 512);  // B's slice <= 512 KiB
  w.per_seq = (g.Lout + kc_max - 1) / kc_max;
  w.run = (g.Lout + w.per_seq - 1) / w.per_seq;
  w.slices = g.B * w.per_seq;
  w.c_floats = static_cast<int64_t>(g.shifts.size()) * g.Cin * w.Np;
  // three chunks per thread, of at least four slices each (a chunk adds a pass over its C), within
  // 32 MiB of partial sums
  w.chunks = std::min<int64_t>({3 * at::get_num_threads(), w.slices / 4, (int64_t{8} << 20) / w.c_floats});
  return w;
}

// Whether implicit_grad_weight runs: the forward on the implicit GEMM, at least two chunks per
// thread, slices of at least 256 positions.
bool implicit_grad_weight_applies(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                                  int64_t groups) {
  if (!implicit_gemm_applies(x, w, stride, padding, dilation, groups)) return false;
  const GradWeightPlan plan = plan_grad_weight(make_grid(x, w, padding, dilation));
  return plan.chunks >= 2 * at::get_num_threads() && plan.run >= 256;
}

at::Tensor implicit_grad_weight(const at::Tensor& gp, const at::Tensor& x, const Grid& g) {
  using cpu::gemm_detail::kRows;
  const GradWeightPlan plan = plan_grad_weight(g);
  const int64_t taps = static_cast<int64_t>(g.shifts.size()), max_shift = g.shifts.back();
  const int64_t Np = plan.Np, panels = Np / kPanel, run = plan.run, chunks = plan.chunks;
  const int64_t cblocks = (g.Cin + kRows - 1) / kRows;
  at::Tensor partial = cpu::cached_empty({chunks, plan.c_floats}, x.options());
  const float* gpp = gp.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), chunks), 1, [&](int64_t, int64_t) {
    cpu::LineVector<float> bs(run * Np), xa((run + max_shift) * kRows);
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      float* cc = partial.data_ptr<float>() + c * plan.c_floats;
      const int64_t s0 = c * plan.slices / chunks, s1 = (c + 1) * plan.slices / chunks;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / plan.per_seq, q0 = s % plan.per_seq * run, kc = std::min(run, g.Lout - q0);
        for (int64_t p = 0; p < panels; ++p) {  // bs[(p * kc + k) * kPanel + u] = gp[b, p * kPanel + u, q0 + k]
          const int64_t n0 = p * kPanel, nc = std::min(kPanel, g.Cout - n0);
          float* dst = bs.data() + p * kc * kPanel;
          if (nc < kPanel) std::fill(dst, dst + kc * kPanel, 0.f);
          cpu::transpose_f32(gpp + (b * g.Cout + n0) * g.Lout + q0, g.Lout, dst, kPanel, nc, kc);
        }
        // x's positions [q0 - pad, q0 - pad + span): tap j reads from offset shifts[j]
        const int64_t first = q0 - g.pad, span = kc + max_shift;
        const int64_t lo = std::clamp<int64_t>(-first, 0, span), hi = std::clamp<int64_t>(g.L - first, lo, span);
        for (int64_t cb = 0; cb < cblocks; ++cb) {
          const int64_t ci0 = cb * kRows, mc = std::min(kRows, g.Cin - ci0);
          // xa[i * kRows + r] = x[b, ci0 + r, first + i], 0 outside [0, L)
          for (int64_t i = 0; i < lo; ++i) std::fill_n(xa.data() + i * kRows, mc, 0.f);
          if (hi > lo)
            cpu::transpose_f32(xp + (b * g.Cin + ci0) * g.L + first + lo, g.L, xa.data() + lo * kRows, kRows, mc,
                               hi - lo);
          for (int64_t i = hi; i < span; ++i) std::fill_n(xa.data() + i * kRows, mc, 0.f);
          for (int64_t j = 0; j < taps; ++j)
            for (int64_t p = 0; p < panels; ++p)
              cpu::small_gemm(mc, kPanel, kc, xa.data() + g.shifts[j] * kRows, 1, kRows, bs.data() + p * kc * kPanel,
                              kPanel, cc + (j * g.Cin + ci0) * Np + p * kPanel, Np, 1.f, s > s0);
        }
      }
    }
  });
  // the chunks' sums in chunk order: [taps, C_in, Np] -> [C_out, C_in, taps]
  const at::Tensor total = cpu::reduce_partials(partial, plan.c_floats, at::kFloat);
  return total.view({taps, g.Cin, Np}).narrow(2, 0, g.Cout).permute({2, 1, 0}).contiguous();
}

// bfloat16 on a CPU without AVX-512 (oneDNN's avx512_core: F, BW): oneDNN has no bf16 convolution there and runs
// its reference loops (a conv1d 256 -> 256, k 3, over 32 x 512 positions: 2.2 s, against 30 ms in
// fp32 on the AVX2 EPYC of the README), so such calls compute in fp32 on converted tensors (our own
// fp32 paths included) and round the results to bf16 once.
bool bf16_in_fp32(const at::Tensor& x) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool avx512_core = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return x.scalar_type() == at::kBFloat16 && !avx512_core;
#else
  return false;
#endif
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

}  // namespace

bool conv_own_loops() { return own_loops_now(); }

bool set_conv_own_loops(bool on) {
  const bool before = own_loops_now();
  g_own_loops.store(on ? 1 : 0, std::memory_order_relaxed);
  return before;
}

std::vector<at::Tensor> conv_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual, std::vector<int64_t> stride,
                                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                     int64_t activation, bool save_pre) {
  check(x, w, bias);
  if (bf16_in_fp32(x)) {  // the whole op in fp32, its results rounded to bf16 once (pre keeps v's sign)
    std::vector<at::Tensor> r = conv_fwd_cpu(x.to(at::kFloat), w.to(at::kFloat), to_float(bias), to_float(residual),
                                             stride, padding, dilation, groups, activation, save_pre);
    return {r[0].to(at::kBFloat16), r[1].to(at::kBFloat16)};
  }
  // a channels-last x stays so: oneDNN's convolution takes it as it is and writes a channels-last output,
  // which the epilogue reads as [positions, C_out] (our own convolutions work in NCHW)
  const bool cl = channels_last(x);
  const std::string path = cl ? "aten" : own_path(x, w, stride, padding, dilation, groups);
  if (path == "depthwise") return depthwise_conv(x, w, padding, dilation, bias, residual, activation, save_pre);
  if (seq_channels_last(x))  // (only the depthwise kernels read it as it is; outputs are contiguous)
    return conv_fwd_cpu(x.contiguous(), w, bias, residual, stride, padding, dilation, groups, activation, save_pre);
  if (path != "aten") return own_conv(x, w, padding, dilation, bias, residual, activation, save_pre);
  const at::MemoryFormat format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const std::vector<int64_t> output_padding(stride.size(), 0);
  // v = conv(x) + bias from oneDNN, which adds the bias to its fp32 sums before rounding to x's dtype
  at::Tensor pre = at::convolution(x, w, bias, stride, padding, dilation, false, output_padding, groups)
                       .contiguous(format);
  if (residual) {
    TORCH_CHECK(residual->sizes() == pre.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(format),
                "conv: residual must be a tensor of the output's shape ", pre.sizes(), " and x's dtype, laid out as x (",
                cl ? "channels-last" : "contiguous", "), got ", residual->sizes());
  }
  at::Tensor out = save_pre ? cpu::cached_empty_like(pre) : pre;
  const int64_t C = pre.size(1), S = pre.numel() / std::max<int64_t>(1, pre.size(0) * C);
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "conv_fwd_cpu", [&] {
    using T = scalar_t;
    const T* res = residual ? residual->const_data_ptr<T>() : nullptr;
    cpu::dispatch_activation(activation, [&](auto act) {
      if (cl)
        epilogue_fwd_cl<decltype(act)::value, T>(pre.const_data_ptr<T>(), res, out.data_ptr<T>(), pre.size(0) * S, C);
      else
        epilogue_fwd<decltype(act)::value, T>(pre.const_data_ptr<T>(), res, out.data_ptr<T>(), pre.size(0) * C, S);
    });
  });
  return {out, save_pre ? pre : at::empty({0}, x.options())};
}

std::string conv_cpu_path(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                          std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  if (bf16_in_fp32(x)) return conv_cpu_path(x.to(at::kFloat), w.to(at::kFloat), stride, padding, dilation, groups);
  return channels_last(x) ? "aten" : own_path(x, w, stride, padding, dilation, groups);
}

std::string conv_cpu_grad_weight_path(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
  if (channels_last(x)) return "aten";
  if (depthwise_applies(x, w, stride, groups)) return "depthwise";
  if (winograd2_applies(x, w, stride, padding, dilation, groups)) return "winograd";
  return implicit_grad_weight_applies(x, w, stride, padding, dilation, groups) ? "implicit_gemm" : "aten";
}

std::vector<at::Tensor> conv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t groups, int64_t activation) {
  check(x, w, bias);
  if (bf16_in_fp32(x)) {
    std::vector<at::Tensor> r = conv_bwd_cpu(grad_out.to(at::kFloat), x.to(at::kFloat), w.to(at::kFloat),
                                             pre.to(at::kFloat), to_float(bias), stride, padding, dilation, groups,
                                             activation);
    return {r[0].to(at::kBFloat16), r[1].to(at::kBFloat16), r[2].to(at::kBFloat16)};
  }
  const bool cl = channels_last(x);
  const at::MemoryFormat format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(pre.sizes() == grad_out.sizes() && pre.is_contiguous(format) && grad_out.is_contiguous(format),
              "conv: pre and grad_out must be of one shape and laid out as x (", cl ? "channels-last" : "contiguous",
              "), got ", pre.sizes(), " and ", grad_out.sizes());
  if (!cl && depthwise_applies(x, w, stride, groups))  // gp, grad_x and both sums in one pass of its own
    return depthwise_conv_backward(grad_out, x, w, pre, bias.has_value(), padding, dilation, activation);
  if (seq_channels_last(x))
    return conv_bwd_cpu(grad_out, x.contiguous(), w, pre, bias, stride, padding, dilation, groups, activation);
  const int64_t B = pre.size(0), C = pre.size(1), S = pre.numel() / std::max<int64_t>(1, B * C);
  at::Tensor gp = grad_out, grad_bias = at::empty({0}, x.options());
  if ((activation != cpu::kIdentity || bias) && cl) {
    gp = cpu::cached_empty_like(grad_out);
    const int64_t P = B * S, chunk = cpu::rows_per_chunk(P);
    at::Tensor partial = at::empty({bias ? (P + chunk - 1) / chunk : 0, C}, x.options().dtype(at::kFloat));
    BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "conv_bwd_cpu", [&] {
      using T = scalar_t;
      cpu::dispatch_activation(activation, [&](auto act) {
        epilogue_bwd_cl<decltype(act)::value, T>(grad_out.const_data_ptr<T>(), pre.const_data_ptr<T>(),
                                                 gp.data_ptr<T>(), bias ? partial.data_ptr<float>() : nullptr, P, C);
      });
    });
    if (bias) grad_bias = cpu::reduce_partials(partial, C, x.scalar_type());  // in chunk order
  } else if (activation != cpu::kIdentity || bias) {
    gp = cpu::cached_empty_like(grad_out);
    at::Tensor row_sums = at::empty({B, C}, x.options().dtype(at::kFloat));
    BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "conv_bwd_cpu", [&] {
      using T = scalar_t;
      cpu::dispatch_activation(activation, [&](auto act) {
        epilogue_bwd<decltype(act)::value, T>(grad_out.const_data_ptr<T>(), pre.const_data_ptr<T>(), gp.data_ptr<T>(),
                                              row_sums.data_ptr<float>(), B * C, S);
      });
    });
    if (bias) grad_bias = row_sums.sum(0).to(x.scalar_type());  // a fixed-order sum over the batch
  }
  const std::vector<int64_t> output_padding(stride.size(), 0);
  // grad_x is the transposed convolution of gp: for stride 1 and groups 1, a convolution of gp with the
  // weight's channel axes swapped and its taps reversed, padded by d (k - 1) - p (the output then has
  // x's size), which the implicit GEMM runs where it applies. grad_w: implicit_grad_weight where it
  // applies (conv_cpu_grad_weight_path), else oneDNN's backward-weights.
  std::vector<int64_t> t_padding, spatial;
  for (size_t i = 0; i < padding.size(); ++i) {
    t_padding.push_back(dilation[i] * (w.size(2 + i) - 1) - padding[i]);
    spatial.push_back(2 + static_cast<int64_t>(i));
  }
  // (a channels-last backward stays on oneDNN, which keeps the layout: ours work in NCHW)
  const bool ours = !cl && std::all_of(t_padding.begin(), t_padding.end(), [](int64_t p) { return p >= 0; }) &&
                    own_path(gp, w.transpose(0, 1), stride, t_padding, dilation, groups) != "aten";
  const bool winograd_w = !cl && winograd2_applies(x, w, stride, padding, dilation, groups);
  const bool ours_w = winograd_w || (!cl && implicit_grad_weight_applies(x, w, stride, padding, dilation, groups));
  at::Tensor grad_x, grad_w;
  if (!ours || !ours_w)
    std::tie(grad_x, grad_w, std::ignore) = at::convolution_backward(
        gp, x, w, std::nullopt, stride, padding, dilation, false, output_padding, groups, {!ours, !ours_w, false});
  if (ours)
    grad_x = own_conv(gp, w.transpose(0, 1).flip(spatial), t_padding, dilation, std::nullopt, std::nullopt,
                           cpu::kIdentity, false)[0];
  if (winograd_w)
    grad_w = winograd2_grad_weight(gp.contiguous(), x.contiguous(), make_grid2(x, w, padding));
  else if (ours_w)
    grad_w = implicit_grad_weight(gp.contiguous(), x.contiguous(), make_grid(x, w, padding, dilation));
  return {cl ? grad_x.contiguous(format) : grad_x, grad_w, grad_bias};
}

}  // namespace bignlp_fast

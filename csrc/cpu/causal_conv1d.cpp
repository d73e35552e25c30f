// Depthwise causal conv1d on the CPU, widths 2-4, with fused bias and activation:
//   y[b, c, t] = act(bias[c] + sum_j w[c, j] * xx[b, c, t + j]),  xx = cat(initial_state, x).
//
// Each (b, c) row is independent: the forward streams x once and writes y once, W shifted vector
// loads per step (they hit L1), so it runs at the speed of a copy. The backward recomputes the
// pre-activation, keeps gp = grad_y * act'(pre) for the row in a zero-padded buffer, and writes
// grad_x[t] = sum_j w[j] gp[t + W-1 - j]; the weight and bias gradients are per-row fp32 partials
// summed over the batch in a fixed order (deterministic).
// An x laid out [B, L, C] (a sequence model's activation transposed to [B, C, L], as Mamba's in_proj
// output is) is read as it is, y and grad_x written in that layout: see forward_runs_cl.
#include <type_traits>
#include <vector>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& init) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && (x.is_contiguous() || cpu::seq_channels_last(x)),
              "causal_conv1d: x must be a [B, C, L] CPU tensor, contiguous or laid out [B, L, C], got ", x.sizes(),
              " with strides ", x.strides());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) >= 2 && w.size(1) <= 4 && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d: weight must be a contiguous [C, W] tensor of x's dtype with W in 2..4, got ", w.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "causal_conv1d: bias must be a contiguous [C] vector of x's dtype, got ", bias->sizes());
  }
  if (init) {
    TORCH_CHECK(init->dim() == 3 && init->size(0) == x.size(0) && init->size(1) == x.size(1) &&
                    init->size(2) == w.size(1) - 1 && init->is_contiguous() && init->scalar_type() == x.scalar_type(),
                "causal_conv1d: initial_state must be a contiguous [B, C, W-1] tensor of x's dtype, got ",
                init->sizes());
  }
}

// One row of xx = cat(head, x) as fp32, with room for vector over-reads: [W-1 + L + kStep].
template <int W, typename T>
void load_row(const T* head, const T* x, int64_t L, cpu::LineVector<float>& xx) {
  xx.assign(W - 1 + L + kStep, 0.f);
  if (head) cpu::to_float(head, xx.data(), W - 1);
  cpu::to_float(x, xx.data() + W - 1, L);
}

// Rows [r0, r1) (r = b * C + c) of the forward. The loops over rows of both passes are functions of
// their own, so that every pointer and size is a local value: read through parallel_for's captured
// references, each would be loaded again after every vector store (see add_layer_norm.cpp: bwd_chunks).
template <int W, int A, typename T>
void forward_rows(int64_t r0, int64_t r1, const T* x, const T* w, const T* bias, const T* init, T* y, int64_t C,
                  int64_t L) {
  cpu::LineVector<float> xx;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    fVec wj[W];
    for (int j = 0; j < W; ++j) wj[j] = fVec(static_cast<float>(w[c * W + j]));
    const fVec b(bias ? static_cast<float>(bias[c]) : 0.f);
    const T* xr = x + r * L;
    T* yr = y + r * L;
    // y[t] reads xx[t .. t+W-1] = x[t-W+1 .. t]: from x itself once t >= W-1, from the head before.
    const int64_t head_steps = std::min<int64_t>(L, W - 1);
    if (head_steps > 0) {
      load_row<W>(init ? init + r * (W - 1) : static_cast<const T*>(nullptr), xr, std::min<int64_t>(L, kStep), xx);
      fVec a(b), cc(b);
      for (int j = 0; j < W; ++j) {
        a = at::vec::fmadd(wj[j], fVec::loadu(xx.data() + j), a);
        cc = at::vec::fmadd(wj[j], fVec::loadu(xx.data() + j + fVec::size()), cc);
      }
      cpu::store2_any(yr, std::min<int64_t>(L, kStep), cpu::activate<A>(a), cpu::activate<A>(cc));
    }
    for (int64_t t = std::min<int64_t>(L, kStep); t < L; t += kStep) {
      fVec a(b), cc(b);
      for (int j = 0; j < W; ++j) {
        fVec lo, hi;
        const int64_t s = t - (W - 1) + j;  // >= 0 here since t >= kStep > W - 1
        cpu::load2_any(xr + s, L - s, lo, hi);
        a = at::vec::fmadd(wj[j], lo, a);
        cc = at::vec::fmadd(wj[j], hi, cc);
      }
      cpu::store2_any(yr + t, L - t, cpu::activate<A>(a), cpu::activate<A>(cc));
    }
  }
}

template <int W, int A, typename T>
void forward(const T* x, const T* w, const T* bias, const T* init, T* y, int64_t B, int64_t C, int64_t L) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    forward_rows<W, A>(r0, r1, x, w, bias, init, y, C, L);
  });
}

// Rows [r0, r1) of the backward (see forward_rows).
template <int W, int A, typename T>
void backward_rows(int64_t r0, int64_t r1, const T* gy, const T* x, const T* w, const T* bias, const T* init, T* gx,
                   T* ginit, float* partial, int64_t C, int64_t L) {
  cpu::LineVector<float> xx, gpp;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    fVec wj[W];
    for (int j = 0; j < W; ++j) wj[j] = fVec(static_cast<float>(w[c * W + j]));
    const fVec b(bias ? static_cast<float>(bias[c]) : 0.f);
    load_row<W>(init ? init + r * (W - 1) : static_cast<const T*>(nullptr), x + r * L, L, xx);
    // gpp = [W-1 zeros, gp[0 .. L), zeros]: grad_xx[u] = sum_j w[j] gpp[u + W-1 - j] needs no bounds.
    gpp.assign(2 * (W - 1) + L + kStep, 0.f);
    const float* xd = xx.data();  // locals: the vectors' own pointers would be reloaded after each store
    float* gd = gpp.data();
    float* gp = gd + (W - 1);
    fVec dw[W], db(0.f);
    for (int j = 0; j < W; ++j) dw[j] = fVec(0.f);
    for (int64_t t = 0; t < L; t += fVec::size()) {
      const int64_t n = L - t;
      fVec pre(b);
      for (int j = 0; j < W; ++j) pre = at::vec::fmadd(wj[j], fVec::loadu(xd + t + j), pre);
      const fVec g = cpu::load_any(gy + r * L + t, n) * cpu::activate_grad<A>(pre);  // 0 past L
      cpu::store_any(gp + t, g, n);
      db = db + g;
      for (int j = 0; j < W; ++j) dw[j] = at::vec::fmadd(g, fVec::loadu(xd + t + j), dw[j]);
    }
    for (int j = 0; j < W; ++j) partial[r * (W + 1) + j] = cpu::hsum(dw[j]);
    partial[r * (W + 1) + W] = cpu::hsum(db);
    // grad_xx[u] for u in [0, W-1 + L): the head (initial_state) then x.
    auto grad_at = [&](int64_t u) {
      fVec acc(0.f);
      for (int j = 0; j < W; ++j) acc = at::vec::fmadd(wj[j], fVec::loadu(gd + u + (W - 1) - j), acc);
      return acc;
    };
    if (ginit) {
      float head[fVec::size()];
      grad_at(0).store(head);
      for (int u = 0; u < W - 1; ++u) ginit[r * (W - 1) + u] = static_cast<T>(head[u]);
    }
    for (int64_t t = 0; t < L; t += fVec::size()) cpu::store_any(gx + r * L + t, grad_at(t + W - 1), L - t);
  }
}

template <int W, int A, typename T>
void backward(const T* gy, const T* x, const T* w, const T* bias, const T* init, T* gx, T* ginit, float* partial,
              int64_t B, int64_t C, int64_t L) {
  at::parallel_for(0, B * C, std::max<int64_t>(1, 8192 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    backward_rows<W, A>(r0, r1, gy, x, w, bias, init, gx, ginit, partial, C, L);
  });
}

// ---- x laid out [B, L, C] --------------------------------------------------------------------------
// A position's C channels are contiguous: the kernels run over positions, a few at a time (every
// channel vector of those positions before the next few), x's rows read in order and asked for kClAhead
// rows ahead (with the hardware prefetcher alone the loads waited on memory; the W - 1 rows before a
// position were read just before). A task is a run of kRun positions of one sequence;
// the rows before a sequence's first position are initial_state's (or zeros), transposed into a small
// [W - 1, C] buffer. The weights are held as fp32 [W, Cp] (Cp: C rounded up to a vector, zeros past C).
constexpr int64_t kRun = 64;
constexpr int64_t kClAhead = 8;  // rows: x (and grad_y) asked for this many positions ahead
// Positions computed together (forward_positions_cl, backward_positions_cl): each weight vector loaded
// once for them all and each x row once for every position that reads it (at W = 4 and 4 positions, 3
// loads a vector where one position took 9; the backward's partial sums and ring rows likewise). bf16
// takes 4, fp32 2 (4 ran 1.1-1.4x slower in fp32's backward); fp32's forward takes 2 only where a row
// holds at least kClPairsFrom channels, one below, where reading two short rows at a time ran slower
// than one (Zen 4, session 49, width 4 + silu over 16 Mi values, forward: bf16 4.1 -> 3.5 ms at C =
// 256-4096; fp32 C = 2048 5.6 -> 4.4 ms, C = 768 5.0 -> 4.7, but C = 256 4.6 -> 6.0; forward + backward:
// bf16 0.72-0.88x the time of one at a time, fp32 0.74-0.97x, at C = 256-4096).
template <typename T>
constexpr int kClPositions = std::is_same_v<T, float> ? 2 : 4;
constexpr int64_t kClPairsFrom = 768;

struct ClShape {
  int64_t B, C, L, Cp, runs;
  ClShape(const at::Tensor& x)
      : B(x.size(0)), C(x.size(1)), L(x.size(2)), Cp(cpu::round_up_to_step(x.size(1))),
        runs((x.size(2) + kRun - 1) / kRun) {}
};

// The fp32 weights [W, Cp] and bias [Cp] of the [B, L, C] kernels.
template <int W, typename T>
void cl_params(const T* w, const T* bias, const ClShape& s, cpu::LineVector<float>& wt, cpu::LineVector<float>& bf) {
  wt.assign(W * s.Cp, 0.f);
  bf.assign(s.Cp, 0.f);
  for (int64_t c = 0; c < s.C; ++c) {
    for (int j = 0; j < W; ++j) wt[j * s.Cp + c] = static_cast<float>(w[c * W + j]);
    if (bias) bf[c] = static_cast<float>(bias[c]);
  }
}

// rows[i] = xx's row at position t - (W - 1) + i of sequence b (N rows: W for one position, W + P - 1
// for P positions from t): x's row, or head's (initial_state transposed, or zeros) before position 0.
template <int W, int N, typename T>
inline void cl_rows(const T* xb, const T* head, int64_t t, int64_t C, const T* (&rows)[N]) {
  for (int i = 0; i < N; ++i) {
    const int64_t s = t - (W - 1) + i;
    rows[i] = s >= 0 ? xb + s * C : head + (s + W - 1) * C;
  }
}

// head [W - 1, C] = initial_state[b] transposed (or zeros).
template <int W, typename T>
void cl_head(const T* init, int64_t b, int64_t C, cpu::LineVector<T>& head) {
  head.assign((W - 1) * C, T(0));
  if (init)
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < W - 1; ++j) head[j * C + c] = init[(b * C + c) * (W - 1) + j];
}

// The pre-activations of P positions' channels [c, c + n) (rows from cl_rows<W, W + P - 1>):
// acc[p] = bias + sum_j w[j] rows[p + j], the rows' vectors left in xv (the backward's weight sums take
// them too). One load of each weight vector and row serves all P positions.
template <int W, int P, typename T>
BIGNLP_FAST_VEC_INLINE void cl_pre(const T* const (&rows)[W + P - 1], const float* wt, const float* bf, int64_t Cp,
                                   int64_t c, int64_t n, fVec (&acc)[P], fVec (&xv)[W + P - 1]) {
  for (int i = 0; i < W + P - 1; ++i) xv[i] = cpu::load_any(rows[i] + c, n);
  const fVec bias = fVec::loadu(bf + c);
  for (int p = 0; p < P; ++p) acc[p] = bias;
  for (int j = 0; j < W; ++j) {
    const fVec wj = fVec::loadu(wt + j * Cp + c);
    for (int p = 0; p < P; ++p) acc[p] = at::vec::fmadd(wj, xv[p + j], acc[p]);
  }
}

// g = grad_y * act'(pre) of P positions from t, channels [c, c + n) (lanes past C: 0, as grad_y loads
// them), the rows' vectors left in xv for the weight sums.
template <int W, int P, int A, typename T>
BIGNLP_FAST_VEC_INLINE void cl_g(const T* const (&rows)[W + P - 1], const T* gyb, int64_t t, const float* wt,
                                 const float* bf, int64_t C, int64_t Cp, int64_t c, int64_t n, fVec (&g)[P],
                                 fVec (&xv)[W + P - 1]) {
  fVec pre[P];
  cl_pre<W, P>(rows, wt, bf, Cp, c, n, pre, xv);
  for (int p = 0; p < P; ++p) g[p] = cpu::load_any(gyb + (t + p) * C + c, n) * cpu::activate_grad<A>(pre[p]);
}

// The forward of P positions from t, every channel vector: x's rows asked for kClAhead rows ahead.
template <int W, int P, int A, typename T>
BIGNLP_FAST_VEC_INLINE void forward_positions_cl(const T* xb, const T* head, T* yb, int64_t t, int64_t C,
                                                 int64_t Cp, const float* wd, const float* bd) {
  const T* rows[W + P - 1];
  cl_rows<W>(xb, head, t, C, rows);
  const char* ahead = reinterpret_cast<const char*>(xb + (t + kClAhead) * C);
  for (int64_t c = 0; c < C; c += fVec::size()) {
    const int64_t n = C - c;
    for (int p = 0; p < P; ++p) __builtin_prefetch(ahead + (p * C + c) * int64_t{sizeof(T)});
    fVec acc[P], xv[W + P - 1];
    cl_pre<W, P>(rows, wd, bd, Cp, c, n, acc, xv);
    for (int p = 0; p < P; ++p) cpu::store_any(yb + (t + p) * C + c, cpu::activate<A>(acc[p]), n);
  }
}

// Tasks [k0, k1) (k = b * runs + run) of the forward.
template <int W, int A, typename T>
void forward_runs_cl(int64_t k0, int64_t k1, const ClShape& s, const T* x, const T* w, const T* bias, const T* init,
                     T* y) {
  cpu::LineVector<float> wt, bf;
  cl_params<W>(w, bias, s, wt, bf);
  cpu::LineVector<T> head;
  const int64_t C = s.C, L = s.L, Cp = s.Cp, runs = s.runs;  // locals: not reloaded after each store
  const float* wd = wt.data();
  const float* bd = bf.data();
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = k / runs, t0 = k % runs * kRun, t1 = std::min(L, t0 + kRun);
    if (t0 == 0) cl_head<W>(init, b, C, head);
    const T* xb = x + b * L * C;
    T* yb = y + b * L * C;
    int64_t t = t0;
    constexpr int P = kClPositions<T>;
    if (P > 2 || C >= kClPairsFrom)
      for (; t + P <= t1; t += P) forward_positions_cl<W, P, A>(xb, head.data(), yb, t, C, Cp, wd, bd);
    for (; t < t1; ++t) forward_positions_cl<W, 1, A>(xb, head.data(), yb, t, C, Cp, wd, bd);
  }
}

// The backward of P positions from t (all before L), every channel vector. g = grad_y * act'(pre) of
// positions t - (W - 1) .. t + P - 1 in G: the first W - 1 from the ring (the positions before t, as
// the last group left them), the P new ones computed here, and the last W - 1 left in the ring for the
// next group. With sums, the P positions' products with xx go into the task's partial [W + 1, Cp];
// grad_x of position tx = t - (W - 1) + p = sum_j w[j] g[tx + W - 1 - j] for the tx from tx0 on (the
// task's first position: the ring's rows before it are not its positions). P = 1 with live false is
// a position past L: g = 0, nothing read.
template <int W, int P, int A, typename T>
BIGNLP_FAST_VEC_INLINE void backward_positions_cl(const T* xb, const T* head, const T* gyb, T* gxb, int64_t t,
                                                  int64_t tx0, bool live, float* sums, float* ring, int64_t C,
                                                  int64_t Cp, const float* wd, const float* bd) {
  const T* rows[W + P - 1];
  if (live) cl_rows<W>(xb, head, t, C, rows);
  const char* x_ahead = reinterpret_cast<const char*>(xb + (t + kClAhead) * C);
  const char* gy_ahead = reinterpret_cast<const char*>(gyb + (t + kClAhead) * C);
  for (int64_t c = 0; c < C; c += fVec::size()) {
    const int64_t n = C - c;
    fVec G[W - 1 + P], xv[W + P - 1];
    for (int i = 0; i < W - 1; ++i) G[i] = fVec::loadu(ring + i * Cp + c);
    if (live) {
      for (int p = 0; p < P; ++p) {
        __builtin_prefetch(x_ahead + (p * C + c) * int64_t{sizeof(T)});
        __builtin_prefetch(gy_ahead + (p * C + c) * int64_t{sizeof(T)});
      }
      fVec g[P];
      cl_g<W, P, A>(rows, gyb, t, wd, bd, C, Cp, c, n, g, xv);
      for (int p = 0; p < P; ++p) G[W - 1 + p] = g[p];
    } else {
      for (int p = 0; p < P; ++p) G[W - 1 + p] = fVec(0.f);
    }
    if (sums) {
      for (int j = 0; j < W; ++j) {
        fVec sj = fVec::loadu(sums + j * Cp + c);
        for (int p = 0; p < P; ++p) sj = at::vec::fmadd(G[W - 1 + p], xv[p + j], sj);
        sj.store(sums + j * Cp + c);
      }
      fVec sb = fVec::loadu(sums + W * Cp + c);
      for (int p = 0; p < P; ++p) sb = sb + G[W - 1 + p];
      sb.store(sums + W * Cp + c);
    }
    for (int p = 0; p < P; ++p) {
      const int64_t tx = t - (W - 1) + p;
      if (tx < tx0) continue;
      fVec acc(0.f);
      for (int j = 0; j < W; ++j) acc = at::vec::fmadd(fVec::loadu(wd + j * Cp + c), G[p + W - 1 - j], acc);
      cpu::store_any(gxb + tx * C + c, acc, n);
    }
    for (int i = 0; i < W - 1; ++i) G[P + i].store(ring + i * Cp + c);
  }
}

// Tasks [k0, k1) of the backward: positions t0 .. t1 + W - 2 in order through backward_positions_cl
// (grad_x lags g by W - 1 positions, so a task computes g of W - 1 positions past its own, not adding
// them to its sums), in groups of kClPositions while they are the task's own, then one at a time.
// initial_state's gradient, for a sequence's first run: the head's u = sum_{j <= u} w[j] g[u - j], from
// g of positions 0 .. W - 2 computed once more on their own.
template <int W, int A, typename T>
void backward_runs_cl(int64_t k0, int64_t k1, const ClShape& s, const T* gy, const T* x, const T* w, const T* bias,
                      const T* init, T* gx, T* ginit, float* partial) {
  cpu::LineVector<float> wt, bf, ring((W - 1) * s.Cp), first((W - 1) * s.Cp);
  cl_params<W>(w, bias, s, wt, bf);
  cpu::LineVector<T> head;
  const int64_t C = s.C, L = s.L, Cp = s.Cp, runs = s.runs;  // (locals, as the forward's)
  const float* wd = wt.data();
  const float* bd = bf.data();
  float* rd = ring.data();
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t b = k / runs, t0 = k % runs * kRun, t1 = std::min(L, t0 + kRun);
    if (t0 == 0) cl_head<W>(init, b, C, head);
    const T* xb = x + b * L * C;
    const T* gyb = gy + b * L * C;
    T* gxb = gx + b * L * C;
    float* sums = partial + k * (W + 1) * Cp;
    std::fill(sums, sums + (W + 1) * Cp, 0.f);
    if (t0 == 0 && ginit) {  // g of positions 0 .. W - 2 (zero past L) into first, then the head's gradient
      for (int64_t u = 0; u < W - 1; ++u) {
        float* gu = first.data() + u * Cp;
        std::fill(gu, gu + Cp, 0.f);
        if (u >= L) continue;
        const T* rows[W];
        cl_rows<W>(xb, head.data(), u, C, rows);
        for (int64_t c = 0; c < C; c += fVec::size()) {
          const int64_t n = C - c;
          fVec g[1], xv[W];
          cl_g<W, 1, A>(rows, gyb, u, wd, bd, C, Cp, c, n, g, xv);
          g[0].store(gu + c);
        }
      }
      for (int64_t u = 0; u < W - 1; ++u)
        for (int64_t c = 0; c < C; ++c) {
          float acc = 0.f;
          for (int64_t j = 0; j <= u; ++j) acc += wd[j * Cp + c] * first[(u - j) * Cp + c];
          ginit[(b * C + c) * (W - 1) + u] = static_cast<T>(acc);
        }
    }
    std::fill(rd, rd + (W - 1) * Cp, 0.f);
    int64_t t = t0;
    constexpr int P = kClPositions<T>;
    for (; t + P <= t1; t += P)
      backward_positions_cl<W, P, A>(xb, head.data(), gyb, gxb, t, t0, true, sums, rd, C, Cp, wd, bd);
    for (; t < t1 + W - 1; ++t)
      backward_positions_cl<W, 1, A>(xb, head.data(), gyb, gxb, t, t0, t < L, t < t1 ? sums : nullptr, rd, C, Cp,
                                     wd, bd);
  }
}

template <typename F>
void dispatch_width(int64_t W, F&& f) {
  switch (W) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "causal_conv1d: kernel width must be 2, 3 or 4, got ", W);
  }
}

// A [B, C, L] tensor like x, laid out [B, L, C].
at::Tensor blc_empty(const at::Tensor& x) {
  return cpu::cached_empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
}

}  // namespace

at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check(x, w, bias, initial_state);
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2);
  const bool cl = cpu::seq_channels_last(x);
  at::Tensor y = cl ? blc_empty(x) : cpu::cached_empty_like(x);
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "causal_conv1d_fwd_cpu", [&] {
    using T = scalar_t;
    dispatch_width(w.size(1), [&](auto width) {
      cpu::dispatch_activation(activation, [&](auto act) {
        if (cl) {
          const ClShape s(x);
          at::parallel_for(0, B * s.runs, 1, [&](int64_t k0, int64_t k1) {
            forward_runs_cl<decltype(width)::value, decltype(act)::value, T>(
                k0, k1, s, x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias ? bias->const_data_ptr<T>() : nullptr,
                initial_state ? initial_state->const_data_ptr<T>() : nullptr, y.data_ptr<T>());
          });
          return;
        }
        forward<decltype(width)::value, decltype(act)::value, T>(
            x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias ? bias->const_data_ptr<T>() : nullptr,
            initial_state ? initial_state->const_data_ptr<T>() : nullptr, y.data_ptr<T>(), B, C, L);
      });
    });
  });
  return y;
}

std::vector<at::Tensor> causal_conv1d_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& initial_state, int64_t activation) {
  check(x, w, bias, initial_state);
  const bool cl = cpu::seq_channels_last(x);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  (cl ? cpu::seq_channels_last(grad_y) : grad_y.is_contiguous()),
              "causal_conv1d: grad_y must match x in shape, dtype and layout, got ", grad_y.sizes(), " with strides ",
              grad_y.strides());
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), W = w.size(1);
  at::Tensor gx = cl ? blc_empty(x) : cpu::cached_empty_like(x);
  at::Tensor ginit = initial_state ? at::empty_like(*initial_state) : at::empty({0}, x.options());
  // per (sequence, channel) row, or ([B, L, C]) per task [W + 1, Cp]: summed in a fixed order below
  const ClShape s(x);
  // (a cached buffer: a fresh one of [B, L, C]'s 5 MiB, 8 x 1024 x 2048, spent a fifth of the backward
  // clearing its pages)
  at::Tensor partial = cl ? cpu::cached_empty({B * s.runs, W + 1, s.Cp}, x.options().dtype(at::kFloat))
                          : at::empty({B, C, W + 1}, x.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "causal_conv1d_bwd_cpu", [&] {
    using T = scalar_t;
    dispatch_width(W, [&](auto width) {
      cpu::dispatch_activation(activation, [&](auto act) {
        if (cl) {
          at::parallel_for(0, B * s.runs, 1, [&](int64_t k0, int64_t k1) {
            backward_runs_cl<decltype(width)::value, decltype(act)::value, T>(
                k0, k1, s, grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                bias ? bias->const_data_ptr<T>() : nullptr,
                initial_state ? initial_state->const_data_ptr<T>() : nullptr, gx.data_ptr<T>(),
                initial_state ? ginit.data_ptr<T>() : nullptr, partial.data_ptr<float>());
          });
          return;
        }
        backward<decltype(width)::value, decltype(act)::value, T>(
            grad_y.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<T>(),
            bias ? bias->const_data_ptr<T>() : nullptr, initial_state ? initial_state->const_data_ptr<T>() : nullptr,
            gx.data_ptr<T>(), initial_state ? ginit.data_ptr<T>() : nullptr, partial.data_ptr<float>(), B, C, L);
      });
    });
  });
  // [C, W + 1], a fixed-order sum over the batch (or the tasks)
  at::Tensor sums = cl ? partial.sum(0).narrow(1, 0, C).t() : partial.sum(0);
  at::Tensor gw = sums.slice(1, 0, W).contiguous().to(x.scalar_type());
  at::Tensor gb = bias ? sums.select(1, W).contiguous().to(x.scalar_type()) : at::empty({0}, x.options());
  return {gx, gw, gb, ginit};
}

}  // namespace bignlp_fast

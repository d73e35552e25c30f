// One LayerNorm-LSTM layer in one direction on the CPU: the whole time loop, forward and backward,
// float32 and bfloat16 (fp32 state, statistics and accumulation).
//
// The contract and the specification (layer_norm_lstm_{fwd,bwd}_torch) are in
// bignlp_fast/ops/layer_norm_lstm.py. Per step, for every batch row:
//   a = h W_hh^T                       [4H]   the recurrent GEMM
//   pre = xw + gamma_h * norm(a) + beta_h     norm over all 4H gates of the row
//   i, f, o = sigmoid, g = tanh;  c' = f c + i g
//   h' = o * tanh(gamma_c * norm(c') + beta_c)  norm over H
//
// Forward, per step: one parallel region over column panels for the GEMM (into a [B, 4Hp] buffer),
// then one over batch rows for everything else: the normalisations need the whole row, so they
// cannot ride in the GEMM's column blocks as the plain LSTM's update does (csrc/cpu/rnn.cpp).
// Backward, per step in reverse: one region over batch rows for the gate, cell and both
// LayerNorm gradients, then dh_prev = da W_hh over column panels.
// Both GEMMs read their A operand row-major (h [B, H], da [B, 4Hp]), as each row's worker writes it
// with vector stores: with transposed copies written a value at a time, a bf16 B32 H512 forward took
// 47 ms instead of 32.
// With lengths, step t of row b is active when t < lengths[b]; an inactive step keeps the state,
// outputs zeros and passes the gradients through (the GEMM runs over every row regardless). The weight gradient and the
// LayerNorm scale/shift gradients are reductions over all steps at the end.
//
// Internally each of the 4 gates and every H-vector is padded to Hp = H rounded up to 16 (a whole
// number of vectors at every ISA level, and a layout the Python side can size without asking the
// build), so the row loops run on whole vectors; padded lanes are kept at zero where a statistic
// reads them, and the statistics count H (or 4H) values.
#include <cmath>
#include <functional>
#include <vector>

#include "../ops.h"
#include "activation.h"
#include "common.h"
#include "gemm.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::hsum;
using cpu::small_gemm;
using cpu::to_float;

constexpr int64_t VS = fVec::size();
constexpr int64_t kPanel = 2 * VS;  // columns per B panel of the two recurrent GEMMs
constexpr int64_t kPad = 16;        // H is padded to a multiple of this (see the top)
static_assert(kPad % VS == 0, "the padding must be a whole number of vectors");

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Mean and 1 / sqrt(variance + eps) of `segments` runs of n floats, run g at x + g * stride (the 4 gates
// of a padded row, or the H values of c'). The lanes between the runs are left out exactly: counting
// their zeros and subtracting their mean^2 afterwards cancelled away the variance where the mean is
// large against the spread (H = 3, c' = 100 +- 0.008: h' off by 23%; H = 7, mean 10: 400x torch's error).
inline void row_stats(const float* x, int64_t segments, int64_t n, int64_t stride, float eps, float& mean,
                      float& rstd) {
  // The sum is of x - x[0]: small where the values sit close together far from zero, and so nearly
  // exact (of 17 values 100 +- 0.01 the plain fp32 sum lost ~1e-5 of the mean, 1e-3 of the spread)
  const int64_t full = n - n % VS, rest = n - full;
  const fVec shift(x[0]), zero(0.f);
  fVec s(0.f);
  for (int64_t g = 0; g < segments; ++g) {
    const float* run = x + g * stride;
    for (int64_t k = 0; k < full; k += VS) s = s + (fVec::loadu(run + k) - shift);
    if (rest) s = s + fVec::set(zero, fVec::loadu(run + full, rest) - shift, rest);
  }
  const float count = static_cast<float>(segments * n);
  mean = x[0] + hsum(s) / count;
  const fVec mu(mean);
  fVec q(0.f);
  for (int64_t g = 0; g < segments; ++g) {
    const float* run = x + g * stride;
    for (int64_t k = 0; k < full; k += VS) {
      const fVec d = fVec::loadu(run + k) - mu;
      q = at::vec::fmadd(d, d, q);
    }
    if (rest) {
      const fVec d = fVec::set(zero, fVec::loadu(run + full, rest) - mu, rest);
      q = at::vec::fmadd(d, d, q);
    }
  }
  rstd = 1.f / std::sqrt(hsum(q) / count + eps);
}

// Sizes and the fp32 workspace row of one (step, batch row): segments of Hp floats:
//   [i f g o (after their nonlinearity) | norm(a) for the 4 gates | c' | norm(c') | tanh(ln_c(c')) |
//    h' | rstd of a, rstd of c']
struct Shape {
  int64_t T, B, H, Hp, GHp, Hc;
  int64_t off_ahat, off_c, off_chat, off_tn, off_h, off_rstd, width;

  Shape(const at::Tensor& xw, const at::Tensor& w_hh)
      : T(xw.size(0)), B(xw.size(1)), H(w_hh.size(1)), Hp(round_up(H, kPad)), GHp(4 * Hp), Hc(round_up(H, kPanel)) {
    TORCH_CHECK(xw.dim() == 3 && xw.size(2) == 4 * H && w_hh.dim() == 2 && w_hh.size(0) == 4 * H,
                "layer_norm_lstm: xw must be [T, B, 4H] and w_hh [4H, H]");
    off_ahat = GHp;
    off_c = 2 * GHp;
    off_chat = off_c + Hp;
    off_tn = off_chat + Hp;
    off_h = off_tn + Hp;
    off_rstd = off_h + Hp;
    width = off_rstd + 2;
  }
};

// A [4H] or [H] parameter as fp32 in the padded layout (gate g at g * Hp), zero in the padding;
// `fill` for an absent one (scale 1, shift 0).
template <typename T>
cpu::LineVector<float> padded_param(const std::optional<at::Tensor>& p, int64_t gates, int64_t H, int64_t Hp, float fill) {
  cpu::LineVector<float> out(gates * Hp);
  for (int64_t g = 0; g < gates; ++g)
    cpu::to_padded_float(p.has_value() ? p->const_data_ptr<T>() + g * H : nullptr, H, out.data() + g * Hp, Hp, fill);
  return out;
}

// ---- forward --------------------------------------------------------------------------------
template <typename T>
void forward(const Shape& sh, const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& gamma_h,
             const std::optional<at::Tensor>& beta_h, const std::optional<at::Tensor>& gamma_c,
             const std::optional<at::Tensor>& beta_c, const at::Tensor& h0, const at::Tensor& c0, float eps,
             const std::vector<int64_t>& len, bool reverse, at::Tensor& out, at::Tensor& h_n, at::Tensor& c_n,
             at::Tensor& ws, bool save) {
  const int64_t B = sh.B, H = sh.H, Hp = sh.Hp, GHp = sh.GHp;
  // W_hh^T [H, 4Hp] in contiguous column panels of kPanel: panel p is [H, kPanel] at wt + p * H * kPanel,
  // column n = g * Hp + j holding row g * H + j of w_hh (zero for j >= H).
  const int64_t panels = GHp / kPanel;
  cpu::LineVector<float> wt(panels * H * kPanel);
  const T* w = w_hh.const_data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t u0 = 0, run; u0 < kPanel; u0 += run) {  // by runs of columns within one gate
        const int64_t n = p * kPanel + u0, g = n / Hp, j = n % Hp;
        run = std::min(kPanel - u0, Hp - j);
        const int64_t valid = std::clamp<int64_t>(H - j, 0, run);  // rows g H + j.. as columns, then zeros
        cpu::transpose_to_float(w + (g * H + j) * H, H, wt.data() + p * H * kPanel + u0, kPanel, valid, H, run);
      }
  });
  const auto gh = padded_param<T>(gamma_h, 4, H, Hp, 1.f), bh = padded_param<T>(beta_h, 4, H, Hp, 0.f);
  const auto gc = padded_param<T>(gamma_c, 1, H, Hp, 1.f), bc = padded_param<T>(beta_c, 1, H, Hp, 0.f);

  // the state: h row-major [B, H] (the GEMM's A operand; see the top), c [B, Hp]
  cpu::LineVector<float> h(B * H), h_next(B * H), c(B * Hp, 0.f), c_next(B * Hp, 0.f), hw(B * GHp);
  to_float(h0.const_data_ptr<T>(), h.data(), B * H);
  for (int64_t b = 0; b < B; ++b) to_float(c0.const_data_ptr<T>() + b * H, c.data() + b * Hp, H);

  const T* x = xw.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  float* wsp = save ? ws.data_ptr<float>() : nullptr;
  for (int64_t step = 0; step < sh.T; ++step) {
    const int64_t t = reverse ? sh.T - 1 - step : step;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        small_gemm(B, kPanel, H, h.data(), H, 1, wt.data() + p * H * kPanel, kPanel, hw.data() + p * kPanel, GHp,
                   1.f, false);
    });
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      cpu::LineVector<float> scratch(save ? 0 : sh.width), xg(GHp, 0.f);
      for (int64_t b = b0; b < b1; ++b) {
        float* r = save ? wsp + (t * B + b) * sh.width : scratch.data();
        const float* a = hw.data() + b * GHp;
        for (int64_t g = 0; g < 4; ++g) to_float(x + (t * B + b) * 4 * H + g * H, xg.data() + g * Hp, H);
        float mean_a, rstd_a;
        row_stats(a, 4, H, Hp, eps, mean_a, rstd_a);
        const fVec mu_a(mean_a), rs_a(rstd_a);
        const float* c_old = c.data() + b * Hp;
        float* c_new = c_next.data() + b * Hp;
        for (int64_t j = 0; j < Hp; j += VS) {
          fVec act[4];
          for (int64_t g = 0; g < 4; ++g) {
            const int64_t n = g * Hp + j;
            const fVec ahat = (fVec::loadu(a + n) - mu_a) * rs_a;
            ahat.store(r + sh.off_ahat + n);
            const fVec pre = fVec::loadu(xg.data() + n) + at::vec::fmadd(fVec::loadu(gh.data() + n), ahat,
                                                                          fVec::loadu(bh.data() + n));
            act[g] = g == 2 ? cpu::tanh_fast(pre) : cpu::sigmoid(pre);
            act[g].store(r + n);
          }
          const fVec cn = at::vec::fmadd(act[1], fVec::loadu(c_old + j), act[0] * act[2]);
          cn.store(c_new + j);
        }
        std::fill(c_new + H, c_new + Hp, 0.f);  // padded lanes: zero
        float mean_c, rstd_c;
        row_stats(c_new, 1, H, Hp, eps, mean_c, rstd_c);
        const fVec mu_c(mean_c), rs_c(rstd_c);
        float* h_row = h_next.data() + b * H;
        T* o_row = o + (t * B + b) * H;
        for (int64_t j = 0; j < Hp; j += VS) {
          const fVec cn = fVec::loadu(c_new + j), chat = (cn - mu_c) * rs_c;
          const fVec tn = cpu::tanh_fast(at::vec::fmadd(fVec::loadu(gc.data() + j), chat, fVec::loadu(bc.data() + j)));
          const fVec hv = fVec::loadu(r + 3 * Hp + j) * tn;
          cn.store(r + sh.off_c + j), chat.store(r + sh.off_chat + j), tn.store(r + sh.off_tn + j);
          hv.store(r + sh.off_h + j);
          const int64_t n = std::min(VS, H - j);  // a row holds H values, not Hp (none left: n <= 0)
          if (n > 0) {
            cpu::store_any(h_row + j, hv, n);
            cpu::store_any(o_row + j, hv, n);
          }
        }
        r[sh.off_rstd] = rstd_a, r[sh.off_rstd + 1] = rstd_c;
        if (!(t < len[b])) {  // past the sequence's end: keep the state, output zeros
          for (int64_t j = 0; j < H; ++j) {
            const float h_old = h[b * H + j];
            h_row[j] = h_old;
            r[sh.off_h + j] = h_old;
            o_row[j] = static_cast<T>(0.f);
          }
          std::copy(c_old, c_old + Hp, c_new);
          std::copy(c_old, c_old + Hp, r + sh.off_c);
        }
      }
    });
    std::swap(h, h_next);
    std::swap(c, c_next);
  }
  T* hn = h_n.data_ptr<T>();
  T* cn = c_n.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < H; ++j) {
      hn[b * H + j] = static_cast<T>(h[b * H + j]);
      cn[b * H + j] = static_cast<T>(c[b * Hp + j]);
    }
}

// ---- backward -------------------------------------------------------------------------------
// Fills d_pre [T, B, 4Hp] (the gradient of the gate pre-activations = of xw), d_a [T, B, 4Hp] (of
// the recurrent GEMM's output a), d_n [T, B, Hp] (of ln_c's output), and dh0, dc0 [B, H].
template <typename T>
void backward(const Shape& sh, const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
              const at::Tensor& w_hh, const std::optional<at::Tensor>& gamma_h,
              const std::optional<at::Tensor>& gamma_c, const at::Tensor& c0, const std::vector<int64_t>& len,
              bool reverse, const at::Tensor& ws,
              at::Tensor& d_pre, at::Tensor& d_a, at::Tensor& d_n, at::Tensor& dh0, at::Tensor& dc0) {
  const int64_t B = sh.B, H = sh.H, Hp = sh.Hp, GHp = sh.GHp, Hc = sh.Hc;
  // W_hh as the B operand of dh_prev = da [B, 4Hp] W [4Hp, Hc]: panels of kPanel columns, [4Hp, kPanel] each
  const int64_t panels = Hc / kPanel;
  cpu::LineVector<float> wp(panels * GHp * kPanel, 0.f);
  const T* w = w_hh.const_data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t j = 0; j < H; ++j)
          for (int64_t u = 0; u < kPanel && p * kPanel + u < H; ++u)
            wp[(p * GHp + g * Hp + j) * kPanel + u] = static_cast<float>(w[(g * H + j) * H + p * kPanel + u]);
  });
  const auto gh = padded_param<T>(gamma_h, 4, H, Hp, 1.f), gc = padded_param<T>(gamma_c, 1, H, Hp, 1.f);
  cpu::LineVector<float> dh(B * Hc, 0.f), dh_next(B * Hc, 0.f), dc(B * Hp, 0.f), dc_next(B * Hp, 0.f);
  cpu::LineVector<float> c_init(B * Hp, 0.f);
  for (int64_t b = 0; b < B; ++b) {
    to_float(grad_h_n.const_data_ptr<T>() + b * H, dh.data() + b * Hc, H);
    to_float(grad_c_n.const_data_ptr<T>() + b * H, dc.data() + b * Hp, H);
    to_float(c0.const_data_ptr<T>() + b * H, c_init.data() + b * Hp, H);
  }
  const T* go = grad_out.const_data_ptr<T>();
  const float* wsp = ws.const_data_ptr<float>();
  float *dpre_all = d_pre.data_ptr<float>(), *da_all = d_a.data_ptr<float>(), *dn_all = d_n.data_ptr<float>();
  const float inv_h = 1.f / static_cast<float>(H), inv_4h = 1.f / static_cast<float>(4 * H);
  for (int64_t step = sh.T - 1; step >= 0; --step) {
    const int64_t t = reverse ? sh.T - 1 - step : step;
    const int64_t prev = step == 0 ? -1 : (reverse ? t + 1 : t - 1);  // the step processed before t
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      cpu::LineVector<float> dht(Hp, 0.f), dchat(Hp);
      for (int64_t b = b0; b < b1; ++b) {
        const float* r = wsp + (t * B + b) * sh.width;
        const float* c_prev = prev >= 0 ? wsp + (prev * B + b) * sh.width + sh.off_c : c_init.data() + b * Hp;
        float* dpre = dpre_all + (t * B + b) * GHp;
        float* da = da_all + (t * B + b) * GHp;
        float* dn = dn_all + (t * B + b) * Hp;
        if (!(t < len[b])) {  // an inactive step: no gradient of its own; dh and dc pass through
          std::fill(dpre, dpre + GHp, 0.f), std::fill(da, da + GHp, 0.f), std::fill(dn, dn + Hp, 0.f);
          std::copy(dc.data() + b * Hp, dc.data() + (b + 1) * Hp, dc_next.data() + b * Hp);
          continue;
        }
        for (int64_t j = 0; j < H; j += VS) {  // (a partial last vector leaves zeros in dht's padding)
          const int64_t n = std::min(VS, H - j);
          (cpu::load_any(dh.data() + b * Hc + j, n) + cpu::load_any(go + (t * B + b) * H + j, n)).store(dht.data() + j);
        }
        // h' = o tanh(n), n = gamma_c chat + beta_c: the output gate and ln_c's gradients
        fVec s1(0.f), s2(0.f);
        for (int64_t j = 0; j < Hp; j += VS) {
          const fVec d = fVec::loadu(dht.data() + j), og = fVec::loadu(r + 3 * Hp + j);
          const fVec tn = fVec::loadu(r + sh.off_tn + j), chat = fVec::loadu(r + sh.off_chat + j);
          (d * tn * og * (fVec(1.f) - og)).store(dpre + 3 * Hp + j);
          const fVec dnj = d * og * (fVec(1.f) - tn * tn);
          dnj.store(dn + j);
          const fVec dch = dnj * fVec::loadu(gc.data() + j);
          dch.store(dchat.data() + j);
          s1 = s1 + dch;
          s2 = at::vec::fmadd(dch, chat, s2);
        }
        const fVec m1(hsum(s1) * inv_h), m2(hsum(s2) * inv_h), rs_c(r[sh.off_rstd + 1]);
        // through ln_c into c', then the cell update into i, f, g and the previous cell
        for (int64_t j = 0; j < Hp; j += VS) {
          const fVec chat = fVec::loadu(r + sh.off_chat + j);
          const fVec dct = fVec::loadu(dc.data() + b * Hp + j) +
                           rs_c * (fVec::loadu(dchat.data() + j) - m1 - chat * m2);
          const fVec i = fVec::loadu(r + j), f = fVec::loadu(r + Hp + j), g = fVec::loadu(r + 2 * Hp + j);
          (dct * g * i * (fVec(1.f) - i)).store(dpre + j);
          (dct * fVec::loadu(c_prev + j) * f * (fVec(1.f) - f)).store(dpre + Hp + j);
          (dct * i * (fVec(1.f) - g * g)).store(dpre + 2 * Hp + j);
          (dct * f).store(dc_next.data() + b * Hp + j);
        }
        std::fill(dc_next.data() + b * Hp + H, dc_next.data() + (b + 1) * Hp, 0.f);
        // padded lanes of every gate to zero: they must not reach the statistics or the GEMM
        for (int64_t g = 0; g < 4; ++g) std::fill(dpre + g * Hp + H, dpre + (g + 1) * Hp, 0.f);
        // through ln_hh into a = h W_hh^T
        fVec t1(0.f), t2(0.f);
        for (int64_t n = 0; n < GHp; n += VS) {
          const fVec dah = fVec::loadu(dpre + n) * fVec::loadu(gh.data() + n);
          t1 = t1 + dah;
          t2 = at::vec::fmadd(dah, fVec::loadu(r + sh.off_ahat + n), t2);
        }
        const fVec n1(hsum(t1) * inv_4h), n2(hsum(t2) * inv_4h), rs_a(r[sh.off_rstd]);
        // padded lanes of da stay zero: they must not reach the GEMMs (a vector never spans two gates:
        // Hp is a multiple of the vector width)
        for (int64_t n = 0; n < GHp; n += VS) {
          const fVec dah = fVec::loadu(dpre + n) * fVec::loadu(gh.data() + n);
          const fVec v = rs_a * (dah - n1 - fVec::loadu(r + sh.off_ahat + n) * n2);
          const int64_t valid = std::clamp<int64_t>(H - n % Hp, 0, VS);
          (valid == VS ? v : fVec::set(fVec(0.f), v, valid)).store(da + n);
        }
      }
    });
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        small_gemm(B, kPanel, GHp, da_all + t * B * GHp, GHp, 1, wp.data() + p * GHp * kPanel, kPanel,
                   dh_next.data() + p * kPanel, Hc, 1.f, false);
    });
    for (int64_t b = 0; b < B; ++b)
      if (!(t < len[b])) std::copy(dh.data() + b * Hc, dh.data() + (b + 1) * Hc, dh_next.data() + b * Hc);
    std::swap(dh, dh_next);
    std::swap(dc, dc_next);
  }
  float *dh0p = dh0.data_ptr<float>(), *dc0p = dc0.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < H; ++j) {
      dh0p[b * H + j] = dh[b * Hc + j];
      dc0p[b * H + j] = dc[b * Hp + j];
    }
}

// The LayerNorms' scale and shift gradients, sums over every (step, row) r of
//   d_gamma_h = sum d_pre[r] * ahat[r], d_beta_h = sum d_pre[r]  (4Hp lanes),
//   d_gamma_c = sum d_n[r] * chat[r],   d_beta_c = sum d_n[r]    (Hp lanes),
// in one pass over the padded buffers and the workspace (no [TB, 4H] temporaries: their fresh pages
// were ~6% of a B32 forward+backward). Rows are cut into fixed chunks (a function of the row count
// alone) whose partial sums are added in chunk order: the result does not depend on the threads.
// Returns [10 Hp] float32: d_gamma_h, d_beta_h (4Hp each), d_gamma_c, d_beta_c (Hp each).
at::Tensor ln_param_grads(const Shape& sh, const float* d_pre, const float* d_n, const float* ws) {
  const int64_t rows = sh.T * sh.B, GHp = sh.GHp, Hp = sh.Hp, W = 2 * GHp + 2 * Hp;
  constexpr int64_t kChunkRows = 64;
  const int64_t chunks = std::max<int64_t>(1, (rows + kChunkRows - 1) / kChunkRows);
  cpu::LineVector<float> partial(chunks * W, 0.f);
  // sum_dx[i] += d[i] * x[i], sum_d[i] += d[i] for i < n
  auto accumulate = [](int64_t n, const float* d, const float* x, float* sum_dx, float* sum_d) {
    for (int64_t i = 0; i < n; i += VS) {
      const fVec dv = fVec::loadu(d + i);
      at::vec::fmadd(dv, fVec::loadu(x + i), fVec::loadu(sum_dx + i)).store(sum_dx + i);
      (fVec::loadu(sum_d + i) + dv).store(sum_d + i);
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      float* acc = partial.data() + ch * W;
      for (int64_t r = ch * kChunkRows; r < std::min(rows, (ch + 1) * kChunkRows); ++r) {
        const float* wr = ws + r * sh.width;
        accumulate(GHp, d_pre + r * GHp, wr + sh.off_ahat, acc, acc + GHp);
        accumulate(Hp, d_n + r * Hp, wr + sh.off_chat, acc + 2 * GHp, acc + 2 * GHp + Hp);
      }
    }
  });
  at::Tensor out = at::empty({W}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  std::copy(partial.begin(), partial.begin() + W, o);
  for (int64_t ch = 1; ch < chunks; ++ch)
    for (int64_t i = 0; i < W; ++i) o[i] += partial[ch * W + i];
  return out;
}

// [T, B, 4Hp] (or [.., Hp]) padded fp32 -> [T * B, 4H] (or [.., H]): the real lanes of each gate.
at::Tensor unpad(const at::Tensor& t, int64_t gates, int64_t H) {
  const int64_t rows = t.size(0) * t.size(1), Hp = t.size(2) / gates;
  return t.view({rows, gates, Hp}).narrow(2, 0, H).reshape({rows, gates * H}).contiguous();
}

}  // namespace

std::vector<at::Tensor> layer_norm_lstm_fwd_cpu(const at::Tensor& xw, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& gamma_h,
                                                const std::optional<at::Tensor>& beta_h,
                                                const std::optional<at::Tensor>& gamma_c,
                                                const std::optional<at::Tensor>& beta_c, const at::Tensor& h0,
                                                const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                                double eps, bool reverse, bool save_workspace) {
  const Shape sh(xw, w_hh);
  const auto len = cpu::lengths_of(lengths, sh.B, sh.T);
  TORCH_CHECK(xw.is_contiguous() && w_hh.is_contiguous() && h0.is_contiguous() && c0.is_contiguous(),
              "layer_norm_lstm: operands must be contiguous");
  TORCH_CHECK(h0.size(0) == sh.B && h0.size(1) == sh.H && c0.sizes() == h0.sizes(),
              "layer_norm_lstm: h0 and c0 must be [B, H]");
  at::Tensor out = cpu::cached_empty({sh.T, sh.B, sh.H}, xw.options());
  at::Tensor h_n = at::empty({sh.B, sh.H}, xw.options()), c_n = at::empty({sh.B, sh.H}, xw.options());
  const std::vector<int64_t> ws_shape = save_workspace ? std::vector<int64_t>{sh.T, sh.B, sh.width}
                                                       : std::vector<int64_t>{0};
  at::Tensor ws = cpu::cached_empty(ws_shape, xw.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(xw.scalar_type(), "layer_norm_lstm_fwd_cpu", [&] {
    forward<scalar_t>(sh, xw, w_hh, gamma_h, beta_h, gamma_c, beta_c, h0, c0, static_cast<float>(eps), len, reverse,
                      out, h_n, c_n, ws, save_workspace);
  });
  return {out, h_n, c_n, ws};
}

std::vector<at::Tensor> layer_norm_lstm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                                const at::Tensor& grad_c_n, const at::Tensor& xw,
                                                const at::Tensor& w_hh, const std::optional<at::Tensor>& gamma_h,
                                                const std::optional<at::Tensor>& beta_h,
                                                const std::optional<at::Tensor>& gamma_c,
                                                const std::optional<at::Tensor>& beta_c, const at::Tensor& h0,
                                                const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                                const at::Tensor& workspace, double eps, bool reverse) {
  const Shape sh(xw, w_hh);
  const auto len = cpu::lengths_of(lengths, sh.B, sh.T);
  (void)eps;  // the saved rstd already holds it
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 3 && workspace.size(0) == sh.T &&
                  workspace.size(1) == sh.B && workspace.size(2) == sh.width,
              "layer_norm_lstm: the workspace does not come from the cpu forward of this layer");
  const auto f32 = xw.options().dtype(at::kFloat);
  at::Tensor d_pre = cpu::cached_empty({sh.T, sh.B, sh.GHp}, f32), d_a = cpu::cached_empty({sh.T, sh.B, sh.GHp}, f32);
  at::Tensor d_n = cpu::cached_empty({sh.T, sh.B, sh.Hp}, f32);
  at::Tensor dh0 = at::empty({sh.B, sh.H}, f32), dc0 = at::empty({sh.B, sh.H}, f32);
  BIGNLP_DISPATCH_FLOAT_BF16(xw.scalar_type(), "layer_norm_lstm_bwd_cpu", [&] {
    backward<scalar_t>(sh, grad_out.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), w_hh, gamma_h,
                       gamma_c, c0, len, reverse, workspace, d_pre, d_a, d_n, dh0, dc0);
  });
  // dW_hh = da^T [4H, TB] H_prev [TB, H]
  at::Tensor h_prev = cpu::states_before_each_step(workspace.narrow(2, sh.off_h, sh.H), h0, reverse);
  at::Tensor d_w_hh = cpu::gemm_tn(unpad(d_a, 4, sh.H), h_prev);
  // the LayerNorms' scales and shifts: sums over every (step, row), in a fixed order
  const at::Tensor sums =
      ln_param_grads(sh, d_pre.const_data_ptr<float>(), d_n.const_data_ptr<float>(), workspace.const_data_ptr<float>());
  auto param_grad = [&](const std::optional<at::Tensor>& p, int64_t offset, int64_t gates) {  // [gates * H]
    if (!p.has_value()) return at::empty({0}, xw.options());
    const at::Tensor padded = sums.narrow(0, offset, gates * sh.Hp).view({1, 1, gates * sh.Hp});
    // a copy: views of one buffer would alias each other (custom ops' outputs may not)
    return unpad(padded, gates, sh.H).view({gates * sh.H}).to(p->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  at::Tensor dpre = unpad(d_pre, 4, sh.H);
  return {dpre.view({sh.T, sh.B, 4 * sh.H}).to(xw.scalar_type()),
          d_w_hh.to(w_hh.scalar_type()),
          param_grad(gamma_h, 0, 4),
          param_grad(beta_h, sh.GHp, 4),
          param_grad(gamma_c, 2 * sh.GHp, 1),
          param_grad(beta_c, 2 * sh.GHp + sh.Hp, 1),
          dh0.to(h0.scalar_type()),
          dc0.to(c0.scalar_type())};
}

}  // namespace bignlp_fast

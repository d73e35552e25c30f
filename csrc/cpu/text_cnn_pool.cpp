// text_cnn_pool on the CPU: the TextCNN block (conv1d of several widths over [B, L, E] token
// embeddings, bias, activation, max over each sequence's valid positions) without the [B, C, L] maps.
//
// Forward. For sequence b and width k, the window at position p is x[b, p:p+k, :], k*E contiguous
// numbers: the convolution over the sequence's valid positions is one GEMM whose A operand is x
// itself with row stride E (no unfolding), against W^T packed once per call as [k*E, C] (padded to
// the vector width). It runs in tiles of kTileP positions (cpu::small_gemm); each tile's bias,
// activation and running max (with the first position of each maximum) are applied while the tile
// is in L1, so only [B, C] numbers are written. Positions past a sequence's length are never
// computed. Tasks are (sequence, width) pairs of very different cost (lengths vary): they are
// assigned longest first to the least loaded thread, a balanced and deterministic schedule.
//
// Backward. Each output depends on one window and one channel: with gp = grad * act'(pre at the max),
// grad_w[c] += gp[b, c] * window(b, c) (k*E numbers), grad_x[b, window] += gp[b, c] * W[c]. Parallel
// over channels for grad_w and over sequences for grad_x, each summing in a fixed order.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/activation.h"
#include "cpu/common.h"
#include "cpu/gemm.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

constexpr int64_t kTileP = 48;  // positions per GEMM tile: a multiple of the micro-kernel's rows (6 and 8)

struct Width {
  int64_t C, Cp, k, offset;  // channels, channels padded to the vector width, kernel width, column in out
};

void check(const at::Tensor& x, const std::vector<at::Tensor>& weights,
           const std::optional<std::vector<at::Tensor>>& biases, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(),
              "text_cnn_pool: x must be a contiguous [B, L, E] CPU tensor, got ", x.sizes());
  TORCH_CHECK(!weights.empty(), "text_cnn_pool: weights must hold at least one conv kernel");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 3 && w.size(1) == x.size(2) && w.size(2) >= 1 && w.scalar_type() == x.scalar_type(),
                "text_cnn_pool: weights[", i, "] must be [C, E=", x.size(2), ", k] of x's dtype, got ", w.sizes());
    if (biases) {
      TORCH_CHECK(biases->size() == weights.size() && (*biases)[i].dim() == 1 && (*biases)[i].size(0) == w.size(0) &&
                      (*biases)[i].scalar_type() == x.scalar_type(),
                  "text_cnn_pool: biases[", i, "] must be a [", w.size(0), "] vector of x's dtype");
    }
  }
  if (lengths) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == x.size(0) &&
                    lengths->is_contiguous(),
                "text_cnn_pool: lengths must be a contiguous int64 [B] tensor, got ", lengths->sizes());
    const int64_t* len = lengths->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < x.size(0); ++b)
      TORCH_CHECK(len[b] >= 0 && len[b] <= x.size(1), "text_cnn_pool: lengths must lie in [0, L=", x.size(1),
                  "], got ", len[b], " for sequence ", b);
  }
}

std::vector<Width> layout(const std::vector<at::Tensor>& weights) {
  std::vector<Width> widths;
  int64_t offset = 0;
  for (const at::Tensor& w : weights) {
    widths.push_back({w.size(0), cpu::round_up_to_vec(w.size(0)), w.size(2), offset});
    offset += w.size(0);
  }
  return widths;
}

int64_t seq_len(const int64_t* lengths, int64_t b, int64_t L) { return lengths ? lengths[b] : L; }

template <int A, typename T>
void forward(const T* x, const int64_t* lengths, int64_t B, int64_t L, int64_t E, const std::vector<Width>& widths,
             const std::vector<const float*>& wt, const std::vector<const float*>& bias, int64_t Ctot, T* out,
             int32_t* argmax, float* pre) {
  struct Task {
    int64_t b, i, cost;
  };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < static_cast<int64_t>(widths.size()); ++i)
      tasks.push_back({b, i, std::max<int64_t>(0, seq_len(lengths, b, L) - widths[i].k + 1) * widths[i].k});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& p, const Task& q) { return p.cost > q.cost; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<std::vector<Task>> bins(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Task& t : tasks) {
    const int64_t j = std::min_element(load.begin(), load.end()) - load.begin();
    bins[j].push_back(t);
    load[j] += t.cost + 1;
  }
  int64_t Cp_max = 0;
  for (const Width& w : widths) Cp_max = std::max(Cp_max, w.Cp);

  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    cpu::LineVector<float> xf, tile(kTileP * Cp_max), best(Cp_max), bidx(Cp_max), bpre(Cp_max);
    for (int64_t th = t0; th < t1; ++th) {
      for (const Task& task : bins[th]) {
        const Width& w = widths[task.i];
        const int64_t len = seq_len(lengths, task.b, L), P = len - w.k + 1;
        const int64_t o = task.b * Ctot + w.offset;
        if (P <= 0) {  // no window: 0, no position, zero gradient
          for (int64_t c = 0; c < w.C; ++c) out[o + c] = T(0.f), argmax[o + c] = -1, pre[o + c] = 0.f;
          continue;
        }
        const float* xb;
        if constexpr (std::is_same_v<T, float>) {
          xb = x + task.b * L * E;
        } else {
          xf.resize(len * E);
          cpu::to_float(x + task.b * L * E, xf.data(), len * E);
          xb = xf.data();
        }
        std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
        std::fill(bidx.begin(), bidx.end(), -1.f);
        std::fill(bpre.begin(), bpre.end(), 0.f);
        for (int64_t p0 = 0; p0 < P; p0 += kTileP) {
          const int64_t mt = std::min(kTileP, P - p0);
          // tile[r, c] = sum_{j, e} x[p0 + r + j, e] W[c, e, j]: A rows start E apart, K = k*E.
          cpu::small_gemm(mt, w.Cp, w.k * E, xb + p0 * E, E, 1, wt[task.i], w.Cp, tile.data(), w.Cp, 1.f, false);
          for (int64_t r = 0; r < mt; ++r) {
            const fVec pos(static_cast<float>(p0 + r));
            for (int64_t c = 0; c < w.Cp; c += fVec::size()) {
              const fVec v = fVec::loadu(tile.data() + r * w.Cp + c) + fVec::loadu(bias[task.i] + c);
              const fVec a = cpu::activate<A>(v), m = fVec::loadu(best.data() + c);
              // strict: the first position of equal maxima stays; a NaN wins once and stays (torch's
              // amax propagates it: without this a NaN was passed over, and an all-NaN row gave -inf)
              const fVec better = (a > m) | ((a != a) & (m == m));
              fVec::blendv(m, a, better).store(best.data() + c);
              fVec::blendv(fVec::loadu(bidx.data() + c), pos, better).store(bidx.data() + c);
              fVec::blendv(fVec::loadu(bpre.data() + c), v, better).store(bpre.data() + c);
            }
          }
        }
        for (int64_t c = 0; c < w.C; ++c) {
          out[o + c] = static_cast<T>(best[c]);
          argmax[o + c] = static_cast<int32_t>(bidx[c]);
          pre[o + c] = bpre[c];
        }
      }
    }
  });
}

// y[0:n] += a * x[0:n] (x of any dtype, y fp32)
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  const fVec av(a);
  for (int64_t i = 0; i < n; i += kStep) {
    fVec x0, x1, y0, y1;
    cpu::load2_any(x + i, n - i, x0, x1);
    cpu::load2_any(y + i, n - i, y0, y1);
    cpu::store2_any(y + i, n - i, at::vec::fmadd(av, x0, y0), at::vec::fmadd(av, x1, y1));
  }
}

}  // namespace

std::vector<at::Tensor> text_cnn_pool_fwd_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                              const std::optional<std::vector<at::Tensor>>& biases,
                                              const std::optional<at::Tensor>& lengths, int64_t activation) {
  check(x, weights, biases, lengths);
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  const std::vector<Width> widths = layout(weights);
  const int64_t Ctot = widths.back().offset + widths.back().C;
  // W^T as fp32 [k*E, Cp] (row j*E + e holds W[:, e, j]) and the bias as fp32 [Cp], zero-padded.
  std::vector<at::Tensor> packed;
  std::vector<const float*> wt, bias;
  for (size_t i = 0; i < weights.size(); ++i) {
    const Width& w = widths[i];
    at::Tensor p = weights[i].to(at::kFloat).permute({2, 1, 0}).reshape({w.k * E, w.C});
    packed.push_back(at::constant_pad_nd(p, {0, w.Cp - w.C}).contiguous());
    at::Tensor b = biases ? (*biases)[i].to(at::kFloat) : at::zeros({w.C}, x.options().dtype(at::kFloat));
    packed.push_back(at::constant_pad_nd(b, {0, w.Cp - w.C}).contiguous());
    wt.push_back(packed[packed.size() - 2].const_data_ptr<float>());
    bias.push_back(packed.back().const_data_ptr<float>());
  }
  at::Tensor out = at::empty({B, Ctot}, x.options());
  at::Tensor argmax = at::empty({B, Ctot}, x.options().dtype(at::kInt));
  at::Tensor pre = at::empty({B, Ctot}, x.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "text_cnn_pool_fwd_cpu", [&] {
    using T = scalar_t;
    cpu::dispatch_activation(activation, [&](auto act) {
      forward<decltype(act)::value, T>(x.const_data_ptr<T>(), lengths ? lengths->const_data_ptr<int64_t>() : nullptr,
                                       B, L, E, widths, wt, bias, Ctot, out.data_ptr<T>(), argmax.data_ptr<int32_t>(),
                                       pre.data_ptr<float>());
    });
  });
  return {out, argmax, pre};
}

std::vector<at::Tensor> text_cnn_pool_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                              const std::vector<at::Tensor>& weights,
                                              const std::optional<std::vector<at::Tensor>>& biases,
                                              const at::Tensor& argmax, const at::Tensor& pre, int64_t activation) {
  check(x, weights, biases, std::nullopt);
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  const std::vector<Width> widths = layout(weights);
  const int64_t Ctot = widths.back().offset + widths.back().C;
  TORCH_CHECK(grad_out.sizes() == argmax.sizes() && pre.sizes() == argmax.sizes() && argmax.size(0) == B &&
                  argmax.size(1) == Ctot && argmax.scalar_type() == at::kInt && pre.scalar_type() == at::kFloat,
              "text_cnn_pool: grad_out, argmax (int32) and pre (float32) must be [B, ", Ctot, "]");
  // gp = grad * act'(pre), 0 where there was no window
  at::Tensor gp = at::empty({B, Ctot}, x.options().dtype(at::kFloat));
  {
    const at::Tensor g = grad_out.to(at::kFloat).contiguous();
    const float *gptr = g.const_data_ptr<float>(), *pptr = pre.const_data_ptr<float>();
    const int32_t* iptr = argmax.const_data_ptr<int32_t>();
    float* out = gp.data_ptr<float>();
    cpu::dispatch_activation(activation, [&](auto act) {
      for (int64_t n = 0; n < B * Ctot; n += fVec::size()) {
        const int64_t m = B * Ctot - n;
        cpu::store_any(out + n, cpu::load_any(gptr + n, m) *
                                    cpu::activate_grad<decltype(act)::value>(cpu::load_any(pptr + n, m)), m);
      }
    });
    for (int64_t n = 0; n < B * Ctot; ++n)
      if (iptr[n] < 0) out[n] = 0.f;
  }
  std::vector<at::Tensor> grads(1 + weights.size() * (biases ? 2 : 1));
  at::Tensor gx = cpu::cached_empty_like(x);
  std::vector<at::Tensor> wk;  // W as fp32 [C, k, E]: the row block a window's gradient adds
  for (size_t i = 0; i < weights.size(); ++i) {
    wk.push_back(weights[i].to(at::kFloat).permute({0, 2, 1}).contiguous());
    grads[1 + i] = at::empty_like(weights[i]);
    if (biases) grads[1 + weights.size() + i] = gp.slice(1, widths[i].offset, widths[i].offset + widths[i].C)
                                                     .sum(0).to(x.scalar_type());
  }
  const float* g = gp.const_data_ptr<float>();
  const int32_t* idx = argmax.const_data_ptr<int32_t>();
  auto width_of = [&](int64_t cg) {
    int64_t i = 0;
    while (cg >= widths[i].offset + widths[i].C) ++i;
    return i;
  };
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "text_cnn_pool_bwd_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    // grad_w: per channel, the gp-weighted sum of its windows over the batch.
    at::parallel_for(0, Ctot, 1, [&](int64_t c0, int64_t c1) {
      cpu::LineVector<float> acc;
      for (int64_t cg = c0; cg < c1; ++cg) {
        const int64_t i = width_of(cg), k = widths[i].k, c = cg - widths[i].offset;
        acc.assign(k * E, 0.f);
        for (int64_t b = 0; b < B; ++b) {
          const float gv = g[b * Ctot + cg];
          if (gv != 0.f) axpy(gv, xp + (b * L + idx[b * Ctot + cg]) * E, acc.data(), k * E);
        }
        T* dw = grads[1 + i].data_ptr<T>() + c * E * k;  // [E, k]
        for (int64_t j = 0; j < k; ++j)
          for (int64_t e = 0; e < E; ++e) dw[e * k + j] = static_cast<T>(acc[j * E + e]);
      }
    });
    // grad_x: per sequence, every channel's W added at its window.
    T* gxp = gx.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      cpu::LineVector<float> acc;
      for (int64_t b = b0; b < b1; ++b) {
        acc.assign(L * E, 0.f);
        for (int64_t cg = 0; cg < Ctot; ++cg) {
          const float gv = g[b * Ctot + cg];
          if (gv == 0.f) continue;
          const int64_t i = width_of(cg), k = widths[i].k, c = cg - widths[i].offset;
          axpy(gv, wk[i].const_data_ptr<float>() + c * k * E, acc.data() + idx[b * Ctot + cg] * E, k * E);
        }
        cpu::from_float(acc.data(), gxp + b * L * E, L * E);
      }
    });
  });
  grads[0] = gx;
  return grads;
}

}  // namespace bignlp_fast

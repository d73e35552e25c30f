// distillation_loss on the CPU: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y),
// per row in two passes over the logits (maxima; sums of exponentials) and, when a gradient is
// needed, a third that writes d loss / d s from the exponentials the second kept in per-thread row
// buffers (3 V floats: in L2 for a BERT-sized vocabulary). The softmaxes never exist as tensors.
//
// With ms, mt the row maxima, Zs = sum exp((s - ms)/T), Zt = sum exp((t - mt)/T),
// A = sum exp((t - mt)/T) ((t - mt) - (s - ms))/T and Z1 = sum exp(s - ms):
//   KL = A / Zt - log Zt + log Zs,   CE = ms + log Z1 - s[y],
// (A taken about the maxima: as sum exp((t - mt)/T) (t - s)/T it had to lose mt/T - ms/T again, and at
// teacher logits of 1e5 the fp32 rounding of those terms was 1e-3 of the loss);
//   d/ds_i = kd * T / N * (exp((s_i - ms)/T)/Zs - exp((t_i - mt)/T)/Zt)
//            + (1 - alpha) / n_valid * (exp(s_i - ms)/Z1 - [i == y]).
// Rows run in parallel; the per-row losses are summed in row order (deterministic).
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {
using cpu::fVec;
}  // namespace

std::vector<at::Tensor> distillation_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels, double temperature,
                                                  double alpha, int64_t ignore_index, bool need_grad) {
  TORCH_CHECK(student.device().is_cpu() && student.dim() == 2 && student.is_contiguous(),
              "distillation_loss: student must be a contiguous [N, V] CPU tensor, got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous() &&
                  teacher.scalar_type() == student.scalar_type(),
              "distillation_loss: teacher must be contiguous and match student ", student.sizes(), ", got ",
              teacher.sizes());
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t* y = nullptr;
  int64_t n_valid = 0;
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == N &&
                    labels->is_contiguous(),
                "distillation_loss: labels must be a contiguous int64 [N] tensor");
    y = labels->const_data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r) {
      if (y[r] == ignore_index) continue;
      TORCH_CHECK(y[r] >= 0 && y[r] < V, "distillation_loss: label ", y[r], " of row ", r, " is outside [0, ", V, ")");
      ++n_valid;
    }
  }
  const float T = static_cast<float>(temperature), inv_T = 1.f / T;
  const float kd = labels ? static_cast<float>(alpha) : 1.f;
  const float ce_w = labels ? static_cast<float>(1.0 - alpha) : 0.f;
  const float kd_grad = kd * T / static_cast<float>(std::max<int64_t>(N, 1));
  const float ce_grad = ce_w / static_cast<float>(std::max<int64_t>(n_valid, 1));
  at::Tensor grad = need_grad ? cpu::cached_empty_like(student) : at::empty({0}, student.options());
  cpu::LineVector<float> kl_rows(N), ce_rows(N, 0.f);
  BIGNLP_DISPATCH_FLOAT_BF16(student.scalar_type(), "distillation_loss_fwd_cpu", [&] {
    using T_ = scalar_t;
    const T_* sp = student.const_data_ptr<T_>();
    const T_* tp = teacher.const_data_ptr<T_>();
    T_* gp = need_grad ? grad.data_ptr<T_>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      cpu::LineVector<float> s(V), t(V), e(gp ? V : 0);
      constexpr int64_t VS = fVec::size();
      const float neg_inf = -std::numeric_limits<float>::infinity();
      for (int64_t r = r0; r < r1; ++r) {
        cpu::to_float(sp + r * V, s.data(), V);
        cpu::to_float(tp + r * V, t.data(), V);
        // pass 1: maxima (lanes past V hold -inf)
        fVec vms(neg_inf), vmt(neg_inf);
        for (int64_t i = 0; i < V; i += VS) {
          const int64_t n = V - i;
          vms = at::vec::maximum(vms, n >= VS ? fVec::loadu(s.data() + i) : fVec::set(fVec(neg_inf), fVec::loadu(s.data() + i, n), n));
          vmt = at::vec::maximum(vmt, n >= VS ? fVec::loadu(t.data() + i) : fVec::set(fVec(neg_inf), fVec::loadu(t.data() + i, n), n));
        }
        const float ms = cpu::hmax(vms), mt = cpu::hmax(vmt);
        // pass 2: sums of exponentials (lanes past V load 0 and are masked out of every sum). With a
        // gradient to write, the three exponentials are kept (over s and t, which pass 3 no longer
        // needs, and e): pass 3 then takes no exponential, half of the forward+backward's six per logit
        const bool valid = y != nullptr && y[r] != ignore_index;
        const float s_label = valid ? s[y[r]] : 0.f;
        fVec zs(0.f), zt(0.f), z1(0.f), a(0.f);
        const fVec vinv(inv_T), vms_(ms), vmt_(mt);
        for (int64_t i = 0; i < V; i += VS) {
          const int64_t n = V - i;
          const fVec sv = cpu::load_any(s.data() + i, n), tv = cpu::load_any(t.data() + i, n);
          fVec es = ((sv - vms_) * vinv).exp_u20(), et = ((tv - vmt_) * vinv).exp_u20(), e1 = (sv - vms_).exp_u20();
          fVec d = ((tv - vmt_) - (sv - vms_)) * vinv;
          if (n < VS) {
            const fVec zero(0.f);
            es = fVec::set(zero, es, n), et = fVec::set(zero, et, n), e1 = fVec::set(zero, e1, n), d = fVec::set(zero, d, n);
          }
          zs = zs + es, zt = zt + et, z1 = z1 + e1, a = at::vec::fmadd(et, d, a);
          if (gp) {
            cpu::store_any(s.data() + i, es, n);
            cpu::store_any(t.data() + i, et, n);
            cpu::store_any(e.data() + i, e1, n);
          }
        }
        const float Zs = cpu::hsum(zs), Zt = cpu::hsum(zt), Z1 = cpu::hsum(z1), A = cpu::hsum(a);
        kl_rows[r] = A / Zt - std::log(Zt) + std::log(Zs);
        if (valid) ce_rows[r] = ms + std::log(Z1) - s_label;
        if (!gp) continue;
        // pass 3: the gradient, from the kept exponentials, into s
        const fVec cs(kd_grad / Zs), ct(kd_grad / Zt), c1(valid ? ce_grad / Z1 : 0.f);
        for (int64_t i = 0; i < V; i += VS) {
          const int64_t n = V - i;
          const fVec g = cs * cpu::load_any(s.data() + i, n) - ct * cpu::load_any(t.data() + i, n) +
                         c1 * cpu::load_any(e.data() + i, n);
          cpu::store_any(s.data() + i, g, n);
        }
        if (valid) s[y[r]] -= ce_grad;
        cpu::from_float(s.data(), gp + r * V, V);
      }
    });
  });
  double kl = 0.0, ce = 0.0;
  for (int64_t r = 0; r < N; ++r) kl += kl_rows[r], ce += ce_rows[r];
  const double loss = kd * temperature * temperature * kl / std::max<int64_t>(N, 1) +
                      ce_w * ce / std::max<int64_t>(n_valid, 1);
  return {at::scalar_tensor(loss, student.options().dtype(at::kFloat)), grad};
}

}  // namespace bignlp_fast

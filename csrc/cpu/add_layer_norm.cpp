// add_layer_norm on the CPU: out = LayerNorm(x + residual), residual_out = x + residual.
//
// One row at a time per thread, all math in fp32 (the sum is rounded to the input dtype before it
// is normalised, as eager PyTorch does and as the backward needs). Forward moves the minimum: it reads x and
// residual once and writes out and residual_out once; the row's fp32 sum lives in a thread-local
// scratch row (L1/L2) between the passes over it. Backward reads grad_out, grad_residual_out and s
// once and writes grad_s once; the weight and bias gradients are summed per fixed chunk of rows and
// then over chunks in order, so they are deterministic. Outputs larger than any cache share are
// written with streaming stores (cpu/common.h: stream_ok), which skip the read of each line a
// normal store makes.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include "cpu/common.h"
#include "ops.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::kStep;

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(),
              "add_layer_norm: ", name, " must be a contiguous 2-D CPU tensor, got shape ", t.sizes(),
              " on ", t.device());
}

void check_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == x.size(-1) && t->is_contiguous(),
              "add_layer_norm: ", name, " must be a contiguous CPU vector of size ", x.size(-1), ", got shape ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "add_layer_norm: ", name, " has dtype ", t->scalar_type(),
              " but x has ", x.scalar_type());
}

// Rows [r0, r1) of the forward (fwd_rows): a function of its own so that every pointer and size is a
// local value (see bwd_chunks).
template <typename T>
void fwd_block(int64_t r0, int64_t r1, const T* x, const T* res, const float* w, const float* b, T* out, T* res_out,
               float* mean_out, float* rstd_out, int64_t H, float eps, bool stream_out, bool stream_res) {
  const int64_t Hp = cpu::round_up_to_step(H);
  cpu::LineVector<float> row(Hp);  // fp32 s for the current row
  float* s = row.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    fVec acc0(0.f), acc1(0.f);
    for (int64_t j = 0; j < H; j += kStep) {  // pass 1: s = x + residual, sum(s)
      fVec a, c;
      cpu::load2_any(xr + j, H - j, a, c);
      if (res) {
        fVec ra, rc;
        cpu::load2_any(res + r * H + j, H - j, ra, rc);
        a = a + ra;
        c = c + rc;
        // normalise the s that is stored, and that the backward sees
        cpu::store2_rounded(res_out + r * H + j, H - j, a, c, stream_res);
      }
      cpu::store2(s + j, a, c);
      acc0 = acc0 + a;
      acc1 = acc1 + c;
    }
    const float mean = cpu::hsum(acc0 + acc1) / H;
    const fVec vmean(mean);
    acc0 = fVec(0.f);
    acc1 = fVec(0.f);
    for (int64_t j = 0; j < H; j += kStep) {  // pass 2: centred variance; padding lanes masked out
      const int64_t n = std::min(kStep, H - j);
      fVec da = fVec::loadu(s + j) - vmean, dc = fVec::loadu(s + j + fVec::size()) - vmean;
      if (n < kStep) {
        da = fVec::set(fVec(0.f), da, std::min<int64_t>(n, fVec::size()));
        dc = fVec::set(fVec(0.f), dc, std::max<int64_t>(0, n - fVec::size()));
      }
      acc0 = at::vec::fmadd(da, da, acc0);
      acc1 = at::vec::fmadd(dc, dc, acc1);
    }
    const float var = cpu::hsum(acc0 + acc1) / H;
    const float rstd = 1.f / std::sqrt(var + eps);
    mean_out[r] = mean;
    rstd_out[r] = rstd;
    const fVec vrstd(rstd);
    const bool prefetch_next = r + 1 < r1;
    for (int64_t j = 0; j < H; j += kStep) {  // pass 3: normalise, scale, shift
      const int64_t h = fVec::size();
      if (prefetch_next) {
        cpu::prefetch_step(xr + H + j);
        if (res) cpu::prefetch_step(res + (r + 1) * H + j);
      }
      fVec a = (fVec::loadu(s + j) - vmean) * vrstd, c = (fVec::loadu(s + j + h) - vmean) * vrstd;
      a = at::vec::fmadd(a, fVec::loadu(w + j), fVec::loadu(b + j));
      c = at::vec::fmadd(c, fVec::loadu(w + j + h), fVec::loadu(b + j + h));
      cpu::store2_maybe_stream(out + r * H + j, H - j, a, c, stream_out);
    }
  }
  cpu::stream_fence();
}

template <typename T>
void fwd_rows(const T* x, const T* res, const float* w, const float* b, T* out, T* res_out, float* mean_out,
              float* rstd_out, int64_t rows, int64_t H, float eps) {
  const int64_t Hp = cpu::round_up_to_step(H);
  const int64_t grain = std::max<int64_t>(1, 16384 / Hp);
  const int64_t bytes = rows * H * static_cast<int64_t>(sizeof(T));
  const bool stream_out = cpu::stream_ok(out, H * sizeof(T), bytes);
  const bool stream_res = res_out && cpu::stream_ok(res_out, H * sizeof(T), bytes);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    fwd_block(r0, r1, x, res, w, b, out, res_out, mean_out, rstd_out, H, eps, stream_out, stream_res);
  });
}

// Chunks [c0, c1) of the backward (bwd_rows): a function of its own so that every pointer and size is
// a local value. Read through a lambda's captured references, each was loaded again after every
// vector store (the intrinsics' vector types may alias anything): two extra loads per pointer per
// step, and the backward took 28% longer in bfloat16 at 8192x768 (0.72 against 0.57 ms), 6% in fp32.
template <typename T>
void bwd_chunks(int64_t c0, int64_t c1, const T* dy, const T* dres, const T* s, const float* mean, const float* rstd,
                const float* w, T* ds, float* partial_dw, float* partial_db, int64_t rows, int64_t H, int64_t chunk,
                bool stream_ds) {
  const int64_t Hp = cpu::round_up_to_step(H);
  cpu::LineVector<float> scratch(2 * Hp);
  float* xhat_row = scratch.data();  // xhat of the current row
  float* g_row = xhat_row + Hp;      // grad_out * weight of the current row
  for (int64_t c = c0; c < c1; ++c) {
    float* pdw = partial_dw + c * Hp;  // this chunk's partial sums, zeroed here (in L1 just before use):
    float* pdb = partial_db + c * Hp;  // the caller's buffer is uninitialised
    std::fill(pdw, pdw + Hp, 0.f);
    std::fill(pdb, pdb + Hp, 0.f);
    for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
      const fVec vmean(mean[r]), vrstd(rstd[r]);
      fVec sg0(0.f), sg1(0.f), sgx0(0.f), sgx1(0.f);
      for (int64_t j = 0; j < H; j += kStep) {  // pass 1: xhat, g, their row sums, dw/db partials
        const int64_t h = fVec::size();
        fVec ya, yc, sa, sc;
        cpu::load2_any(dy + r * H + j, H - j, ya, yc);
        cpu::load2_any(s + r * H + j, H - j, sa, sc);
        const fVec xa = (sa - vmean) * vrstd, xc = (sc - vmean) * vrstd;
        const fVec ga = ya * fVec::loadu(w + j), gc = yc * fVec::loadu(w + j + h);
        xa.store(xhat_row + j);
        xc.store(xhat_row + j + h);
        ga.store(g_row + j);
        gc.store(g_row + j + h);
        sg0 = sg0 + ga;
        sg1 = sg1 + gc;
        sgx0 = at::vec::fmadd(ga, xa, sgx0);
        sgx1 = at::vec::fmadd(gc, xc, sgx1);
        at::vec::fmadd(ya, xa, fVec::loadu(pdw + j)).store(pdw + j);
        at::vec::fmadd(yc, xc, fVec::loadu(pdw + j + h)).store(pdw + j + h);
        (fVec::loadu(pdb + j) + ya).store(pdb + j);
        (fVec::loadu(pdb + j + h) + yc).store(pdb + j + h);
      }
      const fVec mg(cpu::hsum(sg0 + sg1) / H);
      const fVec mgx(cpu::hsum(sgx0 + sgx1) / H);
      const bool prefetch_next = r + 1 < std::min(rows, (c1) * chunk);
      for (int64_t j = 0; j < H; j += kStep) {  // pass 2: ds = rstd * (g - mean(g) - xhat * mean(g xhat))
        const int64_t h = fVec::size();
        if (prefetch_next) {
          cpu::prefetch_step(dy + (r + 1) * H + j);
          cpu::prefetch_step(s + (r + 1) * H + j);
          if (dres) cpu::prefetch_step(dres + (r + 1) * H + j);
        }
        fVec a = vrstd * (fVec::loadu(g_row + j) - mg - fVec::loadu(xhat_row + j) * mgx);
        fVec c = vrstd * (fVec::loadu(g_row + j + h) - mg - fVec::loadu(xhat_row + j + h) * mgx);
        if (dres) {
          fVec ra, rc;
          cpu::load2_any(dres + r * H + j, H - j, ra, rc);
          a = a + ra;
          c = c + rc;
        }
        cpu::store2_maybe_stream(ds + r * H + j, H - j, a, c, stream_ds);
      }
    }
  }
  cpu::stream_fence();
}

template <typename T>
void bwd_rows(const T* dy, const T* dres, const T* s, const float* mean, const float* rstd, const float* w,
              T* ds, float* partial_dw, float* partial_db, int64_t rows, int64_t H, int64_t chunk, int64_t n_chunks) {
  const bool stream_ds = cpu::stream_ok(ds, H * sizeof(T), rows * H * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    bwd_chunks(c0, c1, dy, dres, s, mean, rstd, w, ds, partial_dw, partial_db, rows, H, chunk, stream_ds);
  });
}

}  // namespace

std::vector<at::Tensor> add_layer_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, double eps) {
  // x [rows, H], or [..., H] (the op's eager lane passes a model's activations as they are: two views
  // in Python cost more than the kernel at one row); out and residual_out in x's shape
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) > 0 && x.is_contiguous(),
              "add_layer_norm: x must be a contiguous CPU tensor of at least one dimension, last one non-empty; "
              "got shape ", x.sizes(), " on ", x.device());
  if (residual) {
    TORCH_CHECK(residual->device().is_cpu() && residual->is_contiguous(),
                "add_layer_norm: residual must be a contiguous CPU tensor, got one on ", residual->device());
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "add_layer_norm: residual must match x (", x.sizes(), ", ", x.scalar_type(), "), got ",
                residual->sizes(), ", ", residual->scalar_type());
  }
  check_vector(weight, "weight", x);
  check_vector(bias, "bias", x);
  const int64_t H = x.size(-1), rows = x.numel() / H;
  const int64_t Hp = cpu::round_up_to_step(H);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = cpu::cached_empty_like(x);
  at::Tensor res_out = residual ? cpu::cached_empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, f32), rstd = at::empty({rows}, f32);
  at::Tensor wb = at::empty({2, Hp}, f32);  // fp32 weight and bias, padded to a whole step
  BIGNLP_DISPATCH_FLOAT_BF16(x.scalar_type(), "add_layer_norm_fwd_cpu", [&] {
    using T = scalar_t;
    float* w = wb.data_ptr<float>();
    cpu::to_padded_float(weight ? weight->const_data_ptr<T>() : nullptr, H, w, Hp, 1.f);
    cpu::to_padded_float(bias ? bias->const_data_ptr<T>() : nullptr, H, w + Hp, Hp, 0.f);
    fwd_rows<T>(x.const_data_ptr<T>(), residual ? residual->const_data_ptr<T>() : nullptr, w, w + Hp,
                out.data_ptr<T>(), residual ? res_out.data_ptr<T>() : nullptr, mean.data_ptr<float>(),
                rstd.data_ptr<float>(), rows, H, static_cast<float>(eps));
  });
  return {out, res_out, mean, rstd};
}

namespace {
// Whether the lane can read t as it is: a dense contiguous CPU tensor of x's dtype that autograd need not see.
bool lane_readable(const at::Tensor& t, at::ScalarType dtype, bool grad) {
  return cpu::lane_tensor(t, dtype, grad) && t.is_contiguous();
}
}  // namespace

std::vector<at::Tensor> add_layer_norm_lane_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps) {
  const at::ScalarType dtype = x.scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || x.dim() == 0 || x.size(-1) == 0 ||
      !lane_readable(x, dtype, grad) || !(eps >= 0)) {
    return {};
  }
  if (residual && !(lane_readable(*residual, dtype, grad) && residual->sizes() == x.sizes())) return {};
  for (const std::optional<at::Tensor>* v : {&weight, &bias}) {
    if (v->has_value() && !(lane_readable(**v, dtype, grad) && (*v)->dim() == 1 && (*v)->size(0) == x.size(-1))) {
      return {};
    }
  }
  return add_layer_norm_fwd_cpu(x, residual, weight, bias, eps);
}

std::vector<at::Tensor> add_layer_norm_bwd_cpu(const at::Tensor& grad_out,
                                               const std::optional<at::Tensor>& grad_residual_out,
                                               const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                                               const std::optional<at::Tensor>& weight, bool has_bias) {
  check_2d(grad_out, "grad_out");
  check_2d(s, "s");
  TORCH_CHECK(grad_out.sizes() == s.sizes() && grad_out.scalar_type() == s.scalar_type(),
              "add_layer_norm: grad_out must match the saved input (", s.sizes(), ", ", s.scalar_type(), ")");
  if (grad_residual_out) {
    check_2d(*grad_residual_out, "grad_residual_out");
    TORCH_CHECK(grad_residual_out->sizes() == s.sizes() && grad_residual_out->scalar_type() == s.scalar_type(),
                "add_layer_norm: grad_residual_out must match the saved input");
  }
  const int64_t rows = s.size(0), H = s.size(1);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows && mean.is_contiguous() && rstd.is_contiguous(),
              "add_layer_norm: mean and rstd must be contiguous float32 vectors of size ", rows);
  check_vector(weight, "weight", s);
  const int64_t Hp = cpu::round_up_to_step(H);
  const int64_t chunk = cpu::rows_per_chunk(rows);
  const int64_t n_chunks = std::max<int64_t>(1, (rows + chunk - 1) / chunk);
  auto f32 = s.options().dtype(at::kFloat);
  at::Tensor ds = cpu::cached_empty_like(s);
  // Uninitialised, each chunk zeroing its own rows (bwd_chunks): at::zeros was a separate pass over
  // fresh pages (glibc maps a buffer this size anew each call). The 1024 x 768 fp32 backward on a
  // Zen 4: 0.183-0.238 -> 0.170-0.196 ms (builds alternated, medians of 201 calls). n_chunks is at
  // least 1: an empty batch's one chunk zeroes its partial sums, so its gradients are 0.
  at::Tensor partial = cpu::cached_empty({2, n_chunks, Hp}, f32);
  at::Tensor w = at::empty({Hp}, f32);
  BIGNLP_DISPATCH_FLOAT_BF16(s.scalar_type(), "add_layer_norm_bwd_cpu", [&] {
    using T = scalar_t;
    cpu::to_padded_float(weight ? weight->const_data_ptr<T>() : nullptr, H, w.data_ptr<float>(), Hp, 1.f);
    bwd_rows<T>(grad_out.const_data_ptr<T>(), grad_residual_out ? grad_residual_out->const_data_ptr<T>() : nullptr,
                s.const_data_ptr<T>(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                w.const_data_ptr<float>(), ds.data_ptr<T>(), partial[0].data_ptr<float>(),
                partial[1].data_ptr<float>(), rows, H, chunk, n_chunks);
  });
  // Absent gradients are distinct empty tensors: a custom op's outputs may not alias each other.
  at::Tensor dw = weight ? cpu::reduce_partials(partial[0], H, s.scalar_type()) : at::empty({0}, s.options());
  at::Tensor db = has_bias ? cpu::reduce_partials(partial[1], H, s.scalar_type()) : at::empty({0}, s.options());
  return {ds, dw, db};
}

}  // namespace bignlp_fast

// One recurrent layer in one direction on CUDA (LSTM, GRU, RNN tanh / relu): rnn_fwd_cuda / rnn_bwd_cuda
// (see ops.h; the contract is stated in bignlp_fast/ops/rnn.py, whose rnn_{fwd,bwd}_torch is the
// specification, and the workspace has the CPU backend's layout: ops/rnn.py, workspace_width).
//
// The time loop runs inside the extension, on the host, per step:
//   forward:  hw = h W_hh^T (cuBLAS, through at::mm_out), then one fused kernel for the bias, every gate
//             nonlinearity, the state update, the length mask, the output and the workspace row; with an
//             LSTM projection, h = m W_hr^T (a second GEMM) and a small kernel that applies the mask;
//   backward: dh_total = dh + grad_out[t] on active rows (with a projection, dm = dh_total W_hr by a
//             GEMM), one fused kernel for all gate gradients and dc, then dh_prev = dG W_hh (a GEMM) and a
//             kernel that adds GRU's direct term and passes the gradient through inactive rows. The
//             weight gradients are large GEMMs over all steps at the end.
// The state, the gates and the GEMMs are fp32 whatever the input dtype (16-bit xw and outputs are read
// and written in their dtype): a [B, S] x [S, G*H] product per step is bound by latency, not by the
// tensor cores' rate, and fp32 keeps 16-bit layers at the accuracy of the fp32 reference.
//
// This file was written and compile-checked on a machine without a GPU; until its tests have passed on
// one, the automatic choice for CUDA tensors stays the triton kernel (ops/rnn.py) and backend="cuda"
// runs this one.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/activation.cuh"
#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;
enum Mode : int { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };

Mode parse_mode(const std::string& mode) {
  if (mode == "lstm") return kLstm;
  if (mode == "gru") return kGru;
  if (mode == "rnn_tanh") return kRnnTanh;
  TORCH_CHECK(mode == "rnn_relu", "rnn (cuda): mode must be lstm, gru, rnn_tanh or rnn_relu, got ", mode);
  return kRnnRelu;
}

// The gate nonlinearities are activation.cuh's act_sigmoid / act_tanh, accurate to a few ulp under
// --use_fast_math (which makes tanhf tanh.approx, about 11 bits, and 1 / (1 + __expf(-x)) an approximate
// exp and division).
__device__ __forceinline__ float sigmoid_f(float x) {
  float sig, unused;
  act_sigmoid(x, sig, unused);
  return sig;
}

// Sizes and the workspace layout (per step and batch row, fp32; as csrc/cpu/rnn.cpp):
//   [gates G*H after their nonlinearity | state S after the step | LSTM: cell after the step (H), m (H,
//    with a projection) ; GRU: h W_hn^T + b_hn (H)]
struct Dims {
  int T, B, G, H, S, width, off_state, off_c, off_m, off_hn;
  bool proj;
};

Dims dims_of(Mode mode, const at::Tensor& xw, const at::Tensor& w_hh, bool proj) {
  Dims d{};
  d.G = mode == kLstm ? 4 : mode == kGru ? 3 : 1;
  TORCH_CHECK(xw.dim() == 3 && xw.size(2) % d.G == 0 && w_hh.dim() == 2 && w_hh.size(0) == xw.size(2),
              "rnn (cuda): xw must be [T, B, G*H] and w_hh [G*H, S]");
  TORCH_CHECK(xw.numel() < (int64_t{1} << 31) && w_hh.numel() < (int64_t{1} << 31),
              "rnn (cuda): sizes past 2^31 elements");
  d.T = static_cast<int>(xw.size(0));
  d.B = static_cast<int>(xw.size(1));
  d.H = static_cast<int>(xw.size(2) / d.G);
  d.S = static_cast<int>(w_hh.size(1));
  d.proj = proj;
  TORCH_CHECK(proj || d.S == d.H, "rnn (cuda): without w_hr the state size must be the hidden size, got w_hh [",
              w_hh.size(0), ", ", d.S, "] for hidden size ", d.H);
  d.off_state = d.G * d.H;
  d.off_c = d.off_state + d.S;
  d.off_m = d.off_c + d.H;
  d.off_hn = d.off_c;
  d.width = d.off_state + d.S + (mode == kLstm ? d.H + (proj ? d.H : 0) : mode == kGru ? d.H : 0);
  return d;
}

__device__ __forceinline__ bool active_row(const int64_t* len, int b, int t) { return len == nullptr || t < len[b]; }

// ---- forward ----------------------------------------------------------------------------------
struct FwdStep {
  const void* xw;      // xw[t], [B, G*H] in T
  const float* hw;     // h W_hh^T, [B, G*H]
  const float* bias;   // b_hh [G*H] or null
  const float* h;      // the state before the step, [B, S]
  const float* c;      // LSTM cell before the step, [B, H]
  float* h_next;       // [B, S] (with a projection the projection kernel writes it)
  float* c_next;       // [B, H]
  float* m;            // [B, H]: LSTM with a projection, the input of W_hr
  void* out;           // out[t], [B, S] in T
  float* ws;           // this step's workspace rows [B, width] (scratch in inference)
  const int64_t* len;  // [B] on the device, or null
  int t;
};

// One thread per (row b, unit j < H): the gates of unit j, its update, output and workspace entries.
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) rnn_fwd_step_kernel(const FwdStep a, const Dims d) {
  const int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (idx >= int64_t{d.B} * d.H) return;
  const int b = static_cast<int>(idx / d.H), j = static_cast<int>(idx % d.H);
  const int GH = d.G * d.H;
  const T* x = static_cast<const T*>(a.xw) + int64_t{b} * GH;
  const float* hw = a.hw + int64_t{b} * GH;
  float* ws = a.ws + int64_t{b} * d.width;
  T* out = static_cast<T*>(a.out) + int64_t{b} * d.S;
  const bool active = active_row(a.len, b, a.t);
  auto pre = [&](int g) {
    return static_cast<float>(x[g * d.H + j]) + hw[g * d.H + j] + (a.bias ? a.bias[g * d.H + j] : 0.f);
  };
  const float h_old = MODE == kLstm && d.proj ? 0.f : a.h[int64_t{b} * d.S + j];
  float h_new;
  if constexpr (MODE == kLstm) {
    const float i = sigmoid_f(pre(0)), f = sigmoid_f(pre(1)), g = act_tanh(pre(2)), o = sigmoid_f(pre(3));
    const float c_old = a.c[int64_t{b} * d.H + j];
    const float cn = f * c_old + i * g;
    h_new = o * act_tanh(cn);
    ws[j] = i, ws[d.H + j] = f, ws[2 * d.H + j] = g, ws[3 * d.H + j] = o;
    const float c_kept = active ? cn : c_old;
    a.c_next[int64_t{b} * d.H + j] = c_kept;
    ws[d.off_c + j] = c_kept;
    if (d.proj) {  // h = m W_hr^T follows
      ws[d.off_m + j] = h_new;
      a.m[int64_t{b} * d.H + j] = h_new;
      return;
    }
  } else if constexpr (MODE == kGru) {
    const float r = sigmoid_f(pre(0)), z = sigmoid_f(pre(1));
    const float hn = hw[2 * d.H + j] + (a.bias ? a.bias[2 * d.H + j] : 0.f);
    const float n = act_tanh(static_cast<float>(x[2 * d.H + j]) + r * hn);
    h_new = (1.f - z) * n + z * h_old;
    ws[j] = r, ws[d.H + j] = z, ws[2 * d.H + j] = n, ws[d.off_hn + j] = hn;
  } else {
    const float v = pre(0);
    h_new = MODE == kRnnTanh ? act_tanh(v) : act<kActRelu>(v);  // relu: NaN stays NaN, as torch's
    ws[j] = h_new;
  }
  const float h_kept = active ? h_new : h_old;
  a.h_next[int64_t{b} * d.S + j] = h_kept;
  ws[d.off_state + j] = h_kept;
  out[j] = static_cast<T>(active ? h_new : 0.f);
}

// LSTM with a projection: hp = m W_hr^T is in; per (b, q < S) the masked state, output and workspace.
template <typename T>
__global__ void __launch_bounds__(kThreads) rnn_fwd_proj_kernel(const float* hp, const float* h, float* h_next,
                                                               void* out_t, float* ws, const int64_t* len, int t,
                                                               const Dims d) {
  const int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (idx >= int64_t{d.B} * d.S) return;
  const int b = static_cast<int>(idx / d.S), q = static_cast<int>(idx % d.S);
  const bool active = active_row(len, b, t);
  const float v = hp[idx], kept = active ? v : h[idx];
  h_next[idx] = kept;
  ws[int64_t{b} * d.width + d.off_state + q] = kept;
  static_cast<T*>(out_t)[idx] = static_cast<T>(active ? v : 0.f);
}

// ---- backward ---------------------------------------------------------------------------------
// dht = dh + grad_out[t] on active rows, 0 on inactive ones (their new state is unused).
template <typename T>
__global__ void __launch_bounds__(kThreads) rnn_bwd_dh_total_kernel(const float* dh, const void* go_t, float* dht,
                                                                   const int64_t* len, int t, const Dims d) {
  const int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (idx >= int64_t{d.B} * d.S) return;
  const int b = static_cast<int>(idx / d.S);
  dht[idx] = active_row(len, b, t) ? dh[idx] + static_cast<float>(static_cast<const T*>(go_t)[idx]) : 0.f;
}

struct BwdStep {
  const float* ws;       // this step's workspace rows
  const float* ws_prev;  // the previous step's (in walk order), or null: then h0 / c0
  const float* h0;       // [B, S] fp32
  const float* c0;       // [B, H] fp32 (LSTM)
  const float* dht;      // [B, S]: the new state's gradient (0 on inactive rows)
  const float* dm;       // [B, H]: LSTM with a projection, dht W_hr
  const float* dc;       // [B, H]
  float* dc_next;        // [B, H]
  float* dg;             // [B, G*H]: gradient of h W_hh^T + b_hh
  float* dx;             // [B, G*H]: gradient of xw (GRU; else dg)
  float* direct;         // [B, S]: GRU's direct term d * z of dh_prev
  const int64_t* len;
  int t;
};

template <int MODE>
__global__ void __launch_bounds__(kThreads) rnn_bwd_gates_kernel(const BwdStep a, const Dims d) {
  const int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (idx >= int64_t{d.B} * d.H) return;
  const int b = static_cast<int>(idx / d.H), j = static_cast<int>(idx % d.H);
  const int GH = d.G * d.H;
  const float* ws = a.ws + int64_t{b} * d.width;
  const float* wp = a.ws_prev ? a.ws_prev + int64_t{b} * d.width : nullptr;
  float* dg = a.dg + int64_t{b} * GH;
  const bool active = active_row(a.len, b, a.t);
  if constexpr (MODE == kLstm) {
    const float dc = a.dc[idx];
    if (!active) {
      for (int g = 0; g < 4; ++g) dg[g * d.H + j] = 0.f;
      a.dc_next[idx] = dc;
      return;
    }
    const float i = ws[j], f = ws[d.H + j], g = ws[2 * d.H + j], o = ws[3 * d.H + j];
    const float tc = act_tanh(ws[d.off_c + j]);
    const float c_prev = wp ? wp[d.off_c + j] : a.c0[idx];
    const float dmj = d.proj ? a.dm[idx] : a.dht[int64_t{b} * d.S + j];
    const float dct = dc + dmj * o * (1.f - tc * tc);
    dg[j] = dct * g * i * (1.f - i);
    dg[d.H + j] = dct * c_prev * f * (1.f - f);
    dg[2 * d.H + j] = dct * i * (1.f - g * g);
    dg[3 * d.H + j] = dmj * tc * o * (1.f - o);
    a.dc_next[idx] = dct * f;
  } else if constexpr (MODE == kGru) {
    float* dx = a.dx + int64_t{b} * GH;
    if (!active) {
      for (int g = 0; g < 3; ++g) dg[g * d.H + j] = dx[g * d.H + j] = 0.f;
      return;  // dh passes through (rnn_bwd_dh_prev_kernel)
    }
    const float r = ws[j], z = ws[d.H + j], n = ws[2 * d.H + j], hn = ws[d.off_hn + j];
    const float h_prev = wp ? wp[d.off_state + j] : a.h0[int64_t{b} * d.S + j];
    const float dv = a.dht[int64_t{b} * d.S + j];
    const float dn_pre = dv * (1.f - z) * (1.f - n * n);
    const float dr_pre = dn_pre * hn * r * (1.f - r);
    const float dz_pre = dv * (h_prev - n) * z * (1.f - z);
    dx[j] = dr_pre, dx[d.H + j] = dz_pre, dx[2 * d.H + j] = dn_pre;
    dg[j] = dr_pre, dg[d.H + j] = dz_pre, dg[2 * d.H + j] = dn_pre * r;
    a.direct[int64_t{b} * d.S + j] = dv * z;
  } else {
    const float hv = ws[j], dv = a.dht[int64_t{b} * d.S + j];  // 0 on inactive rows
    dg[j] = MODE == kRnnTanh ? dv * (1.f - hv * hv) : (hv > 0.f ? dv : 0.f);
  }
}

// dh_prev = dG W_hh (+ GRU's direct term) on active rows; inactive rows pass dh through.
__global__ void __launch_bounds__(kThreads) rnn_bwd_dh_prev_kernel(const float* mm, const float* direct,
                                                                  const float* dh, float* dh_next,
                                                                  const int64_t* len, int t, Dims d) {
  const int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (idx >= int64_t{d.B} * d.S) return;
  const int b = static_cast<int>(idx / d.S);
  dh_next[idx] = active_row(len, b, t) ? mm[idx] + (direct ? direct[idx] : 0.f) : dh[idx];
}

// ---- host side --------------------------------------------------------------------------------
unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

void check_operands(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0) {
  TORCH_CHECK(xw.is_cuda() && w_hh.device() == xw.device() && h0.device() == xw.device(),
              "rnn (cuda): xw, w_hh and h0 must be CUDA tensors on one device");
  TORCH_CHECK(xw.is_contiguous() && w_hh.is_contiguous() && h0.is_contiguous(), "rnn (cuda): operands must be contiguous");
}

std::optional<at::Tensor> device_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& xw, int B) {
  if (!lengths.has_value()) return std::nullopt;
  TORCH_CHECK(lengths->numel() == B, "rnn (cuda): lengths must have one entry per batch row");
  return lengths->to(xw.device(), at::kLong).contiguous();
}

const int64_t* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<int64_t>() : nullptr; }

at::Tensor fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

template <typename F>
void dispatch_mode(Mode mode, const F& f) {
  switch (mode) {
    case kLstm: f(std::integral_constant<int, kLstm>()); break;
    case kGru: f(std::integral_constant<int, kGru>()); break;
    case kRnnTanh: f(std::integral_constant<int, kRnnTanh>()); break;
    default: f(std::integral_constant<int, kRnnRelu>()); break;
  }
}

}  // namespace

std::vector<at::Tensor> rnn_fwd_cuda(const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                     const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                     const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                                     const std::string& mode_name, bool reverse, bool save_workspace) {
  const c10::cuda::CUDAGuard guard(xw.device());
  check_operands(xw, w_hh, h0);
  const Mode mode = parse_mode(mode_name);
  const Dims d = dims_of(mode, xw, w_hh, w_hr.has_value());
  TORCH_CHECK(h0.size(0) == d.B && h0.size(1) == d.S, "rnn (cuda): h0 must be [B, S]");
  TORCH_CHECK((mode == kLstm) == c0.has_value(), "rnn (cuda): c0 is given exactly for lstm");
  TORCH_CHECK(!c0.has_value() || (c0->dim() == 2 && c0->size(0) == d.B && c0->size(1) == d.H),
              "rnn (cuda): c0 must be [B, H]");
  TORCH_CHECK(!b_hh.has_value() || b_hh->numel() == int64_t{d.G} * d.H, "rnn (cuda): b_hh must have G*H elements");
  TORCH_CHECK(!w_hr.has_value() || (mode == kLstm && w_hr->size(0) == d.S && w_hr->size(1) == d.H),
              "rnn (cuda): w_hr must be [S, H], for lstm only");
  const auto len = device_lengths(lengths, xw, d.B);
  const auto f32 = xw.options().dtype(at::kFloat);
  const int64_t GH = int64_t{d.G} * d.H;
  at::Tensor out = at::empty({d.T, d.B, d.S}, xw.options());
  at::Tensor ws = at::empty({save_workspace ? d.T : 1, d.B, d.width}, f32);  // one step's scratch in inference
  at::Tensor w = fp32(w_hh), wr = w_hr.has_value() ? fp32(*w_hr) : at::Tensor();
  at::Tensor bias = b_hh.has_value() ? fp32(*b_hh) : at::Tensor();
  at::Tensor h = fp32(h0).clone(), h_next = at::empty({d.B, d.S}, f32);
  at::Tensor c = c0.has_value() ? fp32(*c0).clone() : at::Tensor(), c_next = c0.has_value() ? at::empty_like(c) : at::Tensor();
  at::Tensor hw = at::empty({d.B, GH}, f32);
  at::Tensor m = d.proj ? at::empty({d.B, d.H}, f32) : at::Tensor(), hp = d.proj ? at::empty({d.B, d.S}, f32) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(xw.scalar_type(), "rnn_fwd_cuda", [&] {
    dispatch_mode(mode, [&](auto mode_c) {
      constexpr int MODE = decltype(mode_c)::value;
      for (int step = 0; step < d.T; ++step) {
        const int t = reverse ? d.T - 1 - step : step;
        at::mm_out(hw, h, w.t());
        FwdStep a{};
        a.xw = xw.const_data_ptr<scalar_t>() + int64_t{t} * d.B * GH;
        a.hw = hw.const_data_ptr<float>();
        a.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
        a.h = h.const_data_ptr<float>();
        a.c = c.defined() ? c.const_data_ptr<float>() : nullptr;
        a.h_next = h_next.data_ptr<float>();
        a.c_next = c_next.defined() ? c_next.data_ptr<float>() : nullptr;
        a.m = d.proj ? m.data_ptr<float>() : nullptr;
        a.out = out.data_ptr<scalar_t>() + int64_t{t} * d.B * d.S;
        a.ws = ws.data_ptr<float>() + (save_workspace ? int64_t{t} * d.B * d.width : 0);
        a.len = ptr_or_null(len);
        a.t = t;
        if (int64_t{d.B} * d.H > 0) {
          rnn_fwd_step_kernel<scalar_t, MODE><<<blocks_for(int64_t{d.B} * d.H), kThreads, 0, stream>>>(a, d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (d.proj) {
          at::mm_out(hp, m, wr.t());
          if (int64_t{d.B} * d.S > 0) {
            rnn_fwd_proj_kernel<scalar_t><<<blocks_for(int64_t{d.B} * d.S), kThreads, 0, stream>>>(
                hp.const_data_ptr<float>(), h.const_data_ptr<float>(), h_next.data_ptr<float>(), a.out, a.ws, a.len,
                t, d);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
        std::swap(h, h_next);
        if (c.defined()) std::swap(c, c_next);
      }
    });
  });
  at::Tensor h_n = h.to(xw.scalar_type());
  at::Tensor c_n = c.defined() ? c.to(xw.scalar_type()) : at::empty({0}, xw.options());
  if (!save_workspace) ws = at::empty({0}, f32);
  return {out, h_n, c_n, ws};
}

std::vector<at::Tensor> rnn_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                     const std::optional<at::Tensor>& grad_c_n, const at::Tensor& xw,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                     const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
                                     const std::optional<at::Tensor>& lengths, const at::Tensor& workspace,
                                     const std::string& mode_name, bool reverse) {
  const c10::cuda::CUDAGuard guard(xw.device());
  check_operands(xw, w_hh, h0);
  const Mode mode = parse_mode(mode_name);
  const Dims d = dims_of(mode, xw, w_hh, w_hr.has_value());
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 3 && workspace.size(0) == d.T &&
                  workspace.size(1) == d.B && workspace.size(2) == d.width && workspace.is_contiguous(),
              "rnn (cuda): the workspace does not come from the cuda forward of this layer with save_workspace");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == d.T && grad_out.size(1) == d.B && grad_out.size(2) == d.S &&
                  grad_h_n.sizes() == h0.sizes(),
              "rnn (cuda): grad_out must be [T, B, S] and grad_h_n [B, S]");
  TORCH_CHECK((mode == kLstm) == c0.has_value() && (c0.has_value() || !grad_c_n.has_value()),
              "rnn (cuda): c0 (and grad_c_n, when given) are given for lstm only");
  TORCH_CHECK(!c0.has_value() || (c0->dim() == 2 && c0->size(0) == d.B && c0->size(1) == d.H &&
                                  (!grad_c_n.has_value() || grad_c_n->sizes() == c0->sizes())),
              "rnn (cuda): c0 and grad_c_n must be [B, H]");
  const auto len = device_lengths(lengths, xw, d.B);
  const auto f32 = xw.options().dtype(at::kFloat);
  const int64_t GH = int64_t{d.G} * d.H, TB = int64_t{d.T} * d.B;
  at::Tensor go = grad_out.contiguous();
  at::Tensor w = fp32(w_hh), wr = w_hr.has_value() ? fp32(*w_hr) : at::Tensor();
  at::Tensor h0f = fp32(h0), c0f = c0.has_value() ? fp32(*c0) : at::Tensor();
  at::Tensor dg_all = at::zeros({d.T, d.B, GH}, f32);
  at::Tensor dx_all = mode == kGru ? at::zeros({d.T, d.B, GH}, f32) : dg_all;
  at::Tensor dht_all = at::zeros({d.proj ? d.T : 1, d.B, d.S}, f32);  // kept per step with a projection (dW_hr)
  at::Tensor dh = fp32(grad_h_n).clone(), dh_next = at::empty({d.B, d.S}, f32), mm = at::empty({d.B, d.S}, f32);
  at::Tensor dc = c0.has_value() ? (grad_c_n.has_value() ? fp32(*grad_c_n).clone() : at::zeros({d.B, d.H}, f32))
                                 : at::Tensor();
  at::Tensor dc_next = dc.defined() ? at::empty_like(dc) : at::Tensor();
  at::Tensor dm = d.proj ? at::empty({d.B, d.H}, f32) : at::Tensor();
  at::Tensor direct = mode == kGru ? at::zeros({d.B, d.S}, f32) : at::Tensor();
  const float* wsp = workspace.const_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(xw.scalar_type(), "rnn_bwd_cuda", [&] {
    dispatch_mode(mode, [&](auto mode_c) {
      constexpr int MODE = decltype(mode_c)::value;
      for (int step = d.T - 1; step >= 0; --step) {
        const int t = reverse ? d.T - 1 - step : step;
        const int prev = reverse ? (t + 1 < d.T ? t + 1 : -1) : t - 1;
        float* dht = dht_all.data_ptr<float>() + (d.proj ? int64_t{t} * d.B * d.S : 0);
        if (int64_t{d.B} * d.S > 0) {
          rnn_bwd_dh_total_kernel<scalar_t><<<blocks_for(int64_t{d.B} * d.S), kThreads, 0, stream>>>(
              dh.const_data_ptr<float>(), go.const_data_ptr<scalar_t>() + int64_t{t} * d.B * d.S, dht,
              ptr_or_null(len), t, d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (d.proj) at::mm_out(dm, dht_all[t], wr);
        BwdStep a{};
        a.ws = wsp + int64_t{t} * d.B * d.width;
        a.ws_prev = prev >= 0 ? wsp + int64_t{prev} * d.B * d.width : nullptr;
        a.h0 = h0f.const_data_ptr<float>();
        a.c0 = c0f.defined() ? c0f.const_data_ptr<float>() : nullptr;
        a.dht = dht;
        a.dm = d.proj ? dm.const_data_ptr<float>() : nullptr;
        a.dc = dc.defined() ? dc.const_data_ptr<float>() : nullptr;
        a.dc_next = dc_next.defined() ? dc_next.data_ptr<float>() : nullptr;
        a.dg = dg_all.data_ptr<float>() + int64_t{t} * d.B * GH;
        a.dx = dx_all.data_ptr<float>() + int64_t{t} * d.B * GH;
        a.direct = direct.defined() ? direct.data_ptr<float>() : nullptr;
        a.len = ptr_or_null(len);
        a.t = t;
        if (int64_t{d.B} * d.H > 0) {
          rnn_bwd_gates_kernel<MODE><<<blocks_for(int64_t{d.B} * d.H), kThreads, 0, stream>>>(a, d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        at::mm_out(mm, dg_all[t], w);
        if (int64_t{d.B} * d.S > 0) {
          rnn_bwd_dh_prev_kernel<<<blocks_for(int64_t{d.B} * d.S), kThreads, 0, stream>>>(
              mm.const_data_ptr<float>(), direct.defined() ? direct.const_data_ptr<float>() : nullptr,
              dh.const_data_ptr<float>(), dh_next.data_ptr<float>(), ptr_or_null(len), t, d);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        std::swap(dh, dh_next);
        if (dc.defined()) std::swap(dc, dc_next);
      }
    });
  });
  // Weight gradients: dW_hh = dG^T [GH, TB] H_prev [TB, S], dW_hr = dh^T [S, TB] M [TB, H]
  at::Tensor after = workspace.narrow(2, d.off_state, d.S);
  at::Tensor before = d.T == 0 ? after
                      : !reverse ? at::cat({h0f.unsqueeze(0), after.narrow(0, 0, d.T - 1)}, 0)
                                 : at::cat({after.narrow(0, 1, d.T - 1), h0f.unsqueeze(0)}, 0);
  at::Tensor d_w_hh = at::mm(dg_all.view({TB, GH}).t(), before.reshape({TB, d.S})).to(w_hh.scalar_type());
  at::Tensor d_b_hh = b_hh.has_value() ? dg_all.view({TB, GH}).sum(0).to(b_hh->scalar_type()) : at::empty({0}, xw.options());
  at::Tensor d_w_hr = at::empty({0}, xw.options());
  if (d.proj) {
    at::Tensor m = workspace.narrow(2, d.off_m, d.H).reshape({TB, d.H});
    d_w_hr = at::mm(dht_all.view({TB, d.S}).t(), m).to(w_hr->scalar_type());
  }
  return {dx_all.to(xw.scalar_type()), d_w_hh, d_b_hh, dh.to(h0.scalar_type()),
          c0.has_value() ? dc.to(c0->scalar_type()) : at::empty({0}, xw.options()), d_w_hr};
}

}  // namespace bignlp_fast

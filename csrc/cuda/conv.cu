// conv1d / conv2d with a fused epilogue on CUDA: conv_fwd_cuda / conv_bwd_cuda (see ops.h; the contract
// is stated in bignlp_fast/ops/conv.py).
//
// The convolution itself is cuDNN's, through aten::convolution without its bias. What follows is one
// elementwise pass over the output viewed as rows [B * C_out, S] (S = the spatial size):
// Forward: v = conv + bias[row % C_out], out = act(v) + residual, written over the convolution's output
// when pre need not be kept; else v (the saved pre) is.
// Backward: gp = grad_out * act'(pre), then aten::convolution_backward on gp. grad_bias is the
// sum of gp over the batch and the positions: a warp handles one channel and one chunk of its rows,
// sums each row's chunk of gp in fp32 (before rounding to T) and writes it as one partial sum;
// sum_partials_kernel adds the partials of each channel in a fixed order (no atomics), so the result
// is the same from run to run (the chunking depends on the shape and the device's SM count only).
//
// Elements are handled as vectors of kVec = 16 bytes / sizeof(T) when S and every pointer allow
// 16-byte accesses (a vector then never straddles two rows), else one by one. All math is fp32.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/activation.cuh"
#include "cuda/common.cuh"
#include "ops.h"

namespace bignlp_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;             // threads per block
constexpr int kWarps = kThreads / 32;     // backward: most warps per block, one channel each
constexpr int64_t kMinChunkVecs = 256;    // backward: fewest vectors a warp's chunk is cut down to

// ---- kernels ----------------------------------------------------------------------------------

// v = pre + bias[channel], out = act(v) + residual over n vectors of kVec elements, rows of row_vecs
// vectors, channel = row % channels; with save_pre, v is written back over pre (the backward's input:
// see the contract in bignlp_fast/ops/conv.py). bias and residual may be null. out may be pre (then
// not save_pre; in place: each element is read before it is written, by the same thread), so neither
// is __restrict__.
//
// Grid-stride loop whose (column, channel) is carried along instead of divided out per vector: the
// stride of gridDim.x * blockDim.x vectors advances the column by step_col (< row_vecs) and the
// channel by step_ch (< channels), plus one each on a carry.
template <typename T, int kVec, int ACT>
__global__ void __launch_bounds__(kThreads)
    conv_epilogue_fwd_kernel(T* pre, const T* __restrict__ bias, const T* __restrict__ residual, T* out,
                             int64_t n, int64_t row_vecs, int channels, int64_t step_col, int step_ch,
                             bool save_pre) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int64_t col = i % row_vecs;
  int ch = static_cast<int>((i / row_vecs) % channels);
  for (; i < n; i += stride) {
    const float b = bias ? static_cast<float>(bias[ch]) : 0.f;
    float v[kVec], r[kVec] = {};
    load_vec<kVec>(pre, i, v);
    if (residual) load_vec<kVec>(residual, i, r);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] += b;
    if (save_pre) store_vec<kVec>(pre, i, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = act<ACT>(v[e]) + r[e];
    store_vec<kVec>(out, i, v);

    col += step_col;
    int carry = 0;
    if (col >= row_vecs) {
      col -= row_vecs;
      carry = 1;
    }
    ch += step_ch + carry;  // < 2 * channels
    if (ch >= channels) ch -= channels;
  }
}

// gp = grad_out * act'(pre), pre = conv + bias. A warp handles channel c (warp `w` of the block, in
// channel group blockIdx.x % groups) and the vectors [chunk * chunk_vecs, min(row_vecs, (chunk + 1) *
// chunk_vecs)) of the rows b * channels + c, chunk = blockIdx.x / groups, for b = blockIdx.y,
// blockIdx.y + gridDim.y, ... With partials (only with a bias), writes each (b, chunk) fp32 sum of gp
// to partials[(b * nchunks + chunk) * channels + c]: a [batch * nchunks, channels] table whose column
// sums are grad_bias. No 64-bit division: the grid's shape gives b, c and chunk.
template <typename T, int kVec, int ACT>
__global__ void __launch_bounds__(kThreads)
    conv_epilogue_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ pre, T* __restrict__ gp,
                             float* __restrict__ partials, int64_t batch, int channels, unsigned groups,
                             int64_t row_vecs, int64_t chunk_vecs, int64_t nchunks) {
  const int lane = threadIdx.x % 32;
  const unsigned warps = blockDim.x / 32;
  const int c = static_cast<int>((blockIdx.x % groups) * warps + threadIdx.x / 32);
  if (c >= channels) return;  // the whole warp; no block-wide synchronization follows
  const int64_t chunk = blockIdx.x / groups;
  const int64_t begin = chunk * chunk_vecs;
  const int64_t end = row_vecs < begin + chunk_vecs ? row_vecs : begin + chunk_vecs;

  for (int64_t n = blockIdx.y; n < batch; n += gridDim.y) {
    const int64_t base = (n * channels + c) * row_vecs;
    float acc = 0.f;
    for (int64_t v = begin + lane; v < end; v += 32) {
      float dy[kVec], p[kVec];
      load_vec<kVec>(grad_out, base + v, dy);
      load_vec<kVec>(pre, base + v, p);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dy[e] *= act_grad<ACT>(p[e]);
        acc += dy[e];
      }
      store_vec<kVec>(gp, base + v, dy);
    }
    if (partials) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (lane == 0) partials[(n * nchunks + chunk) * channels + c] = acc;
    }
  }
}

// ---- helpers ----------------------------------------------------------------------------------

int sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return std::max(sms, 1);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether rows of `row_len` elements and every tensor given allow vectors of `vec` elements.
bool vectorizable(int64_t row_len, int64_t vec, std::initializer_list<const at::Tensor*> tensors) {
  return row_len % vec == 0 &&
         std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) { return !t || aligned16(*t); });
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

template <typename T>
const T* opt_data(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// ---- argument checks (second line of defence: the Python op validates first) -------------------

bool float_half_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// t contiguous on x's device with x's dtype.
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.is_contiguous(), "conv: ", name,
              " must be a contiguous ", x.scalar_type(), " tensor on ", x.device(), " (as x), got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : ", non-contiguous");
}

// Checks x, w, bias and the convolution arguments; returns the output shape [B, C_out, *spatial].
std::vector<int64_t> check_conv_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                     const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                     const std::vector<int64_t>& dilation, int64_t groups) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (x.dim() == 3 || x.dim() == 4),
              "conv: x must be a contiguous 3-D or 4-D CUDA tensor [B, C_in, *spatial], got a ",
              x.is_contiguous() ? "" : "non-contiguous ", x.dim(), "-D tensor of shape ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(float_half_bf16(x), "conv: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t nd = x.dim() - 2;
  check_like_x(w, "weight", x);
  TORCH_CHECK(w.dim() == x.dim(), "conv: weight must be [C_out, C_in / groups, *kernel] with ", nd,
              " kernel dims, got shape ", w.sizes());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0,
              "conv: groups must be >= 1 and divide C_in = ", x.size(1), " and C_out = ", w.size(0), ", got ",
              groups);
  TORCH_CHECK(w.size(1) * groups == x.size(1), "conv: weight expects C_in = ", w.size(1) * groups,
              " (weight.shape[1] * groups) but x has ", x.size(1));
  TORCH_CHECK(w.size(0) <= INT32_MAX, "conv: weight must have fewer than 2^31 output channels, got ", w.size(0));
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == nd && static_cast<int64_t>(padding.size()) == nd &&
                  static_cast<int64_t>(dilation.size()) == nd,
              "conv: stride, padding and dilation must have ", nd, " values each, got ", stride.size(), ", ",
              padding.size(), ", ", dilation.size());
  std::vector<int64_t> out_shape = {x.size(0), w.size(0)};
  for (int64_t d = 0; d < nd; ++d) {
    TORCH_CHECK(stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, "conv: stride and dilation must be >= 1 "
                "and padding >= 0, got stride ", stride[d], ", dilation ", dilation[d], ", padding ", padding[d],
                " in spatial dim ", d);
    const int64_t span = dilation[d] * (w.size(2 + d) - 1) + 1;
    const int64_t padded = x.size(2 + d) + 2 * padding[d];
    TORCH_CHECK(padded >= span, "conv: the input's spatial dim ", d, " (", x.size(2 + d), ", padded by ",
                padding[d], ") is smaller than the dilated kernel (", span, ")");
    out_shape.push_back((padded - span) / stride[d] + 1);
  }
  if (bias) {
    check_like_x(*bias, "bias", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "conv: bias must have shape (", w.size(0),
                ",), got ", bias->sizes());
  }
  return out_shape;
}

}  // namespace

std::vector<at::Tensor> conv_fwd_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, std::vector<int64_t> stride,
                                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                      int64_t activation, bool save_pre) {
  const std::vector<int64_t> out_shape = check_conv_args(x, w, bias, stride, padding, dilation, groups);
  if (residual) {
    check_like_x(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "conv: residual must have the output's shape ",
                at::IntArrayRef(out_shape), ", got ", residual->sizes());
  }
  TORCH_CHECK(activation >= 0 && activation <= 4, "conv: activation code must be 0..4, got ", activation);
  const c10::cuda::CUDAGuard guard(x.device());

  const std::vector<int64_t> output_padding(stride.size(), 0);
  at::Tensor pre = at::convolution(x, w, std::nullopt, stride, padding, dilation, false, output_padding, groups);
  if (!pre.is_contiguous()) pre = pre.contiguous();
  TORCH_CHECK(pre.sizes() == at::IntArrayRef(out_shape), "conv: the convolution returned shape ", pre.sizes(),
              ", expected ", at::IntArrayRef(out_shape));
  at::Tensor out = save_pre ? at::empty(pre.sizes(), pre.options()) : pre;
  at::Tensor pre_ret = save_pre ? pre : at::empty({0}, x.options());
  if (pre.numel() == 0) return {out, pre_ret};

  const int channels = static_cast<int>(out_shape[1]);
  const int64_t row_len = pre.numel() / (out_shape[0] * out_shape[1]);  // S
  BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_fwd_cuda", [&] {
    using T = scalar_t;
    const bool vectorized = vectorizable(row_len, 16 / sizeof(T), {&pre, &out, opt_ptr(residual)});
    dispatch_vec<T>(vectorized, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t row_vecs = row_len / kVec;
      const int64_t n = pre.numel() / kVec;
      const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads), int64_t{sm_count()} * (2048 / kThreads));
      const int64_t stride_vecs = blocks * kThreads;
      const int64_t step_col = stride_vecs % row_vecs;
      const int step_ch = static_cast<int>((stride_vecs / row_vecs) % channels);
      dispatch_activation(activation, "conv", [&](auto act_code) {
        conv_epilogue_fwd_kernel<T, kVec, decltype(act_code)::value>
            <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
                pre.data_ptr<T>(), opt_data<T>(bias), opt_data<T>(residual), out.data_ptr<T>(), n, row_vecs,
                channels, step_col, step_ch, save_pre);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, pre_ret};
}

std::vector<at::Tensor> conv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                                      std::vector<int64_t> dilation, int64_t groups, int64_t activation) {
  const std::vector<int64_t> out_shape = check_conv_args(x, w, bias, stride, padding, dilation, groups);
  check_like_x(pre, "pre", x);
  TORCH_CHECK(pre.sizes() == at::IntArrayRef(out_shape), "conv: pre must have the output's shape ",
              at::IntArrayRef(out_shape), ", got ", pre.sizes());
  check_like_x(grad_out, "grad_out", x);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "conv: grad_out must have the output's shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK(activation >= 0 && activation <= 4, "conv: activation code must be 0..4, got ", activation);
  const c10::cuda::CUDAGuard guard(x.device());

  at::Tensor gp = at::empty(pre.sizes(), pre.options());
  at::Tensor grad_bias = bias ? at::empty({w.size(0)}, bias->options()) : at::empty({0}, x.options());
  const int64_t batch = out_shape[0];
  const int channels = static_cast<int>(out_shape[1]);
  const int64_t rows = batch * channels;
  const int64_t row_len = rows == 0 ? 0 : pre.numel() / rows;  // S

  if (pre.numel() == 0) {
    if (bias) grad_bias.zero_();
  } else {
    BIGNLP_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "conv_bwd_cuda", [&] {
      using T = scalar_t;
      const bool vectorized = vectorizable(row_len, 16 / sizeof(T), {&grad_out, &pre, &gp});
      dispatch_vec<T>(vectorized, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int64_t row_vecs = row_len / kVec;
        // Cut rows into chunks until there are about enough warps to fill the device, but never
        // below kMinChunkVecs vectors (rounded to whole warps' worth) per chunk. A block holds up to
        // kWarps warps, one channel each.
        const int64_t target_warps = int64_t{sm_count()} * (2048 / 32);
        const int64_t max_chunks = std::max<int64_t>(1, row_vecs / kMinChunkVecs);
        const int64_t want = std::min(max_chunks, std::max<int64_t>(1, ceil_div(target_warps, rows)));
        const int64_t chunk_vecs = ceil_div(ceil_div(row_vecs, want), 32) * 32;
        const int64_t nchunks = ceil_div(row_vecs, chunk_vecs);  // <= target_warps
        const int warps = std::min(kWarps, channels);
        const int64_t groups_c = ceil_div(channels, warps);
        const int64_t blocks_x = groups_c * nchunks;
        TORCH_CHECK(blocks_x <= INT32_MAX, "conv: grad_out has too many channels (", channels, ")");
        const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
        at::Tensor partials;
        if (bias) partials = at::empty({batch * nchunks, channels}, x.options().dtype(at::kFloat));
        dispatch_activation(activation, "conv", [&](auto act_code) {
          conv_epilogue_bwd_kernel<T, kVec, decltype(act_code)::value>
              <<<grid, warps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  grad_out.data_ptr<T>(), pre.data_ptr<T>(), gp.data_ptr<T>(),
                  bias ? partials.data_ptr<float>() : nullptr, batch, channels, static_cast<unsigned>(groups_c),
                  row_vecs, chunk_vecs, nchunks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (bias) sum_partials(partials, grad_bias);
      });
    });
  }

  const std::vector<int64_t> output_padding(stride.size(), 0);
  auto grads = at::convolution_backward(gp, x, w, std::nullopt, stride, padding, dilation, false, output_padding,
                                        groups, {true, true, false});
  return {std::get<0>(grads), std::get<1>(grads), grad_bias};
}

}  // namespace bignlp_fast

// GPT-2's decoding step on the CPU: every block of the model for one new token per row, in one call.
//
// At batch 1 a token reads ~500 MB of weights in ~12 ms, and the products run at the copy rate; what
// kept a token from it was the ~1 ms spent between them in Python (attribute lookups, views, nine
// kernel calls a block, the KV cache's slice assignments). This runs the same kernels on the same
// arguments as the public ops (linear_fwd_cpu or at::linear as ops.linear.dense chooses,
// attention_fwd_cpu, add_layer_norm_fwd_cpu, bias_gelu_fwd_cpu), so its results are the op path's,
// bit for bit (tests/test_gpt.py); only the glue between them moved to C++.
#include <vector>

#include "../ops.h"
#include "common.h"

namespace bignlp_fast {
namespace {

// The parameters of block i in params, in this order (bignlp_fast/models/gpt.py: _decode_params).
enum Param : int64_t {
  kAttnW, kAttnB, kAttnProjW, kAttnProjB, kLn2W, kLn2B, kFcW, kFcB, kMlpProjW, kMlpProjB, kNextLnW, kNextLnB,
  kParamsPerBlock
};

// x @ W + b for GPT-2's Conv1D weight W [in, out]: the streaming kernel reads W^T in place.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool skinny) {
  return skinny ? linear_fwd_cpu(x, w.t(), b, std::nullopt) : at::linear(x, w.t(), b);
}

}  // namespace

std::vector<at::Tensor> gpt2_decode_cpu(const at::Tensor& x, const at::Tensor& residual,
                                        const std::vector<at::Tensor>& params, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, int64_t past, const at::Tensor& bias,
                                        const std::vector<double>& scales, const std::vector<double>& eps,
                                        bool tanh_approx, int64_t skinny) {
  const int64_t n_layer = k_cache.size(0), B = x.size(0), E = x.size(1), H = k_cache.size(2), D = k_cache.size(4);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.sizes() == x.sizes() && residual.is_contiguous(),
              "gpt2_decode: x and residual must be contiguous [B, E]");
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == B && H * D == E,
              "gpt2_decode: k_cache and v_cache must be [n_layer, B, H, max_len, D] with H * D == E");
  TORCH_CHECK(past >= 0 && past < k_cache.size(3), "gpt2_decode: past must be in [0, max_len)");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n_layer * kParamsPerBlock &&
                  static_cast<int64_t>(scales.size()) == n_layer && static_cast<int64_t>(eps.size()) == 2 * n_layer,
              "gpt2_decode: ", kParamsPerBlock, " parameters, one scale and two eps per layer");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 4 && bias.size(3) == past + 1,
              "gpt2_decode: bias must be the float32 key mask [B, H, 1, past + 1]");
  const auto opt = [](const at::Tensor& t) { return std::optional<at::Tensor>(t); };
  const bool skinny_attn = skinny & 1, skinny_attn_proj = skinny & 2, skinny_fc = skinny & 4,
             skinny_mlp_proj = skinny & 8;

  at::Tensor h = x, r = residual;
  for (int64_t i = 0; i < n_layer; ++i) {
    const at::Tensor* p = params.data() + i * kParamsPerBlock;
    // attention: q, k, v [B, H, 1, D] views of the projection; the new key and value written at `past`
    const at::Tensor qkv = project(h, p[kAttnW], opt(p[kAttnB]), skinny_attn).view({B, 3, H, 1, D});
    const at::Tensor keys = k_cache.select(0, i), values = v_cache.select(0, i);  // [B, H, max_len, D]
    keys.narrow(2, past, 1).copy_(qkv.select(1, 1));
    values.narrow(2, past, 1).copy_(qkv.select(1, 2));
    const at::Tensor out = attention_fwd_cpu(qkv.select(1, 0), keys.narrow(2, 0, past + 1),
                                             values.narrow(2, 0, past + 1), opt(bias), std::nullopt, std::nullopt,
                                             1, past + 1, scales[i], /*causal=*/0, 0.0, std::nullopt)[0];
    const at::Tensor a = project(out.reshape({B, E}), p[kAttnProjW], opt(p[kAttnProjB]), skinny_attn_proj);
    // the residual add and ln_2, the MLP, the residual add and the next block's ln_1 (ln_f after the last)
    std::vector<at::Tensor> ln = add_layer_norm_fwd_cpu(a, r, opt(p[kLn2W]), opt(p[kLn2B]), eps[2 * i]);
    const at::Tensor g = bias_gelu_fwd_cpu(project(ln[0], p[kFcW], std::nullopt, skinny_fc), opt(p[kFcB]),
                                           tanh_approx);
    const at::Tensor m = project(g, p[kMlpProjW], opt(p[kMlpProjB]), skinny_mlp_proj);
    ln = add_layer_norm_fwd_cpu(m, ln[1], opt(p[kNextLnW]), opt(p[kNextLnB]), eps[2 * i + 1]);
    h = std::move(ln[0]), r = std::move(ln[1]);
  }
  return {h, r};
}

}  // namespace bignlp_fast

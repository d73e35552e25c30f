// Declarations of every compiled kernel entry point, one block per op.
//
// Contract shared by all backends of an op (cpu here, cuda in csrc/cuda, triton in kernels/):
// inputs arrive already validated by the Python op (bignlp_fast/ops/<op>.py); the row-wise ops get
// them flattened to 2-D [rows, hidden] and contiguous (attention states its own layout below); the TORCH_CHECKs in the kernels are a second line of defence.
// Outputs that do not exist for a call (no residual, no bias) are returned as empty tensors of
// shape [0], never as undefined tensors, so every backend returns the same tuple structure; each is
// its own tensor (a custom op's outputs may not alias one another or an input).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace bignlp_fast {

// ---- add_layer_norm ------------------------------------------------------------------------
// Forward: s = x + residual (added in fp32, rounded to x.dtype), out = (s - mean) * rstd * weight + bias
//   with mean and rstd computed in fp32 from the rounded s: the rounded s is what the backward gets,
//   so forward and backward agree even when a tiny variance makes rstd large.
//   x, residual: [N, H]; weight, bias: [H], same dtype as x; any of the last three may be absent.
//   Returns {out [N, H], residual_out [N, H] (s in x.dtype; [0] when residual is absent),
//            mean [N] float32, rstd [N] float32}.
// Backward: given grad_out and grad_residual_out (the gradient reaching residual_out, may be
//   absent), s (residual_out, or x when there was no residual), mean and rstd from the forward:
//   Returns {grad_s [N, H] (the gradient of both x and residual), grad_weight [H] ([0] when weight
//            is absent), grad_bias [H] ([0] when has_bias is false)}.
//   grad_weight/grad_bias are reduced over rows in a fixed order: results do not depend on the
//   number of threads.
std::vector<at::Tensor> add_layer_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, double eps);
// The op's eager lane (ops/add_layer_norm.py): add_layer_norm_fwd_cpu's outputs where every tensor can
// be read as it is and autograd need not see the call (CPU, dense and contiguous, float32 / bfloat16 like
// x, no grad required while grad mode is on, residual of x's shape, weight and bias vectors of x's last
// size); an empty vector, and nothing computed, where one cannot (the general path then takes the call).
std::vector<at::Tensor> add_layer_norm_lane_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps);
std::vector<at::Tensor> add_layer_norm_bwd_cpu(const at::Tensor& grad_out,
                                               const std::optional<at::Tensor>& grad_residual_out,
                                               const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                                               const std::optional<at::Tensor>& weight, bool has_bias);

// ---- bias_gelu -----------------------------------------------------------------------------
// Forward: y = gelu(x + bias), erf form, or tanh form when tanh_approx. x: [N, H]; bias: [H] or absent.
// Backward: returns {grad_x [N, H], grad_bias [H] ([0] when bias is absent)}; x is the forward input.
at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh_approx);
std::vector<at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                          const std::optional<at::Tensor>& bias, bool tanh_approx);

// ---- attention -----------------------------------------------------------------------------
// The contract is stated in bignlp_fast/ops/attention.py (its docstring and attention_*_torch).
//   q [B, Hq, Lq, D], k [B, Hk, Lk, D], v [B, Hk, Lk, Dv] with stride(-1) == 1 (other strides free);
//   bias: float32 view of [B, Hq, Lq, Lk] (strides may be 0), added to the scores; the CPU kernels also
//   take a bool view (true = attend, false = -inf); cu_seqlens_*: int32 [nseq + 1] (then
//   B == 1); causal 0 none / 1 top-left / 2 bottom-right; seed: int64 scalar when dropout_p > 0.
// Forward returns {out (allocated [B, Lq, Hq, Dv], returned as its [B, Hq, Lq, Dv] transpose),
//   lse [B, Hq, Lq] float32 (+inf for rows with every key masked; their out is 0)}.
// Backward returns {dq, dk, dv} laid out like q, k, v (empty_like); deterministic.
std::vector<at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                          const std::optional<at::Tensor>& seed);
// The op's eager lane (ops/attention.py): attention_fwd_cpu's output alone, top-left causal or not, for
// a call without dropout whose tensors it can read as they are (CPU [B, H, L, D] of one dtype,
// float32 / bfloat16, stride(-1) == 1, none needing grad while grad mode is on; the batch and head dim
// alike, as many key as query heads or, with enable_gqa, key heads dividing them; at least one key;
// head dims up to max_head_dim; scale finite, or 1 / sqrt(D) when none; a mask, if any, bool or float32
// on the CPU, at most 4-d, broadcasting to [B, Hq, Lq, Lk], not needing grad, read in place as the
// bias); an empty vector, and nothing computed, where it cannot (the general path then takes the call).
std::vector<at::Tensor> attention_lane_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& mask, std::optional<double> scale,
                                           bool causal, bool enable_gqa, int64_t max_head_dim);
std::vector<at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                          const std::optional<at::Tensor>& seed);

// ---- rnn (one layer, one direction) -----------------------------------------------------------
// The contract is stated in bignlp_fast/ops/rnn.py. xw [T, B, G*H], w_hh [G*H, S], b_hh [G*H],
// h0 [B, S], c0 [B, H] (lstm), w_hr [S, H] (lstm with projection), lengths int64 [B]; contiguous.
// Forward returns {out [T, B, S], h_n [B, S], c_n [B, H] or [0], workspace [T, B, W] float32 (or
// [0] when save_workspace is false: inference, no backward to feed)}. packed_hh: w_hh as linear_pack_cpu
// packs it (ops.linear.prepack), multiplied in place of packing W_hh^T per call where it is float32
// panels and H is a multiple of rnn_cell_packed_units(); else not used.
// Backward returns {d_xw, d_w_hh, d_b_hh or [0], d_h0, d_c0 or [0], d_w_hr or [0]}.
std::vector<at::Tensor> rnn_fwd_cpu(const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                    const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                                    const std::string& mode, bool reverse, bool save_workspace,
                                    const std::optional<at::Tensor>& packed_hh = std::nullopt);
// The cells' eager lane (nn.LSTMCell / GRUCell / RNNCell): one step of `mode` for a plain inference
// call, the input projection included (ours_projection: on linear_fwd_cpu, unpacked, else at::linear,
// as the general path's input_projection chooses), h / c absent meaning zeros. Returns {h'} ({h', c'}
// for lstm) where it can take the call (2-d x [B, I] with B >= 1, float32 / bfloat16 CPU tensors of
// one dtype and of the cell's shapes, none needing grad while grad mode is on, c given exactly with
// h for lstm and never otherwise), else an empty vector, and nothing computed. packed_ih / packed_hh:
// w_ih's and w_hh's copies as linear_pack_cpu packs them (ops.linear.prepack); for float32 and H a
// multiple of rnn_cell_packed_units() the step multiplies by them (both products in one parallel
// region, nothing packed per call), else they are not used.
std::vector<at::Tensor> rnn_cell_lane_cpu(const std::string& mode, const at::Tensor& x,
                                          const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& c,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                          bool ours_projection, const std::optional<at::Tensor>& packed_ih,
                                          const std::optional<at::Tensor>& packed_hh);
// The hidden sizes whose cells run on packed weights are multiples of this (the panel width).
int64_t rnn_cell_packed_units();
std::vector<at::Tensor> rnn_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& xw,
                                    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
                                    const std::optional<at::Tensor>& lengths, const at::Tensor& workspace,
                                    const std::string& mode, bool reverse);

// ---- layer_norm_lstm (one layer, one direction) ------------------------------------------------
// The contract is stated in bignlp_fast/ops/layer_norm_lstm.py. xw [T, B, 4H] (the input projection
// after its own LayerNorm), w_hh [4H, H], gamma_h / beta_h [4H] (ln_hh), gamma_c / beta_c [H] (ln_c),
// h0, c0 [B, H]; lengths int64 [B] or none; contiguous. Forward returns {out [T, B, H], h_n, c_n [B, H], workspace [T, B, W]
// float32 or [0]}. Backward returns {d_xw, d_w_hh, d_gamma_h, d_beta_h, d_gamma_c, d_beta_c (each [0]
// when absent), d_h0, d_c0}.
std::vector<at::Tensor> layer_norm_lstm_fwd_cpu(const at::Tensor& xw, const at::Tensor& w_hh,
                                                const std::optional<at::Tensor>& gamma_h,
                                                const std::optional<at::Tensor>& beta_h,
                                                const std::optional<at::Tensor>& gamma_c,
                                                const std::optional<at::Tensor>& beta_c, const at::Tensor& h0,
                                                const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                                double eps, bool reverse, bool save_workspace);
std::vector<at::Tensor> layer_norm_lstm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                                const at::Tensor& grad_c_n, const at::Tensor& xw,
                                                const at::Tensor& w_hh, const std::optional<at::Tensor>& gamma_h,
                                                const std::optional<at::Tensor>& beta_h,
                                                const std::optional<at::Tensor>& gamma_c,
                                                const std::optional<at::Tensor>& beta_c, const at::Tensor& h0,
                                                const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                                const at::Tensor& workspace, double eps, bool reverse);

// ---- linear ----------------------------------------------------------------------------------
// y = x w^T + b. x [M, K], w [N, K], b [N]; contiguous, one dtype. Backward returns
// {grad_x [M, K], grad_w [N, K], grad_b [N] or [0]}. packed: w as linear_pack_cpu(w) packed it (an
// opaque 1-D tensor: the packed GEMM's B operand, made once for a weight used in many calls), or none.
at::Tensor linear_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                          const std::optional<at::Tensor>& packed);
at::Tensor linear_pack_cpu(const at::Tensor& w);
// Whether packed is in the form linear_pack_cpu(w) would make now (the build and the bf16_dot setting
// decide it): what linear_fwd_cpu checks, and what tells a caller's cached copy is stale.
bool linear_packed_fits(const at::Tensor& packed, const at::Tensor& w);
std::vector<at::Tensor> linear_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                       bool has_bias);

// ---- conv (conv1d / conv2d with a fused epilogue) ----------------------------------------------
// The contract is stated in bignlp_fast/ops/conv.py. x [B, C_in, *spatial], w [C_out, C_in/groups,
// *kernel], bias [C_out], residual shaped like the output; contiguous, one dtype; activation code
// as in bignlp_fast/ops/_activation.py (0 none, 1 relu, 2 gelu (erf), 3 silu, 4 tanh).
// Forward returns {out = act(conv(x) + bias) + residual, pre = conv(x) (or [0] unless save_pre)}.
// Backward returns {grad_x, grad_w, grad_bias [C_out] or [0]}.
std::vector<at::Tensor> conv_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& residual, std::vector<int64_t> stride,
                                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                     int64_t activation, bool save_pre);
std::vector<at::Tensor> conv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t groups, int64_t activation);
// Whether CPU convolutions take the project's own implicit-GEMM and 2-D Winograd main loops where their
// shapes allow: by default with 16-wide vectors (AVX-512) only; set_conv_own_loops turns them on or
// off whatever the build (returns the previous state). Winograd's F(2, 3) for conv1d is always taken.
bool conv_own_loops();
bool set_conv_own_loops(bool on);
// Which forward conv_fwd_cpu takes for these arguments: "depthwise" (groups = C_in = C_out, stride 1,
// float32 or bfloat16, NCHW), "winograd" (conv1d with three taps, conv2d 3 x 3: see conv.cpp),
// "implicit_gemm" (float32 conv1d with stride 1, groups 1 and at least 128 output grid columns per
// sequence) or "aten" (oneDNN + epilogue).
std::string conv_cpu_path(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                          std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);
// Which weight gradient conv_bwd_cpu takes: "depthwise" (with the rest of a depthwise backward),
// "winograd" (conv2d 3 x 3 where the forward takes it), "implicit_gemm" (the project's, where the forward is on
// the implicit GEMM and the reduction over B * L_out positions makes at least two chunks of four
// slices per thread; it depends on at::get_num_threads()) or "aten" (oneDNN's backward-weights).
std::string conv_cpu_grad_weight_path(const at::Tensor& x, const at::Tensor& w, std::vector<int64_t> stride,
                                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups);

// ---- causal_conv1d (depthwise, widths 2-4) ---------------------------------------------------
// The contract is stated in bignlp_fast/ops/causal_conv1d.py. x [B, C, L], w [C, W], bias [C],
// initial_state [B, C, W-1]; contiguous, one dtype. Forward returns y [B, C, L]; backward returns
// {grad_x, grad_w [C, W], grad_bias [C] or [0], grad_initial_state or [0]}.
at::Tensor causal_conv1d_fwd_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& initial_state, int64_t activation);
std::vector<at::Tensor> causal_conv1d_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                              const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& initial_state, int64_t activation);

// ---- text_cnn_pool (multi-width conv + activation + masked max over time) ----------------------
// The contract is stated in bignlp_fast/ops/text_cnn_pool.py. x [B, L, E]; weights [C_i, E, k_i];
// biases [C_i] (all or none); lengths int64 [B] or absent. Forward returns {out [B, sum C_i],
// argmax int32 [B, sum C_i] (-1: no window), pre float32 [B, sum C_i]}; backward returns
// {grad_x, grad_w_0.., grad_b_0.. (only with biases)}.
std::vector<at::Tensor> text_cnn_pool_fwd_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                              const std::optional<std::vector<at::Tensor>>& biases,
                                              const std::optional<at::Tensor>& lengths, int64_t activation);
std::vector<at::Tensor> text_cnn_pool_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                              const std::vector<at::Tensor>& weights,
                                              const std::optional<std::vector<at::Tensor>>& biases,
                                              const at::Tensor& argmax, const at::Tensor& pre, int64_t activation);

// ---- gpt2_decode (a model's decoding step, not an op) ------------------------------------------
// Every block of GPT-2 (bignlp_fast/models/gpt.py) for one new token per row, on the kernels above.
// x = ln_1(residual) and residual [B, E]; params: 12 per block (c_attn w, b; attn c_proj w, b; ln_2
// w, b; c_fc w, b; mlp c_proj w, b; the next LayerNorm's w, b), Conv1D weights [in, out];
// k_cache, v_cache [n_layer, B, H, max_len, D], the new key and value written at position past;
// bias: the float32 additive key mask [B, H, 1, past + 1]; scales: one per layer; eps: ln_2's and the
// next LayerNorm's per layer; skinny: bit j set = product j of a block (c_attn, attn c_proj, c_fc,
// mlp c_proj) on linear_fwd_cpu, else at::linear. Returns {next_ln(residual'), residual'} [B, E].
std::vector<at::Tensor> gpt2_decode_cpu(const at::Tensor& x, const at::Tensor& residual,
                                        const std::vector<at::Tensor>& params, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, int64_t past, const at::Tensor& bias,
                                        const std::vector<double>& scales, const std::vector<double>& eps,
                                        bool tanh_approx, int64_t skinny);

// ---- distillation_loss -----------------------------------------------------------------------
// The contract is stated in bignlp_fast/ops/distillation_loss.py. student, teacher [N, V]; labels
// int64 [N] or absent. Returns {loss (float32 scalar), grad d loss / d student [N, V] or [0]}.
std::vector<at::Tensor> distillation_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels, double temperature,
                                                  double alpha, int64_t ignore_index, bool need_grad);

#ifdef BIGNLP_FAST_WITH_CUDA
std::vector<at::Tensor> add_layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, double eps);
std::vector<at::Tensor> add_layer_norm_bwd_cuda(const at::Tensor& grad_out,
                                                const std::optional<at::Tensor>& grad_residual_out,
                                                const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight, bool has_bias);
at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool tanh_approx);
std::vector<at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                           const std::optional<at::Tensor>& bias, bool tanh_approx);
std::vector<at::Tensor> conv_fwd_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, std::vector<int64_t> stride,
                                      std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                                      int64_t activation, bool save_pre);
std::vector<at::Tensor> conv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& pre, const std::optional<at::Tensor>& bias,
                                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                                      std::vector<int64_t> dilation, int64_t groups, int64_t activation);
at::Tensor causal_conv1d_fwd_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& initial_state, int64_t activation);
// rnn (one layer, one direction) on CUDA (csrc/cuda/rnn.cu): the rnn_*_cpu contract above, float32,
// float16 and bfloat16 (fp32 state and GEMMs), the CPU backend's workspace layout.
std::vector<at::Tensor> rnn_fwd_cuda(const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                     const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                     const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                                     const std::string& mode, bool reverse, bool save_workspace);
std::vector<at::Tensor> rnn_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                     const std::optional<at::Tensor>& grad_c_n, const at::Tensor& xw,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                     const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
                                     const std::optional<at::Tensor>& lengths, const at::Tensor& workspace,
                                     const std::string& mode, bool reverse);
// attention on CUDA tensor cores (csrc/cuda/attention.cu): the attention_*_cpu contract above,
// float16 / bfloat16, head dims up to 256, compute capability 8.0+.
std::vector<at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                           const std::optional<at::Tensor>& seed);
std::vector<at::Tensor> attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                           const std::optional<at::Tensor>& seed);
std::vector<at::Tensor> causal_conv1d_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& initial_state, int64_t activation);
// text_cnn_pool on CUDA (csrc/cuda/text_cnn_pool.cu): the text_cnn_pool_*_cpu contract above, float32,
// float16 and bfloat16 (fp32 accumulation); lengths int64 on x's device.
std::vector<at::Tensor> text_cnn_pool_fwd_cuda(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                               const std::optional<std::vector<at::Tensor>>& biases,
                                               const std::optional<at::Tensor>& lengths, int64_t activation);
std::vector<at::Tensor> text_cnn_pool_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                               const std::vector<at::Tensor>& weights,
                                               const std::optional<std::vector<at::Tensor>>& biases,
                                               const at::Tensor& argmax, const at::Tensor& pre, int64_t activation);

// Every CUDA entry point above, X(name) each: the bindings of csrc/bindings.cpp and of the CPU emulation
// that runs them in the tests (tests/cuda_emu/bindings.cpp) come from this one list.
#define BIGNLP_FAST_CUDA_OPS(X)                                                                         \
  X(add_layer_norm_fwd_cuda) X(add_layer_norm_bwd_cuda) X(bias_gelu_fwd_cuda) X(bias_gelu_bwd_cuda)   \
  X(conv_fwd_cuda) X(conv_bwd_cuda) X(causal_conv1d_fwd_cuda) X(causal_conv1d_bwd_cuda)               \
  X(attention_fwd_cuda) X(attention_bwd_cuda) X(rnn_fwd_cuda) X(rnn_bwd_cuda)                         \
  X(text_cnn_pool_fwd_cuda) X(text_cnn_pool_bwd_cuda)
#endif

}  // namespace bignlp_fast

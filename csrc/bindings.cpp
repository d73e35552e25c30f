// The one pybind11 module of the project: bignlp_fast._C.
// Argument checks live next to each kernel; this file only names things.
#include <torch/extension.h>

#include "ops.h"
#include "cpu/amx.h"
#include "cpu/buffer_cache.h"
#include "cpu/gemm.h"

#ifndef BIGNLP_FAST_CPU_FLAGS
#define BIGNLP_FAST_CPU_FLAGS ""
#endif
#ifndef BIGNLP_FAST_CPU_CAPABILITY
#define BIGNLP_FAST_CPU_CAPABILITY "DEFAULT"
#endif
#ifndef BIGNLP_FAST_CUDA_ARCHS
#define BIGNLP_FAST_CUDA_ARCHS ""
#endif

namespace py = pybind11;

// The instruction-set extensions the compiler was told it may use (with -march=native: this build
// machine's), by the names Linux's /proc/cpuinfo gives them: _backend refuses the cpu backend on a
// CPU that lacks one (an AVX-512 CPU without AVX512_BF16 would die on the first vdpbf16ps).
static py::list target_isa() {
  py::list isa;
  auto add = [&](const char* name) { isa.append(name); };
#ifdef __AVX__
  add("avx");
#endif
#ifdef __AVX2__
  add("avx2");
#endif
#ifdef __FMA__
  add("fma");
#endif
#ifdef __F16C__
  add("f16c");
#endif
#ifdef __BMI__
  add("bmi1");
#endif
#ifdef __BMI2__
  add("bmi2");
#endif
#ifdef __AVX512F__
  add("avx512f");
#endif
#ifdef __AVX512BW__
  add("avx512bw");
#endif
#ifdef __AVX512VL__
  add("avx512vl");
#endif
#ifdef __AVX512DQ__
  add("avx512dq");
#endif
#ifdef __AVX512CD__
  add("avx512cd");
#endif
#ifdef __AVX512VNNI__
  add("avx512_vnni");
#endif
#ifdef __AVX512BF16__
  add("avx512_bf16");
#endif
#ifdef __AVX512FP16__
  add("avx512_fp16");
#endif
#ifdef __AVX512VBMI__
  add("avx512vbmi");
#endif
#ifdef __AVX512VBMI2__
  add("avx512_vbmi2");
#endif
#ifdef __AVX512IFMA__
  add("avx512ifma");
#endif
#ifdef __AVX512BITALG__
  add("avx512_bitalg");
#endif
#ifdef __AVX512VPOPCNTDQ__
  add("avx512_vpopcntdq");
#endif
#ifdef __GFNI__
  add("gfni");
#endif
#ifdef __VAES__
  add("vaes");
#endif
#ifdef __VPCLMULQDQ__
  add("vpclmulqdq");
#endif
#ifdef __AMX_TILE__
  add("amx_tile");
#endif
#ifdef __AMX_BF16__
  add("amx_bf16");
#endif
#ifdef __AMX_INT8__
  add("amx_int8");
#endif
  return isa;
}

static py::dict build_info() {
  py::dict info;
  info["cpu_flags"] = BIGNLP_FAST_CPU_FLAGS;
  info["cpu_isa"] = target_isa();
  info["cpu_capability"] = BIGNLP_FAST_CPU_CAPABILITY;
  info["compiler"] = __VERSION__;
  info["torch_version"] = TORCH_VERSION;
#ifdef BIGNLP_FAST_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_archs"] = BIGNLP_FAST_CUDA_ARCHS;
#else
  info["with_cuda"] = false;
  info["cuda_archs"] = "";
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bignlp_fast compiled kernels (CPU, and CUDA when built with it)";
  m.def("build_info", &build_info, "How this extension was built: CPU flags, at::vec level, CUDA archs");

  using namespace bignlp_fast;
  // The kernels run without the GIL, as torch's own ops do: other Python threads (a server's other
  // requests, a data loader's) go on while one runs. They touch no Python object; what state they
  // share between calls is atomic or under a mutex (buffer_cache.cpp), and a parallel region of
  // one call never waits for threads of another (rnn.cpp's StepRegion).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("amx_bf16_available", &bignlp_fast::cpu::amx_bf16_available,
        "Whether this CPU and torch build run bf16 tile GEMMs on AMX (oneDNN's brgemm ukernel)");
  m.def("amx_bf16", &bignlp_fast::cpu::amx_bf16, "Whether the bf16 CPU kernels take their AMX path now");
  m.def("set_amx_bf16", &bignlp_fast::cpu::set_amx_bf16,
        "Turn the AMX path of the bf16 CPU kernels off or back on; returns the previous state");
  m.def("blas_sgemm_is_fast", &bignlp_fast::cpu::blas_sgemm_is_fast,
        "Whether torch's fp32 GEMM (MKL) beats the packed GEMM of the CPU kernels on this machine and build");
  m.def("linear_streaming_rows", &bignlp_fast::cpu::linear_streaming_rows, py::arg("prepacked") = false,
        "The most rows of x the CPU linear runs on its streaming kernels for a [N, K] weight (no packing), "
        "packed already by linear_pack_cpu or not");
  m.def("linear_prepacked_direct_rows", &bignlp_fast::cpu::linear_prepacked_direct_rows,
        "The most rows of float32 x the CPU linear multiplies by a packed weight without packing x (0: never)");
  m.def("bf16_dot_available", &bignlp_fast::cpu::bf16_dot_available,
        "Whether this build has the AVX512_BF16 dot-product tiles for bf16 CPU kernels (the path below AMX)");
  m.def("bf16_dot", &bignlp_fast::cpu::bf16_dot, "Whether bf16 CPU kernels not on AMX take the AVX512_BF16 tiles now");
  m.def("set_bf16_dot", &bignlp_fast::cpu::set_bf16_dot,
        "Turn the AVX512_BF16 tile path of the bf16 CPU kernels off or back on; returns the previous state");
  m.def("conv_own_loops", &bignlp_fast::conv_own_loops,
        "Whether CPU convolutions take the project's implicit-GEMM and 2-D Winograd loops now");
  m.def("set_conv_own_loops", &bignlp_fast::set_conv_own_loops,
        "Turn the project's own CPU convolution loops on or off, whatever the build; returns the previous state");
  m.def("buffer_cache_stats", [] {
    const auto s = bignlp_fast::cpu::buffer_cache_stats();
    py::dict d;
    d["limit_bytes"] = s.limit_bytes, d["cached_bytes"] = s.cached_bytes, d["cached_buffers"] = s.cached_buffers;
    d["hits"] = s.hits, d["misses"] = s.misses;
    return d;
  }, "The cache of large CPU output buffers (csrc/cpu/buffer_cache.h): limit, bytes and buffers held, hits, misses");
  m.def("buffer_cache_clear", &bignlp_fast::cpu::buffer_cache_clear,
        "Free the large CPU buffers the cache holds; returns the bytes freed");
  m.def("add_layer_norm_fwd_cpu", &add_layer_norm_fwd_cpu, nogil);
  m.def("add_layer_norm_bwd_cpu", &add_layer_norm_bwd_cpu, nogil);
  m.def("add_layer_norm_lane_cpu", &add_layer_norm_lane_cpu, nogil);
  m.def("bias_gelu_fwd_cpu", &bias_gelu_fwd_cpu, nogil);
  m.def("bias_gelu_bwd_cpu", &bias_gelu_bwd_cpu, nogil);
  m.def("attention_fwd_cpu", &attention_fwd_cpu, nogil);
  m.def("attention_lane_cpu", &attention_lane_cpu, nogil);
  m.def("attention_bwd_cpu", &attention_bwd_cpu, nogil);
  m.def("linear_fwd_cpu", &linear_fwd_cpu, nogil);
  m.def("linear_bwd_cpu", &linear_bwd_cpu, nogil);
  m.def("linear_pack_cpu", &linear_pack_cpu, nogil);
  m.def("linear_packed_fits", &linear_packed_fits);
  m.def("rnn_fwd_cpu", &rnn_fwd_cpu, py::arg("xw"), py::arg("w_hh"), py::arg("b_hh"), py::arg("h0"), py::arg("c0"),
        py::arg("w_hr"), py::arg("lengths"), py::arg("mode"), py::arg("reverse"), py::arg("save_workspace"),
        py::arg("packed_hh") = py::none(), nogil);
  m.def("rnn_cell_lane_cpu", &rnn_cell_lane_cpu, py::arg("mode"), py::arg("x"), py::arg("h"), py::arg("c"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("ours_projection"),
        py::arg("packed_ih") = py::none(), py::arg("packed_hh") = py::none(), nogil);
  m.def("rnn_cell_packed_units", &rnn_cell_packed_units);
  m.def("rnn_bwd_cpu", &rnn_bwd_cpu, nogil);
  m.def("layer_norm_lstm_fwd_cpu", &layer_norm_lstm_fwd_cpu, nogil);
  m.def("layer_norm_lstm_bwd_cpu", &layer_norm_lstm_bwd_cpu, nogil);
  m.def("conv_fwd_cpu", &conv_fwd_cpu, nogil);
  m.def("conv_bwd_cpu", &conv_bwd_cpu, nogil);
  m.def("conv_cpu_path", &conv_cpu_path);
  m.def("conv_cpu_grad_weight_path", &conv_cpu_grad_weight_path);
  m.def("causal_conv1d_fwd_cpu", &causal_conv1d_fwd_cpu, nogil);
  m.def("causal_conv1d_bwd_cpu", &causal_conv1d_bwd_cpu, nogil);
  m.def("text_cnn_pool_fwd_cpu", &text_cnn_pool_fwd_cpu, nogil);
  m.def("text_cnn_pool_bwd_cpu", &text_cnn_pool_bwd_cpu, nogil);
  m.def("distillation_loss_fwd_cpu", &distillation_loss_fwd_cpu, nogil);
  m.def("gpt2_decode_cpu", &gpt2_decode_cpu, "GPT-2's blocks for one decoding step (models/gpt.py)", nogil);
#ifdef BIGNLP_FAST_WITH_CUDA
#define BIGNLP_DEF_OP(name) m.def(#name, &name, nogil);
  BIGNLP_FAST_CUDA_OPS(BIGNLP_DEF_OP)
#undef BIGNLP_DEF_OP
#endif
}

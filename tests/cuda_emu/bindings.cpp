// The emulated CUDA backend as a Python module (tests/cuda_emu/build.py): csrc/cuda's entry points, run
// on CPU tensors by the CPU emulation of emu.h, and the emulation's controls.
#include <torch/extension.h>

#include "ops.h"

namespace emu {
void configure(int sms, bool reverse);
std::vector<uint64_t> stats();
}  // namespace emu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace bignlp_fast;
  m.def("add_layer_norm_fwd_cuda", &add_layer_norm_fwd_cuda);
  m.def("add_layer_norm_bwd_cuda", &add_layer_norm_bwd_cuda);
  m.def("bias_gelu_fwd_cuda", &bias_gelu_fwd_cuda);
  m.def("bias_gelu_bwd_cuda", &bias_gelu_bwd_cuda);
  m.def("conv_fwd_cuda", &conv_fwd_cuda);
  m.def("conv_bwd_cuda", &conv_bwd_cuda);
  m.def("causal_conv1d_fwd_cuda", &causal_conv1d_fwd_cuda);
  m.def("causal_conv1d_bwd_cuda", &causal_conv1d_bwd_cuda);
  m.def("attention_fwd_cuda", &attention_fwd_cuda);
  m.def("attention_bwd_cuda", &attention_bwd_cuda);
  m.def("rnn_fwd_cuda", &rnn_fwd_cuda);
  m.def("rnn_bwd_cuda", &rnn_bwd_cuda);
  m.def("configure", &emu::configure, py::arg("sms") = 4, py::arg("reverse") = false,
        "The emulated device's SM count, and whether a block's threads run in reverse order.");
  m.def("stats", &emu::stats, "[kernel launches, blocks, fiber switches] so far.");
}

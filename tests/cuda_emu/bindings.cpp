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
#define BIGNLP_DEF_OP(name) m.def(#name, &name);
  BIGNLP_FAST_CUDA_OPS(BIGNLP_DEF_OP)
#undef BIGNLP_DEF_OP
  m.def("configure", &emu::configure, py::arg("sms") = 4, py::arg("reverse") = false,
        "The emulated device's SM count, and whether a block's threads run in reverse order.");
  m.def("stats", &emu::stats, "[kernel launches, blocks, fiber switches] so far.");
}

// Shadows c10's header for the CPU emulation (tests/cuda_emu/emu.h).
#pragma once
#include "../../../emu.h"

namespace c10::cuda {
inline emu::CurrentStream getCurrentCUDAStream(int /*device*/ = -1) { return {}; }
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::getCurrentCUDAStream;
}  // namespace at::cuda

// Shadows c10's header for the CPU emulation (tests/cuda_emu/emu.h): the tensors are CPU tensors.
#pragma once
#include <c10/core/Device.h>

#include "../../../emu.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

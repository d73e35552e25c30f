// Shadows c10's header for the CPU emulation (tests/cuda_emu/emu.h).
#pragma once
#include "../../../emu.h"

namespace c10::cuda {
inline int current_device() { return 0; }
}  // namespace c10::cuda

// Shadows c10's header for the CPU emulation (tests/cuda_emu/emu.h).
#pragma once
#include <c10/util/Exception.h>

#include "../../../emu.h"

#define C10_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    const cudaError_t bignlp_emu_err = (expr);                                 \
    TORCH_CHECK(bignlp_emu_err == cudaSuccess, "emulated CUDA call failed");   \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

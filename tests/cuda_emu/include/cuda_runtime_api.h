// Shadows CUDA's header for the CPU emulation (../emu.h).
#pragma once
#include "../emu.h"

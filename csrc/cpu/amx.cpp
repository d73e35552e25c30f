// The switches for the bf16 tile paths of amx.h.
#include "amx.h"

#include "gemm.h"

#include <atomic>

namespace bignlp_fast::cpu {
namespace {
std::atomic<bool> g_amx_off{false};
std::atomic<bool> g_dot_off{false};
}  // namespace

bool amx_bf16_available() {
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
  return available;
}

bool amx_bf16() { return amx_bf16_available() && !g_amx_off.load(std::memory_order_relaxed); }

bool set_amx_bf16(bool on) {
  const bool before = amx_bf16();
  g_amx_off.store(!on, std::memory_order_relaxed);
  return before;
}

bool bf16_dot_available() {
#ifdef BIGNLP_FAST_BF16_DOT
  return true;
#else
  return false;
#endif
}

bool bf16_dot() { return bf16_dot_available() && !g_dot_off.load(std::memory_order_relaxed); }

bool set_bf16_dot(bool on) {
  const bool before = bf16_dot();
  g_dot_off.store(!on, std::memory_order_relaxed);
  return before;
}

}  // namespace bignlp_fast::cpu

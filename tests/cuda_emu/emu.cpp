// The CPU emulation's scheduler (see emu.h): a block's threads are fibers on one OS thread.
#include "emu.h"

#include <sys/mman.h>

#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;


// ---- fibers: a context switch saves the callee-saved registers and the FPU / SSE control words on the
// current stack and moves to the other stack (x86-64 System V). glibc's swapcontext would also save the
// signal mask, a system call per switch: 10x slower, and a block switches fibers at every sync point.
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_start();
asm(R"(
  .text
  .globl emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch

  .globl emu_fiber_start
  .type emu_fiber_start, @function
emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_start, .-emu_fiber_start
)");

// The stack pointer of a fiber that will start in entry(arg): the frame emu_fiber_switch pops.
void* fiber_initial_sp(void* stack_top, void (*entry)(void*), void* arg) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t{15}) - 10;
  const uint32_t control[2] = {0x1F80u, 0x037Fu};  // MXCSR and the x87 control word at their defaults
  std::memcpy(&sp[0], control, 8);
  sp[1] = 0;                                    // r15
  sp[2] = 0;                                    // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);    // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);      // r12
  sp[5] = 0;                                    // rbx
  sp[6] = 0;                                    // rbp
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_start);  // return address; then rsp = sp + 8: 16-aligned
  return sp;
}

// Under AddressSanitizer (build.py's asan=True) every switch is announced, so that it tracks which stack
// is live; otherwise these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;
constexpr size_t kGuardBytes = 4096;

struct Options {
  bool reverse = false;
} g_options;

struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0;
} g_stats;

std::unordered_map<const void*, int> g_max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

// A fiber stack with an inaccessible page below it, so that an overflow faults instead of corrupting.
struct Stack {
  void* base = nullptr;
  Stack() {
    base = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map a fiber stack");
    mprotect(base, kGuardBytes, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack(Stack&& o) noexcept : base(o.base) { o.base = nullptr; }
  ~Stack() {
    if (base != nullptr) munmap(base, kStackBytes + kGuardBytes);
  }
  void* high() const { return static_cast<char*>(base) + kGuardBytes + kStackBytes; }
};
std::vector<Stack> g_stacks;

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  void* stack_low = nullptr;
  void* asan_fake_stack = nullptr;
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
  uint64_t warp_seq = 0;  // warp operations entered
  uint64_t payload[2] = {0, 0};
  int line[2] = {0, 0};
  bool check_line[2] = {false, false};
  const char* waiting = nullptr;
  int wait_line = 0;
};

// What one lane computes for its whole warp at a warp operation (WMMA loads and products), by parity of
// the operation's sequence number as the payloads.
struct WarpScratch {
  uint64_t seq[2] = {0, 0};
  alignas(64) unsigned char data[2][kWarpScratchBytes];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpScratch> scratch;
  int alive = 0, arrived = 0, barrier_line = 0;
  uint64_t generation = 0, progress = 0;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // the scheduler's stack (for AddressSanitizer)
  size_t scheduler_stack_size = 0;
  void* asan_fake_stack = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  std::unordered_set<void*> poisoned;
  unsigned char* dynamic = nullptr;
};
thread_local Block* g_block = nullptr;

// Fiber f gives the CPU back to the scheduler; `last`: it has finished and is never resumed.
void to_scheduler(Block& b, Fiber& f, bool last) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(last ? nullptr : &f.asan_fake_stack, b.scheduler_stack, b.scheduler_stack_size);
#endif
  emu_fiber_switch(&f.sp, b.scheduler_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
}

// The scheduler runs fiber f until it gives the CPU back.
void to_fiber(Block& b, Fiber& f) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&b.asan_fake_stack, f.stack_low, kStackBytes);
#endif
  emu_fiber_switch(&b.scheduler_sp, f.sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(b.asan_fake_stack, nullptr, nullptr);
#endif
}

Block& block() {
  if (g_block == nullptr) throw std::runtime_error("cuda emulation: a device function was called outside a kernel");
  return *g_block;
}

void release_barrier_if_complete(Block& b) {
  if (b.arrived > 0 && b.arrived == b.alive) {
    ++b.generation;
    b.arrived = 0;
  }
}

void fiber_main(void*) {
  Block& b = *g_block;
  Fiber& f = *b.current;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "unknown exception in a kernel";
  }
  f.done = true;
  --b.alive;
  ++b.progress;
  release_barrier_if_complete(b);
  to_scheduler(b, f, true);  // never resumed
}

// Suspends the current fiber until ready() holds.
template <typename Ready>
void wait_until(Block& b, const Ready& ready, const char* what, int line) {
  ++b.progress;  // arriving is progress
  Fiber& f = *b.current;
  while (!ready()) {
    f.waiting = what;
    f.wait_line = line;
    to_scheduler(b, f, false);
  }
  f.waiting = nullptr;
  ++b.progress;
}

std::string where(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + ", " + std::to_string(f.tid.y) + ", " + std::to_string(f.tid.z) +
         ") of block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

void run_block(Block& b, const Config& cfg) {
  const int n = static_cast<int>(b.fibers.size());
  b.alive = n;
  b.arrived = 0;
  b.error.clear();
  b.poisoned.clear();
  for (WarpScratch& w : b.scratch) w.seq[0] = w.seq[1] = 0;
  if (cfg.shared > 0) std::memset(b.dynamic, 0xff, cfg.shared);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.done = false;
    f.warp_seq = 0;
    f.waiting = nullptr;
    f.sp = fiber_initial_sp(g_stacks[i].high(), fiber_main, nullptr);
    f.stack_low = static_cast<char*>(g_stacks[i].high()) - kStackBytes;
  }
  while (b.alive > 0) {
    const uint64_t before = b.progress;
    for (int k = 0; k < n && b.error.empty(); ++k) {
      Fiber& f = b.fibers[g_options.reverse ? n - 1 - k : k];
      if (f.done) continue;
      b.current = &f;
      threadIdx = f.tid;
      ++g_stats.switches;
      to_fiber(b, f);
    }
    if (!b.error.empty()) throw std::runtime_error("cuda emulation: " + b.error);
    if (b.alive > 0 && b.progress == before) {
      std::string msg = "cuda emulation: deadlock; waiting:";
      int shown = 0;
      for (const Fiber& f : b.fibers) {
        if (f.done || shown == 4) continue;
        msg += " " + where(f) + " at " + (f.waiting ? f.waiting : "?") + " (line " + std::to_string(f.wait_line) + ");";
        ++shown;
      }
      throw std::runtime_error(msg);
    }
  }
}

}  // namespace

Device& device() {
  static Device d;
  return d;
}

void fail(const std::string& message) { throw std::runtime_error(message); }

int device_attribute(cudaDeviceAttr attr) {
  const Device& d = device();
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return d.max_shared_optin;
    case cudaDevAttrMultiProcessorCount: return d.sms;
    case cudaDevAttrComputeCapabilityMajor: return d.major;
    case cudaDevAttrComputeCapabilityMinor: return d.minor;
  }
  fail("cuda emulation: unknown device attribute");
}

void set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > device().max_shared_optin)
    fail("cudaFuncSetAttribute: MaxDynamicSharedMemorySize " + std::to_string(bytes) + " is past the device's " +
         std::to_string(device().max_shared_optin));
  g_max_dynamic[kernel] = bytes;
}

int occupancy(const void* /*kernel*/, int threads, size_t dynamic_shared) {
  const Device& d = device();
  if (threads <= 0) fail("cudaOccupancyMaxActiveBlocksPerMultiprocessor: no threads");
  int blocks = std::min(d.max_blocks_per_sm, d.max_threads_per_sm / threads);
  if (dynamic_shared > 0) blocks = std::min<int>(blocks, static_cast<int>(d.shared_per_sm / dynamic_shared));
  return blocks;
}

void run_grid(const Config& cfg, const void* kernel, const std::function<void()>& body) {
  const dim3 g = cfg.grid, t = cfg.block;
  auto bad = [&](const std::string& why) {
    fail("emulated kernel launch: invalid configuration (" + why + "): grid (" + std::to_string(g.x) + ", " +
         std::to_string(g.y) + ", " + std::to_string(g.z) + "), block (" + std::to_string(t.x) + ", " +
         std::to_string(t.y) + ", " + std::to_string(t.z) + "), " + std::to_string(cfg.shared) + " B shared");
  };
  if (g.x == 0 || g.y == 0 || g.z == 0) bad("an empty grid");
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) bad("grid dimensions past (2^31 - 1, 65535, 65535)");
  const uint64_t threads = uint64_t{t.x} * t.y * t.z;
  if (threads == 0 || threads > 1024 || t.x > 1024 || t.y > 1024 || t.z > 64) bad("block size");
  if (cfg.shared > static_cast<size_t>(device().max_shared_default)) {
    const auto it = g_max_dynamic.find(kernel);
    if (it == g_max_dynamic.end() || static_cast<size_t>(it->second) < cfg.shared)
      bad("dynamic shared memory past 48 KiB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  if (g_block != nullptr) fail("cuda emulation: a kernel launched from inside a kernel");

  ++g_stats.launches;
  while (g_stacks.size() < threads) g_stacks.emplace_back();
  std::vector<unsigned char> dynamic(cfg.shared + 1024);
  Block b;
  b.dynamic = dynamic.data() + (1024 - reinterpret_cast<uintptr_t>(dynamic.data()) % 1024) % 1024;
  b.body = &body;
  b.fibers.resize(threads);
  b.scratch.resize((threads + 31) / 32);
  for (unsigned z = 0, i = 0; z < t.z; ++z)
    for (unsigned y = 0; y < t.y; ++y)
      for (unsigned x = 0; x < t.x; ++x, ++i) {
        Fiber& f = b.fibers[i];
        f.tid = {x, y, z};
        f.lane = static_cast<int>(i % 32);
        f.warp = static_cast<int>(i / 32);
      }
  gridDim = g;
  blockDim = t;
  g_block = &b;
  try {
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) {
          blockIdx = {x, y, z};
          ++g_stats.blocks;
          run_block(b, cfg);
        }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

void* dynamic_shared() { return block().dynamic; }

void poison_static_shared(void* p, size_t bytes) {
  if (block().poisoned.insert(p).second) std::memset(p, 0xff, bytes);
}

int lane_id() { return block().current->lane; }

void syncthreads(int line) {
  Block& b = block();
  if (b.arrived == 0) {
    b.barrier_line = line;
  } else if (line != b.barrier_line) {
    fail("__syncthreads reached at line " + std::to_string(line) + " by " + where(*b.current) +
         " while other threads of its block wait at line " + std::to_string(b.barrier_line));
  }
  const uint64_t generation = b.generation;
  ++b.arrived;
  release_barrier_if_complete(b);
  wait_until(b, [&] { return b.generation != generation; }, "__syncthreads", line);
}

namespace {
uint64_t warp_op(unsigned mask, uint64_t bits, int src, int line, bool check_line, const char* what) {
  Block& b = block();
  Fiber& f = *b.current;
  Fiber* lanes = &b.fibers[static_cast<size_t>(f.warp) * 32];
  const size_t in_warp = std::min<size_t>(32, b.fibers.size() - static_cast<size_t>(f.warp) * 32);
  if (mask != 0xffffffffu || in_warp != 32)
    fail(std::string(what) + " at line " + std::to_string(line) +
         ": the emulation takes full-warp masks in full warps only (mask " + std::to_string(mask) + ", " +
         std::to_string(in_warp) + " lanes)");
  const uint64_t seq = ++f.warp_seq;
  const int slot = static_cast<int>(seq & 1);
  f.payload[slot] = bits;
  f.line[slot] = line;
  f.check_line[slot] = check_line;
  wait_until(
      b,
      [&] {
        for (int l = 0; l < 32; ++l) {
          if (lanes[l].warp_seq >= seq) continue;
          if (lanes[l].done)
            fail(std::string(what) + " at line " + std::to_string(line) + ": lane " + std::to_string(l) +
                 " of the warp has exited (" + where(f) + ")");
          return false;
        }
        return true;
      },
      what, line);
  if (check_line) {
    for (int l = 0; l < 32; ++l)
      if (lanes[l].line[slot] != line || !lanes[l].check_line[slot])
        fail(std::string(what) + ": lanes of one warp at different operations (lines " + std::to_string(line) +
             " and " + std::to_string(lanes[l].line[slot]) + "), " + where(f));
  }
  return lanes[src].payload[slot];
}
}  // namespace

void syncwarp(unsigned mask, int line) { warp_op(mask, 0, 0, line, false, "__syncwarp"); }

uint64_t syncwarp_seq(int line) {
  warp_op(0xffffffffu, 0, 0, line, false, "a warp-wide operation");
  return block().current->warp_seq;
}

void* warp_scratch(uint64_t seq, size_t bytes, bool* first) {
  Block& b = block();
  if (bytes > kWarpScratchBytes) fail("cuda emulation: warp scratch too small");
  WarpScratch& w = b.scratch[static_cast<size_t>(b.current->warp)];
  const int slot = static_cast<int>(seq & 1);
  *first = w.seq[slot] != seq;
  w.seq[slot] = seq;
  return w.data[slot];
}

uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane, int line) {
  return warp_op(mask, bits, src_lane, line, true, "a warp shuffle");
}

// ---- control from the test module ---------------------------------------------------------------------
void configure(int sms, bool reverse) {
  device().sms = sms;
  g_options.reverse = reverse;
}

std::vector<uint64_t> stats() { return {g_stats.launches, g_stats.blocks, g_stats.switches}; }

}  // namespace emu

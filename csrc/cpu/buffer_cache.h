// Large CPU buffers that a kernel writes once per call (an RNN's output and workspace, a projection's
// output, a packed GEMM operand), from a bounded cache of freed ones.
//
// glibc hands out every allocation above its mmap threshold (at most 32 MiB) as fresh pages, and the
// kernel zeroes each page on its first write: a fresh 50 MiB tensor cost 31 ms to fill against 8 ms for
// a reused one on the 2-core Zen 5 (12800 faults of 4 KiB). Transparent huge pages (madvise, before
// the first write) make that 25 faults of 2 MiB, but each is still zeroed: clear_page was 11% of
// ops.linear's time on the LSTM input projection ([4096, 512] -> 2048, a 32 MiB output). So a freed
// buffer goes back to a cache, keyed by its size in whole 2 MiB pages, and the next call of the same
// size takes it already faulted in, the way torch's CUDA caching allocator reuses device memory.
//
// Bounded: at most BIGNLP_FAST_CPU_CACHE_MB MiB (default 512; 0 turns the cache off) of freed
// buffers are held, the oldest given back to the system first. Buffers under 8 MiB are plain
// at::empty (glibc reuses those itself). buffer_cache_clear() frees what the cache holds.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace bignlp_fast::cpu {

// at::empty for a buffer that will be written before it is read: from the cache when it is large.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options);
// at::zeros the same way.
inline at::Tensor zeros_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_huge(sizes, options).zero_();
}

struct BufferCacheStats {
  int64_t limit_bytes, cached_bytes, cached_buffers, hits, misses;
};
BufferCacheStats buffer_cache_stats();
// Frees every buffer the cache holds (buffers in use are not affected); returns the bytes freed.
int64_t buffer_cache_clear();

}  // namespace bignlp_fast::cpu

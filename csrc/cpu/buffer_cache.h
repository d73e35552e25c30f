// CPU buffers that a kernel writes before anything reads them (every output of the CPU kernels, and
// their large scratch buffers), from a bounded cache of freed ones.
//
// glibc serves a large allocation with fresh pages (mmap above its threshold, or heap it grows again
// after trimming a freed top), and the kernel zeroes each page on its first write. In a plain
// process that is the steady state, not a start-up cost: add_layer_norm on [1024, 768] (two 3 MiB
// outputs) page-faulted 1504 times a call, 1.6 ms against 0.12 ms with the memory kept; a BERT-base
// forward (B8 L128) took 21-36 thousand faults a call and 15-35% longer (2-core Zen 5). So a freed
// buffer goes back to this cache and the next call of the same size (or up to 1/8 smaller) takes it
// already faulted in, the way torch's CUDA caching allocator reuses device memory. Sizes are whole
// 64 KiB blocks up to 8 MiB, and whole 2 MiB pages from there (huge pages advised: a 32 MiB output
// is then 16 faults, not 8192).
//
// Bounded: at most BIGNLP_FAST_CPU_CACHE_MB MiB (default 512; 0 turns the cache off) of freed
// buffers are held, the oldest given back to the system first. Buffers under 128 KiB are plain
// at::empty (glibc's heap serves those without faults). buffer_cache_clear() frees what the cache
// holds.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

namespace bignlp_fast::cpu {

// at::empty for a buffer that will be written before it is read: from the cache from 128 KiB up.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// at::zeros the same way.
inline at::Tensor cached_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return cached_empty(sizes, options).zero_();
}
// at::empty_like(t) the same way (a tensor that is not contiguous: at::empty_like, t's strides).
inline at::Tensor cached_empty_like(const at::Tensor& t) {
  return t.is_contiguous() ? cached_empty(t.sizes(), t.options()) : at::empty_like(t);
}

struct BufferCacheStats {
  int64_t limit_bytes, cached_bytes, cached_buffers, hits, misses;
};
BufferCacheStats buffer_cache_stats();
// Frees every buffer the cache holds (buffers in use are not affected); returns the bytes freed.
int64_t buffer_cache_clear();

}  // namespace bignlp_fast::cpu

// The cache of large CPU buffers: see buffer_cache.h.
#include "buffer_cache.h"

#include <atomic>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <utility>

#include <sys/mman.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

namespace bignlp_fast::cpu {
namespace {

constexpr size_t k2M = size_t{2} << 20;
constexpr size_t kMinBytes = 4 * k2M;  // smaller buffers: at::empty

size_t limit_from_env() {
  const char* v = std::getenv("BIGNLP_FAST_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t{512} << 20;
  try {
    const long long mb = std::stoll(v);
    return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  } catch (const std::exception&) {
    TORCH_WARN("BIGNLP_FAST_CPU_CACHE_MB=", v, " is not a number of MiB; using 512");
    return size_t{512} << 20;
  }
}

class Cache {
 public:
  // A buffer of `bytes` (a multiple of 2 MiB), 2 MiB aligned, huge pages advised.
  void* take(size_t bytes) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second == bytes) {
          p = it->first;
          free_.erase(it);
          cached_ -= bytes;
          ++hits_;
          break;
        }
      if (p == nullptr) ++misses_;
    }
    if (p == nullptr) {
      p = std::aligned_alloc(k2M, bytes);
      TORCH_CHECK(p != nullptr, "bignlp_fast: out of memory allocating ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
    }
    report(p, static_cast<int64_t>(bytes));
    return p;
  }

  void give_back(void* p, size_t bytes) {
    report(p, -static_cast<int64_t>(bytes));
    std::list<std::pair<void*, size_t>> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit_) {
        evicted.emplace_back(p, bytes);
      } else {
        while (cached_ + bytes > limit_) {  // the oldest first
          evicted.splice(evicted.end(), free_, free_.begin());
          cached_ -= evicted.back().second;
        }
        free_.emplace_back(p, bytes);
        cached_ += bytes;
      }
    }
    for (auto& [q, _] : evicted) std::free(q);  // outside the lock
  }

  size_t limit() const { return limit_; }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(limit_), static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()), hits_,
            misses_};
  }

  int64_t clear() {
    std::list<std::pair<void*, size_t>> all;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& [q, _] : all) std::free(q);
    return static_cast<int64_t>(bytes);
  }

 private:
  std::mutex mu_;
  std::list<std::pair<void*, size_t>> free_;  // (buffer, bytes), oldest first
  size_t cached_ = 0;
  const size_t limit_ = limit_from_env();
  int64_t hits_ = 0, misses_ = 0;
  std::atomic<int64_t> in_use_{0};

  // The buffers are memory torch's profiler should see (the benchmark's peak-memory column reads
  // it): each one taken and given back is reported as torch's CPU allocator reports its own.
  void report(void* p, int64_t delta) {
    const int64_t in_use = in_use_.fetch_add(delta) + delta;
    c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(in_use), static_cast<size_t>(in_use),
                                     c10::Device(c10::DeviceType::CPU));
  }
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

struct Taken {  // a DataPtr's context: the buffer and its size, for give_back
  void* p;
  size_t bytes;
};
void give_back_taken(void* ctx) {
  const Taken* t = static_cast<Taken*>(ctx);
  cache().give_back(t->p, t->bytes);
  delete t;
}

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes < kMinBytes || cache().limit() == 0) return at::empty(sizes, options);
  const size_t bytes = (nbytes + k2M - 1) / k2M * k2M;
  void* p = cache().take(bytes);
  c10::DataPtr data(p, new Taken{p, bytes}, &give_back_taken, c10::Device(c10::DeviceType::CPU));
  // A storage like at::empty's: resizable, torch's CPU allocator serving a resize_ that grows it
  // (the cached buffer then goes back to the cache).
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, options.device(at::kCPU)).set_(storage, 0, sizes);
}

BufferCacheStats buffer_cache_stats() { return cache().stats(); }

int64_t buffer_cache_clear() { return cache().clear(); }

}  // namespace bignlp_fast::cpu

// The cache of large CPU buffers: see buffer_cache.h.
#include "buffer_cache.h"

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

namespace bignlp_fast::cpu {
namespace {

constexpr size_t k2M = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{128} << 10;  // smaller buffers: at::empty (glibc's heap serves them)
constexpr size_t kLargeBytes = 4 * k2M;          // from here: whole 2 MiB pages, huge pages advised

// The size of the buffer that holds `nbytes`: whole 64 KiB blocks below kLargeBytes, whole 2 MiB pages
// from there.
size_t buffer_bytes(size_t nbytes) {
  const size_t unit = nbytes < kLargeBytes ? size_t{64} << 10 : k2M;
  return (nbytes + unit - 1) / unit * unit;
}

// BIGNLP_FAST_CPU_CACHE_MB: a whole number of MiB, 0 (off) up to 1 TiB; anything else ("2G", "1.5",
// "-1", a number past 1 TiB) is said and the default kept, never read as some other number.
size_t limit_from_env() {
  constexpr size_t kDefault = size_t{512} << 20;
  const char* v = std::getenv("BIGNLP_FAST_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return kDefault;
  const std::string text(v);
  const bool digits = text.size() <= 7 && text.find_first_not_of("0123456789") == std::string::npos;
  if (!digits || std::stoull(text) > (size_t{1} << 20)) {
    TORCH_WARN("BIGNLP_FAST_CPU_CACHE_MB=", text, " is not a whole number of MiB from 0 to 1048576; using 512");
    return kDefault;
  }
  return static_cast<size_t>(std::stoull(text)) << 20;
}

class Cache;
Cache& cache();

class Cache {
 public:
  // A fork while another thread holds the lock (the kernels run without the GIL, so a thread may fork
  // while one is inside take or give_back) would leave the child's copy locked for good, and its first
  // kernel call hung (1-3 children in 1500). So the lock is taken across fork() and released on both
  // sides.
  Cache() { pthread_atfork(&Cache::lock_for_fork, &Cache::unlock_after_fork, &Cache::unlock_after_fork); }

  // A buffer of at least `bytes` (from buffer_bytes()): a cached one of the same size, or up to 1/8
  // larger (a batch whose token count varies asks for sizes that differ a little), else a new one,
  // 4 KiB aligned, or 2 MiB aligned with huge pages advised from kLargeBytes. Sets `bytes` to its size.
  // Of the cached buffers of the best size, the one given back last: the likeliest to be in cache
  // still (a multimap keeps equal keys in the order they came).
  void* take(size_t& bytes) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto fit = free_.lower_bound(bytes);
      if (fit != free_.end() && fit->first <= bytes + bytes / 8) {
        const auto it = std::prev(free_.upper_bound(fit->first));
        p = it->second.p;
        bytes = it->first;
        cached_ -= bytes;
        free_.erase(it);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      const bool large = bytes >= kLargeBytes;
      p = std::aligned_alloc(large ? k2M : 4096, bytes);
      TORCH_CHECK(p != nullptr, "bignlp_fast: out of memory allocating ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
      if (large) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
    }
    report(p, static_cast<int64_t>(bytes));
    return p;
  }

  void give_back(void* p, size_t bytes) {
    report(p, -static_cast<int64_t>(bytes));
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > limit_) {
        evicted.push_back(p);
      } else {
        while (cached_ + bytes > limit_) {  // the oldest first (a scan: eviction is rare once warm)
          auto oldest = free_.begin();
          for (auto it = free_.begin(); it != free_.end(); ++it)
            if (it->second.age < oldest->second.age) oldest = it;
          evicted.push_back(oldest->second.p);
          cached_ -= oldest->first;
          free_.erase(oldest);
        }
        free_.emplace(bytes, Entry{p, age_++});
        cached_ += bytes;
      }
    }
    for (void* q : evicted) std::free(q);  // outside the lock
  }

  size_t limit() const { return limit_; }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(limit_), static_cast<int64_t>(cached_), static_cast<int64_t>(free_.size()), hits_,
            misses_};
  }

  int64_t clear() {
    std::multimap<size_t, Entry> all;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (auto& [_, e] : all) std::free(e.p);
    return static_cast<int64_t>(bytes);
  }

 private:
  static void lock_for_fork() { cache().mu_.lock(); }
  static void unlock_after_fork() { cache().mu_.unlock(); }

  struct Entry {
    void* p;
    uint64_t age;  // order of arrival: the oldest is evicted first
  };
  std::mutex mu_;
  std::multimap<size_t, Entry> free_;  // by size in bytes
  size_t cached_ = 0;
  uint64_t age_ = 0;
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

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes < kMinBytes || cache().limit() == 0) return at::empty(sizes, options);
  size_t bytes = buffer_bytes(nbytes);
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

// Shared pieces of the CPU kernels: fp32 vector loads/stores from float or bfloat16 memory, the
// dtype dispatch, and the deterministic reduction of per-chunk partial sums over rows.
//
// Every CPU kernel works on steps of kStep = 2 * Vectorized<float>::size() elements (32 with
// AVX-512), the width of one Vectorized<BFloat16>, so float and bfloat16 share one loop body.
// A row's ragged tail goes through the same body via a zero-padded stack buffer.
#pragma once

#include <vector>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <ATen/Dispatch.h>

#include "buffer_cache.h"
#include "force_inline.h"

// The dtypes of the CPU kernels: float32 and bfloat16 (fp32 accumulation). Anything else raises
// "... not implemented for 'Half'", a case the Python layer has already routed elsewhere.
#define BIGNLP_DISPATCH_FLOAT_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace bignlp_fast::cpu {

// Scratch memory that starts on a cache line. glibc's malloc aligns to 16 bytes only, and where a
// buffer lands varies from process to process (how the heap happened to be laid out by then), so
// every 64-byte vector or AMX tile row read from a std::vector could straddle two lines in one run
// and not in the next. The bf16 LSTM's recurrence (B4 H512 T128, AMX) took 3.4-3.5 ms in processes
// whose packed W_hh and state began on a line and 7.9-9.0 ms in those where they did not (8
// processes, one build). Kernels keep their GEMM operands, tiles and per-row scratch in these.
constexpr std::size_t kLine = 64;
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kLine})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{kLine}); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const noexcept { return false; }
};
// A std::vector on a cache line (value-initialised, as std::vector).
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;
// n elements on a cache line, left uninitialised: for buffers written whole before they are read
// (a LineVector of a 4 MiB panel would zero it first, ~0.1 ms).
template <typename T>
struct LineFree {
  void operator()(T* p) const noexcept { ::operator delete(p, std::align_val_t{kLine}); }
};
template <typename T>
using LineBuffer = std::unique_ptr<T[], LineFree<T>>;
template <typename T>
LineBuffer<T> line_buffer(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T>, "line_buffer holds plain values");
  return LineBuffer<T>(static_cast<T*>(::operator new(std::max<int64_t>(n, 1) * sizeof(T), std::align_val_t{kLine})));
}

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * fVec::size();

inline int64_t round_up_to_step(int64_t n) { return (n + kStep - 1) / kStep * kStep; }

// The sum and the maximum of a vector's lanes.
inline float hsum(const fVec& v) { return at::vec::vec_reduce_all<float>(std::plus<fVec>(), v); }
inline float hmax(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}

// Pins v to a register. Where a loaded vector feeds several multiply-adds, GCC may fold the load
// into each of them instead (a memory operand per FMA): the 4 x 2 tile of the RNN's recurrent GEMM
// issued 12 loads for 8 FMAs per k that way (perf annotate), so at batch 4 the load ports, not the
// FMA units, set its pace. An empty asm that takes and gives back the register stops the folding.
// Measure each use: where the first use of a vector waits on memory, the folded form can be the
// faster one (skinny_gemm.h, cols_tile).
inline void in_register(fVec& v) {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  asm("" : "+v"(r));
  v = fVec(r);
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+v"(r));
  v = fVec(r);
#else
  (void)v;
#endif
}

// Full steps: exactly kStep elements.
BIGNLP_FAST_VEC_INLINE void load2(const float* p, fVec& a, fVec& b) {
  a = fVec::loadu(p);
  b = fVec::loadu(p + fVec::size());
}
// bf16 -> fp32 is exact: the 16 bits become the upper half of each fp32 lane. With AVX2 each half step is
// one widening load and a shift; ATen's load_to_float loads the whole step and extracts its halves first
// (Zen 3: add_layer_norm's bf16 forward 1.12x more, bias_gelu's 1.04x).
BIGNLP_FAST_VEC_INLINE void load2(const c10::BFloat16* p, fVec& a, fVec& b) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16));
#else
  at::vec::load_to_float(p, a, b);
#endif
}
BIGNLP_FAST_VEC_INLINE void store2(float* p, const fVec& a, const fVec& b) {
  a.store(p);
  b.store(p + fVec::size());
}
// fp32 -> bf16, rounding to nearest even. Where the CPU has AVX512_BF16 (and the build targets it)
// this is one instruction for 32 values; ATen's portable conversion emulates it in ~16. The one
// difference: the instruction flushes fp32 denormals (|v| < 1.2e-38) to zero.
inline at::vec::Vectorized<c10::BFloat16> to_bf16(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  return at::vec::Vectorized<c10::BFloat16>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
#else
  return at::vec::convert_float_bfloat16(a, b);
#endif
}
BIGNLP_FAST_VEC_INLINE void store2(c10::BFloat16* p, const fVec& a, const fVec& b) { to_bf16(a, b).store(p); }

// A [B, C, L] tensor laid out [B, L, C] (and not also contiguous), as a sequence model's [B, L, C]
// activation transposed for a convolution over L is: the depthwise conv1d and causal_conv1d kernels
// read it as it is.
inline bool seq_channels_last(const at::Tensor& t) {
  return t.dim() == 3 && !t.is_contiguous() && t.transpose(1, 2).is_contiguous();
}

// Whether an eager lane (the `*_lane_cpu` functions, see ops/*.py's _lane) can hand t to a CPU kernel
// as it is, as far as every lane goes: a strided, non-nested CPU tensor of dtype that autograd need
// not see (grad: grad mode is on). Each lane adds its own layout and shape conditions.
inline bool lane_tensor(const at::Tensor& t, at::ScalarType dtype, bool grad) {
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_nested() && t.scalar_type() == dtype &&
         !(grad && t.requires_grad());
}

// Streaming (non-temporal) stores of one full step, for outputs too large to stay in cache: they
// skip the read-for-ownership a normal store makes of every line it writes, so a memory-bound
// kernel moves each output once instead of twice. p must be 64-byte aligned (see stream_ok); a
// writer calls stream_fence() before its results are read by another thread. stream2 and
// stream_bf16 stream in AVX-512 builds only (plain stores elsewhere); stream_vec in AVX2 builds too.
inline bool stream_ok(const void* p, int64_t row_bytes, int64_t total_bytes) {
  constexpr int64_t kStreamBytes = int64_t{16} << 20;  // past any L3 share of a few cores
  return total_bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(p) % 64 == 0 && row_bytes % 64 == 0;
}
inline void stream2(float* p, const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, a);
  _mm512_stream_ps(p + fVec::size(), b);
#else
  store2(p, a, b);
#endif
}
inline void stream_bf16(c10::BFloat16* p, const at::vec::Vectorized<c10::BFloat16>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#else
  v.store(p);
#endif
}
inline void stream2(c10::BFloat16* p, const fVec& a, const fVec& b) { stream_bf16(p, to_bf16(a, b)); }
// One whole fp32 vector; a writer fills whole lines with consecutive calls, so that the
// write-combining buffer sends each line once.
inline void stream_vec(float* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}
// Prefetches the cache lines of one step of p (for a row that is processed next), for reading or,
// with for_write, for writing. Row kernels make several passes over a row held in L1; prefetching the
// next row during the later passes keeps memory busy while they compute.
template <typename T>
inline void prefetch_step(const T* p, bool for_write = false) {
  for (int64_t b = 0; b < kStep * static_cast<int64_t>(sizeof(T)); b += 64) {
    if (for_write) __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 1);
    else __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0);
  }
}

// Streaming kernels (one pass over contiguous rows) prefetch the step kPrefetchBytes ahead of the one
// they work on: with the arithmetic of GELU per element, the hardware prefetcher alone leaves each
// core waiting on memory. Measured on a 2-core Xeon: bias_gelu's fp32 forward at 8192x768 went from
// 1.70 to 1.37 ms (best of 5, 2 threads), with 2, 4, 8 or 16 KB about the same.
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void prefetch_ahead(const T* p, bool for_write = false) {
  prefetch_step(reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), for_write);
}

// Part `part` of `parts` of the `bytes` at p asked into the caches (prefetcht2: L2 on the CPUs seen),
// line by line from its start: a kernel that works on one block while the next is fetched spreads
// the next block's lines over its own loop (the RNN's next input step, the depthwise convolution's
// next plane).
inline void prefetch_share(const void* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* base = static_cast<const char*>(p);
  const int64_t b0 = bytes * part / parts, b1 = bytes * (part + 1) / parts;
  for (int64_t q = b0 & ~int64_t{63}; q < b1; q += 64) __builtin_prefetch(base + q, 0, 1);
}

// Partial steps: n < kStep elements; lanes past n load as zero and are not stored.
template <typename T>
BIGNLP_FAST_VEC_INLINE void load2(const T* p, int64_t n, fVec& a, fVec& b) {
  T buf[kStep] = {};
  std::memcpy(buf, p, n * sizeof(T));
  load2(buf, a, b);
}
template <typename T>
BIGNLP_FAST_VEC_INLINE void store2(T* p, int64_t n, const fVec& a, const fVec& b) {
  T buf[kStep];
  store2(buf, a, b);
  std::memcpy(p, buf, n * sizeof(T));
}

// float: masked vector loads and stores where the ISA has them (AVX-512), instead of a copy through
// a buffer (a memcpy call per partial step was 12% of a conv2d whose output rows are 32 wide).
BIGNLP_FAST_VEC_INLINE void load2(const float* p, int64_t n, fVec& a, fVec& b) {
  constexpr int64_t V = fVec::size();
  a = fVec::loadu(p, std::min(n, V));
  b = n > V ? fVec::loadu(p + V, n - V) : fVec(0.f);
}
BIGNLP_FAST_VEC_INLINE void store2(float* p, int64_t n, const fVec& a, const fVec& b) {
  constexpr int64_t V = fVec::size();
  a.store(p, std::min(n, V));
  if (n > V) b.store(p + V, n - V);
}
#if defined(CPU_CAPABILITY_AVX512)
// bf16 the same way: masked 16-bit loads widened by a shift, and the rounding of to_bf16 stored under a
// mask. Through the buffer above, each partial step was a memcpy call of a variable size: the bf16
// depthwise conv2d (rows of 56, a partial step each) ran slower than its fp32 twice the bytes.
BIGNLP_FAST_VEC_INLINE fVec load_bf16_masked(const c10::BFloat16* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
BIGNLP_FAST_VEC_INLINE void load2(const c10::BFloat16* p, int64_t n, fVec& a, fVec& b) {
  a = load_bf16_masked(p, std::min<int64_t>(n, 16));
  b = n > 16 ? load_bf16_masked(p + 16, n - 16) : fVec(0.f);
}
BIGNLP_FAST_VEC_INLINE void store2(c10::BFloat16* p, int64_t n, const fVec& a, const fVec& b) {
  const __mmask32 m = n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1);
  _mm512_mask_storeu_epi16(p, m, static_cast<__m512i>(to_bf16(a, b)));
}
#endif

// Either kind, chosen by how many elements remain.
template <typename T>
BIGNLP_FAST_VEC_INLINE void load2_any(const T* p, int64_t n, fVec& a, fVec& b) {
  if (n >= kStep) load2(p, a, b); else load2(p, n, a, b);
}
template <typename T>
BIGNLP_FAST_VEC_INLINE void store2_any(T* p, int64_t n, const fVec& a, const fVec& b) {
  if (n >= kStep) store2(p, a, b); else store2(p, n, a, b);
}

// A full step by stream2 when `stream`, else by store2; a partial one always by store2.
template <typename T>
inline void store2_maybe_stream(T* p, int64_t n, const fVec& a, const fVec& b, bool stream) {
  if (stream && n >= kStep) stream2(p, a, b); else store2_any(p, n, a, b);
}

// Stores one step of a, b as T (n elements, as store2_maybe_stream) and leaves in a, b the values
// stored, i.e. rounded to T's precision: for bf16 one conversion, where rounding and then storing took
// two (add_layer_norm's bf16 forward, whose sum is stored and then normalised as stored: 1.24x at
// 8192x768 on a Zen 3, AVX2, where a conversion of 16 values is ~16 instructions).
template <typename T>
inline void store2_rounded(T* p, int64_t n, fVec& a, fVec& b, bool stream) {
  store2_maybe_stream(p, n, a, b, stream);
}
inline void store2_rounded(c10::BFloat16* p, int64_t n, fVec& a, fVec& b, bool stream) {
  const at::vec::Vectorized<c10::BFloat16> v = to_bf16(a, b);
  if (n < kStep) v.store(p, static_cast<int>(n));
  else if (stream) stream_bf16(p, v);
  else v.store(p);
  std::tie(a, b) = at::vec::convert_bfloat16_float(v);
}

// ---- bf16 steps in split lane order ----------------------------------------------------------------
// Widening 32 bf16 values into two fp32 vectors in their own order takes three shuffles (an extract and
// two zero-extensions); in split order, a = the even-indexed values (one shift) and b = the odd-indexed
// ones (one mask), it takes none, and the store puts them back with one word permute after its usual
// conversion. An elementwise kernel whose only other operands are per-column vectors can run in that
// order: it permutes those vectors once per call (split_columns) and loads and stores its rows with
// load2_split / store2_split. bias_gelu does, where GELU's coefficient lookups (register permutes)
// compete with the widening for the shuffle port: its bf16 forward went from 14.0-14.4 to 13.2-13.7
// cycles per 16 values (one Zen 5 core, in cache; fp32: 11.3-11.7), the backward ~2% (storing by
// integer rounding instead of the conversion and permute: 16.7, slower). For float (and builds
// without AVX512_BF16) these are the plain load2_any / store2_maybe_stream, in column order.
template <typename T>
constexpr bool kSplitLanes =
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

template <typename T>
inline void load2_split(const T* p, int64_t n, fVec& a, fVec& b) {
  if constexpr (!kSplitLanes<T>) {
    load2_any(p, n, a, b);
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    const __mmask32 m = n >= kStep ? ~__mmask32(0) : static_cast<__mmask32>((uint32_t{1} << n) - 1);
    const __m512i x = _mm512_maskz_loadu_epi16(m, p);  // lanes past n: 0
    a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
  }
}

template <typename T>
inline void store2_split(T* p, int64_t n, const fVec& a, const fVec& b, bool stream) {
  if constexpr (!kSplitLanes<T>) {
    store2_maybe_stream(p, n, a, b, stream);
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
    // [bf16(a) | bf16(b)] (rounded as to_bf16), then word 2i <- i, 2i + 1 <- 16 + i
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i v = _mm512_permutexvar_epi16(order, halves);
    if (n >= kStep) {
      if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
      else _mm512_storeu_si512(p, v);
    } else {
      _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint32_t{1} << n) - 1), v);
    }
#endif
  }
}

// A per-column fp32 vector of Hp (a multiple of kStep) values into split order for T, or with `back`
// from split order into column order.
template <typename T>
inline void split_columns(float* v, int64_t Hp, bool back = false) {
  if constexpr (kSplitLanes<T>) {
    constexpr int64_t V = fVec::size();
    for (int64_t j = 0; j < Hp; j += kStep) {
      float tmp[kStep];
      for (int64_t i = 0; i < V; ++i) {
        if (back) tmp[2 * i] = v[j + i], tmp[2 * i + 1] = v[j + V + i];
        else tmp[i] = v[j + 2 * i], tmp[V + i] = v[j + 2 * i + 1];
      }
      std::memcpy(v + j, tmp, sizeof(tmp));
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// 8 bf16 at p as 8 fp32 lanes: each widened to 32 bits and shifted into the high half (exact).
inline __m256 load8_bf16(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#endif

// One fp32 vector from / to the first n (< or >= a vector's width) values at p.
BIGNLP_FAST_VEC_INLINE fVec load_any(const float* p, int64_t n) { return n >= fVec::size() ? fVec::loadu(p) : fVec::loadu(p, n); }
BIGNLP_FAST_VEC_INLINE void store_any(float* p, const fVec& v, int64_t n) {
  if (n >= fVec::size()) v.store(p); else v.store(p, n);
}
// bf16: a (masked) 16-bit load widened by a shift, and the rounding of to_bf16, where the ISA has them
// (AVX-512); with AVX2, whole vectors by the shift and ATen's vector rounding, partial loads element by
// element (element by element: a bf16 LSTM forward, B32 I=H=512 T128, 130 ms on a Zen 2, 108 ms so).
BIGNLP_FAST_VEC_INLINE fVec load_any(const c10::BFloat16* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  return load_bf16_masked(p, n);
#else
#if defined(CPU_CAPABILITY_AVX2)
  if (n >= 8) return fVec(load8_bf16(p));
#endif
  float buf[fVec::size()] = {};
  for (int64_t i = 0; i < std::min<int64_t>(n, fVec::size()); ++i) buf[i] = static_cast<float>(p[i]);
  return fVec::loadu(buf);
#endif
}
BIGNLP_FAST_VEC_INLINE void store_any(c10::BFloat16* p, const fVec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#elif defined(CPU_CAPABILITY_AVX2)
  // ATen's vector rounding (to nearest even, NaN kept), of v twice; the first min(n, 8) values stored
  const at::vec::Vectorized<c10::BFloat16> b = at::vec::convert_float_bfloat16(v, v);
  if (n >= fVec::size()) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(b));
  else b.store(p, static_cast<int>(n));
#else
  float buf[fVec::size()];
  v.store(buf);
  for (int64_t i = 0; i < std::min<int64_t>(n, fVec::size()); ++i) p[i] = static_cast<c10::BFloat16>(buf[i]);
#endif
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The 8 x 8 block r[0..8) transposed in registers.
inline void transpose_8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);  // column 1 | 5
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The 8 x 8 blocks of a transpose into fp32: columns [0, N / 8 * 8) of rows [0, M) of src, 8 values of
// a row at a time as 8 fp32 lanes by load(p) (the rows past M of a block: zero, not stored). Returns
// the columns done.
template <typename T, typename Load>
inline int64_t transpose_8x8_blocks(const T* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N,
                                    Load load) {
  const int64_t n_vec = N / 8 * 8;
  for (int64_t i = 0; i < M; i += 8) {
    const int64_t mi = std::min<int64_t>(8, M - i);
    const __m256i rows =  // lanes [0, mi): the rows that exist
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(mi)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t j = 0; j < n_vec; j += 8) {
      __m256 r[8];
      for (int64_t t = 0; t < 8; ++t) r[t] = t < mi ? load(src + (i + t) * ld_src + j) : _mm256_setzero_ps();
      transpose_8x8(r);
      for (int64_t t = 0; t < 8; ++t) {
        if (mi == 8) _mm256_storeu_ps(dst + (j + t) * ld_dst + i, r[t]);
        else _mm256_maskstore_ps(dst + (j + t) * ld_dst + i, rows, r[t]);
      }
    }
  }
  return n_vec;
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N: a block transpose of 32-bit values, in
// 8 x 8 blocks through registers wherever the ISA has AVX2. Not ATen's: its AVX2 version goes element
// by element (at 32 rows a power of two apart those reads also fall into a few L1 sets), and its
// AVX-512 16 x 16 blocks are an out-of-line call that first zeroes a 1 KiB block of 16 vectors with
// memset: packing a [2048, 512] weight for the fp32 GEMM took 231-255 us against 92-100 this way, and
// a clone 49-62 (Zen 4), where the weight's packing set the pace of products of a few dozen rows. It
// only moves bits, so fp32 values and pairs of bf16 alike come through as they were.
inline void transpose_f32(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N) {
  int64_t n_vec = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  n_vec = transpose_8x8_blocks(src, ld_src, dst, ld_dst, M, N, [](const float* p) { return _mm256_loadu_ps(p); });
#endif
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = n_vec; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}

// transpose_f32 of 32-bit elements of any kind (fp32, or pairs of bf16); columns [M, M_pad) of dst
// are zeroed (a GEMM panel wider than the rows it holds).
inline void transpose_32bit(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst, int64_t M, int64_t N,
                            int64_t M_pad) {
  transpose_f32(reinterpret_cast<const float*>(src), ld_src, reinterpret_cast<float*>(dst), ld_dst, M, N);
  if (M < M_pad)
    for (int64_t j = 0; j < N; ++j) std::fill(dst + j * ld_dst + M, dst + j * ld_dst + M_pad, 0u);
}

// dst[j * ld_dst + i] = float(src[i * ld_src + j]) for i < M, j < N, and 0 for M <= i < M_pad: packing
// rows of a weight as the columns of a GEMM panel (8 x 8 or 16 x 16 blocks through registers; bf16
// widened on the way in 8 x 8 blocks, where the ISA has AVX2: element by element, the packing of a
// bf16 weight [768, 768] took ~0.75 ms a call on a 2-core Zen 2, as long as the GEMM of 65 rows).
template <typename T>
inline void transpose_to_float(const T* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t M, int64_t N,
                               int64_t M_pad) {
  if constexpr (std::is_same_v<T, float>) {
    transpose_f32(src, ld_src, dst, ld_dst, M, N);
  } else {
    int64_t j_vec = 0;  // columns [0, j_vec) by 8 x 8 blocks, the rest element by element
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      j_vec = transpose_8x8_blocks(src, ld_src, dst, ld_dst, M, N,
                                   [](const c10::BFloat16* p) { return load8_bf16(p); });
#endif
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = j_vec; j < N; ++j) dst[j * ld_dst + i] = static_cast<float>(src[i * ld_src + j]);
  }
  if (M < M_pad)
    for (int64_t j = 0; j < N; ++j) std::fill(dst + j * ld_dst + M, dst + j * ld_dst + M_pad, 0.f);
}

// n values of T as fp32 times mul, and back (the row copies of the packing and write-out steps).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n, float mul = 1.f) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n, float mul = 1.f) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * mul);
}

// A [rows, H] fp32 scratch copy of a small vector (weights), padded with zeros to a whole step.
template <typename T>
inline void to_padded_float(const T* src, int64_t n, float* dst, int64_t n_padded, float fill_absent) {
  if (src == nullptr) {
    std::fill(dst, dst + n, fill_absent);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
  std::fill(dst + n, dst + n_padded, 0.f);
}

// Rows per chunk for reductions over rows (grad of weight/bias): at most 64 chunks, a function of
// the row count alone, so the reduction order, and the result, never depends on the thread count.
inline int64_t rows_per_chunk(int64_t rows) { return std::max<int64_t>(16, (rows + 63) / 64); }

// Sums [chunks, Hp] fp32 partials over chunks, in chunk order, into a [H] tensor of `dtype`.
inline at::Tensor reduce_partials(const at::Tensor& partial, int64_t H, at::ScalarType dtype) {
  const int64_t chunks = partial.size(0), Hp = partial.size(1);
  at::Tensor total = at::empty({H}, partial.options());
  const float* p = partial.const_data_ptr<float>();
  float* t = total.data_ptr<float>();
  at::parallel_for(0, H, 1024, [&](int64_t j0, int64_t j1) {
    std::fill(t + j0, t + j1, 0.f);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = j0; j < j1; ++j) t[j] += p[c * Hp + j];
  });
  return total.to(dtype);
}

// The state before each step of a recurrent layer, [T * B, S] fp32, from `after` [T, B, S] (the
// state saved after each step) and h0 [B, S]: the state saved after the step processed before, or h0.
inline at::Tensor states_before_each_step(const at::Tensor& after, const at::Tensor& h0, bool reverse) {
  const int64_t T = after.size(0);
  const at::Tensor h0f = h0.to(at::kFloat).unsqueeze(0);
  at::Tensor before = cached_empty({T, after.size(1), after.size(2)}, after.options());
  if (!reverse) {
    before.narrow(0, 0, 1).copy_(h0f);
    before.narrow(0, 1, T - 1).copy_(after.narrow(0, 0, T - 1));
  } else {
    before.narrow(0, 0, T - 1).copy_(after.narrow(0, 1, T - 1));
    before.narrow(0, T - 1, 1).copy_(h0f);
  }
  return before.view({T * after.size(1), after.size(2)});
}

// Per-sequence lengths of a recurrent layer (int64 [B] on the CPU), or T for every row when absent:
// step t of row b is active when t < lengths[b].
inline std::vector<int64_t> lengths_of(const std::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> out(B, T);
  if (lengths.has_value()) {
    const auto l = lengths->to(at::kLong).contiguous();
    TORCH_CHECK(l.numel() == B, "rnn: lengths must have one entry per batch row");
    for (int64_t b = 0; b < B; ++b) out[b] = l.const_data_ptr<int64_t>()[b];
  }
  return out;
}

}  // namespace bignlp_fast::cpu

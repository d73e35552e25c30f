// nvcuda::wmma for the CPU emulation (see ../emu.h): 16 x 16 x 16 fragments. Each lane holds the whole
// tile (a GPU spreads it over the warp in an opaque layout, which the kernels never index); loads and
// products are warp synchronisation points computed once for the warp (as the hardware does them at
// once), and a store writes lane l's share of the elements (every 32nd), so a lane that reads the stored
// tile before a __syncwarp sees stale data, as it may on a GPU.
#pragma once
#include "../emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The values are held as float: a 16-bit operand converts exactly, and the products are fp32.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  float v[rows][cols];
};

namespace detail {
inline void check(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    emu::fail(std::string("wmma::") + what + ": the pointer must be 256-bit (32-byte) aligned");
  if ((ldm * elem) % 16 != 0)
    emu::fail(std::string("wmma::") + what + ": ldm must be a multiple of 16 bytes");
}

// A warp-wide operation whose result (a fragment's values) one lane computes for all: fill(values).
template <typename F, typename Fill>
void warp_once(F& f, const Fill& fill) {
  static_assert(sizeof(f.v) <= emu::kWarpScratchBytes);
  const uint64_t seq = emu::syncwarp_seq(__LINE__);
  bool first = false;
  void* shared = emu::warp_scratch(seq, sizeof(f.v), &first);
  if (first) {
    fill(f.v);
    std::memcpy(shared, f.v, sizeof(f.v));
  } else {
    std::memcpy(f.v, shared, sizeof(f.v));
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& row : f.v)
    for (auto& x : row) x = static_cast<float>(value);
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout");
  static_assert(std::is_same_v<std::remove_cv_t<P>, T>, "fragment and memory types differ");
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  detail::warp_once(f, [&](float (&v)[F::rows][F::cols]) {
    for (int r = 0; r < F::rows; ++r)
      for (int c = 0; c < F::cols; ++c)
        v[r][c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
  });
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  detail::warp_once(f, [&](float (&v)[M][N]) {
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) v[r][c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  });
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, sizeof(T), "store_matrix_sync");
  emu::syncwarp(0xffffffffu, __LINE__);
  for (int e = emu::lane_id(); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = static_cast<T>(f.v[r][c]);
  }
}

// d = a b + c, fp32 products and sums in k order.
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  detail::warp_once(d, [&](float (&v)[M][N]) {
    for (int m = 0; m < M; ++m) {
      float acc[N];
      for (int n = 0; n < N; ++n) acc[n] = c.v[m][n];
      for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) acc[n] = std::fma(a.v[m][k], b.v[k][n], acc[n]);
      for (int n = 0; n < N; ++n) v[m][n] = acc[n];
    }
  });
}

}  // namespace nvcuda::wmma

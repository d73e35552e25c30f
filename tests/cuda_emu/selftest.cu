// Kernels with known bugs (and their fixed twins) for tests/test_cuda_emulation.py: the emulation must
// report each bug, or show it as a wrong result, and run the fixed kernel right. Written as CUDA and
// rewritten by build.py like csrc/cuda (it would compile with nvcc too, less the pybind11 part).
#include <mma.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Thread i writes s[i] and reads s[(i + shift) % n]: without the barrier it reads a slot its owner has
// not written yet when the owner runs later (threads in order: shift > 0; reversed: shift < 0).
__global__ void exchange_kernel(float* out, int shift, bool sync) {
  __shared__ float s[64];
  const int i = threadIdx.x, n = blockDim.x;
  s[i] = static_cast<float>(i);
  if (sync) __syncthreads();
  out[i] = s[(i + shift + n) % n];
}

// The same in one warp, synchronised by __syncwarp.
__global__ void warp_exchange_kernel(float* out, bool sync) {
  __shared__ float s[32];
  const int i = threadIdx.x;
  s[i] = static_cast<float>(i);
  if (sync) __syncwarp();
  out[i] = s[i ^ 1];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Sums by shuffles: every lane gets the warp's sum of lane numbers (496).
__global__ void warp_sum_kernel(float* out) {
  float x = static_cast<float>(threadIdx.x % 32);
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  out[threadIdx.x] = x;
}

// Reads dynamic shared memory nobody wrote: 0xff bytes, NaN. (One instance per test of the shared
// memory attribute, which stays set on a kernel for the life of the process.)
template <int kInstance>
__global__ void uninitialized_kernel(float* out) {
  extern __shared__ float dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}

// Copies in[0 .. blockDim.x): past the end of `in` when it is shorter (AddressSanitizer's test).
__global__ void copy_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }

__global__ void index_kernel(float* out) {
  const unsigned i = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  out[i] = static_cast<float>(blockIdx.x + 1000 * blockIdx.y);
}

// C[16, 16] = A[16, 16] B[16, 16] by one warp on WMMA (half operands, fp32 accumulation); `offset`
// elements into the shared tiles (a multiple of 16 keeps the 32-byte alignment WMMA needs).
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(256) __half sa[16 * 16 + 64];
  __shared__ __align__(256) __half sb[16 * 16];
  for (int e = threadIdx.x; e < 256; e += 32) {
    sa[offset + e] = a[e];
    sb[e] = b[e];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, sa + offset, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

template <typename F>
std::string error_of(const F& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

namespace emu {
void configure(int sms, bool reverse);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("configure", &emu::configure, py::arg("sms") = 4, py::arg("reverse") = false);
  m.def("exchange", [](int threads, int shift, bool sync) {
    std::vector<float> out(threads);
    exchange_kernel<<<1, threads>>>(out.data(), shift, sync);
    return out;
  });
  m.def("warp_exchange", [](bool sync) {
    std::vector<float> out(32);
    warp_exchange_kernel<<<1, 32>>>(out.data(), sync);
    return out;
  });
  m.def("warp_sum", [](int threads) {
    std::vector<float> out(threads);
    warp_sum_kernel<<<1, threads>>>(out.data());
    return out;
  });
  m.def("uninitialized", [] {
    std::vector<float> out(32);
    uninitialized_kernel<0><<<1, 32, 32 * sizeof(float)>>>(out.data());
    return out;
  });
  m.def("copy", [](int n, int threads) {
    std::vector<float> in(n, 1.f), out(threads);
    copy_kernel<<<1, threads>>>(in.data(), out.data());
    return out;
  });
  m.def("index", [](unsigned gx, unsigned gy, unsigned threads) {
    std::vector<float> out(size_t{gx} * gy * threads);
    index_kernel<<<dim3(gx, gy), threads>>>(out.data());
    return out;
  });
  m.def("wmma", [](const std::vector<float>& a, const std::vector<float>& b, int offset) {
    std::vector<__half> ha(a.begin(), a.end()), hb(b.begin(), b.end());
    alignas(32) float c[256];  // WMMA stores to 32-byte aligned memory
    wmma_kernel<<<1, 32>>>(ha.data(), hb.data(), c, offset);
    return std::vector<float>(c, c + 256);
  });
  // The error each launch gets ("" when none).
  m.def("errors", [] {
    std::vector<float> out(1 << 16);
    py::dict e;
    e["divergent_barrier"] = error_of([&] { divergent_barrier_kernel<<<1, 64>>>(out.data()); });
    e["shuffle_after_exit"] = error_of([&] { shuffle_after_exit_kernel<<<1, 32>>>(out.data()); });
    e["deadlock"] = error_of([&] { deadlock_kernel<<<1, 64>>>(out.data()); });
    e["partial_warp_shuffle"] = error_of([&] { warp_sum_kernel<<<1, 48>>>(out.data()); });
    e["empty_grid"] = error_of([&] { index_kernel<<<0, 32>>>(out.data()); });
    e["grid_y"] = error_of([&] { index_kernel<<<dim3(1, 65536), 1>>>(out.data()); });
    e["block_size"] = error_of([&] { index_kernel<<<1, 1025>>>(out.data()); });
    e["shared_without_attribute"] = error_of([&] { uninitialized_kernel<1><<<1, 32, 64 << 10>>>(out.data()); });
    e["shared_with_attribute"] = error_of([&] {
      cudaFuncSetAttribute(uninitialized_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10);
      uninitialized_kernel<2><<<1, 32, 64 << 10>>>(out.data());
    });
    e["wmma_misaligned"] = error_of([&] {
      std::vector<__half> h(256);
      alignas(32) float c[256];
      wmma_kernel<<<1, 32>>>(h.data(), h.data(), c, 8);
    });
    return e;
  });
}

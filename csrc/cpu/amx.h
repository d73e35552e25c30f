// bf16 tile GEMMs on Intel AMX, through torch's own batch-reduce GEMM.
//
// at::native::cpublas::brgemm is oneDNN's ukernel: it JIT-compiles a kernel per shape (cached),
// configures the AMX tile registers on first use in a thread, and multiplies bf16 operands into fp32
// at ~700-1000 GFLOP/s per core on a Xeon with AMX-BF16 (measured for 64 x 256 x 64 tiles in cache;
// the fp32 FMA tiles of gemm.h reach ~125). It runs only where could_pack(bf16) holds (a CPU with
// AMX and a torch built with the ukernel); elsewhere the kernels keep their fp32 / AVX512_BF16 tiles.
//
//   C[M, N] (+)= A[M, K] B[K, N]
//   A: bf16 row-major with leading dimension lda;
//   B: bf16 in VNNI pairs of k: element (k, n) at b[((k / 2) * ldb + n) * 2 + k % 2], K even (pad
//      an odd K with a zero row in A's column and B's pair);
//   C: fp32 row-major with leading dimension ldc; add_c accumulates.
// A thread that used amx_gemm calls amx_release() before it leaves the parallel region.
#pragma once

#include <cstdint>

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

namespace bignlp_fast::cpu {

// Whether this CPU and torch build can run amx_gemm.
bool amx_bf16_available();
// Whether the bf16 kernels take the AMX path now: available and not turned off.
bool amx_bf16();
// Turns the AMX path off (false) or back on where available (true); returns the previous amx_bf16().
// For tests, which run both paths on one machine, and for measuring what AMX buys.
bool set_amx_bf16(bool on);

// The next path down, where AMX is not taken: the AVX512_BF16 dot-product tiles of gemm.h
// (small_gemm_bf16), on the same VNNI operands. Available when the build targets AVX512_BF16; a
// kernel that finds neither multiplies bf16 operands converted to fp32 on the FMA tiles. The switch
// works as set_amx_bf16's does, so that tests reach every path on one machine.
bool bf16_dot_available();
bool bf16_dot();
bool set_bf16_dot(bool on);

inline void amx_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                     int64_t ldb, float* c, int64_t ldc, bool add_c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, a, b, c, /*is_vnni=*/true);
}

inline void amx_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace bignlp_fast::cpu

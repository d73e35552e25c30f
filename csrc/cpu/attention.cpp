// Flash-style scaled dot-product attention on the CPU: forward and backward, float32 and bfloat16.
//
// The contract (shapes, masks, causal modes, dropout, lse) is stated once, in
// bignlp_fast/ops/attention.py; the plain PyTorch version there is the specification.
//
// Forward: one task per (sequence, query head, block of kBlockQ queries). A task packs its query
// block as fp32 (pre-multiplied by the softmax scale), then walks the key blocks of kBlockK keys:
// S = Q K^T on the small GEMM of gemm.h, bias and causal mask, online softmax (running max m and
// sum l per row, the output accumulator rescaled when m grows), O += P V. Key blocks wholly above
// the causal diagonal are never visited. Each thread packs K^T and V of a (sequence, kv head) once
// and keeps them while its consecutive tasks need the same head. In bfloat16, on a CPU with AMX
// (amx.h) or one with AVX512_BF16 dot products (gemm.h's small_gemm_bf16), the forward keeps Q, K^T
// and V in bf16 instead and both GEMMs run on those, the softmax of a tile in one pass
// (softmax_tile_bf16); AMX takes larger tiles (kBlockQAmx x kBlockKAmx).
// Every softmax takes exp from exp2_nonpositive (activation.h), through exp_below_max.
//
// Backward: one task per (sequence, kv head, chunk of key blocks). For each key block it recomputes
// P = exp(S - lse) for every query block of every query head in the group and accumulates
//   dV += (P*Z)^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - delta),  dK += dS^T Q s,  dQ += dS K s
// (Z: the dropout scale, s: the softmax scale, delta = rowsum(dO * O)). dK and dV of a block are
// complete when its loop ends; dQ is summed in fp32, per chunk, and the chunks are added in a fixed
// order, so the result does not depend on the number of threads. There is more than one chunk per
// head only when heads are fewer than threads.
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "common.h"
#include "activation.h"
#include "amx.h"
#include "gemm.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::from_float;
using cpu::load_any;
using cpu::round_up_to_vec;
using cpu::small_gemm;
using cpu::store_any;
using cpu::to_float;

constexpr int64_t kBlockQ = 64;   // queries per task / per backward tile
constexpr int64_t kBlockK = 256;  // keys per tile
// Tiles of the AMX forward: its GEMMs are fast enough that per-call and per-row costs matter. 512
// keys instead of 256 took the bf16 forward at 8x12x512x64 from 16.9 to 13.6 ms (Xeon with AMX, 2
// threads); 128 queries instead of 64 read K^T and V half as often (12.3-14.2 ms, within the noise).
constexpr int64_t kBlockKAmx = 512;
constexpr int64_t kBlockQAmx = 128;
// oneDNN compiles a brgemm kernel for every new (M, N, K): ~330 us each, measured, against ~17 us
// for a cached 128x512x64 call. So that varlen batches and causal limits do not keep compiling new
// ones, the AMX GEMMs round the ragged sizes up, rows to 16 and key counts to 16 (S) or 32 (P V),
// over zero rows and columns: a head dim of d needs at most 8 x 32 + 8 x 16 kernels.
inline int64_t amx_round(int64_t n, int64_t to) { return (n + to - 1) / to * to; }
constexpr float kInf = std::numeric_limits<float>::infinity();

// A leading dimension for an fp32 tile row of n values: a whole number of vectors, and not a
// multiple of 1 KiB, whose rows would all fall in the same few cache sets.
int64_t tile_ld(int64_t n) {
  int64_t ld = round_up_to_vec(n);
  return ld % 256 == 0 ? ld + fVec::size() : ld;
}

// ---- where each sequence lives --------------------------------------------------------------
struct Seq {
  int64_t batch;    // index into the B axis (0 for varlen)
  int64_t q_begin;  // first row on the L axis
  int64_t lq;
  int64_t k_begin;
  int64_t lk;
};

std::vector<Seq> sequences(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                           const std::optional<at::Tensor>& cu_k) {
  std::vector<Seq> seqs;
  if (!cu_q.has_value()) {
    for (int64_t b = 0; b < q.size(0); ++b) seqs.push_back({b, 0, q.size(2), 0, k.size(2)});
    return seqs;
  }
  TORCH_CHECK(cu_k.has_value() && cu_q->scalar_type() == at::kInt && cu_k->scalar_type() == at::kInt &&
                  cu_q->numel() == cu_k->numel() && q.size(0) == 1,
              "attention: cu_seqlens_q and cu_seqlens_k must be int32 tensors of the same length, with B == 1");
  const auto cq = cu_q->contiguous(), ck = cu_k->contiguous();
  const int32_t* pq = cq.const_data_ptr<int32_t>();
  const int32_t* pk = ck.const_data_ptr<int32_t>();
  for (int64_t s = 0; s + 1 < cq.numel(); ++s) {
    TORCH_CHECK(pq[s] <= pq[s + 1] && pk[s] <= pk[s + 1] && pq[s + 1] <= q.size(2) && pk[s + 1] <= k.size(2),
                "attention: cu_seqlens must not decrease nor pass the token count");
    seqs.push_back({0, pq[s], pq[s + 1] - pq[s], pk[s], pk[s + 1] - pk[s]});
  }
  return seqs;
}

// Strided access to one [B, H, L, D] operand (stride(-1) == 1).
template <typename T>
struct Rows {
  T* base;
  int64_t sb, sh, sl;
  Rows(const at::Tensor& t) : base(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {
    TORCH_CHECK(t.numel() == 0 || t.stride(3) == 1, "attention: the last dimension of every operand must be contiguous");
  }
  Rows(T* base_, int64_t sb_, int64_t sh_, int64_t sl_) : base(base_), sb(sb_), sh(sh_), sl(sl_) {}
  T* row(int64_t b, int64_t h, int64_t l) const { return base + b * sb + h * sh + l * sl; }
};

// The mask geometry of one sequence: query i sees key j iff j <= i + offset (when causal).
struct Causal {
  bool on;
  int64_t offset;
  Causal(int64_t mode, const Seq& s) : on(mode != 0), offset(mode == 2 ? s.lk - s.lq : 0) {}
  // Keys [0, visible(i)) can be seen by query i (all lk of them when not causal).
  int64_t visible(int64_t i, int64_t lk) const { return on ? std::clamp<int64_t>(i + offset + 1, 0, lk) : lk; }
};

// ---- dropout: Philox-4x32-10, as dropout_keep in bignlp_fast/ops/attention.py -----------------
struct Dropout {
  bool on = false;
  uint32_t threshold = 0, k0 = 0, k1 = 0;
  float scale = 1.f;
  int64_t hq = 0, max_q = 0, max_k = 0;

  Dropout(double p, const std::optional<at::Tensor>& seed, int64_t hq_, int64_t max_q_, int64_t max_k_) {
    if (p <= 0.0) return;
    TORCH_CHECK(seed.has_value() && seed->numel() == 1, "attention: dropout needs a seed tensor");
    const uint64_t s = static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>());
    on = true;
    threshold = static_cast<uint32_t>(std::min<double>(std::floor(p * 4294967296.0), 4294967295.0));
    k0 = static_cast<uint32_t>(s);
    k1 = static_cast<uint32_t>(s >> 32);
    scale = static_cast<float>(1.0 / (1.0 - p));
    hq = hq_, max_q = max_q_, max_k = max_k_;
  }

  static void philox(uint64_t counter, uint32_t key0, uint32_t key1, uint32_t out[4]) {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t{0xD2511F53u} * c0, p1 = uint64_t{0xCD9E8D57u} * c2;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ key0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ key1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
  }

  // Multiplies p[0, n) (keys j0 .. j0 + n of query i, head h, sequence s) by 0 or 1 / (1 - p).
  void apply(float* p, int64_t n, int64_t s, int64_t h, int64_t i, int64_t j0) const {
    const int64_t first = ((s * hq + h) * max_q + i) * max_k + j0;
    uint32_t words[4];
    int64_t counter = -1;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = first + j;
      if ((e >> 2) != counter) {
        counter = e >> 2;
        philox(static_cast<uint64_t>(counter), k0, k1, words);
      }
      p[j] *= words[e & 3] >= threshold ? scale : 0.f;
    }
  }
};

// Packs rows [r0, r0 + n) of one head as fp32 [n, ld] (times mul), zero-padded to ld.
template <typename T>
void pack_rows(const Rows<T>& t, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d, float* dst, int64_t ld,
               float mul = 1.f) {
  for (int64_t r = 0; r < n; ++r) {
    to_float(t.row(b, h, r0 + r), dst + r * ld, d, mul);
    std::fill(dst + r * ld + d, dst + (r + 1) * ld, 0.f);
  }
}

// Packs rows [r0, r0 + n) of one head transposed: fp32 [d, ld] with dst[c * ld + r] = t[r0 + r][c] * mul.
template <typename T>
void pack_cols(const Rows<T>& t, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d, float* dst, int64_t ld,
               float mul = 1.f) {
  if (std::is_same_v<T, float> && mul == 1.f && n > 0) {
    // block transposes in registers (cpu::transpose_f32): by scalar stores, K^T of the fp32 forward
    // took 6% of its time (Xeon, perf annotate)
    cpu::transpose_f32(reinterpret_cast<const float*>(t.row(b, h, r0)), t.sl, dst, ld, n, d);
  } else {
    for (int64_t r = 0; r < n; ++r) {
      const T* src = t.row(b, h, r0 + r);
      for (int64_t c = 0; c < d; ++c) dst[c * ld + r] = static_cast<float>(src[c]) * mul;
    }
  }
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + n, dst + (c + 1) * ld, 0.f);
}

// ---- bf16 operands for the AMX and AVX512_BF16 tiles (amx.h, gemm.h) -----------------------------
// Where amx_bf16() or bf16_dot() holds, the bf16 forward keeps K^T, V and the query block in bf16
// and multiplies them on AMX or on the dot products: the score tile S = Q K^T and the update
// O += P V are amx_gemm / small_gemm_bf16 calls, which take the same VNNI pairs as their B; the
// softmax between them stays fp32, P is rounded to bf16 for the second GEMM (as torch's bf16 SDPA
// does) and its row sums are taken before rounding. The scale multiplies S in fp32, after the GEMM.
//
// K^T in VNNI pairs: dst[(c2 * ld + r) * 2 + p] = K[r0 + r][2 c2 + p], for c2 < ceil(d / 2); an odd
// d ends with a zero half, columns [n, ld) are zero.
inline void pack_keys_vnni(const Rows<c10::BFloat16>& t, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d,
                           c10::BFloat16* dst, int64_t ld) {
  const int64_t d2 = (d + 1) / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // 16 keys at a time: one gather per pair of columns (the rows are sl elements apart)
  if (16 * t.sl * 2 < (int64_t{1} << 31)) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int32_t>(t.sl * 2)));
    for (; r + 16 <= n; r += 16) {
      const c10::BFloat16* src = t.row(b, h, r0 + r);
      for (int64_t c2 = 0; c2 < d / 2; ++c2)
        _mm512_storeu_si512(out + c2 * ld + r, _mm512_i32gather_epi32(rows, src + 2 * c2, 1));
    }
  }
#endif
  for (; r < n; ++r) {
    const c10::BFloat16* src = t.row(b, h, r0 + r);
    for (int64_t c2 = 0; c2 < d / 2; ++c2) std::memcpy(out + c2 * ld + r, src + 2 * c2, sizeof(uint32_t));
  }
  if (d % 2)
    for (r = 0; r < n; ++r) out[(d2 - 1) * ld + r] = t.row(b, h, r0 + r)[d - 1].x;
  for (int64_t c2 = 0; c2 < d2; ++c2) std::fill(out + c2 * ld + n, out + (c2 + 1) * ld, 0u);
}

// V in VNNI pairs of rows: dst[(r2 * ld + c) * 2 + p] = V[r0 + 2 r2 + p][c]; rows [n, n_out) are
// zero (n_out even), columns [d, ld) are zero.
inline void pack_values_vnni(const Rows<c10::BFloat16>& t, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d,
                             c10::BFloat16* dst, int64_t ld, int64_t n_out) {
  std::fill(dst + (n + 1) / 2 * ld * 2, dst + n_out * ld, c10::BFloat16(0.f));
  for (int64_t r2 = 0; r2 < (n + 1) / 2; ++r2) {
    const c10::BFloat16* lo = t.row(b, h, r0 + 2 * r2);
    const c10::BFloat16* hi = 2 * r2 + 1 < n ? t.row(b, h, r0 + 2 * r2 + 1) : nullptr;
    c10::BFloat16* o = dst + r2 * ld * 2;
    cpu::interleave_pairs_bf16(lo, hi, d, reinterpret_cast<uint32_t*>(o));  // column c: lo[c] | hi[c] << 16
    std::fill(o + 2 * d, o + 2 * ld, c10::BFloat16(0.f));
  }
}

// Rows [r0, r0 + n) of one head as bf16 [n, ld], zero-padded to ld (an even number >= d).
inline void copy_rows_bf16(const Rows<c10::BFloat16>& t, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d,
                           c10::BFloat16* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * ld, t.row(b, h, r0 + r), d * sizeof(c10::BFloat16));
    std::fill(dst + r * ld + d, dst + (r + 1) * ld, c10::BFloat16(0.f));
  }
}

// A finite bias below kBiasFloor counts as kBiasFloor; -inf stays -inf (masked). The kernels take exp
// in base 2, exp2(s log2(e) - m log2(e)), and s log2(e) overflows to -inf past -FLT_MAX / log2(e):
// transformers' masks, finfo(dtype).min, are there. A row that such values mask at every key is then a
// uniform average of the values, as in torch's SDPA, instead of NaN. (Values all below the floor lose
// their order; nothing masks with two of them.) The Triton and CUDA kernels apply the same floor.
constexpr float kBiasFloor = -1e38f;

// A row's running max that keeps a NaN score (a NaN in q, in a key, or in a float mask): std::max(m, s)
// returns m for a NaN s, which dropped it, and the row came out as zeros or finite values where torch's
// SDPA gives NaN. A NaN max makes the rescale, the sum and so the row NaN, as in torch.
inline float max_keeping_nan(float m, float s) { return std::isnan(s) ? s : std::max(m, s); }
inline float floored(float b) { return b == -kInf ? b : std::max(b, kBiasFloor); }
inline fVec floored(const fVec& b) { return fVec::blendv(at::vec::maximum(b, fVec(kBiasFloor)), b, b == fVec(-kInf)); }

// exp(s mul - max) for a row's scores s (mul: the scale, where it is not in s yet) and its max
// (the backward: its lse), as exp2 of t log2(e), t = s mul - max <= 0. t is taken before the factor
// log2(e): with mul = 1 it is s - max with one rounding, exact near the max and never above 0.
// (As one fmadd, s log2(e) - max log2(e), every t of a row carried the rounding of max log2(e): a
// common factor that cancels in the row's sum, but at scores near -1e38 (a row every key of which a
// finite mask hides) ~1e31, past -1e9 already over 127: exp2 gave inf, the output inf / inf = NaN.)
// The clamp at 0 drops the rounding of s mul where mul != 1 (NaN stays NaN).
inline fVec exp_below_max(const fVec& s, const fVec& mul, const fVec& neg_max) {
  const fVec t = at::vec::clamp_max(at::vec::fmadd(s, mul, neg_max), fVec(0.f));
  return cpu::exp2_nonpositive(t * fVec(cpu::kLog2e));
}

// The two passes of a tile row's online softmax, each over n >= 1 scores s[0, n). Both run their
// full vectors without lane checks and keep independent chains, so that they go at the pace of
// their instructions, not of one chain's latency: at::vec::maximum (which keeps NaN) is four
// dependent instructions a vector on AVX-512, and one chain of it took 17% of the bf16 forward on a
// Xeon with AMX (perf annotate), as much as the exps.
//
// The row's max, NaN if any score is NaN (see max_keeping_nan).
inline float scores_max(const float* s, int64_t n) {
  constexpr int64_t V = fVec::size();
  fVec m0(-kInf), m1(-kInf), m2(-kInf), m3(-kInf);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(m0, fVec::loadu(s + j));
    m1 = at::vec::maximum(m1, fVec::loadu(s + j + V));
    m2 = at::vec::maximum(m2, fVec::loadu(s + j + 2 * V));
    m3 = at::vec::maximum(m3, fVec::loadu(s + j + 3 * V));
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, fVec::loadu(s + j));
  if (j < n) m1 = at::vec::maximum(m1, fVec::set(fVec(-kInf), fVec::loadu(s + j, n - j), n - j));
  return cpu::hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// P = exp_below_max(s, mul, -max) step by step: put(j, e0, e1) receives columns [j, j + kStep), those
// past n as 0 (so put may write whole steps: the caller's rows have room up to round_up_to_step(n)).
// Returns the row's sum of P.
template <typename Put>
inline float exp_row(const float* s, int64_t n, float mul, float max, Put put) {
  constexpr int64_t V = fVec::size();
  const fVec vmul(mul), vneg(-max), zero(0.f);
  fVec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + cpu::kStep <= n; j += cpu::kStep) {
    const fVec e0 = exp_below_max(fVec::loadu(s + j), vmul, vneg);
    const fVec e1 = exp_below_max(fVec::loadu(s + j + V), vmul, vneg);
    sum0 = sum0 + e0, sum1 = sum1 + e1;
    put(j, e0, e1);
  }
  if (j < n) {  // the last, partial step
    auto part = [&](int64_t c) {
      const int64_t w = std::min<int64_t>(V, n - c);
      if (w <= 0) return zero;
      const fVec e = exp_below_max(fVec::loadu(s + c, w), vmul, vneg);
      return w == V ? e : fVec::set(zero, e, w);
    };
    const fVec e0 = part(j), e1 = part(j + V);
    sum0 = sum0 + e0, sum1 = sum1 + e1;
    put(j, e0, e1);
  }
  return cpu::hsum(sum0 + sum1);
}

// One row of the bias from a key on: float32 values added to the scores (floored), or a bool mask
// (true = attend: the score as it is; false = -inf, what torch.where(mask, 0, -inf) adds), or none.
// A bool mask is read as it is: no float copy of it, which a materialised [B, 1, Lq, Lk] padding
// mask from transformers would need at each call.
struct BiasRow {
  const float* add = nullptr;
  const bool* keep = nullptr;
  int64_t sk = 0;
  bool present() const { return add != nullptr || keep != nullptr; }
  bool masked(int64_t j) const { return add != nullptr ? add[j * sk] == -kInf : !keep[j * sk]; }
  // s[0, n) with this row's keys [0, n) applied
  void apply(float* s, int64_t n) const {
    if (add != nullptr && sk == 1) {
      for (int64_t j = 0; j < n; j += fVec::size()) {
        const int64_t m = std::min<int64_t>(fVec::size(), n - j);
        store_any(s + j, load_any(s + j, m) + floored(load_any(add + j, m)), m);
      }
    } else if (add != nullptr) {
      for (int64_t j = 0; j < n; ++j) s[j] += floored(add[j * sk]);
    } else if (keep != nullptr && sk == 1) {  // (a loop the compiler vectorises: bytes widened to a blend)
      const auto* k = reinterpret_cast<const uint8_t*>(keep);
      for (int64_t j = 0; j < n; ++j) s[j] = k[j] != 0 ? s[j] : -kInf;
    } else if (keep != nullptr) {
      for (int64_t j = 0; j < n; ++j) s[j] = keep[j * sk] ? s[j] : -kInf;
    }
  }
};

// Scores of one tile, in place: the bias row applied to s[0, n); -inf past the causal limit `visible`
// (a count of keys from the tile's start).
inline void bias_and_mask(float* s, int64_t n, const BiasRow& bias, int64_t visible) {
  bias.apply(s, n);
  for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) s[j] = -kInf;
}

// The bias operand: a float32 or bool [B, H, Lq, Lk] view (broadcast dimensions as stride 0), or none.
struct BiasView {
  const float* base = nullptr;
  const bool* keep = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  BiasView(const std::optional<at::Tensor>& bias) {
    if (!bias.has_value()) return;
    TORCH_CHECK((bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBool) && bias->dim() == 4,
                "attention: bias must be a float32 or bool [B, H, Lq, Lk] view");
    if (bias->scalar_type() == at::kFloat) {
      base = bias->const_data_ptr<float>();
    } else {
      keep = bias->const_data_ptr<bool>();
    }
    sb = bias->stride(0), sh = bias->stride(1), sq = bias->stride(2), sk = bias->stride(3);
  }
  BiasRow row(int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const int64_t at = b * sb + h * sh + i * sq + j0 * sk;
    return {base == nullptr ? nullptr : base + at, keep == nullptr ? nullptr : keep + at, sk};
  }
  // Keys [begin, end) of head h of batch b that some query of rows [i0, i0 + rows) may see: outside
  // the first and last unmasked entries of those rows every score is -inf, and the kernels skip
  // the tiles that lie wholly there (padding: transformers' BERT hands a [B, 1, Lq, Lk] mask of right
  // padding, GPT-2's batched prompts are padded on the left). exp(-inf) adds exact zeros, so skipping
  // changes no result. A bias shared by all queries (stride 0, a key-padding mask) is read once.
  // Reads each row from both ends up to its first unmasked entry. No bias: [0, lk).
  struct Keys {
    int64_t begin, end;
    void join(int64_t b, int64_t e) {  // widen to cover keys [b, e), if any
      if (b < e) begin = std::min(begin, b), end = std::max(end, e);
    }
  };
  Keys key_range(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t lk) const {
    if (base == nullptr && keep == nullptr) return {0, lk};
    Keys keys{lk, 0};  // none yet
    for (int64_t i = i0; i < i0 + (sq == 0 ? std::min<int64_t>(rows, 1) : rows); ++i) {
      const BiasRow r = row(b, h, i, 0);
      int64_t end = lk;
      while (end > keys.end && r.masked(end - 1)) --end;
      int64_t begin = 0;
      while (begin < std::min(end, keys.begin) && r.masked(begin)) ++begin;
      keys.join(begin, end);
      if (keys.begin == 0 && keys.end == lk) break;
    }
    return keys;
  }
};

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k and v must have one dtype");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: key heads must divide query heads");
  TORCH_CHECK(q.size(3) == k.size(3) && k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
              "attention: q/k head dims or k/v shapes disagree");
}

// The online-softmax step of one bf16 score tile (see pack_keys_vnni): s holds the raw scores Q K^T
// of m rows and n keys. Per row: scale (folded into the exponent when there is no bias), bias and
// causal mask, the running max and sum, the accumulator rescaled, and P = exp(scaled s - max) written
// as bf16 to p_b (row stride ld_p, columns [n, round_up(n, 32)) zero) in the same pass; with dropout
// P goes through fp32 first, because the mask is applied to fp32 values as on every path.
template <typename BiasRowOf, typename Visible>
void softmax_tile_bf16(float* s_tile, int64_t ld_s, int64_t m, int64_t n, float scale, BiasRowOf bias_row,
                       Visible visible, float* row_max, float* row_sum, float* acc, int64_t ld_acc,
                       c10::BFloat16* p_b, int64_t ld_p, const Dropout& dropout, int64_t seq, int64_t head, int64_t i0,
                       int64_t j0) {
  constexpr int64_t V = fVec::size();
  auto lanes = [&](int64_t j) { return std::min<int64_t>(V, n - j); };  // <= 0: past the row
  const bool drop = dropout.on;  // a local: the compiler need not reload it after every store
  for (int64_t r = 0; r < m; ++r) {
    float* s = s_tile + r * ld_s;
    c10::BFloat16* p = p_b + r * ld_p;
    const BiasRow bias = bias_row(r);
    // exp(s * mul - m): mul is the scale with raw scores, 1 once the bias pass has scaled them
    float mul = scale;
    if (bias.present() || scale <= 0.f) {
      for (int64_t j = 0; j < n; j += V) store_any(s + j, load_any(s + j, lanes(j)) * fVec(scale), lanes(j));
      mul = 1.f;
    }
    bias_and_mask(s, n, bias, visible(r));
    const float m_new = max_keeping_nan(row_max[r], mul * scores_max(s, n));
    if (m_new == -kInf) {  // every key so far masked: this tile adds nothing to the row
      std::fill(p, p + cpu::round_up_to_step(n), c10::BFloat16(0.f));
      continue;
    }
    const float rescale = std::exp(row_max[r] - m_new);  // 0 when the old max was -inf
    // with dropout, P in fp32 first (s has room: ld_s >= round_up_to_step(n))
    const float sum = drop ? exp_row(s, n, mul, m_new, [&](int64_t j, const fVec& e0, const fVec& e1) {
      e0.store(s + j), e1.store(s + j + V);
    }) : exp_row(s, n, mul, m_new, [&](int64_t j, const fVec& e0, const fVec& e1) {
      cpu::to_bf16(e0, e1).store(p + j);
    });
    row_sum[r] = row_sum[r] * rescale + sum;
    row_max[r] = m_new;
    if (rescale != 1.f) {
      float* a = acc + r * ld_acc;
      for (int64_t c = 0; c < ld_acc; c += V) (fVec::loadu(a + c) * fVec(rescale)).store(a + c);
    }
    if (drop) {
      dropout.apply(s, n, seq, head, i0 + r, j0);
      for (int64_t j = 0; j < n; j += cpu::kStep) {
        fVec a, b;
        cpu::load2(s + j, a, b);
        cpu::to_bf16(a, b).store(p + j);
      }
    }
  }
}

// ---- forward --------------------------------------------------------------------------------
// Decoding (every sequence has at most kDecodeRows queries, e.g. one new token against a KV cache):
// the tiles of the main loop would be mostly padding and their set-up (K^T and V packed as fp32,
// 64 x 256 score tiles) would cost more than the arithmetic. Each (sequence, head) task instead
// reads K and V rows in place: scores as dot products, softmax over the whole row at once, then
// O = sum_j p_j V_j. Same numbers as the tiled path up to summation order (and the same dropout mask).
constexpr int64_t kDecodeRows = 4;

template <typename T>
float dot_row(const float* q, const T* k, int64_t d) {
  fVec acc(0.f);
  for (int64_t c = 0; c < d; c += fVec::size()) {
    const int64_t w = std::min<int64_t>(fVec::size(), d - c);
    acc = at::vec::fmadd(load_any(q + c, w), load_any(k + c, w), acc);
  }
  return cpu::hsum(acc);
}

// dot_row of q with four keys at once: four independent chains, q loaded once for the four (a
// decoding step's scores: one chain of FMAs and its horizontal sum per key ran at their latency).
template <typename T>
void dot_rows4(const float* q, const T* k0, const T* k1, const T* k2, const T* k3, int64_t d, float* out) {
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  for (int64_t c = 0; c < d; c += fVec::size()) {
    const int64_t w = std::min<int64_t>(fVec::size(), d - c);
    const fVec qv = load_any(q + c, w);
    a0 = at::vec::fmadd(qv, load_any(k0 + c, w), a0);
    a1 = at::vec::fmadd(qv, load_any(k1 + c, w), a1);
    a2 = at::vec::fmadd(qv, load_any(k2 + c, w), a2);
    a3 = at::vec::fmadd(qv, load_any(k3 + c, w), a3);
  }
  out[0] = cpu::hsum(a0), out[1] = cpu::hsum(a1), out[2] = cpu::hsum(a2), out[3] = cpu::hsum(a3);
}

template <typename T>
void forward_decode(const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, const Rows<T>& O, float* lse_base,
                    int64_t ltot, int64_t hq, int64_t groups, int64_t d, int64_t dv, const BiasView& bias,
                    const std::vector<Seq>& seqs, double scale, int64_t causal, const Dropout& dropout) {
  int64_t max_lk = 0;
  for (const Seq& sq : seqs) max_lk = std::max(max_lk, sq.lk);
  const int64_t tasks = static_cast<int64_t>(seqs.size()) * hq;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    // p: room for exp_row's whole last step
    cpu::LineVector<float> qf(round_up_to_vec(d)), p(cpu::round_up_to_step(std::max<int64_t>(max_lk, 1))),
        acc(round_up_to_vec(dv));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t seq = t / hq, h = t % hq, kvh = h / groups;
      const Seq& sq = seqs[seq];
      const Causal causal_mask(causal, sq);
      for (int64_t r = 0; r < sq.lq; ++r) {
        const int64_t i = sq.q_begin + r, n = causal_mask.visible(r, sq.lk);
        const BiasView::Keys keys = bias.key_range(sq.batch, h, r, 1, sq.lk);
        to_float(Q.row(sq.batch, h, i), qf.data(), d, static_cast<float>(scale));
        // scores of the keys some query sees (the others masked for every query: no product)
        const int64_t j0 = std::min(keys.begin, n), j1 = std::clamp<int64_t>(keys.end, j0, n);
        std::fill(p.begin(), p.begin() + j0, -kInf);
        std::fill(p.begin() + j1, p.begin() + n, -kInf);
        auto key = [&](int64_t j) { return K.row(sq.batch, kvh, sq.k_begin + j); };
        int64_t j = j0;
        for (; j + 4 <= j1; j += 4) dot_rows4(qf.data(), key(j), key(j + 1), key(j + 2), key(j + 3), d, p.data() + j);
        for (; j < j1; ++j) p[j] = dot_row(qf.data(), key(j), d);
        bias.row(sq.batch, h, r, j0).apply(p.data() + j0, j1 - j0);
        const float m = n > 0 ? scores_max(p.data(), n) : -kInf;
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        if (m != -kInf) {
          sum = exp_row(p.data(), n, 1.f, m, [&](int64_t c, const fVec& e0, const fVec& e1) {
            e0.store(p.data() + c), e1.store(p.data() + c + fVec::size());
          });
          if (dropout.on) dropout.apply(p.data(), n, seq, h, r, 0);
          for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.f) continue;
            const T* vrow = V.row(sq.batch, kvh, sq.k_begin + j);
            const fVec pj(p[j]);
            for (int64_t c = 0; c < dv; c += fVec::size()) {
              const int64_t w = std::min<int64_t>(fVec::size(), dv - c);
              at::vec::fmadd(pj, load_any(vrow + c, w), fVec::loadu(acc.data() + c)).store(acc.data() + c);
            }
          }
        }
        const bool empty = sum == 0.f;
        from_float(acc.data(), O.row(sq.batch, h, i), dv, empty ? 0.f : 1.f / sum);
        lse_base[(sq.batch * hq + h) * ltot + i] = empty ? kInf : m + std::log(sum);
      }
    }
  });
}

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const BiasView& bias,
             const std::vector<Seq>& seqs, double scale, int64_t causal, const Dropout& dropout, at::Tensor& out,
             at::Tensor& lse) {
  const int64_t hq = q.size(1), hk = k.size(1), groups = hq / hk, d = q.size(3), dv = v.size(3);
  const int64_t ltot = q.size(2), ld_dv = tile_ld(dv);
  const Rows<T> Q(q), K(k), V(v), O(out);
  float* lse_base = lse.data_ptr<float>();
  int64_t max_lq = 0;
  for (const Seq& sq : seqs) max_lq = std::max(max_lq, sq.lq);
  if (max_lq <= kDecodeRows) {
    forward_decode(Q, K, V, O, lse_base, ltot, hq, groups, d, dv, bias, seqs, scale, causal, dropout);
    return;
  }

  // The bf16 tile paths (see pack_keys_vnni): bf16 operands in VNNI pairs, with the head dim and P's
  // columns padded to even, multiplied on AMX or else on AVX512_BF16 dot products.
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  constexpr bool kQInPlace = std::is_same_v<T, float>;  // see the S = Q K^T GEMM below
  const bool amx = kBf16 && cpu::amx_bf16();
  const bool vnni = amx || (kBf16 && cpu::bf16_dot());
  const int64_t d_even = (d + 1) / 2 * 2, block_q = amx ? kBlockQAmx : kBlockQ;

  struct Task { int64_t seq, head, block; };
  std::vector<Task> tasks;
  int64_t max_lk = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    max_lk = std::max(max_lk, seqs[s].lk);
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t blk = 0; blk * block_q < seqs[s].lq; ++blk) tasks.push_back({s, h, blk});
  }
  const int64_t ld_k = tile_ld(max_lk);


  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    // K^T and V of one head: fp32 for small_gemm, or bf16 VNNI pairs for amx_gemm / small_gemm_bf16
    const int64_t block_k = amx ? kBlockKAmx : kBlockK, ld_s = tile_ld(block_k);
    cpu::LineVector<float> kt(vnni ? 0 : d * ld_k), vr(vnni ? 0 : std::max<int64_t>(max_lk, 1) * ld_dv);
    cpu::LineVector<c10::BFloat16> kt_b(vnni ? d_even * ld_k : 0), vr_b(vnni ? amx_round(max_lk, 32) * ld_dv : 0);
    cpu::LineVector<c10::BFloat16> q_b(vnni ? block_q * d_even : 0), p_b(vnni ? block_q * block_k : 0);
    const int64_t ld_q = tile_ld(kBlockQ);
    cpu::LineVector<float> qt(vnni || kQInPlace ? 0 : d * ld_q), s_tile(block_q * ld_s), acc(block_q * ld_dv);
    cpu::LineVector<float> row_max(block_q), row_sum(block_q);
    int64_t packed_seq = -1, packed_head = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const Task task = tasks[t];
      const Seq& sq = seqs[task.seq];
      const int64_t kvh = task.head / groups, i0 = task.block * block_q;
      const int64_t m = std::min(block_q, sq.lq - i0);
      const Causal causal_mask(causal, sq);
      // Keys any row of this block may see: the tiles outside them are never visited.
      const BiasView::Keys keys = bias.key_range(sq.batch, task.head, i0, m, sq.lk);
      const int64_t n_keys = std::min(causal_mask.visible(i0 + m - 1, sq.lk), keys.end);
      if (n_keys > 0 && (packed_seq != task.seq || packed_head != kvh)) {
        if constexpr (kBf16) {
          if (vnni) {
            pack_keys_vnni(K, sq.batch, kvh, sq.k_begin, sq.lk, d, kt_b.data(), ld_k);
            pack_values_vnni(V, sq.batch, kvh, sq.k_begin, sq.lk, dv, vr_b.data(), ld_dv, amx_round(sq.lk, 32));
          }
        }
        if (!vnni) {
          pack_cols(K, sq.batch, kvh, sq.k_begin, sq.lk, d, kt.data(), ld_k);
          pack_rows(V, sq.batch, kvh, sq.k_begin, sq.lk, dv, vr.data(), ld_dv);
        }
        packed_seq = task.seq, packed_head = kvh;
      }
      if constexpr (kBf16) {
        if (vnni) copy_rows_bf16(Q, sq.batch, task.head, sq.q_begin + i0, m, d, q_b.data(), d_even);
        if (amx) {  // rows [m, amx_round(m, 16)) of the operands are zero: see amx_round
          std::fill(q_b.begin() + m * d_even, q_b.begin() + amx_round(m, 16) * d_even, c10::BFloat16(0.f));
          std::fill(p_b.begin() + m * block_k, p_b.begin() + amx_round(m, 16) * block_k, c10::BFloat16(0.f));
        }
      }
      // The A operand of S = Q K^T: fp32 queries in place (the GEMM's alpha applies the scale), others
      // converted as Q^T (scaled), whose broadcasts then take m consecutive floats per k. Packing
      // fp32 queries too (a transpose by scalar stores) was 5% of the fp32 forward (Xeon, perf annotate).
      if (!vnni && !kQInPlace)
        pack_cols(Q, sq.batch, task.head, sq.q_begin + i0, m, d, qt.data(), ld_q, static_cast<float>(scale));
      std::fill(row_max.begin(), row_max.end(), -kInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(acc.begin(), acc.begin() + (amx ? amx_round(m, 16) : m) * ld_dv, 0.f);

      for (int64_t j0 = keys.begin / block_k * block_k; j0 < n_keys; j0 += block_k) {
        const int64_t n = std::min(block_k, n_keys - j0);
        if constexpr (kBf16) {
          if (vnni) {
            // The dot tiles read bf16 rows of Q and P as uint32 pairs of k: A of small_gemm_bf16 with a_cs = 1
            const auto* q_pairs = reinterpret_cast<const uint32_t*>(q_b.data());
            const auto* p_pairs = reinterpret_cast<const uint32_t*>(p_b.data());
            const int64_t mr = amx_round(m, 16);
            if (amx) {
              cpu::amx_gemm(mr, amx_round(n, 16), d_even, q_b.data(), d_even, kt_b.data() + j0 * 2, ld_k, s_tile.data(),
                            ld_s, false);
            } else {
              cpu::small_gemm_bf16(m, amx_round(n, 16), d_even / 2, q_pairs, d_even / 2, 1, kt_b.data() + j0 * 2, ld_k,
                                   s_tile.data(), ld_s);
            }
            softmax_tile_bf16(s_tile.data(), ld_s, m, n, static_cast<float>(scale), [&](int64_t r) {
              return bias.row(sq.batch, task.head, i0 + r, j0);
            }, [&](int64_t r) { return causal_mask.visible(i0 + r, sq.lk) - j0; }, row_max.data(),
                              row_sum.data(), acc.data(), ld_dv, p_b.data(), block_k, dropout, task.seq, task.head, i0,
                              j0);
            // P's columns [n, amx_round(n, 32)) are zero (softmax_tile_bf16 writes them)
            if (amx) {
              cpu::amx_gemm(mr, dv, amx_round(n, 32), p_b.data(), block_k, vr_b.data() + j0 * ld_dv, ld_dv, acc.data(),
                            ld_dv, true);
            } else {
              cpu::small_gemm_bf16(m, ld_dv, amx_round(n, 32) / 2, p_pairs, block_k / 2, 1, vr_b.data() + j0 * ld_dv,
                                   ld_dv, acc.data(), ld_dv, true);
            }
            continue;
          }
        }
        if constexpr (kQInPlace) {
          small_gemm(m, round_up_to_vec(n), d, Q.row(sq.batch, task.head, sq.q_begin + i0), Q.sl, 1, kt.data() + j0, ld_k,
                     s_tile.data(), ld_s, static_cast<float>(scale), false);
        } else {
          small_gemm(m, round_up_to_vec(n), d, qt.data(), 1, ld_q, kt.data() + j0, ld_k, s_tile.data(), ld_s, 1.f, false);
        }
        for (int64_t r = 0; r < m; ++r) {
          float* s = s_tile.data() + r * ld_s;
          const int64_t i = i0 + r;
          bias_and_mask(s, n, bias.row(sq.batch, task.head, i, j0), causal_mask.visible(i, sq.lk) - j0);
          const float m_new = max_keeping_nan(row_max[r], scores_max(s, n));
          if (m_new == -kInf) {  // every key so far masked: this tile adds nothing to the row
            std::fill(s, s + n, 0.f);
            continue;
          }
          const float rescale = std::exp(row_max[r] - m_new);  // 0 when the old max was -inf
          // P in place (s has room: ld_s >= round_up_to_step(n))
          const float sum = exp_row(s, n, 1.f, m_new, [&](int64_t j, const fVec& e0, const fVec& e1) {
            e0.store(s + j), e1.store(s + j + fVec::size());
          });
          row_sum[r] = row_sum[r] * rescale + sum;
          row_max[r] = m_new;
          if (rescale != 1.f) {
            float* a = acc.data() + r * ld_dv;
            for (int64_t c = 0; c < ld_dv; c += fVec::size()) (fVec::loadu(a + c) * fVec(rescale)).store(a + c);
          }
          if (dropout.on) dropout.apply(s, n, task.seq, task.head, i, j0);
        }
        small_gemm(m, ld_dv, n, s_tile.data(), ld_s, 1, vr.data() + j0 * ld_dv, ld_dv, acc.data(), ld_dv, 1.f, true);
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = sq.q_begin + i0 + r;
        const bool empty = row_sum[r] == 0.f;
        from_float(acc.data() + r * ld_dv, O.row(sq.batch, task.head, i), dv, empty ? 0.f : 1.f / row_sum[r]);
        lse_base[(sq.batch * hq + task.head) * ltot + i] = empty ? kInf : row_max[r] + std::log(row_sum[r]);
      }
    }
    if (amx) cpu::amx_release();
  });
}

// ---- bf16 tiles of the backward (AVX512_BF16 dot products) --------------------------------------
// The five GEMMs of a (key block, query block) tile take bf16 operands where bf16_dot() holds:
//   S  = (Q s) K^T, dP = dO V^T:  A = Q s, dO as bf16 rows; B = K^T, V^T in VNNI pairs (pack_keys_vnni)
//   dV += (P Z)^T dO, dK += dS^T (Q s):  A = P Z, dS in pairs of query rows (row_pairs_bf16);
//                                        B = dO, Q s in VNNI pairs of query rows (pack_values_vnni)
//   dQ += (s dS) K:  A = s dS as bf16 rows; B = K in VNNI pairs of key rows
// P and dS are computed in fp32, as on the fp32 path, and rounded to bf16 only as GEMM operands (as
// torch's bf16 SDPA backward does); every sum stays fp32.
//
// Rows [0, m) of an fp32 tile as bf16 pairs of rows: dst[r2 * ld_dst + c] holds row 2 r2 (low half)
// and row 2 r2 + 1 (high half, 0 past m) of column c, for c < n (a multiple of 16).
inline void row_pairs_bf16(const float* src, int64_t ld_src, int64_t m, int64_t n, uint32_t* dst, int64_t ld_dst) {
#ifdef BIGNLP_FAST_BF16_DOT
  for (int64_t r2 = 0; r2 < (m + 1) / 2; ++r2) {
    const float* lo = src + 2 * r2 * ld_src;
    const float* hi = 2 * r2 + 1 < m ? lo + ld_src : nullptr;
    for (int64_t c = 0; c < n; c += 16) {
      const __m512i l = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + c))));
      const __m512i u = hi == nullptr ? _mm512_setzero_si512()
                                      : _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(hi + c))));
      _mm512_storeu_si512(dst + r2 * ld_dst + c, _mm512_or_si512(l, _mm512_slli_epi32(u, 16)));
    }
  }
#else
  TORCH_INTERNAL_ASSERT(false, "row_pairs_bf16: this build does not target AVX512_BF16");
#endif
}

// Rows [0, m) of an fp32 tile times mul, as bf16 rows: columns [0, n), n a multiple of 32.
inline void rows_bf16(const float* src, int64_t ld_src, int64_t m, int64_t n, float mul, c10::BFloat16* dst,
                      int64_t ld_dst) {
  const fVec vmul(mul);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; c += cpu::kStep) {
      fVec a, b;
      cpu::load2(src + r * ld_src + c, a, b);
      cpu::to_bf16(a * vmul, b * vmul).store(dst + r * ld_dst + c);
    }
}

// ---- backward -------------------------------------------------------------------------------
template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const BiasView& bias, const std::vector<Seq>& seqs,
              double scale, int64_t causal, const Dropout& dropout, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t) {
  const int64_t hq = q.size(1), hk = k.size(1), groups = hq / hk, d = q.size(3), dv = v.size(3);
  const int64_t ltot = q.size(2), ld_d = tile_ld(d), ld_dv = tile_ld(dv), ld_s = tile_ld(kBlockK);
  const Rows<T> Q(q), K(k), V(v), O(out), dO(grad_out), dQ(dq), dK(dk), dV(dv_t);
  const float* lse_base = lse.const_data_ptr<float>();
  const float s_mul = static_cast<float>(scale);

  int64_t max_lq = 0, max_lk = 0;
  for (const Seq& s : seqs) max_lq = std::max(max_lq, s.lq), max_lk = std::max(max_lk, s.lk);
  const int64_t key_blocks = (max_lk + kBlockK - 1) / kBlockK;
  const int64_t heads = static_cast<int64_t>(seqs.size()) * hk;
  if (heads == 0) {  // no sequences (an empty batch): nothing flows back, and the planner below divides by heads
    dq.zero_(), dk.zero_(), dv_t.zero_();
    return;
  }
  // Key-block chunks per (sequence, kv head): one, unless heads are too few to keep threads busy.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = heads >= 2 * threads ? 1 : std::clamp<int64_t>((2 * threads + heads - 1) / heads, 1,
                                                                        std::max<int64_t>(key_blocks, 1));
  // dQ partial sums of each chunk: [heads, chunks, groups, max_lq, ld_d] fp32 when chunks > 1.
  at::Tensor partial = chunks > 1 ? at::zeros({heads, chunks, groups, max_lq, ld_d}, q.options().dtype(at::kFloat))
                                  : at::Tensor();
  // The bf16 tiles (see row_pairs_bf16): head dims padded to even, query rows to even per group.
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const bool dot = kBf16 && cpu::bf16_dot();
  const int64_t d_even = (d + 1) / 2 * 2, dv_even = (dv + 1) / 2 * 2;

  at::parallel_for(0, heads * chunks, 1, [&](int64_t t0, int64_t t1) {
    cpu::LineVector<float> qp, dop, delta, lse_rows, dq_acc;
    cpu::LineVector<float> kt(dot ? 0 : d * ld_s), vt(dot ? 0 : dv * ld_s), kr(dot ? 0 : kBlockK * ld_d);
    cpu::LineVector<float> p_tile(kBlockQ * ld_s), ds_tile(kBlockQ * ld_s), dk_acc(kBlockK * ld_d), dv_acc(kBlockK * ld_dv);
    // bf16 operands: per task Q s and dO as rows and as pairs of rows; per key block K^T, V^T and K;
    // per tile P Z and dS as pairs of rows, s dS as rows
    cpu::LineVector<c10::BFloat16> qs_rows, do_rows, qs_pairs, do_pairs;
    cpu::LineVector<c10::BFloat16> kt_b(dot ? d_even * ld_s : 0), vt_b(dot ? dv_even * ld_s : 0);
    cpu::LineVector<c10::BFloat16> kr_b(dot ? kBlockK * ld_d : 0), ds_rows(dot ? kBlockQ * ld_s : 0);
    cpu::LineVector<uint32_t> p_pairs(dot ? kBlockQ / 2 * ld_s : 0), ds_pairs(dot ? kBlockQ / 2 * ld_s : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t head = t / chunks, chunk = t % chunks;
      const int64_t si = head / hk, kvh = head % hk;
      const Seq& sq = seqs[si];
      const Causal causal_mask(causal, sq);
      const int64_t lq = sq.lq;
      // Every query head of the group, packed once per task: Q * scale and dO (fp32, or bf16 for the
      // dot tiles), lse, delta.
      const int64_t lq_even = (lq + 1) / 2 * 2;
      qp.resize(dot ? 0 : groups * lq * ld_d);
      dop.resize(dot ? 0 : groups * lq * ld_dv);
      delta.resize(groups * lq);
      lse_rows.resize(groups * lq);
      dq_acc.assign(groups * lq * ld_d, 0.f);
      if (dot) {
        qs_rows.resize(groups * lq * d_even), do_rows.resize(groups * lq * dv_even);
        qs_pairs.resize(groups * lq_even * ld_d), do_pairs.resize(groups * lq_even * ld_dv);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        if constexpr (kBf16) {
          if (dot) {
            // Q s rounded to bf16 once, then laid out both ways
            for (int64_t i = 0; i < lq; ++i) {
              const T* src = Q.row(sq.batch, h, sq.q_begin + i);
              c10::BFloat16* dst = qs_rows.data() + (g * lq + i) * d_even;
              for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<c10::BFloat16>(static_cast<float>(src[c]) * s_mul);
              if (d % 2) dst[d] = c10::BFloat16(0.f);
            }
            const Rows<c10::BFloat16> qs(qs_rows.data() + g * lq * d_even, 0, 0, d_even);
            pack_values_vnni(qs, 0, 0, 0, lq, d, qs_pairs.data() + g * lq_even * ld_d, ld_d, lq_even);
            copy_rows_bf16(dO, sq.batch, h, sq.q_begin, lq, dv, do_rows.data() + g * lq * dv_even, dv_even);
            pack_values_vnni(dO, sq.batch, h, sq.q_begin, lq, dv, do_pairs.data() + g * lq_even * ld_dv, ld_dv, lq_even);
          }
        }
        if (!dot) {
          pack_rows(Q, sq.batch, h, sq.q_begin, lq, d, qp.data() + g * lq * ld_d, ld_d, s_mul);
          pack_rows(dO, sq.batch, h, sq.q_begin, lq, dv, dop.data() + g * lq * ld_dv, ld_dv);
        }
        for (int64_t i = 0; i < lq; ++i) {
          const T* o = O.row(sq.batch, h, sq.q_begin + i);
          const T* go = dO.row(sq.batch, h, sq.q_begin + i);
          float acc = 0.f;
          for (int64_t c = 0; c < dv; ++c) acc += static_cast<float>(o[c]) * static_cast<float>(go[c]);
          delta[g * lq + i] = acc;
          lse_rows[g * lq + i] = lse_base[(sq.batch * hq + h) * ltot + sq.q_begin + i];
        }
      }
      const auto store_key_grads = [&](int64_t j0, int64_t n) {  // dK, dV of keys [j0, j0 + n) from the accumulators
        for (int64_t r = 0; r < n; ++r) {
          from_float(dk_acc.data() + r * ld_d, dK.row(sq.batch, kvh, sq.k_begin + j0 + r), d, 1.f);
          from_float(dv_acc.data() + r * ld_dv, dV.row(sq.batch, kvh, sq.k_begin + j0 + r), dv, 1.f);
        }
      };
      // Keys some query head of the group may see (BiasView::key_range): the key blocks outside them
      // get zero gradients without a tile.
      BiasView::Keys keys{sq.lk, 0};
      for (int64_t g = 0; g < groups; ++g) {
        const BiasView::Keys kg = bias.key_range(sq.batch, kvh * groups + g, 0, lq, sq.lk);
        keys.join(kg.begin, kg.end);
      }
      for (int64_t kb = chunk; kb * kBlockK < sq.lk; kb += chunks) {  // interleaved: causal work stays even
        const int64_t j0 = kb * kBlockK, n = std::min(kBlockK, sq.lk - j0), n_pad = round_up_to_vec(n);
        if (j0 + n <= keys.begin || j0 >= keys.end) {
          std::fill(dk_acc.begin(), dk_acc.begin() + n * ld_d, 0.f);
          std::fill(dv_acc.begin(), dv_acc.begin() + n * ld_dv, 0.f);
          store_key_grads(j0, n);
          continue;
        }
        if constexpr (kBf16) {
          if (dot) {
            pack_keys_vnni(K, sq.batch, kvh, sq.k_begin + j0, n, d, kt_b.data(), ld_s);
            pack_keys_vnni(V, sq.batch, kvh, sq.k_begin + j0, n, dv, vt_b.data(), ld_s);
            pack_values_vnni(K, sq.batch, kvh, sq.k_begin + j0, n, d, kr_b.data(), ld_d, (n + 1) / 2 * 2);
          }
        }
        if (!dot) {
          pack_cols(K, sq.batch, kvh, sq.k_begin + j0, n, d, kt.data(), ld_s);
          pack_cols(V, sq.batch, kvh, sq.k_begin + j0, n, dv, vt.data(), ld_s);
          pack_rows(K, sq.batch, kvh, sq.k_begin + j0, n, d, kr.data(), ld_d);
        }
        std::fill(dk_acc.begin(), dk_acc.begin() + n * ld_d, 0.f);
        std::fill(dv_acc.begin(), dv_acc.begin() + n * ld_dv, 0.f);
        // The first query that sees key j0 (causal): earlier query blocks are skipped.
        const int64_t i_first = causal_mask.on ? std::max<int64_t>(0, j0 - causal_mask.offset) : 0;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t h = kvh * groups + g;
          for (int64_t i0 = i_first / kBlockQ * kBlockQ; i0 < lq; i0 += kBlockQ) {
            const int64_t m = std::min(kBlockQ, lq - i0);
            const float* qb = dot ? nullptr : qp.data() + (g * lq + i0) * ld_d;
            const float* dob = dot ? nullptr : dop.data() + (g * lq + i0) * ld_dv;
            if (dot) {
              cpu::small_gemm_bf16(m, n_pad, d_even / 2, reinterpret_cast<const uint32_t*>(qs_rows.data() + (g * lq + i0) * d_even),
                                   d_even / 2, 1, kt_b.data(), ld_s, p_tile.data(), ld_s);
              cpu::small_gemm_bf16(m, n_pad, dv_even / 2, reinterpret_cast<const uint32_t*>(do_rows.data() + (g * lq + i0) * dv_even),
                                   dv_even / 2, 1, vt_b.data(), ld_s, ds_tile.data(), ld_s);
            } else {
              small_gemm(m, n_pad, d, qb, ld_d, 1, kt.data(), ld_s, p_tile.data(), ld_s, 1.f, false);
              small_gemm(m, n_pad, dv, dob, ld_dv, 1, vt.data(), ld_s, ds_tile.data(), ld_s, 1.f, false);
            }
            for (int64_t r = 0; r < m; ++r) {
              const int64_t i = i0 + r;
              float* p = p_tile.data() + r * ld_s;
              float* ds = ds_tile.data() + r * ld_s;
              bias_and_mask(p, n, bias.row(sq.batch, h, i, j0), causal_mask.visible(i, sq.lk) - j0);
              // P = exp(s - lse) <= 1 (lse = the max, log(sum) lost, for a row a finite mask hides at every key)
              const fVec one(1.f), vl(-lse_rows[g * lq + i]), vd(delta[g * lq + i]);
              for (int64_t j = 0; j < n; j += fVec::size()) {
                const int64_t w = std::min<int64_t>(fVec::size(), n - j);
                store_any(p + j, exp_below_max(load_any(p + j, w), one, vl), w);
              }
              if (dropout.on) {  // dP = (dO V^T) * Z and, for dV, P * Z (kept in ds's place meanwhile)
                dropout.apply(ds, n, si, h, i, j0);
                for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - delta[g * lq + i]);
              } else {
                for (int64_t j = 0; j < n; j += fVec::size()) {
                  const int64_t w = std::min<int64_t>(fVec::size(), n - j);
                  store_any(ds + j, load_any(p + j, w) * (load_any(ds + j, w) - vd), w);
                }
              }
            }
            if (dropout.on)  // dV needs P * Z: apply the same mask to P now that dS is done
              for (int64_t r = 0; r < m; ++r) dropout.apply(p_tile.data() + r * ld_s, n, si, h, i0 + r, j0);
            // dV += (P*Z)^T dO; dK += dS^T (Q s); dQ += s * dS K
            if (dot) {  // columns [n, n_pad) of both tiles are zero: K^T and V^T are zero there
              const int64_t m2 = (m + 1) / 2;
              row_pairs_bf16(p_tile.data(), ld_s, m, n_pad, p_pairs.data(), ld_s);
              row_pairs_bf16(ds_tile.data(), ld_s, m, n_pad, ds_pairs.data(), ld_s);
              rows_bf16(ds_tile.data(), ld_s, m, cpu::round_up_to_step(n), s_mul, ds_rows.data(), ld_s);
              cpu::small_gemm_bf16(n, ld_dv, m2, p_pairs.data(), 1, ld_s, do_pairs.data() + (g * lq_even + i0) * ld_dv,
                                   ld_dv, dv_acc.data(), ld_dv, true);
              cpu::small_gemm_bf16(n, ld_d, m2, ds_pairs.data(), 1, ld_s, qs_pairs.data() + (g * lq_even + i0) * ld_d, ld_d,
                                   dk_acc.data(), ld_d, true);
              cpu::small_gemm_bf16(m, ld_d, (n + 1) / 2, reinterpret_cast<const uint32_t*>(ds_rows.data()), ld_s / 2, 1,
                                   kr_b.data(), ld_d, dq_acc.data() + (g * lq + i0) * ld_d, ld_d, true);
              continue;
            }
            small_gemm(n, ld_dv, m, p_tile.data(), 1, ld_s, dob, ld_dv, dv_acc.data(), ld_dv, 1.f, true);
            small_gemm(n, ld_d, m, ds_tile.data(), 1, ld_s, qb, ld_d, dk_acc.data(), ld_d, 1.f, true);
            small_gemm(m, ld_d, n, ds_tile.data(), ld_s, 1, kr.data(), ld_d, dq_acc.data() + (g * lq + i0) * ld_d,
                       ld_d, s_mul, true);
          }
        }
        store_key_grads(j0, n);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        for (int64_t i = 0; i < lq; ++i) {
          const float* src = dq_acc.data() + (g * lq + i) * ld_d;
          if (chunks == 1) {
            from_float(src, dQ.row(sq.batch, h, sq.q_begin + i), d, 1.f);
          } else {
            float* dst = partial.data_ptr<float>() + (((head * chunks + chunk) * groups + g) * max_lq + i) * ld_d;
            std::copy(src, src + d, dst);
          }
        }
      }
    }
  });
  if (chunks > 1) {  // dQ = the chunks' partial sums, added in chunk order
    const float* part = partial.const_data_ptr<float>();
    at::parallel_for(0, heads * groups, 1, [&](int64_t t0, int64_t t1) {
      cpu::LineVector<float> row(d);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t head = t / groups, g = t % groups, si = head / hk, kvh = head % hk;
        const Seq& sq = seqs[si];
        for (int64_t i = 0; i < sq.lq; ++i) {
          std::fill(row.begin(), row.end(), 0.f);
          for (int64_t c = 0; c < chunks; ++c) {
            const float* src = part + (((head * chunks + c) * groups + g) * max_lq + i) * ld_d;
            for (int64_t x = 0; x < d; ++x) row[x] += src[x];
          }
          from_float(row.data(), dQ.row(sq.batch, kvh * groups + g, sq.q_begin + i), d, 1.f);
        }
      }
    });
  }
}

}  // namespace

std::vector<at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                          const std::optional<at::Tensor>& seed) {
  check_operands(q, k, v);
  const auto seqs = sequences(q, k, cu_seqlens_q, cu_seqlens_k);
  at::Tensor out = cpu::cached_empty({q.size(0), q.size(2), q.size(1), v.size(3)}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const Dropout dropout(dropout_p, seed, q.size(1), max_seqlen_q, max_seqlen_k);
  const BiasView bias_view(bias);
  BIGNLP_DISPATCH_FLOAT_BF16(q.scalar_type(), "attention_fwd_cpu", [&] {
    forward<scalar_t>(q, k, v, bias_view, seqs, scale, causal, dropout, out, lse);
  });
  return {out, lse};
}

namespace {
// Whether the lane can read t as it is: a strided CPU [B, H, L, D] tensor of q's dtype, its last
// dimension contiguous, that autograd need not see.
bool lane_readable(const at::Tensor& t, at::ScalarType dtype, bool grad) {
  return cpu::lane_tensor(t, dtype, grad) && t.dim() == 4 && t.stride(3) == 1;
}


// The mask as the kernel's bias operand: a bool or float32 CPU tensor of at most 4 dimensions that
// broadcasts to [B, H, Lq, Lk] (from the right, as torch broadcasts), viewed at that shape without a
// copy; nullopt where the lane cannot take it.
std::optional<at::Tensor> lane_mask(const at::Tensor& mask, at::IntArrayRef shape, bool grad) {
  if (!(cpu::lane_tensor(mask, at::kBool, grad) || cpu::lane_tensor(mask, at::kFloat, grad)) || mask.dim() > 4) {
    return std::nullopt;
  }
  const int64_t lead = 4 - mask.dim();
  for (int64_t i = 0; i < mask.dim(); ++i) {
    if (mask.size(i) != 1 && mask.size(i) != shape[lead + i]) return std::nullopt;
  }
  at::Tensor four = mask;
  while (four.dim() < 4) four = four.unsqueeze(0);
  return four.expand(shape);
}
}  // namespace

std::vector<at::Tensor> attention_lane_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& mask, std::optional<double> scale,
                                           bool causal, bool enable_gqa, int64_t max_head_dim) {
  const at::ScalarType dtype = q.scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || !lane_readable(q, dtype, grad) ||
      !lane_readable(k, dtype, grad) || !lane_readable(v, dtype, grad)) {
    return {};
  }
  const int64_t h = q.size(1), hk = k.size(1), d = q.size(3);
  if (h == 0 || d == 0 || k.size(0) != q.size(0) || k.size(3) != d || k.size(2) == 0 ||
      k.sizes().slice(0, 3) != v.sizes().slice(0, 3) || std::max(d, v.size(3)) > max_head_dim ||
      (hk != h && !(enable_gqa && hk > 0 && h % hk == 0))) {
    return {};
  }
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  if (!std::isfinite(s)) return {};
  std::optional<at::Tensor> bias;
  if (mask.has_value()) {
    bias = lane_mask(*mask, {q.size(0), h, q.size(2), k.size(2)}, grad);
    if (!bias.has_value()) return {};
  }
  return {attention_fwd_cpu(q, k, v, bias, std::nullopt, std::nullopt, q.size(2), k.size(2), s, causal ? 1 : 0,
                            0.0, std::nullopt)[0]};
}

std::vector<at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                          const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, double scale, int64_t causal, double dropout_p,
                                          const std::optional<at::Tensor>& seed) {
  check_operands(q, k, v);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == q.scalar_type(),
              "attention: grad_out must match out");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat, "attention: lse must be contiguous float32");
  const auto seqs = sequences(q, k, cu_seqlens_q, cu_seqlens_k);
  at::Tensor dq = cpu::cached_empty_like(q), dk = cpu::cached_empty_like(k), dv = cpu::cached_empty_like(v);
  const Dropout dropout(dropout_p, seed, q.size(1), max_seqlen_q, max_seqlen_k);
  const BiasView bias_view(bias);
  BIGNLP_DISPATCH_FLOAT_BF16(q.scalar_type(), "attention_bwd_cpu", [&] {
    backward<scalar_t>(grad_out, q, k, v, out, lse, bias_view, seqs, scale, causal, dropout, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace bignlp_fast

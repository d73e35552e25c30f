// One recurrent layer in one direction (LSTM, GRU, RNN tanh/relu) on the CPU: the whole time loop,
// forward and backward, float32 and bfloat16 (fp32 state and accumulation).
//
// The contract is stated in bignlp_fast/ops/rnn.py; rnn_{fwd,bwd}_torch there is the specification.
//
// Forward, per step: blocks of kUnits hidden units, claimed by the threads of one parallel region
// that runs the whole loop (StepRegion). W_hh^T is packed once so that a block's columns hold all G
// gates of its units side by side; a thread multiplies the previous state by its block's columns
// (the small GEMM of gemm.h) and applies the gate nonlinearities and the state update of those units
// at once, while the gates are in cache. The new state goes to a second buffer (other threads still
// read the old one); the buffers alternate. An LSTM projection adds a second round per step:
// h = m W_hr^T.
//
// Backward, per step in reverse: the gate gradients of every unit (from the saved gates, cell and
// state of the workspace), then dh_prev = dG W_hh over column panels; both in one parallel region for
// the whole loop, as the forward's steps (StepRegion).
// The weight gradients are left to large GEMMs over all steps at the end (cpu::packed_gemm).
#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../ops.h"
#include "activation.h"
#include "amx.h"
#include "common.h"
#include "gemm.h"

namespace bignlp_fast {
namespace {

using cpu::fVec;
using cpu::load_any;
using cpu::round_up_to_vec;
using cpu::small_gemm;
using cpu::store_any;
using cpu::to_float;

constexpr int64_t kUnits = 2 * fVec::size();  // hidden units per block of the forward's GEMM
// (the panel width of gemm.h too: the cells on packed weights read linear_pack_cpu's panels as blocks)
static_assert(kUnits == cpu::gemm_detail::kPanel);

// In a weight [G*H, K] packed by linear_pack_cpu (ops.linear.prepack's copies: W^T in column panels of
// kUnits floats, panel p = [K, kUnits] holding the output columns [p kUnits, (p + 1) kUnits)), with H a
// multiple of kUnits: the panel of gate g's units [blk kUnits, (blk + 1) kUnits).
inline const float* gate_panel(const float* packed, int64_t K, int64_t blocks, int64_t g, int64_t blk) {
  return packed + (g * blocks + blk) * K * kUnits;
}

enum class Mode { kLstm, kGru, kRnnTanh, kRnnRelu };

Mode parse_mode(const std::string& mode) {
  if (mode == "lstm") return Mode::kLstm;
  if (mode == "gru") return Mode::kGru;
  if (mode == "rnn_tanh") return Mode::kRnnTanh;
  TORCH_CHECK(mode == "rnn_relu", "rnn: mode must be lstm, gru, rnn_tanh or rnn_relu, got ", mode);
  return Mode::kRnnRelu;
}

int64_t gate_count(Mode m) { return m == Mode::kLstm ? 4 : m == Mode::kGru ? 3 : 1; }

// The gate nonlinearities: exp_u20-based (csrc/cpu/activation.h), fewer instructions than Sleef's
// exp and tanh (the gain on a whole B32 LSTM step, ~5%, was within this machine's run-to-run noise).
using cpu::sigmoid;
using cpu::tanh_fast;


// Sizes and the workspace layout shared by forward and backward. Per (step, batch row), fp32:
//   [gates G*H (after their nonlinearity) | state S after the step | LSTM: cell state after the
//    step (H), m (H, with a projection) ; GRU: h W_hn^T + b_hn (H)]
// "After the step" is the kept state for a row whose step is inactive (past its length).
struct Shape {
  Mode mode;
  int64_t T, B, G, H, S;
  bool proj;
  int64_t off_state, off_c, off_m, off_hn, width;

  Shape(const std::string& mode_name, const at::Tensor& xw, const at::Tensor& w_hh, bool has_proj)
      : mode(parse_mode(mode_name)), T(xw.size(0)), B(xw.size(1)), G(gate_count(mode)), H(xw.size(2) / G),
        S(w_hh.size(1)), proj(has_proj) {
    TORCH_CHECK(xw.dim() == 3 && xw.size(2) == G * H && w_hh.size(0) == G * H,
                "rnn: xw must be [T, B, G*H] and w_hh [G*H, S]");
    off_state = G * H;
    off_c = off_state + S;
    off_m = off_c + H;
    off_hn = off_c;
    width = off_state + S + (mode == Mode::kLstm ? H + (proj ? H : 0) : mode == Mode::kGru ? H : 0);
  }
  // The step processed just before step t (-1: the initial state).
  int64_t previous(int64_t t, bool reverse) const { return reverse ? (t + 1 < T ? t + 1 : -1) : t - 1; }
};

// ---- one parallel region for a whole time loop ------------------------------------------------
// Every step needs the whole state of the step before, so a step's work must wait for the last one's
// (twice per step with a projection, or in the backward). With a region per step, each wait is an
// OpenMP fork and join: the pool is woken, each thread allocates its scratch, runs a fixed share,
// and the master waits for the last thread. Instead the whole loop runs in one region. Its work is a
// sequence of rounds (a step's blocks of units, its column panels, ...), every thread walking the
// same sequence; in a round the threads claim items one at a time from a shared counter, and a round
// starts once every item of the one before is done (a shared count of finished items).
//
// Claiming instead of fixed shares: where another process slows one of the cores (this 2-core
// machine shares its cores with compile jobs; one core often ran at half the speed of the other),
// the fast core does more of the items; with fixed halves it spun at the barrier for a third of a B32
// H512 forward (perf). Waiting for items instead of for threads: a thread that is descheduled
// between items, or while it waits, holds nothing up; the others go on without it, and it skips the
// rounds that were finished meanwhile. Nothing waits for a thread to arrive, so this never deadlocks,
// whatever threads the region gets (one thread runs everything).
//
// Home ranges: a round's items are split into one contiguous range per thread, the same split every
// round; a thread claims from the front of its own range, and once that is empty takes from the
// backs of the others'. So, unless a core falls behind, a block of units goes to the same thread at
// every step, and with it the lines of W_hh, c and h that the block touches stay in that core's
// caches. With one shared counter the blocks moved between the cores from step to step: the bf16
// B32 H512 recurrence took 12% longer (13.9 against 12.3 ms, medians of 8 alternating rounds, both
// builds in one process), fp32 B32 and B4 1-2%. A claim is one compare-and-swap and a finished item
// one atomic add (~0.1 us each).
class StepRegion {
 public:
  explicit StepRegion(int64_t items)
      : threads_(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items))),
        ranges_(new Range[threads_]) {
    TORCH_CHECK(items < kMaxItems, "rnn: too many work items per step (", items, "); at most ", kMaxItems - 1);
  }

  // A thread's place in the sequence of rounds.
  class Worker {
   public:
    Worker(StepRegion& r, int64_t id) : r_(r), id_(id) {}
    // Starts the next round, of n items, once every item of the current one is done.
    void round(int64_t n) {
      const int64_t end = base_ + n_;
      for (int64_t spins = 0; r_.done_.load(std::memory_order_acquire) < end; ++spins) {
        if (spins < (int64_t{1} << 12)) {
#if defined(__x86_64__) || defined(_M_X64)
          _mm_pause();
#endif
        } else {
          std::this_thread::yield();  // a long wait: a thread holding an item is descheduled
        }
      }
      base_ = end;
      n_ = n;
      ++round_;
    }
    // The next unclaimed item of this round, or -1 when all are claimed; done() when it is finished.
    int64_t claim() {
      for (int64_t k = 0; k < r_.threads_; ++k) {
        const int64_t i = r_.take((id_ + k) % r_.threads_, round_, n_, k == 0);
        if (i >= 0) return i;
      }
      return -1;
    }
    void done() { r_.done_.fetch_add(1, std::memory_order_release); }

   private:
    StepRegion& r_;
    const int64_t id_;
    int64_t base_ = 0, n_ = 0;  // this round's items are [base_, base_ + n_) of the whole sequence
    uint32_t round_ = 0;        // rounds are numbered from 1 (a range in round 0 is not set up yet)
  };

  // Item i of a round of n mirrored within its home range: walking a range front to back on one
  // step and back to front on the next, a thread starts each step on the items it finished the last
  // one with, whose data may still be in its core's cache.
  int64_t mirrored(int64_t i, int64_t n) const {
    for (int64_t r = 0; r < threads_; ++r)
      if (i < home_begin(r + 1, n)) return home_begin(r, n) + home_begin(r + 1, n) - 1 - i;
    return i;
  }

  // Runs body(worker) on each thread of one parallel region.
  template <typename Body>
  void run(const Body& body) {
    at::parallel_for(0, threads_, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t id = t0; id < t1; ++id) {  // one index per thread, unless the pool has fewer threads
        Worker w(*this, id);
        body(w);
      }
    });
  }

 private:
  static constexpr int64_t kMaxItems = int64_t{1} << 16;
  // One thread's range of a round, packed in one word: bits 0-15 the front (its next item), 16-31
  // the back (one past its last unclaimed item), 32-63 the round. The first claim of a round finds
  // an older round there and sets the range up (the same value whichever thread does it).
  struct alignas(64) Range {
    std::atomic<uint64_t> state{0};
  };

  // The first item of thread r's home range in a round of n items (home_begin(threads_, n) == n).
  int64_t home_begin(int64_t r, int64_t n) const { return n * r / threads_; }

  // An item of range r in round `round` of n items, from its front (the owner) or its back; -1 when
  // the range is empty, or already in a later round (so this one is finished).
  int64_t take(int64_t r, uint32_t round, int64_t n, bool front) {
    std::atomic<uint64_t>& a = ranges_[r].state;
    uint64_t s = a.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t sr = static_cast<uint32_t>(s >> 32);
      if (sr != round) {
        if (static_cast<int32_t>(sr - round) > 0) return -1;
        const uint64_t lo = home_begin(r, n), hi = home_begin(r + 1, n);
        const uint64_t fresh = (uint64_t{round} << 32) | (hi << 16) | lo;
        if (!a.compare_exchange_weak(s, fresh, std::memory_order_relaxed)) continue;
        s = fresh;
      }
      const int64_t f = static_cast<int64_t>(s & 0xffff), b = static_cast<int64_t>((s >> 16) & 0xffff);
      if (f >= b) return -1;
      if (a.compare_exchange_weak(s, front ? s + 1 : s - (uint64_t{1} << 16), std::memory_order_relaxed))
        return front ? f : b - 1;
    }
  }

  const int64_t threads_;
  std::unique_ptr<Range[]> ranges_;
  alignas(64) std::atomic<int64_t> done_{0};  // items finished, over all rounds
};

// ---- forward --------------------------------------------------------------------------------
// Whether a step of T = 1 takes its recurrent product from torch's GEMM (see forward's one_step):
// float32, or bf16 where torch's bf16 GEMM is oneDNN's (AMX or AVX512_BF16 here too).
template <typename T>
bool one_step_uses_torch_gemm() {
  return std::is_same_v<T, float> || cpu::amx_bf16() || cpu::bf16_dot();
}
// That product, h0 [B, S] W_hh^T, as contiguous fp32 [B, G*H] (in bf16 rounded to bf16 first, as
// torch's own bf16 cell).
inline at::Tensor one_step_product(const at::Tensor& h0, const at::Tensor& w_hh) {
  return at::mm(h0, w_hh.t()).to(at::kFloat).contiguous();
}

template <typename T>
void forward(const Shape& sh, const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
             const at::Tensor& h0, const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
             const std::vector<int64_t>& len, bool reverse, at::Tensor& out, at::Tensor& h_n, at::Tensor& c_n,
             at::Tensor& ws, bool save, const float* packed_hh) {
  const int64_t G = sh.G, H = sh.H, S = sh.S, B = sh.B;
  const int64_t blocks = (H + kUnits - 1) / kUnits, ld_w = blocks * G * kUnits;
  // W_hh^T in panels of kUnits columns, panel (blk * G + g) holding gate g of units blk * kUnits + u:
  // panel p is [S, kUnits] at wt + p * S * kUnits. Each panel is contiguous (a row stride of whole
  // kibibytes would put every row of a panel in the same few L1 sets).
  // Where amx_bf16() holds, bf16 layers multiply on AMX (amx.h): W_hh^T as one block of VNNI pairs
  // per kUnits units with all G gates side by side, [K2][G * kUnits][2], so that a block's step is a
  // single amx_gemm of [B, 2 K2] x [2 K2, G * kUnits]; the state is rounded to bf16 for it.
  // Elsewhere, where bf16_dot() holds, they run on the CPU's bf16 dot products (gemm.h): the panels
  // above as bf16 pairs of k, and the state rounded to bf16 for the GEMM (as torch's bf16 LSTM keeps
  // it). On either path the gates, the update and the state itself stay fp32.
  const bool amx = std::is_same_v<T, c10::BFloat16> && cpu::amx_bf16();
  const bool dot = std::is_same_v<T, c10::BFloat16> && !amx && cpu::bf16_dot();
  // One step (the cells: LSTMCell, GRUCell, RNNCell): packing W_hh^T would cost more than the
  // product it serves (B4 H512 LSTM on a Xeon: the call 293 us, at::mm 78 us), so the step's
  // recurrent product is h0 W_hh^T by torch's GEMM, [B, G*H] with the gates apart, and the blocks
  // run only their gate epilogue on it. In bf16 only where torch's bf16 GEMM is oneDNN's (AMX or
  // AVX512_BF16 here too), and then the product is rounded to bf16, as in torch's own bf16 cell.
  const bool one_step = sh.T == 1 && one_step_uses_torch_gemm<T>();
  // A float32 W_hh packed once (ops.linear.prepack, linear_pack_cpu's panels; its caller checked the
  // layout): the same panels, in gate-major order (gate_panel), read in place instead of packing W_hh^T
  // at every call.
  const bool prepacked = packed_hh != nullptr && std::is_same_v<T, float> && !one_step;
  const at::Tensor rec = one_step ? one_step_product(h0, w_hh) : at::Tensor();
  const float* rec_p = one_step ? rec.const_data_ptr<float>() : nullptr;
  const int64_t GU = G * kUnits;
  cpu::LineVector<float> bias(ld_w, 0.f);
  const int64_t K2 = (S + 1) / 2;
  // The packed W_hh, MiBs: from the buffer cache (buffer_cache.h), whose pages stay faulted in from one
  // call to the next. From line_buffer (std::vector before it), 16 MiB at H = 1024 came as fresh pages
  // at every call: a two-step B1 call 1819 -> 1466 us (LSTM), 1723 -> 1111 (GRU); at H = 512 glibc kept
  // the memory, and what remains is the packing itself, a transpose bound by memory (~270 us of a
  // 343-358 us call; 74-94 us on the copy ops.prepack keeps, packed_hh above).
  // Written whole below: no zeroing first (a 4 MiB memset is ~0.1 ms a call); AMX's blocks are zeroed
  // (their columns past H are not written).
  const auto f32 = at::TensorOptions().dtype(at::kFloat), b16 = at::TensorOptions().dtype(at::kBFloat16);
  const at::Tensor wt_buf = cpu::cached_empty({dot || amx || one_step || prepacked ? 0 : S * ld_w}, f32);
  float* const wt = wt_buf.data_ptr<float>();
  auto panel = [&](int64_t blk, int64_t g) {  // W_hh^T's columns of gate g, block blk: [S, kUnits]
    return prepacked ? gate_panel(packed_hh, S, blocks, g, blk) : wt + (blk * G + g) * S * kUnits;
  };
  const at::Tensor wtb_buf = cpu::cached_empty({dot && !one_step ? K2 * ld_w * 2 : 0}, b16);
  c10::BFloat16* const wtb = wtb_buf.data_ptr<c10::BFloat16>();
  const at::Tensor w_amx_buf = cpu::cached_zeros({amx && !one_step ? blocks * K2 * GU * 2 : 0}, b16);
  c10::BFloat16* const w_amx = w_amx_buf.data_ptr<c10::BFloat16>();
  const T* w = w_hh.const_data_ptr<T>();
  const T* b_src = b_hh.has_value() ? b_hh->const_data_ptr<T>() : nullptr;
  // Panels by block transposes: panel (blk, g) is the transpose of the kUnits rows of W_hh that hold
  // gate g of the block's units (as fp32 [S, kUnits], or for the bf16 dot products as 32-bit pairs of
  // k [K2, kUnits]: a row's pair (2kp, 2kp + 1) is one uint32 of the row, so the same transpose).
  // Element by element, the strided writes took ~0.4 ms a call at H = 512 (10% of a B4 T128 forward).
  if (b_src != nullptr)  // unit j of gate g at column (j / kUnits * G + g) * kUnits + j % kUnits
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < H; ++j) bias[(j / kUnits * G + g) * kUnits + j % kUnits] = static_cast<float>(b_src[g * H + j]);
  if (one_step || prepacked) {
    // no panels to make: see rec and packed_hh above
  } else if (!amx) {
    at::parallel_for(0, G * blocks, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t blk = p / G, g = p % G, j0 = blk * kUnits, nu = std::min(kUnits, H - j0);
        const T* rows = w + (g * H + j0) * S;
        if (dot) {
          uint32_t* dst = reinterpret_cast<uint32_t*>(wtb) + p * K2 * kUnits;
          if (S % 2 == 0) {  // (the panel's columns past H: zero)
            cpu::transpose_32bit(reinterpret_cast<const uint32_t*>(rows), S / 2, dst, kUnits, nu, K2, kUnits);
          } else {  // an odd S: the last pair's high half is zero
            std::fill(dst, dst + K2 * kUnits, 0u);
            for (int64_t u = 0; u < nu; ++u)
              for (int64_t k = 0; k < S; ++k) wtb[((p * K2 + k / 2) * kUnits + u) * 2 + k % 2] = rows[u * S + k];
          }
          continue;
        }
        cpu::transpose_to_float(rows, S, wt + p * S * kUnits, kUnits, nu, S, kUnits);
      }
    });
  } else {
    // Per (gate, block) panel, 16 units at a time: a unit's pair of k is one uint32 of its row of W_hh,
    // so with S even one gather fetches a pair for 16 units (bf16, H = S = 512, B32, T = 1: a call took
    // 1.54 ms with the scalar loop, 1.10 ms with the gathers; torch.nn.LSTM 0.74 ms)
    at::parallel_for(0, G * blocks, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t g = p / blocks, blk = p % blocks;
        for (int64_t u0 = 0; u0 < kUnits; u0 += 16) {
          const int64_t j0 = blk * kUnits + u0, nu = std::clamp<int64_t>(H - j0, 0, 16), col0 = g * kUnits + u0;
          const T* rows = w + (g * H + j0) * S;
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            if (nu == 16 && S % 2 == 0 && S < (int64_t{1} << 26)) {
              const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                    _mm512_set1_epi32(static_cast<int32_t>(S * 2)));
              uint32_t* out = reinterpret_cast<uint32_t*>(w_amx);
              for (int64_t k2 = 0; k2 < K2; ++k2)
                _mm512_storeu_si512(out + (blk * K2 + k2) * GU + col0, _mm512_i32gather_epi32(at, rows + 2 * k2, 1));
              continue;
            }
          }
#endif
          for (int64_t u = 0; u < nu; ++u)
            for (int64_t k = 0; k < S; ++k)
              w_amx[((blk * K2 + k / 2) * GU + col0 + u) * 2 + k % 2] = static_cast<c10::BFloat16>(rows[u * S + k]);
        }
      }
    });
  }
  // W_hr^T [H, P padded] for the projection
  const int64_t ld_p = round_up_to_vec(S);
  cpu::LineVector<float> wrt;
  if (sh.proj) {
    wrt.assign(H * ld_p, 0.f);
    const T* wr = w_hr->const_data_ptr<T>();
    for (int64_t p = 0; p < S; ++p)
      for (int64_t j = 0; j < H; ++j) wrt[j * ld_p + p] = static_cast<float>(wr[p * H + j]);
  }
  // The state h, row-major [B, S]: the kept state of inactive rows, and the recurrent GEMM's A
  // operand (the micro-kernel's 8 broadcasts per k come from 8 rows, each line serving 16 k). It is
  // held twice: step `step` reads buffer step % 2 and writes the other, which no worker reads during
  // the step. The cell state c [B, H] is read and written only by the owner of its units: one buffer.
  // (An earlier version also kept a transposed copy [S, B] as the A operand, written by scalar
  // stores; without it, and with the vector stores of the epilogue below, a one-thread step of the
  // B32 H512 LSTM went from ~364 to ~345 us, the GEMM alone being ~312.)
  cpu::LineVector<float> hbuf(2 * B * S), c(B * H, 0.f), m(sh.proj ? B * H : 0);
  to_float(h0.const_data_ptr<T>(), hbuf.data(), B * S);
  if (c0.has_value()) to_float(c0->const_data_ptr<T>(), c.data(), B * H);
  // For bf16 GEMMs (dot products or AMX) the state rounded to bf16, rows padded with a zero to 2 K2,
  // twice as h: read by small_gemm_bf16 as pairs of k (a_rs = K2, a_cs = 1) and by amx_gemm as
  // rows. Columns [k0, k1) (k0 even) of buffer nb are rounded by the worker that wrote them.
  const bool bf16_state = (dot || amx) && !one_step;  // (one step: the product is at::mm's, above)
  cpu::LineVector<c10::BFloat16> hb(bf16_state ? 2 * B * 2 * K2 : 0, c10::BFloat16(0.f));
  auto round_state = [&](int64_t nb, int64_t k0, int64_t k1) {
    if (bf16_state)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = k0; k < k1; k += fVec::size()) {
          const int64_t n = std::min<int64_t>(fVec::size(), k1 - k);
          store_any(hb.data() + (nb * B + b) * 2 * K2 + k, load_any(hbuf.data() + (nb * B + b) * S + k, n), n);
        }
  };
  round_state(0, 0, S);

  const T* x = xw.const_data_ptr<T>();
  // The input projections of a step, regrouped by block of units: xs[(blk * B + b) * GU + g * kUnits + u]
  // = xw[t, b, g * H + blk * kUnits + u], so that a block reads its B * G runs as one contiguous stretch.
  // Read in place, they were B * G runs of kUnits values each a row (8 KiB at H = 512) or a gate (2 KiB)
  // apart, which the hardware prefetcher does not follow and which fall into a few L1 sets: the fp32
  // B32 T128 H512 LSTM recurrence took 46.4-48.1 ms on 2 Zen 4 cores that way, 43.9-44.5 with the copy
  // below (42.1-45.3 in a timing-only build that read an xw already in that layout), medians of 15 in
  // separate processes. The copy for step t + 1 is made during step t, each item taking a share of its rows
  // (read whole, in order): two buffers, step % 2 read while the other is written.
  // The copy costs the same per unit whatever S, the step's GEMM S multiply-adds per gate value: from
  // S = 256 on (kRegroupState). Below, xw is read in place: with S = 128 (B16 H128 T64) the copy made
  // the LSTM 2-6% slower, at S = 512 it made B4 ~2% and B32 ~5% faster (lower quartiles of 11-101
  // calls, alternated processes, 4 rounds, 2 Zen 4 cores).
  constexpr int64_t kRegroupState = 256;
  const bool regroup = !one_step && sh.T > 1 && S >= kRegroupState;
  const int64_t xs_size = B * blocks * GU;
  // (from the buffer cache, as the packed weights above: written before it is read)
  const at::Tensor xs_buf = cpu::cached_empty({regroup ? 2 * xs_size : 0}, xw.options());
  T* const xs = xs_buf.data_ptr<T>();
  auto regroup_rows = [&](int64_t t, int64_t b0, int64_t b1, T* dst) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const T* src = x + (t * B + b) * G * H + g * H + blk * kUnits;
          T* d = dst + (blk * B + b) * GU + g * kUnits;
          const int64_t nu = std::min(kUnits, H - blk * kUnits);
          if (nu == kUnits) std::memcpy(d, src, kUnits * sizeof(T));  // (a fixed size: inlined vector moves)
          else std::memcpy(d, src, nu * sizeof(T));
        }
  };
  if (regroup) regroup_rows(reverse ? sh.T - 1 : 0, 0, B, xs);
  T* o = out.data_ptr<T>();
  float* wsp = save ? ws.data_ptr<float>() : nullptr;
  // The workspace row of (t, b); nothing is written to it without a backward to feed (inference).
  auto ws_row = [&](int64_t t, int64_t b) { return save ? wsp + (t * sh.B + b) * sh.width : nullptr; };
  // A workspace past the caches (B32 T128 H512 LSTM: 48 MiB) is written with streaming stores: it is
  // read only by the backward, long after, and normal stores first read every line they write. What
  // writing the workspace adds to that forward on a 2-core Zen 2: 4.6-5.8 -> 2.9-3.9 ms (GRU 4.0-4.2
  // -> 3.2-3.8; in-process medians of 15, builds alternated, 3 rounds each).
  const bool stream_ws = save && H % fVec::size() == 0 && S % fVec::size() == 0 &&
                         cpu::stream_ok(wsp, sh.width * int64_t{sizeof(float)}, ws.numel() * int64_t{sizeof(float)});
  // One parallel region for the whole time loop (StepRegion): per step, the workers claim blocks of
  // units, then (with a projection) column panels of h = m W_hr^T.
  const int64_t panels = sh.proj ? ld_p / fVec::size() : 0;
  StepRegion region(std::max(blocks, panels));
  region.run([&](StepRegion::Worker& wk) {
    cpu::LineVector<float> tile(one_step ? 0 : B * GU), hp(sh.proj ? B * fVec::size() : 0);
    for (int64_t step = 0; step < sh.T; ++step) {
      const int64_t t = reverse ? sh.T - 1 - step : step;
      const int64_t cur = step % 2, nxt = 1 - cur;
      const float* h = hbuf.data() + cur * B * S;
      float* h_next = hbuf.data() + nxt * B * S;
      wk.round(blocks);  // once the previous step's state is complete
      for (int64_t item; (item = wk.claim()) >= 0; wk.done()) {
        const int64_t blk = step % 2 ? region.mirrored(item, blocks) : item;
        const int64_t j0 = blk * kUnits, nu = std::min(kUnits, H - j0);
        // This block's input projections, fetched while the block multiplies (bf16 LSTM, B32 H512: the
        // loads of xw were ~10% of the forward's time, stalled on memory). Regrouped (see xs): one
        // stretch; then this item's share of the next step's rows, regrouped, read whole and in order.
        // In place: B * G strided runs, and a share of the next step's xw into L2 (by then evicted to
        // L3 by the W_hh panels streaming through, it is an L3 hit there rather than a DRAM miss; one
        // Zen 4 core, B32 H512 LSTM: 720 -> 675-687 us a step).
        const int64_t t_next = reverse ? t - 1 : t + 1;
        const bool next = t_next >= 0 && t_next < sh.T;
        const T* xs_blk = regroup ? xs + cur * xs_size + blk * B * GU : nullptr;
        constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
        if (regroup) {
          for (int64_t q = 0; q < B * GU; q += kLine) __builtin_prefetch(xs_blk + q, 0, 3);
          if (next) regroup_rows(t_next, B * item / blocks, B * (item + 1) / blocks, xs + nxt * xs_size);
          // and the share of step t + 2's rows that the copy reads a step later, asked into L2: the copy's
          // loads stalled on memory (a quarter of the step body outside the tiles, perf). The fp32 B32 T128
          // H512 LSTM recurrence, medians of 15, six alternated rounds: 45.1-46.9 -> 43.9-45.7 ms (one
          // round 51.5); the bench's layer rows stay within their noise (0.93-1.05x on both builds).
          const int64_t t_after = reverse ? t - 2 : t + 2;
          if (t_after >= 0 && t_after < sh.T)
            cpu::prefetch_share(x + t_after * B * G * H, B * G * H * static_cast<int64_t>(sizeof(T)), item, blocks);
        } else {
          const T* xn = x + t * B * G * H + j0;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t g = 0; g < G; ++g)
              for (int64_t q = 0; q < nu; q += kLine) __builtin_prefetch(xn + b * G * H + g * H + q, 0, 3);
          if (next) cpu::prefetch_share(x + t_next * B * G * H, B * G * H * static_cast<int64_t>(sizeof(T)), item, blocks);
        }
        if (amx && !one_step)
          cpu::amx_gemm(B, GU, 2 * K2, hb.data() + cur * B * 2 * K2, 2 * K2, w_amx + blk * K2 * GU * 2, GU,
                        tile.data(), GU, false);
        for (int64_t g = 0; g < (amx || one_step ? 0 : G); ++g) {
          if (dot) {
            cpu::small_gemm_bf16(B, kUnits, K2, reinterpret_cast<const uint32_t*>(hb.data() + cur * B * 2 * K2), K2,
                                 1, wtb + (blk * G + g) * K2 * kUnits * 2, kUnits, tile.data() + g * kUnits,
                                 G * kUnits);
            continue;
          }
          small_gemm(B, kUnits, S, h, S, 1, panel(blk, g), kUnits,
                     tile.data() + g * kUnits, G * kUnits, 1.f, false);
        }
        for (int64_t b = 0; b < B; ++b) {
          const bool active = t < len[b];
          // this row's input projections of the block's units, gate g at xb + g * xg
          const T* xb = regroup ? xs_blk + b * GU : x + (t * B + b) * G * H + j0;
          const int64_t xg = regroup ? kUnits : H;
          float* wsb = ws_row(t, b);
          // this row's recurrent products h W_hh^T of the block's units, gate g at tb + g * gs
          const float* tb = one_step ? rec_p + b * G * H + j0 : tile.data() + b * G * kUnits;
          const int64_t gs = one_step ? H : kUnits;
          const float* bb = bias.data() + blk * G * kUnits;
          const fVec keep(active ? 1.f : 0.f);
          for (int64_t u = 0; u < nu; u += fVec::size()) {  // a vector of units at a time
            const int64_t j = j0 + u, w = std::min<int64_t>(fVec::size(), nu - u);
            // (rec has no padding past a gate's H units; the tile has kUnits columns a gate)
            auto rec_at = [&](int64_t g) BIGNLP_FAST_LAMBDA_INLINE { return one_step ? load_any(tb + g * gs + u, w) : fVec::loadu(tb + g * gs + u); };
            auto pre = [&](int64_t g) BIGNLP_FAST_LAMBDA_INLINE {
              return load_any(xb + g * xg + u, w) + rec_at(g) + fVec::loadu(bb + g * kUnits + u);
            };
            auto put = [&](float* dst, const fVec& v) BIGNLP_FAST_LAMBDA_INLINE { store_any(dst, v, w); };
            auto keep_ws = [&](int64_t off, const fVec& v) BIGNLP_FAST_LAMBDA_INLINE {  // the workspace, when there is a backward
              if (stream_ws) cpu::stream_vec(wsb + off + j, v);
              else if (save) store_any(wsb + off + j, v, w);
            };
            fVec h_new;
            if (sh.mode == Mode::kLstm) {
              const fVec i = sigmoid(pre(0)), f = sigmoid(pre(1)), gg = tanh_fast(pre(2)), og = sigmoid(pre(3));
              const fVec c_old = load_any(c.data() + b * H + j, w);
              const fVec cn = f * c_old + i * gg;
              h_new = og * tanh_fast(cn);
              keep_ws(0, i), keep_ws(H, f), keep_ws(2 * H, gg), keep_ws(3 * H, og);
              const fVec c_kept = fVec::blendv(c_old, cn, keep != fVec(0.f));
              put(c.data() + b * H + j, c_kept);  // only this worker reads these units of c
              keep_ws(sh.off_c, c_kept);          // the cell state after the step (kept when inactive)
              if (sh.proj) {  // h = m W_hr^T below
                keep_ws(sh.off_m, h_new);
                put(m.data() + b * H + j, h_new);
                continue;
              }
            } else if (sh.mode == Mode::kGru) {
              const fVec r = sigmoid(pre(0)), z = sigmoid(pre(1));
              const fVec hn = rec_at(2) + fVec::loadu(bb + 2 * kUnits + u);
              const fVec n = tanh_fast(load_any(xb + 2 * xg + u, w) + r * hn);
              h_new = (fVec(1.f) - z) * n + z * load_any(h + b * S + j, w);
              keep_ws(0, r), keep_ws(H, z), keep_ws(2 * H, n), keep_ws(sh.off_hn, hn);
            } else {
              h_new = sh.mode == Mode::kRnnTanh ? tanh_fast(pre(0)) : at::vec::clamp_min(pre(0), fVec(0.f));
              keep_ws(0, h_new);
            }
            const fVec h_kept = fVec::blendv(load_any(h + b * S + j, w), h_new, keep != fVec(0.f));
            put(h_next + b * S + j, h_kept);
            keep_ws(sh.off_state, h_kept);
            store_any(o + (t * B + b) * S + j, h_new * keep, w);
          }
        }
        if (!sh.proj) round_state(nxt, j0, j0 + nu);
      }
      if (sh.proj) {  // h = m W_hr^T, by column panels of the projection, once every unit's m is in
        wk.round(panels);
        for (int64_t p; (p = wk.claim()) >= 0; wk.done()) {
          const int64_t c0_ = p * fVec::size(), nc = std::min<int64_t>(fVec::size(), S - c0_);
          small_gemm(B, fVec::size(), H, m.data(), H, 1, wrt.data() + c0_, ld_p, hp.data(), fVec::size(), 1.f, false);
          for (int64_t b = 0; b < B; ++b) {
            const fVec keep(t < len[b] ? 1.f : 0.f), v = fVec::loadu(hp.data() + b * fVec::size());
            const fVec h_kept = fVec::blendv(load_any(h + b * S + c0_, nc), v, keep != fVec(0.f));
            store_any(h_next + b * S + c0_, h_kept, nc);
            if (save) store_any(ws_row(t, b) + sh.off_state + c0_, h_kept, nc);
            store_any(o + (t * B + b) * S + c0_, v * keep, nc);
          }
          round_state(nxt, c0_, c0_ + nc);
        }
      }
    }
    if (amx) cpu::amx_release();
    if (stream_ws) cpu::stream_fence();
  });
  const float* h = hbuf.data() + (sh.T % 2) * B * S;
  T* hn = h_n.data_ptr<T>();
  for (int64_t i = 0; i < B * S; ++i) hn[i] = static_cast<T>(h[i]);
  if (sh.mode == Mode::kLstm) {
    T* cn = c_n.data_ptr<T>();
    for (int64_t i = 0; i < B * H; ++i) cn[i] = static_cast<T>(c[i]);
  }
}

// One row's step for n units, vector by vector, with the arithmetic of forward's epilogue: gate g's
// input part at x + g * gx (b_ih in it), its recurrent part at r + g * gr, b_hh at bias + g * gb
// (nullptr: none, or already in r); the state before at h_old, c_old (LSTM); h' to h_out, c' to c_out
// (LSTM), and h' to out where out is not null. An inactive row (past its length) keeps its state and
// outputs zeros.
template <typename T, typename X, typename Bias>
BIGNLP_FAST_VEC_INLINE void cell_row(Mode mode, int64_t n, const X* x, int64_t gx, const float* r, int64_t gr,
                                     const Bias* bias, int64_t gb, const T* h_old, const T* c_old, bool active,
                                     T* h_out, T* c_out, T* out) {
  const fVec keep(active ? 1.f : 0.f);
  for (int64_t j = 0; j < n; j += fVec::size()) {
    const int64_t w = std::min<int64_t>(fVec::size(), n - j);
    auto bias_at = [&](int64_t g) BIGNLP_FAST_LAMBDA_INLINE { return bias != nullptr ? load_any(bias + g * gb + j, w) : fVec(0.f); };
    auto pre = [&](int64_t g) BIGNLP_FAST_LAMBDA_INLINE { return load_any(x + g * gx + j, w) + load_any(r + g * gr + j, w) + bias_at(g); };
    const fVec h_prev = load_any(h_old + j, w);
    fVec h_new;
    if (mode == Mode::kLstm) {
      const fVec i = sigmoid(pre(0)), f = sigmoid(pre(1)), gg = tanh_fast(pre(2)), og = sigmoid(pre(3));
      const fVec c_prev = load_any(c_old + j, w);
      const fVec c_new = f * c_prev + i * gg;
      h_new = og * tanh_fast(c_new);
      store_any(c_out + j, fVec::blendv(c_prev, c_new, keep != fVec(0.f)), w);
    } else if (mode == Mode::kGru) {
      const fVec rg = sigmoid(pre(0)), z = sigmoid(pre(1));
      const fVec hn = load_any(r + 2 * gr + j, w) + bias_at(2);
      const fVec ng = tanh_fast(load_any(x + 2 * gx + j, w) + rg * hn);
      h_new = (fVec(1.f) - z) * ng + z * h_prev;
    } else {
      h_new = mode == Mode::kRnnTanh ? tanh_fast(pre(0)) : at::vec::clamp_min(pre(0), fVec(0.f));
    }
    store_any(h_out + j, fVec::blendv(h_prev, h_new, keep != fVec(0.f)), w);
    if (out != nullptr) store_any(out + j, h_new * keep, w);
  }
}

// One step with no backward to feed and no projection (the cells' inference): the gates from xw,
// rec = h0 W_hh^T (forward's one-step product, fp32) and b_hh, written straight to out, h_n and c_n.
// forward() would build its state buffers (2 B S + B H floats, zeroed, h0 and c0 converted in), a
// relaid bias, a region of rounds and copy the state out at the end: at B32 H512 (fp32 RNN) its call
// took 41 us over the product. Same arithmetic per unit as forward's epilogue, so the same numbers,
// but for fp32 GRUs, whose h' the compiler contracts into multiply-adds otherwise here (1 ulp apart).
// The units are split between threads only where there are enough of them to pay for waking the
// pool (a B32 H512 LSTM's 16K units: yes; an RNN's: no, one tanh each).
template <typename T>
void forward_one_step(const Shape& sh, const at::Tensor& xw, const float* rec, const std::optional<at::Tensor>& b_hh,
                      const at::Tensor& h0, const std::optional<at::Tensor>& c0, const std::vector<int64_t>& len,
                      at::Tensor& out, at::Tensor& h_n, at::Tensor& c_n) {
  const int64_t G = sh.G, H = sh.H;
  const T* x = xw.const_data_ptr<T>();
  const T* h_old = h0.const_data_ptr<T>();
  const T* c_old = c0.has_value() ? c0->const_data_ptr<T>() : nullptr;
  const T* bias = b_hh.has_value() ? b_hh->const_data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  T* hn = h_n.data_ptr<T>();
  T* cn = sh.mode == Mode::kLstm ? c_n.data_ptr<T>() : nullptr;
  constexpr int64_t kGatesPerChunk = 16384;
  at::parallel_for(0, sh.B * H, std::max<int64_t>(fVec::size(), kGatesPerChunk / G), [&](int64_t u0, int64_t u1) {
    for (int64_t at = u0; at < u1;) {  // row b's units [j, j + n)
      const int64_t b = at / H, j = at % H, n = std::min(H - j, u1 - at);
      cell_row<T>(sh.mode, n, x + b * G * H + j, H, rec + b * G * H + j, H, bias != nullptr ? bias + j : nullptr, H,
                  h_old + b * H + j, c_old != nullptr ? c_old + b * H + j : nullptr, len[b] > 0, hn + b * H + j,
                  cn != nullptr ? cn + b * H + j : nullptr, o + b * H + j);
      at += n;
    }
  });
}

// One float32 step of a cell on weights packed once (ops.linear.prepack's copies, read by gate_panel),
// for H a multiple of kUnits. Per block, both products of its G gates by the small
// GEMM of gemm.h, added onto the biases, then the update (cell_row). The blocks are split between the
// threads in fixed ranges, so a core multiplies by the same part of the weights at every call (from
// its L2 where that part fits), and nothing is packed per call: the general path's two GEMMs of
// torch pack W^T for each product. B32 I = H = 512 on 2 Xeon cores (AMX build), both products:
// 119 us against at::mm's 262 (RNN), 486 against 912 (LSTM); B4 LSTM 145 against 247.
// h_old null: the zero state (its product skipped).
void forward_cell_packed(Mode mode, int64_t B, int64_t I, int64_t H, const float* x, int64_t x_rs, int64_t x_cs,
                         const float* h_old, const float* c_old, const float* p_ih, const float* p_hh,
                         const float* b_ih, const float* b_hh, float* h_out, float* c_out) {
  const int64_t G = gate_count(mode), blocks = H / kUnits, GU = G * kUnits;
  const cpu::LineVector<float> zeros(h_old == nullptr ? B * H : 0, 0.f);
  const float* h_prev = h_old != nullptr ? h_old : zeros.data();
  const float* c_prev = mode == Mode::kLstm && c_old == nullptr ? zeros.data() : c_old;
  // a block's multiply-adds; a thread takes ~1M of them at least (~4 us), else the pool costs more
  const int64_t per_block = B * GU * (I + (h_old != nullptr ? H : 0));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(per_block, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    // gate g of row b at g * kUnits + b * GU: the input part (b_ih in it) and the recurrent part (b_hh)
    cpu::LineVector<float> xs(B * GU), rs(B * GU);
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t j0 = blk * kUnits;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t b = 0; b < B; ++b) {
          float* xd = xs.data() + b * GU + g * kUnits;
          float* rd = rs.data() + b * GU + g * kUnits;
          if (b_ih != nullptr) std::copy_n(b_ih + g * H + j0, kUnits, xd);
          else std::fill_n(xd, kUnits, 0.f);
          if (b_hh != nullptr) std::copy_n(b_hh + g * H + j0, kUnits, rd);
          else std::fill_n(rd, kUnits, 0.f);
        }
        small_gemm(B, kUnits, I, x, x_rs, x_cs, gate_panel(p_ih, I, blocks, g, blk), kUnits, xs.data() + g * kUnits,
                   GU, 1.f, true);
        if (h_old != nullptr)
          small_gemm(B, kUnits, H, h_old, H, 1, gate_panel(p_hh, H, blocks, g, blk), kUnits, rs.data() + g * kUnits,
                     GU, 1.f, true);
      }
      for (int64_t b = 0; b < B; ++b)
        cell_row<float>(mode, kUnits, xs.data() + b * GU, kUnits, rs.data() + b * GU, kUnits,
                        static_cast<const float*>(nullptr), 0, h_prev + b * H + j0,
                        c_prev != nullptr ? c_prev + b * H + j0 : nullptr, true, h_out + b * H + j0,
                        c_out != nullptr ? c_out + b * H + j0 : nullptr, static_cast<float*>(nullptr));
    }
  });
}

// ---- backward -------------------------------------------------------------------------------
template <typename T>
void backward(const Shape& sh, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const at::Tensor& h0,
              const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
              const std::vector<int64_t>& len, bool reverse, const at::Tensor& ws, at::Tensor& d_hlin,
              at::Tensor& d_xw, at::Tensor& dht_all, at::Tensor& dh_out, at::Tensor& dc_out, float* db_steps) {
  const int64_t G = sh.G, H = sh.H, S = sh.S, B = sh.B, GH = G * H;
  // W_hh as fp32 panels of two vectors of columns ([GH, PW] each, contiguous: see the forward) and
  // W_hr [P, H padded] row-major: the B operands of dG W_hh and dh W_hr
  constexpr int64_t VS = fVec::size(), PW = 2 * VS;
  const int64_t ld_s = (S + PW - 1) / PW * PW, ld_h = round_up_to_vec(H);
  // written whole below; from the buffer cache, as the forward's packed W_hh
  const at::Tensor w_buf = cpu::cached_empty({GH * ld_s}, at::TensorOptions().dtype(at::kFloat));
  float* const w = w_buf.data_ptr<float>();
  cpu::LineVector<float> wr;
  const T* w_src = w_hh.const_data_ptr<T>();
  at::parallel_for(0, GH, 64, [&](int64_t r0, int64_t r1) {  // row r's columns [p PW, (p + 1) PW) to panel p
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t p = 0; p < ld_s / PW; ++p) {
        float* dst = w + (p * GH + r) * PW;
        const int64_t n = std::clamp<int64_t>(S - p * PW, 0, PW);
        to_float(w_src + r * S + p * PW, dst, n);
        std::fill(dst + n, dst + PW, 0.f);
      }
  });
  if (sh.proj) {
    wr.assign(S * ld_h, 0.f);
    for (int64_t p = 0; p < S; ++p) to_float(w_hr->const_data_ptr<T>() + p * H, wr.data() + p * ld_h, H);
  }
  // dh (the gradient of the state after the step) twice: a step reads buffer i % 2 and writes the
  // other; dc [B, H] is read and written only by the worker of its units: one buffer.
  cpu::LineVector<float> dhbuf(2 * B * ld_s, 0.f), dc(B * H, 0.f), dht(B * S), dm;
  for (int64_t b = 0; b < B; ++b) to_float(grad_h_n.const_data_ptr<T>() + b * S, dhbuf.data() + b * ld_s, S);
  if (grad_c_n.has_value()) to_float(grad_c_n->const_data_ptr<T>(), dc.data(), B * H);
  cpu::LineVector<float> h_init(B * S), c_init(B * H, 0.f);
  to_float(h0.const_data_ptr<T>(), h_init.data(), B * S);
  if (c0.has_value()) to_float(c0->const_data_ptr<T>(), c_init.data(), B * H);
  if (sh.proj) dm.resize(B * ld_h);

  const T* go = grad_out.const_data_ptr<T>();
  const float* wsp = ws.const_data_ptr<float>();
  float* dg_all = d_hlin.data_ptr<float>();
  float* dx_all = d_xw.data_ptr<float>();  // GRU only (else d_hlin is d_xw)
  float* dht_p = dht_all.data_ptr<float>();
  // One parallel region for the whole loop (StepRegion, above the forward). Per step, rounds of:
  // with a projection, dh_total and dm = dh_total W_hr on one worker (as small as it was serial);
  // the gate gradients, claimed by chunks of kChunk units; dh_prev = dG W_hh, claimed by column panels.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (H + kChunk - 1) / kChunk, panels = ld_s / PW;
  const bool gru = sh.mode == Mode::kGru;
  StepRegion region(std::max(chunks, panels));
  region.run([&](StepRegion::Worker& wk) {
    const fVec one(1.f);
    for (int64_t i = 0; i < sh.T; ++i) {
      const int64_t step = sh.T - 1 - i;
      const int64_t t = reverse ? sh.T - 1 - step : step;
      const int64_t prev = sh.previous(t, reverse);
      const float* dh = dhbuf.data() + (i % 2) * B * ld_s;
      float* dh_next = dhbuf.data() + (1 - i % 2) * B * ld_s;
      // dh_total = dh + grad_out[t] for active rows; zero for inactive ones (their h_new is unused).
      // Without a projection, each chunk of units makes its own columns below.
      auto total = [&](int64_t b, int64_t j0, int64_t j1) {
        float* d = dht.data() + b * S;
        if (!(t < len[b])) {
          std::fill(d + j0, d + j1, 0.f);
          return;
        }
        const float* dhb = dh + b * ld_s;
        const T* gob = go + (t * B + b) * S;
        for (int64_t j = j0; j < j1; j += VS) {
          const int64_t n = std::min<int64_t>(VS, j1 - j);
          store_any(d + j, load_any(dhb + j, n) + load_any(gob + j, n), n);
        }
      };
      if (sh.proj) {
        wk.round(1);
        for (; wk.claim() >= 0; wk.done()) {
          for (int64_t b = 0; b < B; ++b) total(b, 0, S);
          std::copy(dht.begin(), dht.end(), dht_p + t * B * S);
          small_gemm(B, ld_h, S, dht.data(), S, 1, wr.data(), ld_h, dm.data(), ld_h, 1.f, false);
        }
      }
      float* dg = dg_all + t * B * GH;
      float* dx = dx_all + t * B * GH;
      wk.round(chunks);
      for (int64_t ch; (ch = wk.claim()) >= 0; wk.done()) {
        const int64_t j0 = ch * kChunk, j1 = std::min(H, j0 + kChunk);
        for (int64_t b = 0; b < B; ++b) {
          const bool active = t < len[b];
          if (!sh.proj) total(b, j0, j1);
          const float* wsb = wsp + (t * B + b) * sh.width;
          const float* wsprev = prev >= 0 ? wsp + (prev * B + b) * sh.width : nullptr;
          float* dgb = dg + b * GH;
          float* dxb = dx + b * GH;
          if (!active) {
            for (int64_t j = j0; j < j1; ++j) {
              for (int64_t g = 0; g < G; ++g) dgb[g * H + j] = 0.f;
              if (gru) {
                for (int64_t g = 0; g < G; ++g) dxb[g * H + j] = 0.f;
                dh_next[b * ld_s + j] = dh[b * ld_s + j];  // passed through; no GEMM term (dG = 0)
              }
              // LSTM: dc passes through unchanged
            }
          } else if (sh.mode == Mode::kLstm) {  // a vector of units at a time
            for (int64_t j = j0; j < j1; j += VS) {
              const int64_t n = std::min<int64_t>(VS, j1 - j);
              auto at_ = [&](const float* p) { return load_any(p + j, n); };
              const fVec i_ = at_(wsb), f = at_(wsb + H), gg = at_(wsb + 2 * H), og = at_(wsb + 3 * H);
              const fVec tc = tanh_fast(at_(wsb + sh.off_c));
              const fVec c_prev = wsprev ? at_(wsprev + sh.off_c) : at_(c_init.data() + b * H);
              const fVec dmj = sh.proj ? at_(dm.data() + b * ld_h) : at_(dht.data() + b * S);
              const fVec dct = at_(dc.data() + b * H) + dmj * og * (one - tc * tc);
              store_any(dgb + j, dct * gg * i_ * (one - i_), n);
              store_any(dgb + H + j, dct * c_prev * f * (one - f), n);
              store_any(dgb + 2 * H + j, dct * i_ * (one - gg * gg), n);
              store_any(dgb + 3 * H + j, dmj * tc * og * (one - og), n);
              store_any(dc.data() + b * H + j, dct * f, n);  // in place: only this chunk's worker reads it
            }
          } else if (gru) {
            for (int64_t j = j0; j < j1; j += VS) {
              const int64_t n = std::min<int64_t>(VS, j1 - j);
              auto at_ = [&](const float* p) { return load_any(p + j, n); };
              const fVec r = at_(wsb), z = at_(wsb + H), nn = at_(wsb + 2 * H), hn = at_(wsb + sh.off_hn);
              const fVec h_prev = wsprev ? at_(wsprev + sh.off_state) : at_(h_init.data() + b * S);
              const fVec d = at_(dht.data() + b * S);
              const fVec dn_pre = d * (one - z) * (one - nn * nn);
              const fVec dr_pre = dn_pre * hn * r * (one - r);
              const fVec dz_pre = d * (h_prev - nn) * z * (one - z);
              store_any(dxb + j, dr_pre, n), store_any(dxb + H + j, dz_pre, n), store_any(dxb + 2 * H + j, dn_pre, n);
              store_any(dgb + j, dr_pre, n), store_any(dgb + H + j, dz_pre, n);
              store_any(dgb + 2 * H + j, dn_pre * r, n);
              store_any(dh_next + b * ld_s + j, d * z, n);
            }
          } else {
            for (int64_t j = j0; j < j1; ++j) {
              const float hv = wsb[j], d = dht[b * S + j];
              dgb[j] = sh.mode == Mode::kRnnTanh ? d * (1.f - hv * hv) : (hv > 0.f ? d : 0.f);
            }
          }
        }
        // and its sum over the batch rows, this step's part of d_b_hh (summed over steps at the end,
        // in step order: deterministic; a sum over [T * B, GH] afterwards read 32 MiB again, 1.4 ms)
        if (db_steps != nullptr)
          for (int64_t g = 0; g < G; ++g)
            for (int64_t j = j0; j < j1; j += VS) {
              const int64_t n = std::min<int64_t>(VS, j1 - j);
              fVec acc(0.f);
              for (int64_t b = 0; b < B; ++b) acc = acc + load_any(dg + b * GH + g * H + j, n);
              store_any(db_steps + t * GH + g * H + j, acc, n);
            }
      }
      wk.round(panels);  // once every unit's dG is in
      // dh_prev = dG W_hh (+ GRU's direct term), by column panels; inactive rows pass dh through.
      // A is this step's dG as the gate gradients wrote it, [B, GH] (a_rs = GH). A transposed copy
      // ([GH, B], each k's broadcasts in one line) measured faster at B32 when this loop was written;
      // now, with the small tiles' loads kept in registers (gemm.h), the backward without it runs
      // 1.06-1.08x faster at B32 and B16 H512 and 1.19-1.21x at B1-B4 and B16 H128 (LSTM and GRU,
      // both builds in one process, medians of 7): ATen's transpose of B < 16 rows goes through a
      // zeroed stack array (a memset per call, 3% of a B4 forward+backward).
      for (int64_t p; (p = wk.claim()) >= 0; wk.done()) {
        const int64_t c0_ = p * PW;
        small_gemm(B, PW, GH, dg, GH, 1, w + p * GH * PW, PW, dh_next + c0_, ld_s, 1.f, gru);
        for (int64_t b = 0; b < B; ++b)
          if (!(t < len[b]))
            for (int64_t q = 0; q < PW; ++q) dh_next[b * ld_s + c0_ + q] = dh[b * ld_s + c0_ + q];
      }
    }
  });
  const float* dh = dhbuf.data() + (sh.T % 2) * B * ld_s;
  float* dho = dh_out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::copy(dh + b * ld_s, dh + b * ld_s + S, dho + b * S);
  if (sh.mode == Mode::kLstm) std::copy(dc.begin(), dc.end(), dc_out.data_ptr<float>());
}

}  // namespace

std::vector<at::Tensor> rnn_fwd_cpu(const at::Tensor& xw, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                                    const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                                    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                                    const std::string& mode, bool reverse, bool save_workspace,
                                    const std::optional<at::Tensor>& packed_hh) {
  const Shape sh(mode, xw, w_hh, w_hr.has_value());
  TORCH_CHECK(xw.is_contiguous() && w_hh.is_contiguous() && h0.is_contiguous(), "rnn: operands must be contiguous");
  TORCH_CHECK(h0.size(0) == sh.B && h0.size(1) == sh.S, "rnn: h0 must be [B, S]");
  TORCH_CHECK((sh.mode == Mode::kLstm) == c0.has_value(), "rnn: c0 is given exactly for lstm");
  // a packed copy is used where it is float32 panels of this w_hh and H fills whole panels, else ignored
  const bool use_packed = packed_hh.has_value() && xw.scalar_type() == at::kFloat && sh.H % kUnits == 0 &&
                          linear_packed_fits(*packed_hh, w_hh);
  const auto len = cpu::lengths_of(lengths, sh.B, sh.T);
  // the large outputs are written once: from the buffer cache (buffer_cache.h)
  at::Tensor out = cpu::cached_empty({sh.T, sh.B, sh.S}, xw.options());
  at::Tensor h_n = at::empty({sh.B, sh.S}, xw.options());
  at::Tensor c_n = sh.mode == Mode::kLstm ? at::empty({sh.B, sh.H}, xw.options()) : at::empty({0}, xw.options());
  at::Tensor ws = save_workspace ? cpu::cached_empty({sh.T, sh.B, sh.width}, xw.options().dtype(at::kFloat))
                                 : at::empty({0}, xw.options().dtype(at::kFloat));
  BIGNLP_DISPATCH_FLOAT_BF16(xw.scalar_type(), "rnn_fwd_cpu", [&] {
    if (sh.T == 1 && !save_workspace && !sh.proj && one_step_uses_torch_gemm<scalar_t>()) {
      const at::Tensor rec = one_step_product(h0, w_hh);
      forward_one_step<scalar_t>(sh, xw, rec.const_data_ptr<float>(), b_hh, h0, c0, len, out, h_n, c_n);
    } else {
      forward<scalar_t>(sh, xw, w_hh, b_hh, h0, c0, w_hr, len, reverse, out, h_n, c_n, ws, save_workspace,
                        use_packed ? packed_hh->const_data_ptr<float>() : nullptr);
    }
  });
  return {out, h_n, c_n, ws};
}

namespace {
// Whether the cell lane can take t as it is: a strided CPU tensor of dtype with these sizes, that
// autograd need not see.
bool cell_readable(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef sizes, bool grad) {
  return cpu::lane_tensor(t, dtype, grad) && t.sizes() == sizes;
}
bool cell_readable(const std::optional<at::Tensor>& t, at::ScalarType dtype, at::IntArrayRef sizes, bool grad) {
  return !t.has_value() || cell_readable(*t, dtype, sizes, grad);
}
}  // namespace

int64_t rnn_cell_packed_units() { return kUnits; }

std::vector<at::Tensor> rnn_cell_lane_cpu(const std::string& mode, const at::Tensor& x,
                                          const std::optional<at::Tensor>& h, const std::optional<at::Tensor>& c,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                          bool ours_projection, const std::optional<at::Tensor>& packed_ih,
                                          const std::optional<at::Tensor>& packed_hh) {
  if (mode != "lstm" && mode != "gru" && mode != "rnn_tanh" && mode != "rnn_relu") return {};
  const bool lstm = mode == "lstm";
  const at::ScalarType dtype = x.scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || x.dim() != 2 || w_ih.dim() != 2 || w_hh.dim() != 2 ||
      (!lstm && c.has_value()) || (lstm && h.has_value() != c.has_value())) {
    return {};
  }
  const int64_t B = x.size(0), I = x.size(1), GH = w_hh.size(0), H = w_hh.size(1);
  if (B == 0 || H == 0 || GH != gate_count(parse_mode(mode)) * H || !cell_readable(x, dtype, {B, I}, grad) ||
      !cell_readable(w_ih, dtype, {GH, I}, grad) || !cell_readable(w_hh, dtype, {GH, H}, grad) ||
      !cell_readable(b_ih, dtype, {GH}, grad) || !cell_readable(b_hh, dtype, {GH}, grad) ||
      !cell_readable(h, dtype, {B, H}, grad) || !cell_readable(c, dtype, {B, H}, grad)) {
    return {};
  }
  // float32 weights packed once (ops.linear.prepack): forward_cell_packed, where H fills whole panels
  if (packed_ih.has_value() && packed_hh.has_value() && dtype == at::kFloat && H % kUnits == 0 &&
      linear_packed_fits(*packed_ih, w_ih) && linear_packed_fits(*packed_hh, w_hh)) {
    const at::Tensor h_c = h.has_value() ? h->contiguous() : at::Tensor();
    const at::Tensor c_c = c.has_value() ? c->contiguous() : at::Tensor();
    const at::Tensor bi = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
    const at::Tensor bh = b_hh.has_value() ? b_hh->contiguous() : at::Tensor();
    at::Tensor h_new = at::empty({B, H}, x.options());
    at::Tensor c_new = lstm ? at::empty({B, H}, x.options()) : at::Tensor();
    forward_cell_packed(parse_mode(mode), B, I, H, x.const_data_ptr<float>(), x.stride(0), x.stride(1),
                        h.has_value() ? h_c.const_data_ptr<float>() : nullptr,
                        c.has_value() ? c_c.const_data_ptr<float>() : nullptr, packed_ih->const_data_ptr<float>(),
                        packed_hh->const_data_ptr<float>(), b_ih.has_value() ? bi.const_data_ptr<float>() : nullptr,
                        b_hh.has_value() ? bh.const_data_ptr<float>() : nullptr, h_new.data_ptr<float>(),
                        lstm ? c_new.data_ptr<float>() : nullptr);
    if (lstm) return {h_new, c_new};
    return {h_new};
  }
  // the projection as the general path's input_projection makes it: ops.linear's kernel (a weight
  // stored transposed read in place) or F.linear
  const at::Tensor xw = ours_projection
      ? linear_fwd_cpu(x.contiguous(), w_ih.t().is_contiguous() ? w_ih : w_ih.contiguous(),
                       b_ih.has_value() ? std::optional<at::Tensor>(b_ih->contiguous()) : std::nullopt, std::nullopt)
      : at::linear(x, w_ih, b_ih);
  const at::Tensor zeros = h.has_value() ? at::Tensor() : at::zeros({B, H}, x.options());
  auto state = [&](const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : zeros; };
  std::vector<at::Tensor> r = rnn_fwd_cpu(
      xw.unsqueeze(0).contiguous(), w_hh.contiguous(),
      b_hh.has_value() ? std::optional<at::Tensor>(b_hh->contiguous()) : std::nullopt, state(h),
      lstm ? std::optional<at::Tensor>(state(c)) : std::nullopt, std::nullopt, std::nullopt, mode, false, false,
      std::nullopt);
  if (lstm) return {r[1], r[2]};
  return {r[1]};
}

std::vector<at::Tensor> rnn_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& xw,
                                    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& w_hr,
                                    const std::optional<at::Tensor>& lengths, const at::Tensor& workspace,
                                    const std::string& mode, bool reverse) {
  const Shape sh(mode, xw, w_hh, w_hr.has_value());
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 3 && workspace.size(2) == sh.width,
              "rnn: the workspace does not come from the cpu forward of this layer");
  const auto len = cpu::lengths_of(lengths, sh.B, sh.T);
  const auto f32 = xw.options().dtype(at::kFloat);
  // written once: from the buffer cache (buffer_cache.h)
  at::Tensor d_hlin = cpu::cached_empty({sh.T, sh.B, sh.G * sh.H}, f32);
  at::Tensor d_x = sh.mode == Mode::kGru ? cpu::cached_empty({sh.T, sh.B, sh.G * sh.H}, f32) : d_hlin;
  at::Tensor dht_all = cpu::cached_zeros({sh.proj ? sh.T : 0, sh.B, sh.S}, f32);
  at::Tensor dh0 = at::empty({sh.B, sh.S}, f32), dc0 = at::empty({sh.B, sh.H}, f32);
  at::Tensor db_steps = at::empty({b_hh.has_value() ? sh.T : 0, sh.G * sh.H}, f32);  // d_b_hh per step
  BIGNLP_DISPATCH_FLOAT_BF16(xw.scalar_type(), "rnn_bwd_cpu", [&] {
    backward<scalar_t>(sh, grad_out.contiguous(), grad_h_n.contiguous(),
                       grad_c_n.has_value() ? std::optional<at::Tensor>(grad_c_n->contiguous()) : std::nullopt, w_hh,
                       h0, c0, w_hr, len, reverse, workspace, d_hlin, d_x, dht_all, dh0, dc0,
                       b_hh.has_value() ? db_steps.data_ptr<float>() : nullptr);
  });
  // Weight gradients: large GEMMs over every (step, row):
  // dW_hh = dG^T [GH, TB] H_prev [TB, S] and dW_hr = dh^T [P, TB] M [TB, H]
  const int64_t TB = sh.T * sh.B;
  at::Tensor h_prev = cpu::states_before_each_step(workspace.narrow(2, sh.off_state, sh.S), h0, reverse);
  at::Tensor d_w_hh = cpu::gemm_tn(d_hlin.view({TB, sh.G * sh.H}), h_prev).to(w_hh.scalar_type());
  // the steps' sums, added in step order
  at::Tensor d_b_hh = b_hh.has_value() ? cpu::reduce_partials(db_steps, sh.G * sh.H, b_hh->scalar_type())
                                       : at::empty({0}, xw.options());
  at::Tensor d_w_hr = at::empty({0}, xw.options());
  if (sh.proj) {
    at::Tensor m = workspace.narrow(2, sh.off_m, sh.H).reshape({TB, sh.H});
    d_w_hr = cpu::gemm_tn(dht_all.view({TB, sh.S}), m).to(w_hr->scalar_type());
  }
  return {d_x.to(xw.scalar_type()), d_w_hh, d_b_hh, dh0.to(h0.scalar_type()),
          c0.has_value() ? dc0.to(c0->scalar_type()) : at::empty({0}, xw.options()), d_w_hr};
}

}  // namespace bignlp_fast

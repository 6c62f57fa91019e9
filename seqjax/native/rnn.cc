// The LSTM and GRU recurrences on CPU, for XLA's FFI (seqjax/native/__init__.py).
//
// XLA:CPU runs each per-step matmul of a lax.scan recurrence on one core; here
// the hidden units are split into P partitions, each owning the gate columns
// of its units, so each partition's step is small matmuls and its own gate
// math, and threads meet once a step (each waits for the count of partitions
// done) to exchange h. Or (row groups, run_steps) the threads split the
// batch's rows instead, each running all its rows' steps with every
// partition's weights and meeting no other. Every output element is summed
// in the same order whatever P and the split, so results do not depend on
// the thread count.
//
// Semantics: seqjax.fused's loops. The forward loops (LSTM, GRU), optionally
// saving what the backward pass reads, and the backward passes' reverse
// loops; and the sampling loop of a stacked LSTM or GRU language model
// (Sample). valid and resets are [T, B] uint8, or empty when absent: a reset
// zeroes the carry before its step; an invalid step holds the carry and emits
// zeros. Weights arrive as the cells hold them, and the partition count P as
// an attribute (Hp = H / P units each, a multiple of 16), and with it `bf16`:
// the matmuls round their operands to bfloat16 and sum in float32 (a cell's
// matmul_dtype="bfloat16"; the gate math stays float32). The sampling loop
// also takes `int8`: its layers' matmuls in int8 (matmul_dtype="int8",
// see the int8 matmuls below):
//   LSTM: w_x [D, 4H], w_h [H, 4H] (columns i, f, g, o), b [4H]; carry h0,
//         c0 [B, H].
//   GRU (reset after): w_x [D, 3H], w_h [H, 3H] (columns r, z, n), b [3H],
//         bh [3H] (zeros, zeros, b_hn); carry h0 [B, H].
// Each thread first packs its partitions' weights into memory kept between
// calls: a partition's [K, N] matrix (its units' columns of every gate block)
// in panels of 16 columns, [N / 16, K, 16], so a matmul reads each panel's
// rows one after another; the reverse loops pack w_h's rows of the
// partition's units, transposed ([G H, Hp], G = 4 for the LSTM, 3 for the
// GRU). Packing in XLA instead cost up to 2 ms a call (8 MB at D = H = 512),
// more than 16 of those steps take.
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x in [-88, 88]: 2^n * e^r, |r| <= ln(2)/2, degree-7 Taylor.
// x is clamped there first, a NaN left a NaN: min and max return their second
// operand where either is NaN, so x goes second.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.f), _mm512_min_ps(_mm512_set1_ps(88.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);      // ln2 lo
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); below |x| = 2^-12,
// tanh(x) = x to float precision (this form would lose digits there).
inline __m512 tanh512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp512(_mm512_mul_ps(ax, _mm512_set1_ps(-2.f)));
  __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  t = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(t),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000))));
  const __mmask16 tiny = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(2.44140625e-4f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, t, x);
}

// A persistent pool: the caller plus workers run job(rank) for rank < ranks.
// Workers are started as calls first need them, spin a little after a job,
// then sleep, so they do not take the cores from the rest of the program.
// A call does not wait for its workers to wake: job(0) runs at once, and a
// worker that wakes while the call is still open joins it; once job(0) is
// done the call closes, and returns when the workers that joined have left
// (so job must not need every rank: see run_steps). Callers take busy()
// first: one job at a time.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers outlive main()
    return *pool;
  }
  std::mutex& busy() { return busy_; }

  void run(int ranks, const std::function<void(int)>& job) {
    while (static_cast<int>(workers_.size()) < ranks - 1) {
      const int rank = static_cast<int>(workers_.size()) + 1;
      const uint64_t before = word_.load();  // so the new worker sees this call's word as new
      workers_.emplace_back([this, rank, before] { work(rank, before); });
      workers_.back().detach();
    }
    job_ = &job;
    left_.store(0, std::memory_order_relaxed);
    {
      // The generation and its rank count change together, in one word, so a
      // worker never pairs one call's generation with another's rank count.
      std::lock_guard<std::mutex> lock(mu_);
      const uint64_t next = (word_.load() >> 16) + 1;
      entry_.store(next << 32, std::memory_order_release);
      word_.store(next << 16 | static_cast<uint64_t>(ranks), std::memory_order_release);
    }
    cv_.notify_all();
    job(0);
    const uint64_t joined = entry_.fetch_or(kClosed, std::memory_order_acq_rel) & kJoined;
    while (left_.load(std::memory_order_acquire) != joined) _mm_pause();
  }

 private:
  // entry_: the open call's generation (low 32 bits) << 32, the workers that
  // joined it, and kClosed once it takes no more.
  static constexpr uint64_t kClosed = uint64_t{1} << 31, kJoined = kClosed - 1;

  Pool() {
    // For tests: each worker waits this long once woken, before it joins a
    // call, as one off its core would (tests/test_native.py).
    if (const char* late = std::getenv("SEQJAX_NATIVE_LATE_WORKERS_US")) late_us_ = std::atol(late);
  }

  // Joins call `generation` if it is still the open one.
  bool join(uint64_t generation) {
    uint64_t entry = entry_.load(std::memory_order_acquire);
    while ((entry >> 32) == (generation & 0xffffffff) && !(entry & kClosed)) {
      if (entry_.compare_exchange_weak(entry, entry + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  void work(int rank, uint64_t seen) {
    pthread_setname_np(pthread_self(), "seqjax_pool");  // as top -H, perf and py-spy show it
    for (;;) {
      uint64_t word = seen;
      for (long spin = 0; spin < 20000 && (word = word_.load(std::memory_order_acquire)) == seen;
           ++spin) {
        _mm_pause();
      }
      if (word == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return (word = word_.load(std::memory_order_acquire)) != seen; });
      }
      seen = word;
      if (late_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(late_us_));
      if (rank < static_cast<int>(word & 0xffff) && join(word >> 16)) {  // a rank of this call
        (*job_)(rank);
        left_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> word_{0};  // generation << 16 | ranks
  std::atomic<uint64_t> entry_{0};
  std::atomic<uint64_t> left_{0};
  const std::function<void(int)>* job_ = nullptr;
  long late_us_ = 0;
};

// Memory kept from call to call for the packed weights: a fresh allocation
// of megabytes is fresh pages, and faulting them in costs more than a short
// call's steps. Each call takes a block of its own (calls may overlap); the
// few largest blocks up to 64 MB are kept (past that, a step's work dwarfs
// the page faults).
class Scratch {
 public:
  explicit Scratch(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu());
      auto& kept = blocks();
      auto best = kept.end();
      for (auto it = kept.begin(); it != kept.end(); ++it) {
        if (it->size >= n && (best == kept.end() || it->size < best->size)) best = it;
      }
      if (best != kept.end()) {
        block_ = std::move(*best);
        kept.erase(best);
      }
    }
    if (!block_.memory) {
      block_.memory.reset(new float[n + 16]);  // not zeroed: packing writes every element
      block_.size = n;
    }
  }
  ~Scratch() {
    if (block_.size > kLargest) return;
    std::lock_guard<std::mutex> lock(mu());
    auto& kept = blocks();
    kept.push_back(std::move(block_));
    if (kept.size() > kKept) {
      kept.erase(std::min_element(kept.begin(), kept.end(), [](const Block& a, const Block& b) {
        return a.size < b.size;
      }));
    }
  }
  float* data() const {  // 64-byte aligned
    const uintptr_t at = reinterpret_cast<uintptr_t>(block_.memory.get());
    return reinterpret_cast<float*>((at + 63) & ~uintptr_t{63});
  }

 private:
  static constexpr size_t kKept = 4, kLargest = size_t{16} << 20;  // floats
  struct Block {
    std::unique_ptr<float[]> memory;
    size_t size = 0;
  };
  static std::mutex& mu() {
    static std::mutex* m = new std::mutex();  // never destroyed, like the pool
    return *m;
  }
  static std::vector<Block>& blocks() {
    static auto* b = new std::vector<Block>();
    return *b;
  }
  Block block_;
};

// bfloat16 matmuls (the cells' matmul_dtype="bfloat16"): operands rounded to
// bfloat16 (round to nearest even, as XLA's convert), products summed in
// float32 by vdpbf16ps (AVX512_BF16). A packed row is 16 units of 32 bits:
// 16 floats, or 16 pairs of bfloat16 taken from two consecutive rows k and
// k + 1 of a [K, 16] block (k even; a zero row pads an odd K), the pair's
// first in the low half. A [K, 16] block packs into units(K) rows, and the
// tiles walk either layout alike.
inline long units(long K, bool bf16) { return bf16 ? (K + 1) / 2 : K; }

#ifdef __AVX512BF16__
constexpr bool kHaveBf16 = true;
// Two rows of 16 floats as 16 bfloat16 pairs.
inline __m512i bf16_pairs(__m512 first, __m512 second) {
  const __m512i lo = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(first)));
  const __m512i hi = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(second)));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}
// acc + the pairwise products of a and w, summed in float32.
inline __m512 dot_pairs(__m512 acc, __m512 a, __m512 w) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(w));
}
// The lanes of v that `keep` selects, rounded to bfloat16, stored at to.
inline void store_bf16(uint16_t* to, __mmask16 keep, __m512 v) {
  _mm256_mask_storeu_epi16(to, keep, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#else  // built for a CPU without AVX512_BF16: the handlers refuse bf16 calls
constexpr bool kHaveBf16 = false;
inline __m512i bf16_pairs(__m512, __m512) { return _mm512_setzero_si512(); }
inline __m512 dot_pairs(__m512 acc, __m512, __m512) { return acc; }
inline void store_bf16(uint16_t*, __mmask16, __m512) {}
#endif

// The first n of 16 lanes (all of them from 16 on).
inline __mmask16 first_lanes(long n) {
  return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
}

// Rows of a [B, K] (lda apart) rounded to bfloat16, as pairs: rows units(K)
// units apart, in out. Returns out, as the matmul's operand.
const float* as_pairs(long B, const float* a, long K, long lda, float* out) {
  const long U = units(K, true);
  for (long r = 0; r < B; ++r) {
    const float* from = a + r * lda;
    uint16_t* to = reinterpret_cast<uint16_t*>(out + r * U);
    for (long k = 0; k < K; k += 16) {
      const __mmask16 live = first_lanes(K - k);
      store_bf16(to + k, live, _mm512_maskz_loadu_ps(live, from + k));
    }
    if (K % 2) to[K] = 0;
  }
  return out;
}

// A matmul's left operand, rows a [B, K] (lda apart; 0: K): as it is, or
// (bf16) rounded to pairs `at` floats into `pairs` (B units(K) units, rows
// units(K) apart). Only bfloat16 and int8 calls allocate `pairs`, so the
// pointer is formed only then (an empty vector's data() may be null, and
// null plus an offset is undefined).
const float* operand(bool bf16, long B, const float* a, long K, std::vector<float>& pairs,
                     long at, long lda = 0) {
  return bf16 ? as_pairs(B, a, K, lda ? lda : K, pairs.data() + at) : a;
}

// int8 matmuls (the samplers' matmul_dtype="int8", seqjax.fused.int8_matmul):
// each row of the operand a [B, K] and each column of the weights w [K, N]
// scaled so its largest magnitude is 127 (s_a = max_k |a_k| / 127, s_w =
// max_k |w_kn| / 127; 1 for all zeros) and rounded to integers, their
// products summed exactly in int32 (vpdpbusd, AVX512_VNNI), then z = b +
// sum * (s_a s_w). vpdpbusd multiplies unsigned bytes by signed ones, so a
// goes in as round(a / s_a) + 128, and 128 times the column's sum of
// weights (`corr`) comes off again. A packed row is 16 quads of bytes, from
// four consecutive rows k ... k + 3 (k a multiple of 4, zero rows padding
// K), and each panel of 16 columns has 32 values beside it: the columns'
// s_w (float), then corr (int32).
inline long quads(long K) { return (K + 3) / 4; }

#ifdef __AVX512VNNI__
constexpr bool kHaveInt8 = true;
// acc + the four products per lane of a's unsigned and w's signed bytes, in int32.
inline __m512 dot_quads(__m512 acc, __m512 a, __m512 w) {
  return _mm512_castsi512_ps(_mm512_dpbusd_epi32(_mm512_castps_si512(acc), _mm512_castps_si512(a),
                                                 _mm512_castps_si512(w)));
}
#else  // built for a CPU without AVX512_VNNI: the handlers refuse int8 calls
constexpr bool kHaveInt8 = false;
inline __m512 dot_quads(__m512 acc, __m512, __m512) { return acc; }
#endif

// The scale putting the largest of 16 magnitudes `top` at 127 (1 where it
// is 0; NaN where it is NaN, so a NaN reaches the product), in every lane.
inline __m512 int8_scale(__m512 top) {
  const __mmask16 nonzero = _mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  return _mm512_mask_div_ps(_mm512_set1_ps(1.f), nonzero, top, _mm512_set1_ps(127.f));
}

// max(top, |v|) lane by lane, a NaN in either kept (max alone returns its
// second operand where either is NaN).
inline __m512 max_magnitude(__m512 top, __m512 v) {
  const __m512 m = _mm512_abs_ps(v);
  return _mm512_mask_mov_ps(_mm512_max_ps(m, top), _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q), m);
}

// b + (acc - corr) (s_a s_w), for a panel's int32 sums acc, its q (above)
// and the row's s_a; rounded as XLA rounds it (no fused multiply-add).
inline __m512 dequantize(__m512 acc, const float* q, float s_a, const float* b) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512i sum = _mm512_sub_epi32(_mm512_castps_si512(acc), _mm512_loadu_si512(q + 16));
  const __m512 scale = _mm512_mul_round_ps(_mm512_set1_ps(s_a), _mm512_loadu_ps(q), kNearest);
  return _mm512_add_round_ps(
      _mm512_loadu_ps(b), _mm512_mul_round_ps(_mm512_cvtepi32_ps(sum), scale, kNearest), kNearest);
}

// Rows of a [B, K] (K apart) as quads of round(a / s_a) + 128: rows
// quads(K) units apart, in out; each row's s_a in scales [B]. Returns out,
// as the matmul's operand.
const float* as_quads(long B, const float* a, long K, float* out, float* scales) {
  const long Q = quads(K);
  const __m512i offset = _mm512_set1_epi32(128);
  for (long r = 0; r < B; ++r) {
    const float* from = a + r * K;
    __m512 top = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) {
      top = max_magnitude(top, _mm512_maskz_loadu_ps(first_lanes(K - k), from + k));
    }
    const bool nan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q) != 0;  // reduce_max would drop it
    const __m512 scale = int8_scale(
        _mm512_set1_ps(nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(top)));
    scales[r] = _mm512_cvtss_f32(scale);
    uint8_t* to = reinterpret_cast<uint8_t*>(out + r * Q);
    for (long k = 0; k < K; k += 16) {
      const __mmask16 live = first_lanes(K - k);
      const __m512i u = _mm512_add_epi32(
          _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(live, from + k), scale)), offset);
      _mm_mask_storeu_epi8(to + k, live, _mm512_cvtepi32_epi8(u));
    }
    for (long k = K; k < 4 * Q; ++k) to[k] = 0;
  }
  return out;
}

// A panel of 16 columns, rows row(0) ... row(K - 1) (16 floats each), scaled
// by the columns' s_w and rounded to int8 quads at `to` (quads(K) rows); the
// panel's s_w and corrections at q. Returns the panel's end.
template <class Row>
float* panel_int8(long K, const Row& row, float* to, float* q) {
  __m512 top = _mm512_setzero_ps();
  for (long k = 0; k < K; ++k) top = max_magnitude(top, row(k));
  const __m512 scale = int8_scale(top);
  __m512i colsum = _mm512_setzero_si512();
  for (long k = 0; k < K; k += 4) {
    __m512i quad = _mm512_setzero_si512();
    for (long j = 0; j < 4 && k + j < K; ++j) {
      const __m512i wq = _mm512_cvtps_epi32(_mm512_div_ps(row(k + j), scale));
      colsum = _mm512_add_epi32(colsum, wq);
      const __m512i byte = _mm512_and_si512(wq, _mm512_set1_epi32(0xff));
      quad = _mm512_or_si512(quad, _mm512_slli_epi32(byte, static_cast<unsigned>(8 * j)));
    }
    _mm512_storeu_si512(to, quad);
    to += 16;
  }
  _mm512_storeu_ps(q, scale);
  _mm512_storeu_si512(q + 16, _mm512_slli_epi32(colsum, 7));  // 128 sum_k wq
  return to;
}

// Offsets of 16 consecutive rows `stride` floats apart, for a gather.
inline __m512i row_offsets(long stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(stride)));
}

// Rows row(0) ... row(K - 1) (16 floats each) into a panel at `to`, as
// floats or bfloat16 pairs; returns the panel's end.
template <class Row>
float* panel(long K, bool bf16, const Row& row, float* to) {
  if (!bf16) {
    for (long k = 0; k < K; ++k) _mm512_storeu_ps(to + 16 * k, row(k));
    return to + 16 * K;
  }
  for (long k = 0; k < K; k += 2) {
    const __m512 first = row(k);  // rows in order
    const __m512 second = k + 1 < K ? row(k + 1) : _mm512_setzero_ps();
    _mm512_storeu_si512(to + 8 * k, bf16_pairs(first, second));
  }
  return to + 16 * units(K, true);
}

// Partition p's columns of w1 [K1, G H] stacked over w2 [K2, G H] (the
// partition's Hp units of each of the G gate blocks, blocks in order), in
// panels of 16 columns: out [G Hp / 16, units(K1) + units(K2), 16]; with q,
// w1 alone (K2 = 0: int8 scales each matrix on its own) as int8 quads
// instead ([G Hp / 16, quads(K1), 16]), each panel's s_w and corrections at
// q [G Hp / 16, 32].
void pack_columns(const float* w1, long K1, const float* w2, long K2, long G, long H, long Hp,
                  long p, bool bf16, float* out, float* q = nullptr) {
  const long per_block = Hp / 16, width = G * H;
  const long K = q ? quads(K1) : units(K1, bf16) + units(K2, bf16);
  for (long j = 0; j < G * per_block; ++j) {
    const long col = j / per_block * H + p * Hp + j % per_block * 16;
    float* to = out + j * K * 16;
    auto row1 = [&](long k) { return _mm512_loadu_ps(w1 + k * width + col); };
    auto row2 = [&](long k) { return _mm512_loadu_ps(w2 + k * width + col); };
    if (q) {
      panel_int8(K1, row1, to, q + 32 * j);
    } else {
      panel(K2, bf16, row2, panel(K1, bf16, row1, to));
    }
  }
}

// Partition p's columns of a bias b [G H]: out [G Hp].
void pack_bias(const float* b, long G, long H, long Hp, long p, float* out) {
  for (long g = 0; g < G; ++g) std::memcpy(out + g * Hp, b + g * H + p * Hp, Hp * sizeof(float));
}

// Partition p's rows of w [H, G H], transposed ([G H, Hp]), in panels of 16
// columns: out [Hp / 16, units(G H), 16]. Each row of a panel gathers one
// column of 16 consecutive rows of w.
void pack_rows_transposed(const float* w, long G, long H, long Hp, long p, bool bf16,
                          float* out) {
  const long width = G * H;
  const __m512i rows = row_offsets(width);
  for (long j = 0; j < Hp / 16; ++j) {
    const float* from = w + (p * Hp + 16 * j) * width;
    panel(width, bf16, [&](long k) { return _mm512_i32gather_ps(rows, from + k, 4); },
          out + j * units(width, bf16) * 16);
  }
}

constexpr long kRows = 8;  // rows of a register tile
constexpr long kAhead = 16;  // rows of a weight panel prefetched ahead of use

// What a matmul's packed units hold: floats, bfloat16 pairs (above), or int8
// quads (below).
enum Units { kF32, kBf16, kInt8 };

// z[0:M, 0:16 V] = b + a1 w1 + a2 w2 (K1 and K2 units deep; K2 may be 0)
// for M rows (<= kRows) and V panels of 16 columns (panel v of w at w + v S,
// row k at + 16 k); rows of a1 lda1 apart, of a2 K2, of z N, rows of b ldb apart
// (0: one bias row for all). U: what the units hold; for kInt8 the sums are
// integers, scaled by the rows' s_a (rs) and the columns' s_w (q: see the
// int8 matmuls, above). M and V are template arguments so the accumulators
// stay in registers.
template <Units U, int M, int V>
void tile(const float* a1, long lda1, long K1, const float* w1, const float* a2, long K2,
          const float* w2, long S, long N, const float* b, long ldb, const float* q,
          const float* rs, float* z) {
  __m512 acc[M][V];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) {
      acc[i][v] = U == kInt8 ? _mm512_setzero_ps() : _mm512_loadu_ps(b + i * ldb + 16 * v);
    }
  auto rank1 = [&](const float* a, long lda, long K, const float* w) {
    for (long k = 0; k < K; ++k) {
      __m512 wk[V];
      for (int v = 0; v < V; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(w + v * S + 16 * (k + kAhead)), _MM_HINT_T0);
        wk[v] = _mm512_loadu_ps(w + v * S + 16 * k);
      }
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const __m512 ai = _mm512_set1_ps(a[i * lda + k]);  // bit for bit: a pair or quad
        for (int v = 0; v < V; ++v) {
          acc[i][v] = U == kInt8 ? dot_quads(acc[i][v], ai, wk[v])
                      : U == kBf16 ? dot_pairs(acc[i][v], ai, wk[v])
                                   : _mm512_fmadd_ps(ai, wk[v], acc[i][v]);
        }
      }
    }
  };
  rank1(a1, lda1, K1, w1);
  rank1(a2, K2, K2, w2);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
    for (int v = 0; v < V; ++v) {
      if (U == kInt8) acc[i][v] = dequantize(acc[i][v], q + 32 * v, rs[i], b + i * ldb + 16 * v);
      _mm512_storeu_ps(z + i * N + 16 * v, acc[i][v]);
    }
}

using Tile = void (*)(const float*, long, long, const float*, const float*, long, const float*,
                      long, long, const float*, long, const float*, const float*, float*);
template <Units U, int V>
constexpr Tile kTiles[kRows + 1] = {nullptr,         tile<U, 1, V>, tile<U, 2, V>,
                                    tile<U, 3, V>,   tile<U, 4, V>, tile<U, 5, V>,
                                    tile<U, 6, V>,   tile<U, 7, V>, tile<U, 8, V>};

// z [B, N] = b + a1 [B, K1] w1 [K1, N] + a2 [B, K2] w2 [K2, N] (K1, K2 in
// units; a2 null: no second product), w1 and w2 in panels of 16 columns S apart
// (a panel's rows 16 apart); N a multiple of 16, rows of z ldz apart, rows of b
// ldb apart (0: one bias row; b may be z itself, each tile reading its rows
// before writing them); q and rs: kInt8's s_w and corrections (32 per panel)
// and its rows' s_a. Column blocks outside, so each block of w stays in cache
// across the row tiles. A tile sums k in order whatever its shape, so the
// shapes are free. The rows go in as few tiles as hold them (up to kRows each),
// as even as they split (12 rows: 6 + 6, not 8 + 4); tiles of up to 6 rows take
// 4 panels at a time, 16-24 accumulators (8 rows: 2 panels, 16), enough in
// flight for the FMA latency; one row (a matrix-vector product) reads 8.
// Against 8-row tiles of 2 panels, and 4 panels only up to 3 rows, that ran
// LSTM and GRU loops 1.05-1.17x faster at B = 4, 10, 12, 17 and 20 (the same at
// multiples of 8).
template <Units U>
void matmul(long B, const float* a1, long K1, const float* w1, const float* a2, long K2,
            const float* w2, long S, long N, const float* b, long ldb, const float* q,
            const float* rs, float* z, long ldz, long lda1) {
  if (B <= 0) return;
  const long tiles = (B + kRows - 1) / kRows, most = (B + tiles - 1) / tiles;
  const long wide = B == 1 ? 8 : most <= 6 ? 4 : 2;  // panels at a time
  for (long n0 = 0; n0 < N;) {
    long v = wide;
    while (n0 + 16 * v > N) v /= 2;
    const long panel = n0 / 16 * S;
    for (long i = 0; i < tiles; ++i) {
      const long r0 = i * B / tiles, m = (i + 1) * B / tiles - r0;
      const Tile tile = (v == 8   ? kTiles<U, 8>
                         : v == 4 ? kTiles<U, 4>
                         : v == 2 ? kTiles<U, 2>
                                  : kTiles<U, 1>)[m];
      tile(a1 + r0 * lda1, lda1, K1, w1 + panel, a2 ? a2 + r0 * K2 : nullptr, K2,
           a2 ? w2 + panel : nullptr, S, ldz, b + r0 * ldb + n0, ldb,
           q ? q + 2 * n0 : nullptr, rs ? rs + r0 : nullptr, z + r0 * ldz + n0);
    }
    n0 += 16 * v;
  }
}

// Rows of z N apart, unless ldz says otherwise; one bias row b, unless ldb
// gives the distance between rows of b; rows of a1 K1 apart, unless lda1
// says otherwise.
void matmul(bool bf16, long B, const float* a1, long K1, const float* w1, const float* a2,
            long K2, const float* w2, long S, long N, const float* b, float* z, long ldz = 0,
            long ldb = 0, long lda1 = 0) {
  (bf16 ? matmul<kBf16> : matmul<kF32>)(B, a1, K1, w1, a2, K2, w2, S, N, b, ldb, nullptr,
                                        nullptr, z, ldz ? ldz : N, lda1 ? lda1 : K1);
}

// valid / resets flags, either of which may be absent.
struct Flags {
  const uint8_t* valid;
  const uint8_t* resets;
  long T, B;
  bool live(long t, long r) const { return !valid || valid[t * B + r]; }
  bool reset(long t, long r) const { return resets && t < T && resets[t * B + r]; }
};

// The loops' sequences that XLA reads or writes (xs, ys, and for a gradient
// hs, dys and dz, or the GRU's px, ph and dh_steps): time-major [T, B, ...],
// or batch-major [B, T, ...] (the drivers' default layout, read and written
// in place of transposes). row(t, r): where step t's row r starts, in rows; a
// step's rows lie stride() rows apart. What only the reverse loops read (the
// LSTM's ps, ks, fs, the GRU's zs) stays time-major (time_major()): a step's
// rows together, one stretch of memory (batch-major, the LSTM's reverse loop
// ran about 10 % slower at B = 16, T = 1024, H = 128).
struct Layout {
  long T, B;
  bool batch_major;
  long row(long t, long r) const { return batch_major ? r * T + t : t * B + r; }
  long stride() const { return batch_major ? T : 1; }
  Layout time_major() const { return {T, B, false}; }
};

Flags flags(ffi::Buffer<ffi::U8>& valid, ffi::Buffer<ffi::U8>& resets, long T, long B) {
  return {valid.element_count() ? valid.typed_data() : nullptr,
          resets.element_count() ? resets.typed_data() : nullptr, T, B};
}

// Runs pack(p) for every partition p, then the steps, in one of two ways.
//
// G = 1: step(t, p, 0, B) for every step t and partition p, all partitions
// of a step done before any of the next starts (the threads split the hidden
// units and meet every step). Phase 0 packs, phase t + 1 runs step t.
//
// G > 1 row groups: the threads split the batch's rows instead. Group g runs
// step(t, p, g B / G, (g + 1) B / G) for every t and, within a step, every p
// in turn, all on one thread, and meets no other after the packing: a row's
// step reads only that row's carry. Each thread then reads every partition's
// weights each step, which pays while they stay in its caches and each group
// has 5 rows or more (Python's row_groups() chooses G so).
//
// Phase items (partitions, or groups) are shared among the pool's threads,
// each first taking its own (rank, rank + ranks, ...), so a partition's
// packed weights stay in the cache of the thread that packed them. A thread
// that is late (not yet woken for this call, or off its core between steps)
// does not hold the others back: one that has run its own items and waits
// takes any of the phase's items no one has started (one compare-and-swap on
// the item's next phase), and the late thread joins in where the others are.
// Every output is computed the same way whichever thread runs it, in either
// way. A call that finds the pool busy (another recurrence running at the
// same time) runs alone.
template <class Pack, class Step>
void run_steps(long T, long P, long G, long B, const Pack& pack, const Step& step) {
  if (T <= 0) return;  // no steps: nothing to pack for
  G = std::max(1L, std::min(G, B));
  auto group = [&](long g) {
    for (long t = 0; t < T; ++t) {
      for (long p = 0; p < P; ++p) step(t, p, g * B / G, (g + 1) * B / G);
    }
  };
  Pool& pool = Pool::get();
  std::unique_lock<std::mutex> lock(pool.busy(), std::try_to_lock);
  // P or G: Python's threads()
  const long ranks = lock.owns_lock() ? std::min<long>(G > 1 ? G : P, 1024) : 1;
  if (ranks == 1) {
    for (long p = 0; p < P; ++p) pack(p);
    for (long g = 0; g < G; ++g) group(g);  // G = 1: every step, rows 0 to B
    return;
  }
  // Phase 0's items are the P packs; each later phase has `items`: P
  // partitions' step, or (G > 1, one phase) the G groups.
  const long items = G > 1 ? G : P, phases = G > 1 ? 1 : T;
  struct alignas(64) Next {  // an item's next phase, on a cache line of its own
    std::atomic<long> phase{0};
  };
  std::vector<Next> next(std::max(P, items));
  for (long i = P; i < items; ++i) next[i].phase.store(1, std::memory_order_relaxed);  // no pack
  alignas(64) std::atomic<long> done{0};  // items done
  std::function<void(int)> job = [&](int rank) {
    for (long phase = 0; phase <= phases; ++phase) {
      const long n = phase == 0 ? P : items;
      auto run = [&](long i) {  // item i's phase, unless another thread has it
        long expected = phase;
        if (next[i].phase.load(std::memory_order_relaxed) != phase ||
            !next[i].phase.compare_exchange_strong(expected, phase + 1,
                                                   std::memory_order_acq_rel)) {
          return;
        }
        if (phase == 0) {
          pack(i);
        } else if (G > 1) {
          group(i);
        } else {
          step(phase - 1, i, 0, B);
        }
        done.fetch_add(1, std::memory_order_release);  // after the kernels' own sfence
      };
      for (long i = rank; i < n; i += ranks) run(i);
      const long target = P + items * phase;
      for (long spin = 0; done.load(std::memory_order_acquire) < target; ++spin) {
        if (spin % 64 == 63) {
          for (long i = 0; i < n; ++i) run(i);  // a late thread's items
        }
        if (spin < 4000) _mm_pause(); else std::this_thread::yield();
      }
    }
  };
  pool.run(static_cast<int>(ranks), job);
}

// An LSTM step's gates for 16 units, from their pre-activations z (the four
// gate blocks i, f, g, o, stride apart), and the new cell c = f c_prev + i g.
struct LstmGates {
  __m512 i, f, g, o, c;
  LstmGates(const float* z, long stride, __m512 c_prev)
      : i(sigmoid512(_mm512_loadu_ps(z))),
        f(sigmoid512(_mm512_loadu_ps(z + stride))),
        g(tanh512(_mm512_loadu_ps(z + 2 * stride))),
        o(sigmoid512(_mm512_loadu_ps(z + 3 * stride))),
        c(_mm512_add_ps(_mm512_mul_ps(f, c_prev), _mm512_mul_ps(i, g))) {}
};

// The hidden units' split alone (G = 1): step(t, p), as the outer sums run.
template <class Pack, class Step>
void run_steps(long T, long P, const Pack& pack, const Step& step) {
  run_steps(T, P, 1, 1, pack, [&](long t, long p, long, long) { step(t, p); });
}

// The reverse loops: for t = T - 1 down to 0, gates(t, p, r0, r1) for every
// partition, then carry(t, p, r0, r1) for every partition (which reads every
// partition's gates): with G = 1 (rows 0 to B), a barrier after each; with
// row groups, a group's rows run both in turn.
template <class Pack, class Gates, class Carry>
void run_reverse_steps(long T, long P, long G, long B, const Pack& pack, const Gates& gates,
                       const Carry& carry) {
  run_steps(2 * T, P, G, B, pack, [&](long phase_step, long p, long r0, long r1) {
    const long t = T - 1 - phase_step / 2;
    if (phase_step % 2 == 0) {
      gates(t, p, r0, r1);
    } else {
      carry(t, p, r0, r1);
    }
  });
}

// Units per partition when H splits into P partitions of whole registers
// (Python's partitions() chooses P so), else 0.
long partition_units(long H, int64_t P) {
  return P > 0 && H > 0 && H % P == 0 && (H / P) % 16 == 0 ? H / P : 0;
}

ffi::Error NoBf16(const char* kernel) {
  return ffi::Error::InvalidArgument(std::string("seqjax ") + kernel +
                                     ": bfloat16 matmuls need AVX512_BF16, and this build has "
                                     "none (the CPU it was built for lacks it)");
}

// The initial carry into buffer h (and c), zeroed in rows whose first step resets.
void start(const Flags& fl, long B, long H, const float* from, float* to) {
  for (long r = 0; r < B; ++r) {
    const bool zero = fl.reset(0, r);
    for (long j = 0; j < H; ++j) to[r * H + j] = zero ? 0.f : from[r * H + j];
  }
}

// The stores of a saving loop (Lstm, Gru). The saved arrays are written once
// and read only by the backward pass: non-temporal stores keep them from
// evicting the weights from the cache, when all four are 64-byte aligned.
// Not the arrays in io's layout when it is batch-major, though, where a
// step's B rows are B separate places (hs; the GRU's px and ph): streamed,
// they ran a GRU training step at B = 32 about 10 % slower, and plain stores
// did not. The arrays only the reverse loops read stay time-major and stream.
class Saves {
 public:
  Saves(float* const* saves, bool batch_major) {
    for (int s = 0; saves && s < 4; ++s) {
      stream_ &= reinterpret_cast<uintptr_t>(saves[s]) % 64 == 0;
    }
    stream_ &= saves != nullptr;
    stream_io_ = stream_ && !batch_major;
  }
  void own(float* to, __m512 v) const { store(stream_, to, v); }  // a time-major array
  void io(float* to, __m512 v) const { store(stream_io_, to, v); }  // an array in io's layout
  void fence() const {  // the streamed rows, visible to other threads
    if (stream_) _mm_sfence();
  }

 private:
  static void store(bool stream, float* to, __m512 v) {
    if (stream) _mm512_stream_ps(to, v); else _mm512_storeu_ps(to, v);
  }
  bool stream_ = true, stream_io_ = true;
};

// The LSTM over all steps. With `saves` (hs, ps, ks, fs: [T, B, H], [T, B, 4H],
// [T, B, H], [T, B, H]; hs [B, T, H] batch-major, as xs and ys) it also
// writes what seqjax.fused's backward pass reads:
// h_{t-1}; the gate factors g i(1-i), c_{t-1} f(1-f), i(1-g^2), tanh(c_t) o(1-o)
// (blocks of H, in the unpartitioned column order); o(1 - tanh(c_t)^2); f.
// Steps that hold the carry save zero factors.
ffi::Error Lstm(ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_x,
                ffi::Buffer<ffi::F32>& w_h, ffi::Buffer<ffi::F32>& b, ffi::Buffer<ffi::F32>& h0,
                ffi::Buffer<ffi::F32>& c0, ffi::Buffer<ffi::U8>& valid,
                ffi::Buffer<ffi::U8>& resets, int64_t partitions, bool bf16, bool batch_major,
                int64_t row_groups, float* Y, float* HT, float* C, float* const* saves) {
  const auto xd = xs.dimensions(), wxd = w_x.dimensions(), whd = w_h.dimensions();
  if (xd.size() != 3 || wxd.size() != 2 || whd.size() != 2 || h0.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(
        "seqjax lstm_forward: expected xs [T,B,D] ([B,T,D] batch-major), w_x [D,4H], "
        "w_h [H,4H], h0 [B,H]");
  }
  const long T = xd[batch_major], B = xd[!batch_major], D = xd[2], H = h0.dimensions()[1];
  const long P = partitions;
  const Layout io{T, B, batch_major};
  const long Hp = partition_units(H, P), N = 4 * Hp;
  const long Du = units(D, bf16), Hu = units(H, bf16), K = Du + Hu;  // packed rows
  if (wxd[0] != D || wxd[1] != 4 * H || whd[0] != H || whd[1] != 4 * H ||
      static_cast<long>(b.element_count()) != 4 * H || Hp == 0) {
    return ffi::Error::InvalidArgument(
        "seqjax lstm_forward: weights do not match D and H, or H does not split in partitions");
  }
  if (bf16 && !kHaveBf16) return NoBf16("lstm_forward");
  const Flags fl = flags(valid, resets, T, B);
  const float* X = xs.typed_data();
  Scratch packed(P * (K * N + N));  // each partition's panels, then all the biases
  float* W = packed.data();
  float* Bias = W + P * K * N;
  std::vector<float> hbuf(2 * B * H), zbuf(P * B * N), pairs(bf16 ? P * B * K : 0);
  start(fl, B, H, h0.typed_data(), hbuf.data());
  start(fl, B, H, c0.typed_data(), C);  // the cell state lives in c_T, updated in place
  if (T == 0) std::memcpy(HT, hbuf.data(), B * H * sizeof(float));

  const Saves save(saves, batch_major);

  auto pack = [&](long p) {
    pack_columns(w_x.typed_data(), D, w_h.typed_data(), H, 4, H, Hp, p, bf16, W + p * K * N);
    pack_bias(b.typed_data(), 4, H, Hp, p, Bias + p * N);
  };
  run_steps(T, P, row_groups, B, pack, [&](long t, long p, long r0, long r1) {  // rows r0 to r1
    const float* hin = hbuf.data() + (t & 1) * B * H;
    float* hnext = hbuf.data() + ((t + 1) & 1) * B * H;
    const float* wp = W + p * K * N;
    float* z = zbuf.data() + p * B * N;
    // bf16: this partition's own copy of the step's operands, rounded ([B,
    // Du] of x, then [B, Hu] of h)
    const long lda = io.stride() * D, rows = r1 - r0;
    const long rounded = p * B * K;
    const float* x = operand(bf16, rows, X + io.row(t, r0) * D, D, pairs, rounded + r0 * Du, lda);
    const float* h_in = operand(bf16, rows, hin + r0 * H, H, pairs, rounded + B * Du + r0 * Hu);
    matmul(bf16, rows, x, Du, wp, h_in, Hu, wp + 16 * Du, 16 * K, N, Bias + p * N, z + r0 * N, 0,
           0, bf16 ? Du : lda);
    const __m512 one = _mm512_set1_ps(1.f);
    for (long r = r0; r < r1; ++r) {
      const float* zr = z + r * N;
      const long off = r * H + p * Hp, at = io.row(t, r) * H + p * Hp;
      const long row = io.time_major().row(t, r), own = row * H + p * Hp;  // ps, ks, fs
      const bool live = fl.live(t, r), reset_next = fl.reset(t + 1, r);
      for (long j = 0; j < Hp; j += 16) {
        __m512 c = _mm512_loadu_ps(C + off + j), h = _mm512_loadu_ps(hin + off + j);
        __m512 y = _mm512_setzero_ps();
        __m512 factors[4] = {y, y, y, y}, k = y, fs = y;
        if (saves) save.io(saves[0] + at + j, h);
        if (live) {
          const LstmGates s(zr + j, Hp, c);
          const __m512 i = s.i, f = s.f, g = s.g, o = s.o, c_prev = c;
          c = s.c;
          const __m512 tc = tanh512(c);
          h = y = _mm512_mul_ps(o, tc);
          if (saves) {
            factors[0] = _mm512_mul_ps(_mm512_mul_ps(g, i), _mm512_sub_ps(one, i));
            factors[1] = _mm512_mul_ps(_mm512_mul_ps(c_prev, f), _mm512_sub_ps(one, f));
            factors[2] = _mm512_mul_ps(i, _mm512_fnmadd_ps(g, g, one));
            factors[3] = _mm512_mul_ps(_mm512_mul_ps(tc, o), _mm512_sub_ps(one, o));
            k = _mm512_mul_ps(o, _mm512_fnmadd_ps(tc, tc, one));
            fs = f;
          }
        }
        if (saves) {
          for (int gate = 0; gate < 4; ++gate) {
            save.own(saves[1] + 4 * row * H + gate * H + p * Hp + j, factors[gate]);
          }
          save.own(saves[2] + own + j, k);
          save.own(saves[3] + own + j, fs);
        }
        _mm512_storeu_ps(Y + at + j, y);
        if (t + 1 == T) _mm512_storeu_ps(HT + off + j, h);
        if (reset_next) h = c = _mm512_setzero_ps();
        _mm512_storeu_ps(C + off + j, c);
        _mm512_storeu_ps(hnext + off + j, h);
      }
    }
    save.fence();  // before the barrier
  });
  return ffi::Error::Success();
}

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x,
                           ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> resets,
                           ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_out,
                           ffi::ResultBuffer<ffi::F32> c_out, int64_t partitions, bool bf16,
                           bool batch_major, int64_t row_groups) {
  return Lstm(xs, w_x, w_h, b, h0, c0, valid, resets, partitions, bf16, batch_major, row_groups,
              ys->typed_data(), h_out->typed_data(), c_out->typed_data(), nullptr);
}

ffi::Error LstmForwardSavingImpl(
    ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h,
    ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
    ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> resets, ffi::ResultBuffer<ffi::F32> ys,
    ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> c_out,
    ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> ps,
    ffi::ResultBuffer<ffi::F32> ks, ffi::ResultBuffer<ffi::F32> fs, int64_t partitions,
    bool bf16, bool batch_major, int64_t row_groups) {
  float* const saves[4] = {hs->typed_data(), ps->typed_data(), ks->typed_data(),
                           fs->typed_data()};
  return Lstm(xs, w_x, w_h, b, h0, c0, valid, resets, partitions, bf16, batch_major, row_groups,
              ys->typed_data(), h_out->typed_data(), c_out->typed_data(), saves);
}

// The LSTM's reverse loop: seqjax.fused._lstm_bwd's scan. From the carry
// gradients dh_T, dc_T and per-step dys [T, B, H] and the forward's saves
// ps [T, B, 4H], ks, fs [T, B, H], it writes dz [T, B, 4H] (the gate
// gradients, for the weight gradients after the loop) and dh_0, dc_0;
// batch-major, dys and dz are [B, T, ...] instead.
// Partition p owns units p Hp ... (p + 1) Hp: their dz columns, then (after a
// barrier: this needs every dz column) their columns of dh = dz w_h^T, from
// w_h's rows of those units, packed transposed.
ffi::Error LstmReverseImpl(ffi::Buffer<ffi::F32> dh_T, ffi::Buffer<ffi::F32> dc_T,
                           ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> ps,
                           ffi::Buffer<ffi::F32> ks, ffi::Buffer<ffi::F32> fs,
                           ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::U8> valid,
                           ffi::Buffer<ffi::U8> resets, ffi::ResultBuffer<ffi::F32> dz_out,
                           ffi::ResultBuffer<ffi::F32> dh_out, ffi::ResultBuffer<ffi::F32> dc_out,
                           int64_t partitions, bool bf16, bool batch_major, int64_t row_groups) {
  const auto yd = dys.dimensions(), wd = w_h.dimensions();
  if (yd.size() != 3 || wd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "seqjax lstm_reverse: expected dys [T,B,H] ([B,T,H] batch-major), w_h [H,4H]");
  }
  const long T = yd[batch_major], B = yd[!batch_major], H = yd[2], P = partitions, G = 4 * H;
  const Layout io{T, B, batch_major};
  const long Hp = partition_units(H, P);
  if (wd[0] != H || wd[1] != G || Hp == 0 ||
      static_cast<long>(ps.element_count()) != T * B * G) {
    return ffi::Error::InvalidArgument("seqjax lstm_reverse: shapes do not match");
  }
  if (bf16 && !kHaveBf16) return NoBf16("lstm_reverse");
  const long Gu = units(G, bf16);  // packed rows of w_h^T
  const Flags fl = flags(valid, resets, T, B);
  const float* DY = dys.typed_data();
  const float* PS = ps.typed_data();
  const float* KS = ks.typed_data();
  const float* FS = fs.typed_data();
  Scratch packed(P * Gu * Hp);
  float* WT = packed.data();
  float* DZ = dz_out->typed_data();
  float* DH = dh_out->typed_data();  // the carry gradients live in the outputs
  float* DC = dc_out->typed_data();
  std::memcpy(DH, dh_T.typed_data(), B * H * sizeof(float));
  std::memcpy(DC, dc_T.typed_data(), B * H * sizeof(float));
  std::vector<float> products(P * B * Hp);  // each partition's [B, Hp] of dz w_h^T
  std::vector<float> pairs(bf16 ? P * B * Gu : 0);
  const std::vector<float> zeros(Hp, 0.f);

  // Gates: each partition's dz columns and dc. Carry: its columns of dh.
  auto gates = [&](long t, long p, long r0, long r1) {
    for (long r = r0; r < r1; ++r) {
      const long off = r * H + p * Hp, at = io.row(t, r) * H + p * Hp;
      const long row = io.time_major().row(t, r), own = row * H + p * Hp;  // ps, ks, fs
      const bool live = fl.live(t, r);
      const float* pr = PS + row * G + p * Hp;
      float* dzr = DZ + io.row(t, r) * G + p * Hp;
      for (long j = 0; j < Hp; j += 16) {
        __m512 dh = _mm512_add_ps(_mm512_loadu_ps(DH + off + j), _mm512_loadu_ps(DY + at + j));
        __m512 dc = _mm512_loadu_ps(DC + off + j);
        if (!live) dh = dc = _mm512_setzero_ps();
        const __m512 dct = _mm512_fmadd_ps(dh, _mm512_loadu_ps(KS + own + j), dc);
        for (int gate = 0; gate < 4; ++gate) {
          const __m512 dz = _mm512_mul_ps(_mm512_loadu_ps(pr + gate * H + j), gate < 3 ? dct : dh);
          _mm512_storeu_ps(dzr + gate * H + j, dz);
        }
        if (live) _mm512_storeu_ps(DC + off + j, _mm512_mul_ps(dct, _mm512_loadu_ps(FS + own + j)));
      }
    }
  };
  auto carry = [&](long t, long p, long r0, long r1) {
    float* product = products.data() + p * B * Hp;
    const long lda = io.stride() * G, rows = r1 - r0;
    const float* dz = operand(bf16, rows, DZ + io.row(t, r0) * G, G, pairs, (p * B + r0) * Gu,
                              lda);
    matmul(bf16, rows, dz, Gu, WT + p * Gu * Hp, nullptr, 0, nullptr, 16 * Gu, Hp, zeros.data(),
           product + r0 * Hp, 0, 0, bf16 ? Gu : lda);
    for (long r = r0; r < r1; ++r) {
      const long off = r * H + p * Hp;
      const bool live = fl.live(t, r), reset = fl.reset(t, r);
      for (long j = 0; j < Hp; j += 16) {
        __m512 dh = live ? _mm512_loadu_ps(product + r * Hp + j) : _mm512_loadu_ps(DH + off + j);
        if (reset) {
          dh = _mm512_setzero_ps();
          _mm512_storeu_ps(DC + off + j, dh);
        }
        _mm512_storeu_ps(DH + off + j, dh);
      }
    }
  };
  auto pack = [&](long p) {
    pack_rows_transposed(w_h.typed_data(), 4, H, Hp, p, bf16, WT + p * Gu * Hp);
  };
  run_reverse_steps(T, P, row_groups, B, pack, gates, carry);
  return ffi::Error::Success();
}

// The GRU over all steps. With `saves` (hs [T, B, H], px, ph [T, B, 3H],
// zs [T, B, H]; all but zs [B, T, ...] batch-major, as xs and ys) it also
// writes what seqjax.fused's backward pass reads:
// h_{t-1}; with a = (1 - z)(1 - n^2), dr = a (h W_hn + b_hn) r (1 - r) and
// dz = (h - n) z (1 - z): px = [dr, dz, a] and ph = [dr, dz, a r] (blocks of
// H, unpartitioned); z. Steps that hold the carry save zero factors.
ffi::Error Gru(ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& w_x, ffi::Buffer<ffi::F32>& w_h,
               ffi::Buffer<ffi::F32>& bx, ffi::Buffer<ffi::F32>& bh, ffi::Buffer<ffi::F32>& h0,
               ffi::Buffer<ffi::U8>& valid, ffi::Buffer<ffi::U8>& resets, int64_t partitions,
               bool bf16, bool batch_major, int64_t row_groups, float* Y, float* HT,
               float* const* saves) {
  const auto xd = xs.dimensions(), wxd = w_x.dimensions(), whd = w_h.dimensions();
  if (xd.size() != 3 || wxd.size() != 2 || whd.size() != 2 || h0.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(
        "seqjax gru_forward: expected xs [T,B,D] ([B,T,D] batch-major), w_x [D,3H], "
        "w_h [H,3H], h0 [B,H]");
  }
  const long T = xd[batch_major], B = xd[!batch_major], D = xd[2], H = h0.dimensions()[1];
  const long P = partitions;
  const Layout io{T, B, batch_major};
  const long Hp = partition_units(H, P), N = 3 * Hp;
  if (wxd[0] != D || wxd[1] != 3 * H || whd[0] != H || whd[1] != 3 * H ||
      static_cast<long>(bx.element_count()) != 3 * H ||
      static_cast<long>(bh.element_count()) != 3 * H || Hp == 0) {
    return ffi::Error::InvalidArgument(
        "seqjax gru_forward: weights do not match D and H, or H does not split in partitions");
  }
  if (bf16 && !kHaveBf16) return NoBf16("gru_forward");
  const long Du = units(D, bf16), Hu = units(H, bf16);  // packed rows
  const Flags fl = flags(valid, resets, T, B);
  const float* X = xs.typed_data();
  Scratch packed(P * (Du * N + Hu * N + 2 * N));  // panels of w_x, of w_h, then the biases
  float* WX = packed.data();
  float* WH = WX + P * Du * N;
  float* BX = WH + P * Hu * N;
  float* BH = BX + P * N;
  std::vector<float> hbuf(2 * B * H), zbuf(2 * P * B * N), pairs(bf16 ? P * B * (Du + Hu) : 0);
  start(fl, B, H, h0.typed_data(), hbuf.data());
  if (T == 0) std::memcpy(HT, hbuf.data(), B * H * sizeof(float));
  const Saves save(saves, batch_major);

  auto pack = [&](long p) {
    pack_columns(w_x.typed_data(), D, nullptr, 0, 3, H, Hp, p, bf16, WX + p * Du * N);
    pack_columns(w_h.typed_data(), H, nullptr, 0, 3, H, Hp, p, bf16, WH + p * Hu * N);
    pack_bias(bx.typed_data(), 3, H, Hp, p, BX + p * N);
    pack_bias(bh.typed_data(), 3, H, Hp, p, BH + p * N);
  };
  run_steps(T, P, row_groups, B, pack, [&](long t, long p, long r0, long r1) {  // rows r0 to r1
    const float* hin = hbuf.data() + (t & 1) * B * H;
    float* hnext = hbuf.data() + ((t + 1) & 1) * B * H;
    float* zx = zbuf.data() + 2 * p * B * N;
    float* zh = zx + B * N;
    // bf16: this partition's own copy of the step's operands, rounded ([B,
    // Du] of x, then [B, Hu] of h)
    const long lda = io.stride() * D, rows = r1 - r0;
    const long rounded = p * B * (Du + Hu);
    const float* x = operand(bf16, rows, X + io.row(t, r0) * D, D, pairs, rounded + r0 * Du, lda);
    const float* h_in = operand(bf16, rows, hin + r0 * H, H, pairs, rounded + B * Du + r0 * Hu);
    matmul(bf16, rows, x, Du, WX + p * Du * N, nullptr, 0, nullptr, 16 * Du, N, BX + p * N,
           zx + r0 * N, 0, 0, bf16 ? Du : lda);
    matmul(bf16, rows, h_in, Hu, WH + p * Hu * N, nullptr, 0, nullptr, 16 * Hu, N, BH + p * N,
           zh + r0 * N);
    const __m512 one = _mm512_set1_ps(1.f);
    for (long r = r0; r < r1; ++r) {
      const float* xr = zx + r * N;
      const float* hr = zh + r * N;
      const long off = r * H + p * Hp, at = io.row(t, r) * H + p * Hp;
      const long wide = 3 * io.row(t, r) * H + p * Hp;  // a [T, B, 3H] row, own units
      const bool live = fl.live(t, r), reset_next = fl.reset(t + 1, r);
      for (long j = 0; j < Hp; j += 16) {
        __m512 h = _mm512_loadu_ps(hin + off + j);
        __m512 y = _mm512_setzero_ps();
        __m512 dr = y, dz = y, a = y, ar = y, zs = y;
        if (saves) save.io(saves[0] + at + j, h);
        if (live) {
          const __m512 rg = sigmoid512(
              _mm512_add_ps(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(hr + j)));
          const __m512 zg = sigmoid512(
              _mm512_add_ps(_mm512_loadu_ps(xr + Hp + j), _mm512_loadu_ps(hr + Hp + j)));
          const __m512 hn = _mm512_loadu_ps(hr + 2 * Hp + j);
          const __m512 n = tanh512(_mm512_fmadd_ps(rg, hn, _mm512_loadu_ps(xr + 2 * Hp + j)));
          if (saves) {
            a = _mm512_mul_ps(_mm512_sub_ps(one, zg), _mm512_fnmadd_ps(n, n, one));
            dr = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(a, hn), rg), _mm512_sub_ps(one, rg));
            dz = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(h, n), zg), _mm512_sub_ps(one, zg));
            ar = _mm512_mul_ps(a, rg);
            zs = zg;
          }
          h = y = _mm512_fmadd_ps(zg, _mm512_sub_ps(h, n), n);  // (1 - z) n + z h
        }
        if (saves) {
          save.io(saves[1] + wide + j, dr);
          save.io(saves[1] + wide + H + j, dz);
          save.io(saves[1] + wide + 2 * H + j, a);
          save.io(saves[2] + wide + j, dr);
          save.io(saves[2] + wide + H + j, dz);
          save.io(saves[2] + wide + 2 * H + j, ar);
          save.own(saves[3] + io.time_major().row(t, r) * H + p * Hp + j, zs);
        }
        _mm512_storeu_ps(Y + at + j, y);
        if (t + 1 == T) _mm512_storeu_ps(HT + off + j, h);
        if (reset_next) h = _mm512_setzero_ps();
        _mm512_storeu_ps(hnext + off + j, h);
      }
    }
    save.fence();  // before the barrier
  });
  return ffi::Error::Success();
}

ffi::Error GruForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x,
                          ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> bx,
                          ffi::Buffer<ffi::F32> bh, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> resets,
                          ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_out,
                          int64_t partitions, bool bf16, bool batch_major, int64_t row_groups) {
  return Gru(xs, w_x, w_h, bx, bh, h0, valid, resets, partitions, bf16, batch_major, row_groups,
             ys->typed_data(), h_out->typed_data(), nullptr);
}

ffi::Error GruForwardSavingImpl(
    ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h,
    ffi::Buffer<ffi::F32> bx, ffi::Buffer<ffi::F32> bh, ffi::Buffer<ffi::F32> h0,
    ffi::Buffer<ffi::U8> valid, ffi::Buffer<ffi::U8> resets, ffi::ResultBuffer<ffi::F32> ys,
    ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> hs,
    ffi::ResultBuffer<ffi::F32> px, ffi::ResultBuffer<ffi::F32> ph,
    ffi::ResultBuffer<ffi::F32> zs, int64_t partitions, bool bf16, bool batch_major,
    int64_t row_groups) {
  float* const saves[4] = {hs->typed_data(), px->typed_data(), ph->typed_data(),
                           zs->typed_data()};
  return Gru(xs, w_x, w_h, bx, bh, h0, valid, resets, partitions, bf16, batch_major, row_groups,
             ys->typed_data(), h_out->typed_data(), saves);
}

// The GRU's reverse loop: seqjax.fused._gru_bwd's scan. From dh_T, dys and
// the forward's saves ph [T, B, 3H] and zs [T, B, H], it writes
// dh_steps [T, B, H] (the gradient reaching each step's output, from which
// the gate and weight gradients are built after the loop) and dh_0. Gates:
// each partition's dh_step and its columns of g = [dh_step]*3 ph; carry
// (every column of g needed): its columns of dh = g w_h^T + dh_step z, from
// w_h packed transposed (as for the LSTM). Batch-major, dys, ph and dh_steps
// are [B, T, ...].
ffi::Error GruReverseImpl(ffi::Buffer<ffi::F32> dh_T, ffi::Buffer<ffi::F32> dys,
                          ffi::Buffer<ffi::F32> ph, ffi::Buffer<ffi::F32> zs,
                          ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::U8> valid,
                          ffi::Buffer<ffi::U8> resets, ffi::ResultBuffer<ffi::F32> steps_out,
                          ffi::ResultBuffer<ffi::F32> dh_out, int64_t partitions,
                          bool bf16, bool batch_major, int64_t row_groups) {
  const auto yd = dys.dimensions(), wd = w_h.dimensions();
  if (yd.size() != 3 || wd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "seqjax gru_reverse: expected dys [T,B,H] ([B,T,H] batch-major), w_h [H,3H]");
  }
  const long T = yd[batch_major], B = yd[!batch_major], H = yd[2], P = partitions, G = 3 * H;
  const Layout io{T, B, batch_major};
  const long Hp = partition_units(H, P);
  if (wd[0] != H || wd[1] != G || Hp == 0 ||
      static_cast<long>(ph.element_count()) != T * B * G) {
    return ffi::Error::InvalidArgument("seqjax gru_reverse: shapes do not match");
  }
  if (bf16 && !kHaveBf16) return NoBf16("gru_reverse");
  const long Gu = units(G, bf16);  // packed rows of w_h^T
  const Flags fl = flags(valid, resets, T, B);
  const float* DY = dys.typed_data();
  const float* PH = ph.typed_data();
  const float* ZS = zs.typed_data();
  Scratch packed(P * Gu * Hp);
  float* WT = packed.data();
  float* STEPS = steps_out->typed_data();
  float* DH = dh_out->typed_data();  // the carry gradient lives in the output
  std::memcpy(DH, dh_T.typed_data(), B * H * sizeof(float));
  std::vector<float> g(B * G), products(P * B * Hp), pairs(bf16 ? P * B * Gu : 0);
  const std::vector<float> zeros(Hp, 0.f);

  auto gates = [&](long t, long p, long r0, long r1) {
    for (long r = r0; r < r1; ++r) {
      const long off = r * H + p * Hp, at = io.row(t, r) * H + p * Hp;
      const float* pr = PH + io.row(t, r) * G + p * Hp;
      float* gr = g.data() + r * G + p * Hp;
      for (long j = 0; j < Hp; j += 16) {
        __m512 dh = _mm512_add_ps(_mm512_loadu_ps(DH + off + j), _mm512_loadu_ps(DY + at + j));
        if (!fl.live(t, r)) dh = _mm512_setzero_ps();
        _mm512_storeu_ps(STEPS + at + j, dh);
        for (int gate = 0; gate < 3; ++gate) {
          _mm512_storeu_ps(gr + gate * H + j, _mm512_mul_ps(_mm512_loadu_ps(pr + gate * H + j), dh));
        }
      }
    }
  };
  auto carry = [&](long t, long p, long r0, long r1) {
    float* product = products.data() + p * B * Hp;
    const long rows = r1 - r0;
    const float* gt = operand(bf16, rows, g.data() + r0 * G, G, pairs, (p * B + r0) * Gu);
    matmul(bf16, rows, gt, Gu, WT + p * Gu * Hp, nullptr, 0, nullptr, 16 * Gu, Hp, zeros.data(),
           product + r0 * Hp);
    for (long r = r0; r < r1; ++r) {
      const long off = r * H + p * Hp, at = io.row(t, r) * H + p * Hp;
      const bool live = fl.live(t, r), reset = fl.reset(t, r);
      const long own = io.time_major().row(t, r) * H + p * Hp;  // zs
      for (long j = 0; j < Hp; j += 16) {
        __m512 dh = live ? _mm512_fmadd_ps(_mm512_loadu_ps(STEPS + at + j),
                                           _mm512_loadu_ps(ZS + own + j),
                                           _mm512_loadu_ps(product + r * Hp + j))
                         : _mm512_loadu_ps(DH + off + j);
        if (reset) dh = _mm512_setzero_ps();
        _mm512_storeu_ps(DH + off + j, dh);
      }
    }
  };
  auto pack = [&](long p) {
    pack_rows_transposed(w_h.typed_data(), 3, H, Hp, p, bf16, WT + p * Gu * Hp);
  };
  run_reverse_steps(T, P, row_groups, B, pack, gates, carry);
  return ffi::Error::Success();
}

// out[0:Mr, 16 V columns] (rows N apart) = (accumulate ? out : 0) + the sum
// over K units k of a[k, 0:Mr] w[k] (a's rows M apart; w: V panels of 16
// columns, a panel's rows 16 apart, panels S apart): the outer sums' register
// tile (OuterSums), a's row's Mr units broadcast in turn, floats or (kBf16)
// bfloat16 pairs of two rows of a and of w. Prefetched: w's rows kAhead
// ahead, as the loops' tiles do (w's 4 panels, 128 KB at 512 rows, stream
// from L2: 1.01-1.03x the outer sums' GFLOP/s alone at the peers' sizes (a),
// (b), (c) and the GRU's (b), float32 and bfloat16; the LSTM's whole training
// step at (b), 1.00x); a's row kAhead ahead (a's rows are M floats apart, 2 KB
// at M = 512, and a block of both a's, 2 MB, outgrows L2) and the next tile's
// rows of z, to L2. The two together: 1.05x the outer sums alone at (b), 1.07x
// the GRU's, 1.03x in bfloat16, 0.99-1.01x at (a) and (c); whole training
// steps 1.02x (LSTM) and 1.03x (GRU) at (b), 0.99-1.01x at (a) and (c). Mr and
// V are template arguments so the accumulators stay in registers.
template <Units U, int Mr, int V>
void outer_tile(const float* a, long M, long K, const float* w, long S, float* z, long N,
                bool accumulate) {
  __m512 acc[Mr][V];
#pragma GCC unroll 8
  for (int i = 0; i < Mr; ++i)
    for (int v = 0; v < V; ++v)
      acc[i][v] = accumulate ? _mm512_loadu_ps(z + i * N + 16 * v) : _mm512_setzero_ps();
  for (int i = 0; i < Mr; ++i)  // the next tile down: rows Mr on, the same columns
    for (int v = 0; v < V; ++v)
      _mm_prefetch(reinterpret_cast<const char*>(z + (Mr + i) * N + 16 * v), _MM_HINT_T1);
  for (long k = 0; k < K; ++k) {
    __m512 wk[V];
    for (int v = 0; v < V; ++v) {
      _mm_prefetch(reinterpret_cast<const char*>(w + v * S + 16 * (k + kAhead)), _MM_HINT_T0);
      wk[v] = _mm512_loadu_ps(w + v * S + 16 * k);
    }
    const float* ak = a + k * M;
    _mm_prefetch(reinterpret_cast<const char*>(ak + kAhead * M), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < Mr; ++i) {
      const __m512 ai = _mm512_set1_ps(ak[i]);  // bit for bit: a pair
      for (int v = 0; v < V; ++v) {
        acc[i][v] = U == kBf16 ? dot_pairs(acc[i][v], ai, wk[v])
                               : _mm512_fmadd_ps(ai, wk[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < Mr; ++i)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(z + i * N + 16 * v, acc[i][v]);
}

// The outer sums' tiles: 6 rows by 4 panels (24 accumulators, each a value
// broadcast feeding 64 columns), narrower at the ends of a's rows and of a
// partition's panels. (At R = 16384, 512 x 2048, each a read for 32 columns
// in 8-row tiles ran 0.96-0.98x XLA's product, these 1.01-1.02x; at
// R = 4096, 256 x 1024 both ran 1.15x.)
constexpr long kOuterRows = 6, kOuterPanels = 4;
using OuterTile = void (*)(const float*, long, long, const float*, long, float*, long, bool);
template <Units U, int V>
constexpr OuterTile kOuterTiles[kOuterRows + 1] = {
    nullptr,             outer_tile<U, 1, V>, outer_tile<U, 2, V>, outer_tile<U, 3, V>,
    outer_tile<U, 4, V>, outer_tile<U, 5, V>, outer_tile<U, 6, V>};
template <Units U>
constexpr const OuterTile* kOuterTilesByPanels[kOuterPanels + 1] = {
    nullptr, kOuterTiles<U, 1>, kOuterTiles<U, 2>, kOuterTiles<U, 3>, kOuterTiles<U, 4>};

// The rows of the a's and b an outer sum takes at a time: each partition
// packs its panels of b's block once and runs every tile over them, the
// tiles adding to what the block before left in out. (At R = 4096,
// 256 x 1024: blocks of 128 rows ran at 183-193 GFLOP/s, 512 at 195-202,
// all R at once 175. Even, so bfloat16 pairs never straddle two blocks.)
constexpr long kOuterDepth = 512;

// Row k of b's 16 columns from column c (a multiple of 16), times the same
// columns of tiled [R, H] repeated across b's N / H blocks of columns, if
// tiled (b's own columns if not).
inline __m512 b_row(const float* b, long N, const float* tiled, long H, long k, long c) {
  const __m512 row = _mm512_loadu_ps(b + k * N + c);
  return tiled ? _mm512_mul_ps(row, _mm512_loadu_ps(tiled + k * H + c % H)) : row;
}

// Units `from` to `to` of a block of K rows of a [K, M] as bfloat16 pairs
// (unit k2 of a column: rows 2 k2 and 2 k2 + 1, a zero row padding an odd
// K), rows of units M apart, in out.
void pack_pair_rows(const float* a, long M, long K, long from, long to, float* out) {
  for (long k2 = from; k2 < to; ++k2) {
    const float* first = a + 2 * k2 * M;
    const bool second = 2 * k2 + 1 < K;
    for (long m = 0; m < M; m += 16) {
      const __mmask16 live = first_lanes(M - m);
      const __m512 x = _mm512_maskz_loadu_ps(live, first + m);
      const __m512 y = second ? _mm512_maskz_loadu_ps(live, first + M + m) : _mm512_setzero_ps();
      _mm512_mask_storeu_epi32(out + k2 * M + m, live, bf16_pairs(x, y));
    }
  }
}

// outs[j] [M_j, N] = a_j^T b for a_j [R, M_j] and b [R, N], in float32 or
// with bfloat16 operands (bf16), b's columns times tiled's (b_row), and
// sums [N] = b's column sums (float32). Each of the P partitions owns a share
// of b's 16-column panels and, block by block of rows, packs its panels of
// the block (its only copy of b, summing its columns as it goes), then runs
// every a_j's tiles over them. b is read once however many a's share it (an
// LSTM's inputs and outputs share dz). In float32 the tiles read the a's in
// place, each partition going through the blocks on its own; in bfloat16
// the partitions first round a share of each block's rows of every a to
// pairs, and meet before the tiles read them (and again before the next
// block's). Every output is summed over k in order, whichever thread runs it.
void OuterSums(bool bf16, const float* b, const float* tiled, long H, long R, long N,
               const std::vector<const float*>& as, const std::vector<long>& ms,
               const std::vector<float*>& outs, float* sums, long partitions) {
  if (R == 0) {
    for (size_t j = 0; j < as.size(); ++j) std::fill(outs[j], outs[j] + ms[j] * N, 0.f);
    std::fill(sums, sums + N, 0.f);
    return;
  }
  const long panels = N / 16, P = std::max<long>(1, std::min<long>(partitions, panels));
  const long blocks = (R + kOuterDepth - 1) / kOuterDepth;
  const long depth = units(std::min(kOuterDepth, R), bf16);  // a block's units
  auto share = [&](long n, long p) { return n * p / P; };  // p's share starts here
  const long widest = (panels + P - 1) / P;  // the most panels a partition owns
  long a_units = 0;
  for (const long M : ms) a_units += bf16 ? depth * M : 0;
  Scratch packed(P * depth * 16 * widest + a_units);
  float* const pairs = packed.data() + P * depth * 16 * widest;  // bf16: the a's block

  auto pack = [&](long block, long p) {  // p's panels of b's block; bf16: its share of the a's
    const long k0 = block * kOuterDepth, K = std::min(kOuterDepth, R - k0);
    const long first = share(panels, p), count = share(panels, p + 1) - first;
    float* to = packed.data() + p * depth * 16 * widest;
    for (long c = 16 * first; c < 16 * (first + count); c += 16) {
      __m512 sum = k0 ? _mm512_loadu_ps(sums + c) : _mm512_setzero_ps();
      to = panel(K, bf16, [&](long k) {  // rows in order
        const __m512 row = b_row(b, N, tiled, H, k0 + k, c);
        sum = _mm512_add_ps(sum, row);
        return row;
      }, to);
      _mm512_storeu_ps(sums + c, sum);
    }
    if (!bf16) return;
    const long Ku = units(K, bf16);
    float* a_pairs = pairs;
    for (size_t j = 0; j < as.size(); ++j) {
      pack_pair_rows(as[j] + k0 * ms[j], ms[j], K, share(Ku, p), share(Ku, p + 1), a_pairs);
      a_pairs += Ku * ms[j];
    }
  };
  auto tiles = [&](long block, long p) {  // p's panels' columns of every out, this block's rows
    const long k0 = block * kOuterDepth, K = std::min(kOuterDepth, R - k0), Ku = units(K, bf16);
    const long first = share(panels, p), count = share(panels, p + 1) - first;
    const float* W = packed.data() + p * depth * 16 * widest;
    for (long v0 = 0; v0 < count; v0 += kOuterPanels) {
      const long v = std::min(kOuterPanels, count - v0);
      const OuterTile* by_rows =
          (bf16 ? kOuterTilesByPanels<kBf16> : kOuterTilesByPanels<kF32>)[v];
      const float* a_pairs = pairs;
      for (size_t j = 0; j < as.size(); ++j) {
        const long M = ms[j];
        const float* a = bf16 ? a_pairs : as[j] + k0 * M;
        for (long m0 = 0; m0 < M; m0 += kOuterRows) {
          by_rows[std::min(kOuterRows, M - m0)](a + m0, M, Ku, W + v0 * Ku * 16, Ku * 16,
                                                outs[j] + m0 * N + 16 * (first + v0), N, k0 > 0);
        }
        a_pairs += bf16 ? Ku * M : 0;
      }
    }
  };
  if (!bf16) {
    run_steps(1, P, [](long) {}, [&](long, long p) {
      for (long block = 0; block < blocks; ++block) {
        pack(block, p);
        tiles(block, p);
      }
    });
  } else {
    run_steps(2 * blocks, P, [](long) {}, [&](long phase, long p) {
      if (phase % 2) tiles(phase / 2, p); else pack(phase / 2, p);
    });
  }
}

// The weight gradients' products: outs[j] [M_j, N] = a_j^T b, summed over
// the R rows of each a_j [R, M_j] and of b [R, N] (every step and batch row
// of a sequence), with bfloat16 operands when bf16, and the bias gradient:
// b's column sums [N], the first result. With tiled [R, H] not empty, b's
// columns times tiled's, repeated across b's N / H blocks of columns (a
// GRU's gate gradients: its carry gradients times the saved factors, never
// written out).
ffi::Error OuterSumImpl(ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> tiled_buffer,
                        ffi::RemainingArgs a_args, ffi::RemainingRets out_rets,
                        int64_t partitions, bool bf16) {
  const auto bd = b.dimensions(), td = tiled_buffer.dimensions();
  const long R = bd.size() == 2 ? bd[0] : -1, N = bd.size() == 2 ? bd[1] : -1;
  const bool is_tiled = tiled_buffer.element_count() > 0;
  const long H = is_tiled && td.size() == 2 ? td[1] : 16;
  const ffi::Error shapes = ffi::Error::InvalidArgument(
      "seqjax outer_sum: expected b [R,N] with N a multiple of 16, tiled empty or [R,H] with H "
      "a multiple of 16 dividing N, float32 a's [R,M], and results [N] then one [M,N] per a");
  if (R < 0 || N % 16 != 0 || partitions < 1 || a_args.size() == 0 ||
      a_args.size() + 1 != out_rets.size() ||
      (is_tiled && (td.size() != 2 || td[0] != R || H % 16 != 0 || N % H != 0))) {
    return shapes;
  }
  const float* tiled = is_tiled ? tiled_buffer.typed_data() : nullptr;
  if (bf16 && !kHaveBf16) return NoBf16("outer_sum");
  auto sums = out_rets.get<ffi::Buffer<ffi::F32>>(0);
  if (!sums || (*sums)->element_count() != static_cast<size_t>(N)) return shapes;
  std::vector<const float*> as;
  std::vector<long> ms;
  std::vector<float*> outs;
  for (size_t j = 0; j < a_args.size(); ++j) {
    auto a = a_args.get<ffi::Buffer<ffi::F32>>(j);
    auto out = out_rets.get<ffi::Buffer<ffi::F32>>(j + 1);
    if (!a || !out || a->dimensions().size() != 2 || a->dimensions()[0] != R ||
        (*out)->element_count() != static_cast<size_t>(a->dimensions()[1] * N)) {
      return shapes;
    }
    as.push_back(a->typed_data());
    ms.push_back(a->dimensions()[1]);
    outs.push_back((*out)->typed_data());
  }
  OuterSums(bf16, b.typed_data(), tiled, H, R, N, as, ms, outs, (*sums)->typed_data(),
            partitions);
  return ffi::Error::Success();
}

// Sampling from a stacked LSTM or GRU language model, every step in one
// call: the tokens' embedding, the L layers, a linear read-out to V logits,
// and the next token drawn and fed back. seqjax.models.charlm.generate's
// loop, the same draws as seqjax.decoding.generate's: token = the first
// index of the largest logits / temperature + noise, where noise [T, B, V]
// is the Gumbel noise jax.random.categorical adds (zero for greedy decoding,
// temperature 0), -inf where a token may not be drawn. With G gates (4 for
// the LSTM, 3 for the GRU):
//   table [V, G H]: each token's layer-0 input projection (embedding w_x + b);
//   w_o [H, V], b_o [V]: the read-out from the last layer's h (float32: the
//   model's head does not take the cells' matmul_dtype);
//   logits0 [B, V]: the logits the first token is drawn from;
//   then per layer l: w_x [H, G H] (layer 0's is not read), w_h [H, G H],
//   b [G H] (layer 0's is in the table), then the LSTM's h0, c0 [B, H], or
//   the GRU's bh [G H] (zeros, zeros, b_hn) and h0 [B, H].
// Results: tokens [B, T] int32, the logits after the last token [B, V], and
// per layer h_T (and the LSTM's c_T). A step is L + 1 phases, each ending at
// a barrier: the layers in order (layer 0 draws the step's token first, each
// partition from the same logits and noise, so no phase is spent sharing
// tokens), then the read-out, its 16-column panels shared among the
// partitions. With row groups (run_steps) each thread runs every phase of
// its own rows instead, every partition's share in turn, and meets no other:
// a row's draws, sums and gates read only that row's logits and carries.
ffi::Error Sample(bool gru, ffi::Buffer<ffi::F32>& table, ffi::Buffer<ffi::F32>& w_o,
                  ffi::Buffer<ffi::F32>& b_o, ffi::Buffer<ffi::F32>& logits0,
                  ffi::Buffer<ffi::F32>& noise, ffi::RemainingArgs& layer_args,
                  ffi::ResultBuffer<ffi::S32>& tokens_out, ffi::ResultBuffer<ffi::F32>& logits_out,
                  ffi::RemainingRets& carry_out, int64_t partitions, bool bf16, float temperature,
                  bool int8, int64_t row_groups) {
  const char* kernel = gru ? "gru_sample" : "lstm_sample";
  const std::string name = std::string("seqjax ") + kernel;
  const long G = gru ? 3 : 4, carries = gru ? 1 : 2;  // gates; carry results per layer
  const auto td = table.dimensions(), od = w_o.dimensions(), nd = noise.dimensions();
  const auto ld = logits0.dimensions();
  const long L = static_cast<long>(layer_args.size() / 5);
  if (td.size() != 2 || od.size() != 2 || nd.size() != 3 || ld.size() != 2 || L == 0 ||
      layer_args.size() % 5 || carry_out.size() != static_cast<size_t>(carries * L)) {
    return ffi::Error::InvalidArgument(
        name + (gru ? ": expected table [V,3H], w_o [H,V], logits [B,V], noise [T,B,V], then w_x, "
                      "w_h, b, bh, h0 for each layer, and an h result for each"
                    : ": expected table [V,4H], w_o [H,V], logits [B,V], noise [T,B,V], then w_x, "
                      "w_h, b, h0, c0 for each layer, and h, c results for each"));
  }
  const long V = td[0], H = td[1] / G, T = nd[0], B = nd[1], P = partitions;
  const long Hp = partition_units(H, P), N = G * Hp, Hu = int8 ? quads(H) : units(H, bf16);
  if (td[1] != G * H || od[0] != H || od[1] != V || static_cast<long>(b_o.element_count()) != V ||
      nd[2] != V || ld[0] != B || ld[1] != V || Hp == 0) {
    return ffi::Error::InvalidArgument(
        name + ": table, read-out, logits and noise do not agree on V, H and B, or H does not "
               "split in partitions");
  }
  if (bf16 && !kHaveBf16) return NoBf16(kernel);
  if (int8 && (bf16 || !kHaveInt8)) {
    return ffi::Error::InvalidArgument(
        name + (bf16 ? ": int8 and bf16 both set; choose one"
                     : ": int8 matmuls need AVX512_VNNI, and this build has none (the CPU it "
                       "was built for lacks it)"));
  }
  struct Layer {
    const float *w_x, *w_h, *b, *bh;  // bh: the GRU's
    float *h, *c;  // the results: h_T, and the LSTM's c updated in place
  };
  std::vector<Layer> layers(L);
  std::vector<float> hbuf(L * 2 * B * H);  // each layer's h, two steps' worth
  const size_t carry = B * H, wide = G * H, square = G * H * H;
  auto size = [](const ffi::ErrorOr<ffi::Buffer<ffi::F32>>& a) { return a->element_count(); };
  for (long l = 0; l < L; ++l) {
    auto w_x = layer_args.get<ffi::Buffer<ffi::F32>>(5 * l);
    auto w_h = layer_args.get<ffi::Buffer<ffi::F32>>(5 * l + 1);
    auto b = layer_args.get<ffi::Buffer<ffi::F32>>(5 * l + 2);
    auto fourth = layer_args.get<ffi::Buffer<ffi::F32>>(5 * l + 3);  // LSTM: h0; GRU: bh
    auto fifth = layer_args.get<ffi::Buffer<ffi::F32>>(5 * l + 4);  // LSTM: c0; GRU: h0
    auto h = carry_out.get<ffi::Buffer<ffi::F32>>(carries * l);
    if (!w_x || !w_h || !b || !fourth || !fifth || !h) {
      return ffi::Error::InvalidArgument(name + ": a layer's arrays are not float32");
    }
    const auto& h0 = gru ? fifth : fourth;
    if (size(w_h) != square || (l > 0 && (size(w_x) != square || size(b) != wide)) ||
        size(fourth) != (gru ? wide : carry) || size(fifth) != carry ||
        (*h)->element_count() != carry) {
      return ffi::Error::InvalidArgument(
          name + ": layer " + std::to_string(l) + "'s arrays do not match H: expected " +
          (gru ? "w_x, w_h [H,3H], b, bh [3H], h0 [B,H]" : "w_x, w_h [H,4H], b [4H], h0, c0 [B,H]"));
    }
    layers[l] = {w_x->typed_data(), w_h->typed_data(), b->typed_data(),
                 gru ? fourth->typed_data() : nullptr, (*h)->typed_data(), nullptr};
    if (!gru) {
      auto c = carry_out.get<ffi::Buffer<ffi::F32>>(carries * l + 1);
      if (!c || (*c)->element_count() != carry) {
        return ffi::Error::InvalidArgument(name + ": layer " + std::to_string(l) +
                                           "'s c result is not float32 [B,H]");
      }
      layers[l].c = (*c)->typed_data();
      std::memcpy(layers[l].c, fifth->typed_data(), carry * sizeof(float));
    }
    std::memcpy(hbuf.data() + l * 2 * B * H, h0->typed_data(), carry * sizeof(float));
    if (T == 0) std::memcpy(layers[l].h, h0->typed_data(), carry * sizeof(float));
  }

  // Packed, per partition: each layer's panels (layer 0: w_h's; above it,
  // the LSTM's w_x's over w_h's, one matmul, or w_x's then w_h's for the
  // GRU, whose n gate takes the two sums apart, and for int8, each quantized
  // on its own as the cell's two matmuls are), bias (the GRU's b, then bh),
  // and (int8) the s_w and corrections of w_h, then of w_x ([N / 16, 32]
  // each); then the table's columns [V, G Hp]. After all partitions, the
  // read-out's panels [V16 / 16, H, 16] and bias [V16].
  const bool apart = gru || int8;  // w_x's panels and w_h's, each on their own
  const long biases = gru ? 2 : 1;
  const long V16 = (V + 15) / 16 * 16, panels = V16 / 16;
  // A layer's packed weights: w_h, and past layer 0 w_x too (the table holds layer 0's).
  auto layer_weights = [&](long l) { return (l ? 2 * Hu : Hu) * N; };
  std::vector<long> at(L + 1, 0);  // where each layer's panels start in a partition's block
  for (long l = 0; l < L; ++l) at[l + 1] = at[l] + layer_weights(l) + (biases + 4) * N;
  const long block = at[L] + V * N;
  Scratch packed(P * block + panels * 16 * H + V16);
  float* Wo = packed.data() + P * block;
  float* Bo = Wo + panels * 16 * H;
  auto share = [&](long n, long p) { return n * p / P; };  // p's read-out panels start here
  std::vector<float> logits(B * V16), zbuf(P * (gru ? 2 : 1) * B * N);
  std::vector<float> pairs(bf16 || int8 ? P * B * 2 * Hu : 0);  // row r at r Hu, as the loops
  std::vector<float> row_scales(int8 ? P * B : 0);  // int8: each operand row's s_a
  std::vector<int32_t> drawn(P * B);  // each partition's copy of the step's tokens
  for (long r = 0; r < B; ++r) {
    std::memcpy(logits.data() + r * V16, logits0.typed_data() + r * V, V * sizeof(float));
  }
  const float* NOISE = noise.typed_data();
  int32_t* TOKENS = tokens_out->typed_data();
  const float scale = temperature > 0 ? temperature : 1.f;

  auto pack = [&](long p) {
    float* own = packed.data() + p * block;
    for (long l = 0; l < L; ++l) {
      float* to = own + at[l];
      const long weights = layer_weights(l);
      float* q = to + weights + biases * N;
      if (l == 0) {
        pack_columns(layers[0].w_h, H, nullptr, 0, G, H, Hp, p, bf16, to, int8 ? q : nullptr);
      } else if (apart) {
        pack_columns(layers[l].w_x, H, nullptr, 0, G, H, Hp, p, bf16, to,
                     int8 ? q + 2 * N : nullptr);
        pack_columns(layers[l].w_h, H, nullptr, 0, G, H, Hp, p, bf16, to + Hu * N,
                     int8 ? q : nullptr);
      } else {
        pack_columns(layers[l].w_x, H, layers[l].w_h, H, G, H, Hp, p, bf16, to);
      }
      if (l) pack_bias(layers[l].b, G, H, Hp, p, to + weights);
      if (gru) pack_bias(layers[l].bh, G, H, Hp, p, to + weights + N);
    }
    for (long v = 0; v < V; ++v) pack_bias(table.typed_data() + v * G * H, G, H, Hp, p,
                                           own + at[L] + v * N);
    for (long j = share(panels, p); j < share(panels, p + 1); ++j) {
      const __mmask16 live = first_lanes(V - 16 * j);
      const float* from = w_o.typed_data() + 16 * j;
      panel(H, false, [&](long k) { return _mm512_maskz_loadu_ps(live, from + k * V); },
            Wo + j * 16 * H);
      _mm512_storeu_ps(Bo + 16 * j, _mm512_maskz_loadu_ps(live, b_o.typed_data() + 16 * j));
    }
  };

  // Each row's token: the first largest logit / temperature + noise (NaN
  // counting as largest, as jnp.argmax has it).
  auto draw = [&](long t, long r0, long r1, int32_t* tokens) {
    for (long r = r0; r < r1; ++r) {
      const float* lr = logits.data() + r * V16;
      const float* nr = NOISE + (t * B + r) * V;
      long best = 0;
      float top = lr[0] / scale + nr[0];
      for (long v = 1; v < V && top == top; ++v) {
        const float s = lr[v] / scale + nr[v];
        if (s > top || s != s) top = s, best = v;
      }
      tokens[r] = static_cast<int32_t>(best);
    }
  };

  run_steps(T * (L + 1), P, row_groups, B, pack, [&](long phase_step, long p, long r0, long r1) {
    const long t = phase_step / (L + 1), l = phase_step % (L + 1), rows = r1 - r0;
    const float* own = packed.data() + p * block;
    if (l == L) {  // the read-out: this partition's panels of the rows' logits
      const float* h = hbuf.data() + (L - 1) * 2 * B * H + ((t + 1) & 1) * B * H + r0 * H;
      const long first = share(panels, p), count = share(panels, p + 1) - first;
      if (count) {
        matmul(false, rows, h, H, Wo + first * 16 * H, nullptr, 0, nullptr, 16 * H, 16 * count,
               Bo + 16 * first, logits.data() + r0 * V16 + 16 * first, V16);
      }
      return;
    }
    // z: the LSTM's gate sums; the GRU's input sums, then (zh) its recurrent ones
    float* z = zbuf.data() + p * (gru ? 2 : 1) * B * N;
    float* zh = gru ? z + B * N : z;  // z, zh, the h's, pairs: row r at the batch's row r
    float* hb = hbuf.data() + l * 2 * B * H;
    const float* hin = hb + (t & 1) * B * H;
    float* hnext = hb + ((t + 1) & 1) * B * H;
    const long pair = p * B * 2 * Hu;  // this thread's rows of pairs (bfloat16, int8)
    float* rs = int8 ? row_scales.data() + p * B : nullptr;
    const float* w = own + at[l];
    const long weights = layer_weights(l);
    const float* bias = w + weights;  // layer 0: none, the table's row is the input's sum
    const float* bh = w + weights + N;  // the GRU's
    const float* q = w + weights + biases * N;  // int8: w_h's s_w, then w_x's
    // out = b + a [B, H] w_l (panels Hu deep at w_l; int8: s_w at q_l) for
    // rows r0 to r1 of a, b and out; b's rows ldb apart (0: one row for all).
    auto layer_matmul = [&](const float* a, const float* w_l, const float* q_l, const float* b,
                            long ldb, float* out) {
      a += r0 * H, b += r0 * ldb, out += r0 * N;
      if (int8) {
        const float* a_q = as_quads(rows, a, H, pairs.data() + pair + r0 * Hu, rs + r0);
        matmul<kInt8>(rows, a_q, Hu, w_l, nullptr, 0, nullptr, 16 * Hu, N, b, ldb, q_l, rs + r0,
                      out, N, Hu);
      } else {
        matmul(bf16, rows, operand(bf16, rows, a, H, pairs, pair + r0 * Hu), Hu, w_l, nullptr, 0,
               nullptr, 16 * Hu, N, b, out, N, ldb);
      }
    };
    if (l == 0) {  // draw the token; its row of the table starts the input's sums
      int32_t* tokens = drawn.data() + p * B;
      draw(t, r0, r1, tokens);
      for (long r = r0; r < r1; ++r) {
        std::memcpy(z + r * N, own + at[L] + tokens[r] * N, N * sizeof(float));
        if (p == 0) TOKENS[r * T + t] = tokens[r];
      }
      if (gru) {
        layer_matmul(hin, w, q, bh, 0, zh);
      } else {
        layer_matmul(hin, w, q, z, N, z);
      }
    } else {  // the layer below's new h, then this layer's own
      const float* below = hbuf.data() + (l - 1) * 2 * B * H + ((t + 1) & 1) * B * H;
      if (apart) {  // as the cell: (b + x w_x) + h w_h, or the GRU's two sums
        layer_matmul(below, w, q + 2 * N, bias, 0, z);
        layer_matmul(hin, w + Hu * N, q, gru ? bh : z, gru ? 0 : N, zh);
      } else {
        const float* x = operand(bf16, rows, below + r0 * H, H, pairs, pair + r0 * Hu);
        const float* h_in = operand(bf16, rows, hin + r0 * H, H, pairs, pair + (B + r0) * Hu);
        matmul(bf16, rows, x, Hu, w, h_in, Hu, w + 16 * Hu, 32 * Hu, N, bias, z + r0 * N);
      }
    }
    float* C = layers[l].c;
    for (long r = r0; r < r1; ++r) {
      const float* zr = z + r * N;
      const float* hr = zh + r * N;
      const long off = r * H + p * Hp;
      for (long j = 0; j < Hp; j += 16) {
        __m512 h;
        if (gru) {  // as Gru's step
          const __m512 rg = sigmoid512(_mm512_add_ps(_mm512_loadu_ps(zr + j),
                                                     _mm512_loadu_ps(hr + j)));
          const __m512 zg = sigmoid512(_mm512_add_ps(_mm512_loadu_ps(zr + Hp + j),
                                                     _mm512_loadu_ps(hr + Hp + j)));
          const __m512 n = tanh512(_mm512_fmadd_ps(rg, _mm512_loadu_ps(hr + 2 * Hp + j),
                                                   _mm512_loadu_ps(zr + 2 * Hp + j)));
          const __m512 h_prev = _mm512_loadu_ps(hin + off + j);
          h = _mm512_fmadd_ps(zg, _mm512_sub_ps(h_prev, n), n);  // (1 - z) n + z h
        } else {
          const LstmGates s(zr + j, Hp, _mm512_loadu_ps(C + off + j));
          h = _mm512_mul_ps(s.o, tanh512(s.c));
          _mm512_storeu_ps(C + off + j, s.c);
        }
        _mm512_storeu_ps(hnext + off + j, h);
        if (t + 1 == T) _mm512_storeu_ps(layers[l].h + off + j, h);
      }
    }
  });
  for (long r = 0; r < B; ++r) {
    std::memcpy(logits_out->typed_data() + r * V, logits.data() + r * V16, V * sizeof(float));
  }
  return ffi::Error::Success();
}

// The handlers' functions: Sample for the LSTM, or for the GRU.
template <bool kGru>
ffi::Error SampleImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> w_o,
                      ffi::Buffer<ffi::F32> b_o, ffi::Buffer<ffi::F32> logits0,
                      ffi::Buffer<ffi::F32> noise, ffi::RemainingArgs layer_args,
                      ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logits,
                      ffi::RemainingRets carry, int64_t partitions, bool bf16, float temperature,
                      bool int8, int64_t row_groups) {
  return Sample(kGru, table, w_o, b_o, logits0, noise, layer_args, tokens, logits, carry,
                partitions, bf16, temperature, int8, row_groups);
}

// The plain and the saving forward loops' shared arguments and first
// results; the saving loops' handlers add their saves, then the attribute
// (Attributes()).
auto LstmForwardBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()  // xs
      .Arg<ffi::Buffer<ffi::F32>>()  // w_x
      .Arg<ffi::Buffer<ffi::F32>>()  // w_h
      .Arg<ffi::Buffer<ffi::F32>>()  // b
      .Arg<ffi::Buffer<ffi::F32>>()  // h0
      .Arg<ffi::Buffer<ffi::F32>>()  // c0
      .Arg<ffi::Buffer<ffi::U8>>()   // valid
      .Arg<ffi::Buffer<ffi::U8>>()   // resets
      .Ret<ffi::Buffer<ffi::F32>>()  // ys
      .Ret<ffi::Buffer<ffi::F32>>()  // h_T
      .Ret<ffi::Buffer<ffi::F32>>();  // c_T
}

// Every handler's last: the attributes, the partition count and whether the
// matmuls round their operands to bfloat16.
template <class Binding>
auto Attributes(Binding binding) {
  return std::move(binding).template Attr<int64_t>("partitions").template Attr<bool>("bf16");
}

// The recurrences' loops' attributes: Attributes()'s two, then whether every
// [T, B, ...] sequence they read or write (xs, ys, the saves, dys, dz,
// dh_steps) is [B, T, ...], and the row groups (run_steps; 1: none).
template <class Binding>
auto LoopAttributes(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("partitions")
      .template Attr<bool>("bf16")
      .template Attr<bool>("batch_major")
      .template Attr<int64_t>("row_groups");
}

auto GruForwardBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()  // xs
      .Arg<ffi::Buffer<ffi::F32>>()  // w_x
      .Arg<ffi::Buffer<ffi::F32>>()  // w_h
      .Arg<ffi::Buffer<ffi::F32>>()  // bx
      .Arg<ffi::Buffer<ffi::F32>>()  // bh
      .Arg<ffi::Buffer<ffi::F32>>()  // h0
      .Arg<ffi::Buffer<ffi::U8>>()   // valid
      .Arg<ffi::Buffer<ffi::U8>>()   // resets
      .Ret<ffi::Buffer<ffi::F32>>()  // ys
      .Ret<ffi::Buffer<ffi::F32>>();  // h_T
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmForward, LstmForwardImpl,
                              LoopAttributes(LstmForwardBinding()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmForwardSaving, LstmForwardSavingImpl,
                              LoopAttributes(LstmForwardBinding()
                                              .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                              .Ret<ffi::Buffer<ffi::F32>>()  // ps
                                              .Ret<ffi::Buffer<ffi::F32>>()  // ks
                                              .Ret<ffi::Buffer<ffi::F32>>()));  // fs

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmReverse, LstmReverseImpl,
                              LoopAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dc_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ps
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ks
                                  .Arg<ffi::Buffer<ffi::F32>>()  // fs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh_0
                                  .Ret<ffi::Buffer<ffi::F32>>()));  // dc_0

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruForward, GruForwardImpl,
                              LoopAttributes(GruForwardBinding()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruForwardSaving, GruForwardSavingImpl,
                              LoopAttributes(GruForwardBinding()
                                              .Ret<ffi::Buffer<ffi::F32>>()  // hs
                                              .Ret<ffi::Buffer<ffi::F32>>()  // px
                                              .Ret<ffi::Buffer<ffi::F32>>()  // ph
                                              .Ret<ffi::Buffer<ffi::F32>>()));  // zs

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruReverse, GruReverseImpl,
                              LoopAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ph
                                  .Arg<ffi::Buffer<ffi::F32>>()  // zs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh_steps
                                  .Ret<ffi::Buffer<ffi::F32>>()));  // dh_0

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxOuterSum, OuterSumImpl,
                              Attributes(ffi::Ffi::Bind()
                                             .Arg<ffi::Buffer<ffi::F32>>()  // b
                                             .Arg<ffi::Buffer<ffi::F32>>()  // tiled, or empty
                                             .RemainingArgs()  // the a's
                                             .RemainingRets()));  // b's column sums, each a^T b

// The sampling loops' binding (Sample): per layer, the LSTM's w_x, w_h, b,
// h0, c0 and results h, c; the GRU's w_x, w_h, b, bh, h0 and result h.
auto SampleBinding() {
  return Attributes(ffi::Ffi::Bind()
                        .Arg<ffi::Buffer<ffi::F32>>()  // table
                        .Arg<ffi::Buffer<ffi::F32>>()  // w_o
                        .Arg<ffi::Buffer<ffi::F32>>()  // b_o
                        .Arg<ffi::Buffer<ffi::F32>>()  // logits0
                        .Arg<ffi::Buffer<ffi::F32>>()  // noise
                        .RemainingArgs()  // the layers' arrays
                        .Ret<ffi::Buffer<ffi::S32>>()  // tokens
                        .Ret<ffi::Buffer<ffi::F32>>()  // logits
                        .RemainingRets())  // the layers' carries
      .Attr<float>("temperature")
      .Attr<bool>("int8")
      .Attr<int64_t>("row_groups");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmSample, SampleImpl<false>, SampleBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxGruSample, SampleImpl<true>, SampleBinding());

// The LSTM forward recurrence on CPU, for XLA's FFI (seqjax/native/__init__.py).
//
// XLA:CPU runs each per-step matmul of a lax.scan LSTM on one core; here the
// hidden units are split into P partitions, each owning the 4 gate columns of
// its units, so each partition's step is one small matmul and its own gate
// math, and threads meet once a step (a spin barrier) to exchange h.
//
// Layout: xs [T, B, D]; w [P, D + H, 4 Hp] with the rows of w_x then w_h and,
// inside a partition, the columns of its i, f, g, o blocks (Hp = H / P each);
// b [P, 4 Hp]; h0, c0 [B, H]; valid, resets [T, B] uint8 or empty (absent).
// Semantics: seqjax.fused.lstm_scan without gradients (gates i, f, g, o;
// a reset zeroes the carry before its step; an invalid step holds the carry
// and emits zeros).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x in [-88, 88]: 2^n * e^r, |r| <= ln(2)/2, degree-7 Taylor.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
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

// A persistent pool: the caller plus workers run job(rank) for rank < ranks,
// meeting at barrier() once a step. Workers spin a little after a job, then
// sleep, so they do not take the cores from the rest of the program.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers outlive main()
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  std::mutex& busy() { return busy_; }

  void run(int ranks, const std::function<void(int)>& job) {
    ranks_ = ranks;
    job_ = &job;
    arrived_.store(0);
    done_.store(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job(0);
    while (done_.load(std::memory_order_acquire) != ranks - 1) _mm_pause();
  }

  void barrier() {
    const int ranks = ranks_;
    const uint32_t sense = sense_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == ranks - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      sense_.store(sense + 1, std::memory_order_release);
      return;
    }
    for (long spin = 0; sense_.load(std::memory_order_acquire) == sense; ++spin) {
      if (spin < 4000) _mm_pause(); else std::this_thread::yield();
    }
  }

 private:
  Pool() {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned rank = 1; rank < n; ++rank) workers_.emplace_back([this, rank] { work(rank); });
    for (auto& w : workers_) w.detach();
  }

  void work(int rank) {
    uint64_t seen = 0;
    for (;;) {
      long spin = 0;
      while (generation_.load(std::memory_order_acquire) == seen && spin < 20000) {
        _mm_pause();
        ++spin;
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (rank < ranks_) {
        (*job_)(rank);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> arrived_{0}, done_{0};
  std::atomic<uint32_t> sense_{0};
  int ranks_ = 1;
  const std::function<void(int)>* job_ = nullptr;
};

constexpr long kRows = 8;   // rows of the register tile
constexpr long kCols = 32;  // columns of the register tile: two zmm

// z[0:M, 0:32] = b + x_t w_x + h w_h for M rows (<= kRows) of one
// partition's 32 columns; M is a template argument so the accumulators stay
// in registers.
template <int M>
void tile(const float* x, long D, const float* h, long H, const float* w, long N,
          const float* b, float* z) {
  __m512 acc[M][2];
  const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) acc[i][0] = b0, acc[i][1] = b1;
  for (long k = 0; k < D; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w + k * N), w1 = _mm512_loadu_ps(w + k * N + 16);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * D + k]);
      acc[i][0] = _mm512_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, w1, acc[i][1]);
    }
  }
  w += D * N;
  for (long k = 0; k < H; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w + k * N), w1 = _mm512_loadu_ps(w + k * N + 16);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 a = _mm512_set1_ps(h[i * H + k]);
      acc[i][0] = _mm512_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, w1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    _mm512_storeu_ps(z + i * N, acc[i][0]);
    _mm512_storeu_ps(z + i * N + 16, acc[i][1]);
  }
}

using Tile = void (*)(const float*, long, const float*, long, const float*, long, const float*,
                      float*);
constexpr Tile kTiles[kRows + 1] = {nullptr,  tile<1>, tile<2>, tile<3>, tile<4>,
                                    tile<5>,  tile<6>, tile<7>, tile<8>};

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::U8> valid,
                           ffi::Buffer<ffi::U8> resets, ffi::ResultBuffer<ffi::F32> ys,
                           ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> c_out) {
  const auto xd = xs.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3 || h0.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("seqjax lstm_forward: expected xs [T,B,D], w [P,K,N], h0 [B,H]");
  }
  const long T = xd[0], B = xd[1], D = xd[2], P = wd[0], K = wd[1], N = wd[2];
  const long H = h0.dimensions()[1], Hp = H / P;
  if (K != D + H || N != 4 * Hp || Hp * P != H || Hp % 16 != 0) {
    return ffi::Error::InvalidArgument("seqjax lstm_forward: packed weights do not match D, H");
  }
  const bool has_valid = valid.element_count() != 0, has_resets = resets.element_count() != 0;
  const float* X = xs.typed_data();
  const float* W = w.typed_data();
  const float* Bias = b.typed_data();
  const uint8_t* V = valid.typed_data();
  const uint8_t* R = resets.typed_data();
  float* Y = ys->typed_data();
  float* C = c_out->typed_data();  // the cell state lives here, updated in place
  std::vector<float> hbuf(2 * B * H), zbuf(P * B * N);
  // The reset of step 0 applies to the initial carry.
  for (long r = 0; r < B; ++r) {
    const bool zero = has_resets && R[r];
    for (long j = 0; j < H; ++j) {
      hbuf[r * H + j] = zero ? 0.f : h0.typed_data()[r * H + j];
      C[r * H + j] = zero ? 0.f : c0.typed_data()[r * H + j];
    }
  }
  if (T == 0) {
    std::memcpy(h_out->typed_data(), hbuf.data(), B * H * sizeof(float));
    return ffi::Error::Success();
  }

  Pool& pool = Pool::get();
  std::unique_lock<std::mutex> lock(pool.busy(), std::try_to_lock);  // busy: run alone
  const long ranks = lock.owns_lock() ? std::min<long>(P, pool.size()) : 1;

  auto job = [&](int rank) {
    for (long t = 0; t < T; ++t) {
      const float* hin = hbuf.data() + (t & 1) * B * H;
      float* hnext = hbuf.data() + ((t + 1) & 1) * B * H;
      const float* xt = X + t * B * D;
      for (long p = rank; p < P; p += ranks) {
        const float* wp = W + p * K * N;
        float* z = zbuf.data() + p * B * N;
        for (long n0 = 0; n0 < N; n0 += kCols) {
          for (long r0 = 0; r0 < B; r0 += kRows) {
            kTiles[std::min(kRows, B - r0)](xt + r0 * D, D, hin + r0 * H, H, wp + n0, N,
                                            Bias + p * N + n0, z + r0 * N + n0);
          }
        }
        for (long r = 0; r < B; ++r) {
          const float* zr = z + r * N;
          const long off = r * H + p * Hp;
          const bool live = !has_valid || V[t * B + r];
          const bool reset_next = has_resets && t + 1 < T && R[(t + 1) * B + r];
          for (long j = 0; j < Hp; j += 16) {
            __m512 c = _mm512_loadu_ps(C + off + j), h = _mm512_loadu_ps(hin + off + j);
            __m512 y = _mm512_setzero_ps();
            if (live) {
              const __m512 i = sigmoid512(_mm512_loadu_ps(zr + j));
              const __m512 f = sigmoid512(_mm512_loadu_ps(zr + Hp + j));
              const __m512 g = tanh512(_mm512_loadu_ps(zr + 2 * Hp + j));
              const __m512 o = sigmoid512(_mm512_loadu_ps(zr + 3 * Hp + j));
              c = _mm512_add_ps(_mm512_mul_ps(f, c), _mm512_mul_ps(i, g));
              h = y = _mm512_mul_ps(o, tanh512(c));
            }
            _mm512_storeu_ps(Y + t * B * H + off + j, y);
            if (t + 1 == T) _mm512_storeu_ps(h_out->typed_data() + off + j, h);
            if (reset_next) h = c = _mm512_setzero_ps();
            _mm512_storeu_ps(C + off + j, c);
            _mm512_storeu_ps(hnext + off + j, h);
          }
        }
      }
      if (ranks > 1) pool.barrier();
    }
  };
  if (ranks == 1) {
    job(0);
  } else {
    pool.run(static_cast<int>(ranks), job);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::U8>>()   // valid
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c_T

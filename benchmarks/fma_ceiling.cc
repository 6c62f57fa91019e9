// The cores' float32 ceiling, for benchmarks/common.py (fma_ceiling_run):
// every thread a loop of independent fused multiply-adds as wide as this CPU's
// vectors (built with -march=native, as seqjax/native is), nothing else, so
// no matmul, however well written, multiplies faster on these cores. A
// benchmark quotes each contender's FLOP rate as a fraction of it, and what a
// speed target asks as the fraction it would need.
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float first(Vec v) { return _mm512_cvtss_f32(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float first(Vec v) { return _mm256_cvtss_f32(v); }
#else  // no x86 vectors: scalar fmaf, a floor rather than the ceiling
using Vec = float;
constexpr int kLanes = 1;
inline Vec splat(float x) { return x; }
inline Vec fma(Vec a, Vec b, Vec c) { return __builtin_fmaf(a, b, c); }
inline float first(Vec v) { return v; }
#endif

namespace {

// Independent accumulators: enough to keep two FMA pipes busy through a
// latency of 4-6 cycles, few enough to stay in 16 registers beside the two
// constants (AVX2 has 16).
constexpr int kChains = 12;

// Not inlined: inlined into seqjax_fma_flops, GCC 12 at -O3 stored all the
// accumulators to the stack every iteration (a third of the rate).
__attribute__((noinline)) float chains(long iterations) {
  Vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = splat(1e-3f * static_cast<float>(i));
  const Vec a = splat(0.999f), b = splat(1e-4f);  // stays finite however long it runs
  for (long k = 0; k < iterations; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = fma(acc[i], a, b);
  }
  float sum = 0.f;
  for (int i = 0; i < kChains; ++i) sum += first(acc[i]);
  return sum;
}

}  // namespace

extern "C" {

// Runs `iterations` rounds of the chains on each of `threads` threads (the
// caller one of them) and returns the FLOPs done (a multiply-add counts 2).
double seqjax_fma_flops(int threads, long iterations) {
  std::vector<float> sums(threads > 0 ? threads : 1);
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back([&, t] { sums[t] = chains(iterations); });
  sums[0] = chains(iterations);
  for (auto& w : workers) w.join();
  volatile float sink = 0.f;  // the sums are used: the loops stay
  for (const float s : sums) sink = sink + s;
  return 2.0 * kChains * kLanes * static_cast<double>(iterations) * static_cast<int>(sums.size());
}

}  // extern "C"

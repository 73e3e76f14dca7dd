// Peak instruction throughput of the two bf16/fp32 multiply-accumulate instructions the CPU kernels can use, on
// one core: vfmadd231ps zmm (16 fp32 MACs) and vdpbf16ps zmm (32 bf16 MACs into 16 fp32 lanes). Twelve independent
// accumulator chains hide the latencies, so the loop runs at the ports' throughput. Used to decide whether a
// vdpbf16ps kernel can beat the fp32-FMA kernels on a CPU (it needs > 0.5 vdpbf16ps per FMA to do so).
//
//   g++ -O2 -march=native scripts/cpu_isa_probe.cpp -o cpu_isa_probe && ./cpu_isa_probe
#include <immintrin.h>

#include <cstdio>
#include <ctime>

static double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

__attribute__((noinline)) float fma_loop(long n) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
    asm volatile("" : "+v"(x));  // keeps the loop from being folded
  }
  float s = 0.f;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}

#if defined(__AVX512BF16__)
__attribute__((noinline)) float dpbf16_loop(long n) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    asm volatile("" : "+v"(x));
  }
  float s = 0.f;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}
#endif

int main() {
  const long n = 200000000 / 12;
  double t = cpu_seconds();
  float sink = fma_loop(n);
  const double fma = n * 12 / (cpu_seconds() - t) / 1e9;
  std::printf("vfmadd231ps zmm: %.2f G/s = %.0f GFLOP/s fp32 per core\n", fma, fma * 32);
#if defined(__AVX512BF16__)
  t = cpu_seconds();
  sink += dpbf16_loop(n);
  const double dp = n * 12 / (cpu_seconds() - t) / 1e9;
  std::printf("vdpbf16ps zmm:   %.2f G/s = %.0f GFLOP/s bf16 per core (%.2f per FMA)\n", dp, dp * 64, dp / fma);
#else
  std::printf("vdpbf16ps: not available (no AVX512-BF16 at compile time)\n");
#endif
  return sink == 1234.5f;  // use the results
}

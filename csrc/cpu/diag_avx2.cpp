// The AVX2 + FMA variant (Haswell and later Intel, Zen 1-3 AMD, 256-bit vectors): the width-generic kernels of
// diag_vec.h with 8-lane vectors. Tiles fit the 16 ymm registers: gather/scatter 4 tokens x 3 vectors (12
// accumulators + 3 value vectors; the activation operand folds into the FMA), sddmm 4 diagonals x 3 vectors.
// The target pragma comes before every include, so only this translation unit uses AVX2; diag_cpu.cpp calls in
// only when the CPU has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include <immintrin.h>

#define DD_VARIANT avx2
#include "diag_vec.h"

namespace dynadiag {
namespace avx2 {
namespace {

#ifndef DD_AVX2_NB
#define DD_AVX2_NB 4
#endif
#ifndef DD_AVX2_TV
#define DD_AVX2_TV 3
#endif
#ifndef DD_AVX2_KB
#define DD_AVX2_KB 4
#endif

struct Avx2 {
  using v = __m256;
  static constexpr int L = 8, NB = DD_AVX2_NB, TV = DD_AVX2_TV, KB = DD_AVX2_KB;
  static inline v zero() { return _mm256_setzero_ps(); }
  static inline v load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, v x) { _mm256_storeu_ps(p, x); }
  static inline v fmadd(v a, v b, v c) { return _mm256_fmadd_ps(a, b, c); }
  static inline v add(v a, v b) { return _mm256_add_ps(a, b); }
};

const Variant kVariant{"avx2", 1, &Entry<Avx2>::gather, &Entry<Avx2>::scatter, &Entry<Avx2>::sddmm};

}  // namespace
}  // namespace avx2
}  // namespace dynadiag

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dynadiag {
const Variant* variant_avx2() { return &avx2::kVariant; }
}  // namespace dynadiag

#else  // not x86-64 (or not GCC/clang): no AVX2 variant

#include "diag_isa.h"

namespace dynadiag {
const Variant* variant_avx2() { return nullptr; }
}  // namespace dynadiag

#endif

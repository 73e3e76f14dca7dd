// The AVX2 + FMA variant (Haswell and later Intel, Zen 1-3 AMD, 256-bit vectors): the width-generic kernels of
// diag_vec.h (and, opt-in, the feature-major ones of diag_vec_fm.h) with 8-lane vectors. Tiles fit the 16 ymm registers: gather/scatter 4 tokens x 3 vectors (12
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
#include "diag_vec_fm.h"

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
#ifndef DD_AVX2_FM_R
#define DD_AVX2_FM_R 4
#endif
#ifndef DD_AVX2_FM_TV
#define DD_AVX2_FM_TV 3
#endif
#ifndef DD_AVX2_FM_MIN
#define DD_AVX2_FM_MIN INT64_MAX
#endif

struct Avx2 {
  using v = __m256;
  static constexpr int L = 8, NB = DD_AVX2_NB, TV = DD_AVX2_TV, KB = DD_AVX2_KB;
  static inline v zero() { return _mm256_setzero_ps(); }
  static inline v load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, v x) { _mm256_storeu_ps(p, x); }
  static inline v fmadd(v a, v b, v c) { return _mm256_fmadd_ps(a, b, c); }
  static inline v add(v a, v b) { return _mm256_add_ps(a, b); }
  static inline v set1(float x) { return _mm256_set1_ps(x); }
  // Feature-major gather/scatter (diag_vec_fm.h): 4 output rows x 3 vectors of 8 tokens. Opt-in
  // (DYNADIAG_CPU_LAYOUT=fm): on a Zen 5 core running this AVX2 code it was slower than the token-major tiles in
  // nearly every case (by up to a third; 197 and 1,576 tokens, ViT-B shapes, 90 %), whose 32-byte loads split a
  // cache line less often than AVX-512's; a core with fewer load ports may rank them the other way, so both stay
  // tested.
  static constexpr bool kFm = true;
  static constexpr int FM_R = DD_AVX2_FM_R, FM_TV = DD_AVX2_FM_TV;
  static constexpr int64_t FM_L1 = 24576, FM_MIN_TOKENS = DD_AVX2_FM_MIN;
  static inline void transpose(v r[8]) {  // r[i] holds row i on entry, column i on exit
    const v t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const v t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const v t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const v t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const v s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const v s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const v s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const v s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
  }
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

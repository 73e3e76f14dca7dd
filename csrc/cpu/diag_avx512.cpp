// The AVX-512 variant (F/BW/VL/DQ: Skylake-X and later Intel, Zen 4 and later AMD): gather/scatter in the
// feature-major layout of diag_fm.h from 96 tokens up, else the token-major tiles of diag_kernels.h, which also
// hold the sddmm. The target pragma comes before every include, so the whole translation unit is compiled for
// AVX-512 while the rest of the library stays baseline x86-64; diag_cpu.cpp calls in only when the CPU has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

#include "diag_isa.h"
#include "diag_kernels.h"
#include "diag_fm.h"

namespace dynadiag {
namespace avx512 {
namespace {

// Measured rule (ViT-B shapes at 90 %, 1 thread, fp32 geomean vs dense, under load): token-major wins below ~100
// tokens (16: 1.99x vs 1.55x, 64: 2.37x vs 2.27x: a partly empty 48-token block and the transposes do not pay
// off), feature-major from there on (128: 2.80x vs 2.43x, 197: 3.08x vs 2.83x, 1,576: 3.67x vs 2.76x).
bool feature_major(Layout layout, int64_t N) {
  return layout == Layout::automatic ? N >= 96 : layout == Layout::feature_major;
}

template <class E>
void gather_t(const void* z, int64_t N, int64_t P, const void* V, const int64_t* off, int64_t K, int64_t D, void* out,
              const float* bias, Layout layout) {
  using T = typename E::T;
  const T* zp = static_cast<const T*>(z);
  const T* vp = static_cast<const T*>(V);
  T* op = static_cast<T*>(out);
  if (feature_major(layout, N)) return gather_fm<E>(zp, N, P, vp, off, K, D, op, bias);
  gather_avx512<E>(zp, N, P, vp, off, K, D, op, bias);
}

template <class E>
void scatter_t(const void* z, int64_t N, int64_t D, const void* V, const int64_t* off, int64_t K, int64_t P,
               void* out, const float* bias, Layout layout) {
  using T = typename E::T;
  const T* zp = static_cast<const T*>(z);
  const T* vp = static_cast<const T*>(V);
  T* op = static_cast<T*>(out);
  if (feature_major(layout, N)) return scatter_fm<E>(zp, N, D, vp, off, K, P, op, bias);
  scatter_avx512<E>(zp, N, D, vp, off, K, P, op, bias);
}

void gather(Elem e, const void* z, int64_t N, int64_t P, const void* V, const int64_t* off, int64_t K, int64_t D,
            void* out, const float* bias, Layout layout) {
  if (e == Elem::f32) return gather_t<F32>(z, N, P, V, off, K, D, out, bias, layout);
  gather_t<BF16>(z, N, P, V, off, K, D, out, bias, layout);
}

void scatter(Elem e, const void* z, int64_t N, int64_t D, const void* V, const int64_t* off, int64_t K, int64_t P,
             void* out, const float* bias, Layout layout) {
  if (e == Elem::f32) return scatter_t<F32>(z, N, D, V, off, K, P, out, bias, layout);
  scatter_t<BF16>(z, N, D, V, off, K, P, out, bias, layout);
}

void sddmm(Elem e, const void* a, const void* b, int64_t N, int64_t D, int64_t P, const int64_t* off, int64_t K,
           void* dv) {
  if (e == Elem::f32)
    return sddmm_avx512<F32>(static_cast<const float*>(a), static_cast<const float*>(b), N, D, P, off, K,
                             static_cast<float*>(dv));
  using T = BF16::T;
  sddmm_avx512<BF16>(static_cast<const T*>(a), static_cast<const T*>(b), N, D, P, off, K, static_cast<T*>(dv));
}

const Variant kVariant{"avx512", 16, &gather, &scatter, &sddmm};

}  // namespace
}  // namespace avx512
}  // namespace dynadiag

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dynadiag {
const Variant* variant_avx512() { return &avx512::kVariant; }
}  // namespace dynadiag

#else  // not x86-64 (or not GCC/clang): no AVX-512 variant

#include "diag_isa.h"

namespace dynadiag {
const Variant* variant_avx512() { return nullptr; }
}  // namespace dynadiag

#endif

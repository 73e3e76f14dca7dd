// The portable variant: the width-generic kernels of diag_vec.h on the compiler's own 4-lane float vectors (GCC and
// clang vector extensions), compiled for the baseline of whatever architecture builds it: SSE2 on any x86-64, NEON
// on ARM64, and so on, with no ISA intrinsics. Every CPU without a faster variant runs this, not scalar loops.
// Tiles fit 16 vector registers: 4 tokens x 3 vectors (gather/scatter), 4 diagonals x 3 vectors (sddmm).
#define DD_VARIANT portable
#include "diag_vec_fm.h"

namespace dynadiag {
namespace portable {
namespace {

struct Portable {
  typedef float v __attribute__((vector_size(16)));
  static constexpr int L = 4, NB = 4, TV = 3, KB = 4;
  static inline v zero() { return v{0.f, 0.f, 0.f, 0.f}; }
  static inline v load(const float* p) {
    v x;
    std::memcpy(&x, p, sizeof(v));  // an unaligned vector load
    return x;
  }
  static inline void store(float* p, v x) { std::memcpy(p, &x, sizeof(v)); }
  static inline v fmadd(v a, v b, v c) { return a * b + c; }  // fused where the target has FMA
  static inline v add(v a, v b) { return a + b; }
  static constexpr bool kFm = false;  // token-major only (no portable in-register transpose)
};

const Variant kVariant{"portable", 1, &Entry<Portable>::gather, &Entry<Portable>::scatter, &Entry<Portable>::sddmm};

}  // namespace
}  // namespace portable

const Variant* variant_portable() { return &portable::kVariant; }

}  // namespace dynadiag

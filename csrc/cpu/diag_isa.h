// One CPU kernel variant's entry points, compiled per instruction set in its own translation unit
// (diag_avx512.cpp, diag_avx2.cpp, diag_portable.cpp) and chosen at run time by diag_cpu.cpp.
//
// Each variant TU sets its target ISA with `#pragma GCC target` before any include and keeps all its code in its
// own namespace (dynadiag::avx512, dynadiag::avx2, dynadiag::portable), so one library holds every variant, is
// built with the same flags on any x86-64 machine, and never runs an instruction the CPU lacks. The primitives
// (see diag_kernels.h for the index maps) take fp32 or bf16 storage (Elem) and accumulate in fp32:
//
//   gather  G: out[n, t] = sum_k V[k, t] * z[n, (t + p_k) % P]            z [N, P] -> out [N, D]
//   scatter T: out[n, (t + p_k) % P] += V[k, t] * z[n, t]                 z [N, D] -> out [N, P]
//   sddmm   S: dV[k, t] = sum_n a[n, t] * b[n, (t + p_k) % P]             a [N, D], b [N, P] -> dV [K, D]
//
// `bias` (fp32, or null) is added to every output row; the caller pads it with zeros to a whole number of
// 64-wide tiles plus 64, so tile loads past the last output stay in bounds.
#pragma once

#include <cstdint>

namespace dynadiag {

enum class Elem : int { f32 = 0, bf16 = 1 };  // bf16 storage is c10::BFloat16 (one uint16_t)

// Which gather/scatter loop order a variant uses (variants with one layout ignore it).
enum class Layout : int { automatic = 0, token_major = 1, feature_major = 2 };

struct Variant {
  const char* name;
  int64_t min_P;  // smaller P (one window would wrap twice) goes to the portable variant
  void (*gather)(Elem e, const void* z, int64_t N, int64_t P, const void* V, const int64_t* off, int64_t K, int64_t D,
                 void* out, const float* bias, Layout layout);
  void (*scatter)(Elem e, const void* z, int64_t N, int64_t D, const void* V, const int64_t* off, int64_t K,
                  int64_t P, void* out, const float* bias, Layout layout);
  void (*sddmm)(Elem e, const void* a, const void* b, int64_t N, int64_t D, int64_t P, const int64_t* off, int64_t K,
                void* dv);
};

// nullptr where the variant is not compiled (the x86 ones on other architectures).
const Variant* variant_avx512();
const Variant* variant_avx2();
const Variant* variant_portable();

}  // namespace dynadiag

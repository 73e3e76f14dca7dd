// Scalar loops for the three primitives of diag_isa.h: any dtype (fp64 for gradcheck, fp16), any size, accumulated
// in opmath (fp32/fp64). fp32 and bf16 run the vectorized variants instead unless DYNADIAG_CPU_ISA=scalar.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dynadiag {


template <typename T>
void gather_scalar(const T* z, int64_t N, int64_t P, const T* V, const int64_t* off, int64_t K, int64_t D, T* out,
                   const at::opmath_type<T>* bias = nullptr) {
  using Acc = at::opmath_type<T>;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<Acc> acc(D);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      const T* zr = z + n * P;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = off[k];
        const T* vr = V + k * D;
        for (int64_t t = 0; t < D; ++t) {
          int64_t j = t + p;
          j = j >= P ? j - P : j;
          acc[t] += Acc(vr[t]) * Acc(zr[j]);
        }
      }
      for (int64_t t = 0; t < D; ++t) out[n * D + t] = T(bias ? acc[t] + bias[t] : acc[t]);
    }
  });
}

template <typename T>
void scatter_scalar(const T* z, int64_t N, int64_t D, const T* V, const int64_t* off, int64_t K, int64_t P, T* out,
                    const at::opmath_type<T>* bias = nullptr) {
  using Acc = at::opmath_type<T>;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<Acc> acc(P);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      const T* zr = z + n * D;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = off[k];
        const T* vr = V + k * D;
        for (int64_t t = 0; t < D; ++t) {
          int64_t r = t + p;
          r = r >= P ? r - P : r;
          acc[r] += Acc(vr[t]) * Acc(zr[t]);
        }
      }
      for (int64_t r = 0; r < P; ++r) out[n * P + r] = T(bias ? acc[r] + bias[r] : acc[r]);
    }
  });
}

template <typename T>
void sddmm_scalar(const T* a, const T* b, int64_t N, int64_t D, int64_t P, const int64_t* off, int64_t K, T* dv) {
  using Acc = at::opmath_type<T>;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<Acc> acc(D);
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      const int64_t p = off[k];
      for (int64_t n = 0; n < N; ++n) {
        const T* ar = a + n * D;
        const T* br = b + n * P;
        for (int64_t t = 0; t < D; ++t) {
          int64_t j = t + p;
          j = j >= P ? j - P : j;
          acc[t] += Acc(ar[t]) * Acc(br[j]);
        }
      }
      for (int64_t t = 0; t < D; ++t) dv[k * D + t] = T(acc[t]);
    }
  });
}

}  // namespace dynadiag

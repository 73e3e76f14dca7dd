// Width-generic kernels for the primitives of diag_isa.h, written against a small vector-traits class so the same
// loops compile to AVX2 + FMA (diag_avx2.cpp, 8 lanes) and to plain compiler vectors on any architecture
// (diag_portable.cpp, 4 lanes: SSE2 on x86-64, NEON on ARM). The including file defines DD_VARIANT (the namespace
// this copy lives in) and passes a traits class `Vec` with:
//
//   using v = <vector of L floats>;  L, NB, TV, KB (tile sizes);  zero(), load(p), store(p, x), fmadd(a, b, c), add
//
// Loop orders (the token-major design of diag_kernels.h at any vector width):
//   gather/scatter: a register tile of NB tokens x TV vectors of outputs sums over the diagonals that reach it.
//     The diagonals' value windows are packed tile-major once per call (fp32, zeros where a diagonal has no
//     element), and each thread stages its NB token rows once in fp32 with a wrap-around copy and zeros outside
//     the valid columns, so the hot loop is plain loads and FMAs: no masks, no wrap tests, no bf16 widening.
//   sddmm: a register tile of KB diagonals x TV vectors sums over a chunk of staged token rows.
// Any P >= 1 works: staging repeats the row as often as a window needs.
#pragma once

#include <ATen/Parallel.h>

#include "diag_isa.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#ifndef DD_VARIANT
#error "define DD_VARIANT (the variant's namespace) before including diag_vec.h"
#endif

namespace dynadiag {
namespace DD_VARIANT {

// Element traits: storage <-> fp32 one value at a time (the loops that use them vectorize).
struct F32 {
  using T = float;
  static inline float get(T v) { return v; }
  static inline T put(float f) { return f; }
};

struct BF16 {
  using T = uint16_t;  // c10::BFloat16's bits
  static inline float get(T h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline T put(float f) {  // round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<T>((u >> 16) | 0x40u);
    return static_cast<T>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<float, AlignedFree>;

inline Scratch alloc_scratch(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
  return Scratch(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// dst[r, j] for j < P + W: z[r, j mod P] if (j mod P) < zvalid else 0, in fp32.
template <class E>
inline void stage_rows(const typename E::T* z, int64_t ldz, int64_t rows, int64_t P, int64_t zvalid, float* dst,
                       int64_t ld, int64_t W) {
  const int64_t valid = std::min(P, zvalid);
  for (int64_t r = 0; r < rows; ++r) {
    const typename E::T* src = z + r * ldz;
    float* d = dst + r * ld;
    for (int64_t j = 0; j < valid; ++j) d[j] = E::get(src[j]);
    for (int64_t j = valid; j < P; ++j) d[j] = 0.f;
    for (int64_t j = P; j < P + W; ++j) d[j] = d[j - P];  // sequential: a window longer than P wraps again
  }
}

// ----- gather and scatter: one tile kernel over packed value windows -----
//   gather  (G): s0 = (o0 + p_k) mod P, vals = V[k, o0 + i] (0 past D), z valid on all of P.
//   scatter (T): s0 = (o0 - p_k) mod P, vals = V[k, s] for s = (s0 + i) mod P < D else 0, z valid on [0, D);
//                windows that miss the diagonal entirely are dropped (tall/wide shapes keep ~D/P of them).
struct PackedWindows {
  int64_t n_tiles = 0, K = 0;
  Scratch vals;                    // [n_tiles, K, W] fp32
  std::unique_ptr<int64_t[]> s0;   // [n_tiles, K]
  std::unique_ptr<int64_t[]> cnt;  // [n_tiles]
};

template <class E>
PackedWindows pack_windows(const typename E::T* V, const int64_t* off, int64_t K, int64_t D, int64_t P, int64_t n_out,
                           bool scatter, int64_t W) {
  PackedWindows pw;
  pw.n_tiles = (n_out + W - 1) / W;
  pw.K = K;
  pw.vals = alloc_scratch(pw.n_tiles * K * W + 1);
  pw.s0.reset(new int64_t[pw.n_tiles * K + 1]);
  pw.cnt.reset(new int64_t[pw.n_tiles]);
  at::parallel_for(0, pw.n_tiles, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o0 = j * W;
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k) {
        float* dst = pw.vals.get() + (j * K + c) * W;
        const typename E::T* vr = V + k * D;
        int64_t s0;
        if (!scatter) {
          s0 = (o0 + off[k]) % P;
          for (int64_t i = 0; i < W; ++i) dst[i] = o0 + i < D ? E::get(vr[o0 + i]) : 0.f;
        } else {
          s0 = ((o0 - off[k]) % P + P) % P;
          bool any = false;
          int64_t s = s0;
          for (int64_t i = 0; i < W; ++i, ++s) {
            while (s >= P) s -= P;
            const bool ok = s < D && o0 + i < n_out;
            dst[i] = ok ? E::get(vr[s]) : 0.f;
            any = any || ok;
          }
          if (!any) continue;
        }
        pw.s0[j * K + c] = s0;
        ++c;
      }
      pw.cnt[j] = c;
    }
  });
  return pw;
}

template <class Vec, class E, int NB>
inline void window_tile(const float* zs, int64_t ld, const float* vals, const int64_t* s0s, int64_t cnt,
                        typename E::T* out, int64_t ldo, int64_t o0, int64_t n_out, const float* bias) {
  using v = typename Vec::v;
  constexpr int L = Vec::L, TV = Vec::TV, W = L * TV;
  v acc[NB][TV];
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) acc[n][t] = Vec::zero();
  for (int64_t e = 0; e < cnt; ++e) {
    const float* vr = vals + e * W;
    const float* zr = zs + s0s[e];
    v w[TV];
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) w[t] = Vec::load(vr + L * t);
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) acc[n][t] = Vec::fmadd(w[t], Vec::load(zr + n * ld + L * t), acc[n][t]);
  }
  if (bias != nullptr) {  // the caller pads bias past the last tile
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) {
      const v b = Vec::load(bias + o0 + L * t);
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n) acc[n][t] = Vec::add(acc[n][t], b);
    }
  }
  const int64_t cols = std::min<int64_t>(W, n_out - o0);
  for (int n = 0; n < NB; ++n) {
    typename E::T* o = out + n * ldo + o0;
    if (std::is_same<E, F32>::value && cols == W) {
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) Vec::store(reinterpret_cast<float*>(o) + L * t, acc[n][t]);
    } else {
      alignas(64) float buf[W];
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) Vec::store(buf + L * t, acc[n][t]);
      for (int64_t i = 0; i < cols; ++i) o[i] = E::put(buf[i]);
    }
  }
}

// All (token block, output tile) pairs, token-block-major: a thread stages a token block once and sweeps every
// output tile with it. Remainder tokens use one-token tiles.
template <class Vec, class E>
void run_windows(const typename E::T* z, int64_t N, int64_t ldz, int64_t P, int64_t zvalid, const PackedWindows& pw,
                 typename E::T* out, int64_t n_out, const float* bias) {
  constexpr int NB = Vec::NB, W = Vec::L * Vec::TV;
  const int64_t n_tiles = pw.n_tiles;
  const int64_t n_blocks = N / NB;
  const int64_t rem = N - n_blocks * NB;
  const int64_t ld = ((P + W + 15) / 16) * 16 + 16;  // +16: rows do not all start on the same 4 KiB alias
  at::parallel_for(0, (n_blocks + rem) * n_tiles, 1, [&](int64_t i0, int64_t i1) {
    Scratch zs = alloc_scratch(NB * ld);
    int64_t staged = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_tiles, j = i % n_tiles;
      const bool full = b < n_blocks;
      const int64_t n_first = full ? b * NB : n_blocks * NB + (b - n_blocks);
      if (b != staged) {
        stage_rows<E>(z + n_first * ldz, ldz, full ? NB : 1, P, zvalid, zs.get(), ld, W);
        staged = b;
      }
      const float* vals = pw.vals.get() + j * pw.K * W;
      const int64_t* s0s = pw.s0.get() + j * pw.K;
      typename E::T* o = out + n_first * n_out;
      if (full)
        window_tile<Vec, E, NB>(zs.get(), ld, vals, s0s, pw.cnt[j], o, n_out, j * W, n_out, bias);
      else
        window_tile<Vec, E, 1>(zs.get(), ld, vals, s0s, pw.cnt[j], o, n_out, j * W, n_out, bias);
    }
  });
}

template <class Vec, class E>
void gather_vec(const typename E::T* z, int64_t N, int64_t P, const typename E::T* V, const int64_t* off, int64_t K,
                int64_t D, typename E::T* out, const float* bias) {
  const PackedWindows pw = pack_windows<E>(V, off, K, D, P, D, /*scatter=*/false, Vec::L * Vec::TV);
  run_windows<Vec, E>(z, N, P, P, P, pw, out, D, bias);
}

template <class Vec, class E>
void scatter_vec(const typename E::T* z, int64_t N, int64_t D, const typename E::T* V, const int64_t* off, int64_t K,
                 int64_t P, typename E::T* out, const float* bias) {
  const PackedWindows pw = pack_windows<E>(V, off, K, D, P, P, /*scatter=*/true, Vec::L * Vec::TV);
  run_windows<Vec, E>(z, N, D, P, D, pw, out, P, bias);
}

// ----- sddmm S: dV[k, t] = sum_n a[n, t] b[n, (t + p_k) % P]; tile = KB diagonals x TV vectors -----
// Tokens go in chunks of NC rows, staged once per thread in fp32 (a zero-padded to whole tiles, b with its
// wrap-around copy); the fp32 partial sums live in `acc_buf` [K, Dp] between chunks.
constexpr int64_t kNC = 64;

template <class Vec, int KB>
inline void sddmm_tile(const float* as, int64_t lda, const float* bs, int64_t ldb, int64_t rows, int64_t P,
                       const int64_t* off, int64_t k0, int64_t t0, float* acc_buf, int64_t Dp, bool first) {
  using v = typename Vec::v;
  constexpr int L = Vec::L, TV = Vec::TV;
  v acc[KB][TV];
  const float* bk[KB];
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk) {
    int64_t s = (t0 + off[k0 + kk]) % P;
    bk[kk] = bs + s;
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t)
      acc[kk][t] = first ? Vec::zero() : Vec::load(acc_buf + (k0 + kk) * Dp + t0 + L * t);
  }
  for (int64_t n = 0; n < rows; ++n) {
    const float* ar = as + n * lda + t0;
    v x[TV];
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) x[t] = Vec::load(ar + L * t);
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) acc[kk][t] = Vec::fmadd(x[t], Vec::load(bk[kk] + n * ldb + L * t), acc[kk][t]);
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) Vec::store(acc_buf + (k0 + kk) * Dp + t0 + L * t, acc[kk][t]);
}

template <class Vec, class E>
void sddmm_vec(const typename E::T* a, const typename E::T* b, int64_t N, int64_t D, int64_t P, const int64_t* off,
               int64_t K, typename E::T* dv) {
  constexpr int KB = Vec::KB, W = Vec::L * Vec::TV;
  const int64_t n_tiles = (D + W - 1) / W;
  const int64_t Dp = n_tiles * W;
  const int64_t n_kb = K / KB;
  const int64_t n_k_items = n_kb + (K - n_kb * KB);  // full blocks, then one item per leftover diagonal
  const int64_t lda = ((Dp + W + 15) / 16) * 16 + 16;
  const int64_t ldb = ((P + W + 15) / 16) * 16 + 16;
  Scratch acc = alloc_scratch(K * Dp + 1);
  // One parallel region: each thread owns a contiguous range of (tile, diagonal block) items, i.e. disjoint
  // outputs, and walks the token chunks itself. Tile-major order: consecutive items share a's columns and
  // overlapping windows of b (offsets are sorted).
  at::parallel_for(0, n_tiles * n_k_items, 1, [&](int64_t i0, int64_t i1) {
    Scratch as = alloc_scratch(kNC * lda), bs = alloc_scratch(kNC * ldb);
    for (int64_t n0 = 0; n0 < N; n0 += kNC) {
      const int64_t rows = std::min(N, n0 + kNC) - n0;
      stage_rows<E>(a + n0 * D, D, rows, Dp, D, as.get(), lda, W);
      stage_rows<E>(b + n0 * P, P, rows, P, P, bs.get(), ldb, W);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = (i / n_k_items) * W, kb = i % n_k_items;
        if (kb < n_kb)
          sddmm_tile<Vec, KB>(as.get(), lda, bs.get(), ldb, rows, P, off, kb * KB, t0, acc.get(), Dp, n0 == 0);
        else
          sddmm_tile<Vec, 1>(as.get(), lda, bs.get(), ldb, rows, P, off, n_kb * KB + (kb - n_kb), t0, acc.get(), Dp,
                             n0 == 0);
      }
    }
    for (int64_t i = i0; i < i1; ++i) {  // this thread's outputs, fp32 -> storage dtype
      const int64_t t0 = (i / n_k_items) * W, kb = i % n_k_items;
      const int64_t k0 = kb < n_kb ? kb * KB : n_kb * KB + (kb - n_kb), k1 = kb < n_kb ? k0 + KB : k0 + 1;
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t t = t0; t < std::min(D, t0 + W); ++t) dv[k * D + t] = E::put(acc.get()[k * Dp + t]);
    }
  });
}

}  // namespace DD_VARIANT
}  // namespace dynadiag

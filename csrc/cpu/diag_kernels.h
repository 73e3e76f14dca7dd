// CPU kernels for wrapped-diagonal sparse matrices (see csrc/schema.cpp for the index map).
//
// Every op of the frozen layer reduces to three primitives on token-major activations (rows = tokens):
//
//   gather  G: out[n, t] = sum_k V[k, t] * z[n, (t + p_k) % P]            z [N, P] -> out [N, D]
//   scatter T: out[n, (t + p_k) % P] += V[k, t] * z[n, t]                 z [N, D] -> out [N, P]
//   sddmm   S: dV[k, t] = sum_n a[n, t] * b[n, (t + p_k) % P]             a [N, D], b [N, P] -> dV [K, D]
//
// (out >= in: forward = T, grad_x = G; out < in: forward = G, grad_x = T; grad_values = S either way.)
//
// All three are output-stationary: a register tile of NB tokens x TV 16-float vectors of outputs sums over the
// K diagonals, so each output is written once and every FMA needs one (shifted) activation load; the values
// vector is shared by the NB tokens. T is computed as a gather too: output r reads diagonal element
// s = (r - p_k) mod P, valid when s < D, so no scatter conflicts arise and threads split the outputs freely.
// Wrap-around and validity are handled with AVX-512 masked loads (two masked loads per straddling vector)
// instead of padded copies of the activations, which would cost a full extra pass over memory.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DYNADIAG_AVX512 1
#include <immintrin.h>
#else
#define DYNADIAG_AVX512 0
#endif

namespace dynadiag {

// ---------------------------------------------------------------------------------------------------------------
// Portable scalar path: any dtype (fp64 for gradcheck, fp16, ...), any size. Accumulates in opmath (fp32/fp64).
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
void gather_scalar(const T* z, int64_t N, int64_t P, const T* V, const int64_t* off, int64_t K, int64_t D, T* out) {
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
      for (int64_t t = 0; t < D; ++t) out[n * D + t] = T(acc[t]);
    }
  });
}

template <typename T>
void scatter_scalar(const T* z, int64_t N, int64_t D, const T* V, const int64_t* off, int64_t K, int64_t P, T* out) {
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
      for (int64_t r = 0; r < P; ++r) out[n * P + r] = T(acc[r]);
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

#if DYNADIAG_AVX512

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 path. Element traits: load 16 elements as fp32 lanes, store fp32 lanes back (bf16: round to nearest).
// ---------------------------------------------------------------------------------------------------------------

struct F32 {
  using T = float;
  static inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static inline __m512 maskz_load(__mmask16 m, const T* p) { return _mm512_maskz_loadu_ps(m, p); }
  static inline __m512 mask_load(__m512 src, __mmask16 m, const T* p) { return _mm512_mask_loadu_ps(src, m, p); }
  static inline void store(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static inline void mask_store(T* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};

struct BF16 {
  using T = c10::BFloat16;
  static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline __m512 load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline __m512 maskz_load(__mmask16 m, const T* p) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static inline __m512 mask_load(__m512 src, __mmask16 m, const T* p) {
    return _mm512_mask_mov_ps(src, m, maskz_load(m, p));
  }
  static inline __m256i narrow(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    // Round to nearest even; NaNs stay NaN (quiet bit forced).
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
#endif
  }
  static inline void store(T* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
  static inline void mask_store(T* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
};

// A 16-lane window of a circular row of length P whose first `valid` entries are data and the rest zero:
// lane i reads row[(s + i) mod P] if that index is < valid. Lanes in `ma` read row[a + i], lanes in `mb`
// read row[b + i] (b = a - P, the wrapped part); masked-off lanes are never touched, so nothing is read out
// of bounds. Needs P >= 16 (one wrap at most).
struct Win {
  int64_t a, b;
  __mmask16 ma, mb;
};

static inline __mmask16 lane_range(int64_t lo, int64_t hi) {  // lanes i with lo <= i < hi
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, 16);
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

static inline Win make_win(int64_t s, int64_t P, int64_t valid) {  // s in [0, P)
  Win w;
  w.a = s;
  w.b = s - P;
  w.ma = lane_range(0, std::min(P, valid) - s);
  w.mb = lane_range(P - s, P - s + valid);
  return w;
}

template <class E>
static inline __m512 load_win(const typename E::T* row, const Win& w) {
  if (w.ma == 0xFFFF) return E::load(row + w.a);
  return E::mask_load(E::maskz_load(w.ma, row + w.a), w.mb, row + w.b);
}

// ----- gather G: out[n, t] = sum_k V[k, t] z[n, (t + p_k) % P]; tile = NB tokens x TV vectors at t0 -----
template <class E, int NB, int TV>
static inline void gather_tile(const typename E::T* z, int64_t P, const typename E::T* V, const int64_t* off,
                               int64_t K, int64_t D, typename E::T* out, int64_t t0) {
  __m512 acc[NB][TV];
  __mmask16 vm[TV];
#pragma GCC unroll 16
  for (int v = 0; v < TV; ++v) vm[v] = lane_range(0, D - t0 - 16 * v);
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_setzero_ps();
  const bool full = t0 + 16 * TV <= D;
  for (int64_t k = 0; k < K; ++k) {
    const typename E::T* vr = V + k * D + t0;
    __m512 w[TV];
    if (full) {
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) w[v] = E::load(vr + 16 * v);
    } else {
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) w[v] = E::maskz_load(vm[v], vr + 16 * v);
    }
    int64_t s0 = t0 + off[k];
    while (s0 >= P) s0 -= P;
    if (s0 + 16 * TV <= P) {  // common case: one contiguous window, plain unaligned loads
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n) {
        const typename E::T* zr = z + n * P + s0;
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_fmadd_ps(w[v], E::load(zr + 16 * v), acc[n][v]);
      }
    } else {
      Win win[TV];
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) {
        int64_t s = s0 + 16 * v;
        while (s >= P) s -= P;
        win[v] = make_win(s, P, P);
      }
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_fmadd_ps(w[v], load_win<E>(z + n * P, win[v]), acc[n][v]);
    }
  }
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) {
      typename E::T* o = out + n * D + t0 + 16 * v;
      if (full)
        E::store(o, acc[n][v]);
      else if (vm[v])
        E::mask_store(o, vm[v], acc[n][v]);
    }
}

// ----- scatter T as a gather: out[n, r] = sum_k [s < D] V[k, s] z[n, s], s = (r - p_k) mod P -----
template <class E, int NB, int TV>
static inline void scatter_tile(const typename E::T* z, int64_t D, const typename E::T* V, const int64_t* off,
                                int64_t K, int64_t P, typename E::T* out, int64_t r0) {
  __m512 acc[NB][TV];
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const typename E::T* vr = V + k * D;
    int64_t s0 = r0 - off[k];
    if (s0 < 0) s0 += P;
    if (s0 + 16 * TV <= D) {  // window entirely inside the diagonal: plain loads
      __m512 w[TV];
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) w[v] = E::load(vr + s0 + 16 * v);
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n) {
        const typename E::T* zr = z + n * D + s0;
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_fmadd_ps(w[v], E::load(zr + 16 * v), acc[n][v]);
      }
    } else if (s0 >= D && s0 + 16 * TV <= P) {
      continue;  // window entirely in the part of the circle this diagonal does not cover (tall/wide shapes)
    } else {
      Win win[TV];
      __m512 w[TV];
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) {
        int64_t s = s0 + 16 * v;
        while (s >= P) s -= P;
        win[v] = make_win(s, P, D);
        w[v] = load_win<E>(vr, win[v]);
      }
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_fmadd_ps(w[v], load_win<E>(z + n * D, win[v]), acc[n][v]);
    }
  }
  const bool full = r0 + 16 * TV <= P;
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) {
      typename E::T* o = out + n * P + r0 + 16 * v;
      if (full) {
        E::store(o, acc[n][v]);
      } else {
        __mmask16 m = lane_range(0, P - r0 - 16 * v);
        if (m) E::mask_store(o, m, acc[n][v]);
      }
    }
}

// Runs a tile kernel over all (token block, output tile) pairs, token-block-major so that a thread keeps its
// tokens' activations hot in L1/L2 across output tiles. Remainder tokens use a one-token tile.
template <class E, int NB, int TV, class Tile, class Tile1>
static void run_tiles(int64_t N, int64_t n_out, int64_t z_ld, int64_t o_ld, const typename E::T* z, typename E::T* out,
                      Tile tile, Tile1 tile1) {
  const int64_t tile_w = 16 * TV;
  const int64_t n_tiles = (n_out + tile_w - 1) / tile_w;
  const int64_t n_blocks = N / NB;
  const int64_t rem = N - n_blocks * NB;
  const int64_t items = (n_blocks + rem) * n_tiles;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_tiles, o0 = (i % n_tiles) * tile_w;
      if (b < n_blocks)
        tile(z + b * NB * z_ld, out + b * NB * o_ld, o0);
      else {
        const int64_t n = n_blocks * NB + (b - n_blocks);
        tile1(z + n * z_ld, out + n * o_ld, o0);
      }
    }
  });
}

constexpr int kNB = 4;  // tokens per register tile
constexpr int kTV = 4;  // 16-float vectors of outputs per register tile

template <class E>
void gather_avx512(const typename E::T* z, int64_t N, int64_t P, const typename E::T* V, const int64_t* off,
                   int64_t K, int64_t D, typename E::T* out) {
  using T = typename E::T;
  run_tiles<E, kNB, kTV>(
      N, D, P, D, z, out,
      [&](const T* zb, T* ob, int64_t t0) { gather_tile<E, kNB, kTV>(zb, P, V, off, K, D, ob, t0); },
      [&](const T* zb, T* ob, int64_t t0) { gather_tile<E, 1, kTV>(zb, P, V, off, K, D, ob, t0); });
}

template <class E>
void scatter_avx512(const typename E::T* z, int64_t N, int64_t D, const typename E::T* V, const int64_t* off,
                    int64_t K, int64_t P, typename E::T* out) {
  using T = typename E::T;
  run_tiles<E, kNB, kTV>(
      N, P, D, P, z, out,
      [&](const T* zb, T* ob, int64_t r0) { scatter_tile<E, kNB, kTV>(zb, D, V, off, K, P, ob, r0); },
      [&](const T* zb, T* ob, int64_t r0) { scatter_tile<E, 1, kTV>(zb, D, V, off, K, P, ob, r0); });
}

// ----- sddmm S: dV[k, t] = sum_n a[n, t] b[n, (t + p_k) % P]; tile = KB diagonals x TV vectors, over all n -----
template <class E, int KB, int TV>
static inline void sddmm_tile(const typename E::T* a, const typename E::T* b, int64_t N, int64_t D, int64_t P,
                              const int64_t* off, int64_t k0, int64_t t0, typename E::T* dv) {
  __m512 acc[KB][TV];
  __mmask16 am[TV];
  Win win[KB][TV];
  bool fast = true;
#pragma GCC unroll 16
  for (int v = 0; v < TV; ++v) am[v] = lane_range(0, D - t0 - 16 * v);
  const bool full = t0 + 16 * TV <= D;
  int64_t s0[KB];
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk) {
    int64_t s = t0 + off[k0 + kk];
    while (s >= P) s -= P;
    s0[kk] = s;
    fast = fast && (s + 16 * TV <= P);
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) {
      int64_t sv = s + 16 * v;
      while (sv >= P) sv -= P;
      win[kk][v] = make_win(sv, P, P);
      acc[kk][v] = _mm512_setzero_ps();
    }
  }
  if (fast && full) {
    for (int64_t n = 0; n < N; ++n) {
      const typename E::T* ar = a + n * D + t0;
      const typename E::T* br = b + n * P;
      __m512 x[TV];
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) x[v] = E::load(ar + 16 * v);
#pragma GCC unroll 16
      for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v)
          acc[kk][v] = _mm512_fmadd_ps(x[v], E::load(br + s0[kk] + 16 * v), acc[kk][v]);
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const typename E::T* ar = a + n * D + t0;
      const typename E::T* br = b + n * P;
      __m512 x[TV];
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) x[v] = E::maskz_load(am[v], ar + 16 * v);
#pragma GCC unroll 16
      for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
        for (int v = 0; v < TV; ++v) acc[kk][v] = _mm512_fmadd_ps(x[v], load_win<E>(br, win[kk][v]), acc[kk][v]);
    }
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) {
      typename E::T* o = dv + (k0 + kk) * D + t0 + 16 * v;
      if (full)
        E::store(o, acc[kk][v]);
      else if (am[v])
        E::mask_store(o, am[v], acc[kk][v]);
    }
}

constexpr int kKB = 4;  // diagonals per sddmm register tile

template <class E>
void sddmm_avx512(const typename E::T* a, const typename E::T* b, int64_t N, int64_t D, int64_t P, const int64_t* off,
                  int64_t K, typename E::T* dv) {
  const int64_t tile_w = 16 * kTV;
  const int64_t n_tiles = (D + tile_w - 1) / tile_w;
  const int64_t n_kb = K / kKB;
  const int64_t n_k_items = n_kb + (K - n_kb * kKB);  // full blocks, then one item per leftover diagonal
  // Tile-major order: consecutive items share a's columns and overlapping windows of b (offsets are sorted).
  at::parallel_for(0, n_tiles * n_k_items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = (i / n_k_items) * tile_w, kb = i % n_k_items;
      if (kb < n_kb)
        sddmm_tile<E, kKB, kTV>(a, b, N, D, P, off, kb * kKB, t0, dv);
      else
        sddmm_tile<E, 1, kTV>(a, b, N, D, P, off, n_kb * kKB + (kb - n_kb), t0, dv);
    }
  });
}

#endif  // DYNADIAG_AVX512

}  // namespace dynadiag

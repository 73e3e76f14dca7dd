// AVX-512 token-major kernels for the primitives of diag_isa.h (see csrc/schema.cpp for the index map); included
// by diag_avx512.cpp only, which compiles them for AVX-512 F/BW/VL/DQ.
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
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <immintrin.h>

namespace dynadiag {
namespace avx512 {

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
    // Round to nearest even; NaNs stay NaN (quiet bit forced). (vcvtneps2bf16 would need AVX512-BF16, which
    // Skylake-X and Ice Lake lack; this variant runs on every AVX-512 CPU.)
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
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

#ifndef DD_NB
#define DD_NB 6
#endif
#ifndef DD_TV
#define DD_TV 4
#endif
#ifndef DD_KB
#define DD_KB 6
#endif
#ifndef DD_NC
#define DD_NC 64
#endif
constexpr int kNB = DD_NB;  // tokens per register tile (gather/scatter)
constexpr int kTV = DD_TV;  // 16-float vectors of outputs per register tile
constexpr int kW = 16 * kTV;
constexpr int kKB = DD_KB;  // diagonals per sddmm register tile
constexpr int kNC = DD_NC;  // tokens per sddmm chunk (a and b rows of a chunk stay in L2)

// ----- gather and scatter share one tile kernel over packed value windows -----
//
// out[n, o0 + i] = sum_e vals[e, i] * z[n, (s0_e + i) mod P], i < W, over the entries e of the output tile.
//   gather  (G): s0 = (o0 + p_k) mod P, vals = V[k, o0 + i] (0 past D), z valid on all of P.
//   scatter (T): s0 = (o0 - p_k) mod P, vals = V[k, s] for s = (s0 + i) mod P < D else 0, z valid on [0, D);
//                windows that miss the diagonal entirely are dropped (tall/wide shapes keep ~D/P of them).
// Packing the windows tile-major once per call turns the values' access into one sequential stream per tile
// (instead of K scattered rows), which the L2 prefetcher follows. Each thread stages its block of NB token rows
// once into an fp32 scratch row of length P + W holding the wrap-around copy and zeros outside z's valid range,
// so the hot loop is plain loads and FMAs only: no masks, no wrap branches, no bf16 conversion.
struct PackedWindows {
  int64_t n_tiles = 0, K = 0;
  std::unique_ptr<float[]> vals;   // [n_tiles, K, W] fp32
  std::unique_ptr<int64_t[]> s0;   // [n_tiles, K]
  std::unique_ptr<int64_t[]> cnt;  // [n_tiles]
};

template <class E>
PackedWindows pack_windows(const typename E::T* V, const int64_t* off, int64_t K, int64_t D, int64_t P,
                           int64_t n_out, bool scatter) {
  PackedWindows pw;
  pw.n_tiles = (n_out + kW - 1) / kW;
  pw.K = K;
  pw.vals.reset(new float[pw.n_tiles * K * kW]);
  pw.s0.reset(new int64_t[pw.n_tiles * K]);
  pw.cnt.reset(new int64_t[pw.n_tiles]);
  at::parallel_for(0, pw.n_tiles, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o0 = j * kW;
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k) {
        float* dst = pw.vals.get() + (j * K + c) * kW;
        const typename E::T* vr = V + k * D;
        int64_t s0;
        if (!scatter) {
          s0 = (o0 + off[k]) % P;
          for (int64_t i = 0; i < kW; ++i) dst[i] = o0 + i < D ? static_cast<float>(vr[o0 + i]) : 0.f;
        } else {
          s0 = ((o0 - off[k]) % P + P) % P;
          bool any = false;
          int64_t s = s0;
          for (int64_t i = 0; i < kW; ++i, ++s) {
            while (s >= P) s -= P;  // no integer division in the packing loop
            const bool ok = s < D && o0 + i < n_out;
            dst[i] = ok ? static_cast<float>(vr[s]) : 0.f;
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

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<float, AlignedFree>;

static inline Scratch alloc_scratch(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
  return Scratch(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// dst[r, j] for j < P + W: z[r, j mod P] if (j mod P) < zvalid else 0, in fp32.
template <class E>
static inline void stage_rows(const typename E::T* z, int64_t ldz, int64_t rows, int64_t P, int64_t zvalid,
                              float* dst, int64_t ld) {
  const int64_t valid = std::min(P, zvalid);
  for (int64_t r = 0; r < rows; ++r) {
    const typename E::T* src = z + r * ldz;
    float* d = dst + r * ld;
    int64_t j = 0;
    for (; j + 16 <= valid; j += 16) _mm512_storeu_ps(d + j, E::load(src + j));
    if (j < valid) _mm512_mask_storeu_ps(d + j, lane_range(0, valid - j), E::maskz_load(lane_range(0, valid - j), src + j));
    for (j = valid; j < P; ++j) d[j] = 0.f;
    for (j = P; j < P + kW; ++j) d[j] = d[j - P];
  }
}

template <class E, int NB>
static inline void window_tile(const float* zs, int64_t ld, const float* vals, const int64_t* s0s, int64_t cnt,
                               typename E::T* out, int64_t ldo, int64_t o0, int64_t n_out, const float* bias) {
  constexpr int TV = kTV;
  __m512 acc[NB][TV];
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_setzero_ps();
  for (int64_t e = 0; e < cnt; ++e) {
    const float* vr = vals + e * kW;
    const float* zr = zs + s0s[e];
    __m512 w[TV];
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) w[v] = _mm512_loadu_ps(vr + 16 * v);
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_fmadd_ps(w[v], _mm512_loadu_ps(zr + n * ld + 16 * v), acc[n][v]);
  }
  const bool full = o0 + kW <= n_out;
  if (bias != nullptr) {  // the caller pads bias to a whole number of tiles
    __m512 b[TV];
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) b[v] = _mm512_loadu_ps(bias + o0 + 16 * v);
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) acc[n][v] = _mm512_add_ps(acc[n][v], b[v]);
  }
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) {
      typename E::T* o = out + n * ldo + o0 + 16 * v;
      if (full) {
        E::store(o, acc[n][v]);
      } else {
        const __mmask16 m = lane_range(0, n_out - o0 - 16 * v);
        if (m) E::mask_store(o, m, acc[n][v]);
      }
    }
}

// Runs the tile kernel over all (token block, output tile) pairs, token-block-major: a thread stages a token
// block once and sweeps every output tile with it. Remainder tokens use one-token tiles.
template <class E>
void run_windows(const typename E::T* z, int64_t N, int64_t ldz, int64_t P, int64_t zvalid, const PackedWindows& pw,
                 typename E::T* out, int64_t n_out, const float* bias) {
  const int64_t n_tiles = pw.n_tiles;
  const int64_t n_blocks = N / kNB;
  const int64_t rem = N - n_blocks * kNB;
  const int64_t ld = ((P + kW + 15) / 16) * 16 + 16;  // +16: rows do not all start on the same 4 KiB alias
  at::parallel_for(0, (n_blocks + rem) * n_tiles, 1, [&](int64_t i0, int64_t i1) {
    Scratch zs = alloc_scratch(kNB * ld);
    int64_t staged = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / n_tiles, j = i % n_tiles;
      const bool full = b < n_blocks;
      const int64_t n_first = full ? b * kNB : n_blocks * kNB + (b - n_blocks);
      if (b != staged) {
        stage_rows<E>(z + n_first * ldz, ldz, full ? kNB : 1, P, zvalid, zs.get(), ld);
        staged = b;
      }
      const float* vals = pw.vals.get() + j * pw.K * kW;
      const int64_t* s0s = pw.s0.get() + j * pw.K;
      if (full)
        window_tile<E, kNB>(zs.get(), ld, vals, s0s, pw.cnt[j], out + n_first * n_out, n_out, j * kW, n_out, bias);
      else
        window_tile<E, 1>(zs.get(), ld, vals, s0s, pw.cnt[j], out + n_first * n_out, n_out, j * kW, n_out, bias);
    }
  });
}

template <class E>
void gather_avx512(const typename E::T* z, int64_t N, int64_t P, const typename E::T* V, const int64_t* off,
                   int64_t K, int64_t D, typename E::T* out, const float* bias = nullptr) {
  const PackedWindows pw = pack_windows<E>(V, off, K, D, P, D, /*scatter=*/false);
  run_windows<E>(z, N, P, P, P, pw, out, D, bias);
}

template <class E>
void scatter_avx512(const typename E::T* z, int64_t N, int64_t D, const typename E::T* V, const int64_t* off,
                    int64_t K, int64_t P, typename E::T* out, const float* bias = nullptr) {
  const PackedWindows pw = pack_windows<E>(V, off, K, D, P, P, /*scatter=*/true);
  run_windows<E>(z, N, D, P, D, pw, out, P, bias);
}

// ----- sddmm S: dV[k, t] = sum_n a[n, t] b[n, (t + p_k) % P]; tile = KB diagonals x TV vectors -----
// Tokens are processed in chunks of kNC. Each thread stages a chunk's rows once in fp32: a zero-padded to whole
// tiles, b with its wrap-around copy (stage_rows), so the hot loop is plain loads and FMAs for every tile (no
// masked wrap path, no bf16 widening per load); the staged chunk stays in L2 while the thread's tiles read it.
// The fp32 partial sums live in `acc_buf` [K, Dp] between chunks.
template <int KB>
static inline void sddmm_tile(const float* as, int64_t lda, const float* bs, int64_t ldb, int64_t rows, int64_t P,
                              const int64_t* off, int64_t k0, int64_t t0, float* acc_buf, int64_t Dp, bool first) {
  constexpr int TV = kTV;
  __m512 acc[KB][TV];
  const float* bk[KB];
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk) {
    int64_t s = t0 + off[k0 + kk];
    s = s >= P ? s - P : s;
    bk[kk] = bs + s;
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v)
      acc[kk][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_buf + (k0 + kk) * Dp + t0 + 16 * v);
  }
  for (int64_t n = 0; n < rows; ++n) {
    const float* ar = as + n * lda + t0;
    __m512 x[TV];
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) x[v] = _mm512_loadu_ps(ar + 16 * v);
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v)
        acc[kk][v] = _mm512_fmadd_ps(x[v], _mm512_loadu_ps(bk[kk] + n * ldb + 16 * v), acc[kk][v]);
  }
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; ++kk)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) _mm512_storeu_ps(acc_buf + (k0 + kk) * Dp + t0 + 16 * v, acc[kk][v]);
}

template <class E>
void sddmm_avx512(const typename E::T* a, const typename E::T* b, int64_t N, int64_t D, int64_t P, const int64_t* off,
                  int64_t K, typename E::T* dv) {
  const int64_t n_tiles = (D + kW - 1) / kW;
  const int64_t Dp = n_tiles * kW;
  const int64_t n_kb = K / kKB;
  const int64_t n_k_items = n_kb + (K - n_kb * kKB);  // full blocks, then one item per leftover diagonal
  const int64_t lda = Dp + kW + 16;  // stage_rows writes Dp + kW columns; +16: rows do not alias on 4 KiB
  const int64_t ldb = ((P + kW + 15) / 16) * 16 + 16;
  std::unique_ptr<float[]> acc(new float[K * Dp]);
  // One parallel region: each thread owns a contiguous range of (tile, diagonal block) items, i.e. disjoint
  // outputs, and walks the token chunks itself, so no barrier is needed between chunks. Tile-major order:
  // consecutive items share a's columns and overlapping windows of b (offsets are sorted).
  at::parallel_for(0, n_tiles * n_k_items, 1, [&](int64_t i0, int64_t i1) {
    Scratch as = alloc_scratch(kNC * lda), bs = alloc_scratch(kNC * ldb);
    for (int64_t n0 = 0; n0 < N; n0 += kNC) {
      const int64_t rows = std::min(N, n0 + kNC) - n0;
      // a: columns [0, D) then zeros to Dp (stage_rows with P = Dp and D valid); b: P columns + wrap copy.
      stage_rows<E>(a + n0 * D, D, rows, Dp, D, as.get(), lda);
      stage_rows<E>(b + n0 * P, P, rows, P, P, bs.get(), ldb);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = (i / n_k_items) * kW, kb = i % n_k_items;
        if (kb < n_kb)
          sddmm_tile<kKB>(as.get(), lda, bs.get(), ldb, rows, P, off, kb * kKB, t0, acc.get(), Dp, n0 == 0);
        else
          sddmm_tile<1>(as.get(), lda, bs.get(), ldb, rows, P, off, n_kb * kKB + (kb - n_kb), t0, acc.get(), Dp,
                        n0 == 0);
      }
    }
    for (int64_t i = i0; i < i1; ++i) {  // convert this thread's outputs (fp32 -> storage dtype)
      const int64_t t0 = (i / n_k_items) * kW, kb = i % n_k_items;
      const int64_t k0 = kb < n_kb ? kb * kKB : n_kb * kKB + (kb - n_kb), k1 = kb < n_kb ? k0 + kKB : k0 + 1;
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t t = t0; t < std::min(D, t0 + kW); t += 16)
          E::mask_store(dv + k * D + t, lane_range(0, D - t), _mm512_loadu_ps(acc.get() + k * Dp + t));
    }
  });
}

}  // namespace avx512
}  // namespace dynadiag

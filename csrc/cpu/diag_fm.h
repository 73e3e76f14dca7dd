// Feature-major (tokens in the vector lanes) AVX-512 kernel for the gather and scatter primitives of
// diag_kernels.h. Included by diag_avx512.cpp after diag_kernels.h.
//
// Why: the token-major tile of diag_kernels.h loads each diagonal's activation window at an arbitrary shift, so
// 15 of 16 loads split a cache line, and L1 load throughput caps it near 30 % of the FMA peak. Here a block of
// TB = 16 * kFmTV tokens is transposed once (in registers, 16x16 at a time) into xT [P + R rows, TB], so row j
// of xT holds feature j of the TB tokens: every activation load is an aligned 64-byte vector whatever the
// offset, and a diagonal's value is a broadcast shared by the kFmTV token vectors.
//
//   out[n, r] = sum_e val_e[r] * xT[(r0 + e_k + r) mod P, n]       (gather offsets e_k, see FmPlan)
//
// A register tile is R output rows x kFmTV token vectors. Diagonals are walked in chunks of neighbouring
// offsets (sorted by e_k, span <= kFmSpan), chunk-outer and tile-inner, so the rows of xT one chunk touches while
// the tiles sweep the outputs form a sliding window of about (span + R) rows that stays in L1; the price is one
// read-modify-write of the tile's partial sums (yT, fp32) per chunk, about 1/12 of the loads at 90 % sparsity.
// The output tile is transposed back to token-major at the end of the block, so callers see [N, out] tensors.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace dynadiag {
namespace avx512 {

#ifndef DD_FM_R
#define DD_FM_R 8
#endif
#ifndef DD_FM_TV
#define DD_FM_TV 3
#endif
#ifndef DD_FM_L1
#define DD_FM_L1 36864
#endif
constexpr int kFmR = DD_FM_R;              // output rows per register tile
constexpr int kFmTV = DD_FM_TV;            // 16-token vectors per register tile
constexpr int kFmTB = 16 * kFmTV;          // tokens per staged block
#ifndef DD_FM_PF
#define DD_FM_PF 8
#endif
constexpr int64_t kFmPrefetch = DD_FM_PF;  // entries ahead whose value window is prefetched
constexpr int64_t kFmL1Bytes = DD_FM_L1;   // target L1 footprint of one chunk's sliding window of xT
constexpr int64_t kFmSpan = std::max<int64_t>(16, kFmL1Bytes / (kFmTB * 4) - kFmR);  // offset span per chunk

// In-register transpose of a 16x16 fp32 block: r[i] holds row i on entry and column i on exit.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + j] = column j of rows 4i..4i+3, per 128-bit lane
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}

// The same transpose for a full 16x16 fp32 block in memory (row i at src + i * ld), with the 128-bit lane
// rearrangement done by the loads: vector q of column group a gathers the a-th 4-float chunk of rows q, 4+q, 8+q,
// 12+q (one load, three inserts from memory, which run on the load ports and p0/p5 rather than p5 only), so only
// the in-lane 4x4 stage is left: 32 shuffles instead of 64 (the shuffle port is the transposes' bottleneck).
static inline void load_transpose16(const float* src, int64_t ld, __m512 r[16]) {
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    __m512 v[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const float* p = src + q * ld + 4 * a;
      __m512 x = _mm512_castps128_ps512(_mm_loadu_ps(p));
      x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 4 * ld), 1);
      x = _mm512_insertf32x4(x, _mm_loadu_ps(p + 8 * ld), 2);
      v[q] = _mm512_insertf32x4(x, _mm_loadu_ps(p + 12 * ld), 3);
    }
    const __m512 t0 = _mm512_unpacklo_ps(v[0], v[1]), t1 = _mm512_unpackhi_ps(v[0], v[1]);
    const __m512 t2 = _mm512_unpacklo_ps(v[2], v[3]), t3 = _mm512_unpackhi_ps(v[2], v[3]);
    r[4 * a] = _mm512_shuffle_ps(t0, t2, 0x44);
    r[4 * a + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
    r[4 * a + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
    r[4 * a + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
  }
}

// Per-call plan: values as fp32 rows (zero-padded so every window is one contiguous run of R values), and for
// every (output tile, chunk) the list of entries (value-window offset, xT row offset).
//   gather  (z [N, P] -> out [N, D]):  e_k = p_k,            val(k, r) = V[k, r]
//   scatter (z [N, D] -> out [N, P]):  e_k = (P - p_k) % P,  val(k, r) = V[k, s] if s = (r + e_k) mod P < D else 0
// A scatter window that wraps past P gets its own packed copy; windows that miss [0, D) entirely are dropped.
struct FmPlan {
  int64_t n_rt = 0, n_ch = 0, ldv = 0;
  Scratch vbuf;                  // [K, ldv] fp32 values, then [n_edge, R] packed wrap windows
  std::vector<int64_t> beg;      // [n_rt * n_ch + 1]: entries of tile j, chunk c are beg[j*n_ch+c] .. next
  std::vector<int64_t> vo, xo;   // per entry: offset into vbuf, offset into xT (row * TB)
};

template <class E>
FmPlan fm_plan(const typename E::T* V, const int64_t* off, int64_t K, int64_t D, int64_t P, int64_t n_out,
               bool scatter) {
  constexpr int R = kFmR;
  FmPlan pl;
  pl.n_rt = (n_out + R - 1) / R;
  pl.ldv = ((D + R + 15) / 16) * 16;
  std::vector<int64_t> e(K), order(K), chunk(K);
  for (int64_t k = 0; k < K; ++k) e[k] = scatter ? (P - off[k]) % P : off[k];
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return e[a] < e[b]; });
  int64_t first = K > 0 ? e[order[0]] : 0;
  for (int64_t i = 0; i < K; ++i) {
    if (e[order[i]] - first >= kFmSpan) {
      ++pl.n_ch;
      first = e[order[i]];
    }
    chunk[i] = pl.n_ch;
  }
  ++pl.n_ch;
  // Which (tile, diagonal) windows exist, and which need a packed wrap copy: counted per tile, then prefix sums.
  auto window = [&](int64_t j, int64_t k, int64_t& s) {  // returns 0: none, 1: contiguous in V, 2: packed copy
    s = j * R + e[k];
    s = s >= P ? s - P : s;
    if (!scatter) return 1;
    const bool wraps = s + R > P;
    const bool hits = s < D || (wraps && s + R - P > 0);  // [s, s+R) mod P meets [0, D)
    return hits ? (wraps ? 2 : 1) : 0;
  };
  std::vector<int64_t> n_ent(pl.n_rt + 1, 0), n_edge(pl.n_rt + 1, 0);
  at::parallel_for(0, pl.n_rt, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < K; ++k) {
        int64_t s;
        const int w = window(j, k, s);
        n_ent[j + 1] += w > 0;
        n_edge[j + 1] += w == 2;
      }
  });
  std::partial_sum(n_ent.begin(), n_ent.end(), n_ent.begin());
  std::partial_sum(n_edge.begin(), n_edge.end(), n_edge.begin());
  const int64_t edge0 = K * pl.ldv;
  pl.vbuf = alloc_scratch(edge0 + n_edge[pl.n_rt] * R + 16);
  float* vb = pl.vbuf.get();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* d = vb + k * pl.ldv;
      int64_t t = 0;
      for (; t + 16 <= D; t += 16) _mm512_storeu_ps(d + t, E::load(V + k * D + t));
      if (t < D) _mm512_mask_storeu_ps(d + t, lane_range(0, D - t), E::maskz_load(lane_range(0, D - t), V + k * D + t));
      for (t = D; t < pl.ldv; ++t) d[t] = 0.f;
    }
  });
  pl.beg.assign(pl.n_rt * pl.n_ch + 1, 0);
  pl.vo.resize(n_ent[pl.n_rt]);
  pl.xo.resize(n_ent[pl.n_rt]);
  at::parallel_for(0, pl.n_rt, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t i = n_ent[j], edge = n_edge[j], c = 0;
      pl.beg[j * pl.n_ch] = i;
      for (int64_t q = 0; q < K; ++q) {
        const int64_t k = order[q];
        while (c < chunk[q]) pl.beg[j * pl.n_ch + ++c] = i;
        int64_t s;
        const int w = window(j, k, s);
        if (w == 0) continue;
        pl.xo[i] = s * kFmTB;
        if (w == 1) {
          pl.vo[i] = k * pl.ldv + (scatter ? s : j * R);
        } else {
          float* d = vb + edge0 + edge * R;
          for (int r = 0; r < R; ++r) {
            const int64_t t = s + r >= P ? s + r - P : s + r;
            d[r] = t < D ? vb[k * pl.ldv + t] : 0.f;
          }
          pl.vo[i] = edge0 + edge * R;
          ++edge;
        }
        ++i;
      }
      while (c + 1 < pl.n_ch) pl.beg[j * pl.n_ch + ++c] = i;
    }
  });
  pl.beg[pl.n_rt * pl.n_ch] = n_ent[pl.n_rt];
  return pl;
}

template <int R, int TV>
static inline void fm_tile(const float* xT, const float* vb, const int64_t* vo, const int64_t* xo, int64_t cnt,
                           float* yT) {
  constexpr int TB = 16 * TV;
  __m512 acc[R][TV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) acc[r][v] = _mm512_load_ps(yT + r * TB + 16 * v);
  for (int64_t e = 0; e < cnt; ++e) {
    const float* vr = vb + vo[e];
    const float* xr = xT + xo[e];
    // The value windows of consecutive entries sit in different rows of vbuf (L2): fetch a few entries ahead.
    if (e + kFmPrefetch < cnt) _mm_prefetch(reinterpret_cast<const char*>(vb + vo[e + kFmPrefetch]), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(vr[r]);
#pragma GCC unroll 16
      for (int v = 0; v < TV; ++v) acc[r][v] = _mm512_fmadd_ps(w, _mm512_load_ps(xr + r * TB + 16 * v), acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < TV; ++v) _mm512_store_ps(yT + r * TB + 16 * v, acc[r][v]);
}

// xT[j, t] = z[n0 + t, j] for j < zvalid, tokens t < nt (other tokens 0); rows [zvalid, P) must already be zero
// (they are never written); rows [P, P + R) repeat rows [0, R) for windows that wrap.
template <class E>
static inline void fm_stage(const typename E::T* z, int64_t ldz, int64_t nt, int64_t zvalid, int64_t P, float* xT) {
  constexpr int TB = kFmTB;
  __m512 r[16];
  for (int g = 0; g < kFmTV; ++g) {
    for (int64_t c = 0; c < zvalid; c += 16) {
      const __mmask16 m = lane_range(0, zvalid - c);
      const bool full = c + 16 <= zvalid;
      if (std::is_same<E, F32>::value && full && 16 * g + 16 <= nt) {
        load_transpose16(reinterpret_cast<const float*>(z) + 16 * g * ldz + c, ldz, r);
      } else {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          const int64_t t = 16 * g + i;
          r[i] = t >= nt ? _mm512_setzero_ps() : full ? E::load(z + t * ldz + c) : E::maskz_load(m, z + t * ldz + c);
        }
        transpose16(r);
      }
      const int64_t rows = std::min<int64_t>(16, zvalid - c);
      for (int i = 0; i < rows; ++i) _mm512_store_ps(xT + (c + i) * TB + 16 * g, r[i]);
    }
  }
  std::copy(xT, xT + kFmR * TB, xT + P * TB);
}

// out[n0 + t, j] = yT[j, t] (+ bias[j]) for j < n_out, t < nt; bias (fp32) is padded to a multiple of 16.
template <class E>
static inline void fm_unstage(const float* yT, int64_t nt, int64_t n_out, typename E::T* out, int64_t ldo,
                              const float* bias) {
  constexpr int TB = kFmTB;
  __m512 r[16];
  for (int g = 0; g < kFmTV && 16 * g < nt; ++g) {
    for (int64_t c = 0; c < n_out; c += 16) {
      load_transpose16(yT + c * TB + 16 * g, TB, r);
      if (bias != nullptr) {
        const __m512 b = _mm512_loadu_ps(bias + c);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = _mm512_add_ps(r[i], b);
      }
      const int64_t rows = std::min<int64_t>(16, nt - 16 * g);
      if (c + 16 <= n_out) {
        for (int i = 0; i < rows; ++i) E::store(out + (16 * g + i) * ldo + c, r[i]);
      } else {
        const __mmask16 m = lane_range(0, n_out - c);
        for (int i = 0; i < rows; ++i) E::mask_store(out + (16 * g + i) * ldo + c, m, r[i]);
      }
    }
  }
}

// Runs the plan over all token blocks: z [N, ldz] (valid columns [0, zvalid), circular length P) -> out [N, n_out].
template <class E>
void fm_run(const typename E::T* z, int64_t N, int64_t ldz, int64_t P, int64_t zvalid, const FmPlan& pl,
            typename E::T* out, int64_t n_out, const float* bias) {
  constexpr int R = kFmR, TB = kFmTB;
  const int64_t n_vec = (N + 15) / 16;
  const int64_t x_rows = P + R;
  const int64_t y_rows = std::max(pl.n_rt * R, ((n_out + 15) / 16) * 16);
  // Threads split the 16-token vectors (not whole blocks) evenly, then walk their range in blocks of TB tokens:
  // with 197 tokens and 2 threads that is 112 + 85 tokens instead of 144 + 53.
  at::parallel_for(0, n_vec, 1, [&](int64_t v0, int64_t v1) {
    Scratch xs = alloc_scratch(x_rows * TB), ys = alloc_scratch(y_rows * TB);
    std::fill(xs.get(), xs.get() + x_rows * TB, 0.f);  // rows [zvalid, P) stay zero for every block
    const int64_t end = std::min(N, 16 * v1);
    for (int64_t n0 = 16 * v0; n0 < end; n0 += TB) {
      const int64_t nt = std::min<int64_t>(TB, end - n0);
      fm_stage<E>(z + n0 * ldz, ldz, nt, zvalid, P, xs.get());
      std::fill(ys.get(), ys.get() + y_rows * TB, 0.f);
      for (int64_t c = 0; c < pl.n_ch; ++c)
        for (int64_t j = 0; j < pl.n_rt; ++j) {
          const int64_t i0 = pl.beg[j * pl.n_ch + c], i1 = pl.beg[j * pl.n_ch + c + 1];
          if (i1 > i0)
            fm_tile<R, kFmTV>(xs.get(), pl.vbuf.get(), pl.vo.data() + i0, pl.xo.data() + i0, i1 - i0,
                              ys.get() + j * R * TB);
        }
      fm_unstage<E>(ys.get(), nt, n_out, out + n0 * n_out, n_out, bias);
    }
  });
}

template <class E>
void gather_fm(const typename E::T* z, int64_t N, int64_t P, const typename E::T* V, const int64_t* off, int64_t K,
               int64_t D, typename E::T* out, const float* bias = nullptr) {
  const FmPlan pl = fm_plan<E>(V, off, K, D, P, D, /*scatter=*/false);
  fm_run<E>(z, N, P, P, P, pl, out, D, bias);
}

template <class E>
void scatter_fm(const typename E::T* z, int64_t N, int64_t D, const typename E::T* V, const int64_t* off, int64_t K,
                int64_t P, typename E::T* out, const float* bias = nullptr) {
  const FmPlan pl = fm_plan<E>(V, off, K, D, P, P, /*scatter=*/true);
  fm_run<E>(z, N, D, P, D, pl, out, P, bias);
}

}  // namespace avx512
}  // namespace dynadiag

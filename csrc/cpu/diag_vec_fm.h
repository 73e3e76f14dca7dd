// Feature-major gather/scatter (tokens in the vector lanes) at any vector width, and the Variant entry points of the
// width-generic variants. Included by diag_avx2.cpp and diag_portable.cpp after defining DD_VARIANT.
//
// The design of diag_fm.h (AVX-512) for traits classes with an in-register L x L transpose (`Vec::kFm`): a block of
// TB = L * FM_TV tokens is transposed once into xT [P + R rows, TB], so every activation load is an aligned
// vector whatever the diagonal's offset (the token-major tiles split a cache line on about half their loads), and a
// diagonal's value is a broadcast shared by the FM_TV token vectors:
//
//   out[n, r] = sum_e val_e[r] * xT[(r0 + e_k + r) mod P, n]       (gather offsets e_k, see fm_plan)
//
// A register tile is R output rows x FM_TV token vectors. Diagonals are walked in chunks of neighbouring offsets
// (span <= fm_span), chunk-outer and tile-inner, so the rows of xT one chunk touches stay in L1 while the tiles
// sweep the outputs; the price is one read-modify-write of the tile's fp32 partial sums per chunk.
#pragma once

#include "diag_vec.h"

#include <numeric>
#include <vector>

namespace dynadiag {
namespace DD_VARIANT {

template <class Vec>
constexpr int64_t fm_span() {  // offset span per chunk: its sliding window of xT fits Vec::FM_L1 bytes
  return std::max<int64_t>(16, Vec::FM_L1 / (Vec::L * Vec::FM_TV * 4) - Vec::FM_R);
}

// Per-call plan: values as fp32 rows (zero-padded so every window is one contiguous run of R values), and for
// every (output tile, chunk) the list of entries (value-window offset, xT row offset).
//   gather  (z [N, P] -> out [N, D]):  e_k = p_k,            val(k, r) = V[k, r]
//   scatter (z [N, D] -> out [N, P]):  e_k = (P - p_k) % P,  val(k, r) = V[k, s] if s = (r + e_k) mod P < D else 0
// A scatter window that wraps past P gets its own packed copy; windows that miss [0, D) entirely are dropped.
struct FmPlan {
  int64_t n_rt = 0, n_ch = 0, ldv = 0;
  Scratch vbuf;                 // [K, ldv] fp32 values, then [n_edge, R] packed wrap windows
  std::vector<int64_t> beg;     // [n_rt * n_ch + 1]: entries of tile j, chunk c are beg[j*n_ch+c] .. next
  std::vector<int64_t> vo, xo;  // per entry: offset into vbuf, offset into xT (row * TB)
};

template <class Vec, class E>
FmPlan fm_plan(const typename E::T* V, const int64_t* off, int64_t K, int64_t D, int64_t P, int64_t n_out,
               bool scatter) {
  constexpr int R = Vec::FM_R, TB = Vec::L * Vec::FM_TV;
  constexpr int64_t span = fm_span<Vec>();
  FmPlan pl;
  pl.n_rt = (n_out + R - 1) / R;
  pl.ldv = ((D + R + 15) / 16) * 16;
  std::vector<int64_t> e(K), order(K), chunk(K);
  for (int64_t k = 0; k < K; ++k) e[k] = scatter ? (P - off[k]) % P : off[k];
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return e[a] < e[b]; });
  int64_t first = K > 0 ? e[order[0]] : 0;
  for (int64_t i = 0; i < K; ++i) {
    if (e[order[i]] - first >= span) {
      ++pl.n_ch;
      first = e[order[i]];
    }
    chunk[i] = pl.n_ch;
  }
  ++pl.n_ch;
  auto window = [&](int64_t j, int64_t k, int64_t& s) {  // 0: none, 1: contiguous in V, 2: packed copy
    s = (j * R + e[k]) % P;
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
      for (int64_t t = 0; t < D; ++t) d[t] = E::get(V[k * D + t]);
      for (int64_t t = D; t < pl.ldv; ++t) d[t] = 0.f;
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
        pl.xo[i] = s * TB;
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

template <class Vec>
inline void fm_tile(const float* xT, const float* vb, const int64_t* vo, const int64_t* xo, int64_t cnt, float* yT) {
  using v = typename Vec::v;
  constexpr int L = Vec::L, R = Vec::FM_R, TV = Vec::FM_TV, TB = L * TV;
  v acc[R][TV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) acc[r][t] = Vec::load(yT + r * TB + L * t);
  for (int64_t e = 0; e < cnt; ++e) {
    const float* vr = vb + vo[e];
    const float* xr = xT + xo[e];
    if (e + 8 < cnt) __builtin_prefetch(vb + vo[e + 8]);  // value windows of later entries sit in other rows
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const v w = Vec::set1(vr[r]);
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) acc[r][t] = Vec::fmadd(w, Vec::load(xr + r * TB + L * t), acc[r][t]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) Vec::store(yT + r * TB + L * t, acc[r][t]);
}

// xT[j, t] = z[t, j] for j < zvalid, tokens t < nt (other tokens 0); rows [zvalid, P) must already be zero;
// rows [P, P + R) repeat rows [0, R) for windows that wrap.
template <class Vec, class E>
inline void fm_stage(const typename E::T* z, int64_t ldz, int64_t nt, int64_t zvalid, int64_t P, float* xT) {
  using v = typename Vec::v;
  constexpr int L = Vec::L, TB = L * Vec::FM_TV;
  v r[L];
  alignas(64) float tile[L * L];
  for (int g = 0; g < Vec::FM_TV; ++g) {
    for (int64_t c = 0; c < zvalid; c += L) {
      const int64_t cols = std::min<int64_t>(L, zvalid - c);
      if (std::is_same<E, F32>::value && cols == L && L * g + L <= nt) {
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) r[i] = Vec::load(reinterpret_cast<const float*>(z) + (L * g + i) * ldz + c);
      } else {
        for (int i = 0; i < L; ++i) {
          const int64_t t = L * g + i;
          for (int j = 0; j < L; ++j) tile[i * L + j] = t < nt && j < cols ? E::get(z[t * ldz + c + j]) : 0.f;
        }
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) r[i] = Vec::load(tile + i * L);
      }
      Vec::transpose(r);
      for (int i = 0; i < cols; ++i) Vec::store(xT + (c + i) * TB + L * g, r[i]);
    }
  }
  std::copy(xT, xT + Vec::FM_R * TB, xT + P * TB);
}

// out[n0 + t, j] = yT[j, t] (+ bias[j]) for j < n_out, t < nt; bias (fp32) is padded past n_out.
template <class Vec, class E>
inline void fm_unstage(const float* yT, int64_t nt, int64_t n_out, typename E::T* out, int64_t ldo,
                       const float* bias) {
  using v = typename Vec::v;
  constexpr int L = Vec::L, TB = L * Vec::FM_TV;
  v r[L];
  alignas(64) float tile[L];
  for (int g = 0; g < Vec::FM_TV && L * g < nt; ++g) {
    const int64_t rows = std::min<int64_t>(L, nt - L * g);
    for (int64_t c = 0; c < n_out; c += L) {
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) r[i] = Vec::load(yT + (c + i) * TB + L * g);
      Vec::transpose(r);
      if (bias != nullptr) {
        const v b = Vec::load(bias + c);
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) r[i] = Vec::add(r[i], b);
      }
      const int64_t cols = std::min<int64_t>(L, n_out - c);
      for (int i = 0; i < rows; ++i) {
        typename E::T* o = out + (L * g + i) * ldo + c;
        if (std::is_same<E, F32>::value && cols == L) {
          Vec::store(reinterpret_cast<float*>(o), r[i]);
        } else {
          Vec::store(tile, r[i]);
          for (int64_t j = 0; j < cols; ++j) o[j] = E::put(tile[j]);
        }
      }
    }
  }
}

// Runs the plan over all token blocks: z [N, ldz] (valid columns [0, zvalid), circular length P) -> out [N, n_out].
template <class Vec, class E>
void fm_run(const typename E::T* z, int64_t N, int64_t ldz, int64_t P, int64_t zvalid, const FmPlan& pl,
            typename E::T* out, int64_t n_out, const float* bias) {
  constexpr int L = Vec::L, R = Vec::FM_R, TB = L * Vec::FM_TV;
  const int64_t n_vec = (N + L - 1) / L;
  const int64_t x_rows = P + R;
  const int64_t y_rows = std::max(pl.n_rt * R, ((n_out + L - 1) / L) * L);
  // Threads split the L-token vectors evenly, then walk their range in blocks of TB tokens.
  at::parallel_for(0, n_vec, 1, [&](int64_t v0, int64_t v1) {
    Scratch xs = alloc_scratch(x_rows * TB), ys = alloc_scratch(y_rows * TB);
    std::fill(xs.get(), xs.get() + x_rows * TB, 0.f);  // rows [zvalid, P) stay zero for every block
    const int64_t end = std::min(N, L * v1);
    for (int64_t n0 = L * v0; n0 < end; n0 += TB) {
      const int64_t nt = std::min<int64_t>(TB, end - n0);
      fm_stage<Vec, E>(z + n0 * ldz, ldz, nt, zvalid, P, xs.get());
      std::fill(ys.get(), ys.get() + y_rows * TB, 0.f);
      for (int64_t c = 0; c < pl.n_ch; ++c)
        for (int64_t j = 0; j < pl.n_rt; ++j) {
          const int64_t i0 = pl.beg[j * pl.n_ch + c], i1 = pl.beg[j * pl.n_ch + c + 1];
          if (i1 > i0)
            fm_tile<Vec>(xs.get(), pl.vbuf.get(), pl.vo.data() + i0, pl.xo.data() + i0, i1 - i0,
                         ys.get() + j * R * TB);
        }
      fm_unstage<Vec, E>(ys.get(), nt, n_out, out + n0 * n_out, n_out, bias);
    }
  });
}

// Feature-major from Vec::FM_MIN_TOKENS tokens up (Layout::automatic) or when forced, where the variant has it.
// Needs P >= 16 (at least one register tile of rows, and a window wraps at most once).
template <class Vec>
bool use_fm(Layout layout, int64_t N, int64_t P) {
  if constexpr (!Vec::kFm) {
    return false;
  } else {
    if (P < 16) return false;
    return layout == Layout::automatic ? N >= Vec::FM_MIN_TOKENS : layout == Layout::feature_major;
  }
}

template <class Vec, class E>
void gather_any(const typename E::T* z, int64_t N, int64_t P, const typename E::T* V, const int64_t* off, int64_t K,
                int64_t D, typename E::T* out, const float* bias, Layout layout) {
  if constexpr (Vec::kFm) {
    if (use_fm<Vec>(layout, N, P)) {
      const FmPlan pl = fm_plan<Vec, E>(V, off, K, D, P, D, /*scatter=*/false);
      return fm_run<Vec, E>(z, N, P, P, P, pl, out, D, bias);
    }
  }
  gather_vec<Vec, E>(z, N, P, V, off, K, D, out, bias);
}

template <class Vec, class E>
void scatter_any(const typename E::T* z, int64_t N, int64_t D, const typename E::T* V, const int64_t* off, int64_t K,
                 int64_t P, typename E::T* out, const float* bias, Layout layout) {
  if constexpr (Vec::kFm) {
    if (use_fm<Vec>(layout, N, P)) {
      const FmPlan pl = fm_plan<Vec, E>(V, off, K, D, P, P, /*scatter=*/true);
      return fm_run<Vec, E>(z, N, D, P, D, pl, out, P, bias);
    }
  }
  scatter_vec<Vec, E>(z, N, D, V, off, K, P, out, bias);
}

// The Variant entry points (diag_isa.h) for one traits class.
template <class Vec>
struct Entry {
  static void gather(Elem e, const void* z, int64_t N, int64_t P, const void* V, const int64_t* off, int64_t K,
                     int64_t D, void* out, const float* bias, Layout layout) {
    if (e == Elem::f32)
      return gather_any<Vec, F32>(static_cast<const float*>(z), N, P, static_cast<const float*>(V), off, K, D,
                                  static_cast<float*>(out), bias, layout);
    gather_any<Vec, BF16>(static_cast<const uint16_t*>(z), N, P, static_cast<const uint16_t*>(V), off, K, D,
                          static_cast<uint16_t*>(out), bias, layout);
  }
  static void scatter(Elem e, const void* z, int64_t N, int64_t D, const void* V, const int64_t* off, int64_t K,
                      int64_t P, void* out, const float* bias, Layout layout) {
    if (e == Elem::f32)
      return scatter_any<Vec, F32>(static_cast<const float*>(z), N, D, static_cast<const float*>(V), off, K, P,
                                   static_cast<float*>(out), bias, layout);
    scatter_any<Vec, BF16>(static_cast<const uint16_t*>(z), N, D, static_cast<const uint16_t*>(V), off, K, P,
                           static_cast<uint16_t*>(out), bias, layout);
  }
  static void sddmm(Elem e, const void* a, const void* b, int64_t N, int64_t D, int64_t P, const int64_t* off,
                    int64_t K, void* dv) {
    if (e == Elem::f32)
      return sddmm_vec<Vec, F32>(static_cast<const float*>(a), static_cast<const float*>(b), N, D, P, off, K,
                                 static_cast<float*>(dv));
    sddmm_vec<Vec, BF16>(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), N, D, P, off, K,
                         static_cast<uint16_t*>(dv));
  }
};

}  // namespace DD_VARIANT
}  // namespace dynadiag

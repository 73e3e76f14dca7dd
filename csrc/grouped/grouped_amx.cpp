// AMX kernels of the grouped band product (bf16 `apply` and `sddmm`): blocked activations, tile loops.
//
// The product dst[n, r] = sum over kept diagonals of V * src[n, c] (index map in grouped_brgemm.cpp) is computed per
// output block of 32 tokens x 32 outputs as a sum of AMX k-steps, one per 32-wide *column block* of the source that
// the block's diagonals touch (the plan, grouped_plan.h: built once per call, or once per weight version when cached
// for inference). Compared with windows at arbitrary starts (the brgemm path) this
//   - makes every A tile a contiguous 1 KB chunk of the blocked activations [32 tokens / 16][A/32][16][32] (tile loads
//     at arbitrary starts and a 2 KB row stride were L2-latency bound and thrashed L1 sets: fc1 2.3 -> 1.4 ms in a
//     microbenchmark with the A loads alone made contiguous),
//   - lets bands whose windows overlap share their k-steps (one B tile holds both bands' weights),
//   - drops the k-steps that only read the tall form's zero columns and the wrap-around padding, so the staging copy
//     is a plain re-layout of the activations (with the input permutation fused into it).
// Work per output block is (distinct column blocks) x 4 TDPBF16PS; a band of g = 32 consecutive offsets over 32
// outputs touches 2 column blocks (63 columns), i.e. half of the MACs are useful.
#include "grouped.h"
#include "grouped_plan.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <immintrin.h>
#include <memory>
#include <vector>

namespace dynadiag_grouped {

#if DYNADIAG_AMX
namespace {

// ---- blocked activations ----------------------------------------------------------------------------------------
// One token block, staged just before its products run (the 32 x A copy stays in L1/L2; a staged copy of the whole
// input written to memory and read back cost as much as the products on fc2):
// x[n / 16][j][n % 16][0..31] = src[n0 + n, perm[32 j + 0..31]] (src[n0 + n, 32 j + ...] without perm) for n < 32;
// columns >= A and tokens >= N are zeros. Each 16 x 32 chunk is one contiguous AMX A tile. `idx`: perm as int32,
// padded to whole column blocks.
__attribute__((target("avx512f,avx512bw"))) void stage_token_block(const uint16_t* src, int64_t N, int64_t A,
                                                                   int64_t n0, int64_t ncb, const int32_t* idx,
                                                                   uint16_t* x) {
  for (int64_t n = 0; n < kBlk; ++n) {
    uint16_t* base = x + ((n / 16) * ncb * 16 + n % 16) * kBlk;  // chunk j at base + j * kTile
    if (n0 + n >= N) {
      for (int64_t j = 0; j < ncb; ++j) _mm512_storeu_si512(base + j * kTile, _mm512_setzero_si512());
      continue;
    }
    const uint16_t* row = src + (n0 + n) * A;
    // A 32-bit gather at 2 * index reads the element and the next one: the very last row of the tensor is gathered
    // one element at a time instead (its last element has no next one).
    const bool gather = idx != nullptr && n0 + n + 1 < N;
    for (int64_t j = 0; j < ncb; ++j) {
      uint16_t* d = base + j * kTile;
      const int64_t c0 = j * kBlk, len = std::min(kBlk, A - c0);
      const __mmask32 m = len == kBlk ? ~__mmask32(0) : static_cast<__mmask32>((1u << len) - 1);
      if (idx == nullptr) {
        _mm512_storeu_si512(d, _mm512_maskz_loadu_epi16(m, row + c0));
      } else if (gather) {
        const __mmask16 m0 = static_cast<__mmask16>(m), m1 = static_cast<__mmask16>(m >> 16);
        const __m512i i0 = _mm512_loadu_si512(idx + c0), i1 = _mm512_loadu_si512(idx + c0 + 16);
        const __m512i g0 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m0, i0, row, 2);
        const __m512i g1 = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m1, i1, row, 2);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(g0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), _mm512_cvtepi32_epi16(g1));
      } else {
        for (int64_t i = 0; i < kBlk; ++i) d[i] = i < len ? row[idx[c0 + i]] : 0;
      }
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) void amx_configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// One k-step of a 32 x 32 block held in tiles 0-3: C += [A rows 0-15; A rows 16-31] x [B cols 0-15, B cols 16-31],
// loads interleaved with the products that free their registers first (tile registers are not renamed).
__attribute__((target("amx-tile,amx-bf16"), always_inline)) inline void tile_step_2x2(const c10::BFloat16* a_top,
                                                                                     const c10::BFloat16* a_bottom,
                                                                                     const c10::BFloat16* b) {
  _tile_loadd(4, a_top, 64);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_loadd(7, b + kTile, 64);
  _tile_dpbf16ps(1, 4, 7);
  _tile_loadd(5, a_bottom, 64);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// Tiles 0-3 (the 32 x 32 fp32 block) -> acc [32, 32].
__attribute__((target("amx-tile"), always_inline)) inline void tile_store_2x2(float* acc) {
  _tile_stored(0, acc, kBlk * 4);
  _tile_stored(1, acc + 16, kBlk * 4);
  _tile_stored(2, acc + 16 * kBlk, kBlk * 4);
  _tile_stored(3, acc + 16 * kBlk + 16, kBlk * 4);
}

// acc[32 x 32] = sum over the k-steps of A(32 tokens x 32 columns of block cb[e]) @ B_e(32 x 32). `a` is the token
// block's first 16-row group of the blocked activations (the second follows `row_stride` elements later).
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void amx_block(const c10::BFloat16* a, int64_t row_stride,
                                                                   const c10::BFloat16* packed, const int32_t* cb,
                                                                   int64_t nsteps, float* acc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t e = 0; e < nsteps; ++e) {
    const c10::BFloat16* at0 = a + cb[e] * kTile;
    const c10::BFloat16* bt = packed + e * 2 * kTile;
    tile_step_2x2(at0, at0 + row_stride, bt);
  }
  tile_store_2x2(acc);
}

// out[n, 0..cols) = bf16(acc[n, :] + bias) for n < rows (round to nearest even).
__attribute__((target("avx512f,avx512bf16"))) void store_block(const float* acc, c10::BFloat16* out, int64_t ldo,
                                                                int64_t rows, int64_t cols, const float* bias) {
  const __mmask16 lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 b0 = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lo, bias);
  const __m512 b1 = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(hi, bias + 16);
  const __mmask32 mask = static_cast<__mmask32>(lo) | (static_cast<__mmask32>(hi) << 16);
  for (int64_t n = 0; n < rows; ++n) {
    const __m512 y0 = _mm512_add_ps(_mm512_loadu_ps(acc + n * kBlk), b0);
    const __m512 y1 = _mm512_add_ps(_mm512_loadu_ps(acc + n * kBlk + 16), b1);
    const __m512bh packed = _mm512_cvtne2ps_pbh(y1, y0);
    _mm512_mask_storeu_epi16(out + n * ldo, mask, reinterpret_cast<const __m512i&>(packed));
  }
}

// ---- sddmm (grad_values) ----------------------------------------------------------------------------------------
// q rows c0 .. c0 + 32 * nks - 1 in AMX B-tile layout: qb[ub][ks][half][pair][16 u][2] = q[c0 + 32 ks + 2 pair + 0/1,
// 32 ub + 16 half + u] (VNNI: consecutive tokens paired), zeros beyond N and M.
__attribute__((target("avx512f,avx512bw"))) void stage_q_vnni(const uint16_t* q, int64_t N, int64_t M,
                                                                          int64_t c0, int64_t nks, int64_t nub,
                                                                          uint16_t* qb) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 32; ++j) {  // interleave row a (indices 0-31) and row b (32-63): a[i], b[i], a[i+1], ...
    lo_idx[j] = static_cast<uint16_t>((j % 2) * 32 + j / 2);
    hi_idx[j] = static_cast<uint16_t>((j % 2) * 32 + 16 + j / 2);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t ks = 0; ks < nks; ++ks) {
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t n = c0 + ks * kBlk + 2 * p;
      for (int64_t ub = 0; ub < nub; ++ub) {
        const int64_t u0 = ub * kBlk, len = std::min(kBlk, M - u0);
        const __mmask32 m = len == kBlk ? ~__mmask32(0) : static_cast<__mmask32>((1u << len) - 1);
        const __m512i a = n < N ? _mm512_maskz_loadu_epi16(m, q + n * M + u0) : _mm512_setzero_si512();
        const __m512i b = n + 1 < N ? _mm512_maskz_loadu_epi16(m, q + (n + 1) * M + u0) : _mm512_setzero_si512();
        uint16_t* d = qb + ((ub * nks + ks) * 2) * kTile + p * kBlk;
        _mm512_storeu_si512(d, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(d + kTile, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }
}

// The same staging for s, then each 1 KB tile transposed as a 16 x 16 matrix of token pairs: [pair][t] -> [t][pair],
// i.e. A tiles sa[tb][ks][half][16 t][32 tokens] (rows t, tokens in order).
void stage_s_rows(const uint16_t* s, int64_t N, int64_t D, int64_t c0, int64_t nks, int64_t ntb, uint16_t* tmp,
                  uint16_t* sa) {
  stage_q_vnni(s, N, D, c0, nks, ntb, tmp);
  const int64_t ntiles = ntb * nks * 2;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(tmp);
  uint32_t* dst = reinterpret_cast<uint32_t*>(sa);
  for (int64_t i = 0; i < ntiles; ++i) {
    const uint32_t* a = src + i * 256;
    uint32_t* b = dst + i * 256;
    for (int p = 0; p < 16; ++p)
      for (int t = 0; t < 16; ++t) b[t * 16 + p] = a[p * 16 + t];
  }
}

// acc[32 t x 32 u] += sa block (32 t x 32 nks tokens) @ qb block (32 nks tokens x 32 u); the fp32 accumulator makes a
// round trip through the tile registers.
__attribute__((target("amx-tile,amx-bf16"))) void amx_sddmm_pair(const c10::BFloat16* a, const c10::BFloat16* b,
                                                                 int64_t nks, float* acc) {
  _tile_loadd(0, acc, kBlk * 4);
  _tile_loadd(1, acc + 16, kBlk * 4);
  _tile_loadd(2, acc + 16 * kBlk, kBlk * 4);
  _tile_loadd(3, acc + 16 * kBlk + 16, kBlk * 4);
  for (int64_t ks = 0; ks < nks; ++ks) {
    const c10::BFloat16* at0 = a + ks * 2 * kTile;
    const c10::BFloat16* bt = b + ks * 2 * kTile;
    tile_step_2x2(at0, at0 + kTile, bt);
  }
  tile_store_2x2(acc);
}

}  // namespace

// Only the 32 x 32 (t block, u block) tiles of s^T q that hold a kept diagonal are computed (the pairs of the
// forward plan), over token chunks: per chunk s and q are restaged in A- and B-tile layout (L2-resident; a transposed
// copy of s through ATen cost 1.2 ms of proj's 5.7 ms forward + backward) and each tile's fp32 accumulator makes a
// round trip through the tile registers.
at::Tensor amx_sddmm(const at::Tensor& s_in, const at::Tensor& q_in, const at::Tensor& offsets_in) {
  const at::Tensor s = s_in.contiguous(), q = q_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t N = s.size(0), D = s.size(1), M = q.size(1), K = offsets.numel();
  at::Tensor dv = at::empty({K, D}, s.options());
  if (K == 0) return dv;
  if (N == 0) return dv.zero_();
  const int64_t* offp = offsets.const_data_ptr<int64_t>();
  const int64_t ntb = (D + kBlk - 1) / kBlk, nub = (M + kBlk - 1) / kBlk, npad = (N + kBlk - 1) / kBlk * kBlk;
  // dV[k, t] pairs s column t with q column u = (t + p_k) mod M: the wide index map with rows t and columns u.
  std::vector<int32_t> slot(ntb * nub, -1), pair_t, pair_u;
  for_each_segment(offp, K, M, D, false, [&](int64_t, int64_t, int64_t t, int64_t u, int64_t) {
    int32_t& sl = slot[(t / kBlk) * nub + u / kBlk];
    if (sl >= 0) return;
    sl = static_cast<int32_t>(pair_t.size());
    pair_t.push_back(static_cast<int32_t>(t / kBlk));
    pair_u.push_back(static_cast<int32_t>(u / kBlk));
  });
  const int64_t npairs = static_cast<int64_t>(pair_t.size());
  thread_local Scratch<float> acc_buf;
  thread_local Scratch<uint16_t> qb_buf, sa_buf, tmp_buf;
  float* acc = acc_buf.get(npairs * kBlk * kBlk);
  std::memset(acc, 0, npairs * kBlk * kBlk * sizeof(float));
  constexpr int64_t kChunk = 128;  // tokens per restaging of q (4 k-steps)
  uint16_t* qb = qb_buf.get(nub * (kChunk / kBlk) * 2 * kTile);
  uint16_t* sa = sa_buf.get(ntb * (kChunk / kBlk) * 2 * kTile);
  uint16_t* tmp = tmp_buf.get(ntb * (kChunk / kBlk) * 2 * kTile);
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.const_data_ptr<c10::BFloat16>());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.const_data_ptr<c10::BFloat16>());
  for (int64_t c0 = 0; c0 < npad; c0 += kChunk) {
    const int64_t nks = std::min(kChunk, npad - c0) / kBlk;
    stage_s_rows(sp, N, D, c0, nks, ntb, tmp, sa);
    stage_q_vnni(qp, N, M, c0, nks, nub, qb);
    at::parallel_for(0, npairs, 8, [&](int64_t e0, int64_t e1) {
      amx_configure();
      for (int64_t e = e0; e < e1; ++e) {
        amx_sddmm_pair(reinterpret_cast<const c10::BFloat16*>(sa) + pair_t[e] * nks * 2 * kTile,
                       reinterpret_cast<const c10::BFloat16*>(qb) + pair_u[e] * nks * 2 * kTile, nks,
                       acc + e * kBlk * kBlk);
      }
      amx_release();
    });
  }
  c10::BFloat16* out = dv.mutable_data_ptr<c10::BFloat16>();
  for_each_segment(offp, K, M, D, false, [&](int64_t k, int64_t t, int64_t, int64_t u, int64_t len) {
    const float* a = acc + slot[(t / kBlk) * nub + u / kBlk] * kBlk * kBlk + (t % kBlk) * kBlk + u % kBlk;
    for (int64_t i = 0; i < len; ++i) out[k * D + t + i] = static_cast<c10::BFloat16>(a[i * (kBlk + 1)]);
  });
  return dv;
}

at::Tensor amx_apply(const at::Tensor& src_in, const at::Tensor& values, const at::Tensor& offsets, int64_t B,
                     bool tall, const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                     bool use_cache) {
  const at::Tensor src = src_in.contiguous();
  const int64_t N = src.size(0), A = src.size(1);
  at::Tensor dst = at::empty({N, B}, src.options());
  std::shared_ptr<Plan> plan = cached_plan(values, offsets, A, B, tall, use_cache);
  if (N == 0) return dst;
  const int64_t ncb = plan->ncb, nblocks = plan->nblocks, ntb = (N + kBlk - 1) / kBlk, row_stride = ncb * kTile;
  std::vector<int32_t> idx;  // the permutation as int32 gather indices, padded to whole column blocks
  if (perm.has_value()) {
    const at::Tensor pm = perm->contiguous();
    const int64_t* pp = pm.const_data_ptr<int64_t>();
    idx.assign(ncb * kBlk, 0);
    for (int64_t c = 0; c < A; ++c) idx[c] = static_cast<int32_t>(pp[c]);
  }
  at::Tensor bias_f;  // fp32 bias, added to the fp32 accumulators before the output is rounded
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* biasp = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.const_data_ptr<c10::BFloat16>());
  const c10::BFloat16* pk = reinterpret_cast<const c10::BFloat16*>(plan->packed.data.get());
  c10::BFloat16* out = dst.mutable_data_ptr<c10::BFloat16>();
  // Token block outer (staged once, then every row block reads it from L1/L2), row blocks inner: the packed B tiles
  // stream through in the order they are stored.
  at::parallel_for(0, ntb, 1, [&](int64_t t0, int64_t t1) {
    thread_local Scratch<uint16_t> staging;
    uint16_t* xs = staging.get(2 * row_stride);
    const c10::BFloat16* x = reinterpret_cast<const c10::BFloat16*>(xs);
    amx_configure();
    alignas(64) float acc[kBlk * kBlk];
    for (int64_t tb = t0; tb < t1; ++tb) {
      stage_token_block(s, N, A, tb * kBlk, ncb, idx.empty() ? nullptr : idx.data(), xs);
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t e0 = plan->begin[b], r0 = b * kBlk;
        amx_block(x, row_stride, pk + e0 * 2 * kTile, plan->cb.data() + e0, plan->begin[b + 1] - e0, acc);
        store_block(acc, out + tb * kBlk * B + r0, B, std::min(kBlk, N - tb * kBlk), std::min(kBlk, B - r0),
                    biasp == nullptr ? nullptr : biasp + r0);
      }
    }
    amx_release();
  });
  return dst;
}
#else
at::Tensor amx_apply(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool) {
  TORCH_CHECK(false, "grouped_apply: built without AMX support");
}
at::Tensor amx_sddmm(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "grouped_sddmm: built without AMX support");
}
#endif

}  // namespace dynadiag_grouped

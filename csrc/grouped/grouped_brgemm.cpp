// Grouped-diagonal CPU kernels on the matrix units: runs of consecutive offsets become dense band tiles that
// go through oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm). oneDNN picks the ISA at run
// time: AVX512-BF16 `vdpbf16ps` (which pairs consecutive reduction elements, i.e. consecutive offsets of a band) on
// Zen 4, AVX-512 FMA for fp32, AMX for bf16 sddmm. bf16 `apply` on a CPU with AMX takes its own tile kernel
// (grouped_amx.cpp: column-block plans, cached for frozen weights); everything below is the path without it.
//
// Layout and index map as in csrc/schema.cpp (token-major activations). Two primitives, as in
// dynadiag/kernels/triton.py:
//   apply, tall (B >= A, P = B): dst[n, r] = sum_k V[k, c] src[n, c], c = (r - p_k) mod B, only if c < A
//   apply, wide (B <= A, P = A): dst[n, r] = sum_k V[k, r] src[n, (r + p_k) mod A]
//   sddmm: dV[k, t] = sum_n S[n, t] Q[n, (t + p_k) mod M]
// forward = apply in the layer's form, grad_x = apply in the other form on grad_y, grad_values = sddmm.
//
// Tiling. The sorted offsets are split into clusters spanning at most `max_run` consecutive offset values (runs
// of consecutive offsets, plus offsets a few apart, which share a window for free because a window costs whole
// 32-wide k-steps). For an output block of R rows and a cluster spanning L offsets the touched inputs are one
// window of W = R + L - 1 consecutive (wrapping) columns, so the block's contribution is a dense GEMM
// [tokens x W] @ [W x R] whose B matrix is a band (at most L of every W entries per column non-zero). The activations are staged once per
// call into a padded copy (wrap-around and the tall form's zero columns made explicit), so every window is a
// plain pointer into it; the band tiles are built and packed (VNNI pairs for bf16) once per call, O(K * P)
// against the O(N * K * P) product. Each (token block, row block) task accumulates all its runs in an fp32
// buffer (brgemm add_C) and writes the output once. grad_values reduces over tokens: per (row block, run)
// one GEMM [R x tokens] @ [tokens x W] reads a window of the VNNI-packed Q and keeps the band of the result.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "../dd_check.h"
#include "grouped.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>
#include <immintrin.h>
#if DYNADIAG_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <vector>

namespace dynadiag_grouped {
namespace {

constexpr int64_t kRows = 32;  // output rows per band tile (two AMX tiles wide)

// A cluster of kept offsets p0 <= p < p0 + span (``count`` of them, rows first .. first + count - 1 of V). Runs of
// consecutive offsets are the common case (span == count); offsets a few apart share a tile too, because a tile
// costs whole 32-wide k-steps: one window of span <= max_run costs no more than two separate windows.
struct Run {
  int64_t first, p0, len, span;
};

std::vector<Run> offset_runs(const at::Tensor& offsets, int64_t period, int64_t max_run, const char* op) {
  DD_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, op, ": offsets must be 1-D int64");
  DD_CHECK(max_run >= 1, op, ": max_run must be >= 1");
  at::Tensor off = offsets.contiguous();
  const int64_t* p = off.const_data_ptr<int64_t>();
  std::vector<Run> runs;
  const int64_t K = off.numel();
  int64_t start = 0;
  for (int64_t i = 0; i < K; ++i) {
    // The same check and ValueError as every other backend (csrc/dd_check.h).
    DD_CHECK_VALUE(p[i] >= 0 && p[i] < period, op, ": offsets must be strictly ascending and in [0, ", period,
                   "), got offsets[", i, "] = ", p[i]);
    DD_CHECK_VALUE(i == 0 || p[i] > p[i - 1], op, ": offsets must be strictly ascending and in [0, ", period,
                   "), got offsets[", i - 1, "] = ", p[i - 1], " then offsets[", i, "] = ", p[i]);
    const bool last = i + 1 == K;
    if (last || p[i + 1] - p[start] + 1 > max_run) {
      runs.push_back({start, p[start], i + 1 - start, p[i] - p[start] + 1});
      start = i + 1;
    }
  }
  return runs;
}

inline int64_t pmod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

template <typename T>
constexpr int64_t vnni() {
  return std::is_same_v<T, float> ? 1 : 2;
}

// Element (k, n) of a [K x kRows] band tile in brgemm's B layout: VNNI pairs along k for bf16 ([K/2][kRows][2]).
template <typename T>
inline int64_t pack_index(int64_t k, int64_t n) {
  constexpr int64_t v = vnni<T>();
  return ((k / v) * kRows + n) * v + k % v;
}

// dst[i] = src[i] rounded to T (round-to-nearest-even for bf16; vectorised with AVX512-BF16 where available).
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n, const float* bias) {
  int64_t i = 0;
  if (bias != nullptr) {  // rare enough (one pass per output row block) to keep a plain loop
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i] + bias[i]);
    return;
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(packed));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}


}  // namespace

#if DYNADIAG_AMX
// AMX is usable when the CPU reports AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22) and Linux grants this
// process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM). Checked once; on other CPUs (e.g. Zen 4) the kernels
// take the brgemm path, where oneDNN uses AVX512-BF16.
bool amx_ready() {
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}
#else
bool amx_ready() { return false; }
#endif

namespace {

// Whether bf16 kernels may use the AMX path (tests turn it off to exercise the brgemm path on AMX machines).
std::atomic<bool> g_allow_amx{true};

struct Tile {
  int64_t block;  // output row block
  int64_t start;  // first column of the window in the staged (padded) source
  int64_t kdim;   // window width rounded up to the VNNI pair
  int64_t packed; // element offset of the packed band in the tile buffer
};

template <typename T>
at::Tensor apply_impl(const at::Tensor& src_in, const at::Tensor& values_in, const at::Tensor& offsets, int64_t B,
                      bool tall, int64_t max_run, int64_t token_block, const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias, bool cache) {
  const char* op = "grouped_apply";
  const int64_t N = src_in.size(0), A = src_in.size(1), K = values_in.size(0), D = values_in.size(1);
  DD_CHECK(tall ? B >= A : B <= A, op, ": tall needs out_cols >= in_cols, wide out_cols <= in_cols");
  DD_CHECK(D == std::min(A, B), op, ": values must be [K, min(in, out)]");
  const int64_t period = tall ? B : A;  // the source's periodic coordinate
  const std::vector<Run> runs = offset_runs(offsets, std::max(A, B), max_run, op);
  const at::Tensor off_c = offsets.contiguous();
  const int64_t* offp = off_c.const_data_ptr<int64_t>();
  DD_CHECK(static_cast<int64_t>(runs.empty() ? 0 : runs.back().first + runs.back().len) == K, op,
              ": one offset per diagonal");
  DD_CHECK(!bias.has_value() || bias->numel() == B, op, ": bias must have out_cols elements");
  DD_CHECK(!perm.has_value() || (perm->scalar_type() == at::kLong && perm->numel() == A), op,
           ": perm must be int64 [in_cols]");
  if (std::is_same_v<T, c10::BFloat16> && g_allow_amx.load() && amx_ready()) {
    return amx_apply(src_in, values_in, offsets, B, tall, perm, bias, cache);
  }
  const at::Tensor src = src_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor dst = at::empty({N, B}, src.options());
  if (N == 0) return dst;
  int64_t max_len = 1;
  for (const Run& r : runs) max_len = std::max(max_len, r.span);
  // brgemm path (no AMX: fp32, or bf16 through AVX512-BF16): windows at arbitrary starts in a padded copy.
  const int64_t kalign = vnni<T>();
  const int64_t wmax = kRows + max_len + kalign;  // >= every window width rounded up to kalign
  const int64_t padl = tall ? wmax : 0, width = padl + A + wmax;

  // Stage the source: staged[n, padl + c] = src[n, c mod period] if that column is < A, else 0.
  at::Tensor staged = at::empty({N, width}, src.options());
  if (perm.has_value()) {
    // Input permutation fused into the staging copy: staged[n, padl + c] = src[n, perm[c mod period]] (a gather
    // from one L1-resident source row instead of a separate pass over the activations).
    const at::Tensor pm = perm->contiguous();
    const int64_t* pp = pm.const_data_ptr<int64_t>();
    std::vector<int32_t> map(width);  // source column per staged column; A = the zero column
    for (int64_t j = 0; j < width; ++j) {
      const int64_t c = pmod(j - padl, period);
      map[j] = static_cast<int32_t>(c < A ? pp[c] : A);
    }
    const T* s = src.const_data_ptr<T>();
    T* st = staged.mutable_data_ptr<T>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        T* row = st + n * width;
        const T* srow = s + n * A;
        for (int64_t j = 0; j < width; ++j) row[j] = map[j] < A ? srow[map[j]] : static_cast<T>(0.0f);
      }
    });
  } else {
    const T* s = src.const_data_ptr<T>();
    T* st = staged.mutable_data_ptr<T>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        T* row = st + n * width;
        const T* srow = s + n * A;
        for (int64_t j = 0; j < width;) {  // whole segments: a copy of src columns or a run of zeros
          const int64_t c = pmod(j - padl, period);
          const int64_t len = std::min(width - j, c < A ? A - c : period - c);
          if (c < A) {
            std::copy(srow + c, srow + c + len, row + j);
          } else {
            std::fill(row + j, row + j + len, static_cast<T>(0.0f));
          }
          j += len;
        }
      }
    });
  }

  // Band tiles per output row block, with the window's start in the staged source (all-zero windows skipped).
  const int64_t nblocks = (B + kRows - 1) / kRows;
  std::vector<std::vector<Tile>> tiles(nblocks);
  int64_t total = 0;
  struct Pending {
    int64_t block, run, rep, kdim;
  };
  std::vector<Pending> pending;
  for (int64_t b = 0; b < nblocks; ++b) {
    for (int64_t j = 0; j < static_cast<int64_t>(runs.size()); ++j) {
      const Run& run = runs[j];
      const int64_t w = kRows + run.span - 1, kdim = (w + kalign - 1) / kalign * kalign;
      int64_t rep;
      if (tall) {
        const int64_t s = pmod(b * kRows - run.p0 - (run.span - 1), B);
        if (s < A) {
          rep = s;
        } else if (s + w > B) {
          rep = s - B;  // wraps into the valid columns: negative start, covered by the left padding
        } else {
          continue;  // the window lies in the zero columns [A, B)
        }
      } else {
        rep = pmod(b * kRows + run.p0, A);
      }
      pending.push_back({b, j, rep, kdim});
      tiles[b].push_back({b, rep + padl, kdim, total});
      total += kdim * kRows;
    }
  }
  at::Tensor packed = at::empty({std::max<int64_t>(total, 1)}, src.options());
  {
    const T* v = values.const_data_ptr<T>();
    T* pk = packed.mutable_data_ptr<T>();
    std::vector<int64_t> where(pending.size());  // packed offsets, in the order the tiles were listed
    int64_t acc = 0;
    for (size_t i = 0; i < pending.size(); ++i) {
      where[i] = acc;
      acc += pending[i].kdim * kRows;
    }
    at::parallel_for(0, static_cast<int64_t>(pending.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Pending& pd = pending[i];
        const Run& run = runs[pd.run];
        T* tile = pk + where[i];
        std::fill(tile, tile + pd.kdim * kRows, static_cast<T>(0.0f));
        const int64_t r0 = pd.block * kRows, rows = std::min(kRows, B - r0);
        for (int64_t m = 0; m < run.len; ++m) {  // member m of the cluster: diagonal p0 + d
          const int64_t d = offp[run.first + m] - run.p0;
          const T* vrow = v + (run.first + m) * D;
          if (tall) {  // row r0 + rho reads column (r0 + rho - p0 - d) mod B at window position rho + span - 1 - d
            int64_t col = pmod(r0 - run.p0 - d, B);
            for (int64_t rho = 0; rho < rows; ++rho, col = col + 1 == B ? 0 : col + 1) {
              if (col < A) tile[pack_index<T>(rho + run.span - 1 - d, rho)] = vrow[col];
            }
          } else {  // row r0 + rho reads V[d, r0 + rho] at window position rho + d
            for (int64_t rho = 0; rho < rows; ++rho) tile[pack_index<T>(rho + d, rho)] = vrow[r0 + rho];
          }
        }
      }
    });
  }

  // Output-stationary GEMMs: each (token block, row block) sums its runs in fp32, then stores once.
  const T* st = staged.const_data_ptr<T>();
  const T* pk = packed.const_data_ptr<T>();
  T* out = dst.mutable_data_ptr<T>();
  at::Tensor bias_f;  // fp32 copy of the bias, added to the fp32 accumulators before the output is rounded
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const float* biasp = bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr;
  const int64_t ntok = (N + token_block - 1) / token_block;
  at::parallel_for(0, ntok * nblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(token_block * kRows);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t tb = task / nblocks, b = task % nblocks;
      const int64_t n0 = tb * token_block, m = std::min(token_block, N - n0);
      const std::vector<Tile>& list = tiles[b];
      // Always accumulate (add_C) into a zeroed buffer: one micro-kernel for all calls of a shape, so AMX keeps
      // its tile configuration instead of reloading it when the kernel changes.
      std::fill(acc.begin(), acc.begin() + m * kRows, 0.0f);
      for (size_t i = 0; i < list.size(); ++i) {
        at::native::cpublas::brgemm(m, kRows, list[i].kdim, width, kRows, kRows, true, st + n0 * width + list[i].start,
                                    pk + list[i].packed, acc.data(), vnni<T>() > 1);
      }
      const int64_t r0 = b * kRows, cols = std::min(kRows, B - r0);
      for (int64_t n = 0; n < m; ++n) {
        T* orow = out + (n0 + n) * B + r0;
        store_row<T>(acc.data() + n * kRows, orow, cols, biasp == nullptr ? nullptr : biasp + r0);
      }
    }
    at::native::cpublas::brgemm_release(vnni<T>() > 1);
  });
  return dst;
}

template <typename T>
at::Tensor sddmm_impl(const at::Tensor& s_in, const at::Tensor& q_in, const at::Tensor& offsets, int64_t max_run) {
  const char* op = "grouped_sddmm";
  const at::Tensor s = s_in.contiguous(), q = q_in.contiguous();
  const int64_t N = s.size(0), D = s.size(1), M = q.size(1);
  DD_CHECK(q.size(0) == N && M >= D, op, ": s [N, D] and q [N, M] with M >= D");
  const std::vector<Run> runs = offset_runs(offsets, M, max_run, op);
  if (std::is_same_v<T, c10::BFloat16> && g_allow_amx.load() && amx_ready()) return amx_sddmm(s, q, offsets);
  const at::Tensor off_c = offsets.contiguous();
  const int64_t* offp = off_c.const_data_ptr<int64_t>();
  const int64_t K = offsets.numel();
  at::Tensor dv = at::empty({K, D}, s.options());
  if (K == 0) return dv;
  if (N == 0) return dv.zero_();
  int64_t max_len = 1;
  for (const Run& r : runs) max_len = std::max(max_len, r.span);
  constexpr int64_t v = vnni<T>();
  const int64_t npad = (N + v - 1) / v * v;
  const int64_t ldq = M + kRows + max_len;  // windows start below M and are at most kRows + max_len - 1 wide

  // S^T [D, npad] (A operand, rows = positions t, reduction over tokens) and Q periodic + VNNI-packed over tokens
  // ([npad/2][ldq][2] for bf16), both with ATen's vectorised copies; padded tokens are zeros.
  at::Tensor st = at::zeros({D, npad}, s.options());
  st.narrow(1, 0, N).copy_(s.t());
  at::Tensor qv = at::empty({npad / v, ldq, v}, s.options());
  {
    // qv[n / v][c][n % v] = q[n][c mod M] (0 for padded tokens): contiguous source segments, so the inner loops
    // are plain (interleaving) copies the compiler vectorises.
    using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
    const Raw* qp = reinterpret_cast<const Raw*>(q.const_data_ptr<T>());
    Raw* qvp = reinterpret_cast<Raw*>(qv.mutable_data_ptr<T>());
    at::parallel_for(0, npad / v, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        Raw* dstrow = qvp + p * ldq * v;
        for (int64_t lane = 0; lane < v; ++lane) {
          const int64_t n = p * v + lane;
          if (n >= N) {
            for (int64_t c = 0; c < ldq; ++c) dstrow[c * v + lane] = Raw(0);
            continue;
          }
          const Raw* srow = qp + n * M;
          for (int64_t c0 = 0; c0 < ldq; c0 += M) {
            const int64_t len = std::min(M, ldq - c0);
            Raw* d = dstrow + c0 * v + lane;
            for (int64_t c = 0; c < len; ++c) d[c * v] = srow[c];
          }
        }
      }
    });
  }
  const int64_t nblocks = (D + kRows - 1) / kRows;
  const int64_t nruns = static_cast<int64_t>(runs.size());
  const T* stp = st.const_data_ptr<T>();
  const T* qvp = qv.const_data_ptr<T>();
  T* out = dv.mutable_data_ptr<T>();
  // Token chunks outermost: each chunk's slice of S^T and Q stays in L2 while every (block, run) task adds its
  // product into its own fp32 accumulator (all of them together: nblocks * nruns * 32 * ldc floats).
  const int64_t ntasks = nblocks * nruns, ldc = kRows + max_len;
  constexpr int64_t kChunk = 256;  // tokens per step (a multiple of the VNNI pair)
  std::vector<float> acc(ntasks * kRows * ldc);
  for (int64_t c0 = 0; c0 < npad; c0 += kChunk) {
    const int64_t kc = std::min(kChunk, npad - c0);
    at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / nruns;
        const Run& run = runs[task % nruns];
        const int64_t t_0 = b * kRows, rows = std::min(kRows, D - t_0), w = kRows + run.span - 1;
        const int64_t start = pmod(t_0 + run.p0, M);
        at::native::cpublas::brgemm(rows, w, kc, npad, ldq, ldc, c0 > 0, stp + t_0 * npad + c0,
                                    qvp + (c0 / v * ldq + start) * v, acc.data() + task * kRows * ldc, v > 1);
      }
      at::native::cpublas::brgemm_release(v > 1);
    });
  }
  // Keep the band: dV[first + i, t_0 + rho] = acc[task][rho][rho + i].
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nruns;
      const Run& run = runs[task % nruns];
      const int64_t t_0 = b * kRows, rows = std::min(kRows, D - t_0);
      const float* a = acc.data() + task * kRows * ldc;
      for (int64_t m = 0; m < run.len; ++m) {
        const int64_t d = offp[run.first + m] - run.p0;
        for (int64_t rho = 0; rho < rows; ++rho) out[(run.first + m) * D + t_0 + rho] = static_cast<T>(a[rho * ldc + rho + d]);
      }
    }
  });
  return dv;
}

at::Tensor grouped_apply(const at::Tensor& src, const at::Tensor& values, const at::Tensor& offsets, int64_t out_cols,
                         bool tall, int64_t max_run, int64_t token_block, const std::optional<at::Tensor>& perm,
                         const std::optional<at::Tensor>& bias, bool cache) {
  TORCH_CHECK(src.dim() == 2 && values.dim() == 2, "grouped_apply: src [N, A] and values [K, D]");
  // bf16 activations may come with fp32 master values (autocast): the AMX path rounds them into its (cached) tiles.
  const bool master = src.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kFloat;
  TORCH_CHECK(src.scalar_type() == values.scalar_type() || master, "grouped_apply: dtype mismatch");
  TORCH_CHECK(token_block >= 1, "grouped_apply: token_block must be >= 1");
  if (master && !(g_allow_amx.load() && amx_ready()))
    return apply_impl<c10::BFloat16>(src, values.to(at::kBFloat16), offsets, out_cols, tall, max_run, token_block,
                                     perm, bias, cache);
  if (src.scalar_type() == at::kBFloat16)
    return apply_impl<c10::BFloat16>(src, values, offsets, out_cols, tall, max_run, token_block, perm, bias, cache);
  if (src.scalar_type() == at::kFloat)
    return apply_impl<float>(src, values, offsets, out_cols, tall, max_run, token_block, perm, bias, cache);
  DD_CHECK(false, "grouped_apply: bf16 or fp32 only, got ", src.scalar_type());
}

at::Tensor grouped_sddmm(const at::Tensor& s, const at::Tensor& q, const at::Tensor& offsets, int64_t max_run) {
  TORCH_CHECK(s.dim() == 2 && q.dim() == 2, "grouped_sddmm: s [N, D] and q [N, M]");
  TORCH_CHECK(s.scalar_type() == q.scalar_type(), "grouped_sddmm: dtype mismatch");
  if (s.scalar_type() == at::kBFloat16) return sddmm_impl<c10::BFloat16>(s, q, offsets, max_run);
  if (s.scalar_type() == at::kFloat) return sddmm_impl<float>(s, q, offsets, max_run);
  DD_CHECK(false, "grouped_sddmm: bf16 or fp32 only, got ", s.scalar_type());
}

bool grouped_use_amx(bool enable) {
  g_allow_amx.store(enable);
  return enable && amx_ready();
}

bool grouped_supported(int64_t dtype_code) {
  return at::native::cpublas::could_pack(static_cast<at::ScalarType>(dtype_code));
}

}  // namespace
}  // namespace dynadiag_grouped

TORCH_LIBRARY(dynadiag_grouped, m) {
  // src [N, A] -> dst [N, out_cols]; tall: out_cols >= A, wide: out_cols <= A (see the header comment).
  // perm (optional, int64 [A]): read src[n, perm[c]] for column c (the layer's input permutation, fused into
  // staging); bias (optional, [out_cols]): added to the fp32 accumulators before rounding.
  m.def("apply(Tensor src, Tensor values, Tensor offsets, int out_cols, bool tall, int max_run, int token_block,"
        " Tensor? perm=None, Tensor? bias=None, bool cache=False) -> Tensor");
  // s [N, D], q [N, M] -> dV [K, D].
  m.def("sddmm(Tensor s, Tensor q, Tensor offsets, int max_run) -> Tensor");
  // Whether oneDNN's brgemm micro-kernel runs this dtype here (AMX or AVX512-BF16 for bf16).
  m.def("supported(int dtype) -> bool", &dynadiag_grouped::grouped_supported);
  // Allow (or forbid) the AMX path for bf16; returns whether bf16 apply now runs on AMX tiles.
  m.def("use_amx(bool enable) -> bool", &dynadiag_grouped::grouped_use_amx);
  // The AMX path's cache of packed weight tiles (apply with cache=True): drop all entries / count them.
  m.def("cache_clear() -> int", &dynadiag_grouped::amx_cache_clear);
  m.def("cache_size() -> int", &dynadiag_grouped::amx_cache_size);
}

TORCH_LIBRARY_IMPL(dynadiag_grouped, CPU, m) {
  m.impl("apply", &dynadiag_grouped::grouped_apply);
  m.impl("sddmm", &dynadiag_grouped::grouped_sddmm);
}

// v2 CUDA-core kernels for frozen wrapped-diagonal layers. UNVALIDATED ON HARDWARE: written and compiled (sm_80,
// sm_90) without a GPU; the v1 kernels (diag_kernels.cu) stay the default until a GPU run of scripts/gpu_check.sh
// compares both (select with DYNADIAG_CUDA_KERNELS=v2, see dynadiag/kernels/cuda.py).
//
// apply v2 (forward and grad_x), from a host plan (dynadiag/kernels/plan.py):
//   a block owns one output tile of BR = 32 * TR outputs (lane l holds outputs l, l + 32, ...) and a strided set
//   of token tiles of BM = 8 * WM tokens. For each (token tile, chunk of the tile's diagonal list) it stages the
//   chunk's window of the *extended* source row (column j is src[:, j mod L], zero where j mod L >= A: the wrap
//   and the tall form's missing columns are resolved here, once per staged element) in shared memory, tokens
//   fastest, then every entry e of the chunk does, per output of the thread, one load of the pre-packed value
//   vpack[e, j] (zero where the diagonal has no element) and the 8 tokens at the entry's shift (two 16-byte shared
//   loads, one for 16-bit types; the column pitch is an odd number of 16-byte units, so they are conflict-free):
//   8 FMAs with no wrap, validity or index arithmetic beyond one add. Stages are double-buffered: the next stage's
//   cp.async copies are in flight while the current one computes (4- and 8-byte types); 16-bit types stage four
//   tokens of a column per thread through registers into one 8-byte store (cp.async cannot transpose).
//   Batch-1 path (few token tiles): WM = 1 and KS warps split a chunk's entries; their partial sums meet in shared
//   memory in a fixed order (deterministic, no atomics).
// sddmm v2 (grad_V): dV[k, t] = sum_n S[n, t] Q[n, (t + p_k) mod M].
//   A block owns BT = 128 positions t, a tile of KB <= 64 diagonals sized to K (K = 77: two tiles of 40, not
//   two of 64) and a slice of tokens.
//   It stages 4 tokens per stage, tokens fastest: S[n0:n0+4, t0:t0+BT] and the window of Q its diagonals read,
//   so one 16-byte shared load of Q feeds 4 FMAs (and one load of S is shared by the thread's 8 diagonals).
//   Slices write their own partial sums, partial[slice, k, t]; the caller adds them in a fixed order (no atomics:
//   bitwise deterministic under torch.use_deterministic_algorithms(True)).
#include <algorithm>

#include "diag_common.cuh"
#include "diag_kernels.cuh"

namespace dynadiag_cuda {
namespace {

using v2::AccOf;
using v2::copy_elem;
using v2::cp_async_commit;
using v2::cp_async_wait;
using v2::from_acc;
using v2::load4;
using v2::load8;
using v2::store4_16;
using v2::to_acc;
using v2::zero_of;

constexpr int kTM = 8;  // tokens per thread (apply)

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// ---------------------------------------------------------------------------------------------------------------
// apply v2
// ---------------------------------------------------------------------------------------------------------------
struct ApplyArgs {
  int N, A, B, L;
  int WM, KS;  // warps along tokens, warps splitting the diagonals
  int wbuf;    // columns per staging buffer (the plan's widest window)
  int tiles;   // output tiles
};

// Stage s of this block (token tile s / nchunk, chunk s % nchunk) into buf: BM token rows x W window columns.
template <typename T, int BR>
__device__ __forceinline__ void apply_stage(const T* __restrict__ src, T* buf, int4 chunk, int n0, int BM, int SP,
                                            const ApplyArgs& a, int tid, int nthreads) {
  auto wrap = [&](int col) {
    if (a.L < BR) {  // layers narrower than a tile: windows can wrap more than once (uniform branch)
      while (col >= a.L) col -= a.L;  // (no %: ptxas may call a division routine, which costs a stack frame)
    } else if (col >= a.L) {  // w0 < L and W <= L + BR - 1 (plan.py), so col < 2L: one subtraction
      col -= a.L;
    }
    return col;
  };
  if constexpr (sizeof(T) == 2) {  // four tokens of a column per thread, one 8-byte store (BM % 8 == 0)
    for (int m = 0; m < BM; m += 4) {
      const int n = n0 + m;
      const T* row = src + static_cast<int64_t>(n) * a.A;
      for (int i = tid; i < chunk.w; i += nthreads) {
        const int col = wrap(chunk.z + i);
        const bool ok = col < a.A;
        const T* p = row + col;
        store4_16(buf + i * SP + m, ok && n < a.N ? p : nullptr, ok && n + 1 < a.N ? p + a.A : nullptr,
                  ok && n + 2 < a.N ? p + 2 * a.A : nullptr, ok && n + 3 < a.N ? p + 3 * a.A : nullptr);
      }
    }
  } else {
    const T zero = zero_of<T>();
    for (int m = 0; m < BM; ++m) {
      const int n = n0 + m;
      const T* row = src + static_cast<int64_t>(n) * a.A;
      for (int i = tid; i < chunk.w; i += nthreads) {
        const int col = wrap(chunk.z + i);
        T* d = buf + i * SP + m;
        if (n < a.N && col < a.A) {
          copy_elem(d, row + col);
        } else {
          *d = zero;
        }
      }
    }
  }
}

template <typename T, int TR>
__device__ __forceinline__ void apply_compute(typename AccOf<T>::type (&acc)[kTM][TR], const T* __restrict__ vpack,
                                              const int* __restrict__ shifts, const T* xcol, int4 chunk, int SP,
                                              int ks, int KS) {
  using Acc = typename AccOf<T>::type;
  constexpr int BR = 32 * TR;
  const int lane = threadIdx.x;
  for (int e = chunk.x + ks; e < chunk.y; e += KS) {
    const int sh = __ldg(shifts + e);
    const T* vrow = vpack + static_cast<int64_t>(e) * BR + lane;
    const T* xp = xcol + (sh + lane) * SP;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const Acc v = to_acc(__ldg(vrow + 32 * j));
      Acc xv[kTM];
      load8(xp + 32 * j * SP, xv);
#pragma unroll
      for (int m = 0; m < kTM; ++m) acc[m][j] += v * xv[m];
    }
  }
}

// The thread's kTM x TR outputs (tokens n_base.., outputs r0 + lane + 32 j) to dst; the accumulators restart at 0.
template <typename T, int TR>
__device__ __forceinline__ void write_tile(typename AccOf<T>::type (&acc)[kTM][TR], T* __restrict__ dst, int n_base,
                                           int r0, const ApplyArgs& a) {
  using Acc = typename AccOf<T>::type;
#pragma unroll
  for (int m = 0; m < kTM; ++m) {
    const int n = n_base + m;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int r = r0 + threadIdx.x + 32 * j;
      if (n < a.N && r < a.B) dst[static_cast<int64_t>(n) * a.B + r] = from_acc<T>(acc[m][j]);
      acc[m][j] = Acc(0);
    }
  }
}

template <typename T, int TR>
__global__ void __launch_bounds__(256) apply_v2_kernel(const T* __restrict__ src, const T* __restrict__ vpack,
                                                       const int* __restrict__ shifts, const int4* __restrict__ chunks,
                                                       const int* __restrict__ tile_chunks, T* __restrict__ dst,
                                                       ApplyArgs a) {
  using Acc = typename AccOf<T>::type;
  constexpr int BR = 32 * TR;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int BM = a.WM * kTM;
  const int SP = v2::apply_pitch<T>(BM);  // column pitch: an odd number of 16-byte units, conflict-free LDS.128
  // Two staging buffers of wbuf columns (buffer b at smem + b * buf_elems: arithmetic, not a pointer array, which a
  // run-time index would put in local memory), then the split partial sums [KS - 1][WM][kTM][BR] (KS > 1).
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int buf_elems = a.wbuf * SP;
  Acc* red = reinterpret_cast<Acc*>(smem + 2 * buf_elems);

  const int lane = threadIdx.x;
  const int tw = threadIdx.y / a.KS;  // token group of the thread
  const int ks = threadIdx.y % a.KS;  // its share of the diagonals
  const int tid = threadIdx.y * 32 + lane;
  const int nthreads = 32 * blockDim.y;
  const int r0 = blockIdx.x * BR;
  const int cb = tile_chunks[blockIdx.x];
  const int nchunk = tile_chunks[blockIdx.x + 1] - cb;
  const int ntt = (a.N + BM - 1) / BM;
  const int my_tt = static_cast<int>(blockIdx.y) < ntt ? (ntt - 1 - blockIdx.y) / gridDim.y + 1 : 0;

  Acc acc[kTM][TR];
#pragma unroll
  for (int m = 0; m < kTM; ++m)
#pragma unroll
    for (int j = 0; j < TR; ++j) acc[m][j] = Acc(0);

  if (nchunk == 0) {  // no diagonal reaches this tile: zeros
    if (ks == 0)
      for (int tt = 0; tt < my_tt; ++tt) write_tile<T, TR>(acc, dst, (blockIdx.y + tt * gridDim.y) * BM + tw * kTM, r0, a);
    return;
  }
  const int stages = my_tt * nchunk;
  if (stages > 0) {
    apply_stage<T, BR>(src, smem, chunks[cb], blockIdx.y * BM, BM, SP, a, tid, nthreads);
    cp_async_commit();
  }
  const T* xoff = smem + tw * kTM;  // the thread's tokens inside a buffer
  // Stage s = (token tile tt, chunk ch), counted without divisions; (tt1, ch1) is stage s + 1.
  int tt = 0, ch = 0, tt1 = nchunk == 1 ? 1 : 0, ch1 = nchunk == 1 ? 0 : 1;
  for (int s = 0; s < stages; ++s) {
    if (s + 1 < stages) {  // prefetch the next stage into the other buffer (its readers finished at s - 1)
      apply_stage<T, BR>(src, smem + ((s + 1) & 1) * buf_elems, chunks[cb + ch1],
                         (blockIdx.y + tt1 * gridDim.y) * BM, BM, SP, a, tid, nthreads);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    apply_compute<T, TR>(acc, vpack, shifts, xoff + (s & 1) * buf_elems, chunks[cb + ch], SP, ks, a.KS);
    if (ch == nchunk - 1) {  // token tile done: combine the diagonal splits in a fixed order, write
      if (a.KS > 1) {
        if (ks > 0) {
#pragma unroll
          for (int m = 0; m < kTM; ++m)
#pragma unroll
            for (int j = 0; j < TR; ++j)
              red[(((ks - 1) * a.WM + tw) * kTM + m) * BR + lane + 32 * j] = acc[m][j];
        }
        __syncthreads();
        if (ks == 0) {
          for (int q = 1; q < a.KS; ++q)
#pragma unroll
            for (int m = 0; m < kTM; ++m)
#pragma unroll
              for (int j = 0; j < TR; ++j) acc[m][j] += red[(((q - 1) * a.WM + tw) * kTM + m) * BR + lane + 32 * j];
        }
      }
      if (ks == 0) {
        write_tile<T, TR>(acc, dst, (blockIdx.y + tt * gridDim.y) * BM + tw * kTM, r0, a);
      } else {
#pragma unroll
        for (int m = 0; m < kTM; ++m)
#pragma unroll
          for (int j = 0; j < TR; ++j) acc[m][j] = Acc(0);
      }
    }
    __syncthreads();  // buffer (s & 1) and red are free for stage s + 2
    tt = tt1, ch = ch1;
    if (++ch1 == nchunk) ch1 = 0, ++tt1;
  }
}

template <typename T, int TR>
cudaError_t launch_apply_v2(const void* src, const ApplyPlanView& plan, void* dst, const ApplyArgs& args,
                            const DeviceLimits& lim, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  constexpr int BR = 32 * TR;
  const int BM = args.WM * kTM;
  const size_t pitch = static_cast<size_t>(v2::apply_pitch<T>(BM)) * sizeof(T);
  const size_t red = args.KS > 1 ? static_cast<size_t>(args.KS - 1) * BM * BR * sizeof(Acc) : 0;
  const size_t smem = 2 * pitch * args.wbuf + red;
  if (smem > static_cast<size_t>(lim.smem_per_block_optin) || args.WM * args.KS * 32 > 256)
    return cudaErrorInvalidConfiguration;
  cudaError_t err = allow_smem(apply_v2_kernel<T, TR>, smem);
  if (err != cudaSuccess) return err;
  const int ntt = ceil_div(args.N, BM);
  // At most four blocks per SM (two waves of the two resident blocks the staging buffers are sized for), the rest of
  // the token tiles looped inside a block (the pipeline). Rounded down: rounding up left a partial third wave, e.g.
  // 18 tiles x 30 = 540 blocks for 528 slots on 132 SMs.
  const int gy = std::max(1, std::min({ntt, (4 * lim.num_sms) / args.tiles, 65535}));
  const dim3 grid(args.tiles, gy);
  const dim3 block(32, args.WM * args.KS);
  apply_v2_kernel<T, TR><<<grid, block, smem, stream>>>(
      static_cast<const T*>(src), static_cast<const T*>(plan.vpack), plan.shifts,
      reinterpret_cast<const int4*>(plan.chunks), plan.tile_chunks, static_cast<T*>(dst), args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t apply_v2_typed(const void* src, const ApplyPlanView& plan, void* dst, const ApplyArgs& args,
                           const DeviceLimits& lim, cudaStream_t stream) {
  // Tiles of 128 outputs (4 per lane); fp64 (gradcheck only) takes tiles of 64: 8 x 4 double accumulators would
  // spill. (Only these two instantiations: ptxas spilled a few bytes in the 64-wide 16-bit ones on sm_80.)
  if constexpr (sizeof(T) == 8) {
    if (plan.tile == 64) return launch_apply_v2<T, 2>(src, plan, dst, args, lim, stream);
  } else {
    if (plan.tile == 128) return launch_apply_v2<T, 4>(src, plan, dst, args, lim, stream);
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------------
// sddmm v2
// ---------------------------------------------------------------------------------------------------------------
constexpr int kTT = 4;         // positions per thread (stride 32): BT = 128
constexpr int kBT = 32 * kTT;  // positions per block
// Diagonals per thread (fp64 has no v2 sddmm: the op uses v1 for it).
template <typename T>
constexpr int kTK = 8;
constexpr int kBN = 4;         // tokens per stage (one 16-byte fp32 load)

struct SddmmArgs {
  int N, D, M, K;
  int KB;  // diagonals per block (a multiple of kTK<T>; blockDim.y = KB / kTK<T>)
  int tokens_per_slice;
  int wbuf;  // columns per buffer: kBT + the widest Q window
};

template <typename T>
__device__ __forceinline__ void sddmm_stage(const T* __restrict__ S, const T* __restrict__ Q, T* buf, int n0, int ne,
                                            int t0, int w0, int W, const SddmmArgs& a, int tid, int nthreads) {
  if constexpr (sizeof(T) == 2) {  // the kBN = 4 tokens of a column per thread, one 8-byte store
    for (int i = tid; i < kBT + W; i += nthreads) {
      const T* from = nullptr;  // the column in token n0's row
      int64_t ld;
      if (i < kBT) {
        ld = a.D;
        if (t0 + i < a.D) from = S + static_cast<int64_t>(n0) * a.D + t0 + i;
      } else {
        ld = a.M;
        int col = w0 + (i - kBT);
        if (a.M < kBT) {
          while (col >= a.M) col -= a.M;
        } else {  // col < 3M (see the 4-byte branch below)
          if (col >= a.M) col -= a.M;
          if (col >= a.M) col -= a.M;
        }
        from = Q + static_cast<int64_t>(n0) * a.M + col;
      }
      const bool ok = from != nullptr;
      store4_16(buf + i * kBN, ok && n0 < ne ? from : nullptr, ok && n0 + 1 < ne ? from + ld : nullptr,
                ok && n0 + 2 < ne ? from + 2 * ld : nullptr, ok && n0 + 3 < ne ? from + 3 * ld : nullptr);
    }
    return;
  }
  const T zero = zero_of<T>();
  const int items = (kBT + W) * kBN;
  for (int q = tid; q < items; q += nthreads) {  // q = column * kBN + token: contiguous in shared memory
    const int m = q & (kBN - 1);
    const int i = q >> 2;
    const int n = n0 + m;
    const T* from = nullptr;
    if (n < ne) {
      if (i < kBT) {
        const int t = t0 + i;
        if (t < a.D) from = S + static_cast<int64_t>(n) * a.D + t;
      } else {
        // col < w0 + W <= (M - 1) + (M - 1) + BT: below 3M once M >= BT, so two conditional subtractions bring it
        // into [0, M). (One is not enough: with D % BT != 0 the last position block reaches past D, and a span of
        // offsets wider than M - BT then runs the window past 2M, i.e. past the row and, on the last token, past Q.)
        int col = w0 + (i - kBT);
        if (a.M < kBT) {  // layers narrower than a block's positions: the window can wrap more than once
          while (col >= a.M) col -= a.M;
        } else {
          if (col >= a.M) col -= a.M;
          if (col >= a.M) col -= a.M;
        }
        from = Q + static_cast<int64_t>(n) * a.M + col;
      }
    }
    if (from != nullptr) {
      copy_elem(buf + q, from);
    } else {
      buf[q] = zero;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) sddmm_v2_kernel(const T* __restrict__ S, const T* __restrict__ Q,
                                                       const int64_t* __restrict__ off,
                                                       typename AccOf<T>::type* __restrict__ partial, SddmmArgs a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);  // two buffers of wbuf columns x kBN tokens
  const int buf_elems = a.wbuf * kBN;
  const int lane = threadIdx.x;
  const int tid = threadIdx.y * 32 + lane;
  const int nthreads = 32 * blockDim.y;
  const int t0 = blockIdx.x * kBT;
  const int k0 = blockIdx.y * a.KB;
  const int k1 = min(a.K, k0 + a.KB);
  const int nb = blockIdx.z * a.tokens_per_slice;
  const int ne = min(a.N, nb + a.tokens_per_slice);

  // The window of Q: extended columns [w0, w0 + W) with W = p_last - p_first + BT; diagonal k reads its BT
  // columns from base_k = p_k - p_first on (offsets sorted, so base_k >= 0).
  const int p_first = static_cast<int>(__ldg(off + k0));  // offsets < M <= INT32_MAX (checked by the op)
  const int W = static_cast<int>(__ldg(off + k1 - 1)) - p_first + kBT;
  int w0 = t0 + p_first;  // < 2M: one conditional subtraction (a 64-bit % would be a call with a stack frame)
  if (w0 >= a.M) w0 -= a.M;
  constexpr int TK = kTK<T>;
  int base[TK];
#pragma unroll
  for (int i = 0; i < TK; ++i) {
    const int k = k0 + threadIdx.y * TK + i;
    base[i] = k < k1 ? static_cast<int>(__ldg(off + k)) - p_first : 0;
  }
  Acc acc[TK][kTT];
#pragma unroll
  for (int i = 0; i < TK; ++i)
#pragma unroll
    for (int j = 0; j < kTT; ++j) acc[i][j] = Acc(0);

  const int stages = ne > nb ? (ne - nb + kBN - 1) / kBN : 0;
  if (stages > 0) {
    sddmm_stage(S, Q, smem, nb, ne, t0, w0, W, a, tid, nthreads);
    cp_async_commit();
  }
  for (int s = 0; s < stages; ++s) {
    if (s + 1 < stages) {
      sddmm_stage(S, Q, smem + ((s + 1) & 1) * buf_elems, nb + (s + 1) * kBN, ne, t0, w0, W, a, tid, nthreads);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* buf = smem + (s & 1) * buf_elems;
    Acc sv[kTT][kBN];
#pragma unroll
    for (int j = 0; j < kTT; ++j) load4(buf + (lane + 32 * j) * kBN, sv[j]);
#pragma unroll
    for (int i = 0; i < TK; ++i) {
      const T* qp = buf + (kBT + base[i] + lane) * kBN;
#pragma unroll
      for (int j = 0; j < kTT; ++j) {
        Acc qv[kBN];
        load4(qp + 32 * j * kBN, qv);
#pragma unroll
        for (int m = 0; m < kBN; ++m) acc[i][j] += sv[j][m] * qv[m];
      }
    }
    __syncthreads();
  }
  Acc* out = partial + static_cast<int64_t>(blockIdx.z) * a.K * a.D;
#pragma unroll
  for (int i = 0; i < TK; ++i) {
    const int k = k0 + threadIdx.y * TK + i;
#pragma unroll
    for (int j = 0; j < kTT; ++j) {
      const int t = t0 + lane + 32 * j;
      if (k < k1 && t < a.D) out[static_cast<int64_t>(k) * a.D + t] = acc[i][j];
    }
  }
}

struct SddmmLaunch {
  SddmmArgs args;
  dim3 grid, block;
  size_t smem;
};

template <typename T>
SddmmLaunch sddmm_v2_config(int64_t N, int64_t D, int64_t M, int64_t K, const DeviceLimits& lim) {
  SddmmLaunch c{};
  // At most 8 warps (256 threads: ~128 registers each, two blocks per SM).
  const int k_tiles = ceil_div(K, 8 * kTK<T>);
  const int KB = ceil_div(ceil_div(K, k_tiles), kTK<T>) * kTK<T>;  // diagonal tiles sized to K
  const int gx = ceil_div(D, kBT), gy = ceil_div(K, KB);
  const int64_t blocks = static_cast<int64_t>(gx) * gy;
  // Token slices: as many as fit in two blocks per SM without a partial last wave (rounding up left a tail, e.g.
  // 270 blocks for 264 slots on 132 SMs, which costs a whole extra wave of the slowest block).
  int64_t slices = std::max<int64_t>(1, (2 * lim.num_sms) / blocks);
  slices = std::min<int64_t>({slices, std::max<int64_t>(1, N / 64), 65535});
  const int per_slice = ceil_div(ceil_div(N, slices), kBN) * kBN;
  const int wbuf = 2 * kBT + static_cast<int>(M) - 1;  // S columns + the widest Q window (M + BT - 1)
  c.args = SddmmArgs{static_cast<int>(N), static_cast<int>(D), static_cast<int>(M), static_cast<int>(K), KB,
                     per_slice, wbuf};
  c.grid = dim3(gx, gy, ceil_div(N, per_slice));
  c.block = dim3(32, KB / kTK<T>);
  c.smem = 2 * static_cast<size_t>(wbuf) * kBN * sizeof(T);
  return c;
}

template <typename T>
cudaError_t sddmm_v2_typed(const void* S, const void* Q, const int64_t* off, void* partial, int64_t N, int64_t D,
                           int64_t M, int64_t K, const DeviceLimits& lim, cudaStream_t stream) {
  const SddmmLaunch c = sddmm_v2_config<T>(N, D, M, K, lim);
  if (c.smem > static_cast<size_t>(lim.smem_per_block_optin)) return cudaErrorInvalidConfiguration;
  cudaError_t err = allow_smem(sddmm_v2_kernel<T>, c.smem);
  if (err != cudaSuccess) return err;
  sddmm_v2_kernel<T><<<c.grid, c.block, c.smem, stream>>>(static_cast<const T*>(S), static_cast<const T*>(Q), off,
                                                            static_cast<typename AccOf<T>::type*>(partial), c.args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t diag_apply_v2(const void* src, ApplyPlanView plan, void* dst, int64_t N, int64_t A, int64_t B, bool tall,
                          int warps_tokens, int ksplit, DType dtype, DeviceLimits limits, cudaStream_t stream) {
  if (N == 0 || B == 0) return cudaSuccess;
  if (A <= 0 || N > INT32_MAX || A > INT32_MAX || B > INT32_MAX || (tall ? B < A : B > A) || warps_tokens < 1 ||
      ksplit < 1 || plan.max_window < 1)
    return cudaErrorInvalidValue;
  const ApplyArgs args{static_cast<int>(N), static_cast<int>(A), static_cast<int>(B),
                       static_cast<int>(std::max(A, B)), warps_tokens, ksplit, plan.max_window, plan.tiles};
  switch (dtype) {
    case DType::kFloat32:
      return apply_v2_typed<float>(src, plan, dst, args, limits, stream);
    case DType::kBFloat16:
      return apply_v2_typed<__nv_bfloat16>(src, plan, dst, args, limits, stream);
    case DType::kFloat16:
      return apply_v2_typed<__half>(src, plan, dst, args, limits, stream);
    case DType::kFloat64:
      return apply_v2_typed<double>(src, plan, dst, args, limits, stream);
  }
  return cudaErrorInvalidValue;
}

int diag_sddmm_v2_slices(int64_t N, int64_t D, int64_t M, int64_t K, DType dtype, DeviceLimits limits) {
  if (N == 0 || K == 0 || D == 0) return 0;
  switch (dtype) {
    case DType::kFloat64:
      return static_cast<int>(sddmm_v2_config<double>(N, D, M, K, limits).grid.z);
    case DType::kFloat32:
      return static_cast<int>(sddmm_v2_config<float>(N, D, M, K, limits).grid.z);
    default:
      return static_cast<int>(sddmm_v2_config<__half>(N, D, M, K, limits).grid.z);
  }
}

size_t diag_sddmm_v2_smem(int64_t N, int64_t D, int64_t M, int64_t K, DType dtype, DeviceLimits limits) {
  switch (dtype) {
    case DType::kFloat64:
      return sddmm_v2_config<double>(N, D, M, K, limits).smem;
    case DType::kFloat32:
      return sddmm_v2_config<float>(N, D, M, K, limits).smem;
    default:
      return sddmm_v2_config<__half>(N, D, M, K, limits).smem;
  }
}

cudaError_t diag_sddmm_v2(const void* S, const void* Q, const int64_t* offsets, void* partial, int64_t N, int64_t D,
                          int64_t M, int64_t K, DType dtype, DeviceLimits limits, cudaStream_t stream) {
  if (N == 0 || K == 0 || D == 0) return cudaSuccess;
  if (M < D || M > INT32_MAX || N > INT32_MAX) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return sddmm_v2_typed<float>(S, Q, offsets, partial, N, D, M, K, limits, stream);
    case DType::kBFloat16:
      return sddmm_v2_typed<__nv_bfloat16>(S, Q, offsets, partial, N, D, M, K, limits, stream);
    case DType::kFloat16:
      return sddmm_v2_typed<__half>(S, Q, offsets, partial, N, D, M, K, limits, stream);
    case DType::kFloat64:  // gradcheck only: v1 (ptxas spilled a few bytes in the fp64 instantiation on sm_80)
      return cudaErrorInvalidConfiguration;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dynadiag_cuda

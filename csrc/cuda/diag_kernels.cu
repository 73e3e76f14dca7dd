// CUDA-core kernels for frozen wrapped-diagonal layers (see diag_kernels.cuh for the two primitives).
//
// Why CUDA cores and not tensor cores: learned offsets are random, so every 16x16 tile of W holds a few
// diagonal fragments and a block-sparse tensor-core kernel would do dense work. Per diagonal the op is a
// shifted element-wise multiply-accumulate of activation columns, which these kernels do from shared memory.
//
// apply (forward and grad_x), output-stationary:
//   a block owns BM tokens x BRB outputs; each thread keeps kTM tokens x TR outputs in registers and sums
//   over the K active diagonals. For diagonal k the outputs r0..r0+BRB read the contiguous (wrapped) source
//   columns r0 -/+ p_k, so with offsets sorted a chunk of diagonals whose offsets span S reads a window of
//   S + BRB columns. The block stages that window of its BM token rows in shared memory once (all columns,
//   "full" mode, when the row fits) and every diagonal of the chunk reads it. Tokens are the fast axis in
//   shared memory, so per (diagonal, output) a thread does 16-byte loads of its 8 tokens and 8 FMAs with one
//   value V[k, .]; there is no reuse of activations across diagonals (offsets are random), so the bound is
//   shared-memory bandwidth: one element per FMA (a quarter of fp32 FMA peak, half for 16-bit inputs).
// sddmm (grad_V), a reduction over tokens per diagonal:
//   a block owns KB diagonals x BT positions t and a slice of the tokens; each thread keeps TK x TT partial
//   sums in registers, with the shared-memory column of every (k, t) precomputed once. Per token chunk the
//   block stages S[:, t0:t0+BT] and the window of Q that its (sorted) diagonals touch, then every thread does
//   TK*TT FMAs per token from shared memory. Token slices are combined with one atomicAdd per (k, t, slice), or, in
//   the deterministic mode, written to their own partial sums [slices, K, D] that the caller adds in a fixed order.
#include "diag_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

namespace dynadiag_cuda {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ T store_cast(typename AccOf<T>::type v) {
  return from_acc<T>(v);
}
template <>
__device__ __forceinline__ double store_cast<double>(double v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return store_cast<T>(typename AccOf<T>::type(0));
}

__device__ __forceinline__ int wrap_mod(long long v, int m) {
  long long r = v % m;
  return static_cast<int>(r < 0 ? r + m : r);
}

constexpr int kTM = 8;      // tokens per thread in apply
constexpr int kLanesR = 64;  // threads along the outputs in apply (blockDim.x)
constexpr int kTT = 4;       // positions t per thread in sddmm (stride 32)
constexpr int kTK = 8;       // diagonals per thread in sddmm
constexpr int kWarpsK = 8;   // warps along the diagonals in sddmm (blockDim.y)

// 8 consecutive elements <-> 16-byte vector accesses (pointers 16-byte aligned). bf16/fp16 are unpacked with
// bit operations so that nothing is reinterpreted through a register array's address (that forces local memory).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const double* p, double (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const double2 a = reinterpret_cast<const double2*>(p)[i];
    v[2 * i] = a.x, v[2 * i + 1] = a.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

__device__ __forceinline__ unsigned bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned bits16(__half v) { return __half_as_ushort(v); }

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(double* p, const double (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) reinterpret_cast<double2*>(p)[i] = make_double2(v[2 * i], v[2 * i + 1]);
}
template <typename H>
__device__ __forceinline__ void store8(H* p, const H (&v)[8]) {
  uint4 u;
  u.x = bits16(v[0]) | (bits16(v[1]) << 16);
  u.y = bits16(v[2]) | (bits16(v[3]) << 16);
  u.z = bits16(v[4]) | (bits16(v[5]) << 16);
  u.w = bits16(v[6]) | (bits16(v[7]) << 16);
  *reinterpret_cast<uint4*>(p) = u;
}

// Asynchronous global -> shared copy of one 4- or 8-byte element (sm_80+), and the wait for all of a thread's.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem), "n"(Bytes));
#else  // older GPUs: a plain copy
  using Word = typename std::conditional<Bytes == 8, unsigned long long, unsigned>::type;
  *static_cast<Word*>(smem) = *static_cast<const Word*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// apply: dst [N, B] from src [N, A]; grid (ceil(B / BRB), ceil(N / BM)), block (kLanesR, WM), BM = WM * kTM.
// Shared memory holds the window token-fastest, xs[i * SP + m] (column i, token m), so a thread reads its kTM = 8
// tokens of one column with 16-byte loads; the row pitch SP = BM + 16 bytes of padding puts the 8 lanes of each
// quarter-warp on distinct banks. wmax: columns that fit; the row is staged whole when L <= wmax.
// ---------------------------------------------------------------------------------------------------------------
// First index k in [0, K) with off[k] >= v (K if none); offsets sorted ascending. Uniform across the block.
__device__ __forceinline__ int lower_bound(const int64_t* __restrict__ off, int K, long long v) {
  int lo = 0, hi = K;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(off + mid) < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Stage columns [s0, s0 + W) (mod L) of the block's BM token rows into xs (token-fastest, pitch SP). Work items
// are (column, group of 8 tokens); each thread keeps 2 items = 16 independent loads in flight before storing.
template <typename T>
__device__ __forceinline__ void stage_window(const T* __restrict__ src, T* xs, int N, int A, int L, int n0, int BM,
                                             int SP, int s0, int W, int tid, int nthreads) {
  const int groups = BM / kTM;  // 1, 2 or 4
  const int shift = groups == 4 ? 2 : groups - 1;
  const int items = W * groups;
  const T zero = zero_of<T>();
  for (int q0 = tid; q0 < items; q0 += 2 * nthreads) {
    T v[2][kTM];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = q0 + u * nthreads;
      const int i = q >> shift;
      const int g = q & (groups - 1);
      int c = s0 + i;
      if (c >= L) c -= L;
      const bool in_range = q < items && c < A;
#pragma unroll
      for (int t = 0; t < kTM; ++t) {
        const int n = n0 + g * kTM + t;
        v[u][t] = (in_range && n < N) ? src[static_cast<int64_t>(n) * A + c] : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = q0 + u * nthreads;
      if (q < items) store8(xs + (q >> shift) * SP + (q & (groups - 1)) * kTM, v[u]);
    }
  }
}

// The thread's kTM x TR outputs += diagonals [kb, ke) read from the staged window [s0, s0 + W) (mod L).
template <typename T, int TR, bool TALL>
__device__ __forceinline__ void accumulate(typename AccOf<T>::type (&acc)[kTM][TR], const T* __restrict__ V,
                                           const int64_t* __restrict__ off, const T* xcol, int A, int B, int L,
                                           int D, int r0, int BX, int SP, int kb, int ke, int s0, int W) {
  using Acc = typename AccOf<T>::type;
#pragma unroll(sizeof(T) == 2 ? 1 : 2)
  for (int k = kb; k < ke; ++k) {
    const int p = static_cast<int>(__ldg(off + k));
    const T* vrow = V + static_cast<int64_t>(k) * D;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int r = r0 + threadIdx.x + j * BX;
      int c, vi;
      if (TALL) {
        c = r - p;
        if (c < 0) c += B;
        vi = c;
      } else {
        c = r + p;
        if (c >= A) c -= A;
        vi = r;
      }
      int idx = c - s0;
      if (idx < 0) idx += L;
      bool ok = r < B && static_cast<unsigned>(idx) < static_cast<unsigned>(W);
      if (TALL) ok = ok && static_cast<unsigned>(c) < static_cast<unsigned>(A);
      const Acc v = ok ? to_acc(__ldg(vrow + vi)) : Acc(0);
      if (!ok) idx = 0;
      Acc xv[kTM];
      load8(xcol + idx * SP, xv);
#pragma unroll
      for (int m = 0; m < kTM; ++m) acc[m][j] += v * xv[m];
    }
  }
}

template <typename T, int TR, bool TALL>
__global__ void __launch_bounds__(256, 2) apply_kernel(const T* __restrict__ src, const T* __restrict__ V,
                                                       const int64_t* __restrict__ off, T* __restrict__ dst, int N,
                                                       int A, int B, int K, int wmax) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);

  const int L = TALL ? B : A;  // circle the source columns live on (zeros at [A, B) in the tall form)
  const int D = TALL ? A : B;
  const int BX = blockDim.x;
  const int BM = blockDim.y * kTM;
  const int SP = BM + 16 / static_cast<int>(sizeof(T));
  const int BRB = BX * TR;
  const int n0 = blockIdx.y * BM;
  const int r0 = blockIdx.x * BRB;
  const int tid = threadIdx.y * BX + threadIdx.x;
  const int nthreads = BX * blockDim.y;
  const T* xcol = xs + threadIdx.y * kTM;

  // Diagonals that reach this block's outputs, as at most two ranges of (sorted) offsets. In the wide form every
  // diagonal covers every output. In the tall form diagonal p covers rows p .. p + A - 1 (mod B) only, so outputs
  // [r0, r1] need p in [r0 - A + 1, r1] (mod B): for fc1-like layers (B = 4A) that skips about 2/3 of the work.
  // (Scalars, not arrays: a run-time index into a register array would put it in local memory.)
  int b0 = 0, e0 = K, b1 = 0, e1 = 0;
  if (TALL) {
    const int r1 = min(r0 + BRB, B) - 1;
    const long long lo = static_cast<long long>(r0) - A + 1;
    if (r1 - lo + 1 < B) {
      e0 = lower_bound(off, K, static_cast<long long>(r1) + 1);
      if (lo >= 0) {
        b0 = lower_bound(off, K, lo);
      } else {
        b1 = lower_bound(off, K, lo + B);
        e1 = K;
      }
    }
  }

  Acc acc[kTM][TR];
#pragma unroll
  for (int m = 0; m < kTM; ++m)
#pragma unroll
    for (int j = 0; j < TR; ++j) acc[m][j] = Acc(0);

  if (L <= wmax) {
    // "Full" mode: the whole (circular) row fits, so stage it once for every diagonal.
    stage_window(src, xs, N, A, L, n0, BM, SP, 0, L, tid, nthreads);
    __syncthreads();
    accumulate<T, TR, TALL>(acc, V, off, xcol, A, B, L, D, r0, BX, SP, b0, e0, 0, L);
    accumulate<T, TR, TALL>(acc, V, off, xcol, A, B, L, D, r0, BX, SP, b1, e1, 0, L);
  } else {
    // Windowed mode: chunks of sorted diagonals whose offsets span at most wmax - BRB read a window of at most
    // wmax columns.
#pragma unroll 1
    for (int seg = 0; seg < 2; ++seg) {
      int kb = seg == 0 ? b0 : b1;
      const int kend = seg == 0 ? e0 : e1;
      while (kb < kend) {
        const int p_first = static_cast<int>(__ldg(off + kb));
        int ke = kb + 1;
        while (ke < kend && static_cast<int>(__ldg(off + ke)) - p_first + BRB <= wmax) ++ke;
        const int p_last = static_cast<int>(__ldg(off + ke - 1));
        const int W = min(max(p_last - p_first + BRB, 1), wmax);  // clamp: unsorted offsets stay memory-safe
        const int s0 = TALL ? wrap_mod(static_cast<long long>(r0) - p_last, L)
                            : wrap_mod(static_cast<long long>(r0) + p_first, L);
        __syncthreads();  // the previous chunk is done reading xs
        stage_window(src, xs, N, A, L, n0, BM, SP, s0, W, tid, nthreads);
        __syncthreads();
        accumulate<T, TR, TALL>(acc, V, off, xcol, A, B, L, D, r0, BX, SP, kb, ke, s0, W);
        kb = ke;
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kTM; ++m) {
    const int n = n0 + threadIdx.y * kTM + m;
    if (n >= N) continue;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int r = r0 + threadIdx.x + j * BX;
      if (r < B) dst[static_cast<int64_t>(n) * B + r] = store_cast<T>(acc[m][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// sddmm: out [K, D] += S [N, D] (x) Q [N, M] on the diagonals; grid (ceil(D / BT), ceil(K / KB), slices),
// block (32, kWarpsK); BT = 32 * kTT, KB = kWarpsK * kTK. smem_elems: shared-memory capacity in elements.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) sddmm_kernel(const T* __restrict__ S, const T* __restrict__ Q,
                                                    const int64_t* __restrict__ off,
                                                    typename AccOf<T>::type* __restrict__ out, int N, int D, int M,
                                                    int K, int tokens_per_slice, int smem_elems,
                                                    int64_t slice_stride) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);

  constexpr int BT = 32 * kTT;
  const int KB = blockDim.y * kTK;
  const int t0 = blockIdx.x * BT;
  const int k0 = blockIdx.y * KB;
  const int k1 = min(K, k0 + KB);
  const int nb = blockIdx.z * tokens_per_slice;
  const int ne = min(N, nb + tokens_per_slice);
  if (k0 >= K || nb >= ne) return;  // uniform across the block
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;

  // Window of Q columns touched by diagonals [k0, k1) at positions [t0, t0 + BT).
  const int p_first = static_cast<int>(__ldg(off + k0));
  const int p_last = static_cast<int>(__ldg(off + k1 - 1));
  int W = p_last - p_first + BT;
  int s0;
  if (W >= M || W <= 0) {
    W = M;
    s0 = 0;
  } else {
    s0 = wrap_mod(static_cast<long long>(t0) + p_first, M);
  }
  const int rowlen = BT + W;  // per staged token: BT values of S, then W values of Q
  const int BN = min(64, max(1, smem_elems / rowlen));

  // Shared-memory position of Q[n, (t + p_k) mod M] for each (k, t) of the thread (-1: not a valid pair).
  auto position = [&](int i, int j) {
    const int k = k0 + threadIdx.y * kTK + i;
    const int t = t0 + threadIdx.x + 32 * j;
    if (k >= k1 || t >= D) return -1;
    const int c = wrap_mod(static_cast<long long>(t) + __ldg(off + k), M);
    int id = c - s0;
    if (id < 0) id += M;
    return id < W ? BT + id : -1;
  };
  int idx[kTK][kTT];
#pragma unroll
  for (int i = 0; i < kTK; ++i)
#pragma unroll
    for (int j = 0; j < kTT; ++j) idx[i][j] = max(position(i, j), 0);

  Acc acc[kTK][kTT];
#pragma unroll
  for (int i = 0; i < kTK; ++i)
#pragma unroll
    for (int j = 0; j < kTT; ++j) acc[i][j] = Acc(0);

  const T zero = zero_of<T>();
  for (int n = nb; n < ne; n += BN) {
    const int nn = min(BN, ne - n);
    __syncthreads();  // the previous chunk is done reading sm
    // Stage nn tokens x [S tile (BT) | Q window (W)]. 4- and 8-byte types use cp.async: a thread issues all its
    // copies without waiting on any (a plain load-then-store loop waits one L2 round trip per element, which made
    // this kernel latency-bound), and the copies need no registers. 16-bit types take the register path.
    for (int m = 0; m < nn; ++m) {
      T* row = sm + m * rowlen;
      const T* srow = S + static_cast<int64_t>(n + m) * D;
      const T* qrow = Q + static_cast<int64_t>(n + m) * M;
      for (int i = tid; i < rowlen; i += nthreads) {
        const T* from = nullptr;
        if (i < BT) {
          const int t = t0 + i;
          if (t < D) from = srow + t;
        } else {
          int c = s0 + (i - BT);
          if (c >= M) c -= M;
          from = qrow + c;
        }
        if constexpr (sizeof(T) >= 4) {
          if (from != nullptr) {
            cp_async<sizeof(T)>(row + i, from);
          } else {
            row[i] = zero;
          }
        } else {
          row[i] = from != nullptr ? *from : zero;
        }
      }
    }
    if constexpr (sizeof(T) >= 4) cp_async_wait_all();
    __syncthreads();
    for (int m = 0; m < nn; ++m) {
      const T* row = sm + m * rowlen;
      Acc s[kTT];
#pragma unroll
      for (int j = 0; j < kTT; ++j) s[j] = to_acc(row[threadIdx.x + 32 * j]);
#pragma unroll
      for (int i = 0; i < kTK; ++i)
#pragma unroll
        for (int j = 0; j < kTT; ++j) acc[i][j] += s[j] * to_acc(row[idx[i][j]]);
    }
  }

#pragma unroll
  for (int i = 0; i < kTK; ++i) {
    const int k = k0 + threadIdx.y * kTK + i;
#pragma unroll
    for (int j = 0; j < kTT; ++j) {
      const int t = t0 + threadIdx.x + 32 * j;
      if (position(i, j) < 0) continue;
      if (slice_stride == 0) {
        atomicAdd(out + static_cast<int64_t>(k) * D + t, acc[i][j]);
      } else {  // deterministic: this slice's own partial sums (one writer per element)
        out[blockIdx.z * slice_stride + static_cast<int64_t>(k) * D + t] = acc[i][j];
      }
    }
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int TR, bool TALL>
cudaError_t launch_apply(const T* src, const T* V, const int64_t* off, T* dst, int64_t N, int A, int B, int K, int WM,
                         const DeviceLimits& lim, cudaStream_t stream) {
  const int BM = WM * kTM;
  const int BRB = kLanesR * TR;
  const int L = TALL ? B : A;
  // 28 KiB of staging per warp row (112 KiB for the 256-thread block on an H100), capped so that two blocks fit
  // on an SM (1 KiB per block is reserved by the system).
  const int budget = std::min({28 * 1024 * WM, lim.smem_per_sm / 2 - 1024, lim.smem_per_block_optin});
  const int pitch = (BM + 16 / static_cast<int>(sizeof(T))) * static_cast<int>(sizeof(T));  // bytes per column
  int wmax = budget / pitch;
  if (wmax >= L) {
    wmax = L;
  } else if (wmax < BRB + 1) {
    return cudaErrorInvalidConfiguration;  // cannot happen with the configurations chosen below
  }
  const size_t smem = static_cast<size_t>(pitch) * wmax;
  cudaError_t err = allow_smem(apply_kernel<T, TR, TALL>, smem);
  if (err != cudaSuccess) return err;
  const dim3 block(kLanesR, WM);
  const int64_t max_rows = static_cast<int64_t>(65535) * BM;  // gridDim.y limit: launch in token chunks
  for (int64_t n0 = 0; n0 < N; n0 += max_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(max_rows, N - n0));
    const dim3 grid(ceil_div(B, BRB), ceil_div(rows, BM));
    apply_kernel<T, TR, TALL>
        <<<grid, block, smem, stream>>>(src + n0 * A, V, off, dst + n0 * B, rows, A, B, K, wmax);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t apply_typed(const void* src, const void* values, const int64_t* off, void* dst, int64_t N, int64_t A,
                        int64_t B, int64_t K, bool tall, const DeviceLimits& lim, cudaStream_t stream) {
  const int num_sms = lim.num_sms;
  // Largest tiles that still give about two blocks per SM: small token counts (batch-1 inference) need
  // narrower tiles to fill the GPU.
  // fp64 (gradcheck only) keeps at most 2 outputs per thread: 4 x 8 double accumulators would spill.
  int TR = sizeof(T) == 8 ? 2 : 4, WM = 4;
  auto blocks = [&](int tr, int wm) { return static_cast<int64_t>(ceil_div(B, kLanesR * tr)) * ceil_div(N, kTM * wm); };
  while (TR > 1 && blocks(TR, WM) < 2 * num_sms) TR /= 2;
  while (WM > 1 && blocks(TR, WM) < 2 * num_sms) WM /= 2;
  const T* s = static_cast<const T*>(src);
  const T* v = static_cast<const T*>(values);
  T* d = static_cast<T*>(dst);
  const int a = static_cast<int>(A), b = static_cast<int>(B), k = static_cast<int>(K);
#define DYNADIAG_APPLY(TR_)                                                                   \
  return tall ? launch_apply<T, TR_, true>(s, v, off, d, N, a, b, k, WM, lim, stream) \
              : launch_apply<T, TR_, false>(s, v, off, d, N, a, b, k, WM, lim, stream);
  if (TR == 1) DYNADIAG_APPLY(1)
  if constexpr (sizeof(T) == 8) {
    DYNADIAG_APPLY(2)
  } else {
    if (TR == 2) DYNADIAG_APPLY(2)
    DYNADIAG_APPLY(4)
  }
#undef DYNADIAG_APPLY
}

// Token slices of the sddmm launch: enough blocks for about two waves, but at least 128 tokens per slice.
int sddmm_slices(int64_t N, int64_t D, int64_t K, int num_sms) {
  const int gx = ceil_div(D, 32 * kTT), gy = ceil_div(K, kWarpsK * kTK);
  int64_t slices = std::max<int64_t>(1, (2 * num_sms + gx * gy - 1) / (static_cast<int64_t>(gx) * gy));
  slices = std::min<int64_t>({slices, std::max<int64_t>(1, N / 128), 65535});
  return ceil_div(N, ceil_div(N, slices));  // the grid's z extent (ceil(N / tokens per slice))
}

template <typename T>
cudaError_t sddmm_typed(const void* S, const void* Q, const int64_t* off, void* out, int64_t N, int64_t D, int64_t M,
                        int64_t K, bool deterministic, const DeviceLimits& lim, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  constexpr int BT = 32 * kTT;
  const int KB = kWarpsK * kTK;
  // Two blocks per SM; a block must hold at least one token's S tile and whole Q row (the widest window).
  const size_t need = static_cast<size_t>(M + BT) * sizeof(T);
  const size_t two_per_sm = static_cast<size_t>(std::min(lim.smem_per_sm / 2 - 1024, lim.smem_per_block_optin));
  const size_t smem = std::max(two_per_sm, need);
  if (smem > static_cast<size_t>(lim.smem_per_block_optin)) return cudaErrorInvalidConfiguration;
  cudaError_t err = allow_smem(sddmm_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const int gx = ceil_div(D, BT), gy = ceil_div(K, KB);
  const int slices = sddmm_slices(N, D, K, lim.num_sms);
  const int per_slice = ceil_div(N, slices);
  const dim3 grid(gx, gy, slices);
  const dim3 block(32, kWarpsK);
  sddmm_kernel<T><<<grid, block, smem, stream>>>(static_cast<const T*>(S), static_cast<const T*>(Q), off,
                                                  static_cast<Acc*>(out), static_cast<int>(N), static_cast<int>(D),
                                                  static_cast<int>(M), static_cast<int>(K), per_slice,
                                                  static_cast<int>(smem / sizeof(T)), deterministic ? K * D : 0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t diag_apply(const void* src, const void* values, const int64_t* offsets, void* dst, int64_t N, int64_t A,
                       int64_t B, int64_t K, bool tall, DType dtype, DeviceLimits limits, cudaStream_t stream) {
  if (N == 0 || B == 0) return cudaSuccess;
  if (A <= 0 || K < 0 || A > INT32_MAX || B > INT32_MAX || (tall ? B < A : B > A)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return apply_typed<float>(src, values, offsets, dst, N, A, B, K, tall, limits, stream);
    case DType::kBFloat16:
      return apply_typed<__nv_bfloat16>(src, values, offsets, dst, N, A, B, K, tall, limits, stream);
    case DType::kFloat16:
      return apply_typed<__half>(src, values, offsets, dst, N, A, B, K, tall, limits, stream);
    case DType::kFloat64:
      return apply_typed<double>(src, values, offsets, dst, N, A, B, K, tall, limits, stream);
  }
  return cudaErrorInvalidValue;
}

int diag_sddmm_slices(int64_t N, int64_t D, int64_t K, DeviceLimits limits) {
  if (N == 0 || K == 0 || D == 0) return 0;
  return sddmm_slices(N, D, K, limits.num_sms);
}

cudaError_t diag_sddmm(const void* S, const void* Q, const int64_t* offsets, void* out, int64_t N, int64_t D,
                       int64_t M, int64_t K, bool deterministic, DType dtype, DeviceLimits limits,
                       cudaStream_t stream) {
  if (N == 0 || K == 0 || D == 0) return cudaSuccess;
  if (M < D || M > INT32_MAX || N > INT32_MAX) return cudaErrorInvalidValue;
  const bool det = deterministic;
  switch (dtype) {
    case DType::kFloat32:
      return sddmm_typed<float>(S, Q, offsets, out, N, D, M, K, det, limits, stream);
    case DType::kBFloat16:
      return sddmm_typed<__nv_bfloat16>(S, Q, offsets, out, N, D, M, K, det, limits, stream);
    case DType::kFloat16:
      return sddmm_typed<__half>(S, Q, offsets, out, N, D, M, K, det, limits, stream);
    case DType::kFloat64:
      return sddmm_typed<double>(S, Q, offsets, out, N, D, M, K, det, limits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dynadiag_cuda

// CUDA kernels for wrapped-diagonal sparse matrices: launch interface (no torch headers, so plain `nvcc -c`
// can compile diag_kernels.cu on machines without torch or a GPU).
//
// Index map (csrc/schema.cpp): W is [out, in], P = max(in, out), D = min(in, out).
//   out >= in: element t of diagonal p sits at W[(t + p) % out, t]
//   out <  in: element t of diagonal p sits at W[t, (t + p) % in]
//
// Every op of the frozen layer is one of two primitives on token-major activations (rows = tokens):
//
//   apply, "tall" form (B >= A, D = A):  dst[n, r] = sum_k V[k, c] * src[n, c],  c = (r - p_k) mod B, if c < A
//   apply, "wide" form (B <= A, D = B):  dst[n, r] = sum_k V[k, r] * src[n, (r + p_k) mod A]
//   sddmm:                               dV[k, t]  = sum_n S[n, t] * Q[n, (t + p_k) mod M],   t < D
//
//   forward  y = x W^T:  apply(src = x [N, in], A = in, B = out), tall iff out >= in
//   grad_x  = grad_y W:  apply(src = grad_y, A = out, B = in), the other form (the transposed pattern)
//   grad_V:              sddmm(S = x, Q = grad_y, M = out) if out >= in, else sddmm(S = grad_y, Q = x, M = in)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dynadiag_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// dst [N, B] = apply(src [N, A]) with the K diagonals values [K, D] at offsets [K] (int64, sorted ascending, in
// [0, max(A, B))). All pointers are device pointers to contiguous row-major tensors of `dtype` (offsets int64).
// Unsorted or out-of-range offsets give wrong results but never touch memory outside the tensors.
// The device limits come from cudaDeviceGetAttribute: multiprocessor count, opt-in shared memory per block and
// shared memory per multiprocessor (the kernels size their tiles for two blocks per SM).
struct DeviceLimits {
  int num_sms;
  int smem_per_block_optin;
  int smem_per_sm;
};

cudaError_t diag_apply(const void* src, const void* values, const int64_t* offsets, void* dst, int64_t N, int64_t A,
                       int64_t B, int64_t K, bool tall, DType dtype, DeviceLimits limits, cudaStream_t stream);

// sddmm(S [N, D], Q [N, M]) into `out` (accumulator type: float, or double for kFloat64; zero-initialised by the
// caller). Offsets as above, in [0, M). The tokens are split into diag_sddmm_slices(...) slices:
//   deterministic = false: out [K, D] += every slice's sums through atomicAdd (the order varies between runs);
//   deterministic = true:  out [slices, K, D], each slice's own sums (no atomics); the caller adds them in a fixed
//                          order, which gives bitwise-identical results run to run.
int diag_sddmm_slices(int64_t N, int64_t D, int64_t K, DeviceLimits limits);
cudaError_t diag_sddmm(const void* S, const void* Q, const int64_t* offsets, void* out, int64_t N, int64_t D,
                       int64_t M, int64_t K, bool deterministic, DType dtype, DeviceLimits limits,
                       cudaStream_t stream);

// ---- v2 (diag_kernels_v2.cu). UNVALIDATED ON HARDWARE: compiled for sm_80/sm_90 in CI, never run on a GPU yet;
// the v1 functions above stay the default (dynadiag/kernels/cuda.py: DYNADIAG_CUDA_KERNELS=v2 selects these).

// A host plan for one apply primitive (dynadiag/kernels/plan.py), as device pointers: per output tile of `tile`
// outputs (64 or 128) a range of chunks; per chunk (entry_begin, entry_end, w0, W) as int4: the entries and the
// window [w0, w0 + W) of the extended source row (column j = src[:, j mod L], zero where j mod L >= A) it stages;
// per entry its shift inside the window and `tile` pre-packed values (vpack [E, tile], the activations' dtype).
struct ApplyPlanView {
  const int* tile_chunks;  // [tiles + 1]
  const int* chunks;       // [C, 4], 16-byte aligned
  const int* shifts;       // [E]
  const void* vpack;       // [E, tile]
  int tiles;
  int tile;
  int max_window;  // widest chunk window (the staging buffers' width)
};

// dst [N, B] = apply(src [N, A]) from a plan. warps_tokens x 8 tokens per token tile; ksplit warps share a tile's
// diagonals (the batch-1 path; their sums meet in a fixed order). Returns cudaErrorInvalidConfiguration when the
// plan's window does not fit in shared memory; the Python wrapper (dynadiag/kernels/cuda_v2.py, apply) checks
// that before it launches and takes the v1 kernel instead, so the op itself only reports it.
cudaError_t diag_apply_v2(const void* src, ApplyPlanView plan, void* dst, int64_t N, int64_t A, int64_t B, bool tall,
                          int warps_tokens, int ksplit, DType dtype, DeviceLimits limits, cudaStream_t stream);

// partial [slices, K, D] (float; every element written) = per-token-slice sddmm(S, Q) with
// offsets sorted ascending in [0, M); the caller sums over slices (deterministic). slices and the shared memory
// it needs come from the two helpers; smem > limits.smem_per_block_optin means: use v1's deterministic mode (the
// op does; also for kFloat64, which returns cudaErrorInvalidConfiguration here). fp32, bf16 and fp16 only.
int diag_sddmm_v2_slices(int64_t N, int64_t D, int64_t M, int64_t K, DType dtype, DeviceLimits limits);
size_t diag_sddmm_v2_smem(int64_t N, int64_t D, int64_t M, int64_t K, DType dtype, DeviceLimits limits);
cudaError_t diag_sddmm_v2(const void* S, const void* Q, const int64_t* offsets, void* partial, int64_t N, int64_t D,
                          int64_t M, int64_t K, DType dtype, DeviceLimits limits, cudaStream_t stream);

}  // namespace dynadiag_cuda

// Device helpers for the v2 kernels (diag_kernels_v2.cu): accumulator types, vector loads of 4 or 8 consecutive
// elements from shared memory, and cp.async staging. No torch headers (plain nvcc -c compiles the kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace dynadiag_cuda {
namespace v2 {

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
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(typename AccOf<T>::type(0));
}

// Two 16-bit values packed in a 32-bit word -> two floats (bit operations: nothing goes through local memory).
__device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi, const __nv_bfloat16*) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi, const __half*) {
  lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// 4 consecutive elements (16-byte aligned for 4-byte types, 8-byte for 16-bit ones) -> accumulator type.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
template <typename H>
__device__ __forceinline__ void load4(const H* p, float (&v)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  unpack2(u.x, v[0], v[1], p);
  unpack2(u.y, v[2], v[3], p);
}

// 8 consecutive elements = two load4 (4- and 8-byte types: two 16-byte loads, or four for fp64).
template <typename T, typename Acc>
__device__ __forceinline__ void load8(const T* p, Acc (&v)[8]) {
  Acc a[4], b[4];
  load4(p, a);
  load4(p + 4, b);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = a[i], v[4 + i] = b[i];
}
// 16-bit types: one 16-byte load (16-byte aligned). Two 8-byte loads per 8 tokens were 2- to 4-way
// bank-conflicted at the batch-1 pitch; a 16-byte load at a column pitch that is an odd multiple of 16 bytes
// (apply_pitch) is conflict-free: each quarter-warp phase then covers all 32 banks.
template <typename H>
__device__ __forceinline__ void load8_16(const H* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  unpack2(u.x, v[0], v[1], p);
  unpack2(u.y, v[2], v[3], p);
  unpack2(u.z, v[4], v[5], p);
  unpack2(u.w, v[6], v[7], p);
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) { load8_16(p, v); }
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) { load8_16(p, v); }

// Shared-memory column pitch (elements) of the apply staging buffers for BM tokens: the BM elements rounded up to
// an odd multiple of 16 bytes, so that the 16-byte loads of 8 lanes at consecutive columns hit distinct banks.
template <typename T>
__host__ __device__ constexpr int apply_pitch(int BM) {
  const int units = (BM * static_cast<int>(sizeof(T)) + 15) / 16;
  return (units | 1) * 16 / static_cast<int>(sizeof(T));
}

// Four 16-bit elements from up to four rows (nullptr: zero) -> one 8-byte shared-memory store. cp.async cannot stage
// 16-bit types into a tokens-fastest layout (its smallest copy is 4 contiguous bytes, which are two tokens, i.e. two
// rows in global memory), so 16-bit staging goes through registers: four independent loads in flight per thread and
// one store instead of four sub-word ones. `smem` must be 8-byte aligned.
template <typename H>
__device__ __forceinline__ void store4_16(H* smem, const H* p0, const H* p1, const H* p2, const H* p3) {
  auto bits = [](const H* p) -> unsigned {
    return p != nullptr ? static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p))) : 0u;
  };
  uint2 w;
  w.x = bits(p0) | (bits(p1) << 16);  // little endian: the lower half is the first token (unpack2's order)
  w.y = bits(p2) | (bits(p3) << 16);
  *reinterpret_cast<uint2*>(smem) = w;
}

// One element global -> shared. 4- and 8-byte types use cp.async (sm_80+): the copy needs no register and the
// thread does not wait for it, so staging the next stage overlaps with computing the current one. 16-bit types
// cannot use cp.async element-wise (its smallest copy is 4 bytes): the kernels stage them with store4_16.
template <typename T>
__device__ __forceinline__ void copy_elem(T* smem, const T* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) >= 4) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem), "n"(sizeof(T)));
    return;
  }
#endif
  *smem = *gmem;
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace v2
}  // namespace dynadiag_cuda

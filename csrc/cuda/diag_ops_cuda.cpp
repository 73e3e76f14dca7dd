// CUDA implementations of the dynadiag ops (schemas in csrc/schema.cpp): input checks, dtype dispatch and the
// current stream; the kernels themselves are in diag_kernels.cu (no torch headers there).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../dd_check.h"
#include "diag_kernels.cuh"

namespace {

using dynadiag::num;
using dynadiag_cuda::DType;

DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      DD_CHECK(false, op, ": CUDA kernels support float32, bfloat16, float16 and float64, got ", t);
  }
  return DType::kFloat32;  // unreachable: DD_CHECK(false, ...) throws
}

// Checks shared by the three ops: devices, dtypes, ranks and the [K, D] / [K] shapes.
void check_inputs(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, int64_t in,
                  int64_t out, int64_t values_cols) {
  DD_CHECK(in > 0 && out > 0, op, ": in_features and out_features must be positive, got ", num(in), " and ",
              num(out));
  DD_CHECK(a.is_cuda() && b.is_cuda() && offsets.is_cuda(), op, ": all tensors must be CUDA tensors");
  DD_CHECK(a.device() == b.device() && a.device() == offsets.device(), op, ": tensors are on different devices");
  DD_CHECK(a.dim() == 2 && b.dim() == 2, op, ": expected 2-D inputs");
  DD_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtype mismatch (", a.scalar_type(), " vs ",
              b.scalar_type(), ")");
  DD_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, op, ": offsets must be a 1-D int64 tensor");
  const int64_t D = std::min(in, out);
  DD_CHECK(values_cols < 0 || values_cols == D, op, ": values must have min(in, out) = ", num(D), " columns, got ",
              num(values_cols));
  DD_CHECK(std::max(in, out) <= INT32_MAX, op, ": layers wider than 2^31 - 1 are not supported");
}

// Offsets must be strictly ascending and in [0, P) (csrc/dd_check.h). Checking them needs their values on the
// host, i.e. a device synchronisation, so each offsets tensor is checked once per version: a frozen layer's
// offsets buffer never changes, so training and CUDA-graph replays (after one eager warm-up call) never sync here.
// The cache holds weak references, so a freed tensor whose TensorImpl address is reused is checked again.
void check_offsets_cached(const at::Tensor& offsets, int64_t P, const char* op) {
  struct Seen {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
    const void* data;
    int64_t version;
    int64_t P;
  };
  static std::mutex mu;
  static std::unordered_map<const c10::TensorImpl*, Seen> seen;
  const bool versioned = !offsets.is_inference();  // inference tensors have no version counter: always check
  const c10::TensorImpl* key = offsets.unsafeGetTensorImpl();
  if (versioned) {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = seen.find(key);
    if (it != seen.end() && !it->second.impl.expired() && it->second.data == offsets.const_data_ptr() &&
        it->second.version == offsets._version() && it->second.P == P)
      return;
  }
  const at::Tensor host = offsets.cpu().contiguous();
  dynadiag::check_offsets_host(host.const_data_ptr<int64_t>(), host.numel(), P, op);
  if (versioned) {
    const std::lock_guard<std::mutex> lock(mu);
    if (seen.size() > 4096) {
      for (auto it = seen.begin(); it != seen.end();) it = it->second.impl.expired() ? seen.erase(it) : std::next(it);
    }
    seen.insert_or_assign(key, Seen{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                        offsets.getIntrusivePtr()),
                                    offsets.const_data_ptr(), offsets._version(), P});
  }
}

struct Launch {
  cudaStream_t stream;
  dynadiag_cuda::DeviceLimits limits;
};

// Current stream and the device limits the launch heuristics need. cudaDeviceGetAttribute is a cheap query
// (unlike cudaGetDeviceProperties); ATen/cuda/CUDAContext.h would also work but pulls in cuBLAS and cuSPARSE
// headers that minimal toolkits (like the CI's) do not ship.
Launch launch_info(const at::Tensor& t) {
  const int device = t.get_device();
  dynadiag_cuda::DeviceLimits lim{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return {c10::cuda::getCurrentCUDAStream(device).stream(), lim};
}

at::Tensor diag_fwd_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets,
                         int64_t out_features) {
  DD_CHECK(x.dim() == 2 && values.dim() == 2, "diag_fwd: x must be [N, in] and values [K, D]");
  const int64_t in = x.size(1);
  check_inputs("diag_fwd", x, values, offsets, in, out_features, values.size(1));
  DD_CHECK(offsets.size(0) == values.size(0), "diag_fwd: ", num(values.size(0)), " diagonals but ",
              num(offsets.size(0)), " offsets");
  const c10::cuda::CUDAGuard guard(x.device());
  check_offsets_cached(offsets, std::max(in, out_features), "diag_fwd");
  const at::Tensor xc = x.contiguous(), vc = values.contiguous(), oc = offsets.contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  const Launch l = launch_info(x);
  C10_CUDA_CHECK(dynadiag_cuda::diag_apply(xc.const_data_ptr(), vc.const_data_ptr(), oc.const_data_ptr<int64_t>(),
                                           y.mutable_data_ptr(), x.size(0), in, out_features, vc.size(0),
                                           /*tall=*/out_features >= in, kernel_dtype(x.scalar_type(), "diag_fwd"),
                                           l.limits, l.stream));
  return y;
}

at::Tensor diag_bwd_x_cuda(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& offsets,
                           int64_t in_features) {
  DD_CHECK(grad_y.dim() == 2 && values.dim() == 2, "diag_bwd_x: grad_y must be [N, out] and values [K, D]");
  const int64_t out = grad_y.size(1);
  check_inputs("diag_bwd_x", grad_y, values, offsets, in_features, out, values.size(1));
  DD_CHECK(offsets.size(0) == values.size(0), "diag_bwd_x: ", num(values.size(0)), " diagonals but ",
              num(offsets.size(0)), " offsets");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  check_offsets_cached(offsets, std::max(out, in_features), "diag_bwd_x");
  const at::Tensor gc = grad_y.contiguous(), vc = values.contiguous(), oc = offsets.contiguous();
  at::Tensor grad_x = at::empty({grad_y.size(0), in_features}, grad_y.options());
  const Launch l = launch_info(grad_y);
  // grad_x = grad_y W: the transposed pattern, i.e. the other form with source = grad_y.
  C10_CUDA_CHECK(dynadiag_cuda::diag_apply(gc.const_data_ptr(), vc.const_data_ptr(), oc.const_data_ptr<int64_t>(),
                                           grad_x.mutable_data_ptr(), grad_y.size(0), out, in_features, vc.size(0),
                                           /*tall=*/!(out >= in_features),
                                           kernel_dtype(grad_y.scalar_type(), "diag_bwd_x"), l.limits, l.stream));
  return grad_x;
}

// The v1 grad_values kernel on checked inputs. Token slices meet in an fp32 (fp64 for double) buffer: through
// atomics (fast, run-to-run order varies), or, when `deterministic`, as per-slice partial sums added in a fixed
// order (bitwise reproducible; one [slices, K, D] buffer more).
at::Tensor v1_grad_values(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& offsets,
                          bool deterministic) {
  const int64_t in = x.size(1), out = grad_y.size(1);
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), oc = offsets.contiguous();
  const int64_t K = oc.size(0), D = std::min(in, out), N = x.size(0);
  const bool tall = out >= in;
  const DType dtype = kernel_dtype(x.scalar_type(), "diag_bwd_v");
  const at::ScalarType acc_type = dtype == DType::kFloat64 ? at::kDouble : at::kFloat;
  const Launch l = launch_info(x);
  const int slices = deterministic ? dynadiag_cuda::diag_sddmm_slices(N, D, K, l.limits) : 1;
  if (slices == 0) return at::zeros({K, D}, x.options());
  at::Tensor acc = deterministic ? at::zeros({slices, K, D}, x.options().dtype(acc_type))
                                 : at::zeros({K, D}, x.options().dtype(acc_type));
  C10_CUDA_CHECK(dynadiag_cuda::diag_sddmm(tall ? xc.const_data_ptr() : gc.const_data_ptr(),
                                           tall ? gc.const_data_ptr() : xc.const_data_ptr(),
                                           oc.const_data_ptr<int64_t>(), acc.mutable_data_ptr(), N, D,
                                           tall ? out : in, K, deterministic, dtype, l.limits, l.stream));
  if (deterministic) acc = at::sum(acc, 0);
  return acc.scalar_type() == x.scalar_type() ? acc : acc.to(x.scalar_type());
}

// v1 grad_values: atomics, unless torch.use_deterministic_algorithms(True) asks for reproducible results.
at::Tensor diag_bwd_v_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& offsets) {
  DD_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0),
              "diag_bwd_v: grad_y must be [N, out] and x [N, in] with the same N");
  const int64_t in = x.size(1), out = grad_y.size(1);
  check_inputs("diag_bwd_v", grad_y, x, offsets, in, out, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  check_offsets_cached(offsets, std::max(in, out), "diag_bwd_v");
  return v1_grad_values(grad_y, x, offsets, at::globalContext().deterministicAlgorithms());
}

// ---- v2 (UNVALIDATED ON HARDWARE; opt-in through dynadiag/kernels/cuda.py, DYNADIAG_CUDA_KERNELS=v2).

// One apply primitive from a host plan (dynadiag/kernels/plan.py); the plan was made from checked offsets.
at::Tensor diag_apply_v2_cuda(const at::Tensor& src, const at::Tensor& vpack, const at::Tensor& shifts,
                              const at::Tensor& chunks, const at::Tensor& tile_chunks, int64_t out_cols, bool tall,
                              int64_t max_window, int64_t warps_tokens, int64_t ksplit) {
  const char* op = "diag_apply_v2";
  DD_CHECK(src.is_cuda() && vpack.is_cuda() && shifts.is_cuda() && chunks.is_cuda() && tile_chunks.is_cuda(), op,
           ": all tensors must be CUDA tensors");
  DD_CHECK(src.dim() == 2 && vpack.dim() == 2 && chunks.dim() == 2 && chunks.size(1) == 4, op,
           ": src [N, A], vpack [E, tile] and chunks [C, 4] expected");
  DD_CHECK(src.scalar_type() == vpack.scalar_type(), op, ": dtype mismatch (", src.scalar_type(), " vs ",
           vpack.scalar_type(), ")");
  DD_CHECK(shifts.scalar_type() == at::kInt && chunks.scalar_type() == at::kInt && tile_chunks.scalar_type() == at::kInt,
           op, ": plan index tensors must be int32");
  DD_CHECK(shifts.is_contiguous() && chunks.is_contiguous() && tile_chunks.is_contiguous() && vpack.is_contiguous(),
           op, ": plan tensors must be contiguous");
  const int64_t A = src.size(1), tile = vpack.size(1);
  DD_CHECK(out_cols > 0 && (tall ? out_cols >= A : out_cols <= A), op, ": ", out_cols, " outputs from ", A,
           " inputs is not the ", tall ? "tall" : "wide", " form");
  const int64_t tiles = (out_cols + tile - 1) / tile;
  DD_CHECK(tile_chunks.numel() == tiles + 1 && shifts.numel() == vpack.size(0), op, ": plan does not match: ",
           tile_chunks.numel(), " tile entries for ", tiles, " tiles, ", shifts.numel(), " shifts for ", vpack.size(0),
           " packed rows");
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor sc = src.contiguous();
  at::Tensor dst = at::empty({src.size(0), out_cols}, src.options());
  const Launch l = launch_info(src);
  const dynadiag_cuda::ApplyPlanView plan{tile_chunks.const_data_ptr<int>(), chunks.const_data_ptr<int>(),
                                          shifts.const_data_ptr<int>(), vpack.const_data_ptr(),
                                          static_cast<int>(tiles), static_cast<int>(tile),
                                          static_cast<int>(max_window)};
  const cudaError_t err = dynadiag_cuda::diag_apply_v2(sc.const_data_ptr(), plan, dst.mutable_data_ptr(),
                                                       src.size(0), A, out_cols, tall, static_cast<int>(warps_tokens),
                                                       static_cast<int>(ksplit), kernel_dtype(src.scalar_type(), op),
                                                       l.limits, l.stream);
  DD_CHECK(err != cudaErrorInvalidConfiguration, op, ": a staging window of ", max_window, " columns for ",
           warps_tokens, " x 8 tokens does not fit in this GPU's shared memory (dynadiag.kernels.cuda_v2.apply "
           "checks this before launching and takes the v1 kernel)");
  C10_CUDA_CHECK(err);
  return dst;
}

// grad_values without atomics: per-token-slice partial sums, added in a fixed order (bitwise deterministic). fp64
// and rows too wide for the shared-memory window take v1's kernel in its deterministic mode (also without atomics:
// slower than v2, but v2's grad_values stays bitwise reproducible for every dtype and shape).
at::Tensor diag_bwd_v_v2_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& offsets) {
  DD_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0),
           "diag_bwd_v_v2: grad_y must be [N, out] and x [N, in] with the same N");
  const int64_t in = x.size(1), out = grad_y.size(1);
  check_inputs("diag_bwd_v_v2", grad_y, x, offsets, in, out, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  check_offsets_cached(offsets, std::max(in, out), "diag_bwd_v_v2");
  const int64_t K = offsets.size(0), D = std::min(in, out), N = x.size(0);
  const bool tall = out >= in;
  const int64_t M = tall ? out : in;
  const DType dtype = kernel_dtype(x.scalar_type(), "diag_bwd_v_v2");
  const Launch l = launch_info(x);
  if (dtype == DType::kFloat64 || N > INT32_MAX ||
      dynadiag_cuda::diag_sddmm_v2_smem(N, D, M, K, dtype, l.limits) > static_cast<size_t>(l.limits.smem_per_block_optin))
    return v1_grad_values(grad_y, x, offsets, /*deterministic=*/true);
  const int slices = dynadiag_cuda::diag_sddmm_v2_slices(N, D, M, K, dtype, l.limits);
  if (slices == 0) return at::zeros({K, D}, x.options());
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), oc = offsets.contiguous();
  at::Tensor partial = at::empty({slices, K, D}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(dynadiag_cuda::diag_sddmm_v2(tall ? xc.const_data_ptr() : gc.const_data_ptr(),
                                              tall ? gc.const_data_ptr() : xc.const_data_ptr(),
                                              oc.const_data_ptr<int64_t>(), partial.mutable_data_ptr(), N, D, M, K,
                                              dtype, l.limits, l.stream));
  const at::Tensor dv = at::sum(partial, 0);
  return dv.scalar_type() == x.scalar_type() ? dv : dv.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dynadiag, CUDA, m) {
  m.impl("diag_fwd", &diag_fwd_cuda);
  m.impl("diag_bwd_x", &diag_bwd_x_cuda);
  m.impl("diag_bwd_v", &diag_bwd_v_cuda);
  m.impl("diag_apply_v2", &diag_apply_v2_cuda);
  m.impl("diag_bwd_v_v2", &diag_bwd_v_v2_cuda);
}

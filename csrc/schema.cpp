// Operator schemas for the frozen DiagLinear layer, shared by every device implementation.
//
// Layout: W is [out, in]; P = max(in, out) candidate diagonals of length D = min(in, out), wrapping modulo P.
//   out >= in: element t of diagonal p sits at W[(t + p) % out, t]
//   out <  in: element t of diagonal p sits at W[t, (t + p) % in]
// `values` is [K, D] (one row per kept diagonal), `offsets` is [K] int64 in [0, P).
// Device kernels live in csrc/cpu (TORCH_LIBRARY_IMPL CPU) and csrc/cuda (CUDA); this file only declares.
#include <torch/library.h>

TORCH_LIBRARY(dynadiag, m) {
  // x [N, in] -> y [N, out] = x W^T (bias is added in Python).
  m.def("diag_fwd(Tensor x, Tensor values, Tensor offsets, int out_features) -> Tensor");
  // y = x W^T + bias in one pass (bias [out], x's dtype): the frozen layer's CPU path, so the output is not
  // re-read and re-allocated for the bias. Implemented on CPU only; other devices add the bias in Python.
  m.def("diag_fwd_bias(Tensor x, Tensor values, Tensor offsets, int out_features, Tensor bias) -> Tensor");
  // grad_y [N, out] -> grad_x [N, in] = grad_y W.
  m.def("diag_bwd_x(Tensor grad_y, Tensor values, Tensor offsets, int in_features) -> Tensor");
  // grad_y [N, out], x [N, in] -> grad_values [K, D]: the pattern-restricted product grad_y^T x.
  m.def("diag_bwd_v(Tensor grad_y, Tensor x, Tensor offsets) -> Tensor");
  // v2 CUDA kernels (csrc/cuda/diag_kernels_v2.cu; unvalidated on hardware, opt-in): one apply primitive from a host
  // plan (dynadiag/kernels/plan.py: src [N, A] -> [N, out_cols]) and grad_values without atomics.
  m.def(
      "diag_apply_v2(Tensor src, Tensor vpack, Tensor shifts, Tensor chunks, Tensor tile_chunks, int out_cols, "
      "bool tall, int max_window, int warps_tokens, int ksplit) -> Tensor");
  m.def("diag_bwd_v_v2(Tensor grad_y, Tensor x, Tensor offsets) -> Tensor");
}

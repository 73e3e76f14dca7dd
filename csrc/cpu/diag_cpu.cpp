// CPU implementations of the dynadiag ops declared in csrc/schema.cpp.
//
// fp32 and bf16 (bf16 storage, fp32 accumulation) run AVX-512 kernels when the build machine has AVX-512 (the
// extension is compiled with -march=native): gather/scatter in the feature-major layout of diag_fm.h (aligned
// activation loads; the transposes are fused into its staging) from 96 tokens up, else the token-major tiles of
// diag_kernels.h, which also hold the sddmm. Every other dtype (fp64 for gradcheck, fp16) and tiny shapes
// (P < 16, where one 16-lane window would wrap twice) use the portable scalar loops.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../dd_check.h"
#include "diag_kernels.h"
#include "diag_fm.h"

#include <cstdlib>
#include <cstring>
#include <vector>

namespace dynadiag {
namespace {

struct Dims {
  int64_t in, out, P, D, K;
  bool tall;  // out >= in (the square case uses the tall convention)
};

Dims check_args(const char* op, const at::Tensor& a, const at::Tensor& values_or_b, const at::Tensor& offsets,
                int64_t in, int64_t out, int64_t K, int64_t D_given) {
  // DD_CHECK, not TORCH_CHECK: no int64 is ever streamed into an ostream on the error path (csrc/dd_check.h).
  DD_CHECK(in > 0 && out > 0, op, ": in_features and out_features must be positive, got ", in, " and ", out);
  DD_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong, op, ": offsets must be a 1-D int64 tensor");
  DD_CHECK(a.device().is_cpu() && values_or_b.device().is_cpu() && offsets.device().is_cpu(), op,
           ": all tensors must be on the CPU");
  DD_CHECK(a.scalar_type() == values_or_b.scalar_type(), op, ": dtype mismatch (", a.scalar_type(), " vs ",
           values_or_b.scalar_type(), ")");
  Dims d{in, out, std::max(in, out), std::min(in, out), K, out >= in};
  DD_CHECK(D_given < 0 || D_given == d.D, op, ": values must have min(in, out) = ", d.D, " columns, got ", D_given);
  DD_CHECK(offsets.size(0) == K, op, ": ", K, " diagonals but ", offsets.size(0), " offsets");
  return d;
}

// Contiguous offsets, checked strictly ascending and in [0, P) (K integers: negligible next to the kernels).
at::Tensor checked_offsets(const at::Tensor& offsets, int64_t P, const char* op) {
  at::Tensor off = offsets.contiguous();
  check_offsets_host(off.const_data_ptr<int64_t>(), off.numel(), P, op);
  return off;
}

// Which AVX-512 layout runs gather/scatter. Measured rule (ViT-B shapes at 90 %, 1 thread, fp32 geomean vs dense,
// under load): token-major wins below ~100 tokens (16: 1.99x vs 1.55x, 64: 2.37x vs 2.27x: a partly empty 48-token
// block and the transposes do not pay off), feature-major from there on (128: 2.80x vs 2.43x, 197: 3.08x vs 2.83x,
// 1,576: 3.67x vs 2.76x). DYNADIAG_CPU_LAYOUT=tm|fm forces one (tests run both against the reference).
bool use_feature_major(int64_t N) {
  const char* env = std::getenv("DYNADIAG_CPU_LAYOUT");
  if (env != nullptr && std::strcmp(env, "tm") == 0) return false;
  if (env != nullptr && std::strcmp(env, "fm") == 0) return true;
  return N >= 96;
}

// bias (any floating dtype, [n]) as an accumulator-type buffer padded with zeros to a whole number of 64-wide
// tiles, or empty when there is no bias.
template <typename Acc>
std::vector<Acc> padded_bias(const at::Tensor* bias, int64_t n) {
  std::vector<Acc> out;
  if (bias == nullptr) return out;
  out.assign(((n + 63) / 64) * 64 + 64, Acc(0));
  const at::Tensor b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "dynadiag_bias", [&] {
    const scalar_t* p = b.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(p[i]);
  });
  return out;
}

// out[N, D] = gather(z[N, P]); out[N, P] = scatter(z[N, D]) (+ bias); dispatch on dtype and on the AVX-512 fast
// paths.
void gather_scatter(bool is_scatter, const at::Tensor& z, const at::Tensor& V, const at::Tensor& off, int64_t P,
                    int64_t D, at::Tensor& out, const at::Tensor* bias = nullptr) {
  const int64_t N = z.size(0), K = V.size(0), n_out = is_scatter ? P : D;
  const int64_t* o = off.const_data_ptr<int64_t>();
#if DYNADIAG_AVX512
  if (P >= 16 && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16)) {
    const std::vector<float> b = padded_bias<float>(bias, n_out);
    const float* bp = b.empty() ? nullptr : b.data();
    const bool fm = use_feature_major(N);
    auto run = [&](auto tag) {
      using E = decltype(tag);
      using T = typename E::T;
      const T* zp = z.const_data_ptr<T>();
      const T* vp = V.const_data_ptr<T>();
      T* op = out.mutable_data_ptr<T>();
      if (fm && is_scatter) return scatter_fm<E>(zp, N, D, vp, o, K, P, op, bp);
      if (fm) return gather_fm<E>(zp, N, P, vp, o, K, D, op, bp);
      if (is_scatter) return scatter_avx512<E>(zp, N, D, vp, o, K, P, op, bp);
      return gather_avx512<E>(zp, N, P, vp, o, K, D, op, bp);
    };
    return z.scalar_type() == at::kFloat ? run(F32{}) : run(BF16{});
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dynadiag_gather_scatter", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const std::vector<Acc> b = padded_bias<Acc>(bias, n_out);
    const Acc* bp = b.empty() ? nullptr : b.data();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* vp = V.const_data_ptr<scalar_t>();
    if (is_scatter)
      scatter_scalar<scalar_t>(zp, N, D, vp, o, K, P, out.mutable_data_ptr<scalar_t>(), bp);
    else
      gather_scalar<scalar_t>(zp, N, P, vp, o, K, D, out.mutable_data_ptr<scalar_t>(), bp);
  });
}

void gather(const at::Tensor& z, const at::Tensor& V, const at::Tensor& off, int64_t P, int64_t D, at::Tensor& out) {
  gather_scatter(false, z, V, off, P, D, out);
}

void scatter(const at::Tensor& z, const at::Tensor& V, const at::Tensor& off, int64_t P, int64_t D, at::Tensor& out) {
  gather_scatter(true, z, V, off, P, D, out);
}

void sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& off, int64_t P, int64_t D, at::Tensor& dv) {
  const int64_t N = a.size(0), K = off.size(0);
#if DYNADIAG_AVX512
  if (P >= 16 && a.scalar_type() == at::kFloat)
    return sddmm_avx512<F32>(a.const_data_ptr<float>(), b.const_data_ptr<float>(), N, D, P,
                             off.const_data_ptr<int64_t>(), K, dv.mutable_data_ptr<float>());
  if (P >= 16 && a.scalar_type() == at::kBFloat16)
    return sddmm_avx512<BF16>(a.const_data_ptr<c10::BFloat16>(), b.const_data_ptr<c10::BFloat16>(), N, D, P,
                              off.const_data_ptr<int64_t>(), K, dv.mutable_data_ptr<c10::BFloat16>());
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dynadiag_sddmm", [&] {
    sddmm_scalar<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), N, D, P,
                           off.const_data_ptr<int64_t>(), K, dv.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor diag_fwd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2, "diag_fwd: x must be [N, in] and values [K, D]");
  const Dims d = check_args("diag_fwd", x, values, offsets, x.size(1), out_features, values.size(0), values.size(1));
  at::Tensor y = at::empty({x.size(0), d.out}, x.options());
  const at::Tensor off = checked_offsets(offsets, d.P, "diag_fwd");
  if (x.size(0) == 0) return y;
  if (d.K == 0) return y.zero_();
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  if (d.tall)
    scatter(xc, vc, off, d.P, d.D, y);  // y [N, P=out] from x [N, D=in]
  else
    gather(xc, vc, off, d.P, d.D, y);  // y [N, D=out] from x [N, P=in]
  return y;
}

at::Tensor diag_fwd_bias(const at::Tensor& x, const at::Tensor& values, const at::Tensor& offsets,
                         int64_t out_features, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2, "diag_fwd_bias: x must be [N, in] and values [K, D]");
  const Dims d =
      check_args("diag_fwd_bias", x, values, offsets, x.size(1), out_features, values.size(0), values.size(1));
  DD_CHECK(bias.dim() == 1 && bias.size(0) == d.out && bias.scalar_type() == x.scalar_type() && bias.device().is_cpu(),
           "diag_fwd_bias: bias must be a 1-D CPU tensor of out_features = ", d.out, " elements in x's dtype");
  at::Tensor y = at::empty({x.size(0), d.out}, x.options());
  const at::Tensor off = checked_offsets(offsets, d.P, "diag_fwd_bias");
  if (x.size(0) == 0) return y;
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  // K == 0 still runs the kernels (no diagonal: every output is its bias).
  gather_scatter(d.tall, xc, vc, off, d.P, d.D, y, &bias);
  return y;
}

at::Tensor diag_bwd_x(const at::Tensor& grad_y, const at::Tensor& values, const at::Tensor& offsets,
                      int64_t in_features) {
  TORCH_CHECK(grad_y.dim() == 2 && values.dim() == 2, "diag_bwd_x: grad_y must be [N, out] and values [K, D]");
  const Dims d = check_args("diag_bwd_x", grad_y, values, offsets, in_features, grad_y.size(1), values.size(0),
                            values.size(1));
  at::Tensor gx = at::empty({grad_y.size(0), d.in}, grad_y.options());
  const at::Tensor off = checked_offsets(offsets, d.P, "diag_bwd_x");
  if (grad_y.size(0) == 0) return gx;
  if (d.K == 0) return gx.zero_();
  const at::Tensor gc = grad_y.contiguous(), vc = values.contiguous();
  if (d.tall)
    gather(gc, vc, off, d.P, d.D, gx);  // W^T is wide: gx [N, D=in] from grad_y [N, P=out]
  else
    scatter(gc, vc, off, d.P, d.D, gx);  // W^T is tall: gx [N, P=in] from grad_y [N, D=out]
  return gx;
}

at::Tensor diag_bwd_v(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(grad_y.dim() == 2 && x.dim() == 2 && grad_y.size(0) == x.size(0),
              "diag_bwd_v: grad_y must be [N, out] and x [N, in]");
  const Dims d = check_args("diag_bwd_v", grad_y, x, offsets, x.size(1), grad_y.size(1), offsets.size(0), -1);
  const at::Tensor off = checked_offsets(offsets, d.P, "diag_bwd_v");
  if (x.size(0) == 0 || d.K == 0) return at::zeros({d.K, d.D}, x.options());
  at::Tensor dv = at::empty({d.K, d.D}, x.options());
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous();
  if (d.tall)
    sddmm(xc, gc, off, d.P, d.D, dv);  // dV[k, t] = sum_n x[n, t] grad_y[n, (t + p) % out]
  else
    sddmm(gc, xc, off, d.P, d.D, dv);  // dV[k, t] = sum_n grad_y[n, t] x[n, (t + p) % in]
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynadiag, CPU, m) {
  m.impl("diag_fwd", &diag_fwd);
  m.impl("diag_fwd_bias", &diag_fwd_bias);
  m.impl("diag_bwd_x", &diag_bwd_x);
  m.impl("diag_bwd_v", &diag_bwd_v);
}

}  // namespace dynadiag

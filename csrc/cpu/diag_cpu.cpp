// CPU implementations of the dynadiag ops declared in csrc/schema.cpp, and the choice of kernel variant.
//
// fp32 and bf16 (bf16 storage, fp32 accumulation) run one of the vectorized variants of diag_isa.h, chosen at run
// time from the CPU's features: avx512 (diag_avx512.cpp), avx2 (diag_avx2.cpp) or portable (diag_portable.cpp,
// compiler vectors for any architecture). DYNADIAG_CPU_ISA=scalar|portable|avx2|avx512|amx forces one and is
// refused, with one line, when the CPU cannot run it. Every other dtype (fp64 for gradcheck, fp16) uses the scalar
// loops of diag_scalar.h. This file is compiled for the baseline of the architecture, so the library loads on any
// CPU; the variants' own translation units carry their target ISA.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../dd_check.h"
#include "diag_isa.h"
#include "diag_scalar.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define DD_X86 1
#else
#define DD_X86 0
#endif

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

// ----- which variant runs -----

struct Caps {
  bool avx2 = false, avx512 = false, amx = false;
};

Caps detect_caps() {
  Caps c;
#if DD_X86
  __builtin_cpu_init();
  c.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  c.avx512 = c.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  unsigned a = 0, b = 0, cx = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &cx, &d)) c.amx = c.avx512 && ((d >> 24) & 1u);  // AMX-TILE
#endif
  return c;
}

const Caps& caps() {
  static const Caps c = detect_caps();
  return c;
}

// Variant names, fastest first. "amx" is accepted where the CPU has AMX: the diagonal kernels have no AMX path
// (free offsets leave no dense tiles), so it runs the avx512 kernels.
bool can_run(const std::string& name) {
  if (name == "scalar" || name == "portable") return true;
  if (name == "avx2") return caps().avx2 && variant_avx2() != nullptr;
  if (name == "avx512") return caps().avx512 && variant_avx512() != nullptr;
  if (name == "amx") return caps().amx && variant_avx512() != nullptr;
  return false;
}

std::vector<std::string> runnable() {
  std::vector<std::string> out;
  for (const char* n : {"amx", "avx512", "avx2", "portable", "scalar"})
    if (can_run(n)) out.push_back(n);
  return out;
}

std::string lower(const char* s) {
  std::string out(s);
  for (char& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

// The variant the next call runs: DYNADIAG_CPU_ISA when set (and runnable), else the best the CPU runs, capped by
// torch's own ATEN_CPU_CAPABILITY (default|avx2|avx512) when that is set. Read per call (a getenv), so a test or
// a benchmark can switch variants inside one process.
std::string chosen_name() {
  const char* env = std::getenv("DYNADIAG_CPU_ISA");
  const std::string want = env == nullptr ? "" : lower(env);
  if (!want.empty() && want != "auto") {
    const bool known = want == "scalar" || want == "portable" || want == "avx2" || want == "avx512" || want == "amx";
    DD_CHECK_VALUE(known, "DYNADIAG_CPU_ISA=", want,
                   " is not a CPU kernel variant; choose auto, scalar, portable, avx2, avx512 or amx");
    if (!can_run(want)) {
      std::string list;
      for (const std::string& n : runnable()) list += (list.empty() ? "" : ", ") + n;
      DD_CHECK_VALUE(false, "DYNADIAG_CPU_ISA=", want, ": this CPU cannot run the ", want, " kernels (it runs ", list,
                     "); unset DYNADIAG_CPU_ISA or choose one of those");
    }
    return want == "amx" ? "avx512" : want;
  }
  const char* cap_env = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string cap = cap_env == nullptr ? "" : lower(cap_env);
  const bool allow512 = cap.empty() || cap == "avx512" || cap == "avx512_vnni" || cap == "avx512_bf16" ||
                        cap == "amx" || cap == "avx512_fp16";
  const bool allow2 = allow512 || cap == "avx2" || cap == "avx2_vnni";
  if (allow512 && can_run("avx512")) return "avx512";
  if (allow2 && can_run("avx2")) return "avx2";
  return "portable";
}

// Which kernels this thread's last gather/scatter/sddmm ran ("scalar" or a variant's name), so tests can check
// that a forced variant really runs.
thread_local const char* g_last_run = "";

// The kernels for fp32/bf16 at circle length P, or nullptr for the scalar loops.
const Variant* active_variant(int64_t P, at::ScalarType st) {
  const Variant* v = nullptr;
  if (st == at::kFloat || st == at::kBFloat16) {
    const std::string name = chosen_name();
    v = name == "avx512" ? variant_avx512() : name == "avx2" ? variant_avx2()
        : name == "portable" ? variant_portable() : nullptr;
    if (v != nullptr && P < v->min_P) v = variant_portable();
  }
  g_last_run = v == nullptr ? "scalar" : v->name;
  return v;
}

// Which gather/scatter loop order a variant with two uses (avx512): DYNADIAG_CPU_LAYOUT=tm|fm forces one (tests
// run both against the reference), else the variant decides by token count.
Layout layout_from_env() {
  const char* env = std::getenv("DYNADIAG_CPU_LAYOUT");
  if (env != nullptr && std::strcmp(env, "tm") == 0) return Layout::token_major;
  if (env != nullptr && std::strcmp(env, "fm") == 0) return Layout::feature_major;
  return Layout::automatic;
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

// out[N, D] = gather(z[N, P]); out[N, P] = scatter(z[N, D]) (+ bias); dispatch on dtype and CPU variant.
void gather_scatter(bool is_scatter, const at::Tensor& z, const at::Tensor& V, const at::Tensor& off, int64_t P,
                    int64_t D, at::Tensor& out, const at::Tensor* bias = nullptr) {
  const int64_t N = z.size(0), K = V.size(0), n_out = is_scatter ? P : D;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const at::ScalarType st = z.scalar_type();
  const Variant* v = active_variant(P, st);
  if (v != nullptr) {
    const std::vector<float> b = padded_bias<float>(bias, n_out);
    const float* bp = b.empty() ? nullptr : b.data();
    const Elem e = st == at::kFloat ? Elem::f32 : Elem::bf16;
    if (is_scatter)
      v->scatter(e, z.const_data_ptr(), N, D, V.const_data_ptr(), o, K, P, out.mutable_data_ptr(), bp,
                 layout_from_env());
    else
      v->gather(e, z.const_data_ptr(), N, P, V.const_data_ptr(), o, K, D, out.mutable_data_ptr(), bp,
                layout_from_env());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "dynadiag_gather_scatter", [&] {
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
  const at::ScalarType st = a.scalar_type();
  const Variant* v = active_variant(P, st);
  if (v != nullptr)
    return v->sddmm(st == at::kFloat ? Elem::f32 : Elem::bf16, a.const_data_ptr(), b.const_data_ptr(), N, D, P,
                    off.const_data_ptr<int64_t>(), K, dv.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "dynadiag_sddmm", [&] {
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

// The variant fp32/bf16 calls run now (raises ValueError for a DYNADIAG_CPU_ISA the CPU cannot run).
std::string isa() { return chosen_name(); }

// Every variant DYNADIAG_CPU_ISA may name on this CPU, fastest first.
std::vector<std::string> supported_isas() { return runnable(); }

std::string last_run() { return g_last_run; }

}  // namespace

// Introspection for Python (dynadiag.kernels.cpu.isa): its own namespace, so the shared op schemas stay as they are.
TORCH_LIBRARY(dynadiag_cpu, m) {
  m.def("isa() -> str", &isa);
  m.def("supported_isas() -> str[]", &supported_isas);
  // Which kernels the calling thread's last dynadiag CPU op ran (for tests).
  m.def("last_run() -> str", &last_run);
}

TORCH_LIBRARY_IMPL(dynadiag, CPU, m) {
  m.impl("diag_fwd", &diag_fwd);
  m.impl("diag_fwd_bias", &diag_fwd_bias);
  m.impl("diag_bwd_x", &diag_bwd_x);
  m.impl("diag_bwd_v", &diag_bwd_v);
}

}  // namespace dynadiag

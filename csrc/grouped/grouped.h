// Declarations shared by the grouped-diagonal kernels (grouped_brgemm.cpp: ops, brgemm path; grouped_amx.cpp: AMX).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#if defined(__linux__) && defined(__x86_64__)
#define DYNADIAG_AMX 1
#else
#define DYNADIAG_AMX 0
#endif

namespace dynadiag_grouped {

// Whether this CPU has AMX-TILE + AMX-BF16 and Linux granted the process the tile state (checked once).
bool amx_ready();

// bf16 `apply` on AMX tiles (the op's contract, see grouped_brgemm.cpp); `use_cache`: reuse the packed weight tiles
// of earlier calls with the same (unchanged) values and offsets tensors.
at::Tensor amx_apply(const at::Tensor& src, const at::Tensor& values, const at::Tensor& offsets, int64_t out_cols,
                     bool tall, const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                     bool use_cache);

// bf16 `sddmm` on AMX tiles (dV[k, t] = sum_n s[n, t] q[n, (t + p_k) mod M]; checked inputs, see grouped_brgemm.cpp).
at::Tensor amx_sddmm(const at::Tensor& s, const at::Tensor& q, const at::Tensor& offsets);

// Drop every cached plan (returns how many there were); the number of cached plans of live tensors.
int64_t amx_cache_clear();
int64_t amx_cache_size();

}  // namespace dynadiag_grouped

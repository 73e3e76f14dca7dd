// Column-block plans of the grouped AMX kernels (grouped_amx.cpp) and their cache for frozen weights.
//
// A plan lists, per 32-output row block, the 32-wide source column blocks that hold a kept weight of the block (one
// AMX k-step each) and packs all of the block's weights of a column block into one 32 x 32 VNNI B tile.
#pragma once

#include <ATen/core/Tensor.h>

#include "../dd_check.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace dynadiag_grouped {

constexpr int64_t kBlk = 32;        // tokens and outputs per block, columns per k-step
constexpr int64_t kTile = 16 * 32;  // elements of one 16 x 32 bf16 tile (1 KB)

// A buffer that keeps its memory between calls: a fresh multi-MB tensor per call costs a page fault per 4 KB on first
// touch (measured: the staging copy of fc2's activations took 2.2 ms of a 6.3 ms call, stalled on its stores).
template <typename T>
struct Scratch {
  std::unique_ptr<T[], void (*)(void*)> data{nullptr, std::free};
  size_t capacity = 0;
  T* get(size_t n) {
    if (n > capacity) {
      const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
      data.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      DD_CHECK(data != nullptr, "grouped kernels: out of memory (", bytes, " bytes of scratch)");
      capacity = n;
    }
    return data.get();
  }
};

struct Plan {
  int64_t A = 0, B = 0, ncb = 0, nblocks = 0;
  std::vector<int64_t> begin;  // [nblocks + 1]: k-steps of row block b are begin[b] .. begin[b + 1] - 1
  std::vector<int32_t> cb;     // [nsteps]: source column block of each k-step
  Scratch<uint16_t> packed;    // [nsteps, 2, 16, 16, 2] bf16: per k-step two B tiles (outputs 0-15, 16-31), VNNI pairs
};

// Every kept weight (k, t): tall (B >= A): column c = t, row r = (t + p_k) mod B; wide: row r = t, column
// c = (r + p_k) mod A (the two index maps of grouped_brgemm.cpp, enumerated from the weight's side), in segments
// that stay inside one 32 x 32 (row block, column block) tile: f(k, t, r, c, len) covers t .. t + len - 1.
template <typename F>
inline void for_each_segment(const int64_t* offp, int64_t K, int64_t A, int64_t B, bool tall, F&& f) {
  const int64_t D = std::min(A, B);
  for (int64_t k = 0; k < K; ++k) {
    int64_t t = 0, r = tall ? offp[k] % B : 0, c = tall ? 0 : offp[k] % A;
    while (t < D) {
      int64_t len = std::min({kBlk - r % kBlk, kBlk - c % kBlk, D - t});
      len = std::min(len, tall ? B - r : A - c);  // the wrap-around ends a segment
      f(k, t, r, c, len);
      t += len;
      if (tall) {
        c += len;
        r = r + len == B ? 0 : r + len;
      } else {
        r += len;
        c = c + len == A ? 0 : c + len;
      }
    }
  }
}

// The plan for these values ([K, min(A, B)], bf16 or fp32, rounded to bf16) and offsets of an A -> B layer in the
// given form. `use_cache`: return (or keep) the plan of an earlier call with the same unchanged tensors; otherwise a
// plan rebuilt into this thread's scratch memory.
std::shared_ptr<Plan> cached_plan(const at::Tensor& values, const at::Tensor& offsets, int64_t A, int64_t B, bool tall,
                                  bool use_cache);

}  // namespace dynadiag_grouped

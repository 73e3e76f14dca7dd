// Building column-block plans (grouped_plan.h) and caching them for frozen weights.
#include "grouped.h"
#include "grouped_plan.h"

#include <c10/core/Storage.h>
#include <c10/util/BFloat16.h>

#include <cstring>
#include <mutex>
#include <optional>

namespace dynadiag_grouped {
namespace {

// (Re)builds `plan` for these values/offsets: O(K * D) scattered stores plus zeroing nsteps * 2 KB.
void build_plan(Plan& plan, const at::Tensor& values, const int64_t* offp, int64_t A, int64_t B, bool tall) {
  plan.A = A;
  plan.B = B;
  plan.ncb = (A + kBlk - 1) / kBlk;
  plan.nblocks = (B + kBlk - 1) / kBlk;
  const int64_t K = values.size(0), D = values.size(1), ncb = plan.ncb, nblocks = plan.nblocks;
  // Which (row block, column block) pairs hold a weight; then one k-step per pair, row block major, columns sorted.
  std::vector<int32_t> slot(nblocks * ncb, -1);
  for_each_segment(offp, K, A, B, tall, [&](int64_t, int64_t, int64_t r, int64_t c, int64_t) {
    slot[(r / kBlk) * ncb + c / kBlk] = 0;
  });
  plan.begin.assign(nblocks + 1, 0);
  plan.cb.clear();
  for (int64_t b = 0; b < nblocks; ++b) {
    int64_t n = plan.begin[b];
    for (int64_t j = 0; j < ncb; ++j) {
      int32_t& sl = slot[b * ncb + j];
      if (sl < 0) continue;
      sl = static_cast<int32_t>(n++);
      plan.cb.push_back(static_cast<int32_t>(j));
    }
    plan.begin[b + 1] = n;
  }
  const int64_t nsteps = plan.begin[nblocks];
  uint16_t* pk = plan.packed.get(std::max<int64_t>(nsteps, 1) * 2 * kTile);
  std::memset(pk, 0, nsteps * 2 * kTile * sizeof(uint16_t));
  // bf16 values, or fp32 master weights (bf16 autocast) rounded to nearest even here, as Tensor.to(bfloat16) does.
  const bool f32 = values.scalar_type() == at::kFloat;
  const uint16_t* v = f32 ? nullptr : reinterpret_cast<const uint16_t*>(values.const_data_ptr<c10::BFloat16>());
  const float* vf = f32 ? values.const_data_ptr<float>() : nullptr;
  for_each_segment(offp, K, A, B, tall, [&](int64_t k, int64_t t, int64_t r, int64_t c, int64_t len) {
    uint16_t* tile = pk + slot[(r / kBlk) * ncb + c / kBlk] * 2 * kTile;
    const int64_t n0 = r % kBlk, q0 = c % kBlk;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t n = n0 + i, q = q0 + i;  // output n of the block reads source column q of the column block
      tile[(n >> 4) * kTile + (((q >> 1) << 4) + (n & 15)) * 2 + (q & 1)] =
          f32 ? c10::BFloat16(vf[k * D + t + i]).x : v[k * D + t + i];
    }
  });
}

// ---- plan cache (inference): frozen weights do not change between calls ----------------------------------------
// An entry is valid while the values' and offsets' storages are alive (weak references: a new tensor at a reused
// address never matches), their data pointers, shapes and strides are the same and their version counters have not
// moved (every in-place write through the tensor or its views, including optimizer steps and load_state_dict, bumps
// them). Writes that bypass the version counter (`tensor.data.copy_(...)`, numpy views) are not seen: callers cache
// only when the values are not being trained (grouped_cpu.py), and `cache_clear` drops every entry.
struct TensorId {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  uint32_t version;

  explicit TensorId(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()),
        data(t.const_data_ptr()),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        version(t.unsafeGetTensorImpl()->version_counter().current_version()) {}

  static std::optional<TensorId> of(const at::Tensor& t) {
    if (t.is_inference() || !t.has_storage()) return std::nullopt;  // inference tensors have no version counter
    return TensorId(t);
  }
  bool alive() const { return !storage.expired(); }
  bool same(const TensorId& o) const {
    return storage == o.storage && data == o.data && sizes == o.sizes && strides == o.strides && version == o.version;
  }
};

struct CacheEntry {
  TensorId values, offsets;
  int64_t B;
  bool tall;
  std::shared_ptr<Plan> plan;
};

std::mutex g_cache_mutex;
std::vector<CacheEntry> g_cache;
constexpr size_t kMaxEntries = 512;

}  // namespace

std::shared_ptr<Plan> cached_plan(const at::Tensor& values_in, const at::Tensor& offsets_in, int64_t A, int64_t B,
                                  bool tall, bool use_cache) {
  std::optional<TensorId> vid, oid;
  if (use_cache) {
    vid = TensorId::of(values_in);
    oid = TensorId::of(offsets_in);
  }
  if (vid && oid) {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    // Drop entries of dead tensors and of older versions of these tensors (a replaced weight is never served).
    g_cache.erase(std::remove_if(g_cache.begin(), g_cache.end(),
                                 [&](const CacheEntry& e) {
                                   return !e.values.alive() || !e.offsets.alive() ||
                                          (e.values.storage == vid->storage && e.values.version != vid->version);
                                 }),
                  g_cache.end());
    for (const CacheEntry& e : g_cache) {
      if (e.B == B && e.tall == tall && e.values.same(*vid) && e.offsets.same(*oid)) return e.plan;
    }
  }
  const at::Tensor values = values_in.contiguous(), offsets = offsets_in.contiguous();
  if (!(vid && oid)) {
    // Not cached (training): rebuild this thread's scratch plan in place, keeping its memory.
    thread_local std::shared_ptr<Plan> scratch = std::make_shared<Plan>();
    if (scratch.use_count() > 1) scratch = std::make_shared<Plan>();  // still in use by a caller up the stack
    build_plan(*scratch, values, offsets.const_data_ptr<int64_t>(), A, B, tall);
    return scratch;
  }
  auto plan = std::make_shared<Plan>();
  build_plan(*plan, values, offsets.const_data_ptr<int64_t>(), A, B, tall);
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    if (g_cache.size() >= kMaxEntries) g_cache.erase(g_cache.begin());
    g_cache.push_back({*vid, *oid, B, tall, plan});
  }
  return plan;
}

int64_t amx_cache_clear() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  const int64_t n = static_cast<int64_t>(g_cache.size());
  g_cache.clear();
  return n;
}

int64_t amx_cache_size() {  // live entries (those of freed tensors are dropped first)
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  g_cache.erase(std::remove_if(g_cache.begin(), g_cache.end(),
                               [](const CacheEntry& e) { return !e.values.alive() || !e.offsets.alive(); }),
                g_cache.end());
  return static_cast<int64_t>(g_cache.size());
}

}  // namespace dynadiag_grouped

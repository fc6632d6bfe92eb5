// SPDX-License-Identifier: Apache-2.0
// Internal: a module's mask over the flattened batch. The attention modules accept a mask
// broadcastable to [batch..., num_heads, q_length, kv_length] and flatten the batch dims
// into one before attending; this is how the caller's mask is seen then, at rank 4:
// [B or 1, heads or 1, q or 1, kv or 1], read in place when its batch dims are all 1 or all
// equal to the batch, else gathered (one contiguous block per flattened batch entry).
#ifndef LINEN_DETAIL_MASK_PLAN_HPP
#define LINEN_DETAIL_MASK_PLAN_HPP

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "../dot_product_attention.hpp"  // ArrayRef
#include "../tensor.hpp"
#include "broadcast.hpp"
#include "fused_attention.hpp"  // FusedView

namespace linen {
namespace detail {

struct MaskPlan {
  std::array<Index, 4> dims{};  // [B|1, H|1, lq|1, lk|1]
  std::vector<Index> offsets;   // empty: a view; else each batch entry's first element
};

// Throws linen::invalid_argument ("<name>: mask of shape ... does not broadcast to ...")
// unless `mask` broadcasts to [batch..., heads, lq, lk].
inline MaskPlan mask_plan(const ArrayRef<bool>& mask, const Shape& batch, Index heads, Index lq, Index lk,
                          const std::string& name) {
  Shape w = batch;
  w.insert(w.end(), {heads, lq, lk});
  const auto strides = broadcast_strides(mask.shape(), w, name + ": mask");
  const std::size_t nb = batch.size();
  Shape m(w.size(), 1);  // the mask's shape right-aligned to w
  std::copy(mask.shape().begin(), mask.shape().end(), m.end() - mask.rank());
  const bool all_one = std::all_of(m.begin(), m.begin() + nb, [](Index d) { return d == 1; });
  const bool all_eq = std::equal(m.begin(), m.begin() + nb, batch.begin());
  MaskPlan plan;
  plan.dims = {all_one ? 1 : num_elements(batch), m[nb], m[nb + 1], m[nb + 2]};
  if (!all_one && !all_eq) plan.offsets = leading_offsets(w, strides, nb);
  return plan;
}

// Gathers a planned mask's batch entries into `dst` (within one entry the trailing three
// dims are contiguous).
inline void gather_mask(const std::array<Index, 4>& dims, const std::vector<Index>& offsets, const bool* src,
                        bool* dst) {
  const Index inner = dims[1] * dims[2] * dims[3];
  for (std::size_t b = 0; b < offsets.size(); ++b)
    std::copy(src + offsets[b], src + offsets[b] + inner, dst + static_cast<Index>(b) * inner);
}

// The caller's mask at rank 4: a view, or gathered into `storage`. Empty when no mask.
inline ArrayRef<bool> flatten_mask(const ArrayRef<bool>& mask, const Shape& batch, Index heads, Index lq, Index lk,
                                   Tensor<bool, 4>& storage, const std::string& name) {
  if (!mask) return {};
  const MaskPlan plan = mask_plan(mask, batch, heads, lq, lk, name);
  const auto& d = plan.dims;
  if (plan.offsets.empty()) return ArrayRef<bool>(mask.data(), {d[0], d[1], d[2], d[3]});
  storage.resize(static_cast<Index>(plan.offsets.size()), d[1], d[2], d[3]);
  gather_mask(plan.dims, plan.offsets, mask.data(), storage.data());
  return ArrayRef<bool>(storage);
}

// A rank-4 mask [B|1, H|1, lq|1, lk|1] as the fused kernel reads it.
inline FusedView<bool> mask_view(const bool* data, const std::array<Index, 4>& d) {
  FusedView<bool> v;
  v.data = data;
  v.sb = d[0] == 1 ? 0 : d[1] * d[2] * d[3];
  v.sh = d[1] == 1 ? 0 : d[2] * d[3];
  v.sq = d[2] == 1 ? 0 : d[3];
  v.sk = d[3] == 1 ? 0 : 1;
  return v;
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_MASK_PLAN_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: what a DecodeWorkspace holds. The step's buffers (projections, the half
// types' promoted copies, the row kernel's scratch, a gathered mask) and a small set of
// validated step signatures: every shape and configuration field the step's checks read,
// with the mask plan those checks produced. A step whose signature is in the set skips
// the checks (except the cache's room, checked on every step) and allocates nothing.
#ifndef LINEN_DETAIL_DECODE_WORKSPACE_HPP
#define LINEN_DETAIL_DECODE_WORKSPACE_HPP

#include <array>
#include <cstddef>
#include <vector>

#include "../../dense.hpp"  // DenseScratch
#include "../../tensor.hpp"
#include "../fused_attention.hpp"  // RowScratch
#include "../mask_plan.hpp"

namespace linen {
namespace detail {
namespace decode {

// One validated signature and the mask plan its checks made.
struct Validated {
  std::vector<Index> signature;
  std::array<Index, 4> mask_dims{};
  std::vector<Index> mask_offsets;  // empty: the mask is read in place
};

// A fixed number of validated signatures, replaced oldest first: enough for a decoder
// alternating between a few caches or modules; a workload cycling through more shapes
// than this re-validates (and may allocate) on each change.
inline constexpr std::size_t kValidatedSignatures = 8;

template <class T>
struct WorkspaceState {
  using C = accum_t<T>;
  std::vector<T> q, k, v, x;  // [B, H * head_dim] each
  DenseScratch<C> dense;      // half types' promoted copies
  RowScratch<C> row;          // the decode kernel's
  std::vector<Index> now;     // this step's signature (no allocation once grown)
  std::array<Validated, kValidatedSignatures> validated{};
  std::size_t count = 0, next = 0;
  std::vector<unsigned char> mask_storage;  // a gathered mask, sized for the largest plan

  // The entry validated for `now`, or null.
  const Validated* find() const {
    for (std::size_t i = 0; i < count; ++i)
      if (validated[i].signature == now) return &validated[i];
    return nullptr;
  }
  // Records `now` as validated with `plan` (replacing the oldest entry when full) and
  // sizes the mask storage for it.
  const Validated& remember(MaskPlan plan, Index batch) {
    Validated& v = validated[next];
    next = (next + 1) % kValidatedSignatures;
    if (count < kValidatedSignatures) ++count;
    v.signature = now;
    v.mask_dims = plan.dims;
    v.mask_offsets = std::move(plan.offsets);
    if (!v.mask_offsets.empty()) {
      const auto need = static_cast<std::size_t>(batch * plan.dims[1] * plan.dims[2] * plan.dims[3]);
      if (mask_storage.size() < need) mask_storage.resize(need);
    }
    return v;
  }
};

struct Access;

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_WORKSPACE_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: what a DecodeWorkspace holds. The step's buffers (projections, the half
// types' promoted copies, the row kernel's scratch, a gathered mask), the projections'
// kernels as the step multiplies them (kept, see KeptKernel) and a small set of
// validated step signatures: every shape and configuration field the step's checks read,
// with the mask plan those checks produced. A step whose signature is in the set skips
// the checks (except the cache's room, checked on every step) and allocates nothing.
#ifndef LINEN_DETAIL_DECODE_WORKSPACE_HPP
#define LINEN_DETAIL_DECODE_WORKSPACE_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../dense.hpp"  // DenseScratch, promoted_rows, round_rows, as_bf16
#include "../gemm/pair_panels.hpp"
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

// A projection kernel promoted as DenseGeneral::apply_rows promotes it (Flax's
// promote_dtype: cast to T, then held in C for the product), made once and reused while
// the parameter tensor is the same: the same data address and size, and the same bits at
// kSamples places spread over it (so a tensor freed and another one allocated at its
// address, or an optimizer step that changes every value in place, is seen and the copy
// remade). A change in place that leaves every sampled value as it was is not seen: that
// is the DecodeWorkspace's documented contract (forget_parameters()).
template <class C>
struct KeptKernel {
  static constexpr int kSamples = 64;
  const void* source = nullptr;
  Index size = -1;
  std::array<std::uint64_t, kSamples> samples{};
  std::vector<C> kernel;
  // bfloat16 where gemm::pair_products(): the kernel rounded once and laid out in pair
  // panels (gemm/pair_panels.hpp) instead of `kernel`; `pairs` says which one is held (the
  // active level may change between steps: linen::set_isa).
  std::vector<Eigen::bfloat16> panels;
  bool pairs = false;

  static Index sample_index(int i, Index n) { return n <= 1 ? 0 : Index(i) * (n - 1) / (kSamples - 1); }
  template <class S>
  static std::uint64_t bits(const S& x) {
    std::uint64_t u = 0;
    std::memcpy(&u, &x, sizeof(S));
    return u;
  }
  // Whether `kernel` holds the promotion of p[0, n).
  template <class S>
  bool holds(const S* p, Index n) const {
    if (source != static_cast<const void*>(p) || size != n) return false;
    if (n == 0) return true;
    for (int i = 0; i < kSamples; ++i)
      if (samples[static_cast<std::size_t>(i)] != bits(p[sample_index(i, n)])) return false;
    return true;
  }
  void forget() {
    source = nullptr;
    size = -1;
  }
};

// y[m, out] = x[m, in] . kernel (+ bias) exactly as Dense::apply_rows(p, use_bias, x, m,
// y, &s, /*by_row=*/true, pool) computes it (the same promotion, the same product:
// gemm::multiply_rows through detail::promoted_rows, the same rounding of the result and
// the bias), with the kernel's promotion kept in `kept` instead of redone on every step:
// for bfloat16 activations and float32 params the promotion read and wrote twice the
// kernel's bytes per step, more than the product. bfloat16 where gemm::pair_products()
// keeps the kernel rounded to bfloat16 in pair panels and multiplies with the pair GEMV
// (half the bytes of a float kernel; the bits of apply's product), except for chunks of
// more than kGemvMaxRows rows where gemm::pair_gemm() is false. Types that need no
// promotion go to apply_rows itself.
template <class Dense, class T, class I, class Params>
void kept_rows(KeptKernel<accum_t<T>>& kept, const Params& p, bool use_bias, const I* x, Index m, T* y,
               DenseScratch<accum_t<T>>& s, Eigen::ThreadPoolInterface* pool = nullptr) {
  using C = accum_t<T>;
  using ParamT = typename std::decay_t<decltype(p.kernel)>::Scalar;
  if constexpr (std::is_same_v<I, T> && std::is_same_v<ParamT, T> && std::is_same_v<C, T>) {
    Dense::template apply_rows<I>(p, use_bias, x, m, y, &s, true, pool);
  } else {
    Index in = 1, out = 1;
    for (int i = 0; i < Dense::kAxes; ++i) in *= p.kernel.dimension(i);
    for (int i = Dense::kAxes; i < Dense::kAxes + Dense::kFeatures; ++i) out *= p.kernel.dimension(i);
    const ParamT* k = p.kernel.data();
    const Index n = in * out;
    bool pairs = false;
    if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<C, float>) {
      pairs = gemm::pair_products();
      // A chunk of many rows is compute-bound: where the pair GEMM is the slower product
      // (gemm::pair_gemm), DenseGeneral's own (the float GEMM, the same bits); the kept
      // panels stay for the next step.
      if (pairs && m > gemm::kGemvMaxRows && !gemm::pair_gemm()) {
        Dense::template apply_rows<I>(p, use_bias, x, m, y, &s, true, pool);
        return;
      }
    }
    if (!kept.holds(k, n) || kept.pairs != pairs) {
      if (pairs) {
        if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
          kept.kernel = {};
          kept.panels.resize(static_cast<std::size_t>(pair_panels_size(in, out)));
          pack_pair_panels(in, out, k, out, kept.panels.data());
        }
      } else {
        kept.panels = {};
        kept.kernel.resize(static_cast<std::size_t>(n));
        for (Index i = 0; i < n; ++i) kept.kernel[static_cast<std::size_t>(i)] = static_cast<C>(static_cast<T>(k[i]));
      }
      kept.pairs = pairs;
      kept.source = k;
      kept.size = n;
      for (int i = 0; i < KeptKernel<C>::kSamples; ++i)
        kept.samples[static_cast<std::size_t>(i)] = n > 0 ? KeptKernel<C>::bits(k[KeptKernel<C>::sample_index(i, n)]) : 0;
    }
    s.acc.resize(static_cast<std::size_t>(m * out));
    if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<C, float>) {
      if (pairs) {  // the pair GEMV over the kept panels (the GEMM's bits, pairs.hpp)
        const Eigen::bfloat16* xb = as_bf16(x, m * in, s.xb);
        gemm::multiply_pair_panels(m, out, in, xb, in, kept.panels.data(), s.acc.data(), out, pool);
        round_rows<T>(s.acc.data(), m, out, use_bias ? p.bias.data() : nullptr, y);
        return;
      }
    }
    s.x.resize(static_cast<std::size_t>(m * in));
    for (Index i = 0; i < m * in; ++i) s.x[static_cast<std::size_t>(i)] = static_cast<C>(static_cast<T>(x[i]));
    promoted_rows<T>(s.x.data(), kept.kernel.data(), m, in, out, use_bias ? p.bias.data() : nullptr, s.acc.data(), y,
                     true, pool);
  }
}

template <class T>
struct WorkspaceState {
  using C = accum_t<T>;
  std::vector<T> q, k, v, x;  // [B, H * head_dim] each
  DenseScratch<C> dense;      // half types' promoted copies
  std::array<KeptKernel<C>, 4> kept;  // query, key, value, out: see kept_rows
  RowScratch<C> row;          // the decode kernel's
  TiledScratch<C> tiled;      // the tiled kernel's (decode_chunk of more than two rows)
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

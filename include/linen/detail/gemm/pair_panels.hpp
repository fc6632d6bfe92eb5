// SPDX-License-Identifier: Apache-2.0
//
// Internal: a kernel W[K, N] rounded to bfloat16 once and laid out as the pair GEMV
// (gemm/pairs.hpp, gemv_pairs) reads it, so that a decode step streams it without
// converting or packing anything:
//   panels of kPairPanel columns, one after another (the last padded with zero columns);
//   panel p holds ceil(K / 2) pair rows of kPairPanel pairs, pair (kp, c) = the two
//   bfloat16 {W(2kp + 1, p * kPairPanel + c), W(2kp, p * kPairPanel + c)} (element 2kp in
//   the high half, so that vdpbf16ps accumulates it first; for odd K the last pair's low
//   half is 0).
// Level-independent (in linen::detail, outside the ISA namespace): the decode workspace packs with the
// caller's flags, linen::dispatch's avx512_bf16 level reads.
#ifndef LINEN_DETAIL_GEMM_PAIR_PANELS_HPP
#define LINEN_DETAIL_GEMM_PAIR_PANELS_HPP

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>

#include "../../tensor.hpp"

namespace linen {
namespace detail {

// Columns of one panel: 8 packets of 16 pairs, the widest column tile of a row of the GEMV.
inline constexpr Index kPairPanel = 128;

// bfloat16 elements the panels of a [K, N] kernel take.
inline Index pair_panels_size(Index K, Index N) {
  return (N + kPairPanel - 1) / kPairPanel * ((K + 1) / 2) * 2 * kPairPanel;
}

// dst[pair_panels_size(K, N)] = W[K, N] (row stride ldw) rounded to bfloat16 as
// static_cast<Eigen::bfloat16> rounds (Flax's promote_dtype), in the panel layout above.
template <class S>
void pack_pair_panels(Index K, Index N, const S* W, Index ldw, Eigen::bfloat16* dst) {
  const Index pairs = (K + 1) / 2;
  const Eigen::bfloat16 zero(0.0f);
  for (Index j0 = 0; j0 < N; j0 += kPairPanel, dst += pairs * 2 * kPairPanel) {
    const Index nv = std::min<Index>(kPairPanel, N - j0);
    for (Index kp = 0; kp < pairs; ++kp) {
      Eigen::bfloat16* d = dst + kp * 2 * kPairPanel;
      const S* hi = W + 2 * kp * ldw + j0;
      const S* lo = 2 * kp + 1 < K ? hi + ldw : nullptr;
      for (Index c = 0; c < nv; ++c) {
        d[2 * c] = lo ? static_cast<Eigen::bfloat16>(lo[c]) : zero;
        d[2 * c + 1] = static_cast<Eigen::bfloat16>(hi[c]);
      }
      std::fill(d + 2 * nv, d + 2 * kPairPanel, zero);
    }
  }
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_PAIR_PANELS_HPP

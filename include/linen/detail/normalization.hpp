// SPDX-License-Identifier: Apache-2.0
// Internal: the numerics Flax's normalization layers share (flax/linen/normalization.py's
// _compute_stats and _normalize), stated once for LayerNorm, RMSNorm and their backward
// passes.
#ifndef LINEN_DETAIL_NORMALIZATION_HPP
#define LINEN_DETAIL_NORMALIZATION_HPP

#include <cmath>
#include <type_traits>

namespace linen {
namespace detail {

// The statistics type: _compute_stats promotes to at least float32
// (force_float32_reductions), keeping float64. linen reads "float64" as the module's dtype
// T or the input's element type I being double. (Flax with an explicit dtype=float32 and
// a float64 input computes the statistics in float32; under JAX's default x64=False no
// float64 input exists.)
template <class T, class I>
using norm_stat_t = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<I, double>, double, float>;

// _normalize's `mul = lax.rsqrt(var + epsilon)`: epsilon, a Python float, is weakly typed
// and is added in the statistics type S.
template <class S>
S norm_rsqrt(S var, double epsilon) {
  return S(1) / std::sqrt(var + static_cast<S>(epsilon));
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_NORMALIZATION_HPP

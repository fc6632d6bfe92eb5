// SPDX-License-Identifier: Apache-2.0
//
// Internal: the logit policy, i.e. the numerics of attention, stated once. Every attention
// kernel (the reference path, the tiled and row forward kernels, the reference and fused
// backward) is a template on a policy and asks it, at each step, what Flax (or another
// numerics) does there; the kernels themselves only move tiles. FlaxLogits<T> is
// flax.linen.dot_product_attention_weights to the letter.
//
// What a policy provides (a second numerics, such as jax.nn.dot_product_attention's, is a
// second type with the same members; no kernel changes):
//   element_type, accum_type     T, and C: the type of the products, logits and softmax
//   policy(problem)              built from AttentionProblem's query_scale, keep_scale,
//                                fp32_softmax
//   query(q), query_row<P>(...)  the query element as the product q.k reads it
//                                (Flax: q / sqrt(depth), rounded to T)
//   logit(s), logit<P>(s)        the product s = q.k as the softmax sees it, before the bias
//                                (Flax: rounded to T; jax.nn: times its scale)
//   changes_logits()             whether logit() is not the identity (a pass can be saved)
//   add_bias(s, b)               a logit (through logit()) plus its bias (Flax: in T)
//   query_derivative(),          the backward's chain rule through query() and logit()
//   kScalesLogits, logit_derivative()
//   mask_value()                 what a masked logit becomes (Flax: finfo(T).min, finite,
//                                so a fully masked row is uniform over its keys)
//   initial_max()                where the softmax's running max starts
//   masked_vanish(m)             whether a masked entry's weight exp(mask_value - m) is 0
//                                in a row of max m (then skipping masked tiles is exact)
//   rounds_weights(), weight(p)  the softmax weights as stored (Flax: rounded to T unless
//                                force_fp32_for_softmax); the fused forward keeps them in C
//   keep_scale(), dropout(p, k)  dropout's keep / keep_prob (Flax: 1 / keep_prob in T)
// The softmax dtype: logit(), weight() and accum_type say where the softmax's inputs and
// outputs are rounded (jax.nn, whose softmax is float32 even for float64 inputs, rounds
// logits and weights to float there).
#ifndef LINEN_DETAIL_ATTENTION_POLICY_HPP
#define LINEN_DETAIL_ATTENTION_POLICY_HPP

#include <cmath>
#include <limits>
#include <type_traits>

#include "../../tensor.hpp"
#include "../simd.hpp"

namespace linen {
namespace detail {

// Flax's `query / jnp.sqrt(depth).astype(dtype)`: sqrt in float32 (float64 under x64).
template <class T>
T depth_scale(Index depth) {
  if constexpr (std::is_same_v<T, double>) {
    return std::sqrt(static_cast<double>(depth));
  } else {
    return static_cast<T>(std::sqrt(static_cast<float>(depth)));
  }
}

// Flax's dropout multiplier: keep.astype(dtype) / jnp.asarray(keep_prob, dtype).
template <class T>
accum_t<T> flax_keep_scale(double dropout_rate) {
  return static_cast<accum_t<T>>(static_cast<T>(1) / static_cast<T>(1.0 - dropout_rate));
}

template <class T>
struct FlaxLogits {
  using element_type = T;
  using accum_type = accum_t<T>;
  using C = accum_type;

  T query_scale = T(1);  // sqrt(depth) in dtype (depth_scale)
  C keep_scale_ = C(1);  // flax_keep_scale
  bool fp32_softmax = false;

  FlaxLogits() = default;
  FlaxLogits(T scale, C keep, bool fp32) : query_scale(scale), keep_scale_(keep), fp32_softmax(fp32) {}
  template <class Problem>
  explicit FlaxLogits(const Problem& a) : FlaxLogits(a.query_scale, a.keep_scale, a.fp32_softmax) {}

  // Flax divides the query by sqrt(depth) before the product, in dtype.
  C query(T q) const { return static_cast<C>(static_cast<T>(q / query_scale)); }
  // dst[0, n) = query(q[0, n)), in packets where T is the packet's own type.
  template <class P>
  void query_row(const T* q, C* dst, Index n) const {
    Index c = 0;
    if constexpr (!simd::is_scalar_v<P>) {
      // half types: widened (exact), divided in C, rounded as the scalar query() rounds
      constexpr int W = simd::size_v<P>;
      const P s = simd::set1<P>(static_cast<C>(query_scale));
      for (; c + W <= n; c += W) simd::store(dst + c, simd::round_exact<T>(simd::div(simd::load_as<P>(q + c), s)));
    }
    for (; c < n; ++c) dst[c] = query(q[c]);
  }

  // The einsum's result is stored in dtype: half-type logits are rounded to T.
  static constexpr bool changes_logits() { return !std::is_same_v<T, C>; }
  C logit(C s) const { return static_cast<C>(static_cast<T>(s)); }
  template <class P>
  P logit(const P& s) const {
    return simd::round_to<T>(s);
  }
  // logits + bias, in dtype (s is already through logit()).
  C add_bias(C s, T b) const { return static_cast<C>(static_cast<T>(s + static_cast<C>(b))); }

  // The backward's chain rule through query() and logit(): the query's cotangent is the
  // scaled query's times query_derivative(); logit() (a rounding) passes cotangents
  // unchanged (a policy that scales its logits sets kScalesLogits and logit_derivative()).
  C query_derivative() const { return C(1) / static_cast<C>(query_scale); }
  static constexpr bool kScalesLogits = false;
  static constexpr C logit_derivative() { return C(1); }

  // Masked logits become finfo(dtype).min: finite, so a fully masked row has equal logits
  // and averages the values (a row of -inf bias gives NaN, as in Flax).
  static C mask_value() { return static_cast<C>(std::numeric_limits<T>::lowest()); }
  static C initial_max() { return mask_value(); }
  // exp(mask_value - m) is exactly 0: the masked entries of a row of max m add nothing.
  static bool masked_vanish(C m) { return std::exp(mask_value() - m) == C(0); }

  // The weights (softmax's output) are stored in dtype unless force_fp32_for_softmax.
  bool rounds_weights() const { return is_half_type_v<T> && !fp32_softmax; }
  C weight(C p) const { return rounds_weights() ? static_cast<C>(static_cast<T>(p)) : p; }
  // Dropout: a kept weight times keep / keep_prob (then stored as a weight), else 0.
  C keep_scale() const { return keep_scale_; }
  C dropout(C p, bool kept) const { return kept ? weight(p * keep_scale_) : C(0); }
};

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_POLICY_HPP

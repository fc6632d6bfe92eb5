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
// JaxNnLogits<T> is jax.nn.dot_product_attention's numerics (the XLA path's).
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

// jax.nn.dot_product_attention's mask fill, _get_large_negative: -0.7 * min(finfo(dtype).max,
// finfo(float32).max) in the logits dtype (computed in float64, as numpy's Python float),
// then rounded to float32 by the softmax's astype: one finite value for every element type.
inline float jax_nn_large_negative() { return static_cast<float>(-0.7 * static_cast<double>(std::numeric_limits<float>::max())); }

// jax.nn.dot_product_attention's default scale, 1 / np.sqrt(H) (float64), as the logits
// dtype holds it (jnp.array(scale, logits.dtype)).
template <class T>
accum_t<T> jax_nn_default_scale(Index depth) {
  return static_cast<accum_t<T>>(1.0 / std::sqrt(static_cast<double>(depth)));
}

// jax.nn.dot_product_attention (jax/_src/nn/functions.py, _dot_product_attention_core) to
// the letter where a CPU kernel can be: the logits in promote_types(T, float32) = C (float
// for float and the half types, whose products are exact and accumulated in float:
// DotAlgorithmPreset BF16_BF16_F32 / F16_F16_F32; double for double), the query unscaled,
// `logits *= jnp.array(scale, C)` after the product, `(logits + bias).astype(C)`, masked
// logits jax_nn_large_negative(), then `padded_logits.astype(float32)`: for double inputs
// the logits (after scale, bias and mask) are rounded to float, the softmax's dtype. The
// softmax itself then runs in C on those float values (for double: exp and sum in double,
// closer to the exact softmax than XLA's float32 arithmetic, by less than float32's
// rounding of the weights); the weights are cast to key.dtype (T: rounded for half types)
// before the product with V. A fully masked row is uniform over all S keys (the fill is
// finite). No dropout (jax.nn has none): keep_scale() is 1.
template <class T>
struct JaxNnLogits {
  using element_type = T;
  using accum_type = accum_t<T>;
  using C = accum_type;
  // double inputs: the softmax's float32 rounding of the logits
  static constexpr bool kFloatSoftmax = std::is_same_v<T, double>;

  C scale = C(1);         // jnp.array(scale, logits.dtype)
  bool has_bias = false;  // double: the float rounding waits for the bias (add_bias)

  JaxNnLogits() = default;
  JaxNnLogits(C s, bool bias) : scale(s), has_bias(bias) {}
  template <class Problem>
  explicit JaxNnLogits(const Problem& a) : JaxNnLogits(a.logit_scale, static_cast<bool>(a.bias)) {}

  // The query is not scaled: the product reads it as it is (exact in C).
  C query(T q) const { return static_cast<C>(q); }
  template <class P>
  void query_row(const T* q, C* dst, Index n) const {
    for (Index c = 0; c < n; ++c) dst[c] = static_cast<C>(q[c]);
  }

  // logits * scale in C (and for double, without a bias, the float32 rounding of the
  // softmax's astype; with a bias, add_bias rounds).
  static constexpr bool changes_logits() { return true; }
  C logit(C s) const {
    const C x = s * scale;
    if constexpr (kFloatSoftmax) return has_bias ? x : static_cast<C>(static_cast<float>(x));
    else return x;
  }
  template <class P>
  P logit(const P& s) const {
    const P x = simd::mul(s, simd::set1<P>(scale));
    if constexpr (kFloatSoftmax) return has_bias ? x : simd::round_to<float>(x);
    else return x;
  }
  // (logits + bias).astype(C), bias promoted to C (then double's float32 rounding).
  C add_bias(C s, T b) const {
    const C x = s + static_cast<C>(b);
    if constexpr (kFloatSoftmax) return static_cast<C>(static_cast<float>(x));
    else return x;
  }

  // The chain rule: the query is read as it is; the logits are scaled (rounding passes
  // cotangents unchanged).
  C query_derivative() const { return C(1); }
  static constexpr bool kScalesLogits = true;
  C logit_derivative() const { return scale; }

  // The fill of masked logits, as the float32 softmax sees it.
  static C mask_value() { return static_cast<C>(jax_nn_large_negative()); }
  // The softmax's inputs are float32 values (for double too), of which none is below
  // float's lowest but -inf: the running max starts there (a row of logits all below the
  // mask value, as a bias can make, keeps its own max, as jax.nn.softmax's).
  static C initial_max() { return static_cast<C>(std::numeric_limits<float>::lowest()); }
  static bool masked_vanish(C m) { return std::exp(mask_value() - m) == C(0); }

  // probs.astype(key.dtype): rounded to T for half types; for double the float32
  // softmax's weights (the reference's rounding; the fused forward keeps them in C).
  static constexpr bool rounds_weights() { return is_half_type_v<T>; }
  C weight(C p) const {
    if constexpr (kFloatSoftmax) return static_cast<C>(static_cast<float>(p));
    else return static_cast<C>(static_cast<T>(p));
  }
  static constexpr C keep_scale() { return C(1); }
  C dropout(C p, bool kept) const { return kept ? weight(p) : C(0); }
};

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_POLICY_HPP

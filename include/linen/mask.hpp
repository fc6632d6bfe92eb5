// SPDX-License-Identifier: Apache-2.0
//
// Mask helpers of flax/linen/attention.py: make_attention_mask, make_causal_mask,
// combine_masks. Masks are bool tensors (Flax's default dtype is float32 with 1/0; a
// nonzero float and `true` mask the same way).
#ifndef LINEN_MASK_HPP
#define LINEN_MASK_HPP

#include <algorithm>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/broadcast.hpp"
#include "tensor.hpp"

namespace linen {

// Flax's default pairwise_fn, jnp.multiply: a position pair is kept when the product is
// nonzero.
struct multiply {
  template <class A, class B>
  bool operator()(const A& a, const B& b) const {
    return static_cast<double>(a) * static_cast<double>(b) != 0.0;
  }
};

// Mask-making helper for attention weights (flax.linen.make_attention_mask).
//   query_input: [batch..., len_q], key_input: [batch..., len_k] (batch dims equal or 1).
//   pairwise_fn(q, k) -> bool-convertible; default: q * k != 0.
//   ExtraBatchDims: leading singleton dims to add (Flax's extra_batch_dims).
//   returns [1 x ExtraBatchDims, batch..., 1, len_q, len_k].
template <int ExtraBatchDims = 0, class QI, class KI, class PairwiseFn = multiply>
Tensor<bool, detail::tensor_traits<QI>::rank + 2 + ExtraBatchDims> make_attention_mask(
    const QI& query_input, const KI& key_input, PairwiseFn pairwise_fn = {}) {
  static_assert(detail::is_tensor_v<QI> && detail::is_tensor_v<KI>,
                "linen: make_attention_mask takes linen::Tensor<T, N> inputs (or maps of one)");
  constexpr int N = detail::tensor_traits<QI>::rank;
  static_assert(N == detail::tensor_traits<KI>::rank,
                "linen: make_attention_mask: query_input and key_input must have the same rank");
  static_assert(N >= 1, "linen: make_attention_mask: inputs are [batch..., length]");
  static_assert(ExtraBatchDims >= 0, "linen: extra_batch_dims must be >= 0");
  constexpr int R = N + 2 + ExtraBatchDims;

  const Shape qs = shape_of(query_input), ks = shape_of(key_input);
  const Shape qb(qs.begin(), qs.end() - 1), kb(ks.begin(), ks.end() - 1);
  const Shape batch = detail::broadcast_shapes(qb, kb, "make_attention_mask: batch dims");
  const Index lq = qs.back(), lk = ks.back();

  Shape out_shape(ExtraBatchDims, 1);
  out_shape.insert(out_shape.end(), batch.begin(), batch.end());
  out_shape.insert(out_shape.end(), {1, lq, lk});
  Tensor<bool, R> mask(to_dims<R>(out_shape));

  // Strides of each input's batch part over the broadcast batch.
  Shape qb1 = qb, kb1 = kb;
  const auto qstr = detail::broadcast_strides(qb1, batch, "make_attention_mask: query_input");
  const auto kstr = detail::broadcast_strides(kb1, batch, "make_attention_mask: key_input");
  const auto qoff = detail::leading_offsets(batch, qstr, batch.size());
  const auto koff = detail::leading_offsets(batch, kstr, batch.size());
  bool* dst = mask.data();
  for (std::size_t b = 0; b < qoff.size(); ++b) {
    const auto* q = query_input.data() + qoff[b] * lq;
    const auto* k = key_input.data() + koff[b] * lk;
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < lk; ++j) *dst++ = static_cast<bool>(pairwise_fn(q[i], k[j]));
  }
  return mask;
}

// Causal mask for self-attention (flax.linen.make_causal_mask).
//   x: [batch..., len] (only its shape is read).
//   returns [1 x ExtraBatchDims, batch..., 1, len, len], true where key <= query.
template <int ExtraBatchDims = 0, class X>
Tensor<bool, detail::tensor_traits<X>::rank + 2 + ExtraBatchDims> make_causal_mask(const X& x) {
  static_assert(detail::is_tensor_v<X>,
                "linen: make_causal_mask takes a linen::Tensor<T, N> (or a map of one)");
  constexpr int N = detail::tensor_traits<X>::rank;
  static_assert(N >= 1, "linen: make_causal_mask: x is [batch..., length]");
  const Shape xs = shape_of(x);
  const Index len = xs.back();
  // Flax builds idxs = broadcast_to(arange(len), x.shape) and compares them pairwise with
  // greater_equal; only the shape matters, so build the positions without copying x.
  Tensor<Index, N> idxs(to_dims<N>(xs));
  for (Index n = 0; n < idxs.size(); ++n) idxs.data()[n] = len ? n % len : 0;
  return make_attention_mask<ExtraBatchDims>(idxs, idxs, std::greater_equal<Index>());
}

namespace detail {

// The masks combine_masks accepts: a tensor, a map, a pointer (nullptr = None), an
// optional (nullopt = None), or nullptr itself.
template <class M, class = void>
struct mask_arg {
  static constexpr bool none = false;
};
template <>
struct mask_arg<std::nullptr_t> {
  static constexpr bool none = true;
  static ArrayRef<bool> ref(std::nullptr_t) { return {}; }
};
template <>
struct mask_arg<std::nullopt_t> {
  static constexpr bool none = true;
  static ArrayRef<bool> ref(std::nullopt_t) { return {}; }
};
template <class M>
struct mask_arg<M, std::enable_if_t<is_tensor_v<M>>> {
  static constexpr bool none = false;
  static constexpr int rank = tensor_traits<M>::rank;
  static_assert(std::is_same_v<typename tensor_traits<M>::scalar, bool>,
                "linen: combine_masks takes bool masks");
  static ArrayRef<bool> ref(const M& m) { return ArrayRef<bool>(m.data(), shape_of(m)); }
};
template <int N>
struct mask_arg<const Tensor<bool, N>*> {
  static constexpr bool none = false;
  static constexpr int rank = N;
  static ArrayRef<bool> ref(const Tensor<bool, N>* m) { return m ? ArrayRef<bool>(*m) : ArrayRef<bool>(); }
};
template <int N>
struct mask_arg<Tensor<bool, N>*> : mask_arg<const Tensor<bool, N>*> {};
template <int N>
struct mask_arg<std::optional<Tensor<bool, N>>> {
  static constexpr bool none = false;
  static constexpr int rank = N;
  static ArrayRef<bool> ref(const std::optional<Tensor<bool, N>>& m) {
    return m ? ArrayRef<bool>(*m) : ArrayRef<bool>();
  }
};

template <class... Ms>
constexpr int combined_rank() {
  int r = -1;
  bool ok = true;
  (
      [&] {
        if constexpr (!mask_arg<Ms>::none) {
          if (r == -1) r = mask_arg<Ms>::rank;
          else if (r != mask_arg<Ms>::rank) ok = false;
        }
      }(),
      ...);
  return ok ? r : -2;
}

}  // namespace detail

// Combines attention masks with logical and (flax.linen.combine_masks).
//   Each argument is a bool mask of rank N (tensor or map), a pointer to one, an
//   std::optional of one, or nullptr / std::nullopt (None, skipped). All masks have the
//   same rank; their shapes broadcast (numpy rules).
//   returns the combined mask of the broadcast shape, or std::nullopt when every argument
//   is None.
template <class... Masks>
std::optional<Tensor<bool, std::max(detail::combined_rank<Masks...>(), 0)>> combine_masks(
    const Masks&... masks) {
  constexpr int N = detail::combined_rank<Masks...>();
  static_assert(N != -2, "linen: combine_masks: masks must all have the same rank");
  static_assert(N >= 0, "linen: combine_masks: give at least one typed mask (the rank is needed)");
  std::vector<ArrayRef<bool>> refs;
  (refs.push_back(detail::mask_arg<Masks>::ref(masks)), ...);
  std::vector<ArrayRef<bool>> present;
  for (auto& r : refs)
    if (r) present.push_back(r);
  if (present.empty()) return std::nullopt;
  Shape shape = present.front().shape();
  for (std::size_t i = 1; i < present.size(); ++i)
    shape = detail::broadcast_shapes(shape, present[i].shape(), "combine_masks");
  Tensor<bool, N> out(to_dims<N>(shape));
  out.setConstant(true);
  for (const auto& m : present) {
    const auto strides = detail::broadcast_strides(m.shape(), shape, "combine_masks: mask");
    const auto offsets = detail::leading_offsets(shape, strides, shape.size());
    for (std::size_t n = 0; n < offsets.size(); ++n)
      out.data()[n] = out.data()[n] && m.data()[offsets[n]];
  }
  return out;
}

}  // namespace linen

#endif  // LINEN_MASK_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen::compiled's instantiations of attention.hpp (see common.hpp): for each
// pair of LINEN_COMPILED_PAIRS and inputs linen::Tensor<T, 3> ([batch, length, features]),
// the members every MultiHeadDotProductAttention and SelfAttention call ends in:
//   init_impl            every init(rng, inputs...) (any rng: key, scope or engine);
//   apply(params, q, k, v, call)   every non-decode apply (SelfAttention's and the one-
//                        and two-input forms forward to it);
//   apply_impl           decode apply, custom attention_fn, sow_weights;
//   apply_into, decode_step   with out a Tensor<T, 3>&, a TensorMap<T, 3>& or a
//                        TensorMap<T, 3> temporary;
//   init_cache;
// and per type of LINEN_COMPILED_TYPES, DotProductAttention (the default attention_fn,
// which every AttentionConfig<T> holds: each TU that makes one would compile it) and
// detail::decode::attend (decode steps over the cache).
// Other input types or ranks compile in the caller's TU as header-only.
#ifndef LINEN_DETAIL_COMPILED_ATTENTION_HPP
#define LINEN_DETAIL_COMPILED_ATTENTION_HPP

#include "../../attention.hpp"
#include "common.hpp"

#define LINEN_COMPILED_ATTENTION_OUT(T, P, Out)                                                            \
  LINEN_COMPILED_EXTERN void MultiHeadDotProductAttention<T, P>::apply_into<Tensor<T, 3>, Tensor<T, 3>,       \
                                                                            Tensor<T, 3>, Out>(               \
      const AttentionParams<P>&, const Tensor<T, 3>&, const Tensor<T, 3>&, const Tensor<T, 3>&, Out&&,       \
      AttentionWorkspace<T>&, const CallOptions<T>&) const;                                                  \
  LINEN_COMPILED_EXTERN void MultiHeadDotProductAttention<T, P>::decode_step<Tensor<T, 3>, Out>(              \
      const AttentionParams<P>&, AttentionCache<T>&, const Tensor<T, 3>&, Out&&, DecodeWorkspace<T>&,         \
      const CallOptions<T>&) const;

#define LINEN_COMPILED_ATTENTION(T, P)                                                                      \
  LINEN_COMPILED_EXTERN AttentionVariables<T, P> MultiHeadDotProductAttention<T, P>::init_impl(              \
      random::RngScope&, const Shape&, const Shape&, const Shape&) const;                                    \
  LINEN_COMPILED_EXTERN Tensor<T, 3>                                                                         \
  MultiHeadDotProductAttention<T, P>::apply<Tensor<T, 3>, Tensor<T, 3>, Tensor<T, 3>, 0>(                     \
      const AttentionParams<P>&, const Tensor<T, 3>&, const Tensor<T, 3>&, const Tensor<T, 3>&,              \
      const CallOptions<T>&) const;                                                                           \
  LINEN_COMPILED_EXTERN Tensor<T, 3>                                                                         \
  MultiHeadDotProductAttention<T, P>::apply_impl<Tensor<T, 3>, Tensor<T, 3>, Tensor<T, 3>, detail::NoTape>(   \
      const AttentionParams<P>&, AttentionCache<T>*, const Tensor<T, 3>&, const Tensor<T, 3>&,               \
      const Tensor<T, 3>&, const CallOptions<T>&, detail::NoTape*, bool) const;                                    \
  LINEN_COMPILED_EXTERN AttentionCache<T> MultiHeadDotProductAttention<T, P>::init_cache(                    \
      const AttentionParams<P>&, const Shape&, Index) const;                                                  \
  LINEN_COMPILED_ATTENTION_OUT(T, P, detail::compiled::TensorRef<T>)                                          \
  LINEN_COMPILED_ATTENTION_OUT(T, P, detail::compiled::MapRef<T>)                                             \
  LINEN_COMPILED_ATTENTION_OUT(T, P, detail::compiled::Map<T>)

#define LINEN_COMPILED_ATTENTION_TYPE(T)                                                                    \
  LINEN_COMPILED_EXTERN Tensor<T, 4> DotProductAttention::operator()<T>(                                     \
      const Tensor<T, 4>&, const Tensor<T, 4>&, const Tensor<T, 4>&, const AttentionOptions<T>&) const;       \
  LINEN_COMPILED_EXTERN void detail::decode::attend<T>(const AttentionCache<T>&, const T*, Index,            \
                                                       const detail::FusedView<bool>&, T*,                   \
                                                       Eigen::ThreadPoolInterface*, detail::RowScratch<accum_t<T>>*,             \
                                                       detail::TiledScratch<accum_t<T>>*);

#ifndef LINEN_COMPILED_INSTANTIATE
namespace linen {
LINEN_COMPILED_TYPES(LINEN_COMPILED_ATTENTION_TYPE)
LINEN_COMPILED_PAIRS(LINEN_COMPILED_ATTENTION)
}  // namespace linen
#endif

#endif  // LINEN_DETAIL_COMPILED_ATTENTION_HPP

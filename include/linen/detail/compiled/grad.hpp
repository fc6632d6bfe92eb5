// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen::compiled's instantiations of grad.hpp (see common.hpp), inputs and
// cotangents linen::Tensor<T, 3> (modules) or linen::Tensor<T, 4> (functional):
//   per type of LINEN_COMPILED_TYPES: dot_product_attention_vjp;
//   per pair of LINEN_COMPILED_PAIRS: the attention modules' vjp (every vjp(module,
//   variables, inputs...) overload ends in detail::attention_module_vjp) and its
//   pullback, and the vjps of DenseGeneral (Axes = Features = 1: Dense) and LayerNorm
//   with their pullbacks, and the layers' backward kernels the pullbacks call
//   (detail::dense_backward, detail::layer_norm_backward: Eigen products that a TU would
//   otherwise instantiate, though it does not compile them, for every pullback).
#ifndef LINEN_DETAIL_COMPILED_GRAD_HPP
#define LINEN_DETAIL_COMPILED_GRAD_HPP

#include "../../grad.hpp"
#include "common.hpp"

#define LINEN_COMPILED_GRAD_TYPE(T)                                                                           \
  LINEN_COMPILED_EXTERN DotProductAttentionGrads<T, 4>                                                       \
  dot_product_attention_vjp<Tensor<T, 4>, Tensor<T, 4>, Tensor<T, 4>, Tensor<T, 4>>(                          \
      const Tensor<T, 4>&, const Tensor<T, 4>&, const Tensor<T, 4>&, const Tensor<T, 4>&,                    \
      const AttentionOptions<T>&, const GradOptions&);

#define LINEN_COMPILED_GRAD(T, P)                                                                             \
  LINEN_COMPILED_EXTERN Vjp<Tensor<T, 3>, AttentionPullback<T, P, T, 3>>                                     \
  detail::attention_module_vjp<T, P, Tensor<T, 3>, Tensor<T, 3>, Tensor<T, 3>>(                               \
      const MultiHeadDotProductAttention<T, P>&, const AttentionParams<P>&, const Tensor<T, 3>&,             \
      const Tensor<T, 3>&, const Tensor<T, 3>&, int, const CallOptions<T>&, const GradOptions&);             \
  LINEN_COMPILED_EXTERN AttentionGrads<P, T, 3> AttentionPullback<T, P, T, 3>::operator()<Tensor<T, 3>>(     \
      const Tensor<T, 3>&) const;                                                                             \
  LINEN_COMPILED_EXTERN Vjp<Tensor<T, 3>, DensePullback<T, P, 1, 1, T, 3>>                                   \
  vjp<T, P, 1, 1, Tensor<T, 3>>(const DenseGeneral<T, P, 1, 1>&, const DenseParams<P, 1, 1>&,                 \
                                const Tensor<T, 3>&, const GradOptions&);                                     \
  LINEN_COMPILED_EXTERN DenseGrads<P, 1, 1, T, 3> DensePullback<T, P, 1, 1, T, 3>::operator()<Tensor<T, 3>>( \
      const Tensor<T, 3>&) const;                                                                             \
  LINEN_COMPILED_EXTERN Vjp<Tensor<T, 3>, LayerNormPullback<T, P, T, 3>>                                     \
  vjp<T, P, Tensor<T, 3>>(const LayerNorm<T, P>&, const LayerNormParams<P>&, const Tensor<T, 3>&);            \
  LINEN_COMPILED_EXTERN LayerNormGrads<P, T, 3> LayerNormPullback<T, P, T, 3>::operator()<Tensor<T, 3>>(     \
      const Tensor<T, 3>&) const;                                                                             \
  LINEN_COMPILED_GRAD_DENSE_BACKWARD(T, P, T)                                                                 \
  LINEN_COMPILED_EXTERN void detail::layer_norm_backward<T, T, P>(const T*, Index, Index, double, bool,      \
                                                                  const P*, const T*, T*,                     \
                                                                  detail::norm_stat_t<T, T>*,                 \
                                                                  detail::norm_stat_t<T, T>*,                 \
                                                                  std::vector<detail::norm_stat_t<T, T>>*);

// dense_backward<T, ParamT, I>: I = T (every pullback), and I = float (the attention
// pullback's input cotangents, accumulated in float) for the half types.
#define LINEN_COMPILED_GRAD_DENSE_BACKWARD(T, P, I)                                                           \
  LINEN_COMPILED_EXTERN void detail::dense_backward<T, P, I>(const T*, Index, Index, Index, const P*, const T*, \
                                                             P*, P*, I*, Eigen::ThreadPoolInterface*, bool,  \
                                                             detail::DenseBackwardScratch<accum_t<T>>*);
#define LINEN_COMPILED_GRAD_HALF(T, P) LINEN_COMPILED_GRAD_DENSE_BACKWARD(T, P, float)

#ifndef LINEN_COMPILED_INSTANTIATE
namespace linen {
LINEN_COMPILED_TYPES(LINEN_COMPILED_GRAD_TYPE)
LINEN_COMPILED_PAIRS(LINEN_COMPILED_GRAD)
LINEN_COMPILED_HALF_PAIRS(LINEN_COMPILED_GRAD_HALF)
}  // namespace linen
#endif

#endif  // LINEN_DETAIL_COMPILED_GRAD_HPP

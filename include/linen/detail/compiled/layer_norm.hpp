// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen::compiled's instantiations of layer_norm.hpp (see common.hpp): for each
// pair of LINEN_COMPILED_PAIRS, LayerNorm<T, ParamT> applied to linen::Tensor<T, 2> and
// linen::Tensor<T, 3>.
#ifndef LINEN_DETAIL_COMPILED_LAYER_NORM_HPP
#define LINEN_DETAIL_COMPILED_LAYER_NORM_HPP

#include "../../layer_norm.hpp"
#include "common.hpp"

#define LINEN_COMPILED_LAYER_NORM(T, P)                                                                       \
  LINEN_COMPILED_EXTERN Tensor<T, 2> LayerNorm<T, P>::apply<Tensor<T, 2>>(const LayerNormParams<P>&,         \
                                                                         const Tensor<T, 2>&) const;          \
  LINEN_COMPILED_EXTERN Tensor<T, 3> LayerNorm<T, P>::apply<Tensor<T, 3>>(const LayerNormParams<P>&,         \
                                                                         const Tensor<T, 3>&) const;

#ifndef LINEN_COMPILED_INSTANTIATE
namespace linen {
LINEN_COMPILED_PAIRS(LINEN_COMPILED_LAYER_NORM)
}  // namespace linen
#endif

#endif  // LINEN_DETAIL_COMPILED_LAYER_NORM_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen::compiled's instantiations of dot_product_attention.hpp (see
// common.hpp): dot_product_attention and dot_product_attention_weights on
// linen::Tensor<T, 4> ([batch, length, heads, depth]) for each type of
// LINEN_COMPILED_TYPES.
#ifndef LINEN_DETAIL_COMPILED_DOT_PRODUCT_ATTENTION_HPP
#define LINEN_DETAIL_COMPILED_DOT_PRODUCT_ATTENTION_HPP

#include "../../dot_product_attention.hpp"
#include "common.hpp"

#define LINEN_COMPILED_DOT_PRODUCT_ATTENTION(T)                                                              \
  LINEN_COMPILED_EXTERN Tensor<T, 4> dot_product_attention<Tensor<T, 4>, Tensor<T, 4>, Tensor<T, 4>>(        \
      const Tensor<T, 4>&, const Tensor<T, 4>&, const Tensor<T, 4>&, const AttentionOptions<T>&);            \
  LINEN_COMPILED_EXTERN Tensor<T, 4> dot_product_attention_weights<Tensor<T, 4>, Tensor<T, 4>>(              \
      const Tensor<T, 4>&, const Tensor<T, 4>&, const AttentionOptions<T>&);

#ifndef LINEN_COMPILED_INSTANTIATE
namespace linen {
LINEN_COMPILED_TYPES(LINEN_COMPILED_DOT_PRODUCT_ATTENTION)
}  // namespace linen
#endif

#endif  // LINEN_DETAIL_COMPILED_DOT_PRODUCT_ATTENTION_HPP

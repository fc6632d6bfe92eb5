// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen::compiled's instantiations of dense.hpp (see common.hpp): for each pair
// of LINEN_COMPILED_PAIRS, DenseGeneral<T, ParamT, 1, 1> (what Dense is) applied to
// linen::Tensor<T, 2> and linen::Tensor<T, 3>.
#ifndef LINEN_DETAIL_COMPILED_DENSE_HPP
#define LINEN_DETAIL_COMPILED_DENSE_HPP

#include "../../dense.hpp"
#include "common.hpp"

#define LINEN_COMPILED_DENSE(T, P)                                                                            \
  LINEN_COMPILED_EXTERN Tensor<T, 2> DenseGeneral<T, P, 1, 1>::apply<Tensor<T, 2>>(const DenseParams<P, 1, 1>&, \
                                                                                  const Tensor<T, 2>&) const; \
  LINEN_COMPILED_EXTERN Tensor<T, 3> DenseGeneral<T, P, 1, 1>::apply<Tensor<T, 3>>(const DenseParams<P, 1, 1>&, \
                                                                                  const Tensor<T, 3>&) const;

#ifndef LINEN_COMPILED_INSTANTIATE
namespace linen {
LINEN_COMPILED_PAIRS(LINEN_COMPILED_DENSE)
}  // namespace linen
#endif

#endif  // LINEN_DETAIL_COMPILED_DENSE_HPP

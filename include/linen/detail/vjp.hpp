// SPDX-License-Identifier: Apache-2.0
// Internal: what every vjp shares (grad.hpp's for attention, DenseGeneral and LayerNorm;
// the vjps of embed.hpp, rms_norm.hpp, dropout.hpp), in a header light enough for every
// module's own header to include: the result type linen::Vjp and the cotangent check.
#ifndef LINEN_DETAIL_VJP_HPP
#define LINEN_DETAIL_VJP_HPP

#include <string>
#include <type_traits>

#include "../errors.hpp"
#include "../tensor.hpp"

namespace linen {

// What a vjp returns: the forward's output and the function from an output cotangent to
// the cotangents of the inputs and parameters (jax.vjp's `(primals_out, vjp_fn)`).
template <class Output, class Pullback>
struct Vjp {
  Output output;
  Pullback pullback;
};

namespace detail {

template <class X, class T, int N>
void check_cotangent(const X& ct, const Shape& expected, const std::string& fn) {
  static_assert(is_tensor_v<X>, "linen: a cotangent must be a linen::Tensor (or a map of one)");
  static_assert(std::is_same_v<typename tensor_traits<X>::scalar, T>,
                "linen: the cotangent must have the output's element type");
  static_assert(tensor_traits<X>::rank == N, "linen: the cotangent must have the output's rank");
  if (shape_of(ct) != expected)
    throw linen::invalid_argument(fn + ": cotangent has shape " + to_string(shape_of(ct)) +
                                ", the output's shape is " + to_string(expected));
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_VJP_HPP

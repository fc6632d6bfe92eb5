// SPDX-License-Identifier: Apache-2.0
//
// linen::compiled: the explicit instantiation definitions of what the headers declare
// extern when LINEN_COMPILED is defined (include/linen/detail/compiled/, whose common.hpp
// says why). Each src/compiled/<type>.cpp expands, for its element type T, the same
// macros the headers expand as declarations:
//   LINEN_COMPILED_FOR_TYPE(T)        what depends on T alone;
//   LINEN_COMPILED_FOR_PAIR(T, P)     each (T, ParamT) pair of LINEN_COMPILED_PAIRS;
//   LINEN_COMPILED_FOR_HALF_PAIR(T, P)  and, for the half types' pairs, their extras.
// One file per type keeps each translation unit to a minute or two on one core.
#ifndef LINEN_SRC_COMPILED_INSTANTIATE_HPP
#define LINEN_SRC_COMPILED_INSTANTIATE_HPP

#if defined(LINEN_COMPILED)
#error "src/compiled/ defines linen::compiled's instantiations; build it without LINEN_COMPILED"
#endif
#define LINEN_COMPILED_INSTANTIATE 1

#include <linen/detail/compiled/attention.hpp>
#include <linen/detail/compiled/dense.hpp>
#include <linen/detail/compiled/dot_product_attention.hpp>
#include <linen/detail/compiled/grad.hpp>
#include <linen/detail/compiled/layer_norm.hpp>

#define LINEN_COMPILED_FOR_TYPE(T)       \
  LINEN_COMPILED_DOT_PRODUCT_ATTENTION(T) \
  LINEN_COMPILED_ATTENTION_TYPE(T)       \
  LINEN_COMPILED_GRAD_TYPE(T)

#define LINEN_COMPILED_FOR_PAIR(T, P) \
  LINEN_COMPILED_ATTENTION(T, P)      \
  LINEN_COMPILED_GRAD(T, P)           \
  LINEN_COMPILED_DENSE(T, P)          \
  LINEN_COMPILED_LAYER_NORM(T, P)

#define LINEN_COMPILED_FOR_HALF_PAIR(T, P) \
  LINEN_COMPILED_FOR_PAIR(T, P)            \
  LINEN_COMPILED_GRAD_HALF(T, P)

#endif  // LINEN_SRC_COMPILED_INSTANTIATE_HPP

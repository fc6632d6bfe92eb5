// SPDX-License-Identifier: Apache-2.0
//
// Internal: what linen::compiled instantiates (see README "Compile time: linen::compiled").
//
// linen::compiled is a static library holding explicit instantiations of the modules'
// entry points, the functional attention and the vjps for the element types below, and
// defines LINEN_COMPILED for whoever links it. Each public header that has such entry
// points then ends by including its list (detail/compiled/<header>.hpp), which declares
// them `extern template`: a translation unit that uses SelfAttention<float> no longer
// compiles the kernels, the projections and the backward, it calls the library's copy.
// Header-only use (LINEN_COMPILED undefined) is unchanged.
//
// One list per header serves both sides: the consumer's TUs see it as extern
// declarations, src/compiled/*.cpp (which define LINEN_COMPILED_INSTANTIATE) expand the
// same macros as explicit instantiation definitions, so the two cannot drift apart.
//
// Why noinline on the declarations: member functions defined in a class body are inline,
// and an explicit instantiation declaration does not suppress the implicit instantiation
// of an inline function ([temp.explicit]): GCC and Clang instantiate it anyway, to be able
// to inline it, and at -O1 and above optimise the whole call tree under it, kernels
// included, only to drop it. Declared noinline, the specialization is neither inlined nor
// compiled in the consumer's TU (the compilers still instantiate its body, which is most
// of what remains of the TU's compile time); non-inline function templates (the
// functional API, the vjp entry, the backward kernels) are not even instantiated. The
// attribute is on the declaration of one specialization only: the library's definitions
// and header-only builds are as before.
#ifndef LINEN_DETAIL_COMPILED_COMMON_HPP
#define LINEN_DETAIL_COMPILED_COMMON_HPP

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16

#include "../../tensor.hpp"

#if defined(LINEN_COMPILED_INSTANTIATE)
#define LINEN_COMPILED_EXTERN template
#elif defined(__GNUC__)  // GCC and Clang
#define LINEN_COMPILED_EXTERN extern template __attribute__((noinline))
#else
#define LINEN_COMPILED_EXTERN extern template
#endif

// The element types (T) linen::compiled serves, one src/compiled/<type>.cpp each.
#define LINEN_COMPILED_TYPES(X) X(float) X(double) X(Eigen::bfloat16) X(Eigen::half)

// The (T, ParamT) pairs of the modules: ParamT = T, and the half types with float
// parameters (Flax's dtype=bfloat16 with param_dtype=float32, the usual mixed precision).
// src/compiled/<T>.cpp instantiates the pairs whose T is its type. The half pairs apart:
// some internals have a float accumulator type that differs from T only for them.
#define LINEN_COMPILED_HALF_PAIRS(X) \
  X(Eigen::bfloat16, Eigen::bfloat16) X(Eigen::half, Eigen::half) X(Eigen::bfloat16, float) X(Eigen::half, float)
#define LINEN_COMPILED_PAIRS(X) X(float, float) X(double, double) LINEN_COMPILED_HALF_PAIRS(X)

namespace linen {
namespace detail {
namespace compiled {
// The `out` argument types instantiated (a macro argument cannot hold Tensor<T, 3>'s comma).
template <class T>
using TensorRef = Tensor<T, 3>&;
template <class T>
using MapRef = TensorMap<T, 3>&;
template <class T>
using Map = TensorMap<T, 3>;
}  // namespace compiled
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_COMPILED_COMMON_HPP

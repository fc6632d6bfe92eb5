// SPDX-License-Identifier: Apache-2.0
//
// The activations of flax.linen (flax/linen/activation.py re-exports jax.nn's: the spec is
// jax/_src/nn/functions.py), on linen::Tensor<T, N> of float, double, Eigen::half and
// Eigen::bfloat16, each with its vjp (the input cotangent for an output cotangent):
//
//   gelu(x, approximate = true)      x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
//                                    approximate=false: x/2 erfc(-x sqrt(1/2)).
//                                    jax.nn.gelu's default is approximate=True (the tanh
//                                    form), and flax.linen.gelu is jax.nn.gelu.
//   silu(x), swish(x)                x sigmoid(x), sigmoid = 1 / (1 + exp(-x)) (lax.logistic)
//   relu(x)                          max(x, 0); its derivative at 0 is 0 (jax.nn.relu's jvp)
//   softmax(x, axis = -1)            exp(x - max) / sum exp(x - max) over `axis` (or axes)
//   log_softmax(x, axis = -1)        (x - max) - log(sum exp(x - max)), not log(softmax)
//   *_vjp(x, cotangent, ...)         the input cotangent (jax.vjp of the same function):
//     gelu:        JAX's derivative of the formula above (tanh' = (1 + t)(1 - t));
//     silu:        s + x s (1 - s), s = sigmoid(x) (lax.logistic's jvp);
//     relu:        cotangent where x > 0, else 0;
//     softmax:     y (g - sum(y g)) (jax.nn.softmax's custom jvp, transposed);
//     log_softmax: g - softmax(x) sum(g) (the max is stop_gradient'ed in JAX).
//
// The dtype: jax.nn computes in x's dtype (gelu's constants sqrt(2/pi), 0.044715 and
// sqrt(1/2) are rounded to that dtype first, as np.sqrt(...).astype(x.dtype) and weakly
// typed Python floats are). float and double compute in their own type. Half types
// (bfloat16, float16) compute in float and round the result to T once: that is what
// XLA:CPU does with a fused chain of half-type elementwise ops (it evaluates them in f32
// and, with xla_allow_excess_precision, its default, drops the intermediate roundings);
// linen's attention softmax rounds its weights the same way. The constants are still the
// dtype's. The transcendental functions are the C library's, so results agree with XLA's
// own approximations of tanh, exp, erfc to a few ulps, not bit for bit.
//
// Shapes: every function returns a tensor of x's shape and element type; a cotangent must
// have x's shape and element type. `axis` counts from the end when negative; softmax and
// log_softmax also take a set of axes (std::vector<int>, deduplicated, as jax.nn's tuple).
// An axis out of range or a cotangent of another shape throws linen::invalid_argument
// naming it. Flax's `where=` argument is not provided.
#ifndef LINEN_ACTIVATIONS_HPP
#define LINEN_ACTIVATIONS_HPP

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/axes.hpp"
#include "detail/vjp.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {
namespace detail {

template <class X>
void require_activation_input() {
  static_assert(is_tensor_v<X>, "linen: activations take a linen::Tensor (or a map of one)");
  static_assert(is_element_type_v<typename tensor_traits<X>::scalar>,
                "linen: activations take float, double, Eigen::half or Eigen::bfloat16 tensors");
}

template <class X>
using activation_result_t = Tensor<typename tensor_traits<X>::scalar, tensor_traits<X>::rank>;

// A constant as jax.nn writes it in dtype T, read in the computation type accum_t<T>.
template <class T>
accum_t<T> dtype_constant(double c) {
  return static_cast<accum_t<T>>(static_cast<T>(c));
}

// y[i] = f(x[i]) in the computation type, rounded to T once.
template <class X, class F>
activation_result_t<X> map_elements(const X& x, F f) {
  using T = typename tensor_traits<X>::scalar;
  using C = accum_t<T>;
  activation_result_t<X> y(x.dimensions());
  const T* in = x.data();
  T* out = y.data();
  const Index n = y.size();
  for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(f(static_cast<C>(in[i])));
  return y;
}

// dx[i] = f(x[i], g[i]) in the computation type, after checking g's shape.
template <class X, class G, class F>
activation_result_t<X> map_cotangent(const X& x, const G& g, const char* fn, F f) {
  using T = typename tensor_traits<X>::scalar;
  using C = accum_t<T>;
  check_cotangent<G, T, tensor_traits<X>::rank>(g, shape_of(x), fn);
  activation_result_t<X> dx(x.dimensions());
  const Index n = dx.size();
  for (Index i = 0; i < n; ++i)
    dx.data()[i] = static_cast<T>(f(static_cast<C>(x.data()[i]), static_cast<C>(g.data()[i])));
  return dx;
}

// gelu and its derivative, in C = accum_t<T> with T's constants.
template <class T>
struct Gelu {
  using C = accum_t<T>;
  bool approximate;
  C sqrt_2_over_pi = dtype_constant<T>(0.79788456080286535588);  // np.sqrt(2 / np.pi).astype(dtype)
  C coeff = dtype_constant<T>(0.044715);                          // a weakly typed Python float
  C sqrt_half = dtype_constant<T>(0.70710678118654752440);        // np.sqrt(0.5).astype(dtype)

  C value(C x) const {
    if (approximate) {
      const C cdf = C(0.5) * (C(1) + std::tanh(sqrt_2_over_pi * (x + coeff * (x * x * x))));
      return x * cdf;
    }
    return C(0.5) * x * std::erfc(-x * sqrt_half);
  }
  C derivative(C x) const {
    if (approximate) {
      const C t = std::tanh(sqrt_2_over_pi * (x + coeff * (x * x * x)));
      const C cdf = C(0.5) * (C(1) + t);
      const C dinner = sqrt_2_over_pi * (C(1) + C(3) * coeff * (x * x));
      return cdf + x * (C(0.5) * ((C(1) + t) * (C(1) - t)) * dinner);
    }
    // d/dx [x/2 erfc(-x s)] = erfc(-x s)/2 + x s exp(-x^2 s^2) / sqrt(pi)
    const C z = -x * sqrt_half;
    return C(0.5) * std::erfc(z) + C(0.5) * x * (C(1.1283791670955125739) * std::exp(-z * z)) * sqrt_half;
  }
};

template <class C>
C sigmoid_of(C x) {
  return C(1) / (C(1) + std::exp(-x));
}

// softmax / log_softmax over the groups of `axes`, in C, with g the cotangent (vjp) or null.
enum class SoftmaxKind { softmax, log_softmax };

template <SoftmaxKind Kind, class X, class G>
activation_result_t<X> softmax_impl(const X& x, const std::vector<int>& axes, const G* g, const char* fn) {
  using T = typename tensor_traits<X>::scalar;
  using C = accum_t<T>;
  const Shape xs = shape_of(x);
  if (g) check_cotangent<G, T, tensor_traits<X>::rank>(*g, xs, fn);
  const AxisGroups groups(xs, canonicalize_axes(axes, xs, fn));
  activation_result_t<X> y(x.dimensions());
  const T* in = x.data();
  T* out = y.data();
  const std::vector<Index>& inner = groups.inner();
  const Index n = groups.size();
  std::vector<C> e(static_cast<std::size_t>(n));
  for (Index grp = 0; grp < groups.groups(); ++grp) {
    const Index b = groups.base(grp);
    // x_max starts at -inf (jnp.max's initial): a group of -inf gives NaN, as in JAX.
    C mx = -std::numeric_limits<C>::infinity();
    for (Index k = 0; k < n; ++k) {
      const C v = static_cast<C>(in[b + inner[k]]);
      mx = (v > mx || v != v) ? v : mx;  // jnp.max propagates NaN
    }
    C sum = 0;
    for (Index k = 0; k < n; ++k) {
      e[k] = std::exp(static_cast<C>(in[b + inner[k]]) - mx);
      sum += e[k];
    }
    if (!g) {
      if constexpr (Kind == SoftmaxKind::softmax) {
        for (Index k = 0; k < n; ++k) out[b + inner[k]] = static_cast<T>(e[k] / sum);
      } else {
        const C lse = std::log(sum);
        for (Index k = 0; k < n; ++k) out[b + inner[k]] = static_cast<T>((static_cast<C>(in[b + inner[k]]) - mx) - lse);
      }
    } else {
      const T* gd = g->data();
      if constexpr (Kind == SoftmaxKind::softmax) {
        C dot = 0;  // sum(y g)
        for (Index k = 0; k < n; ++k) dot += (e[k] / sum) * static_cast<C>(gd[b + inner[k]]);
        for (Index k = 0; k < n; ++k) {
          const C yk = e[k] / sum;
          out[b + inner[k]] = static_cast<T>(yk * (static_cast<C>(gd[b + inner[k]]) - dot));
        }
      } else {
        C gsum = 0;
        for (Index k = 0; k < n; ++k) gsum += static_cast<C>(gd[b + inner[k]]);
        for (Index k = 0; k < n; ++k)
          out[b + inner[k]] = static_cast<T>(static_cast<C>(gd[b + inner[k]]) - (e[k] / sum) * gsum);
      }
    }
  }
  return y;
}

}  // namespace detail

// ---- gelu ------------------------------------------------------------------------------

// jax.nn.gelu(x, approximate=True).   x: any shape -> the same shape.
template <class X>
detail::activation_result_t<X> gelu(const X& x, bool approximate = true) {
  detail::require_activation_input<X>();
  const detail::Gelu<typename detail::tensor_traits<X>::scalar> f{approximate};
  return detail::map_elements(x, [&f](auto v) { return f.value(v); });
}
// The input cotangent of gelu at x for the output cotangent `cotangent` (x's shape).
template <class X, class G>
detail::activation_result_t<X> gelu_vjp(const X& x, const G& cotangent, bool approximate = true) {
  detail::require_activation_input<X>();
  const detail::Gelu<typename detail::tensor_traits<X>::scalar> f{approximate};
  return detail::map_cotangent(x, cotangent, "gelu_vjp", [&f](auto v, auto g) { return g * f.derivative(v); });
}

// ---- silu / swish ----------------------------------------------------------------------

// jax.nn.silu(x) = x * sigmoid(x).   x: any shape -> the same shape.
template <class X>
detail::activation_result_t<X> silu(const X& x) {
  detail::require_activation_input<X>();
  return detail::map_elements(x, [](auto v) { return v * detail::sigmoid_of(v); });
}
template <class X, class G>
detail::activation_result_t<X> silu_vjp(const X& x, const G& cotangent) {
  detail::require_activation_input<X>();
  return detail::map_cotangent(x, cotangent, "silu_vjp", [](auto v, auto g) {
    const auto s = detail::sigmoid_of(v);
    return g * (s + v * (s * (decltype(s)(1) - s)));
  });
}
// jax.nn.swish is jax.nn.silu.
template <class X>
detail::activation_result_t<X> swish(const X& x) {
  return silu(x);
}
template <class X, class G>
detail::activation_result_t<X> swish_vjp(const X& x, const G& cotangent) {
  return silu_vjp(x, cotangent);
}

// ---- relu ------------------------------------------------------------------------------

// jax.nn.relu(x) = jnp.maximum(x, 0) (NaN stays NaN).   x: any shape -> the same shape.
template <class X>
detail::activation_result_t<X> relu(const X& x) {
  detail::require_activation_input<X>();
  return detail::map_elements(x, [](auto v) { return (v > 0 || v != v) ? v : decltype(v)(0); });
}
// cotangent where x > 0, else 0 (jax.nn.relu's jvp: the derivative at 0 is 0).
template <class X, class G>
detail::activation_result_t<X> relu_vjp(const X& x, const G& cotangent) {
  detail::require_activation_input<X>();
  return detail::map_cotangent(x, cotangent, "relu_vjp", [](auto v, auto g) { return v > 0 ? g : decltype(g)(0); });
}

// ---- softmax / log_softmax -------------------------------------------------------------

// jax.nn.softmax(x, axis).   x: any shape -> the same shape, summing to 1 over `axis`.
template <class X>
detail::activation_result_t<X> softmax(const X& x, const std::vector<int>& axes) {
  detail::require_activation_input<X>();
  return detail::softmax_impl<detail::SoftmaxKind::softmax, X, X>(x, axes, nullptr, "softmax");
}
template <class X>
detail::activation_result_t<X> softmax(const X& x, int axis = -1) {
  return softmax(x, std::vector<int>{axis});
}
template <class X, class G>
detail::activation_result_t<X> softmax_vjp(const X& x, const G& cotangent, const std::vector<int>& axes) {
  detail::require_activation_input<X>();
  return detail::softmax_impl<detail::SoftmaxKind::softmax, X, G>(x, axes, &cotangent, "softmax_vjp");
}
template <class X, class G>
detail::activation_result_t<X> softmax_vjp(const X& x, const G& cotangent, int axis = -1) {
  return softmax_vjp(x, cotangent, std::vector<int>{axis});
}

// jax.nn.log_softmax(x, axis).   x: any shape -> the same shape.
template <class X>
detail::activation_result_t<X> log_softmax(const X& x, const std::vector<int>& axes) {
  detail::require_activation_input<X>();
  return detail::softmax_impl<detail::SoftmaxKind::log_softmax, X, X>(x, axes, nullptr, "log_softmax");
}
template <class X>
detail::activation_result_t<X> log_softmax(const X& x, int axis = -1) {
  return log_softmax(x, std::vector<int>{axis});
}
template <class X, class G>
detail::activation_result_t<X> log_softmax_vjp(const X& x, const G& cotangent, const std::vector<int>& axes) {
  detail::require_activation_input<X>();
  return detail::softmax_impl<detail::SoftmaxKind::log_softmax, X, G>(x, axes, &cotangent, "log_softmax_vjp");
}
template <class X, class G>
detail::activation_result_t<X> log_softmax_vjp(const X& x, const G& cotangent, int axis = -1) {
  return log_softmax_vjp(x, cotangent, std::vector<int>{axis});
}

}  // namespace linen

#endif  // LINEN_ACTIVATIONS_HPP

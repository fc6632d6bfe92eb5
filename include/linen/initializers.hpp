// SPDX-License-Identifier: Apache-2.0
//
// linen::initializers: flax.linen.initializers (which are jax.nn.initializers), with
// JAX's exact arithmetic so that a parameter initialised here equals Flax's.
//
// An initializer fills a parameter buffer of a given shape (row-major), as Flax's
// `init(key, shape, dtype)` returns it. Every built-in is a small aggregate whose call
// operator takes either a linen::random::Key (JAX's bits) or any C++ uniform random
// bit generator (std::mt19937, ...; its next two 32-bit draws become the Key):
//
//   std::vector<float> w(16 * 64);
//   linen::initializers::lecun_normal()(key, {16, 64}, w.data());
//   linen::initializers::Initializer<float> init = linen::initializers::normal{.stddev = 0.02};
//   init(key, {64}, b.data());   // C++20 designated initializers; C++17: normal{0.02}
//
// Parameter types P: float, double, Eigen::half, Eigen::bfloat16 (zeros, ones and
// constant also fill any arithmetic type). Only float32 is pinned by golden fixtures;
// the others follow jax.random's arithmetic for those dtypes (see random.hpp).
#ifndef LINEN_INITIALIZERS_HPP
#define LINEN_INITIALIZERS_HPP

#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen::initializers {

// Any initializer of P parameters: fills out[0 .. prod(shape)) for a parameter of
// `shape` (row-major). The built-ins below and user lambdas convert to it.
template <class P>
using Initializer = std::function<void(random::Key key, const Shape& shape, P* out)>;

// variance_scaling's `mode`: the fan the variance is divided by.
enum class FanMode { fan_in, fan_out, fan_avg };
// variance_scaling's `distribution`.
enum class Distribution { truncated_normal, normal, uniform };

namespace detail {

template <class K>
inline constexpr bool is_key_v = std::is_same_v<std::decay_t<K>, random::Key>;

// A Key or a (non-const) engine: what every initializer's call operator accepts.
template <class K>
inline constexpr bool is_key_source_v =
    is_key_v<K> || (linen::detail::is_urbg<std::remove_reference_t<K>>::value &&
                    !std::is_const_v<std::remove_reference_t<K>>);

inline random::Key as_key(const random::Key& k) { return k; }
template <class G, std::enable_if_t<linen::detail::is_urbg<G>::value, int> = 0>
random::Key as_key(G& engine) {
  return random::key_from_engine(engine);
}

template <class P>
void check_random_type() {
  static_assert(is_element_type_v<P>,
                "linen::initializers: random parameters are float, double, Eigen::half or Eigen::bfloat16");
}

template <class P>
void check_fill_type() {
  static_assert(is_element_type_v<P> || std::is_arithmetic_v<P>,
                "linen::initializers: parameters are float, double, Eigen::half, Eigen::bfloat16 or arithmetic");
}

inline Index checked_size(const Shape& shape, const void* out, const char* name) {
  const Index n = num_elements(shape);
  if (out == nullptr && n > 0)
    throw linen::invalid_argument(std::string("linen::initializers::") + name + ": null output buffer for shape " +
                                to_string(shape));
  return n;
}

// `np.array(v, dtype)`: a Python float in the parameter type, rounded once.
template <class P>
P value_as(double v) {
  if constexpr (is_element_type_v<P>) return linen::detail::round_from_double<P>(v);
  else return static_cast<P>(v);
}

template <class P>
P sqrt_of(P x) {
  if constexpr (std::is_same_v<P, float> || std::is_same_v<P, double>) return std::sqrt(x);
  else return static_cast<P>(std::sqrt(static_cast<float>(x)));  // exact for half types
}

template <class P>
void scale_by(P* out, Index n, P factor) {
  for (Index i = 0; i < n; ++i) out[i] = static_cast<P>(out[i] * factor);
}

}  // namespace detail

// jax.nn.initializers.zeros: all zeros (the key is ignored). Flax's default bias_init.
struct zeros {
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&&, const Shape& shape, P* out) const {
    detail::check_fill_type<P>();
    const Index n = detail::checked_size(shape, out, "zeros");
    for (Index i = 0; i < n; ++i) out[i] = P(0);
  }
};

// jax.nn.initializers.ones: all ones (the key is ignored). LayerNorm's default scale_init.
struct ones {
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&&, const Shape& shape, P* out) const {
    detail::check_fill_type<P>();
    const Index n = detail::checked_size(shape, out, "ones");
    for (Index i = 0; i < n; ++i) out[i] = P(1);
  }
};

// flax.linen.initializers.zeros_init() / ones_init(): the same, as factories.
inline zeros zeros_init() { return {}; }
inline ones ones_init() { return {}; }

// jax.nn.initializers.constant(value): every element `value` (rounded to P).
struct constant {
  double value = 0.0;
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&&, const Shape& shape, P* out) const {
    detail::check_fill_type<P>();
    const Index n = detail::checked_size(shape, out, "constant");
    const P v = detail::value_as<P>(value);
    for (Index i = 0; i < n; ++i) out[i] = v;
  }
};

// jax.nn.initializers.uniform(scale): uniform in [0, scale) (random.uniform * scale).
struct uniform {
  double scale = 1e-2;
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&& key, const Shape& shape, P* out) const {
    detail::check_random_type<P>();
    const Index n = detail::checked_size(shape, out, "uniform");
    random::uniform<P>(detail::as_key(key), shape, P(0.0f), P(1.0f), out);
    detail::scale_by(out, n, detail::value_as<P>(scale));
  }
};

// jax.nn.initializers.normal(stddev): N(0, stddev^2) (random.normal * stddev).
struct normal {
  double stddev = 1e-2;
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&& key, const Shape& shape, P* out) const {
    detail::check_random_type<P>();
    const Index n = detail::checked_size(shape, out, "normal");
    random::normal<P>(detail::as_key(key), shape, out);
    detail::scale_by(out, n, detail::value_as<P>(stddev));
  }
};

// jax.nn.initializers.truncated_normal(stddev, lower=-2, upper=2): a standard normal
// truncated to (lower, upper), times stddev (no variance correction: that is
// variance_scaling's). Throws std::invalid_argument unless lower < upper.
struct truncated_normal {
  double stddev = 1e-2;
  double lower = -2.0;
  double upper = 2.0;
  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&& key, const Shape& shape, P* out) const {
    detail::check_random_type<P>();
    const Index n = detail::checked_size(shape, out, "truncated_normal");
    random::truncated_normal<P>(detail::as_key(key), detail::value_as<P>(lower), detail::value_as<P>(upper), shape,
                                out);
    detail::scale_by(out, n, detail::value_as<P>(stddev));
  }
};

// jax.nn.initializers._compute_fans: the effective input and output sizes of a kernel.
// Axes outside in_axis, out_axis and batch_axis form the receptive field (a
// convolution's spatial dims): fan_in = prod(shape[in_axis]) * receptive field,
// fan_out = prod(shape[out_axis]) * receptive field. Negative axes count from the end.
// Throws std::invalid_argument for a rank below 2, an axis out of range, or a zero
// in/out/batch size (JAX divides by them).
struct Fans {
  double fan_in;
  double fan_out;
};
inline Fans compute_fans(const Shape& shape, const std::vector<int>& in_axis = {-2},
                         const std::vector<int>& out_axis = {-1}, const std::vector<int>& batch_axis = {}) {
  const int rank = static_cast<int>(shape.size());
  if (rank < 2)
    throw linen::invalid_argument("linen::initializers: can't compute input and output sizes of a " +
                                std::to_string(rank) + "-dimensional weights tensor " + to_string(shape) +
                                ". Must be at least 2D.");
  const auto size_of = [&](const std::vector<int>& axes, const char* what) {
    double s = 1;
    for (int a : axes) {
      if (a < -rank || a >= rank)
        throw linen::invalid_argument(std::string("linen::initializers: ") + what + " " + std::to_string(a) +
                                    " is out of range for shape " + to_string(shape));
      s *= static_cast<double>(shape[static_cast<std::size_t>(a < 0 ? a + rank : a)]);
    }
    if (s == 0)
      throw linen::invalid_argument(std::string("linen::initializers: the ") + what + " size of shape " +
                                  to_string(shape) + " is zero");
    return s;
  };
  const double in_size = size_of(in_axis, "in_axis");
  const double out_size = size_of(out_axis, "out_axis");
  const double batch_size = size_of(batch_axis, "batch_axis");
  const double receptive = static_cast<double>(num_elements(shape)) / in_size / out_size / batch_size;
  return Fans{in_size * receptive, out_size * receptive};
}

// jax.nn.initializers.variance_scaling: samples of variance scale / n, n the fan of
// `mode` (fan_avg: (fan_in + fan_out) / 2), from
//   truncated_normal: N(0, 1) truncated to (-2, 2), times sqrt(var) / 0.87962566103423978
//                     (the stddev of that truncated normal, so the result has variance var);
//   normal:           N(0, 1) times sqrt(var);
//   uniform:          U[-1, 1) times sqrt(3 var).
// The shape must have rank >= 2 (see compute_fans). Throws std::invalid_argument for a
// negative or non-finite scale or a zero fan.
struct variance_scaling {
  double scale = 1.0;
  FanMode mode = FanMode::fan_in;
  Distribution distribution = Distribution::truncated_normal;
  std::vector<int> in_axis{-2};
  std::vector<int> out_axis{-1};
  std::vector<int> batch_axis{};

  template <class K, class P, std::enable_if_t<detail::is_key_source_v<K>, int> = 0>
  void operator()(K&& key, const Shape& shape, P* out) const {
    detail::check_random_type<P>();
    const Index n = detail::checked_size(shape, out, "variance_scaling");
    if (!(scale >= 0.0) || !std::isfinite(scale))
      throw linen::invalid_argument("linen::initializers::variance_scaling: scale must be a finite value >= 0, got " +
                                  std::to_string(scale));
    const Fans fans = compute_fans(shape, in_axis, out_axis, batch_axis);
    double denominator = fans.fan_in;
    if (mode == FanMode::fan_out) denominator = fans.fan_out;
    else if (mode == FanMode::fan_avg) denominator = (fans.fan_in + fans.fan_out) / 2;
    const P variance = detail::value_as<P>(scale / denominator);
    const random::Key k = detail::as_key(key);
    switch (distribution) {
      case Distribution::truncated_normal: {
        const P stddev = static_cast<P>(detail::sqrt_of(variance) / detail::value_as<P>(.87962566103423978));
        random::truncated_normal<P>(k, P(-2.0f), P(2.0f), shape, out);
        detail::scale_by(out, n, stddev);
        return;
      }
      case Distribution::normal:
        random::normal<P>(k, shape, out);
        detail::scale_by(out, n, detail::sqrt_of(variance));
        return;
      case Distribution::uniform:
        random::uniform<P>(k, shape, P(-1.0f), P(1.0f), out);
        detail::scale_by(out, n, detail::sqrt_of(static_cast<P>(P(3.0f) * variance)));
        return;
    }
    throw linen::invalid_argument("linen::initializers::variance_scaling: invalid distribution " +
                                std::to_string(static_cast<int>(distribution)));
  }
};

// The named variance-scaling initializers, with Flax's / JAX's parameters.
// lecun_normal is Flax's default kernel_init (Dense, DenseGeneral, attention).
inline variance_scaling lecun_normal(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                     std::vector<int> batch_axis = {}) {
  return {1.0, FanMode::fan_in, Distribution::truncated_normal, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
inline variance_scaling lecun_uniform(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                      std::vector<int> batch_axis = {}) {
  return {1.0, FanMode::fan_in, Distribution::uniform, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
inline variance_scaling glorot_normal(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                      std::vector<int> batch_axis = {}) {
  return {1.0, FanMode::fan_avg, Distribution::truncated_normal, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
inline variance_scaling glorot_uniform(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                       std::vector<int> batch_axis = {}) {
  return {1.0, FanMode::fan_avg, Distribution::uniform, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
inline variance_scaling he_normal(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                  std::vector<int> batch_axis = {}) {
  return {2.0, FanMode::fan_in, Distribution::truncated_normal, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
inline variance_scaling he_uniform(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                   std::vector<int> batch_axis = {}) {
  return {2.0, FanMode::fan_in, Distribution::uniform, std::move(in_axis), std::move(out_axis),
          std::move(batch_axis)};
}
// JAX's aliases.
inline variance_scaling xavier_normal(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                      std::vector<int> batch_axis = {}) {
  return glorot_normal(std::move(in_axis), std::move(out_axis), std::move(batch_axis));
}
inline variance_scaling xavier_uniform(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                       std::vector<int> batch_axis = {}) {
  return glorot_uniform(std::move(in_axis), std::move(out_axis), std::move(batch_axis));
}
inline variance_scaling kaiming_normal(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                       std::vector<int> batch_axis = {}) {
  return he_normal(std::move(in_axis), std::move(out_axis), std::move(batch_axis));
}
inline variance_scaling kaiming_uniform(std::vector<int> in_axis = {-2}, std::vector<int> out_axis = {-1},
                                        std::vector<int> batch_axis = {}) {
  return he_uniform(std::move(in_axis), std::move(out_axis), std::move(batch_axis));
}

}  // namespace linen::initializers

#endif  // LINEN_INITIALIZERS_HPP

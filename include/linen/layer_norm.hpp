// SPDX-License-Identifier: Apache-2.0
//
// LayerNorm (flax/linen/normalization.py) over the last axis, with Flax's defaults:
// epsilon 1e-6, statistics in at least float32, the fast variance E[x^2] - E[x]^2 clipped
// at 0, then y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias.
#ifndef LINEN_LAYER_NORM_HPP
#define LINEN_LAYER_NORM_HPP

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "detail/broadcast.hpp"
#include "detail/normalization.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "module.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {

// scale and bias: [features] (empty when not used).
template <class ParamT>
struct LayerNormParams {
  Tensor<ParamT, 1> scale;
  Tensor<ParamT, 1> bias;
};

// LayerNorm<T, ParamT>: T is Flax's `dtype` (the output type), ParamT its `param_dtype`.
template <class T, class ParamT = T>
class LayerNorm {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: LayerNorm element types must be float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Params = LayerNormParams<ParamT>;
  struct Config {
    double epsilon = 1e-6;
    bool use_bias = true;
    bool use_scale = true;
    bool use_fast_variance = true;
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
    initializers::Initializer<ParamT> scale_init = initializers::ones();
  };

  LayerNorm() = default;
  explicit LayerNorm(Config config) : config_(std::move(config)) {
    if (!(config_.epsilon >= 0))
      throw linen::invalid_argument("LayerNorm: epsilon must be >= 0, got " + std::to_string(config_.epsilon));
  }
  const Config& config() const { return config_; }

  // init(rng, inputs) / init(rng, features): the parameters Flax's Module.init makes,
  // `scale` then `bias` (each [features], each drawing the scope's next key, as Flax's
  // self.param does). `rng`: a linen::random::Key (a top-level module) or the RngScope of
  // this submodule (see module.hpp).   inputs: [batch..., features].
  template <class Rng>
  Params init(Rng&& rng, Index features) const {
    detail::InitScope scope(rng);
    return init_params(scope.get(), features);
  }
  template <class Rng, class X, std::enable_if_t<detail::is_tensor_v<X>, int> = 0>
  Params init(Rng&& rng, const X& inputs) const {
    static_assert(detail::tensor_traits<X>::rank >= 1, "linen: LayerNorm needs at least one dim");
    detail::InitScope scope(rng);
    return init_params(scope.get(), inputs.dimension(detail::tensor_traits<X>::rank - 1));
  }

  //   x: [batch..., features] -> [batch..., features], normalized over the last axis.
  template <class X>
  Tensor<T, detail::tensor_traits<X>::rank> apply(const Params& p, const X& x) const {
    static_assert(detail::is_tensor_v<X>, "linen: LayerNorm::apply takes a linen::Tensor (or a map of one)");
    constexpr int N = detail::tensor_traits<X>::rank;
    static_assert(N >= 1, "linen: LayerNorm needs at least one dim");
    Tensor<T, N> y(x.dimensions());
    apply_raw(p, x.data(), shape_of(x), y.data());
    return y;
  }

  // The same over raw row-major memory; `y` may alias `x` when both are T.
  template <class I>
  void apply_raw(const Params& p, const I* x, const Shape& xs, T* y) const {
    if (xs.empty()) throw linen::invalid_argument("LayerNorm: input must have at least one dim");
    const Index f = xs.back();
    check_params(p, f);
    apply_rows(p, x, f ? num_elements(xs) / f : 0, f, y);
  }

  // The core of apply_raw: `rows` rows of `f` features (the caller has checked the
  // parameters); allocates nothing.
  template <class I>
  void apply_rows(const Params& p, const I* x, Index rows, Index f, T* y) const {
    using S = detail::norm_stat_t<T, I>;
    for (Index r = 0; r < rows; ++r) {
      const I* xr = x + r * f;
      T* yr = y + r * f;
      S mean = 0, var = 0;
      if (config_.use_fast_variance) {
        S m1 = 0, m2 = 0;
        for (Index j = 0; j < f; ++j) {
          const S v = static_cast<S>(xr[j]);
          m1 += v;
          m2 += v * v;
        }
        mean = m1 / static_cast<S>(f);
        var = std::max(S(0), m2 / static_cast<S>(f) - mean * mean);
      } else {
        for (Index j = 0; j < f; ++j) mean += static_cast<S>(xr[j]);
        mean /= static_cast<S>(f);
        for (Index j = 0; j < f; ++j) {
          const S d = static_cast<S>(xr[j]) - mean;
          var += d * d;
        }
        var /= static_cast<S>(f);
      }
      const S inv = detail::norm_rsqrt(var, config_.epsilon);
      for (Index j = 0; j < f; ++j) {
        const S mul = config_.use_scale ? inv * static_cast<S>(p.scale(j)) : inv;
        S v = (static_cast<S>(xr[j]) - mean) * mul;
        if (config_.use_bias) v += static_cast<S>(p.bias(j));
        yr[j] = static_cast<T>(v);
      }
    }
  }

  void check_params(const Params& p, Index features) const {
    if (config_.use_scale && p.scale.dimension(0) != features)
      throw linen::invalid_argument("LayerNorm: scale of shape " + to_string(shape_of(p.scale)) +
                                  " does not fit " + std::to_string(features) + " features");
    if (config_.use_bias && p.bias.dimension(0) != features)
      throw linen::invalid_argument("LayerNorm: bias of shape " + to_string(shape_of(p.bias)) +
                                  " does not fit " + std::to_string(features) + " features");
  }

 private:
  Params init_params(random::RngScope& scope, Index features) const {
    if (features <= 0) throw linen::invalid_argument("LayerNorm: features must be positive, got " + std::to_string(features));
    detail::checked_allocation<ParamT>(Shape{features}, "LayerNorm: scale");
    Params p;
    if (config_.use_scale) {
      if (!config_.scale_init) throw linen::invalid_argument("LayerNorm: scale_init is empty");
      p.scale.resize(features);
      config_.scale_init(scope.make_rng(), Shape{features}, p.scale.data());
    }
    if (config_.use_bias) {
      if (!config_.bias_init) throw linen::invalid_argument("LayerNorm: bias_init is empty");
      p.bias.resize(features);
      config_.bias_init(scope.make_rng(), Shape{features}, p.bias.data());
    }
    return p;
  }

  Config config_{};
};

}  // namespace linen

#ifdef LINEN_COMPILED  // linen::compiled: its instantiations, declared extern
#include "detail/compiled/layer_norm.hpp"
#endif

#endif  // LINEN_LAYER_NORM_HPP

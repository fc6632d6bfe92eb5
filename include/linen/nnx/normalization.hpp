// SPDX-License-Identifier: Apache-2.0
//
// flax/nnx/nn/normalization.py's LayerNorm and RMSNorm on linen's LayerNorm and RMSNorm.
//
//   nnx.LayerNorm(6, rngs=rngs)     LayerNorm<float> ln({.num_features = 6}); auto p = ln.init(rngs);
//   nnx.RMSNorm(6, rngs=rngs)       RMSNorm<float> rms({.num_features = 6}); auto p = rms.init(rngs);
//
// Init: LayerNorm draws rngs.params() for `scale` [num_features] (when use_scale), then
// again for `bias` [num_features] (when use_bias); RMSNorm once for `scale` (when
// use_scale). ones/zeros ignore their key, but the draws still count: a module made after
// a LayerNorm from the same Rngs sees the `params` counter advanced by two.
//
// Numerics: nnx's __call__ first casts x, scale and bias to the module's dtype T
// (promote_dtype((x, scale, bias), dtype=self.dtype)), then computes linen's statistics
// (_compute_stats in at least float32) and _normalize on those T values. linen's flax.linen
// LayerNorm does not round x to dtype first, so the two differ when the input (or the
// params) are wider than T; here the core is linen's LayerNorm<T, T> / RMSNorm<T, T> run on
// the cast values, which is nnx's arithmetic. With dtype=None nnx's T is
// jnp.result_type(x, scale, bias); pick T as that.
//
// Axes: RMSNorm takes any reduction_axes and one feature axis (linen's RMSNorm);
// LayerNorm normalises over the last axis with its features there (reduction_axes =
// feature_axes = -1, nnx's default; other axes throw linen::invalid_argument: linen's
// LayerNorm core is last-axis only). num_features must equal the input's feature dim.
// Not reproduced: axis_name, axis_index_groups, mask, a custom promote_dtype, the
// *_metadata.
#ifndef LINEN_NNX_NORMALIZATION_HPP
#define LINEN_NNX_NORMALIZATION_HPP

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/axes.hpp"
#include "../errors.hpp"
#include "../initializers.hpp"
#include "../layer_norm.hpp"
#include "../module.hpp"
#include "../rms_norm.hpp"
#include "../tensor.hpp"
#include "rnglib.hpp"

namespace linen::nnx {
namespace detail {

// `src` cast to To (a copy); the same tensor when the types agree is the caller's choice.
template <class To, class From, int N>
Tensor<To, N> cast_tensor(const Tensor<From, N>& src) {
  Tensor<To, N> out(src.dimensions());
  for (Index i = 0; i < src.size(); ++i) out.data()[i] = static_cast<To>(src.data()[i]);
  return out;
}
template <class To, class X>
Tensor<To, linen::detail::tensor_traits<X>::rank> cast_input(const X& x) {
  Tensor<To, linen::detail::tensor_traits<X>::rank> out(x.dimensions());
  for (Index i = 0; i < x.size(); ++i) out.data()[i] = static_cast<To>(x.data()[i]);
  return out;
}

inline void check_num_features(Index num_features, const char* module) {
  if (num_features <= 0)
    throw linen::invalid_argument(std::string(module) + ": num_features must be positive, got " +
                                  std::to_string(num_features));
}

// The feature dim of x at `axis` (canonical) must be num_features.
inline void check_feature_dim(const Shape& xs, int axis, Index num_features, const char* module) {
  if (xs[static_cast<std::size_t>(axis)] != num_features)
    throw linen::invalid_argument(std::string(module) + ": input of shape " + to_string(xs) + " has " +
                                  std::to_string(xs[static_cast<std::size_t>(axis)]) + " features at axis " +
                                  std::to_string(axis) + ", num_features=" + std::to_string(num_features));
}

}  // namespace detail

// ---- LayerNorm ------------------------------------------------------------------------

template <class T, class ParamT = T>
class LayerNorm {
 public:
  using Core = linen::LayerNorm<T, T>;  // nnx computes on x, scale, bias cast to T
  using Params = LayerNormParams<ParamT>;  // scale, bias [num_features] (size 0 when unused)

  // nnx.LayerNorm's fields in nnx's order.
  struct Config {
    Index num_features = 0;  // required
    double epsilon = 1e-6;
    bool use_bias = true;
    bool use_scale = true;
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
    initializers::Initializer<ParamT> scale_init = initializers::ones();
    std::vector<int> reduction_axes{-1};
    std::vector<int> feature_axes{-1};
    bool use_fast_variance = true;
  };

  explicit LayerNorm(Config config) : config_(std::move(config)), core_(core_config(config_)) {}
  const Config& config() const { return config_; }
  const Core& core() const { return core_; }

  // nnx.LayerNorm.__init__'s draws: scale (use_scale), then bias (use_bias), each
  // rngs.params(), each of shape (num_features,). A throw leaves rngs unchanged.
  Params init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      const Shape s{config_.num_features};
      linen::detail::checked_allocation<ParamT>(s, "nnx::LayerNorm: scale");
      Params p;
      if (config_.use_scale) {
        p.scale.resize(config_.num_features);
        config_.scale_init(r.params(), s, p.scale.data());
      }
      if (config_.use_bias) {
        p.bias.resize(config_.num_features);
        config_.bias_init(r.params(), s, p.bias.data());
      }
      return p;
    });
  }

  //   x: [batch..., num_features] -> the same shape, in T.
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank> apply(const Params& p, const X& x) const {
    static_assert(linen::detail::is_tensor_v<X>, "linen: nnx::LayerNorm::apply takes a linen::Tensor (or a map of one)");
    using I = typename linen::detail::tensor_traits<X>::scalar;
    check(p, shape_of(x));
    if constexpr (std::is_same_v<I, T> && std::is_same_v<ParamT, T>) {
      return core_.apply(p, x);
    } else {
      return core_.apply(cast_params(p), detail::cast_input<T>(x));
    }
  }

  // Throws unless x's axes are nnx's defaults for linen's core and x's features and the
  // params are [num_features].
  void check(const Params& p, const Shape& xs) const {
    if (xs.empty()) throw linen::invalid_argument("nnx::LayerNorm: input must have at least one dim");
    const int last = static_cast<int>(xs.size()) - 1;
    const auto red = linen::detail::canonicalize_axes(config_.reduction_axes, xs, "nnx::LayerNorm: reduction_axes");
    const auto feat = linen::detail::canonicalize_axes(config_.feature_axes, xs, "nnx::LayerNorm: feature_axes");
    if (red != std::vector<int>{last} || feat != std::vector<int>{last})
      throw linen::invalid_argument("nnx::LayerNorm: reduction_axes " + linen::detail::axes_string(config_.reduction_axes) +
                                    " and feature_axes " + linen::detail::axes_string(config_.feature_axes) +
                                    " for an input of shape " + to_string(xs) +
                                    ": linen normalises over the last axis only (both -1)");
    detail::check_feature_dim(xs, last, config_.num_features, "nnx::LayerNorm");
    const Shape want{config_.num_features};
    if (config_.use_scale && shape_of(p.scale) != want)
      throw linen::invalid_argument("nnx::LayerNorm: scale of shape " + to_string(shape_of(p.scale)) + ", expected " +
                                    to_string(want));
    if (config_.use_bias && shape_of(p.bias) != want)
      throw linen::invalid_argument("nnx::LayerNorm: bias of shape " + to_string(shape_of(p.bias)) + ", expected " +
                                    to_string(want));
  }

  // The parameters as nnx's promote_dtype hands them to the arithmetic: cast to T.
  LayerNormParams<T> cast_params(const Params& p) const {
    LayerNormParams<T> q;
    if (config_.use_scale) q.scale = detail::cast_tensor<T>(p.scale);
    if (config_.use_bias) q.bias = detail::cast_tensor<T>(p.bias);
    return q;
  }

 private:
  static typename Core::Config core_config(const Config& c) {
    detail::check_num_features(c.num_features, "nnx::LayerNorm");
    if (c.use_scale && !c.scale_init) throw linen::invalid_argument("nnx::LayerNorm: scale_init is empty");
    if (c.use_bias && !c.bias_init) throw linen::invalid_argument("nnx::LayerNorm: bias_init is empty");
    typename Core::Config k;
    k.epsilon = c.epsilon;
    k.use_bias = c.use_bias;
    k.use_scale = c.use_scale;
    k.use_fast_variance = c.use_fast_variance;
    return k;  // the initializers stay nnx's (they fill ParamT); the core only computes
  }

  Config config_;
  Core core_;
};

// ---- RMSNorm --------------------------------------------------------------------------

template <class T, class ParamT = T>
class RMSNorm {
 public:
  using Core = linen::RMSNorm<T, T>;
  using Params = RMSNormParams<ParamT>;  // scale [num_features] (size 0 when unused)

  // nnx.RMSNorm's fields in nnx's order (use_fast_variance has no effect without the mean,
  // in nnx as here).
  struct Config {
    Index num_features = 0;  // required
    double epsilon = 1e-6;
    bool use_scale = true;
    initializers::Initializer<ParamT> scale_init = initializers::ones();
    std::vector<int> reduction_axes{-1};
    std::vector<int> feature_axes{-1};  // exactly one axis here
    bool use_fast_variance = true;
  };

  explicit RMSNorm(Config config) : config_(std::move(config)), core_(core_config(config_)) {}
  const Config& config() const { return config_; }
  const Core& core() const { return core_; }

  // nnx.RMSNorm.__init__'s one draw (when use_scale): scale = scale_init(rngs.params(),
  // (num_features,)). A throw leaves rngs unchanged.
  Params init(Rngs& rngs) const {
    return detail::transact(rngs, [&](Rngs& r) {
      Params p;
      if (config_.use_scale) {
        const Shape s{config_.num_features};
        linen::detail::checked_allocation<ParamT>(s, "nnx::RMSNorm: scale");
        p.scale.resize(config_.num_features);
        config_.scale_init(r.params(), s, p.scale.data());
      }
      return p;
    });
  }

  //   x: [...] -> the same shape, in T, normalised over reduction_axes.
  template <class X>
  Tensor<T, linen::detail::tensor_traits<X>::rank> apply(const Params& p, const X& x) const {
    static_assert(linen::detail::is_tensor_v<X>, "linen: nnx::RMSNorm::apply takes a linen::Tensor (or a map of one)");
    using I = typename linen::detail::tensor_traits<X>::scalar;
    check(p, shape_of(x));
    if constexpr (std::is_same_v<I, T> && std::is_same_v<ParamT, T>) {
      return core_.apply(p, x);
    } else {
      return core_.apply(cast_params(p), detail::cast_input<T>(x));
    }
  }

  void check(const Params& p, const Shape& xs) const {
    const auto l = core_.layout(xs);  // throws for an axis out of range
    detail::check_feature_dim(xs, l.feature_axis, config_.num_features, "nnx::RMSNorm");
    if (config_.use_scale && shape_of(p.scale) != Shape{config_.num_features})
      throw linen::invalid_argument("nnx::RMSNorm: scale of shape " + to_string(shape_of(p.scale)) + ", expected " +
                                    to_string(Shape{config_.num_features}));
  }

  RMSNormParams<T> cast_params(const Params& p) const {
    RMSNormParams<T> q;
    if (config_.use_scale) q.scale = detail::cast_tensor<T>(p.scale);
    return q;
  }

 private:
  static typename Core::Config core_config(const Config& c) {
    detail::check_num_features(c.num_features, "nnx::RMSNorm");
    if (c.use_scale && !c.scale_init) throw linen::invalid_argument("nnx::RMSNorm: scale_init is empty");
    if (c.feature_axes.size() != 1)
      throw linen::invalid_argument("nnx::RMSNorm: feature_axes " + linen::detail::axes_string(c.feature_axes) +
                                    ": linen's RMSNorm takes exactly one feature axis");
    typename Core::Config k;
    k.epsilon = c.epsilon;
    k.use_scale = c.use_scale;
    k.reduction_axes = c.reduction_axes;
    k.feature_axes = c.feature_axes.front();
    return k;
  }

  Config config_;
  Core core_;
};

}  // namespace linen::nnx

#endif  // LINEN_NNX_NORMALIZATION_HPP

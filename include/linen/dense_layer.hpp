// SPDX-License-Identifier: Apache-2.0
//
// Dense (flax/linen/linear.py's nn.Dense): a linear map over the last dim of the input,
// kernel [in_features, features], bias [features]. It is DenseGeneral with one contracted
// axis and one feature dim (axis=-1, features=(features,)), and linen expresses it as
// exactly that: Dense<T, ParamT> is a DenseGeneral<T, ParamT, 1, 1> with Flax's Dense
// Config, so apply, apply_raw, the parameter checks and grad.hpp's vjp are DenseGeneral's.
//
// Init is bit-identical to Flax's Dense by construction: Flax's Dense declares `kernel`
// (kernel_init sees (in_features, features)) then `bias` ((features,)), and DenseGeneral
// with one axis draws the same two keys in the same order, its kernel initializer seeing
// the flattened (prod(in_dims), prod(features)) = (in_features, features).
//
//   Dense<T, ParamT>::Config{.features, .use_bias = true, .precision = Default,
//                            .kernel_init = lecun_normal(), .bias_init = zeros()}
//   init(rng, inputs) / init(rng, in_features)     {kernel [in, features], bias [features]}
//   apply(params, x)         x: [batch..., in_features] -> [batch..., features]
//   vjp(dense, params, x)    grad.hpp's vjp(DenseGeneral, ...) (a Dense is one)
//
// T is Flax's `dtype` (the computation type: inputs, kernel and bias are cast to it, as
// promote_dtype does; half types accumulate in float), ParamT its `param_dtype`. Errors
// from apply name DenseGeneral, the code that checks them.
#ifndef LINEN_DENSE_LAYER_HPP
#define LINEN_DENSE_LAYER_HPP

#include <array>
#include <string>
#include <utility>

#include "dense.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "precision.hpp"
#include "tensor.hpp"

namespace linen {

template <class T, class ParamT = T>
class Dense : public DenseGeneral<T, ParamT, 1, 1> {
 public:
  using General = DenseGeneral<T, ParamT, 1, 1>;
  using Params = typename General::Params;  // DenseParams<ParamT, 1, 1>: kernel [in, features], bias [features]

  // Flax's fields in Flax's order (dtype and param_dtype are T and ParamT).
  struct Config {
    Index features = 0;  // required (Flax: no default)
    bool use_bias = true;
    Precision precision = Precision::Default;
    initializers::Initializer<ParamT> kernel_init = initializers::lecun_normal();
    initializers::Initializer<ParamT> bias_init = initializers::zeros();
  };

  explicit Dense(Config config) : General(general_config(config)), config_(std::move(config)) {}
  const Config& config() const { return config_; }
  // The DenseGeneral this Dense is.
  const General& general() const { return *this; }

  // init(rng, inputs) (DenseGeneral's) and init(rng, in_features): kernel, then bias.
  using General::init;
  template <class Rng>
  Params init(Rng&& rng, Index in_features) const {
    return General::init(std::forward<Rng>(rng), std::array<Index, 1>{in_features});
  }

 private:
  static typename General::Config general_config(const Config& c) {
    if (c.features <= 0) throw linen::invalid_argument("Dense: features must be positive, got " + std::to_string(c.features));
    typename General::Config g;
    g.features = {c.features};
    g.use_bias = c.use_bias;
    g.kernel_init = c.kernel_init;
    g.bias_init = c.bias_init;
    g.precision = c.precision;
    return g;
  }

  Config config_;
};

}  // namespace linen

#endif  // LINEN_DENSE_LAYER_HPP

// SPDX-License-Identifier: Apache-2.0
//
// The vjps of the nnx modules (jax.vjp of each module's __call__), on linen's backward
// cores: Linear is linen's Dense (grad.hpp's vjp(DenseGeneral)); LinearGeneral runs
// DenseGeneral's backward core (detail::dense_backward) once per batch slice of its
// kernel; Embed is linen's Embed (embed.hpp's vjp / vjp_attend); LayerNorm and RMSNorm
// are linen's on the values cast to T, their cotangents cast back to the primal types (the
// vjp of nnx's promote_dtype casts).
//
//   vjp(module, params, x [, options]) -> {output, pullback}; pullback(cotangent) ->
//   {params: the parameters' cotangents (named as the params), input: x's cotangent}
//   vjp_attend(embed, params, query)
//
// As everywhere in linen, `params` must outlive the pullback (the rvalue overloads are
// deleted); the norms' pullbacks own the cast copies they need.
#ifndef LINEN_NNX_GRAD_HPP
#define LINEN_NNX_GRAD_HPP

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/grad_layers.hpp"
#include "../detail/vjp.hpp"
#include "../embed.hpp"
#include "../grad.hpp"
#include "../rms_norm.hpp"
#include "../tensor.hpp"
#include "linear.hpp"
#include "normalization.hpp"

namespace linen::nnx {

// ---- Linear: linen's Dense ----------------------------------------------------------------

template <class T, class ParamT, class X>
auto vjp(const Linear<T, ParamT>& linear, const typename Linear<T, ParamT>::Params& params, const X& x,
         const GradOptions& options = {}) {
  linear.check_params(params);
  return linen::vjp(linear.dense().general(), params, x, options);
}
template <class T, class ParamT, class X>
void vjp(const Linear<T, ParamT>&, typename Linear<T, ParamT>::Params&&, const X&, const GradOptions& = {}) = delete;

// ---- LinearGeneral --------------------------------------------------------------------

template <class ParamT, int Axes, int Features, int Batch, class I, int N>
struct LinearGeneralGrads {
  LinearGeneralParams<ParamT, Axes, Features, Batch> params;  // kernel, bias (size 0 without bias)
  Tensor<I, N> input;                                        // x's shape
};

template <class T, class ParamT, int Axes, int Features, int Batch, class I, int N>
class LinearGeneralPullback {
 public:
  using Module = LinearGeneral<T, ParamT, Axes, Features, Batch>;
  using Grads = LinearGeneralGrads<ParamT, Axes, Features, Batch, I, N>;
  static constexpr int OutRank = N - Axes + Features;

  // cotangent: the output's shape -> the cotangents of params and input.
  template <class G>
  Grads operator()(const G& cotangent) const {
    linen::detail::check_cotangent<G, T, OutRank>(cotangent, layout_.out_shape, "nnx::LinearGeneral vjp");
    const Index in = module_.in_size(), out = module_.out_size(), rows = layout_.rows;
    const bool use_bias = module_.config().use_bias;
    Grads g;
    g.params.kernel.resize(params_->kernel.dimensions());
    if (use_bias) g.params.bias.resize(params_->bias.dimensions());
    g.input.resize(to_dims<N>(xs_));
    std::vector<I> dxp;
    I* dx = g.input.data();
    if (!layout_.identity) {
      dxp.resize(static_cast<std::size_t>(g.input.size()));
      dx = dxp.data();
    }
    for (Index b = 0; b < module_.batch_size(); ++b)
      linen::detail::dense_backward<T, ParamT, I>(
          x_.data() + b * rows * in, rows, in, out, params_->kernel.data() + b * in * out,
          cotangent.data() + b * rows * out, g.params.kernel.data() + b * in * out,
          use_bias ? g.params.bias.data() + b * out : nullptr, dx + b * rows * in, pool_);
    if (!layout_.identity) detail::unpermute_copy(dxp.data(), xs_, layout_.perm, g.input.data());
    return g;
  }

  // Internal: made by vjp().
  LinearGeneralPullback(const Module& module, const typename Module::Params* params, typename Module::Layout layout,
                        std::vector<T> x, Shape xs, Eigen::ThreadPoolInterface* pool)
      : module_(module), params_(params), layout_(std::move(layout)), x_(std::move(x)), xs_(std::move(xs)), pool_(pool) {}

 private:
  const Module module_;  // a copy: the config the forward ran with
  const typename Module::Params* params_;
  typename Module::Layout layout_;
  std::vector<T> x_;  // the input as the product read it: permuted, cast to T
  Shape xs_;
  Eigen::ThreadPoolInterface* pool_;
};

template <class T, class ParamT, int Axes, int Features, int Batch, class X>
Vjp<Tensor<T, linen::detail::tensor_traits<X>::rank - Axes + Features>,
    LinearGeneralPullback<T, ParamT, Axes, Features, Batch, typename linen::detail::tensor_traits<X>::scalar,
                          linen::detail::tensor_traits<X>::rank>>
vjp(const LinearGeneral<T, ParamT, Axes, Features, Batch>& module,
    const LinearGeneralParams<ParamT, Axes, Features, Batch>& params, const X& x, const GradOptions& options = {}) {
  using I = typename linen::detail::tensor_traits<X>::scalar;
  constexpr int N = linen::detail::tensor_traits<X>::rank;
  linen::detail::check_grad_options(options, "nnx::LinearGeneral vjp");
  auto y = module.apply(params, x);  // checks everything
  const Shape xs = shape_of(x);
  auto layout = module.layout(xs);
  std::vector<T> xt(static_cast<std::size_t>(x.size()));
  detail::permute_copy(x.data(), xs, layout.perm, xt.data());
  return {std::move(y), LinearGeneralPullback<T, ParamT, Axes, Features, Batch, I, N>(
                            module, &params, std::move(layout), std::move(xt), xs, options.thread_pool)};
}
template <class T, class ParamT, int Axes, int Features, int Batch, class X>
void vjp(const LinearGeneral<T, ParamT, Axes, Features, Batch>&, LinearGeneralParams<ParamT, Axes, Features, Batch>&&,
         const X&, const GradOptions& = {}) = delete;

// ---- Embed: linen's Embed ----------------------------------------------------------------

template <class T, class ParamT, class X>
auto vjp(const Embed<T, ParamT>& embed, const EmbedParams<ParamT>& params, const X& indices) {
  return linen::vjp(embed.core(), params, indices);
}
template <class T, class ParamT, class X>
auto vjp_attend(const Embed<T, ParamT>& embed, const EmbedParams<ParamT>& params, const X& query) {
  return linen::vjp_attend(embed.core(), params, query);
}
template <class T, class ParamT, class X>
void vjp_attend(const Embed<T, ParamT>&, EmbedParams<ParamT>&&, const X&) = delete;

// ---- LayerNorm and RMSNorm: linen's on the cast values ----------------------------------

namespace detail {

// A pullback over linen's (Inner), which points at `params` (owned here, cast to T), and
// whose cotangents are cast back to ParamT / I.
template <class CastParams, class Inner, class Grads>
class CastNormPullback {
 public:
  template <class G>
  Grads operator()(const G& cotangent) const {
    auto gi = inner_(cotangent);
    Grads out;
    out.params.scale = cast_tensor<typename decltype(out.params.scale)::Scalar>(gi.params.scale);
    if constexpr (has_bias<Grads>::value) out.params.bias = cast_tensor<typename decltype(out.params.bias)::Scalar>(gi.params.bias);
    out.input = cast_tensor<typename decltype(out.input)::Scalar>(gi.input);
    return out;
  }
  CastNormPullback(std::unique_ptr<const CastParams> params, Inner inner)
      : params_(std::move(params)), inner_(std::move(inner)) {}

 private:
  template <class U, class = void>
  struct has_bias : std::false_type {};
  template <class U>
  struct has_bias<U, std::void_t<decltype(std::declval<U&>().params.bias)>> : std::true_type {};

  std::unique_ptr<const CastParams> params_;  // inner_ points here
  Inner inner_;
};

}  // namespace detail

template <class T, class ParamT, class X>
auto vjp(const LayerNorm<T, ParamT>& norm, const LayerNormParams<ParamT>& params, const X& x) {
  using I = typename linen::detail::tensor_traits<X>::scalar;
  constexpr int N = linen::detail::tensor_traits<X>::rank;
  norm.check(params, shape_of(x));
  auto cast = std::make_unique<const LayerNormParams<T>>(norm.cast_params(params));
  auto inner = linen::vjp(norm.core(), *cast, detail::cast_input<T>(x));
  using Inner = decltype(inner.pullback);
  using P = detail::CastNormPullback<LayerNormParams<T>, Inner, LayerNormGrads<ParamT, I, N>>;
  return Vjp<Tensor<T, N>, P>{std::move(inner.output), P(std::move(cast), std::move(inner.pullback))};
}
template <class T, class ParamT, class X>
void vjp(const LayerNorm<T, ParamT>&, LayerNormParams<ParamT>&&, const X&) = delete;

template <class T, class ParamT, class X>
auto vjp(const RMSNorm<T, ParamT>& norm, const RMSNormParams<ParamT>& params, const X& x) {
  using I = typename linen::detail::tensor_traits<X>::scalar;
  constexpr int N = linen::detail::tensor_traits<X>::rank;
  norm.check(params, shape_of(x));
  auto cast = std::make_unique<const RMSNormParams<T>>(norm.cast_params(params));
  auto inner = linen::vjp(norm.core(), *cast, detail::cast_input<T>(x));
  using Inner = decltype(inner.pullback);
  using P = detail::CastNormPullback<RMSNormParams<T>, Inner, RMSNormGrads<ParamT, I, N>>;
  return Vjp<Tensor<T, N>, P>{std::move(inner.output), P(std::move(cast), std::move(inner.pullback))};
}
template <class T, class ParamT, class X>
void vjp(const RMSNorm<T, ParamT>&, RMSNormParams<ParamT>&&, const X&) = delete;

}  // namespace linen::nnx

#endif  // LINEN_NNX_GRAD_HPP

// SPDX-License-Identifier: Apache-2.0
//
// RMSNorm (flax/linen/normalization.py): y = x * (rsqrt(mean(x^2) + epsilon) * scale),
// the mean over `reduction_axes`, one scale per entry of `feature_axes`. Flax's RMSNorm
// is _compute_stats(use_mean=False) then _normalize(use_bias=False), so its numerics are
// LayerNorm's without the mean (detail/normalization.hpp states the shared rules):
//   - the statistics in at least float32 (float64 kept): x is cast to that type, squared
//     and averaged; use_fast_variance has no effect without the mean;
//   - epsilon (a weakly typed Python float) is added in the statistics type;
//   - mul = rsqrt(mean + epsilon) * scale in the statistics type, then x * mul, rounded to
//     dtype T once.
//
//   RMSNorm<T, ParamT>::Config{.epsilon = 1e-6, .use_scale = true, .scale_init = ones,
//                              .reduction_axes = {-1}, .feature_axes = -1}
//   init(rng, inputs) / init(rng, input_shape) / init(rng, features)
//                             {scale: [inputs.shape[feature_axes]]}, the scope's draw 1
//   apply(params, x)          x: [...] -> the same shape, in T
//   vjp(norm, params, x)      -> output, pullback(cotangent) -> {params: {scale}, input}
//
// Differences from Flax: feature_axes is one axis (Flax also takes a tuple, giving a scale
// of several dims); no axis_name / axis_index_groups (no pmap), no mask, no
// force_float32_reductions=False (the statistics are always at least float32).
#ifndef LINEN_RMS_NORM_HPP
#define LINEN_RMS_NORM_HPP

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/axes.hpp"
#include "detail/normalization.hpp"
#include "detail/vjp.hpp"
#include "errors.hpp"
#include "initializers.hpp"
#include "module.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {

// scale: [x.shape[feature_axes]] (size 0 when use_scale is false).
template <class ParamT>
struct RMSNormParams {
  Tensor<ParamT, 1> scale;
};

template <class ParamT, class I, int N>
struct RMSNormGrads {
  RMSNormParams<ParamT> params;  // scale (size 0 when use_scale is false)
  Tensor<I, N> input;            // x's shape
};

template <class T, class ParamT = T>
class RMSNorm {
  static_assert(is_element_type_v<T> && is_element_type_v<ParamT>,
                "linen: RMSNorm element types must be float, double, Eigen::half or Eigen::bfloat16");

 public:
  using Params = RMSNormParams<ParamT>;
  struct Config {
    double epsilon = 1e-6;
    bool use_scale = true;
    initializers::Initializer<ParamT> scale_init = initializers::ones();
    std::vector<int> reduction_axes{-1};
    int feature_axes = -1;
  };

  RMSNorm() = default;
  explicit RMSNorm(Config config) : config_(std::move(config)) {
    if (!(config_.epsilon >= 0))
      throw linen::invalid_argument("RMSNorm: epsilon must be >= 0, got " + std::to_string(config_.epsilon));
    if (config_.use_scale && !config_.scale_init) throw linen::invalid_argument("RMSNorm: scale_init is empty");
  }
  const Config& config() const { return config_; }

  // init: the parameters Flax's Module.init makes: `scale` of [shape[feature_axes]] (the
  // scope's first draw), none when use_scale is false. `rng`: a linen::random::Key (a
  // top-level module) or the RngScope of this submodule (see module.hpp).
  //   inputs / input_shape: x as apply will see it; features: x of shape [features].
  template <class Rng>
  Params init(Rng&& rng, const Shape& input_shape) const {
    detail::InitScope scope(rng);
    const Layout l = layout(input_shape);
    Params p;
    if (config_.use_scale) {
      const Index f = input_shape[static_cast<std::size_t>(l.feature_axis)];
      if (f <= 0) throw linen::invalid_argument("RMSNorm: features must be positive, got shape " + to_string(input_shape));
      detail::checked_allocation<ParamT>(Shape{f}, "RMSNorm: scale");
      p.scale.resize(f);
      config_.scale_init(scope.get().make_rng(), Shape{f}, p.scale.data());
    }
    return p;
  }
  template <class Rng, class X, std::enable_if_t<detail::is_tensor_v<X>, int> = 0>
  Params init(Rng&& rng, const X& inputs) const {
    return init(std::forward<Rng>(rng), shape_of(inputs));
  }
  template <class Rng>
  Params init(Rng&& rng, Index features) const {
    return init(std::forward<Rng>(rng), Shape{features});
  }

  //   x: [...] -> the same shape, normalized over reduction_axes.
  template <class X>
  Tensor<T, detail::tensor_traits<X>::rank> apply(const Params& p, const X& x) const {
    static_assert(detail::is_tensor_v<X>, "linen: RMSNorm::apply takes a linen::Tensor (or a map of one)");
    using I = typename detail::tensor_traits<X>::scalar;
    static_assert(is_element_type_v<I>, "linen: RMSNorm takes float, double, Eigen::half or Eigen::bfloat16 inputs");
    const Shape xs = shape_of(x);
    const Layout l = layout(xs);
    check_params(p, xs, l);
    Tensor<T, detail::tensor_traits<X>::rank> y(x.dimensions());
    using S = detail::norm_stat_t<T, I>;
    const I* xd = x.data();
    T* yd = y.data();
    for_each_group<S>(p, xd, xs, l, [&](Index, Index off, S xv, S, S mul, Index) { yd[off] = static_cast<T>(xv * mul); });
    return y;
  }

  // The canonical axes of an input of shape xs (throws when an axis is out of range).
  struct Layout {
    std::vector<int> reduction_axes;
    int feature_axis = 0;
  };
  Layout layout(const Shape& xs) const {
    Layout l;
    l.reduction_axes = detail::canonicalize_axes(config_.reduction_axes, xs, "RMSNorm: reduction_axes");
    l.feature_axis = detail::canonicalize_axes({config_.feature_axes}, xs, "RMSNorm: feature_axes").front();
    return l;
  }

  void check_params(const Params& p, const Shape& xs, const Layout& l) const {
    if (!config_.use_scale) return;
    const Index f = xs[static_cast<std::size_t>(l.feature_axis)];
    if (p.scale.dimension(0) != f)
      throw linen::invalid_argument("RMSNorm: scale of shape " + to_string(shape_of(p.scale)) + " does not fit input of shape " +
                                    to_string(xs) + " (feature axis " + std::to_string(l.feature_axis) + ": " +
                                    std::to_string(f) + " features)");
  }

  // Calls f(group, offset, x, inv, mul, feature) for every element of x, one reduction
  // group after the other, with x, inv = rsqrt(mean(x^2) + epsilon) and
  // mul = inv * scale[feature] in S: the forward's arithmetic, for apply and the vjp. The
  // caller has checked the parameters.
  template <class S, class I, class F>
  void for_each_group(const Params& p, const I* x, const Shape& xs, const Layout& l, F f) const {
    const detail::AxisGroups groups(xs, l.reduction_axes);
    const std::vector<Index>& inner = groups.inner();
    const Index n = groups.size();
    // The feature index of base(g) + inner[k]: a function of k when the feature axis is
    // reduced, of g otherwise (the two offsets index disjoint axes).
    Index fstride = 1;
    for (std::size_t a = static_cast<std::size_t>(l.feature_axis) + 1; a < xs.size(); ++a) fstride *= xs[a];
    const Index fdim = xs[static_cast<std::size_t>(l.feature_axis)];
    bool feature_reduced = false;
    for (int a : l.reduction_axes) feature_reduced |= a == l.feature_axis;
    std::vector<Index> kfeat;
    if (feature_reduced) {
      kfeat.resize(static_cast<std::size_t>(n));
      for (Index k = 0; k < n; ++k) kfeat[static_cast<std::size_t>(k)] = (inner[static_cast<std::size_t>(k)] / fstride) % fdim;
    }
    for (Index g = 0; g < groups.groups(); ++g) {
      const Index b = groups.base(g);
      S ms = 0;
      for (Index k = 0; k < n; ++k) {
        const S v = static_cast<S>(x[b + inner[static_cast<std::size_t>(k)]]);
        ms += v * v;
      }
      ms /= static_cast<S>(n);
      const S inv = detail::norm_rsqrt(ms, config_.epsilon);
      const Index gfeat = feature_reduced ? 0 : (b / fstride) % fdim;
      for (Index k = 0; k < n; ++k) {
        const Index off = b + inner[static_cast<std::size_t>(k)];
        const Index feat = feature_reduced ? kfeat[static_cast<std::size_t>(k)] : gfeat;
        const S mul = config_.use_scale ? inv * static_cast<S>(p.scale(feat)) : inv;
        f(g, off, static_cast<S>(x[off]), inv, mul, feat);
      }
    }
  }

 private:
  Config config_{};
};

// ---- vjp -------------------------------------------------------------------------------

// The backward of one RMSNorm call: cotangent (x's shape) -> RMSNormGrads. In the
// statistics type S, per group of n elements with w = scale[feature] and
// r = rsqrt(mean(x^2) + epsilon):  dx = g w r - x r^3 sum(g w x) / n,
// dscale[feature] += g x r.
template <class T, class ParamT, class I, int N>
class RMSNormPullback {
 public:
  using Grads = RMSNormGrads<ParamT, I, N>;
  template <class G>
  Grads operator()(const G& cotangent) const {
    detail::check_cotangent<G, T, N>(cotangent, shape_of(x_), "RMSNorm vjp");
    using S = detail::norm_stat_t<T, I>;
    const Shape xs = shape_of(x_);
    const auto l = norm_.layout(xs);
    const bool use_scale = norm_.config().use_scale;
    const Index fdim = xs[static_cast<std::size_t>(l.feature_axis)];
    std::vector<S> dscale(use_scale ? static_cast<std::size_t>(fdim) : 0, S(0));
    std::vector<S> dx(static_cast<std::size_t>(x_.size()));
    const T* g = cotangent.data();
    const Index groups = detail::AxisGroups(xs, l.reduction_axes).groups();
    const Index n = groups ? x_.size() / groups : 0;
    // Pass 1: dx = g w r (w = scale[feature], r = inv), the groups' sum(g w x), dscale.
    std::vector<S> dot(static_cast<std::size_t>(groups), S(0));
    norm_.template for_each_group<S>(*params_, x_.data(), xs, l, [&](Index grp, Index off, S xv, S r, S mul, Index feat) {
      const S gv = static_cast<S>(g[off]);
      const S w = use_scale ? static_cast<S>(params_->scale(feat)) : S(1);
      dx[static_cast<std::size_t>(off)] = gv * mul;
      dot[static_cast<std::size_t>(grp)] += gv * w * xv;
      if (use_scale) dscale[static_cast<std::size_t>(feat)] += gv * xv * r;
    });
    // Pass 2: dx -= x r^3 sum(g w x) / n.
    Grads out;
    out.input.resize(x_.dimensions());
    I* dxo = out.input.data();
    norm_.template for_each_group<S>(*params_, x_.data(), xs, l, [&](Index grp, Index off, S xv, S r, S, Index) {
      const S c = r * r * r * dot[static_cast<std::size_t>(grp)] / static_cast<S>(n);
      dxo[off] = static_cast<I>(dx[static_cast<std::size_t>(off)] - xv * c);
    });
    if (use_scale) {
      out.params.scale.resize(fdim);
      for (Index j = 0; j < fdim; ++j) out.params.scale(j) = static_cast<ParamT>(dscale[static_cast<std::size_t>(j)]);
    }
    return out;
  }

  // Internal: made by vjp().
  RMSNormPullback(const RMSNorm<T, ParamT>& norm, const RMSNormParams<ParamT>* params, Tensor<I, N> x)
      : norm_(norm), params_(params), x_(std::move(x)) {}

 private:
  const RMSNorm<T, ParamT> norm_;  // a copy: the config the forward ran with
  const RMSNormParams<ParamT>* params_;
  Tensor<I, N> x_;
};

// vjp of RMSNorm::apply.   x: [...] -> output (x's shape) and its pullback.
// `params` must outlive the pullback (as with grad.hpp's vjps).
template <class T, class ParamT, class X>
Vjp<Tensor<T, detail::tensor_traits<X>::rank>,
    RMSNormPullback<T, ParamT, typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>>
vjp(const RMSNorm<T, ParamT>& norm, const RMSNormParams<ParamT>& params, const X& x) {
  using I = typename detail::tensor_traits<X>::scalar;
  constexpr int N = detail::tensor_traits<X>::rank;
  auto y = norm.apply(params, x);  // checks the shapes
  Tensor<I, N> xc = x;
  return {std::move(y), RMSNormPullback<T, ParamT, I, N>(norm, &params, std::move(xc))};
}
template <class T, class ParamT, class X>
void vjp(const RMSNorm<T, ParamT>&, RMSNormParams<ParamT>&&, const X&) = delete;  // would dangle

}  // namespace linen

#endif  // LINEN_RMS_NORM_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Dropout (flax/linen/stochastic.py), to the letter:
//   deterministic = merge_param('deterministic', module's, call's)   (exactly one given)
//   rate == 0 or deterministic  -> the inputs unchanged
//   rate == 1                   -> zeros (no rng needed; "prevent gradient NaNs")
//   else: keep = jax.random.bernoulli(rng, p=1 - rate, shape=broadcast_shape), the
//         input's shape with each of broadcast_dims set to 1, broadcast back to the
//         input's shape; y = keep ? x / keep_prob : 0, the division in x's dtype
//         (keep_prob, a Python float, is weakly typed: rounded to the dtype).
// Note that this rounds differently from attention's dropout, which multiplies by
// keep / keep_prob.
//
//   Dropout::Config{.rate, .broadcast_dims = {}, .deterministic = nullopt,
//                   .rng_collection = "dropout"}
//   init(rng, inputs)               {}: Dropout has no parameters and draws nothing
//   apply([params,] x, {.deterministic, .rng})   x: [...] -> the same shape and type
//   vjp(dropout, x, call)           -> output, pullback(cotangent) -> the input's
//                                   cotangent: keep ? g / keep_prob : 0 (identity when
//                                   deterministic, zeros for rate 1)
//
// The rng: Flax's __call__ takes `rng` or calls make_rng(rng_collection). linen holds no
// rng streams, so the caller passes `rng` (a DropoutRng: a linen::random::Key gives JAX's
// exact bits, e.g. RngScope(dropout_key).push("dropout_0").make_rng() for the key Flax's
// make_rng('dropout') would draw in that module; a C++ engine or any callable also
// works); rng_collection is kept as Flax's field, for the caller's bookkeeping.
//
// Differences from Flax: a rate outside [0, 1] and a broadcast dim outside
// [-rank, rank) throw linen::invalid_argument (Flax computes with keep_prob outside
// [0, 1] / raises an IndexError).
#ifndef LINEN_DROPOUT_HPP
#define LINEN_DROPOUT_HPP

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/axes.hpp"
#include "detail/broadcast.hpp"
#include "detail/vjp.hpp"
#include "dropout_rng.hpp"
#include "errors.hpp"
#include "module.hpp"
#include "tensor.hpp"

namespace linen {

// Dropout has no parameters (Flax's init gives an empty tree).
struct DropoutParams {};

// The arguments of Dropout.__call__ besides the inputs.
struct DropoutCall {
  std::optional<bool> deterministic{};
  DropoutRng rng{};
};

namespace detail {

// What one Dropout call did: the mask it drew (at the broadcast shape) and how to read
// it at the input's shape; shared by apply and the vjp's pullback.
struct DropoutDraw {
  enum class Kind { identity, zeros, masked } kind = Kind::identity;
  double keep_prob = 1.0;
  std::vector<char> keep;       // [broadcast_shape], when masked
  std::vector<Index> strides;   // keep's strides read at the input's shape
  Shape shape;                  // the input's shape

  // out[i] = keep ? in[i] / keep_prob : 0 over the input's shape, in T's computation type.
  template <class T, class I>
  void apply_mask(const I* in, T* out) const {
    using C = accum_t<T>;
    const Index n = num_elements(shape);
    if (kind == Kind::identity) {
      for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
      return;
    }
    if (kind == Kind::zeros) {
      for (Index i = 0; i < n; ++i) out[i] = T(0);
      return;
    }
    const C kp = static_cast<C>(static_cast<T>(keep_prob));  // weakly typed: keep_prob in dtype
    const std::size_t r = shape.size();
    std::vector<Index> idx(r, 0);
    Index moff = 0;
    for (Index i = 0; i < n; ++i) {
      out[i] = keep[static_cast<std::size_t>(moff)] ? static_cast<T>(static_cast<C>(in[i]) / kp) : T(0);
      for (std::size_t d = r; d-- > 0;) {  // odometer over the input's shape
        moff += strides[d];
        if (++idx[d] < shape[d]) break;
        moff -= strides[d] * shape[d];
        idx[d] = 0;
      }
    }
  }
};

}  // namespace detail

class Dropout {
 public:
  using Params = DropoutParams;
  struct Config {
    double rate = 0.0;  // the dropout probability (not the keep rate); Flax: required
    std::vector<int> broadcast_dims{};
    std::optional<bool> deterministic{};
    std::string rng_collection = "dropout";
  };

  explicit Dropout(Config config) : config_(std::move(config)) {
    if (!(config_.rate >= 0.0 && config_.rate <= 1.0))
      throw linen::invalid_argument("Dropout: rate must be in [0, 1], got " + std::to_string(config_.rate));
  }
  const Config& config() const { return config_; }

  // init(rng, inputs): Dropout has no parameters; nothing is drawn from rng.
  template <class Rng, class X>
  Params init(Rng&& rng, const X& inputs) const {
    detail::InitScope scope(rng);  // checks that rng is a Key, an RngScope or an engine
    (void)scope;
    static_assert(detail::is_tensor_v<X>, "linen: Dropout::init takes a linen::Tensor (or a map of one)");
    (void)inputs;
    return {};
  }

  //   x: [...] -> the same shape and element type.
  template <class X>
  Tensor<typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank> apply(const Params&, const X& x,
                                                                                    const DropoutCall& call = {}) const {
    return apply(x, call);
  }
  template <class X, std::enable_if_t<detail::is_tensor_v<X>, int> = 0>
  Tensor<typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank> apply(
      const X& x, const DropoutCall& call = {}) const {
    using T = typename detail::tensor_traits<X>::scalar;
    Tensor<T, detail::tensor_traits<X>::rank> y(x.dimensions());
    draw(x, call).template apply_mask<T>(x.data(), y.data());
    return y;
  }

  // Flax's steps up to the mask: the merge of `deterministic`, the rate's special cases,
  // the broadcast shape and the one bernoulli draw (throws before drawing anything when
  // an argument is wrong).
  template <class X>
  detail::DropoutDraw draw(const X& x, const DropoutCall& call) const {
    static_assert(detail::is_tensor_v<X>, "linen: Dropout::apply takes a linen::Tensor (or a map of one)");
    static_assert(is_element_type_v<typename detail::tensor_traits<X>::scalar>,
                  "linen: Dropout takes float, double, Eigen::half or Eigen::bfloat16 tensors");
    detail::DropoutDraw d;
    d.shape = shape_of(x);
    // Flax merges before looking at the rate (attention merges only when its rate is
    // positive): ask merge_deterministic as if the rate were positive, with the rng
    // checked below, where Flax needs it.
    const bool deterministic =
        detail::merge_deterministic(config_.deterministic, call.deterministic, 1.0, true, "Dropout");
    Shape bshape = d.shape;
    for (int a : detail::canonicalize_axes(config_.broadcast_dims, d.shape, "Dropout: broadcast_dims"))
      bshape[static_cast<std::size_t>(a)] = 1;
    if (config_.rate == 0.0 || deterministic) return d;
    if (config_.rate == 1.0) {
      d.kind = detail::DropoutDraw::Kind::zeros;
      return d;
    }
    if (!call.rng)
      throw linen::invalid_argument("Dropout: rate=" + std::to_string(config_.rate) +
                                    " with deterministic=false needs an rng (Flax: make_rng('" +
                                    config_.rng_collection + "'))");
    d.kind = detail::DropoutDraw::Kind::masked;
    d.keep_prob = 1.0 - config_.rate;
    d.keep.assign(static_cast<std::size_t>(num_elements(bshape)), 0);
    static_assert(sizeof(bool) == 1, "linen: bool must be one byte");
    call.rng(d.keep_prob, bshape, reinterpret_cast<bool*>(d.keep.data()));
    d.strides = detail::broadcast_strides(bshape, d.shape, "Dropout: mask");
    return d;
  }

 private:
  Config config_;
};

// ---- vjp -------------------------------------------------------------------------------

// The backward of one Dropout call: cotangent (x's shape) -> the input's cotangent, with
// the mask the forward drew.
template <class T, int N>
class DropoutPullback {
 public:
  template <class G>
  Tensor<T, N> operator()(const G& cotangent) const {
    detail::check_cotangent<G, T, N>(cotangent, draw_.shape, "Dropout vjp");
    Tensor<T, N> dx(to_dims<N>(draw_.shape));
    draw_.apply_mask<T>(cotangent.data(), dx.data());
    return dx;
  }
  // Internal: made by vjp().
  explicit DropoutPullback(detail::DropoutDraw draw) : draw_(std::move(draw)) {}

 private:
  detail::DropoutDraw draw_;
};

// vjp of Dropout::apply: the mask is drawn once, here, and serves the output and the
// pullback (any DropoutRng works, a C++ engine included).
template <class X>
Vjp<Tensor<typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>,
    DropoutPullback<typename detail::tensor_traits<X>::scalar, detail::tensor_traits<X>::rank>>
vjp(const Dropout& dropout, const X& x, const DropoutCall& call = {}) {
  using T = typename detail::tensor_traits<X>::scalar;
  constexpr int N = detail::tensor_traits<X>::rank;
  detail::DropoutDraw d = dropout.draw(x, call);
  Tensor<T, N> y(x.dimensions());
  d.apply_mask<T>(x.data(), y.data());
  return {std::move(y), DropoutPullback<T, N>(std::move(d))};
}

}  // namespace linen

#endif  // LINEN_DROPOUT_HPP

// SPDX-License-Identifier: Apache-2.0
//
// flax/nnx/nn/stochastic.py's Dropout on linen's Dropout arithmetic.
//
//   nnx.Dropout(0.5, rngs=rngs)          Dropout drop({.rate = 0.5}); auto s = drop.init(rngs);
//   drop(x)                              drop.apply(s, x)
//   drop(x, deterministic=True)          drop.apply(s, x, {.deterministic = true})
//   drop(x, rngs=other)                  drop.apply(s, x, {.rngs = &other})   (or a stream, or a key)
//
// What nnx does, and linen with it:
//   - construction with rngs forks `rngs[rng_collection]` (the `dropout` stream, or
//     `default` when there is none): the parent stream counts up once, whatever the rate,
//     and the module keeps the fork (its `rngs` attribute, DropoutState::rngs here);
//     construction without rngs keeps none;
//   - deterministic = first_from(call's, module's): the call's wins when given (no
//     "passed twice" error as linen's merge_param has), and the module's default is False,
//     not None: a Dropout is active unless told otherwise;
//   - rate 0 or deterministic: the inputs unchanged; rate 1: zeros (no key drawn);
//   - otherwise the key comes from the call's rngs (an Rngs: its rng_collection stream, an
//     RngStream: its next draw, a key: as is), else from the module's fork (which counts
//     up: two calls draw two masks), and the mask is jax.random.bernoulli(key, 1 - rate,
//     broadcast_shape), y = mask ? x / keep_prob : 0: linen's Dropout arithmetic, which
//     this module calls.
// A call that throws draws nothing from any stream.
#ifndef LINEN_NNX_STOCHASTIC_HPP
#define LINEN_NNX_STOCHASTIC_HPP

#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "../dropout.hpp"
#include "../errors.hpp"
#include "../random.hpp"
#include "../tensor.hpp"
#include "rnglib.hpp"

namespace linen::nnx {

// The state an nnx.Dropout holds: its forked stream (none when made without rngs).
struct DropoutState {
  std::optional<RngStream> rngs;
};

// The arguments of nnx.Dropout.__call__ besides the inputs. `rngs`: none, an Rngs (its
// rng_collection stream draws), an RngStream (draws) or a key (used as is); the pointed-to
// Rngs / stream must be non-const: it counts up.
struct DropoutCall {
  std::optional<bool> deterministic{};
  std::variant<std::monostate, Rngs*, RngStream*, random::Key> rngs{};
};

class Dropout {
 public:
  using State = DropoutState;
  struct Config {
    double rate = 0.0;  // the dropout probability (not the keep rate); nnx: required
    std::vector<int> broadcast_dims{};
    std::optional<bool> deterministic = false;  // nnx's default is False
    std::string rng_collection = "dropout";
  };

  explicit Dropout(Config config) : config_(std::move(config)), core_(core_config(config_)) {}
  const Config& config() const { return config_; }

  // nnx.Dropout(..., rngs=rngs): forks rngs[rng_collection] (falling back to `default`; no
  // such stream throws, leaving rngs unchanged).
  State init(Rngs& rngs) const { return State{rngs[config_.rng_collection].fork()}; }
  // nnx.Dropout(..., rngs=stream): forks the stream.
  State init(RngStream& stream) const { return State{stream.fork()}; }
  // nnx.Dropout(..., rngs=None).
  State init() const { return State{}; }

  //   x: [...] -> the same shape and element type. Advances the stream the key came from.
  template <class X>
  Tensor<typename linen::detail::tensor_traits<X>::scalar, linen::detail::tensor_traits<X>::rank> apply(
      State& state, const X& x, const DropoutCall& call = {}) const {
    using T = typename linen::detail::tensor_traits<X>::scalar;
    Tensor<T, linen::detail::tensor_traits<X>::rank> y(x.dimensions());
    draw(state, x, call).template apply_mask<T>(x.data(), y.data());
    return y;
  }

  // nnx's steps up to the mask, committing the stream's count only once the draw has
  // succeeded.
  template <class X>
  linen::detail::DropoutDraw draw(State& state, const X& x, const DropoutCall& call) const {
    const std::optional<bool>& det = call.deterministic ? call.deterministic : config_.deterministic;
    if (!det)
      throw linen::invalid_argument(
          "nnx::Dropout: No `deterministic` argument was provided to Dropout: pass it to the Config or to the call");
    if (config_.rate == 0.0 || *det || config_.rate == 1.0)
      return core_.draw(x, linen::DropoutCall{*det, {}});  // identity or zeros, no key
    RngStream* source = nullptr;
    random::Key key{};
    if (const auto* r = std::get_if<Rngs*>(&call.rngs)) {
      if (*r == nullptr) throw linen::invalid_argument("nnx::Dropout: call rngs is a null Rngs pointer");
      source = &(**r)[config_.rng_collection];
    } else if (const auto* s = std::get_if<RngStream*>(&call.rngs)) {
      if (*s == nullptr) throw linen::invalid_argument("nnx::Dropout: call rngs is a null RngStream pointer");
      source = *s;
    } else if (const auto* k = std::get_if<random::Key>(&call.rngs)) {
      key = *k;
    } else if (state.rngs) {
      source = &*state.rngs;
    } else {
      throw linen::invalid_argument(
          "nnx::Dropout: `deterministic` is False, but no `rngs` argument was provided to Dropout as either a "
          "__call__ argument or class attribute.");
    }
    std::optional<RngStream> next;
    if (source) {
      next = *source;
      key = (*next)();
    }
    linen::detail::DropoutDraw d = core_.draw(x, linen::DropoutCall{false, key});
    if (source) *source = std::move(*next);
    return d;
  }

  // The linen Dropout whose arithmetic this is (deterministic left to each call).
  const linen::Dropout& core() const { return core_; }

 private:
  static linen::Dropout::Config core_config(const Config& c) {
    linen::Dropout::Config k;
    k.rate = c.rate;  // linen::Dropout checks 0 <= rate <= 1
    k.broadcast_dims = c.broadcast_dims;
    k.deterministic = std::nullopt;
    k.rng_collection = c.rng_collection;
    return k;
  }

  Config config_;
  linen::Dropout core_;
};

// vjp of nnx Dropout::apply: the mask is drawn once (advancing the stream as apply does)
// and serves the output and the pullback, linen's DropoutPullback.
template <class X>
Vjp<Tensor<typename linen::detail::tensor_traits<X>::scalar, linen::detail::tensor_traits<X>::rank>,
    DropoutPullback<typename linen::detail::tensor_traits<X>::scalar, linen::detail::tensor_traits<X>::rank>>
vjp(const Dropout& dropout, DropoutState& state, const X& x, const DropoutCall& call = {}) {
  using T = typename linen::detail::tensor_traits<X>::scalar;
  constexpr int N = linen::detail::tensor_traits<X>::rank;
  linen::detail::DropoutDraw d = dropout.draw(state, x, call);
  Tensor<T, N> y(x.dimensions());
  d.apply_mask<T>(x.data(), y.data());
  return {std::move(y), DropoutPullback<T, N>(std::move(d))};
}

}  // namespace linen::nnx

#endif  // LINEN_NNX_STOCHASTIC_HPP

// SPDX-License-Identifier: Apache-2.0
//
// DropoutRng: the random source attention dropout draws its keep mask from.
// Flax passes a JAX PRNG key (`dropout_rng`); linen accepts any of
//   - a linen::random::Key (or any object with a member
//     `void bernoulli(double p, const Shape& shape, bool* out) const`): JAX's exact bits;
//   - a C++ uniform random bit generator (std::mt19937, ...), held by reference;
//   - any callable `void(double keep_prob, const Shape& shape, bool* keep)`.
#ifndef LINEN_DROPOUT_RNG_HPP
#define LINEN_DROPOUT_RNG_HPP

#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "errors.hpp"
#include "tensor.hpp"

namespace linen {
namespace detail {

template <class G, class = void>
struct is_urbg : std::false_type {};
template <class G>
struct is_urbg<G, std::void_t<typename G::result_type, decltype(G::min()), decltype(G::max()),
                              decltype(std::declval<G&>()())>>
    : std::bool_constant<std::is_unsigned_v<typename G::result_type>> {};

template <class K, class = void>
struct has_bernoulli_member : std::false_type {};
template <class K>
struct has_bernoulli_member<K, std::void_t<decltype(std::declval<const K&>().bernoulli(
                                   0.5, std::declval<const Shape&>(), std::declval<bool*>()))>>
    : std::true_type {};

// 32 uniformly distributed bits from any engine, the same on every standard library.
template <class G>
std::uint32_t draw_u32(G& g) {
  using R = typename G::result_type;
  constexpr auto range = static_cast<unsigned long long>(G::max() - G::min());
  if constexpr (range == 0xFFFFFFFFull) {
    return static_cast<std::uint32_t>(g() - G::min());
  } else if constexpr (range == std::numeric_limits<unsigned long long>::max()) {
    return static_cast<std::uint32_t>(static_cast<unsigned long long>(g() - G::min()) >> 32);
  } else {
    // Other ranges: keep the low b bits of draws below 2^b (rejecting the rest, so each
    // bit is fair) and concatenate them until 32 bits are filled.
    constexpr int b = [] {
      int bits = 0;
      while (bits < 63 && (2ull << bits) - 1 <= range) ++bits;
      return bits;
    }();
    static_assert(b > 0, "linen: an engine must produce at least one random bit");
    std::uint64_t acc = 0;
    int have = 0;
    while (have < 32) {
      const auto x = static_cast<unsigned long long>(static_cast<R>(g() - G::min()));
      if (x >> b) continue;
      acc = b >= 32 ? x : (acc << b) | x;
      have += b;
    }
    return static_cast<std::uint32_t>(acc & 0xFFFFFFFFu);
  }
}

}  // namespace detail

class DropoutRng {
 public:
  // Fills keep[0 .. prod(shape)) in row-major order with Bernoulli(keep_prob) draws.
  using Fn = std::function<void(double keep_prob, const Shape& shape, bool* keep)>;

  DropoutRng() = default;  // Flax's `None`

  // A key-like source (linen::random::Key): copied, so the same key gives the same mask.
  template <class K, std::enable_if_t<detail::has_bernoulli_member<std::decay_t<K>>::value, int> = 0>
  DropoutRng(const K& key)  // NOLINT: implicit, like passing a key in Flax
      : fn_([key](double p, const Shape& shape, bool* keep) { key.bernoulli(p, shape, keep); }) {}

  // A C++ engine, held by reference: it must outlive the call; each call advances it.
  // keep = (32 random bits) / 2^32 < keep_prob.
  template <class G, std::enable_if_t<detail::is_urbg<G>::value &&
                                          !detail::has_bernoulli_member<G>::value, int> = 0>
  DropoutRng(G& engine)  // NOLINT: implicit
      : fn_([&engine](double p, const Shape& shape, bool* keep) {
          const Index n = num_elements(shape);
          for (Index i = 0; i < n; ++i)
            keep[i] = static_cast<double>(detail::draw_u32(engine)) * 0x1p-32 < p;
        }) {}

  // Any callable `void(double keep_prob, const Shape& shape, bool* keep)`.
  template <class F,
            std::enable_if_t<!detail::is_urbg<std::decay_t<F>>::value &&
                                 !detail::has_bernoulli_member<std::decay_t<F>>::value &&
                                 !std::is_same_v<std::decay_t<F>, DropoutRng> &&
                                 std::is_invocable_v<F&, double, const Shape&, bool*>,
                             int> = 0>
  DropoutRng(F fn) : fn_(std::move(fn)) {}  // NOLINT: implicit

  explicit operator bool() const { return static_cast<bool>(fn_); }

  // Draws a keep mask of `shape` into `keep`; throws std::invalid_argument when empty.
  void operator()(double keep_prob, const Shape& shape, bool* keep) const {
    if (!fn_) throw linen::invalid_argument("linen: dropout needs a dropout_rng, none was given");
    fn_(keep_prob, shape, keep);
  }

 private:
  Fn fn_;
};

}  // namespace linen

#endif  // LINEN_DROPOUT_RNG_HPP

// SPDX-License-Identifier: Apache-2.0
//
// linen::random: jax.random's default PRNG, bit for bit, and Flax's rng streams.
//
// JAX's default generator is counter-based: a key is two uint32 words and every
// random number is the Threefry-2x32 hash (20 rounds) of a counter under that key.
// linen reproduces JAX 0.11 with its defaults: `jax_default_prng_impl =
// threefry2x32`, `jax_threefry_partitionable = True` (element i of a draw hashes the
// 64-bit counter i), `jax_enable_x64 = False` (Python floats are float32: bernoulli
// compares float32 uniforms). Verified against tests/data/flax (prng_reference,
// the init_* parameters of Flax's Module.init, the dropout keep masks): integers
// and every float32 value bit-exact (the tests allow 1 ulp).
//
//   linen::random::Key k = linen::random::key(0);          // jax.random.key(0)
//   std::vector<linen::random::Key> ks = linen::random::split(k);
//   std::vector<float> x = linen::random::normal<float>(ks[0], {4, 16});
//   linen::random::truncated_normal<float>(ks[1], -2.0f, 2.0f, {4, 16}, buffer);
//
// Float samplers follow XLA:CPU's arithmetic (see detail/random_math.hpp): float32
// is verified; float64 uses the same algorithms with 64-bit draws (as JAX with x64)
// and float16/bfloat16 draw 16/8 random bits as JAX does, rounding every operation
// to the type; those three are not covered by the golden fixture.
#ifndef LINEN_RANDOM_HPP
#define LINEN_RANDOM_HPP

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "detail/random_math.hpp"
#include "detail/sha1.hpp"
#include "dropout_rng.hpp"  // detail::is_urbg, detail::draw_u32
#include "errors.hpp"
#include "tensor.hpp"

namespace linen::random {

// A JAX PRNG key (`jax.random.key(seed)`, threefry2x32): its two uint32 words, as
// `jax.random.key_data` shows them.
struct Key {
  std::array<std::uint32_t, 2> data{};

  // Fills out[0 .. prod(shape)) (row-major) with jax.random.bernoulli(*this, p, shape).
  // This member is what lets attention dropout take a Key as its `dropout_rng`.
  void bernoulli(double p, const Shape& shape, bool* out) const;

  friend bool operator==(const Key& a, const Key& b) { return a.data == b.data; }
  friend bool operator!=(const Key& a, const Key& b) { return !(a == b); }
};

// The Threefry-2x32 block cipher with 20 rounds (Salmon et al. 2011), as
// jax._src.prng.threefry2x32_p computes it: hashes the counter pair (x0, x1) under
// `key` and returns the two output words.
inline std::array<std::uint32_t, 2> threefry2x32(const Key& key, std::uint32_t x0, std::uint32_t x1) {
  constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const std::uint32_t ks[3] = {key.data[0], key.data[1], key.data[0] ^ key.data[1] ^ 0x1BD11BDAu};
  x0 += ks[0];
  x1 += ks[1];
  for (std::uint32_t i = 0; i < 5; ++i) {
    for (int r : kRot[i % 2]) {
      x0 += x1;
      x1 = (x1 << r) | (x1 >> (32 - r));
      x1 ^= x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + i + 1;
  }
  return {x0, x1};
}

// jax.random.key(seed) / jax.random.PRNGKey(seed): the words [seed >> 32, seed & 0xFFFFFFFF].
// Seeds below 2^32 give the same key with and without jax_enable_x64; larger ones
// (and negative ones, which convert to their 64-bit two's complement) match x64 mode.
inline Key key(std::uint64_t seed) {
  return Key{{static_cast<std::uint32_t>(seed >> 32), static_cast<std::uint32_t>(seed & 0xFFFFFFFFu)}};
}
inline Key PRNGKey(std::uint64_t seed) { return key(seed); }

// jax.random.wrap_key_data / key_data: a key from / to its two uint32 words.
inline Key wrap_key_data(std::array<std::uint32_t, 2> data) { return Key{data}; }
inline std::array<std::uint32_t, 2> key_data(const Key& k) { return k.data; }

// A key from a C++ engine (std::mt19937, ...): its next two 32-bit draws, first one in
// data[0]. The same engine state gives the same key on every standard library.
template <class G, std::enable_if_t<linen::detail::is_urbg<G>::value, int> = 0>
Key key_from_engine(G& engine) {
  const std::uint32_t a = linen::detail::draw_u32(engine);
  const std::uint32_t b = linen::detail::draw_u32(engine);
  return Key{{a, b}};
}

// jax.random.split(key, num): `num` new keys; key i = threefry2x32(key, (i >> 32, i)).
inline std::vector<Key> split(const Key& k, std::size_t num = 2) {
  std::vector<Key> out(num);
  for (std::size_t i = 0; i < num; ++i) {
    const auto c = static_cast<std::uint64_t>(i);
    const auto w = threefry2x32(k, static_cast<std::uint32_t>(c >> 32), static_cast<std::uint32_t>(c));
    out[i] = Key{w};
  }
  return out;
}

// jax.random.fold_in(key, data): threefry2x32(key, (0, data)).
inline Key fold_in(const Key& k, std::uint32_t data) { return Key{threefry2x32(k, 0u, data)}; }

namespace detail {

inline void check_out(const void* out, Index n, const char* fn, const Shape& shape) {
  if (out == nullptr && n > 0)
    throw linen::invalid_argument(std::string("linen::random::") + fn + ": null output buffer for shape " +
                                to_string(shape));
}

// The two hash words of element i of a draw (partitionable mode: the 64-bit counter i).
inline std::array<std::uint32_t, 2> block(const Key& k, Index i) {
  const auto c = static_cast<std::uint64_t>(i);
  return threefry2x32(k, static_cast<std::uint32_t>(c >> 32), static_cast<std::uint32_t>(c));
}

// Element i of jax.random.bits(key, shape, uint<bits>): hi ^ lo truncated, or hi:lo for 64.
template <class U>
U bits_at(const Key& k, Index i) {
  const auto w = block(k, i);
  if constexpr (sizeof(U) == 8) {
    return (static_cast<std::uint64_t>(w[0]) << 32) | w[1];
  } else {
    return static_cast<U>(w[0] ^ w[1]);
  }
}

// A float in [0, 1) from random mantissa bits with exponent 0 (jax.random.uniform):
// float32 uses 32 bits >> 9, float64 64 bits >> 12, float16 16 bits >> 6, and
// bfloat16 (7 mantissa bits < 8) 8 bits >> 1, each OR'ed into the bits of 1.0.
template <class T>
T unit_at(const Key& k, Index i) {
  if constexpr (std::is_same_v<T, float>) {
    const std::uint32_t b = (bits_at<std::uint32_t>(k, i) >> 9) | 0x3F800000u;
    return Eigen::numext::bit_cast<float>(b) - 1.0f;
  } else if constexpr (std::is_same_v<T, double>) {
    const std::uint64_t b = (bits_at<std::uint64_t>(k, i) >> 12) | 0x3FF0000000000000ull;
    return Eigen::numext::bit_cast<double>(b) - 1.0;
  } else if constexpr (std::is_same_v<T, Eigen::half>) {
    const auto b = static_cast<std::uint16_t>((bits_at<std::uint16_t>(k, i) >> 6) | 0x3C00u);
    return Eigen::numext::bit_cast<Eigen::half>(b) - Eigen::half(1.0f);
  } else {
    const auto b = static_cast<std::uint16_t>((std::uint16_t{bits_at<std::uint8_t>(k, i)} >> 1) | 0x3F80u);
    return Eigen::numext::bit_cast<Eigen::bfloat16>(b) - Eigen::bfloat16(1.0f);
  }
}

// floats * (maxval - minval) + minval, then max(minval, .), as _uniform does. XLA:CPU
// fuses the multiply-add for float32/float64; half types round each operation.
template <class T>
void uniform_unchecked(const Key& k, Index n, T minval, T maxval, T* out) {
  const T range = static_cast<T>(maxval - minval);
  for (Index i = 0; i < n; ++i) {
    const T f = unit_at<T>(k, i);
    T v;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      v = std::fma(f, range, minval);
    } else {
      v = static_cast<T>(static_cast<T>(f * range) + minval);
    }
    out[i] = v < minval ? minval : v;
  }
}

template <class T>
T erf_inv(T x) {
  if constexpr (std::is_same_v<T, float>) return linen::detail::erf_inv_f32(x);
  else if constexpr (std::is_same_v<T, double>) return linen::detail::erf_inv_f64(x);
  else return static_cast<T>(linen::detail::erf_inv_f32(static_cast<float>(x)));
}

// float64 erf is the C library's: JAX's x64 erf is not pinned by a fixture here.
template <class T>
T erf(T x) {
  if constexpr (std::is_same_v<T, float>) return linen::detail::erf_f32(x);
  else if constexpr (std::is_same_v<T, double>) return std::erf(x);
  else return static_cast<T>(linen::detail::erf_f32(static_cast<float>(x)));
}

template <class T>
void check_element_type() {
  static_assert(is_element_type_v<T>,
                "linen::random: floats are float, double, Eigen::half or Eigen::bfloat16");
}

template <class T>
std::string num(T v) {
  return std::to_string(static_cast<double>(v));
}

}  // namespace detail

// jax.random.bits(key, shape, dtype): uniform random integers, U one of uint8, uint16,
// uint32 (the default) and uint64, written to out[0 .. prod(shape)) row-major.
// Element i hashes the counter i: hi ^ lo (truncated below 32 bits), hi:lo for uint64.
template <class U = std::uint32_t>
void bits(const Key& k, const Shape& shape, U* out) {
  static_assert(std::is_same_v<U, std::uint8_t> || std::is_same_v<U, std::uint16_t> ||
                    std::is_same_v<U, std::uint32_t> || std::is_same_v<U, std::uint64_t>,
                "linen::random::bits: U must be uint8_t, uint16_t, uint32_t or uint64_t");
  const Index n = num_elements(shape);
  detail::check_out(out, n, "bits", shape);
  for (Index i = 0; i < n; ++i) out[i] = detail::bits_at<U>(k, i);
}
template <class U = std::uint32_t>
std::vector<U> bits(const Key& k, const Shape& shape) {
  std::vector<U> out(static_cast<std::size_t>(num_elements(shape)));
  bits<U>(k, shape, out.data());
  return out;
}

// jax.random.uniform(key, shape, dtype, minval, maxval): values in [minval, maxval)
// of `shape`, written to out[0 .. prod(shape)) row-major. Throws std::invalid_argument
// unless minval <= maxval are finite with a finite difference (JAX would return
// minval, inf or nan there).
template <class T>
void uniform(const Key& k, const Shape& shape, T minval, T maxval, T* out) {
  detail::check_element_type<T>();
  const Index n = num_elements(shape);
  detail::check_out(out, n, "uniform", shape);
  using std::isfinite;
  using Eigen::numext::isfinite;
  if (!isfinite(minval) || !isfinite(maxval) || !(minval <= maxval) ||
      !isfinite(static_cast<T>(maxval - minval)))
    throw linen::invalid_argument("linen::random::uniform: need finite minval <= maxval, got [" +
                                detail::num(minval) + ", " + detail::num(maxval) + ") for shape " +
                                to_string(shape));
  detail::uniform_unchecked(k, n, minval, maxval, out);
}
template <class T>
std::vector<T> uniform(const Key& k, const Shape& shape, T minval = T(0), T maxval = T(1)) {
  std::vector<T> out(static_cast<std::size_t>(num_elements(shape)));
  uniform<T>(k, shape, minval, maxval, out.data());
  return out;
}

// jax.random.normal(key, shape, dtype): standard normal values of `shape`, written to
// out[0 .. prod(shape)) row-major: sqrt(2) * erf_inv(u), u uniform in
// [nextafter(-1, 0), 1).
template <class T>
void normal(const Key& k, const Shape& shape, T* out) {
  detail::check_element_type<T>();
  const Index n = num_elements(shape);
  detail::check_out(out, n, "normal", shape);
  const T lo = linen::detail::next_after(T(-1.0f), T(0.0f));
  detail::uniform_unchecked(k, n, lo, T(1.0f), out);
  const T sqrt2 = linen::detail::round_from_double<T>(std::sqrt(2.0));
  for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(sqrt2 * detail::erf_inv(out[i]));
}
template <class T>
std::vector<T> normal(const Key& k, const Shape& shape) {
  std::vector<T> out(static_cast<std::size_t>(num_elements(shape)));
  normal<T>(k, shape, out.data());
  return out;
}

// jax.random.truncated_normal(key, lower, upper, shape, dtype): standard normal values
// conditioned on the open interval (lower, upper), written to out[0 .. prod(shape))
// row-major: sqrt(2) * erf_inv(u) with u uniform in [erf(lower/sqrt2), erf(upper/sqrt2)),
// clipped to [nextafter(lower, +inf), nextafter(upper, -inf)]. Infinite bounds are
// allowed; throws std::invalid_argument unless lower < upper.
template <class T>
void truncated_normal(const Key& k, T lower, T upper, const Shape& shape, T* out) {
  detail::check_element_type<T>();
  const Index n = num_elements(shape);
  detail::check_out(out, n, "truncated_normal", shape);
  if (!(lower < upper))
    throw linen::invalid_argument("linen::random::truncated_normal: need lower < upper, got (" +
                                detail::num(lower) + ", " + detail::num(upper) + ") for shape " +
                                to_string(shape));
  const T sqrt2 = linen::detail::round_from_double<T>(std::sqrt(2.0));
  const T a = detail::erf(static_cast<T>(lower / sqrt2));
  const T b = detail::erf(static_cast<T>(upper / sqrt2));
  detail::uniform_unchecked(k, n, a, b, out);
  const T lo = linen::detail::next_after(lower, static_cast<T>(INFINITY));
  const T hi = linen::detail::next_after(upper, static_cast<T>(-INFINITY));
  for (Index i = 0; i < n; ++i) {
    T v = static_cast<T>(sqrt2 * detail::erf_inv(out[i]));
    v = v < lo ? lo : v;  // jnp.clip: the draw lies in (lower, upper) whatever rounding did
    out[i] = hi < v ? hi : v;
  }
}
template <class T>
std::vector<T> truncated_normal(const Key& k, T lower, T upper, const Shape& shape) {
  std::vector<T> out(static_cast<std::size_t>(num_elements(shape)));
  truncated_normal<T>(k, lower, upper, shape, out.data());
  return out;
}

// jax.random.bernoulli(key, p, shape): out[i] = uniform_float32(key)[i] < float32(p), for
// out[0 .. prod(shape)) row-major (a Python float p is float32 in JAX's default mode).
// Throws std::invalid_argument unless 0 <= p <= 1.
inline void bernoulli(const Key& k, double p, const Shape& shape, bool* out) {
  const Index n = num_elements(shape);
  detail::check_out(out, n, "bernoulli", shape);
  if (!(p >= 0.0 && p <= 1.0))
    throw linen::invalid_argument("linen::random::bernoulli: p must lie in [0, 1], got " + std::to_string(p) +
                                " for shape " + to_string(shape));
  const auto pf = static_cast<float>(p);
  for (Index i = 0; i < n; ++i) out[i] = detail::unit_at<float>(k, i) < pf;
}
inline std::vector<bool> bernoulli(const Key& k, double p, const Shape& shape) {
  const Index n = num_elements(shape);
  std::vector<unsigned char> buf(static_cast<std::size_t>(n));
  static_assert(sizeof(bool) == 1, "linen: bool must be one byte");
  bernoulli(k, p, shape, reinterpret_cast<bool*>(buf.data()));
  return std::vector<bool>(buf.begin(), buf.end());
}

inline void Key::bernoulli(double p, const Shape& shape, bool* out) const {
  random::bernoulli(*this, p, shape, out);
}

// ---------------------------------------------------------------------------------
// Flax's rng streams (flax/core/scope.py, Flax 0.12).
//
// `Module.init(key, ...)` hands each `self.param(name, init_fn, ...)` the key
// `scope.make_rng('params')`: every scope counts its draws per rng collection from 1,
// and the key is the collection's root key folded with the SHA-1 of the static
// suffix (module path names, then that counter): `LazyRng(root, path).as_jax_rng()`
// after `LazyRng.create(.., counter)`. The collection's name itself is not hashed: it
// only picks the root key (`init(key)` makes `{'params': key}`; `apply(...,
// rngs={'dropout': k})`).
//
// In SelfAttention(...).init(jax.random.key(s), x), the kernel of the `query`
// DenseGeneral gets flax_rng(key(s), {"query"}, 1) and its bias flax_rng(.., 2).
// ---------------------------------------------------------------------------------

// One element of a Flax rng suffix: a scope name or an integer (an rng counter).
using RngFoldable = std::variant<std::string, std::uint64_t>;

// flax.core.scope._fold_in_static(rng, data): SHA-1 over the items (strings as UTF-8,
// integers as their minimal big-endian bytes, so 0 adds nothing; with
// `fix_rng_separator`, Flax's `flax_fix_rng_separator` flag, a zero byte before each
// item), then fold_in(rng, first four digest bytes read big-endian). An empty `data`
// returns `rng` unchanged.
inline Key fold_in_static(const Key& rng, const std::vector<RngFoldable>& data, bool fix_rng_separator = false) {
  if (data.empty()) return rng;
  linen::detail::Sha1 h;
  for (const auto& item : data) {
    if (fix_rng_separator) {
      const unsigned char zero = 0;
      h.update(&zero, 1);
    }
    if (const auto* s = std::get_if<std::string>(&item)) {
      h.update(*s);
    } else {
      const std::uint64_t v = std::get<std::uint64_t>(item);
      unsigned char bytes[8];
      int len = 0;
      for (int shift = 56; shift >= 0; shift -= 8) {
        const auto byte = static_cast<unsigned char>(v >> shift);
        if (len == 0 && byte == 0) continue;  // int.to_bytes((bit_length + 7) // 8, 'big')
        bytes[len++] = byte;
      }
      h.update(bytes, static_cast<std::size_t>(len));
    }
  }
  const auto d = h.digest();
  const std::uint32_t word = (std::uint32_t{d[0]} << 24) | (std::uint32_t{d[1]} << 16) |
                             (std::uint32_t{d[2]} << 8) | std::uint32_t{d[3]};
  return fold_in(rng, word);
}

// The key Flax's `make_rng` returns for the `counter`-th draw (counting from 1) of an
// rng collection inside the scope at `module_path` (names of the nested submodules
// from the root module, e.g. {"query"}; {} for the root module itself), when that
// collection's key at the root was `root`. A module's params draw in the order they
// are declared: DenseGeneral's kernel is 1, its bias 2. Throws std::invalid_argument
// for counter 0 (Flax increments before drawing).
inline Key flax_rng(const Key& root, const std::vector<std::string>& module_path, std::uint64_t counter,
                    bool fix_rng_separator = false) {
  if (counter == 0)
    throw linen::invalid_argument("linen::random::flax_rng: Flax counts rng draws from 1, got counter 0");
  std::vector<RngFoldable> suffix(module_path.begin(), module_path.end());
  suffix.emplace_back(counter);
  return fold_in_static(root, suffix, fix_rng_separator);
}

// A Flax scope's view of one rng collection: its root key, its path and its draw
// counter, so that modules can be initialised as Module.init does.
//
//   RngScope root(linen::random::key(0));        // Module.init(key(0), ...)
//   RngScope query = root.push("query");          // the `query` submodule
//   Key kernel_key = query.make_rng();            // its first param: the kernel
//   Key bias_key = query.make_rng();              // then the bias
// Every module's init takes one (module.hpp): `attn.init(root.push("encoder").push("attn"),
// x)` initialises a submodule at that path with the keys Flax derives for it.
class RngScope {
 public:
  explicit RngScope(const Key& root, bool fix_rng_separator = false)
      : root_(root), fix_rng_separator_(fix_rng_separator) {}

  // Scope.push(name): the child scope `name`, with its own counter starting at 0.
  // (Flax keeps one counter per child name across pushes; keep the returned scope
  // rather than pushing the same name twice.)
  RngScope push(const std::string& name) const {
    RngScope child(root_, fix_rng_separator_);
    child.path_ = path_;
    child.path_.push_back(name);
    return child;
  }

  // Scope.make_rng(collection): counts one more draw and returns its key.
  Key make_rng() { return flax_rng(root_, path_, ++counter_, fix_rng_separator_); }

  const std::vector<std::string>& path() const { return path_; }
  std::uint64_t counter() const { return counter_; }

 private:
  Key root_;
  std::vector<std::string> path_;
  std::uint64_t counter_ = 0;
  bool fix_rng_separator_ = false;
};

}  // namespace linen::random

#endif  // LINEN_RANDOM_HPP

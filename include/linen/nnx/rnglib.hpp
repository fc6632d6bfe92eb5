// SPDX-License-Identifier: Apache-2.0
//
// linen::nnx::Rngs and RngStream: flax/nnx/rnglib.py's random state, bit for bit.
//
// An RngStream is a typed JAX key and a uint32 counter starting at 0. Each call draws
// `fold_in(key, count)` and then counts up (rnglib.py: `key = random.fold_in(self.key[...],
// self.count[...]); self.count[...] += 1`), so the n-th key of a stream (from 0) is
// fold_in(key, n) = threefry2x32(key, (0, n)). An Rngs is a set of named streams:
//
//   nnx.Rngs(0)                          Rngs(0)                      // the `default` stream
//   nnx.Rngs(params=0, dropout=1)        Rngs({{"params", 0}, {"dropout", 1}})
//   nnx.Rngs(0, params=1)                Rngs(0, {{"params", 1}})
//   rngs.params() / rngs.dropout()       rngs.params() / rngs.dropout()
//   rngs['noise']() / rngs.noise()       rngs["noise"]()
//   rngs()                               rngs()                       // rngs.default()
//   rngs.fork()  stream.fork()           rngs.fork()  stream.fork()
//
// A stream asked for by a name that was not given falls back to `default` (and is then
// the very same stream: `rngs.dropout()` advances `default`'s counter); without a
// `default` it throws linen::invalid_argument "No RngStream named 'x' found in Rngs."
// (nnx: AttributeError / KeyError).
//
// Seeds become keys as `jax.random.key(seed)` does (linen::random::key: the words
// [seed >> 32, seed & 0xFFFFFFFF]); a linen::random::Key is taken as is; raw key data
// (two uint32 words, nnx's `jax.Array` of dtype uint32, e.g. a legacy PRNGKey) is
// wrapped as random.wrap_key_data does. A stream handed to the Rngs constructor gives its
// key only: nnx takes `stream.key.get_value()` and starts a fresh counter at 0.
//
// fork(): a new stream whose key is the parent's next draw (the parent counts up once),
// counter 0. split(k): jax.random.split of the next draw into k keys; nnx makes one stream
// holding a key array of shape (k,) that only nnx.vmap / split_rngs can call (fold_in
// takes a scalar key), so linen returns what each of the k lanes sees: k streams, lane i
// with key i and counter 0.
//
// The counter is uint32 and wraps after 2^32 draws, as jnp.uint32 += 1 does.
#ifndef LINEN_NNX_RNGLIB_HPP
#define LINEN_NNX_RNGLIB_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../random.hpp"

namespace linen::nnx {

// What a stream can be made from (nnx's RngValue: an int seed or a key).
class RngValue {
 public:
  // An integer seed: jax.random.key(seed) (negative seeds as their 64-bit two's complement,
  // as linen::random::key takes them).
  template <class I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  RngValue(I seed) : key_(random::key(static_cast<std::uint64_t>(seed))) {}  // NOLINT: implicit, as nnx takes ints
  // A typed key (jax.random.key(...)).
  RngValue(const random::Key& key) : key_(key) {}  // NOLINT: implicit
  // Raw key data (a uint32 array of shape (2,)): random.wrap_key_data.
  RngValue(std::array<std::uint32_t, 2> data) : key_(random::wrap_key_data(data)) {}  // NOLINT: implicit

  const random::Key& key() const { return key_; }

 private:
  random::Key key_;
};

// rnglib.RngStream: a key, a counter and the stream's tag (its name in the Rngs).
class RngStream {
 public:
  RngStream(RngValue key, std::string tag) : key_(key.key()), tag_(std::move(tag)) {}

  // stream(): fold_in(key, count), then count += 1.
  random::Key operator()() {
    const random::Key k = random::fold_in(key_, count_);
    ++count_;  // uint32: wraps as jnp.uint32 does
    return k;
  }

  // stream.fork(): a new stream of the same tag keyed by this stream's next draw.
  RngStream fork() { return RngStream((*this)(), tag_); }

  // stream.split(k), as each of the k lanes of nnx.vmap sees it: random.split(stream(), k),
  // lane i a stream of key i, counter 0. Throws linen::invalid_argument for k < 1 (before
  // drawing).
  std::vector<RngStream> split(std::size_t k) {
    if (k < 1) throw linen::invalid_argument("nnx::RngStream::split: need k >= 1, got " + std::to_string(k));
    std::vector<RngStream> out;
    out.reserve(k);
    for (const random::Key& key : random::split((*this)(), k)) out.emplace_back(key, tag_);
    return out;
  }

  // The stream's variables, as nnx.state shows them (`key`, `count`).
  const random::Key& key() const { return key_; }
  std::uint32_t count() const { return count_; }
  const std::string& tag() const { return tag_; }

  // Restores a stream from saved state (nnx.update with RngKey / RngCount values).
  void set_count(std::uint32_t count) { count_ = count; }

 private:
  random::Key key_;
  std::uint32_t count_ = 0;
  std::string tag_;
};

// rnglib.Rngs: named streams in construction order.
class Rngs {
 public:
  using Entry = std::pair<std::string, RngValue>;

  // nnx.Rngs(params=0, dropout=1): one stream per entry, in the order given.
  Rngs(std::initializer_list<Entry> streams) { add_all(streams.begin(), streams.end()); }
  explicit Rngs(const std::vector<Entry>& streams) { add_all(streams.begin(), streams.end()); }
  // nnx.Rngs(0) / nnx.Rngs(0, params=1): `default` first, then the named streams (a name
  // given twice throws).
  explicit Rngs(RngValue default_value, std::initializer_list<Entry> streams = {}) {
    std::vector<Entry> all(streams.begin(), streams.end());
    add_all(all.begin(), all.end(), &default_value);
  }
  // nnx.Rngs(params=rngs.params, ...): each stream's key (not its count).
  explicit Rngs(const std::vector<RngStream>& streams) {
    std::vector<Entry> all;
    for (const RngStream& s : streams) all.emplace_back(s.tag(), RngValue(s.key()));
    add_all(all.begin(), all.end());
  }

  // rngs[name] / getattr(rngs, name): the stream `name`, or `default` when there is no
  // such stream. Throws linen::invalid_argument when neither exists.
  RngStream& operator[](const std::string& name) { return streams_[index_of(name)].second; }
  const RngStream& operator[](const std::string& name) const { return streams_[index_of(name)].second; }
  RngStream& stream(const std::string& name) { return (*this)[name]; }

  // rngs() = rngs.default(); rngs.params(); rngs.dropout(): one draw from that stream.
  random::Key operator()() { return (*this)["default"](); }
  random::Key params() { return (*this)["params"](); }
  random::Key dropout() { return (*this)["dropout"](); }

  // `name in rngs`: a stream of exactly that name (no fallback).
  bool contains(const std::string& name) const {
    for (const auto& e : streams_)
      if (e.first == name) return true;
    return false;
  }
  std::size_t size() const { return streams_.size(); }
  // rngs.items(): (name, stream) in construction order.
  const std::vector<std::pair<std::string, RngStream>>& items() const { return streams_; }

  // rngs.fork(): every stream forked (each draws once), in construction order.
  Rngs fork() {
    std::vector<RngStream> forked;
    forked.reserve(streams_.size());
    for (auto& e : streams_) forked.push_back(e.second.fork());
    return Rngs(forked);
  }

 private:
  template <class It>
  void add_all(It first, It last, const RngValue* default_value = nullptr) {
    if (default_value) add("default", *default_value);
    for (It it = first; it != last; ++it) add(it->first, it->second);
  }
  void add(const std::string& name, const RngValue& value) {
    if (name.empty()) throw linen::invalid_argument("nnx::Rngs: a stream needs a name, got ''");
    if (contains(name)) throw linen::invalid_argument("nnx::Rngs: stream '" + name + "' given twice");
    streams_.emplace_back(name, RngStream(value, name));
  }
  std::size_t index_of(const std::string& name) const {
    std::size_t fallback = streams_.size();
    for (std::size_t i = 0; i < streams_.size(); ++i) {
      if (streams_[i].first == name) return i;
      if (streams_[i].first == "default") fallback = i;
    }
    if (fallback == streams_.size())
      throw linen::invalid_argument("nnx::Rngs: No RngStream named '" + name + "' found in Rngs.");
    return fallback;
  }

  std::vector<std::pair<std::string, RngStream>> streams_;
};

namespace detail {

// Runs `f(rngs')` on a copy of `rngs` and commits the copy only when f returns: a module
// whose init throws (a bad shape, an empty initializer) leaves the caller's counters as
// they were.
template <class F>
auto transact(Rngs& rngs, F&& f) {
  Rngs local = rngs;
  auto out = f(local);
  rngs = std::move(local);
  return out;
}

}  // namespace detail
}  // namespace linen::nnx

#endif  // LINEN_NNX_RNGLIB_HPP

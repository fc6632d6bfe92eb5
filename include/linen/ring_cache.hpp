// SPDX-License-Identifier: Apache-2.0
//
// A sliding-window decode cache (beyond Flax): RingCache<T> holds, for a batch of
// sequences at one cache_index (as Flax's cache), only the keys and values a windowed
// attention can still see, in a ring of capacity = window + max_chunk positions: position
// p lies in ring slot p % capacity, so memory is bounded by the window, whatever the
// length of the history. The window is jax.nn's local_window_size = (window, 0) with
// is_causal (AttentionProblem::windowed, the kernels' rule): the query at position p sees
// the keys at positions p - window <= j <= p. A step (MultiHeadDotProductAttention::
// decode_step / decode_chunk with a RingCache, attention.hpp) of n <= max_chunk positions
// equals the same step over a cache of the whole history with that window, bit for bit
// (detail/decode/ring_ops.hpp: the same kernel problem, the ring read in place through
// the kernels' block table).
//   RingCache<T>                    the cache: ring_key / ring_value [batch, capacity,
//                                   num_heads, head_dim], the index, the window;
//   rollback(cache, index)          back to an index within the last step (rejected drafts);
//   import_flax(flax, window, max_chunk)   a Flax AttentionCache's last positions as a ring;
//   export_flax(ring, max_length)   back to Flax's cache while no position has left the ring.
// The ring holds positions [lowest(), cache_index) and zeros elsewhere: a step first
// zeroes the positions its rows can no longer see (below its first position - window),
// then writes its own. So a step followed by a rollback to an index within it leaves the
// ring byte for byte as a step of only the accepted tokens would.
#ifndef LINEN_RING_CACHE_HPP
#define LINEN_RING_CACHE_HPP

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "batch_cache.hpp"
#include "decode.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {

template <class T>
class RingCache;

namespace detail {
namespace decode {
struct RingAccess {
  template <class T>
  static std::int32_t& index(RingCache<T>& c) { return c.index_; }
  template <class T>
  static std::int32_t& lowest(RingCache<T>& c) { return c.lowest_; }
  template <class T>
  static Tensor<T, 4>& key(RingCache<T>& c) { return c.key_; }
  template <class T>
  static Tensor<T, 4>& value(RingCache<T>& c) { return c.value_; }
  template <class T>
  static const std::vector<std::int32_t>& table(const RingCache<T>& c) { return c.table_; }
  template <class T>
  static void zero(RingCache<T>& c, Index from, Index to) { c.zero(from, to); }
};
}  // namespace decode
}  // namespace detail

template <class T>
class RingCache {
 public:
  // The entries of a sequence's row of the kernels' block table (the ring is one block;
  // a step's keys span fewer than 2 * capacity logical positions: ring_ops.hpp).
  static constexpr Index kTableLength = 3;

  RingCache() = default;
  // `batch` sequences, a window of `window` positions before each query, steps of up to
  // `max_chunk` positions: a ring of window + max_chunk positions of [num_heads,
  // head_dim], zeros, at cache_index 0. Throws linen::invalid_argument for batch,
  // max_chunk, num_heads or head_dim < 1, window < 0, or a capacity past int32;
  // linen::overflow_error for a ring too large to address.
  RingCache(Index batch, Index window, Index max_chunk, Index num_heads, Index head_dim) {
    if (batch < 1 || window < 0 || max_chunk < 1 || num_heads < 1 || head_dim < 1 ||
        window > std::numeric_limits<std::int32_t>::max() - max_chunk)
      throw linen::invalid_argument("linen: RingCache(batch " + std::to_string(batch) + ", window " +
                                    std::to_string(window) + ", max_chunk " + std::to_string(max_chunk) +
                                    ", num_heads " + std::to_string(num_heads) + ", head_dim " +
                                    std::to_string(head_dim) +
                                    "): window must be >= 0, the others >= 1, window + max_chunk below 2^31");
    const Index capacity = window + max_chunk;
    (void)num_elements(Shape{batch, capacity, num_heads, head_dim});  // overflow_error
    key_.resize(batch, capacity, num_heads, head_dim);
    value_.resize(batch, capacity, num_heads, head_dim);
    key_.setZero();
    value_.setZero();
    window_ = window;
    table_.resize(static_cast<std::size_t>(batch * kTableLength));
    for (Index b = 0; b < batch; ++b)
      std::fill_n(table_.begin() + b * kTableLength, kTableLength, static_cast<std::int32_t>(b));
  }

  Index batch() const { return key_.dimension(0); }
  Index capacity() const { return key_.dimension(1); }
  Index num_heads() const { return key_.dimension(2); }
  Index head_dim() const { return key_.dimension(3); }
  Index window() const { return window_; }
  // The most positions a step takes: capacity - window.
  Index max_chunk() const { return capacity() - window_; }
  // The positions taken so far (the next one's position).
  std::int32_t cache_index() const { return index_; }
  // The lowest position the ring holds (positions [lowest, cache_index) are held).
  std::int32_t lowest() const { return lowest_; }
  // [batch, capacity, num_heads, head_dim]: position p of sequence b at [b, p % capacity].
  const Tensor<T, 4>& ring_key() const { return key_; }
  const Tensor<T, 4>& ring_value() const { return value_; }

 private:
  friend struct detail::decode::RingAccess;
  // Zeroes positions [from, to) (to - from <= capacity) of every sequence.
  void zero(Index from, Index to) {
    const Index C = capacity(), F = num_heads() * head_dim();
    for (Tensor<T, 4>* t : {&key_, &value_})
      for (Index b = 0; b < batch(); ++b)
        for (Index p = from; p < to; ++p) std::fill_n(t->data() + (b * C + p % C) * F, F, T(0));
  }

  Tensor<T, 4> key_, value_;          // [batch, capacity, num_heads, head_dim]
  Index window_ = 0;
  std::int32_t index_ = 0, lowest_ = 0;
  std::vector<std::int32_t> table_;   // [batch, kTableLength]: sequence b's ring is block b
};

// Truncates the ring back to `cache_index` positions (the positions dropped zeroed). Valid
// for cache_index in [lowest() + window (or 0 while nothing was dropped), the current
// index]: the positions a query at cache_index sees must still be held. A step of n
// positions and a rollback to an index within it leave the ring byte for byte as a step
// of only the accepted positions. Throws linen::invalid_argument (nothing changed) else.
template <class T>
void rollback(RingCache<T>& cache, Index cache_index) {
  using A = detail::decode::RingAccess;
  const Index cur = cache.cache_index(), lo = cache.lowest();
  const Index least = lo == 0 ? 0 : lo + cache.window();
  if (cache_index < least || cache_index > cur)
    throw linen::invalid_argument("linen: rollback of a RingCache to cache_index " + std::to_string(cache_index) +
                                  ": it must lie in [" + std::to_string(least) + ", " + std::to_string(cur) +
                                  "] (the index, and the positions the ring still holds, from " + std::to_string(lo) +
                                  ", with a window of " + std::to_string(cache.window()) +
                                  "); the cache is unchanged");
  A::zero(cache, cache_index, cur);
  A::index(cache) = static_cast<std::int32_t>(cache_index);
}

// A Flax cache (cached_key / cached_value [prod(batch), max_length, heads, head_dim], one
// cache_index) as a RingCache of `window` and `max_chunk`: the positions a next query can
// see, [max(0, index - window), index), at the same index. Validated as import_flax to a
// BatchCache (batch_cache.hpp), whose linen::invalid_argument names the fault; the
// RingCache constructor's for window and max_chunk.
template <class T>
RingCache<T> import_flax(const AttentionCache<T>& flax, Index window, Index max_chunk) {
  const BatchCache<T> checked = import_flax(flax);  // the checks
  const Index B = checked.slots(), L = checked.max_length(), idx = flax.cache_index;
  RingCache<T> ring(B, window, max_chunk, checked.num_heads(), checked.head_dim());
  using A = detail::decode::RingAccess;
  const Index C = ring.capacity(), F = ring.num_heads() * ring.head_dim(), lo = std::max<Index>(0, idx - window);
  for (Index b = 0; b < B; ++b)
    for (Index p = lo; p < idx; ++p) {
      std::copy_n(flax.cached_key.data() + (b * L + p) * F, F, A::key(ring).data() + (b * C + p % C) * F);
      std::copy_n(flax.cached_value.data() + (b * L + p) * F, F, A::value(ring).data() + (b * C + p % C) * F);
    }
  A::index(ring) = static_cast<std::int32_t>(idx);
  A::lowest(ring) = static_cast<std::int32_t>(lo);
  return ring;
}

// The ring as a Flax cache of `max_length` positions ([batch], positions [0, index), zeros
// past), when it still holds every position (lowest() == 0). Throws
// linen::invalid_argument naming why otherwise (positions dropped, or max_length below
// the index).
template <class T>
AttentionCache<T> export_flax(const RingCache<T>& ring, Index max_length) {
  const Index idx = ring.cache_index();
  if (ring.lowest() != 0)
    throw linen::invalid_argument("linen: export_flax: the RingCache holds positions [" +
                                  std::to_string(ring.lowest()) + ", " + std::to_string(idx) +
                                  ") only (those before left the window): a Flax cache holds every position");
  if (max_length < idx || max_length < 1)
    throw linen::invalid_argument("linen: export_flax: max_length " + std::to_string(max_length) +
                                  " is below the RingCache's cache_index " + std::to_string(idx) + " (or < 1)");
  const Index B = ring.batch(), C = ring.capacity(), H = ring.num_heads(), dh = ring.head_dim(), F = H * dh;
  AttentionCache<T> out;
  out.batch = {B};
  out.cached_key.resize(B, max_length, H, dh);
  out.cached_value.resize(B, max_length, H, dh);
  out.cached_key.setZero();
  out.cached_value.setZero();
  for (Index b = 0; b < B; ++b)
    for (Index p = 0; p < idx; ++p) {
      std::copy_n(ring.ring_key().data() + (b * C + p % C) * F, F, out.cached_key.data() + (b * max_length + p) * F);
      std::copy_n(ring.ring_value().data() + (b * C + p % C) * F, F, out.cached_value.data() + (b * max_length + p) * F);
    }
  out.cache_index = static_cast<std::int32_t>(idx);
  return out;
}

}  // namespace linen

#endif  // LINEN_RING_CACHE_HPP

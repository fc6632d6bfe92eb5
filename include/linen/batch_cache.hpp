// SPDX-License-Identifier: Apache-2.0
//
// A decode cache with per-sequence positions (beyond Flax, whose cache has one
// cache_index for the batch): BatchCache<T> holds `slots` sequences of up to max_length
// positions, each slot with its own cache_index. Sequences join (take a free slot) and
// leave (the slot zeroed and freed) without moving the others (continuous batching); a
// step (MultiHeadDotProductAttention::decode_step / decode_chunk with a BatchCache,
// attention.hpp) advances each sequence of the step by its own count.
//   BatchCache<T>                  the cache: cached_key / cached_value in Flax's layout
//                                  [slots, max_length, num_heads, head_dim], indices [slots];
//   rollback(cache, slot, index)   one sequence truncated back (rejected drafts);
//   import_flax(flax_cache[, slots])   a Flax AttentionCache (one cache_index) as a
//                                  BatchCache: sequence b in slot b, every one active;
//   export_flax(cache[, batch])    back to Flax's cache when Flax can state it: the active
//                                  slots contiguous, every active index equal.
// The step's machinery is in detail/decode/batch_ops.hpp.
#ifndef LINEN_BATCH_CACHE_HPP
#define LINEN_BATCH_CACHE_HPP

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "decode.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {

template <class T>
class BatchCache;

namespace detail {
namespace decode {
// The step machinery's (batch_ops.hpp) and the free functions' access to a BatchCache.
struct BatchAccess {
  template <class T>
  static Tensor<T, 4>& key(BatchCache<T>& c) { return c.key_; }
  template <class T>
  static Tensor<T, 4>& value(BatchCache<T>& c) { return c.value_; }
  template <class T>
  static std::vector<std::int32_t>& index(BatchCache<T>& c) { return c.index_; }
  template <class T>
  static const std::vector<std::int32_t>& index(const BatchCache<T>& c) { return c.index_; }
  template <class T>
  static std::vector<std::int32_t>& offsets(BatchCache<T>& c) { return c.offsets_; }
  template <class T>
  static const std::vector<std::int32_t>& offsets(const BatchCache<T>& c) { return c.offsets_; }
  template <class T>
  static std::vector<std::uint32_t>& seen(BatchCache<T>& c) { return c.seen_; }
  template <class T>
  static std::uint32_t& epoch(BatchCache<T>& c) { return c.epoch_; }
  template <class T>
  static std::size_t slot(const BatchCache<T>& c, Index s, const char* what) { return c.at(s, what); }
  template <class T>
  static void zero(BatchCache<T>& c, std::size_t s, Index from, Index to) { c.zero(s, from, to); }
};
}  // namespace decode
}  // namespace detail

// Slots past a sequence's cache_index hold zeros, and a free slot is all zeros, as the
// constructor makes them: steps write only at each index, rollback and leave zero what
// they drop. So a sequence's positions are byte for byte those of a Flax cache that took
// the same tokens, and a slot that joins starts as a fresh one.
template <class T>
class BatchCache {
 public:
  BatchCache() = default;
  // `slots` free slots of `max_length` positions of [num_heads, head_dim], zeros. Throws
  // linen::invalid_argument for a size < 1 (slots >= 0) or a max_length past int32 (the
  // indices' type, as Flax's), linen::overflow_error for a size too large to address.
  BatchCache(Index slots, Index max_length, Index num_heads, Index head_dim) {
    if (slots < 0 || max_length < 1 || num_heads < 1 || head_dim < 1 ||
        max_length > std::numeric_limits<std::int32_t>::max())
      throw linen::invalid_argument("linen: BatchCache(slots " + std::to_string(slots) + ", max_length " +
                                    std::to_string(max_length) + ", num_heads " + std::to_string(num_heads) +
                                    ", head_dim " + std::to_string(head_dim) +
                                    "): slots must be >= 0, the others >= 1 (max_length at most 2^31 - 1)");
    (void)num_elements(Shape{slots, max_length, num_heads, head_dim});  // overflow_error
    key_.resize(slots, max_length, num_heads, head_dim);
    value_.resize(slots, max_length, num_heads, head_dim);
    key_.setZero();
    value_.setZero();
    const auto s = static_cast<std::size_t>(slots);
    index_.assign(s, 0);
    offsets_.assign(s, 0);
    active_.assign(s, 0);
    seen_.assign(s, 0);
    active_list_.reserve(s);
  }

  Index slots() const { return key_.dimension(0); }
  Index max_length() const { return key_.dimension(1); }
  Index num_heads() const { return key_.dimension(2); }
  Index head_dim() const { return key_.dimension(3); }
  // Whether `slot` holds a sequence (throws linen::invalid_argument outside [0, slots)).
  bool active(Index slot) const { return active_[at(slot, "active")] != 0; }
  // The positions sequence `slot` holds (0 for a free slot).
  std::int32_t cache_index(Index slot) const { return index_[at(slot, "cache_index")]; }
  // The active slots, ascending (what decode_step over the cache steps, in this order).
  const std::vector<std::int32_t>& active_slots() const { return active_list_; }
  Index free_slots() const { return slots() - static_cast<Index>(active_list_.size()); }
  // [slots, max_length, num_heads, head_dim]: Flax's cached_key / cached_value layout.
  const Tensor<T, 4>& cached_key() const { return key_; }
  const Tensor<T, 4>& cached_value() const { return value_; }

  // A new sequence in the lowest free slot, at cache_index 0; returns the slot. Throws
  // linen::cache_overflow (nothing changed) when every slot is taken. Allocates nothing.
  Index join() {
    const auto it = std::find(active_.begin(), active_.end(), 0);
    if (it == active_.end())
      throw cache_overflow("linen: BatchCache::join: all " + std::to_string(slots()) +
                           " slots hold a sequence (leave one first)");
    const auto s = static_cast<std::int32_t>(it - active_.begin());
    *it = 1;
    index_[static_cast<std::size_t>(s)] = 0;
    active_list_.insert(std::upper_bound(active_list_.begin(), active_list_.end(), s), s);
    return s;
  }
  // Sequence `slot` leaves: its positions zeroed, the slot free for another. The other
  // slots are not touched. Throws linen::invalid_argument (nothing changed) unless the
  // slot holds a sequence.
  void leave(Index slot) {
    const std::size_t s = at(slot, "leave");
    if (!active_[s])
      throw linen::invalid_argument("linen: BatchCache::leave: slot " + std::to_string(slot) +
                                    " holds no sequence; nothing changed");
    zero(s, 0, index_[s]);
    index_[s] = 0;
    active_[s] = 0;
    active_list_.erase(std::lower_bound(active_list_.begin(), active_list_.end(), static_cast<std::int32_t>(slot)));
  }

 private:
  friend struct detail::decode::BatchAccess;

  std::size_t at(Index slot, const char* what) const {
    if (slot < 0 || slot >= slots())
      throw linen::invalid_argument("linen: BatchCache::" + std::string(what) + ": slot " + std::to_string(slot) +
                                    " outside [0, " + std::to_string(slots()) + ")");
    return static_cast<std::size_t>(slot);
  }
  // Zeroes positions [from, to) of slot s (keys and values).
  void zero(std::size_t s, Index from, Index to) {
    const Index L = max_length(), F = num_heads() * head_dim(), b = static_cast<Index>(s);
    for (Tensor<T, 4>* t : {&key_, &value_}) std::fill(t->data() + (b * L + from) * F, t->data() + (b * L + to) * F, T(0));
  }

  Tensor<T, 4> key_, value_;                 // [slots, max_length, num_heads, head_dim]
  std::vector<std::int32_t> index_;          // [slots] each slot's cache_index
  std::vector<std::int32_t> offsets_;        // [slots] a step's first position (scratch)
  std::vector<unsigned char> active_;        // [slots]
  std::vector<std::int32_t> active_list_;    // the active slots, ascending
  std::vector<std::uint32_t> seen_;          // [slots] a step's duplicate check (scratch)
  std::uint32_t epoch_ = 0;
};

// Truncates sequence `slot` to its first `cache_index` positions (the positions dropped
// zeroed): after a multi-token step whose tokens past `cache_index` were rejected, the
// slot is byte for byte the one that took only the accepted tokens, and the other slots
// are untouched. Throws linen::invalid_argument (nothing changed) unless the slot holds a
// sequence and 0 <= cache_index <= its index. Allocates nothing unless it throws.
template <class T>
void rollback(BatchCache<T>& cache, Index slot, Index cache_index) {
  using A = detail::decode::BatchAccess;
  const std::size_t s = A::slot(cache, slot, "rollback");
  const Index cur = A::index(cache)[s];
  if (!cache.active(slot))
    throw linen::invalid_argument("linen: rollback of BatchCache slot " + std::to_string(slot) +
                                  ", which holds no sequence; the cache is unchanged");
  if (cache_index < 0 || cache_index > cur)
    throw linen::invalid_argument("linen: rollback of BatchCache slot " + std::to_string(slot) + " to cache_index " +
                                  std::to_string(cache_index) + ": it must lie in [0, " + std::to_string(cur) +
                                  "] (the slot's index); the cache is unchanged");
  A::zero(cache, s, cache_index, cur);
  A::index(cache)[s] = static_cast<std::int32_t>(cache_index);
}

// A Flax cache (cached_key / cached_value [prod(batch), max_length, heads, head_dim],
// one cache_index) as a BatchCache of max(slots, prod(batch)) slots: sequence b in slot b
// at the cache's index, every one active (slots past prod(batch) free). Throws
// linen::invalid_argument naming the fault unless cached_value has cached_key's shape,
// prod(batch) is its first dim, 0 <= cache_index <= max_length and the positions past the
// index are zeros (as Flax's init and every step leave them: a BatchCache relies on it).
template <class T>
BatchCache<T> import_flax(const AttentionCache<T>& flax, Index slots = 0) {
  const Shape ks = shape_of(flax.cached_key);
  const Index B = ks[0], L = ks[1], F = ks[2] * ks[3], idx = flax.cache_index;
  if (shape_of(flax.cached_value) != ks)
    throw linen::invalid_argument("linen: import_flax: cached_value has shape " + to_string(shape_of(flax.cached_value)) +
                                  ", cached_key " + to_string(ks));
  if (num_elements(flax.batch) != B)
    throw linen::invalid_argument("linen: import_flax: cache.batch " + to_string(flax.batch) + " holds " +
                                  std::to_string(num_elements(flax.batch)) + " sequences, cached_key has shape " +
                                  to_string(ks));
  if (idx < 0 || idx > L)
    throw linen::invalid_argument("linen: import_flax: cache_index " + std::to_string(idx) + " outside [0, " +
                                  std::to_string(L) + "] (max_length)");
  for (const Tensor<T, 4>* t : {&flax.cached_key, &flax.cached_value})
    for (Index b = 0; b < B; ++b)
      for (Index e = (b * L + idx) * F; e < (b + 1) * L * F; ++e)
        if (!(t->data()[e] == T(0)))
          throw linen::invalid_argument(
              std::string("linen: import_flax: ") + (t == &flax.cached_key ? "cached_key" : "cached_value") +
              " of sequence " + std::to_string(b) + " holds a nonzero value at position " +
              std::to_string((e / F) % L) + ", past cache_index " + std::to_string(idx) +
              " (positions past the index must be zeros, as Flax's init and steps leave them)");
  BatchCache<T> c(std::max(slots, B), L, ks[2], ks[3]);
  using A = detail::decode::BatchAccess;
  std::copy(flax.cached_key.data(), flax.cached_key.data() + flax.cached_key.size(), A::key(c).data());
  std::copy(flax.cached_value.data(), flax.cached_value.data() + flax.cached_value.size(), A::value(c).data());
  for (Index b = 0; b < B; ++b) {
    c.join();  // slot b: the lowest free one
    A::index(c)[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(idx);
  }
  return c;
}

// The active sequences as a Flax cache, when Flax's one-index cache can state them: the
// active slots are contiguous (s0, s0 + 1, ..., s0 + A - 1; they become batch entries
// 0..A-1) and all at one cache_index. `batch` ([batch...], prod(batch) = A; empty: [A])
// is the exported cache's batch dims. Throws linen::invalid_argument naming why otherwise
// (no active sequence, a gap between active slots, two different indices, or a batch
// whose product is not A).
template <class T>
AttentionCache<T> export_flax(const BatchCache<T>& cache, Shape batch = {}) {
  const std::vector<std::int32_t>& act = cache.active_slots();
  const Index A = static_cast<Index>(act.size());
  if (A == 0) throw linen::invalid_argument("linen: export_flax: no active sequence (a Flax cache needs its index)");
  for (Index i = 1; i < A; ++i) {
    if (act[static_cast<std::size_t>(i)] != act[0] + i)
      throw linen::invalid_argument("linen: export_flax: the active slots are not contiguous (slot " +
                                    std::to_string(act[0] + i) + " is free between slots " + std::to_string(act[0]) +
                                    " and " + std::to_string(act[static_cast<std::size_t>(i)]) +
                                    "): a Flax cache holds its batch as one block");
    if (cache.cache_index(act[static_cast<std::size_t>(i)]) != cache.cache_index(act[0]))
      throw linen::invalid_argument(
          "linen: export_flax: slot " + std::to_string(act[0]) + " is at cache_index " +
          std::to_string(cache.cache_index(act[0])) + ", slot " + std::to_string(act[static_cast<std::size_t>(i)]) +
          " at " + std::to_string(cache.cache_index(act[static_cast<std::size_t>(i)])) +
          ": a Flax cache has one cache_index for the batch");
  }
  if (batch.empty()) batch = {A};
  if (num_elements(batch) != A)
    throw linen::invalid_argument("linen: export_flax: batch " + to_string(batch) + " holds " +
                                  std::to_string(num_elements(batch)) + " sequences, the cache " + std::to_string(A) +
                                  " active ones");
  const Index L = cache.max_length(), H = cache.num_heads(), dh = cache.head_dim(), per = L * H * dh;
  AttentionCache<T> out;
  out.batch = batch;
  out.cached_key.resize(A, L, H, dh);
  out.cached_value.resize(A, L, H, dh);
  std::copy(cache.cached_key().data() + act[0] * per, cache.cached_key().data() + (act[0] + A) * per,
            out.cached_key.data());
  std::copy(cache.cached_value().data() + act[0] * per, cache.cached_value().data() + (act[0] + A) * per,
            out.cached_value.data());
  out.cache_index = cache.cache_index(act[0]);
  return out;
}

}  // namespace linen

#endif  // LINEN_BATCH_CACHE_HPP

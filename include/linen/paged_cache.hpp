// SPDX-License-Identifier: Apache-2.0
//
// A paged decode cache (beyond Flax): PagedCache<T> holds `slots` sequences of up to
// max_length positions whose keys and values live in one shared pool of fixed-size
// blocks (block_size positions of [num_heads, head_dim] each), a block table per
// sequence naming its blocks in order. A sequence holds ceil(cache_index / block_size)
// blocks: its memory grows with the tokens it holds, and blocks return to the pool when
// it leaves or rolls back, for any other sequence to take. The pool is allocated once, at
// construction (a step allocates nothing). The attention kernels read the blocks in place
// through the table (detail/attention/problem.hpp, block_table), with the arithmetic of
// the contiguous path: a PagedCache's outputs are a BatchCache's bit for bit.
//   PagedCache<T>                  the cache: key_pool / value_pool [num_blocks + 1,
//                                  block_size, num_heads, head_dim] (block num_blocks: the
//                                  zero block, never handed out), tables, indices [slots];
//   rollback(cache, slot, index)   one sequence truncated back, its blocks past the index
//                                  returned to the pool;
//   import_flax(flax_cache, PagedLayout{block_size, num_blocks}[, slots])   a Flax
//                                  AttentionCache as a PagedCache (sequence b in slot b);
//   export_flax(cache[, batch])    back to Flax's cache when Flax can state it (as
//                                  BatchCache's: the active slots contiguous, one index);
//   to_batch_cache(cache)          the same sequences in a BatchCache (contiguous slots).
// Steps: MultiHeadDotProductAttention::decode_step / decode_chunk with a PagedCache
// (attention.hpp), the layout operations in detail/decode/paged_ops.hpp.
#ifndef LINEN_PAGED_CACHE_HPP
#define LINEN_PAGED_CACHE_HPP

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "batch_cache.hpp"
#include "decode.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {

template <class T>
class PagedCache;

namespace detail {
namespace decode {
// The step machinery's (paged_ops.hpp) and the free functions' access to a PagedCache.
struct PagedAccess {
  template <class T>
  static std::vector<std::int32_t>& index(PagedCache<T>& c) { return c.index_; }
  template <class T>
  static const std::vector<std::int32_t>& index(const PagedCache<T>& c) { return c.index_; }
  template <class T>
  static std::vector<std::int32_t>& offsets(PagedCache<T>& c) { return c.offsets_; }
  template <class T>
  static const std::vector<std::int32_t>& offsets(const PagedCache<T>& c) { return c.offsets_; }
  template <class T>
  static const std::vector<std::int32_t>& tables(const PagedCache<T>& c) { return c.tables_; }
  template <class T>
  static std::vector<std::uint32_t>& seen(PagedCache<T>& c) { return c.seen_; }
  template <class T>
  static std::uint32_t& epoch(PagedCache<T>& c) { return c.epoch_; }
  template <class T>
  static std::size_t slot(const PagedCache<T>& c, Index s, const char* what) { return c.at(s, what); }
  template <class T>
  static void append(PagedCache<T>& c, std::size_t s, const T* k, const T* v, Index n) { c.append(s, k, v, n); }
  template <class T>
  static void truncate(PagedCache<T>& c, std::size_t s, Index to) { c.truncate(s, to); }
};
}  // namespace decode
}  // namespace detail

// Positions past a sequence's cache_index hold zeros, a block in the pool's free list is
// all zeros, and table entries past a sequence's blocks name the zero block: steps write
// only at each index, rollback and leave zero what they drop. So a sequence reads, through
// its table, byte for byte the positions of a Flax cache that took the same tokens.
// Blocks are taken lowest number first, so the free list is a function of which blocks
// are free: a step and a rollback of one sequence leave the whole cache (pool, tables,
// free list) byte for byte as it was.
template <class T>
class PagedCache {
 public:
  PagedCache() = default;
  // `slots` free slots of up to `max_length` positions, sharing `num_blocks` blocks of
  // `block_size` positions of [num_heads, head_dim] (zeros). Throws
  // linen::invalid_argument for a size < 1 (slots, num_blocks >= 0), a max_length past
  // int32 or a num_blocks past int32 - 1 (the tables' type), linen::overflow_error for a
  // pool too large to address.
  PagedCache(Index slots, Index max_length, Index num_heads, Index head_dim, Index block_size, Index num_blocks) {
    const Index i32 = std::numeric_limits<std::int32_t>::max();
    if (slots < 0 || max_length < 1 || num_heads < 1 || head_dim < 1 || block_size < 1 || num_blocks < 0 ||
        max_length > i32 || num_blocks >= i32 || block_size > i32)
      throw linen::invalid_argument("linen: PagedCache(slots " + std::to_string(slots) + ", max_length " +
                                    std::to_string(max_length) + ", num_heads " + std::to_string(num_heads) +
                                    ", head_dim " + std::to_string(head_dim) + ", block_size " +
                                    std::to_string(block_size) + ", num_blocks " + std::to_string(num_blocks) +
                                    "): slots and num_blocks must be >= 0, the others >= 1 (each below 2^31 - 1)");
    const Index table = (max_length + block_size - 1) / block_size;
    (void)num_elements(Shape{num_blocks + 1, block_size, num_heads, head_dim});  // overflow_error
    (void)num_elements(Shape{slots, table});
    key_.resize(num_blocks + 1, block_size, num_heads, head_dim);
    value_.resize(num_blocks + 1, block_size, num_heads, head_dim);
    key_.setZero();
    value_.setZero();
    max_length_ = max_length;
    table_length_ = table;
    const auto s = static_cast<std::size_t>(slots);
    tables_.assign(static_cast<std::size_t>(slots * table), static_cast<std::int32_t>(num_blocks));
    free_.resize(static_cast<std::size_t>(num_blocks));
    for (Index b = 0; b < num_blocks; ++b) free_[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(num_blocks - 1 - b);
    n_free_ = num_blocks;
    index_.assign(s, 0);
    offsets_.assign(s, 0);
    active_.assign(s, 0);
    seen_.assign(s, 0);
    active_list_.reserve(s);
  }

  Index slots() const { return static_cast<Index>(index_.size()); }
  Index max_length() const { return max_length_; }
  Index num_heads() const { return key_.dimension(2); }
  Index head_dim() const { return key_.dimension(3); }
  Index block_size() const { return key_.dimension(1); }
  // The pool's blocks (the zero block not counted), those free, those held by sequences.
  Index num_blocks() const { return key_.dimension(0) - 1; }
  Index free_blocks() const { return n_free_; }
  // Entries of a sequence's block table: ceil(max_length / block_size).
  Index table_length() const { return table_length_; }
  // Whether `slot` holds a sequence (throws linen::invalid_argument outside [0, slots)).
  bool active(Index slot) const { return active_[at(slot, "active")] != 0; }
  // The positions sequence `slot` holds (0 for a free slot).
  std::int32_t cache_index(Index slot) const { return index_[at(slot, "cache_index")]; }
  // The blocks sequence `slot` holds: ceil(cache_index / block_size).
  Index blocks_held(Index slot) const { return blocks_for(cache_index(slot)); }
  // Sequence `slot`'s table, table_length() entries: its blocks in position order, then
  // num_blocks() (the zero block).
  const std::int32_t* block_table(Index slot) const {
    return tables_.data() + static_cast<Index>(at(slot, "block_table")) * table_length_;
  }
  // The active slots, ascending (what decode_step over the cache steps, in this order).
  const std::vector<std::int32_t>& active_slots() const { return active_list_; }
  Index free_slots() const { return slots() - static_cast<Index>(active_list_.size()); }
  // [num_blocks + 1, block_size, num_heads, head_dim]; block num_blocks is the zero block.
  const Tensor<T, 4>& key_pool() const { return key_; }
  const Tensor<T, 4>& value_pool() const { return value_; }
  // The free blocks, highest number first (the next one taken is the last).
  std::vector<std::int32_t> free_list() const { return {free_.begin(), free_.begin() + n_free_}; }

  // A new sequence in the lowest free slot, at cache_index 0 and holding no block;
  // returns the slot. Throws linen::cache_overflow (nothing changed) when every slot is
  // taken. Allocates nothing.
  Index join() {
    const auto it = std::find(active_.begin(), active_.end(), 0);
    if (it == active_.end())
      throw cache_overflow("linen: PagedCache::join: all " + std::to_string(slots()) +
                           " slots hold a sequence (leave one first)");
    const auto s = static_cast<std::int32_t>(it - active_.begin());
    *it = 1;
    index_[static_cast<std::size_t>(s)] = 0;
    active_list_.insert(std::upper_bound(active_list_.begin(), active_list_.end(), s), s);
    return s;
  }
  // Sequence `slot` leaves: its positions zeroed, its blocks back in the pool, the slot
  // free for another. Other sequences are not touched. Throws linen::invalid_argument
  // (nothing changed) unless the slot holds a sequence.
  void leave(Index slot) {
    const std::size_t s = at(slot, "leave");
    if (!active_[s])
      throw linen::invalid_argument("linen: PagedCache::leave: slot " + std::to_string(slot) +
                                    " holds no sequence; nothing changed");
    truncate(s, 0);
    active_[s] = 0;
    active_list_.erase(std::lower_bound(active_list_.begin(), active_list_.end(), static_cast<std::int32_t>(slot)));
  }

 private:
  friend struct detail::decode::PagedAccess;

  Index blocks_for(Index positions) const { return (positions + block_size() - 1) / block_size(); }
  std::size_t at(Index slot, const char* what) const {
    if (slot < 0 || slot >= slots())
      throw linen::invalid_argument("linen: PagedCache::" + std::string(what) + ": slot " + std::to_string(slot) +
                                    " outside [0, " + std::to_string(slots()) + ")");
    return static_cast<std::size_t>(slot);
  }
  std::int32_t* table(std::size_t s) { return tables_.data() + static_cast<Index>(s) * table_length_; }
  // The rows [pos, pos + n) of slot s within one block: their first element's offset.
  Index row_offset(std::size_t s, Index pos) {
    const Index bs = block_size(), F = num_heads() * head_dim();
    return (Index{table(s)[pos / bs]} * bs + pos % bs) * F;
  }
  // Appends n positions (k, v: [n, H * head_dim]) to slot s at its index, taking the
  // blocks it needs (the caller has checked the room: index + n <= max_length, enough
  // free blocks); advances the index.
  void append(std::size_t s, const T* k, const T* v, Index n) {
    const Index bs = block_size(), F = num_heads() * head_dim(), cur = index_[s];
    LINEN_ASSERT(cur + n <= max_length_ && blocks_for(cur + n) - blocks_for(cur) <= free_blocks());
    for (Index b = blocks_for(cur); b < blocks_for(cur + n); ++b)
      table(s)[b] = free_[static_cast<std::size_t>(--n_free_)];  // the lowest free block
    for (Index p = cur; p < cur + n;) {
      const Index run = std::min(cur + n - p, bs - p % bs), off = row_offset(s, p);
      std::copy(k + (p - cur) * F, k + (p - cur + run) * F, key_.data() + off);
      std::copy(v + (p - cur) * F, v + (p - cur + run) * F, value_.data() + off);
      p += run;
    }
    index_[s] = static_cast<std::int32_t>(cur + n);
  }
  // Slot s truncated to `to` <= its index positions: the positions dropped zeroed, the
  // blocks past ceil(to / block_size) back in the free list (kept sorted), their table
  // entries the zero block. Allocates nothing (the free list has room for every block).
  void truncate(std::size_t s, Index to) {
    const Index bs = block_size(), F = num_heads() * head_dim(), cur = index_[s];
    for (Index p = to; p < cur;) {
      const Index run = std::min(cur - p, bs - p % bs), off = row_offset(s, p);
      std::fill(key_.data() + off, key_.data() + off + run * F, T(0));
      std::fill(value_.data() + off, value_.data() + off + run * F, T(0));
      p += run;
    }
    for (Index b = blocks_for(cur); b-- > blocks_for(to);) {
      const std::int32_t id = table(s)[b];
      const auto end = free_.begin() + n_free_;
      const auto at = std::lower_bound(free_.begin(), end, id, std::greater<std::int32_t>());
      std::copy_backward(at, end, end + 1);
      *at = id;
      ++n_free_;
      table(s)[b] = static_cast<std::int32_t>(num_blocks());
    }
    index_[s] = static_cast<std::int32_t>(to);
  }

  Tensor<T, 4> key_, value_;                 // [num_blocks + 1, block_size, num_heads, head_dim]
  Index max_length_ = 0, table_length_ = 0;
  std::vector<std::int32_t> tables_;         // [slots, table_length] block numbers
  std::vector<std::int32_t> free_;           // [num_blocks]: the free blocks first, descending
  Index n_free_ = 0;                         // (free_[n_free_ - 1]: the lowest)
  std::vector<std::int32_t> index_;          // [slots] each slot's cache_index
  std::vector<std::int32_t> offsets_;        // [slots] a step's first position (scratch)
  std::vector<unsigned char> active_;        // [slots]
  std::vector<std::int32_t> active_list_;    // the active slots, ascending
  std::vector<std::uint32_t> seen_;          // [slots] a step's duplicate check (scratch)
  std::uint32_t epoch_ = 0;
};

// Truncates sequence `slot` to its first `cache_index` positions: the positions dropped
// zeroed and the blocks that held only dropped positions returned to the pool. After a
// multi-token step of that sequence whose tokens past `cache_index` were rejected, the
// cache (pool, tables, free list, indices) is byte for byte the one that took only the
// accepted tokens (blocks are taken lowest first); other sequences are untouched. Throws
// linen::invalid_argument (nothing changed) unless the slot holds a sequence and
// 0 <= cache_index <= its index. Allocates nothing unless it throws.
template <class T>
void rollback(PagedCache<T>& cache, Index slot, Index cache_index) {
  using A = detail::decode::PagedAccess;
  const std::size_t s = A::slot(cache, slot, "rollback");
  const Index cur = A::index(cache)[s];
  if (!cache.active(slot))
    throw linen::invalid_argument("linen: rollback of PagedCache slot " + std::to_string(slot) +
                                  ", which holds no sequence; the cache is unchanged");
  if (cache_index < 0 || cache_index > cur)
    throw linen::invalid_argument("linen: rollback of PagedCache slot " + std::to_string(slot) + " to cache_index " +
                                  std::to_string(cache_index) + ": it must lie in [0, " + std::to_string(cur) +
                                  "] (the slot's index); the cache is unchanged");
  A::truncate(cache, s, cache_index);
}

// A Flax cache (cached_key / cached_value [prod(batch), max_length, heads, head_dim], one
// cache_index) as a PagedCache of layout.block_size positions a block: sequence b in slot
// b at the cache's index, every one active (max(slots, prod(batch)) slots);
// layout.num_blocks blocks in the pool (0: enough for every slot to reach max_length).
//   linen::import_flax(flax_cache, linen::PagedLayout{16})     // C++20: {.block_size = 16}
// Validated as
// import_flax to a BatchCache (batch_cache.hpp: linen::invalid_argument naming the
// fault); throws linen::invalid_argument too when block_size < 1, and
// linen::cache_overflow when the sequences need more than num_blocks blocks.
struct PagedLayout {
  Index block_size = 16;  // positions per block
  Index num_blocks = 0;   // blocks in the pool (0: enough for every slot to reach max_length)
};

template <class T>
PagedCache<T> import_flax(const AttentionCache<T>& flax, const PagedLayout& layout, Index slots = 0) {
  const Index block_size = layout.block_size;
  Index num_blocks = layout.num_blocks;
  if (block_size < 1)
    throw linen::invalid_argument("linen: import_flax: block_size " + std::to_string(block_size) + " must be >= 1");
  const BatchCache<T> contiguous = import_flax(flax, slots);  // the checks
  const Index S = contiguous.slots(), L = contiguous.max_length(), B = shape_of(flax.cached_key)[0];
  const Index per_slot = (L + block_size - 1) / block_size;
  const Index need = B * ((flax.cache_index + block_size - 1) / block_size);
  if (num_blocks == 0) num_blocks = S * per_slot;
  if (need > num_blocks)
    throw cache_overflow("linen: import_flax: the cache's " + std::to_string(B) + " sequences at cache_index " +
                         std::to_string(flax.cache_index) + " need " + std::to_string(need) + " blocks of " +
                         std::to_string(block_size) + " positions, num_blocks is " + std::to_string(num_blocks));
  PagedCache<T> c(S, L, contiguous.num_heads(), contiguous.head_dim(), block_size, num_blocks);
  const Index F = c.num_heads() * c.head_dim();
  using A = detail::decode::PagedAccess;
  for (Index b = 0; b < B; ++b) {
    c.join();  // slot b
    const Index off = b * L * F;
    A::append(c, static_cast<std::size_t>(b), flax.cached_key.data() + off, flax.cached_value.data() + off,
              flax.cache_index);
  }
  return c;
}

// The sequences of `cache` in a BatchCache of as many slots and the same max_length: the
// same slots active at the same indices, each slot's positions gathered from its blocks.
template <class T>
BatchCache<T> to_batch_cache(const PagedCache<T>& cache) {
  BatchCache<T> out(cache.slots(), cache.max_length(), cache.num_heads(), cache.head_dim());
  for (Index s = 0; s < cache.slots(); ++s) out.join();
  using A = detail::decode::BatchAccess;
  const Index L = cache.max_length(), F = cache.num_heads() * cache.head_dim(), bs = cache.block_size();
  for (Index s = 0; s < cache.slots(); ++s) {
    if (!cache.active(s)) {
      out.leave(s);
      continue;
    }
    const Index idx = cache.cache_index(s);
    const std::int32_t* table = cache.block_table(s);
    for (Index p = 0; p < idx; p += bs) {
      const Index run = std::min(idx - p, bs), src = Index{table[p / bs]} * bs * F, dst = (s * L + p) * F;
      std::copy(cache.key_pool().data() + src, cache.key_pool().data() + src + run * F, A::key(out).data() + dst);
      std::copy(cache.value_pool().data() + src, cache.value_pool().data() + src + run * F, A::value(out).data() + dst);
    }
    A::index(out)[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(idx);
  }
  return out;
}

// The active sequences as a Flax cache, when Flax's one-index cache can state them: as
// export_flax of a BatchCache (batch_cache.hpp), whose rules and errors it has (the
// active slots contiguous, all at one cache_index; batch's product their number).
template <class T>
AttentionCache<T> export_flax(const PagedCache<T>& cache, Shape batch = {}) {
  return export_flax(to_batch_cache(cache), std::move(batch));
}

}  // namespace linen

#endif  // LINEN_PAGED_CACHE_HPP

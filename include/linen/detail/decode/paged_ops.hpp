// SPDX-License-Identifier: Apache-2.0
// Internal: the layout operations (see the list at the top of cache_ops.hpp) of a step on
// a PagedCache (paged_cache.hpp): PagedStep<T>, the cache with the step's slots and
// counts, as BatchStep (batch_ops.hpp) is a BatchCache's: the same slots and counts, the
// same checks (check_step_sequences), the same padding rows. What differs is where the
// keys and values lie: write appends each sequence's positions to its blocks (taking
// blocks from the pool lowest first), and attend hands the kernel the pool and the block
// tables (AttentionProblem::block_table) instead of a contiguous slot. The kernel calls
// are BatchStep's (one per run of consecutive slots, the same rows, the same key range
// [0, max_length), the same per-sequence rules), and the kernels walk the blocks with the
// contiguous path's arithmetic, so a step's outputs are a BatchCache's bit for bit.
#ifndef LINEN_DETAIL_DECODE_PAGED_OPS_HPP
#define LINEN_DETAIL_DECODE_PAGED_OPS_HPP

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../errors.hpp"
#include "../../paged_cache.hpp"
#include "../../tensor.hpp"
#include "../fused_attention.hpp"
#include "batch_ops.hpp"   // check_step_sequences, clear_count_padding
#include "cache_ops.hpp"   // kRowKernelMaxRows

namespace linen {
namespace detail {
namespace decode {

template <class T>
struct PagedStep {
  PagedCache<T>* cache = nullptr;
  const std::int32_t* slots = nullptr;   // [size]
  const std::int32_t* counts = nullptr;  // [size]; null: n each
  Index size = 0;
  Index count(Index i, Index n) const { return counts ? Index{counts[i]} : n; }
};

template <class T>
void put_signature(std::vector<Index>& now, const PagedStep<T>& st) {
  const PagedCache<T>& c = *st.cache;
  now.insert(now.end(), {Index{-2}, c.slots(), c.max_length(), c.num_heads(), c.head_dim(), c.block_size(),
                         c.num_blocks()});
}

template <class T>
Index key_length(const PagedStep<T>& st) {
  return st.cache->max_length();
}

template <class T>
Index step_batch(const PagedStep<T>& st) {
  return st.size;
}

// The step's projected query must be [size, lq, heads, head_dim] with the cache's heads
// and head_dim (lq 1 for decode_step).
template <class T>
void check_cache(const PagedStep<T>& st, const Shape& batch, Index lq, Index heads, Index head_dim,
                 const std::string& name, bool any_length) {
  const PagedCache<T>& c = *st.cache;
  const Shape expected{st.size, any_length ? lq : 1, c.num_heads(), c.head_dim()};
  Shape got = batch;
  got.insert(got.end(), {lq, heads, head_dim});
  if (got != expected)
    throw linen::invalid_argument(name + ": a PagedCache step of " + std::to_string(st.size) +
                                  " sequences expects a projected query of shape " + to_string(expected) +
                                  " (inputs_q [sequences, n, features]), got " + to_string(got));
}

// BatchStep's checks (slots, counts, max_length), then the pool: the blocks the step's
// sequences take together must be free (linen::cache_overflow naming them). All before
// anything is written: a failed step changes nothing. Allocates nothing unless it throws.
template <class T>
void check_room(const PagedStep<T>& st, Index n, const char* name) {
  PagedCache<T>& c = *st.cache;
  check_step_sequences(st, c, PagedAccess::seen(c), PagedAccess::epoch(c), n, name, "PagedCache");
  const auto& index = PagedAccess::index(c);
  const Index bs = c.block_size();
  Index need = 0;
  for (Index i = 0; i < st.size; ++i) {
    const Index s = st.slots[i], k = st.count(i, n), cur = index[static_cast<std::size_t>(s)];
    if (cur + k > c.max_length())
      throw cache_overflow(std::string(name) + ": slot " + std::to_string(s) + " at cache_index " +
                           std::to_string(cur) + " cannot take " + std::to_string(k) + " positions (max_length " +
                           std::to_string(c.max_length()) + "); no sequence of the step was changed");
    need += (cur + k + bs - 1) / bs - (cur + bs - 1) / bs;
  }
  if (need > c.free_blocks())
    throw cache_overflow(std::string(name) + ": the step's sequences need " + std::to_string(need) +
                         " new blocks of " + std::to_string(bs) + " positions, the PagedCache's pool has " +
                         std::to_string(c.free_blocks()) + " free (of " + std::to_string(c.num_blocks()) +
                         "); no sequence of the step was changed");
}

// Sequence i's first count rows of k and v ([size, n, H * head_dim]) appended to its
// blocks; the index advanced, the step's first position kept for attend.
template <class T>
void write(PagedStep<T>& st, const T* k, const T* v, Index n) {
  PagedCache<T>& c = *st.cache;
  const Index F = c.num_heads() * c.head_dim();
  auto& first = PagedAccess::offsets(c);
  for (Index i = 0; i < st.size; ++i) {
    const auto s = static_cast<std::size_t>(st.slots[i]);
    first[s] = PagedAccess::index(c)[s];
    PagedAccess::append(c, s, k + i * n * F, v + i * n * F, st.count(i, n));
  }
}

// After write: BatchStep's kernel calls (one per run of consecutive slots with count > 0;
// row r of sequence b at position first[b] + r, keys [0, index[b])), the keys and values
// read through the run's block tables.
template <class T>
void attend(const PagedStep<T>& st, const T* q, Index n, const FusedView<bool>& mask, T* out,
            Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch, TiledScratch<accum_t<T>>* tiled) {
  const PagedCache<T>& c = *st.cache;
  attend_runs(st, c.max_length(), c.num_heads(), c.head_dim(), PagedAccess::index(c).data(),
              PagedAccess::offsets(c).data(), q, n, mask, out, pool, scratch, tiled,
              [&](AttentionProblem<T>& a, Index s0) {
                a.key = c.key_pool().data();
                a.value = c.value_pool().data();
                a.block_table = c.block_table(s0);  // the run's tables, one after another
                a.table_stride = c.table_length();
                a.block_size = c.block_size();
              });
}

template <class T>
void clear_padding(const PagedStep<T>& st, T* out, Index n, Index out_features) {
  clear_count_padding(st.counts, st.size, out, n, out_features);
}

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_PAGED_OPS_HPP

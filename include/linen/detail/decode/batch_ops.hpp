// SPDX-License-Identifier: Apache-2.0
// Internal: the layout operations (see the list at the top of cache_ops.hpp) of a step on
// a BatchCache (batch_cache.hpp): BatchStep<T>, the cache with the step's slots and
// counts. Sequence i of the step is slot slots[i]; it advances by counts[i] <= n
// positions (null counts: n each). Rows past a sequence's count are padding: their keys
// and values are not written, their attention is computed over the sequence's valid
// prefix but their output rows are zeroed (clear_padding). The attention is one call of
// the fused kernel per run of consecutive slots (slots[i + 1] = slots[i] + 1, counts > 0)
// with the kernels' per-sequence rules: causal_offsets (row r of sequence b at position
// its first index + r) and kv_len (its index after the step; keys past it never read,
// causal_hides_values). A sequence of count 0 is not attended (its rows are zeros).
// A sequence's rows are computed as a step of its count rows alone on a Flax cache
// (cache_ops.hpp, attend), bit for bit where both take the row kernel (n <= 8 rows).
// Module-agnostic: any module's step (MultiHeadDotProductAttention::step_into, nnx's)
// builds a BatchStep and calls these.
#ifndef LINEN_DETAIL_DECODE_BATCH_OPS_HPP
#define LINEN_DETAIL_DECODE_BATCH_OPS_HPP

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../batch_cache.hpp"
#include "../../errors.hpp"
#include "../../tensor.hpp"
#include "../fused_attention.hpp"
#include "cache_ops.hpp"  // kRowKernelMaxRows

namespace linen {
namespace detail {
namespace decode {

template <class T>
struct BatchStep {
  BatchCache<T>* cache = nullptr;
  const std::int32_t* slots = nullptr;   // [size]
  const std::int32_t* counts = nullptr;  // [size]; null: n each
  Index size = 0;
  Index count(Index i, Index n) const { return counts ? Index{counts[i]} : n; }
};

template <class T>
void put_signature(std::vector<Index>& now, const BatchStep<T>& st) {
  const BatchCache<T>& c = *st.cache;
  now.insert(now.end(), {Index{-1}, c.slots(), c.max_length(), c.num_heads(), c.head_dim()});
}

template <class T>
Index key_length(const BatchStep<T>& st) {
  return st.cache->max_length();
}

template <class T>
Index step_batch(const BatchStep<T>& st) {
  return st.size;
}

// The step's projected query must be [size, lq, heads, head_dim] with the cache's heads
// and head_dim (lq 1 for decode_step).
template <class T>
void check_cache(const BatchStep<T>& st, const Shape& batch, Index lq, Index heads, Index head_dim,
                 const std::string& name, bool any_length) {
  const BatchCache<T>& c = *st.cache;
  const Shape expected{st.size, any_length ? lq : 1, c.num_heads(), c.head_dim()};
  Shape got = batch;
  got.insert(got.end(), {lq, heads, head_dim});
  if (got != expected)
    throw linen::invalid_argument(name + ": a BatchCache step of " + std::to_string(st.size) +
                                  " sequences expects a projected query of shape " + to_string(expected) +
                                  " (inputs_q [sequences, n, features]), got " + to_string(got));
}

// The step's sequences (St: BatchStep, PagedStep: slots, counts, size; its cache: slots(),
// active()) against a cache of `layout`'s name, with the cache's duplicate marks.
template <class St, class Cache>
void check_step_sequences(const St& st, const Cache& c, std::vector<std::uint32_t>& seen, std::uint32_t& epoch,
                          Index n, const char* name, const char* layout) {
  if (++epoch == 0) {  // wrapped: start the marks afresh
    std::fill(seen.begin(), seen.end(), 0u);
    epoch = 1;
  }
  for (Index i = 0; i < st.size; ++i) {
    const Index s = st.slots[i];
    if (s < 0 || s >= c.slots())
      throw linen::invalid_argument(std::string(name) + ": slots[" + std::to_string(i) + "] = " + std::to_string(s) +
                                    " outside [0, " + std::to_string(c.slots()) + ") (the " + layout +
                                    "'s slots); the cache is unchanged");
    if (!c.active(s))
      throw linen::invalid_argument(std::string(name) + ": slots[" + std::to_string(i) + "] = " + std::to_string(s) +
                                    " holds no sequence (join first); the cache is unchanged");
    auto& mark = seen[static_cast<std::size_t>(s)];
    if (mark == epoch)
      throw linen::invalid_argument(std::string(name) + ": slot " + std::to_string(s) + " appears twice in the step (slots[" +
                                    std::to_string(i) + "]); the cache is unchanged");
    mark = epoch;
    const Index k = st.count(i, n);
    if (k < 0 || k > n)
      throw linen::invalid_argument(std::string(name) + ": counts[" + std::to_string(i) + "] = " + std::to_string(k) +
                                    " outside [0, " + std::to_string(n) + "] (n, the step's rows); the cache is unchanged");
  }
}

// The step's slots (in range, holding a sequence, each once) and counts (in [0, n]), then
// the room (cache_overflow): all checked before anything is written, so a failed step
// changes no sequence. Allocates nothing unless it throws.
template <class T>
void check_room(const BatchStep<T>& st, Index n, const char* name) {
  BatchCache<T>& c = *st.cache;
  check_step_sequences(st, c, BatchAccess::seen(c), BatchAccess::epoch(c), n, name, "BatchCache");
  const auto& index = BatchAccess::index(c);
  for (Index i = 0; i < st.size; ++i) {
    const Index s = st.slots[i], k = st.count(i, n), cur = index[static_cast<std::size_t>(s)];
    if (cur + k > c.max_length())
      throw cache_overflow(std::string(name) + ": slot " + std::to_string(s) + " at cache_index " +
                           std::to_string(cur) + " cannot take " + std::to_string(k) + " positions (max_length " +
                           std::to_string(c.max_length()) + "); no sequence of the step was changed");
  }
}

// Sequence i's first count rows of k and v ([size, n, H * head_dim]) at its index; the
// index advanced, the step's first position kept for attend.
template <class T>
void write(BatchStep<T>& st, const T* k, const T* v, Index n) {
  BatchCache<T>& c = *st.cache;
  const Index L = c.max_length(), F = c.num_heads() * c.head_dim();
  auto& index = BatchAccess::index(c);
  auto& first = BatchAccess::offsets(c);
  T* key = BatchAccess::key(c).data();
  T* value = BatchAccess::value(c).data();
  for (Index i = 0; i < st.size; ++i) {
    const auto s = static_cast<std::size_t>(st.slots[i]);
    const Index cnt = st.count(i, n), cur = index[s];
    LINEN_ASSERT(cur + cnt <= L);
    const Index dst = (static_cast<Index>(s) * L + cur) * F;
    std::copy(k + i * n * F, k + (i * n + cnt) * F, key + dst);
    std::copy(v + i * n * F, v + (i * n + cnt) * F, value + dst);
    first[s] = static_cast<std::int32_t>(cur);
    index[s] = static_cast<std::int32_t>(cur + cnt);
  }
}

// After write: for each run of consecutive slots with count > 0, one fused kernel call
// over those sequences, row r of sequence b at position first[b] + r, keys [0, index[b])
// of max_length (see the file's comment); `place(a, s0)` puts the run's keys and values
// (from slot s0 on) into the problem: the layout's part (BatchStep: a slot's stride;
// PagedStep, paged_ops.hpp: the pool and the block tables). St: a step of slots and counts.
template <class T, class St, class Place>
void attend_runs(const St& st, Index max_length, Index heads, Index head_dim, const std::int32_t* index,
                 const std::int32_t* first, const T* q, Index n, const FusedView<bool>& mask, T* out,
                 Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch, TiledScratch<accum_t<T>>* tiled,
                 const Place& place) {
  const Index F = heads * head_dim;
  for (Index i0 = 0; i0 < st.size;) {
    if (st.count(i0, n) == 0) {
      ++i0;
      continue;
    }
    Index i1 = i0 + 1;
    while (i1 < st.size && st.slots[i1] == st.slots[i1 - 1] + 1 && st.count(i1, n) > 0) ++i1;
    const Index s0 = st.slots[i0];
    AttentionDims d;
    d.B = i1 - i0;
    d.Lq = n;
    d.Lk = max_length;
    d.H = heads;
    d.D = d.Dv = head_dim;
    AttentionProblem<T> a = flax_problem<T>(d, q + i0 * n * F, nullptr, nullptr, out + i0 * n * F);
    place(a, s0);
    a.mask = mask;
    if (mask) a.mask.data = mask.data + i0 * mask.sb;  // the step's sequences i0.. (sb 0: shared)
    a.causal = true;
    a.causal_offsets = first + s0;  // row r at position first + r
    a.kv_len = index + s0;          // positions past the index: not part of the problem
    a.causal_hides_values = true;
    a.pool = pool;
    a.row_scratch = scratch;
    a.tiled_scratch = tiled;
    if (n <= kRowKernelMaxRows) a.tuning.path = 2;
    fused_attention<T>(a);
    i0 = i1;
  }
}

template <class T>
void attend(const BatchStep<T>& st, const T* q, Index n, const FusedView<bool>& mask, T* out,
            Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch, TiledScratch<accum_t<T>>* tiled) {
  const BatchCache<T>& c = *st.cache;
  const Index per_slot = c.max_length() * c.num_heads() * c.head_dim();
  attend_runs(st, c.max_length(), c.num_heads(), c.head_dim(), BatchAccess::index(c).data(),
              BatchAccess::offsets(c).data(), q, n, mask, out, pool, scratch, tiled,
              [&](AttentionProblem<T>& a, Index s0) {
                a.key = c.cached_key().data() + s0 * per_slot;  // batch stride: a slot (flax_problem's)
                a.value = c.cached_value().data() + s0 * per_slot;
              });
}

// Output rows past each sequence's count are zeros (any step of slots and counts).
template <class T>
void clear_count_padding(const std::int32_t* counts, Index size, T* out, Index n, Index out_features) {
  if (!counts) return;
  for (Index i = 0; i < size; ++i)
    std::fill(out + (i * n + counts[i]) * out_features, out + (i + 1) * n * out_features, T(0));
}

template <class T>
void clear_padding(const BatchStep<T>& st, T* out, Index n, Index out_features) {
  clear_count_padding(st.counts, st.size, out, n, out_features);
}

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_BATCH_OPS_HPP

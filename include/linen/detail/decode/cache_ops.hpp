// SPDX-License-Identifier: Apache-2.0
// Internal: one decode step on an AttentionCache (Flax's `if self.decode:` branch).
//   check_cache     the cache against a step's query (Flax's shape check, and linen's
//                   own: cached_value, prod(batch));
//   check_room      a step of n positions fits at cache_index (linen::cache_overflow);
//   write           the step's keys and values into positions [index, index + n), and the
//                   index advanced;
//   SlotUndo        those positions and the index put back when a step fails later;
//   cache_mask      Flax's combine_masks(mask, arange(max_length) <= index) for an
//                   attention_fn that reads the whole cache;
//   attend          the fused kernel over the cache, reading only the valid positions.
//   attend_grouped  the same for a query of more heads than the cache (grouped-query
//                   attention, nnx::MultiHeadAttention) under either numerics policy.
//   throw_empty_chunk   a multi-token step of no positions;
// A step is n positions of one index shared by the batch; Flax's decode steps have n = 1,
// decode_chunk's any n >= 1 (prefill, speculative verification). Slots past the index
// hold zeros, as init_cache makes them: steps only write at the index and rollback zeroes
// what it drops (linen::rollback, decode.hpp), so a rolled-back cache is byte for byte one that never took the step.
// (Per-sequence positions extend these, not the module.)
//
// Cache layouts. A module's decode step (MultiHeadDotProductAttention::step_into) is one
// template over the step's target C: an AttentionCache<T>, a RingCache<T> (ring_ops.hpp:
// a sliding window), or a layout's step view (BatchStep<T>, batch_ops.hpp: a BatchCache
// with the step's slots and counts; PagedStep<T>, paged_ops.hpp: a PagedCache's). It
// projects q, k, v ([step_batch(c) * n] rows), then calls, found by overload (ADL in
// linen::detail::decode), one file per layout:
//   void  put_signature(std::vector<Index>& now, const C&)   the shapes the workspace
//         remembers validated (first entry: >= 0 for AttentionCache, a negative tag else);
//   void  check_cache(const C&, const Shape& batch, Index lq, Index heads, Index head_dim,
//                     const std::string& name, bool any_length)   once per signature;
//   Index key_length(const C&)     the mask's last dim (max_length);
//   Index step_batch(const C&)     sequences in the step (inputs_q is [batch..., n, F]);
//   void  check_room(const C&, Index n, const char* name)   every step, before anything
//         is written: linen::cache_overflow / invalid_argument, the cache unchanged;
//   void  write(C&, const T* k, const T* v, Index n)   k, v: [step_batch, n, H * head_dim];
//   void  attend(const C&, const T* q, Index n, const FusedView<bool>& mask, T* out,
//                Eigen::ThreadPoolInterface*, RowScratch<accum_t<T>>*, TiledScratch<accum_t<T>>*)
//         q, out: [step_batch, n, H, head_dim]; mask: the caller's, over the step's batch;
//   void  clear_padding(const C&, T* out, Index n, Index out_features)   after the out
//         projection: zero the output rows that are no position (a ragged step's padding).
// Nothing after write throws (but bad_alloc), so the direct step needs no undo; SlotUndo
// serves AttentionCache's fallback through apply (attention_fn, dropout, sow_weights),
// which other layouts refuse (linen::invalid_argument).
#ifndef LINEN_DETAIL_DECODE_CACHE_OPS_HPP
#define LINEN_DETAIL_DECODE_CACHE_OPS_HPP

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../decode.hpp"
#include "../../dot_product_attention.hpp"  // ArrayRef
#include "../../errors.hpp"
#include "../../tensor.hpp"
#include "../fused_attention.hpp"

namespace linen {
namespace detail {
namespace decode {

// --- The layout operations of an AttentionCache (Flax's layout: one cache_index for the
// batch). A module's step (step_into) finds them by overload on the step's target; see
// the list at the top of this file. ---

// The cache's part of a step's signature (the shapes the workspace remembers validated):
// the batch rank and dims, then cached_key's and cached_value's dims. (A first entry >= 0;
// other layouts start theirs with a negative tag.)
template <class T>
void put_signature(std::vector<Index>& now, const AttentionCache<T>& cache) {
  now.push_back(static_cast<Index>(cache.batch.size()));
  now.insert(now.end(), cache.batch.begin(), cache.batch.end());
  for (const auto* t : {&cache.cached_key, &cache.cached_value})
    for (int i = 0; i < 4; ++i) now.push_back(t->dimension(i));
}

// The key axis a step's mask spans (its last dim: max_length).
template <class T>
Index key_length(const AttentionCache<T>& cache) {
  return cache.max_length();
}

// The sequences of a step (its projections have step_batch * n rows).
template <class T>
Index step_batch(const AttentionCache<T>& cache) {
  return cache.cached_key.dimension(0);
}

// Output rows of a step that are padding (none in this layout: every row is a position).
template <class T>
void clear_padding(const AttentionCache<T>&, T*, Index /*n*/, Index /*out_features*/) {}

// Throws linen::invalid_argument unless `cache` serves a step whose projected query is
// [batch..., lq, heads, head_dim]: Flax's check (the cache's [batch..., 1, heads,
// head_dim] against the query's; a chunk, any_length, takes any lq), then that cached_key
// holds prod(cache.batch) sequences and cached_value has cached_key's shape.
template <class T>
void check_cache(const AttentionCache<T>& cache, const Shape& batch, Index lq, Index heads, Index head_dim,
                 const std::string& name, bool any_length = false) {
  const Shape cshape = shape_of(cache.cached_key);
  Shape expected = cache.batch;
  expected.insert(expected.end(), {any_length ? lq : 1, cshape[2], cshape[3]});
  Shape got = batch;
  got.insert(got.end(), {lq, heads, head_dim});
  if (expected != got)
    throw linen::invalid_argument(name + ": Autoregressive cache shape error, expected query shape " +
                                  to_string(expected) + " instead got " + to_string(got) + ".");
  if (num_elements(cache.batch) != cshape[0])
    throw linen::invalid_argument(name + ": cache.batch " + to_string(cache.batch) + " holds " +
                                  std::to_string(num_elements(cache.batch)) + " sequences, but cached_key has shape " +
                                  to_string(cshape) + " (" + std::to_string(cshape[0]) +
                                  " sequences; its first dim is prod(batch))");
  if (shape_of(cache.cached_value) != cshape)
    throw linen::invalid_argument(name + ": cached_value has shape " + to_string(shape_of(cache.cached_value)) +
                                  ", cached_key " + to_string(cshape));
}

// Throws linen::cache_overflow (the cache unchanged) unless n positions fit at the index.
// Checked on every step: allocates nothing unless it throws.
template <class T>
void check_room(const AttentionCache<T>& cache, Index n, const char* name) {
  const Index cur = cache.cache_index, L = cache.max_length();
  if (cur < 0 || cur + n > L)
    throw cache_overflow(std::string(name) + ": decode step at cache_index " + std::to_string(cur) +
                         " does not fit a cache of max_length " + std::to_string(L) +
                         " (Flax would overwrite the last slot); the cache is unchanged");
}

// The linen::invalid_argument of a chunk's inputs_q [batch..., n, features] with n = 0 (a
// step of no positions is a caller's mistake, not a no-op to hide).
[[noreturn]] inline void throw_empty_chunk(const Shape& qs, const std::string& name) {
  throw linen::invalid_argument(name + ": decode_chunk's inputs_q " + to_string(qs) +
                                " must be [batch..., n, features] with n >= 1");
}

// Writes k and v ([B, n, H * head_dim] rows) at positions [index, index + n) and
// advances the index by n (the caller has checked the room).
template <class T>
void write(AttentionCache<T>& cache, const T* k, const T* v, Index n) {
  const Index B = cache.cached_key.dimension(0), L = cache.max_length(),
              F = cache.cached_key.dimension(2) * cache.cached_key.dimension(3), cur = cache.cache_index;
  LINEN_ASSERT(cur >= 0 && cur + n <= L);
  for (Index b = 0; b < B; ++b) {
    std::copy(k + b * n * F, k + (b + 1) * n * F, cache.cached_key.data() + (b * L + cur) * F);
    std::copy(v + b * n * F, v + (b + 1) * n * F, cache.cached_value.data() + (b * L + cur) * F);
  }
  cache.cache_index = static_cast<std::int32_t>(cur + n);
}

// The n positions a step writes and the index, as they were before the step, put back on
// destruction unless disarmed (the step failed after writing).
template <class T>
class SlotUndo {
 public:
  SlotUndo() = default;
  SlotUndo(const SlotUndo&) = delete;
  SlotUndo& operator=(const SlotUndo&) = delete;
  void arm(AttentionCache<T>& cache, Index n) {
    cache_ = &cache;
    index_ = cache.cache_index;
    n_ = n;
    const Index B = cache.cached_key.dimension(0), L = cache.max_length(), F = row_size(cache);
    for (auto [src, dst] : {std::pair{&cache.cached_key, &key_}, std::pair{&cache.cached_value, &value_}}) {
      dst->resize(static_cast<std::size_t>(B * n * F));
      for (Index b = 0; b < B; ++b)
        std::copy(src->data() + (b * L + index_) * F, src->data() + (b * L + index_ + n) * F, dst->data() + b * n * F);
    }
  }
  void disarm() { cache_ = nullptr; }
  ~SlotUndo() {
    if (!cache_) return;
    const Index B = cache_->cached_key.dimension(0), L = cache_->max_length(), F = row_size(*cache_);
    for (auto [src, dst] : {std::pair{&key_, &cache_->cached_key}, std::pair{&value_, &cache_->cached_value}})
      for (Index b = 0; b < B; ++b)
        std::copy(src->data() + b * n_ * F, src->data() + (b + 1) * n_ * F, dst->data() + (b * L + index_) * F);
    cache_->cache_index = index_;
  }

 private:
  static Index row_size(const AttentionCache<T>& c) { return c.cached_key.dimension(2) * c.cached_key.dimension(3); }
  AttentionCache<T>* cache_ = nullptr;
  std::int32_t index_ = 0;
  Index n_ = 0;
  std::vector<T> key_, value_;
};

// Flax's step mask over the whole cache, [B, hm, n, max_length]: the caller's mask (rank
// 4 over the flattened batch, [B|1, hm|1, n|1, max_length|1]; empty: none) and the cache
// positions visible to query row i, j <= first + i (first: the index the step wrote its
// first position at).
inline Tensor<bool, 4> cache_mask(const ArrayRef<bool>& user, Index B, Index n, Index L, Index first) {
  const Index hm = user ? user.shape()[1] : 1;
  Tensor<bool, 4> m(B, hm, n, L);
  for (Index b = 0; b < B; ++b)
    for (Index h = 0; h < hm; ++h)
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < L; ++j) {
          bool keep = j <= first + i;
          if (user) {
            const auto& us = user.shape();
            const Index off = (((us[0] == 1 ? 0 : b) * us[1] + (us[1] == 1 ? 0 : h)) * us[2] + (us[2] == 1 ? 0 : i)) *
                                  us[3] +
                              (us[3] == 1 ? 0 : j);
            keep = keep && user.data()[off];
          }
          m(b, h, i, j) = keep;
        }
  return m;
}

// The step's attention over the cache (already written, index advanced past the step):
// q [B, n, H, head_dim] attends to the cache with the cache mask (positions j <= first + i,
// first = index - n) and the caller's `mask`, into out [B, n, H, head_dim]. Positions past
// the index are never read unless a row is masked everywhere else: then, as in Flax, it
// averages all max_length slots. Up to kRowKernelMaxRows rows take the row kernel, more
// the tiled kernel (fused_attention.hpp), whose online softmax visits the keys in other
// blocks: a chunk of more rows equals n single steps to rounding, not bit for bit.
// The most chunk rows the row kernel takes (it reads each cache position once for all of
// them); more rows take the tiled kernel.
inline constexpr Index kRowKernelMaxRows = 8;

// attend for a query of `heads` heads over a cache of fewer (or as many) heads (what
// nnx::MultiHeadAttention's step calls), under the numerics Policy (FlaxLogits: Flax's query scale, sqrt(head_dim) in
// dtype; JaxNnLogits: jax.nn's logit scale 1/sqrt(head_dim) after the product): q and out
// are [B, n, heads, head_dim]; query head h reads cache head h / (heads / cache heads)
// (grouped-query attention, AttentionProblem::kv_group), each cache head read once for
// its whole group; no K/V copy is made. heads is a multiple of the cache's heads (the
// caller checked).
template <class Policy, class T>
void attend_grouped(const AttentionCache<T>& cache, const T* q, Index n, Index heads, const FusedView<bool>& mask,
                    T* out, Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch,
                    TiledScratch<accum_t<T>>* tiled = nullptr) {
  const Index K = cache.cached_key.dimension(2);
  LINEN_ASSERT(K > 0 && heads % K == 0);
  AttentionDims d;  // q [B, n, heads, dh], the cache [B, max_length, K, dh]: Flax's layouts
  d.B = cache.cached_key.dimension(0);
  d.Lq = n;
  d.Lk = cache.max_length();
  d.H = heads;
  d.D = d.Dv = cache.cached_key.dimension(3);
  AttentionProblem<T> a = flax_problem<T>(d, q, cache.cached_key.data(), cache.cached_value.data(), out);
  a.k_sb = a.v_sb = d.Lk * K * d.D;  // the cache's strides address its K heads
  a.k_sl = a.v_sl = K * d.D;
  a.kv_group = heads / K;
  a.logit_scale = jax_nn_default_scale<T>(d.D);  // read by JaxNnLogits only
  // One position, grouped heads, no mask, a small batch: the group's query heads are read
  // as the rows of one kv head (heads h * g + r -> head h, row r: their strides), which
  // the row kernel serves from each key row it loads (1.1-1.4x faster at N = 8, K = 2 in
  // one run, the same bits); every row is position index - 1, so the cache's valid
  // positions are the keys below kv_len = cache_index (tiles past it are skipped; a slot
  // past the index that shares the last tile meets a zero weight, as in nnx's masked
  // einsum, and holds zeros by the cache's contract).
  std::array<std::int32_t, 16> lengths{};
  if (n == 1 && a.kv_group > 1 && !mask && d.B <= static_cast<Index>(lengths.size()) && cache.cache_index >= 1) {
    const Index g = a.kv_group;
    a.H = K;
    a.Lq = g;
    a.q_sl = a.o_sl = d.D;
    a.q_sh = a.o_sh = g * d.D;
    a.kv_group = 1;
    lengths.fill(cache.cache_index);
    a.kv_len = lengths.data();
    a.pool = pool;
    a.row_scratch = scratch;
    a.tiled_scratch = tiled;
    a.tuning.path = 2;
    linen::detail::attend<Policy>(a);
    return;
  }
  a.mask = mask;
  a.causal = true;  // Flax's arange(max_length) <= cache_index
  a.causal_offset = cache.cache_index - n;  // the index the step wrote its first position at
  a.causal_hides_values = true;  // positions past the index are never read
  a.pool = pool;
  a.row_scratch = scratch;
  a.tiled_scratch = tiled;
  // A few rows (a speculative verify) stream the cache once through the row kernel; a
  // prefill's many rows take the tiled kernel.
  if (n <= kRowKernelMaxRows) a.tuning.path = 2;
  linen::detail::attend<Policy>(a);
}

// The layout operation: a query of the cache's own heads under Flax's numerics.
template <class T>
void attend(const AttentionCache<T>& cache, const T* q, Index n, const FusedView<bool>& mask, T* out,
            Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch,
            TiledScratch<accum_t<T>>* tiled = nullptr) {
  attend_grouped<FlaxLogits<T>>(cache, q, n, cache.cached_key.dimension(2), mask, out, pool, scratch, tiled);
}

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_CACHE_OPS_HPP

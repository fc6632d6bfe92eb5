// SPDX-License-Identifier: Apache-2.0
// Internal: a decode step's attention over an AttentionCache for a query of more heads
// than the cache (grouped-query attention) and under either numerics policy: what
// nnx::MultiHeadAttention's step calls where MultiHeadDotProductAttention's calls
// cache_ops.hpp's attend. attend(cache, ...) is attend_grouped<FlaxLogits<T>> with heads =
// the cache's heads (the same problem: kv_group 1, logit_scale unread by FlaxLogits).
#ifndef LINEN_DETAIL_DECODE_GROUPED_HPP
#define LINEN_DETAIL_DECODE_GROUPED_HPP

#include <array>
#include <cstdint>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../decode.hpp"
#include "../../tensor.hpp"
#include "../fused_attention.hpp"
#include "cache_ops.hpp"  // kRowKernelMaxRows

namespace linen {
namespace detail {
namespace decode {

// The same attention for a query of `heads` heads over a cache of fewer (or as many)
// heads, under the numerics Policy (FlaxLogits: Flax's query scale, sqrt(head_dim) in
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

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_GROUPED_HPP

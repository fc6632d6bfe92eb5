// SPDX-License-Identifier: Apache-2.0
// Internal: the layout operations (see the list at the top of cache_ops.hpp) of a step on
// a RingCache (ring_cache.hpp), the step's target itself (as an AttentionCache is): a
// batch at one index, n <= max_chunk positions a step, the window's rule.
//
// The kernel problem. Row i of a step from position p0 is position p0 + i and sees the
// positions [p0 + i - window, p0 + i]. The problem's keys are logical positions from an
// origin s (key j is position s + j), s the largest multiple of the capacity C at most
// p0 - window (0 before that), Lk = p0 + n - s keys: the band is the kernels' window rule
// (AttentionProblem::windowed) with window_left = window - (p0 - s) (<= 0 once the ring
// has wrapped: the band starts right of the diagonal's row) and window_right = p0 - s,
// which is exactly the causal bound. Since s is a multiple of C, position s + j lies in
// ring slot j % C: the ring of sequence b is block b of block size C in the kernels' paged
// addressing (AttentionProblem::block_table, every entry b), read in place. The same
// problem over a cache of the whole history (keys from position s, the same band) is
// computed with the same tiles and arithmetic: a ring step equals it bit for bit. Keys
// outside the band (overwritten or zeroed slots) are never part of a weight; like every
// masked key they are still checked for inf and NaN (tiles.hpp), the one place the ring's
// older slots are read.
#ifndef LINEN_DETAIL_DECODE_RING_OPS_HPP
#define LINEN_DETAIL_DECODE_RING_OPS_HPP

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../errors.hpp"
#include "../../ring_cache.hpp"
#include "../../tensor.hpp"
#include "../fused_attention.hpp"
#include "cache_ops.hpp"  // kRowKernelMaxRows

namespace linen {
namespace detail {
namespace decode {

template <class T>
void put_signature(std::vector<Index>& now, const RingCache<T>& c) {
  now.insert(now.end(), {Index{-3}, c.batch(), c.capacity(), c.num_heads(), c.head_dim(), c.window()});
}

// The mask's key axis (masks are refused on this layout: attention.hpp).
template <class T>
Index key_length(const RingCache<T>& c) {
  return c.capacity();
}

template <class T>
Index step_batch(const RingCache<T>& c) {
  return c.batch();
}

template <class T>
void clear_padding(const RingCache<T>&, T*, Index, Index) {}

// The step's projected query must be [batch, lq, heads, head_dim] with the ring's batch,
// heads and head_dim (lq 1 for decode_step).
template <class T>
void check_cache(const RingCache<T>& c, const Shape& batch, Index lq, Index heads, Index head_dim,
                 const std::string& name, bool any_length) {
  const Shape expected{c.batch(), any_length ? lq : 1, c.num_heads(), c.head_dim()};
  Shape got = batch;
  got.insert(got.end(), {lq, heads, head_dim});
  if (got != expected)
    throw linen::invalid_argument(name + ": a RingCache step of " + std::to_string(c.batch()) +
                                  " sequences expects a projected query of shape " + to_string(expected) +
                                  " (inputs_q [batch, n, features]), got " + to_string(got));
}

// n positions must fit the ring beside the window (n <= max_chunk) and the index int32.
template <class T>
void check_room(const RingCache<T>& c, Index n, const char* name) {
  if (n > c.max_chunk())
    throw cache_overflow(std::string(name) + ": a step of " + std::to_string(n) + " positions on a RingCache of window " +
                         std::to_string(c.window()) + " and capacity " + std::to_string(c.capacity()) +
                         " (at most " + std::to_string(c.max_chunk()) + " positions a step); the cache is unchanged");
  if (Index{c.cache_index()} + n > std::numeric_limits<std::int32_t>::max())
    throw cache_overflow(std::string(name) + ": a step of " + std::to_string(n) + " positions at cache_index " +
                         std::to_string(c.cache_index()) + " passes int32 (the index's type); the cache is unchanged");
}

// The positions the step's rows cannot see (below p0 - window) zeroed, then k and v
// ([batch, n, H * head_dim]) at positions [p0, p0 + n): slots p % capacity.
template <class T>
void write(RingCache<T>& c, const T* k, const T* v, Index n) {
  const Index p0 = c.cache_index(), C = c.capacity(), F = c.num_heads() * c.head_dim();
  const Index lo = std::max<Index>(c.lowest(), p0 - c.window());
  RingAccess::zero(c, c.lowest(), lo);
  RingAccess::lowest(c) = static_cast<std::int32_t>(lo);
  for (Index b = 0; b < c.batch(); ++b)
    for (Index i = 0; i < n; ++i) {
      const Index dst = (b * C + (p0 + i) % C) * F;
      std::copy_n(k + (b * n + i) * F, F, RingAccess::key(c).data() + dst);
      std::copy_n(v + (b * n + i) * F, F, RingAccess::value(c).data() + dst);
    }
  RingAccess::index(c) = static_cast<std::int32_t>(p0 + n);
}

// The logical origin of a step from p0 (see the file's comment).
inline Index ring_origin(Index p0, Index window, Index capacity) {
  return p0 <= window ? 0 : (p0 - window) / capacity * capacity;
}

// The window's problem for q [batch, n, H, head_dim] after write (see the file's comment).
template <class T>
void attend(const RingCache<T>& c, const T* q, Index n, const FusedView<bool>& /*mask: refused*/, T* out,
            Eigen::ThreadPoolInterface* pool, RowScratch<accum_t<T>>* scratch, TiledScratch<accum_t<T>>* tiled) {
  const Index p0 = c.cache_index() - n, C = c.capacity(), s = ring_origin(p0, c.window(), C);
  AttentionDims d;
  d.B = c.batch();
  d.Lq = n;
  d.Lk = p0 + n - s;
  d.H = c.num_heads();
  d.D = d.Dv = c.head_dim();
  LINEN_ASSERT(d.Lk <= RingCache<T>::kTableLength * C);
  AttentionProblem<T> a = flax_problem<T>(d, q, c.ring_key().data(), c.ring_value().data(), out);
  a.block_table = RingAccess::table(c).data();  // sequence b: block b, every entry
  a.table_stride = RingCache<T>::kTableLength;
  a.block_size = C;
  a.windowed = true;
  a.window_left = c.window() - (p0 - s);
  a.window_right = p0 - s;
  a.pool = pool;
  a.row_scratch = scratch;
  a.tiled_scratch = tiled;
  if (n <= kRowKernelMaxRows) a.tuning.path = 2;
  fused_attention<T>(a);
}

}  // namespace decode
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DECODE_RING_OPS_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: the fused, tiled ("flash") attention kernel behind dot_product_attention's
// fast path. For each (batch, head, query tile) it streams key tiles and keeps, per query
// row, a running max m, a running sum l and an output accumulator O (online softmax), so
// it never holds more than a tile of logits: memory is O(L), never O(L^2).
//
// Layout. Queries are processed in blocks of QB = NR * W rows (W = SIMD lanes), held
// transposed so that the lanes run over query rows: the logits tile is S^T [key][row],
// the softmax needs no horizontal reductions, the per-row rescale alpha is one vector, and
// K and V are read in place through Flax's [batch, L, heads, depth] strides (one scalar
// broadcast per key element, no transpose or packing; half types are widened to float
// once per key tile). Two register-tiled micro-kernels do the products:
//   S^T[MR keys][QB rows]  += K[MR keys][d] x Q^T[d][QB rows]        over d
//   O^T[MR cols][QB rows]  += V[k][MR cols] x P^T[k][QB rows]         over k
// each an MR x NR block of accumulators (6 x 2 ymm with AVX2, 6 x 4 zmm with AVX-512).
//
// Semantics are Flax's (see detail::attention_reference, the oracle): the query is divided
// by sqrt(depth) and rounded to T, half-type logits are rounded to T after the product and
// after the bias, masked logits become lowest(T), the running max starts at lowest(T) (a
// fully masked row averages V; a row of -inf logits gives NaN), dropout multiplies kept
// weights by 1/keep_prob. The one difference: the weights p = exp(s - max) / sum stay in
// the accumulation type (float for half types), as Flax's force_fp32_for_softmax keeps
// them, instead of being rounded to T before the product with V.
//
// Skipping: a key tile whose logits are all masked for a query block (above the causal
// diagonal, or a mask that is false over the whole tile) is not computed. Its entries
// would add exp(lowest - m) to the row, exactly 0 unless the row's max is itself within
// ~100 of lowest(T) (a row masked everywhere else); such blocks re-run their skipped
// tiles at the end, so skipping never changes a result.
//
// Decode steps (one or two query rows) take a second kernel, RowKernel: lanes along the
// depth, every K and V element loaded once, key chunks spread over the threads and merged
// by log-sum-exp, Flax's [L, H, D] rows read front to back across heads.
//
// Threads: work items (batch, head, query tile) or (batch, key chunk) are taken from an
// atomic counter by pool->NumThreads() threads (the caller is one of them), heavy causal
// tiles first. Each item is computed by one thread start to end, so results do not depend
// on the thread count. Memory: per thread, at most ~1 MiB of query-block state plus a
// few tiles (independent of the key length); the row kernel adds one state per key chunk.
#ifndef LINEN_DETAIL_FUSED_ATTENTION_HPP
#define LINEN_DETAIL_FUSED_ATTENTION_HPP

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"
#include "simd.hpp"

namespace linen {
namespace detail {

// A mask, bias or dropout keep mask read as if it had shape [B, H, Lq, Lk]. Element
// (b, h, i, j) is at data[offset(b) + h*sh + i*sq + j*sk], offset(b) = batch_offset[b]
// when batch_offset is set (numpy broadcasting over several batch dims), else b*sb.
template <class X>
struct FusedView {
  const X* data = nullptr;
  const Index* batch_offset = nullptr;
  Index sb = 0, sh = 0, sq = 0, sk = 0;
  explicit operator bool() const { return data != nullptr; }
  const X* row(Index b, Index h, Index i) const {
    return data + (batch_offset ? batch_offset[b] : b * sb) + h * sh + i * sq;
  }
};

// Tuning of fused_attention, 0 = automatic (from the cache sizes and the thread count).
struct FusedTuning {
  Index tile_keys = 0;     // keys per tile
  Index tile_queries = 0;  // query rows per work item (tiled path)
  Index chunk_keys = 0;    // keys per work item (row path)
  int path = 0;            // 1: tiled path, 2: row path (default: rows for 1 or 2 queries)
};

template <class C>
struct RowScratch;

// One attention problem for fused_attention. Every tensor is addressed through element
// strides over (batch, position, head) with a contiguous depth axis, so Flax's
// [batch, L, heads, depth] (strides L*H*D, H*D, D) and head-major [batch, heads, L, depth]
// (strides H*L*D, D, L*D) layouts are both read in place.
template <class T>
struct FusedAttentionArgs {
  Index B = 1, H = 1, Lq = 0, Lk = 0, D = 0, Dv = 0;
  const T* query = nullptr;  // [B, Lq, H, D] through q_sb, q_sl, q_sh
  Index q_sb = 0, q_sl = 0, q_sh = 0;
  const T* key = nullptr;    // [B, Lk, H, D]
  Index k_sb = 0, k_sl = 0, k_sh = 0;
  const T* value = nullptr;  // [B, Lk, H, Dv]
  Index v_sb = 0, v_sl = 0, v_sh = 0;
  T* out = nullptr;          // [B, Lq, H, Dv], written
  Index o_sb = 0, o_sl = 0, o_sh = 0;
  T query_scale = T(1);      // the query is divided by it (Flax: sqrt(depth) in dtype)
  FusedView<T> bias;         // added to the logits
  FusedView<bool> mask;      // false = masked out
  FusedView<bool> keep;      // dropout keep mask (weights of dropped entries become 0)
  accum_t<T> keep_scale = 1; // multiplies the output when `keep` is set (1/keep_prob)
  bool causal = false;       // key j is visible to query i only if j <= i + causal_offset
  Index causal_offset = 0;
  // false: keys past the diagonal are masked keys as Flax's causal mask makes them (their
  // zero weights still meet their values, so an inf or NaN value there makes the row
  // NaN); true: they are not part of the problem and are never read (a decode step's
  // positions past the cache index).
  bool causal_hides_values = false;
  // Runs (batch, head, query tile) items on pool->NumThreads() threads, the calling
  // thread being one of them; null: the calling thread only.
  Eigen::ThreadPoolInterface* pool = nullptr;
  FusedTuning tuning{};
  // Buffers for the row (decode) kernel, kept by the caller between calls: once grown to
  // the problem's size, a call without a pool allocates nothing. null: local buffers.
  RowScratch<accum_t<T>>* row_scratch = nullptr;
};

// Runs `work(worker, item)` for item in [0, items) on `workers` threads with dynamic
// scheduling (an atomic counter): the caller is worker 0 and workers - 1 tasks go to
// `pool`. The caller returns once every item is done. A task that starts only after the
// caller has finished all items returns at once without touching the caller's frame, so
// a busy or single-threaded pool (even the caller's own) never deadlocks. `work` must not
// throw.
template <class F>
void parallel_for_dynamic(Eigen::ThreadPoolInterface* pool, int workers, Index items, F&& work) {
  if (items <= 0) return;
  if (pool == nullptr || workers <= 1 || items == 1) {
    for (Index it = 0; it < items; ++it) work(0, it);
    return;
  }
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    int active = 0, next_slot = 1;
    bool closed = false;
    std::atomic<Index> next{0};
  };
  auto st = std::make_shared<State>();
  auto body = [&](int slot) {
    for (;;) {
      const Index it = st->next.fetch_add(1, std::memory_order_relaxed);
      if (it >= items) break;
      work(slot, it);
    }
  };
  auto close_and_wait = [&st] {
    std::unique_lock<std::mutex> lock(st->mu);
    st->closed = true;
    st->cv.wait(lock, [&] { return st->active == 0; });
  };
  try {
    for (int t = 1; t < workers; ++t) {
      pool->Schedule([st, &body] {
        int slot;
        {
          std::lock_guard<std::mutex> lock(st->mu);
          if (st->closed) return;  // the caller may be gone: touch nothing of its
          slot = st->next_slot++;
          ++st->active;
        }
        body(slot);
        {
          std::lock_guard<std::mutex> lock(st->mu);
          --st->active;
        }
        st->cv.notify_all();
      });
    }
  } catch (...) {  // Schedule failed (std::bad_alloc): no task may touch this frame later
    close_and_wait();
    throw;
  }
  body(0);
  close_and_wait();
}

namespace fused {

template <int... I, class F>
inline void unroll_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>), unrolled.
template <int N, class F>
inline void unroll(F&& f) {
  unroll_impl(std::make_integer_sequence<int, N>{}, f);
}

// S^T[r][0, QB) = sum_d k[r*ks + d] * qt[d][0, QB) for the MR keys r; mx[v] takes the max.
template <class P, int MR, int NR>
inline void qk_block(const simd::scalar_t<P>* k, Index ks, const simd::scalar_t<P>* qt, Index D,
                     simd::scalar_t<P>* st, P* mx) {
  constexpr int W = simd::size_v<P>, QB = NR * W;
  P acc[MR][NR];
  unroll<MR>([&](auto r) { unroll<NR>([&](auto v) { acc[r][v] = simd::set1<P>(0); }); });
  for (Index d = 0; d < D; ++d) {
    P bq[NR];
    unroll<NR>([&](auto v) { bq[v] = simd::load<P>(qt + d * QB + v * W); });
    unroll<MR>([&](auto r) {
      const P a = simd::set1<P>(k[r * ks + d]);
      unroll<NR>([&](auto v) { acc[r][v] = simd::fmadd(a, bq[v], acc[r][v]); });
    });
  }
  unroll<MR>([&](auto r) {
    unroll<NR>([&](auto v) {
      simd::store(st + r * QB + v * W, acc[r][v]);
      mx[v] = simd::max(mx[v], acc[r][v]);
    });
  });
}

// O^T[r][0, QB) = alpha * O^T[r][0, QB) + sum_k v[k*vs + r] * pt[k][0, QB) for MR columns r.
template <class P, int MR, int NR>
inline void pv_block(const simd::scalar_t<P>* v, Index vs, Index nk, const simd::scalar_t<P>* pt,
                     simd::scalar_t<P>* ot, const P* alpha) {
  constexpr int W = simd::size_v<P>, QB = NR * W;
  P acc[MR][NR];
  unroll<MR>([&](auto r) {
    unroll<NR>([&](auto c) { acc[r][c] = simd::mul(simd::load<P>(ot + r * QB + c * W), alpha[c]); });
  });
  for (Index k = 0; k < nk; ++k) {
    P bp[NR];
    unroll<NR>([&](auto c) { bp[c] = simd::load<P>(pt + k * QB + c * W); });
    unroll<MR>([&](auto r) {
      const P a = simd::set1<P>(v[k * vs + r]);
      unroll<NR>([&](auto c) { acc[r][c] = simd::fmadd(a, bp[c], acc[r][c]); });
    });
  }
  unroll<MR>([&](auto r) { unroll<NR>([&](auto c) { simd::store(ot + r * QB + c * W, acc[r][c]); }); });
}

// The remainder block of m (1 <= m <= M) keys or columns, M unrolled down to 1.
template <class P, int M, int NR>
inline void qk_rest(Index m, const simd::scalar_t<P>* k, Index ks, const simd::scalar_t<P>* qt, Index D,
                    simd::scalar_t<P>* st, P* mx) {
  if constexpr (M >= 1) {
    if (m == M) qk_block<P, M, NR>(k, ks, qt, D, st, mx);
    else qk_rest<P, M - 1, NR>(m, k, ks, qt, D, st, mx);
  }
}
template <class P, int M, int NR>
inline void pv_rest(Index m, const simd::scalar_t<P>* v, Index vs, Index nk, const simd::scalar_t<P>* pt,
                    simd::scalar_t<P>* ot, const P* alpha) {
  if constexpr (M >= 1) {
    if (m == M) pv_block<P, M, NR>(v, vs, nk, pt, ot, alpha);
    else pv_rest<P, M - 1, NR>(m, v, vs, nk, pt, ot, alpha);
  }
}

// Full blocks of MR keys, then one remainder block.
template <class P, int MR, int NR>
inline void qk_tile(const simd::scalar_t<P>* k, Index ks, Index nk, const simd::scalar_t<P>* qt, Index D,
                    simd::scalar_t<P>* st, P* mx) {
  constexpr int QB = NR * simd::size_v<P>;
  Index j = 0;
  for (; j + MR <= nk; j += MR) qk_block<P, MR, NR>(k + j * ks, ks, qt, D, st + j * QB, mx);
  if (j < nk) qk_rest<P, MR - 1, NR>(nk - j, k + j * ks, ks, qt, D, st + j * QB, mx);
}

// Full blocks of MR value columns, then one remainder block.
template <class P, int MR, int NR>
inline void pv_tile(const simd::scalar_t<P>* v, Index vs, Index Dv, Index nk, const simd::scalar_t<P>* pt,
                    simd::scalar_t<P>* ot, const P* alpha) {
  constexpr int QB = NR * simd::size_v<P>;
  Index c = 0;
  for (; c + MR <= Dv; c += MR) pv_block<P, MR, NR>(v + c, vs, nk, pt, ot + c * QB, alpha);
  if (c < Dv) pv_rest<P, MR - 1, NR>(Dv - c, v + c, vs, nk, pt, ot + c * QB, alpha);
}

// Register blocking for a packet type: MR keys (or value columns) x NR vectors of rows.
// 16 registers (AVX2): 6 x 2 accumulators + 2 row vectors + 1 broadcast = 15, the classic
// 6x16 shape; it keeps its operands in registers and measured 88-93% of the FMA peak on
// Zen 3, where 4 x 3 (16 registers: the compiler reloads operands from memory) reached
// ~50%. 32 registers (AVX-512): 6 x 4 + 4 + 1 = 29.
template <class P>
struct DefaultBlocking {
  static constexpr int MR = simd::is_scalar_v<P> ? 4 : 6;
  static constexpr int NR = simd::is_scalar_v<P> ? 4 : (simd::kRegisters >= 32 ? 4 : 2);
};

// How a key tile meets a query block.
struct TileUse {
  bool skip = false;        // every logit masked: not computed (see the fallback)
  bool mask_mixed = false;  // the user mask has both values here: apply it
  bool causal_cut = false;  // the causal diagonal crosses the tile: apply it
  Index begin = 0, end = 0; // keys outside [begin, end) are masked for every row here
};

}  // namespace fused

// See FusedAttentionArgs::row_scratch.
template <class C>
struct RowScratch {
  std::vector<C> storage;
  std::vector<unsigned char> skipped;
  std::vector<fused::TileUse> uses;
};

namespace fused {

// The user mask over rows [r0, r1) x keys [j0, j1) of (b, h), packed in 32 bits: bit 0
// set (so that 0 can mean "not known yet" in a cache), bit 1 = false everywhere, bit 2 =
// both values; then bits 8-19 and 20-31: the first and the last key (from j0) that any
// row sees, when the mask is mixed, contiguous along the keys and the tile is below 4096
// keys (else 0 and j1 - j0 - 1).
template <class T>
std::uint32_t scan_mask(const FusedAttentionArgs<T>& a, Index b, Index h, Index r0, Index r1, Index j0,
                        Index j1) {
  const Index sk = a.mask.sk, n = j1 - j0;
  bool any = false, all = true;
  const Index rows = a.mask.sq == 0 ? 1 : r1 - r0;
  auto row = [&](Index r) { return reinterpret_cast<const unsigned char*>(a.mask.row(b, h, r0 + r)); };
  for (Index r = 0; r < rows && (all || !any); ++r) {
    const unsigned char* m = row(r);
    unsigned char row_any = 0, row_all = 1;
    if (sk == 1) {
      for (Index j = j0; j < j1; ++j) {
        row_any |= m[j];
        row_all &= m[j];
      }
    } else if (sk == 0) {
      row_any = row_all = m[0];
    } else {
      for (Index j = j0; j < j1; ++j) {
        row_any |= m[j * sk];
        row_all &= m[j * sk];
      }
    }
    any = any || row_any;
    all = all && row_all;
  }
  Index first = 0, last = n - 1;
  if (any && !all && sk == 1 && n < 4096) {
    // Rows from the last up: under a causal-like mask the last row sees the most keys, so
    // the searches for the other rows stop almost at once.
    first = n;
    last = -1;
    for (Index r = rows; r-- > 0;) {
      const unsigned char* m = row(r) + j0;
      for (Index j = 0; j < first; ++j)
        if (m[j]) {
          first = j;
          break;
        }
      for (Index j = n - 1; j > last; --j)
        if (m[j]) {
          last = j;
          break;
        }
    }
  }
  return std::uint32_t{1} | (any ? 0u : 2u) | (any && !all ? 4u : 0u) | (static_cast<std::uint32_t>(first) << 8) |
         (static_cast<std::uint32_t>(last) << 20);
}

// True when the values of keys [j0, j1) of (b, h) are all finite (x * 0 is 0 for finite
// x and NaN for inf and NaN, so one sum tells).
template <class T>
bool values_finite(const FusedAttentionArgs<T>& a, Index b, Index h, Index j0, Index j1) {
  using C = accum_t<T>;
  C s = 0;
  for (Index j = j0; j < j1; ++j) {
    const T* v = a.value + b * a.v_sb + j * a.v_sl + h * a.v_sh;
    for (Index c = 0; c < a.Dv; ++c) s += static_cast<C>(v[c]) * C(0);
  }
  return s == C(0);
}

// Per (batch, head), how many of the keys [0, j) have a non-finite value, for every j:
// "are the values of keys [j0, j1) finite" in O(1). One pass over V, made before the tiled
// kernel runs when it may leave masked keys out (B * H * (Lk + 1) counts).
class NonFiniteValues {
 public:
  NonFiniteValues() = default;
  template <class T>
  explicit NonFiniteValues(const FusedAttentionArgs<T>& a) : H_(a.H), Lk_(a.Lk) {
    counts_.resize(static_cast<std::size_t>(a.B * a.H * (a.Lk + 1)));
    for (Index b = 0; b < a.B; ++b)
      for (Index h = 0; h < a.H; ++h) {
        std::int32_t* c = counts_.data() + (b * a.H + h) * (a.Lk + 1);
        std::int32_t run = 0;
        for (Index j = 0; j < a.Lk; ++j) {
          c[j] = run;
          if (!values_finite(a, b, h, j, j + 1)) ++run;
        }
        c[a.Lk] = run;
      }
  }
  bool enabled() const { return !counts_.empty(); }
  bool finite(Index b, Index h, Index j0, Index j1) const {
    const std::int32_t* c = counts_.data() + (b * H_ + h) * (Lk_ + 1);
    return c[j1] == c[j0];
  }

 private:
  Index H_ = 0, Lk_ = 0;
  std::vector<std::int32_t> counts_;
};

// How keys [j0, j1) meet query rows [r0, r1) of (b, h): skipped when every logit is
// masked (by the causal flag or by a mask that is false over the whole block), and the
// keys [begin, end) that some row sees. `mask_bits`: scan_mask's answer when already known
// (0: scan now). `nf`: the values' finiteness when already counted (null: scan now).
// Keys left out are masked for every row, so their weights are exactly 0 and they change
// nothing, unless a value is inf or NaN: Flax multiplies the zero weights by the values
// anyway, which makes the output NaN. So a range is left out only when its values are
// finite; otherwise it is computed, masked entry by entry, and gives Flax's NaN. (Keys past
// the diagonal with causal_hides_values are exempt: they are never read.)
template <class T>
TileUse classify_tile(const FusedAttentionArgs<T>& a, Index b, Index h, Index r0, Index r1, Index j0, Index j1,
                      std::uint32_t mask_bits = 0, const NonFiniteValues* nf = nullptr) {
  TileUse u;
  u.begin = j0;
  u.end = j1;
  Index visible_end = j1;  // the block's rows see no key past it (the causal flag)
  if (a.causal) {
    visible_end = std::max(j0, std::min(j1, r1 + a.causal_offset));  // past the last row's diagonal
    u.end = visible_end;
    u.skip = visible_end == j0;
    u.causal_cut = !u.skip && visible_end - 1 > r0 + a.causal_offset;
  }
  if (a.mask && !u.skip) {
    const std::uint32_t m = mask_bits ? mask_bits : scan_mask(a, b, h, r0, r1, j0, j1);
    u.skip = (m & 2u) != 0;
    u.mask_mixed = (m & 4u) != 0;
    if (u.mask_mixed) {
      u.begin = j0 + static_cast<Index>((m >> 8) & 0xFFFu);
      u.end = std::min(u.end, j0 + static_cast<Index>(m >> 20) + 1);
      if (u.begin >= u.end) u.skip = true;  // the mask's keys lie past the causal cut
    }
  }
  const Index limit = a.causal && a.causal_hides_values ? visible_end : j1;
  auto finite = [&](Index x, Index y) {
    return y <= x || (nf && nf->enabled() ? nf->finite(b, h, x, y) : values_finite(a, b, h, x, y));
  };
  if (!(u.skip ? finite(j0, limit) : finite(j0, u.begin) && finite(u.end, limit))) {
    u.skip = false;
    u.mask_mixed = static_cast<bool>(a.mask);
    u.causal_cut = a.causal;
    u.begin = j0;
    u.end = limit;
  }
  return u;
}

// scan_mask's answers for every (mask batch, mask head, query block, key tile), made in
// one pass over the mask in memory order before the kernel runs (a scan per tile would
// read the rows of a [L, L] mask strided, one cache miss per row, and once per head). A
// mask shared by the heads or the batch is scanned once. Off (the kernel scans per tile)
// when the mask varies along neither, or the table would pass 16 MiB.
class MaskTable {
 public:
  MaskTable() = default;
  template <class T>
  MaskTable(const FusedAttentionArgs<T>& a, Index qb, Index tk, int workers) {
    if (!a.mask || a.Lq == 0 || a.Lk == 0) return;
    bool batch_shared = true;
    if (a.mask.batch_offset) {
      for (Index b = 1; b < a.B; ++b) batch_shared = batch_shared && a.mask.batch_offset[b] == a.mask.batch_offset[0];
    } else {
      batch_shared = a.mask.sb == 0;
    }
    nb_ = batch_shared ? 1 : a.B;
    nh_ = a.mask.sh == 0 ? 1 : a.H;
    blocks_ = (a.Lq + qb - 1) / qb;
    tiles_ = (a.Lk + tk - 1) / tk;
    const Index n = nb_ * nh_ * blocks_ * tiles_;
    if (nb_ * nh_ == a.B * a.H || n > (Index{1} << 22)) return;
    entries_.assign(static_cast<std::size_t>(n), 0);
    // per worker: any, all, first, last of each tile over the block's rows
    std::vector<Index> acc(static_cast<std::size_t>(workers * tiles_ * 4));
    const Index sk = a.mask.sk;
    parallel_for_dynamic(a.pool, workers, nb_ * nh_ * blocks_, [&](int worker, Index item) {
      const Index g = item / blocks_, blk = item % blocks_;
      const Index b = g / nh_, h = g % nh_;
      Index* t4 = acc.data() + worker * tiles_ * 4;
      for (Index t = 0; t < tiles_; ++t) {
        t4[4 * t] = 0;                                   // any
        t4[4 * t + 1] = 1;                               // all
        t4[4 * t + 2] = std::min(tk, a.Lk - t * tk);     // first true (from the tile start)
        t4[4 * t + 3] = -1;                              // last true
      }
      const Index r0 = blk * qb, r1 = a.mask.sq == 0 ? r0 + 1 : std::min(a.Lq, r0 + qb);
      for (Index r = r0; r < r1; ++r) {
        const unsigned char* m = reinterpret_cast<const unsigned char*>(a.mask.row(b, h, r));
        for (Index t = 0; t < tiles_; ++t) {
          const Index j0 = t * tk, n = std::min(tk, a.Lk - j0);
          Index* e = t4 + 4 * t;
          unsigned char any = 0, all = 1;
          if (sk == 1) {
            const unsigned char* row = m + j0;
            for (Index j = 0; j < n; ++j) {
              any |= row[j];
              all &= row[j];
            }
            if (any && !all) {
              Index f = 0;
              while (f < e[2] && !row[f]) ++f;
              if (f < e[2]) e[2] = f;
              Index l = n - 1;
              while (l > e[3] && !row[l]) --l;
              if (l > e[3]) e[3] = l;
            } else if (any) {
              e[2] = 0;
              e[3] = n - 1;
            }
          } else {
            for (Index j = 0; j < n; ++j) {
              any |= m[(j0 + j) * sk];
              all &= m[(j0 + j) * sk];
            }
            if (any) {
              e[2] = 0;
              e[3] = n - 1;
            }
          }
          e[0] |= any;
          e[1] &= all;
        }
      }
      std::uint32_t* out = entries_.data() + item * tiles_;
      for (Index t = 0; t < tiles_; ++t) {
        const Index* e = t4 + 4 * t;
        const Index n = std::min(tk, a.Lk - t * tk);
        const bool any = e[0] != 0, mixed = any && !e[1];
        const bool cut = mixed && n < 4096;
        const Index first = cut ? e[2] : 0, last = cut ? e[3] : n - 1;
        out[t] = std::uint32_t{1} | (any ? 0u : 2u) | (mixed ? 4u : 0u) | (static_cast<std::uint32_t>(first) << 8) |
                 (static_cast<std::uint32_t>(last) << 20);
      }
    });
  }
  bool enabled() const { return !entries_.empty(); }
  // scan_mask(a, b, h, rows of `block`, keys of `tile`).
  std::uint32_t get(Index b, Index h, Index block, Index tile) const {
    return entries_[static_cast<std::size_t>((((nb_ == 1 ? 0 : b) * nh_ + (nh_ == 1 ? 0 : h)) * blocks_ + block) * tiles_ +
                                             tile)];
  }

 private:
  Index nb_ = 0, nh_ = 0, blocks_ = 0, tiles_ = 0;
  std::vector<std::uint32_t> entries_;
};

// The kernel for one problem, one packet type and one register blocking.
template <class T, class P, int MR, int NR>
class Kernel {
 public:
  using C = accum_t<T>;
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold accum_t<T>");
  static constexpr int W = simd::size_v<P>;
  static constexpr Index QB = Index{NR} * W;  // query rows per block (lanes x NR)
  static constexpr bool kWiden = !std::is_same_v<T, C>;  // half types: widen K, V tiles

  explicit Kernel(const FusedAttentionArgs<T>& a) : a_(a) {
    const Index l1 = std::max<Index>(Eigen::l1CacheSize(), 16 * 1024);
    // Keys per tile: the logits tile S^T (tk x QB) in a sixth of L1, whole micro-kernel
    // blocks (84 keys with AVX2's 16-row blocks and 32 KiB; 72-96 measured best on Zen 3).
    Index tk = a.tuning.tile_keys;
    if (tk <= 0) tk = std::max<Index>(MR, l1 / (6 * QB * Index(sizeof(C))) / MR * MR);
    tk_ = std::max<Index>(1, std::min(tk, std::max<Index>(a.Lk, 1)));
    // Query rows per item: many, so that each K, V tile serves many query blocks before
    // the next one is read (up to 1024 rows measured ~20% faster than 256 at L = 2048:
    // the rows of one head's K and V are strided and come from L3), with the blocks' state
    // (Q^T, O^T, m, l) within 1 MiB per thread; fewer when the items would not keep every
    // thread busy (4 per thread under a causal mask, whose items differ in cost).
    Index nb = a.tuning.tile_queries > 0 ? (a.tuning.tile_queries + QB - 1) / QB : 0;
    const Index blocks = (a.Lq + QB - 1) / QB;
    if (nb <= 0) {
      const Index per_block = (a.D + a.Dv + 2) * QB * Index(sizeof(C));
      nb = std::max<Index>(1, std::min<Index>((1024 + QB - 1) / QB, (Index{1} << 20) / std::max<Index>(per_block, 1)));
      const Index threads = a.pool ? std::max(1, a.pool->NumThreads()) : 1;
      const Index want = (a.causal ? 4 : 2) * threads;
      while (nb > 1 && a.B * a.H * ((blocks + nb - 1) / nb) < want) nb = (nb + 1) / 2;
    }
    nb_ = std::max<Index>(1, std::min(nb, std::max<Index>(blocks, 1)));
    n_qtiles_ = (blocks + nb_ - 1) / nb_;
    n_ktiles_ = (a.Lk + tk_ - 1) / tk_;
    // Per-worker scratch, in elements of C, each part rounded to 64 bytes.
    auto round = [](Index n) { return (n + 15) / 16 * 16; };
    off_qt_ = 0;
    off_ot_ = off_qt_ + round(nb_ * a.D * QB);
    off_m_ = off_ot_ + round(nb_ * a.Dv * QB);
    off_l_ = off_m_ + round(nb_ * QB);
    off_st_ = off_l_ + round(nb_ * QB);
    off_kc_ = off_st_ + round(QB * std::max(tk_, a.D));  // logits tile; Q rows at the start
    off_vc_ = off_kc_ + (kWiden ? round(tk_ * a.D) : 0);
    scratch_ = off_vc_ + (kWiden ? round(tk_ * a.Dv) : 0) + 16;
  }

  Index items() const { return a_.B * a_.H * n_qtiles_; }
  Index scratch_elements() const { return scratch_; }
  Index tile_keys() const { return tk_; }
  void set_tables(const MaskTable* table, const NonFiniteValues* nf) {
    table_ = table;
    nf_ = nf;
  }

  // One work item: heavy query tiles first (under a causal mask the last rows see the
  // most keys), then batch and head.
  void run(Index item, C* scratch) const {
    const Index bh = item % (a_.B * a_.H);
    const Index qt = n_qtiles_ - 1 - item / (a_.B * a_.H);
    run_tile(bh / a_.H, bh % a_.H, qt, scratch);
  }

 private:
  const FusedAttentionArgs<T>& a_;
  const MaskTable* table_ = nullptr;
  const NonFiniteValues* nf_ = nullptr;
  Index tk_ = 0, nb_ = 0, n_qtiles_ = 0, n_ktiles_ = 0;
  Index off_qt_ = 0, off_ot_ = 0, off_m_ = 0, off_l_ = 0, off_st_ = 0, off_kc_ = 0, off_vc_ = 0, scratch_ = 0;

  static C lowest() { return static_cast<C>(std::numeric_limits<T>::lowest()); }

  TileUse classify(Index b, Index h, Index r0, Index r1, Index j0, Index j1) const {
    const std::uint32_t bits = table_ && table_->enabled() ? table_->get(b, h, r0 / QB, j0 / tk_) : 0;
    return classify_tile(a_, b, h, r0, r1, j0, j1, bits, nf_);
  }

  void run_tile(Index b, Index h, Index qt, C* scratch) const {
    const Index row_begin = qt * nb_ * QB;
    const Index row_end = std::min(a_.Lq, row_begin + nb_ * QB);
    const Index nblk = (row_end - row_begin + QB - 1) / QB;
    C* qt_all = scratch + off_qt_;
    C* ot_all = scratch + off_ot_;
    C* m_all = scratch + off_m_;
    C* l_all = scratch + off_l_;

    // Q^T of every block: query / scale rounded to T (Flax divides in dtype), zero lanes
    // past the last row. Rows are divided into the logits buffer (free until the first
    // tile), then transposed.
    C* rows = scratch + off_st_;
    for (Index blk = 0; blk < nblk; ++blk) {
      C* qtb = qt_all + blk * a_.D * QB;
      const Index r0 = row_begin + blk * QB, nr = std::min(QB, row_end - r0);
      for (Index r = 0; r < nr; ++r)
        scale_row(a_.query + b * a_.q_sb + (r0 + r) * a_.q_sl + h * a_.q_sh, rows + r * a_.D);
      for (Index r = nr; r < QB; ++r) std::fill(rows + r * a_.D, rows + (r + 1) * a_.D, C(0));
      // qtb[c][r] = rows[r][c]: W x W blocks in registers, then the columns left over
      const Index dw = a_.D / W * W;
      for (Index r = 0; r < QB; r += W)
        for (Index c = 0; c < dw; c += W) simd::transpose<P>(rows + r * a_.D + c, a_.D, qtb + c * QB + r, QB);
      for (Index c = dw; c < a_.D; ++c)
        for (Index r = 0; r < QB; ++r) qtb[c * QB + r] = rows[r * a_.D + c];
      std::fill(ot_all + blk * a_.Dv * QB, ot_all + (blk + 1) * a_.Dv * QB, C(0));
      std::fill(m_all + blk * QB, m_all + (blk + 1) * QB, lowest());
      std::fill(l_all + blk * QB, l_all + (blk + 1) * QB, C(0));
    }

    bool any_skipped = false;
    for (Index t = 0; t < n_ktiles_; ++t) {
      const Index j0 = t * tk_, j1 = std::min(a_.Lk, j0 + tk_);
      bool widened = false;
      for (Index blk = 0; blk < nblk; ++blk) {
        const Index r0 = row_begin + blk * QB, r1 = std::min(row_end, r0 + QB);
        const TileUse u = classify(b, h, r0, r1, j0, j1);
        // Keys that no row of the block sees (a whole tile, or the keys outside
        // [u.begin, u.end): past the causal diagonal or the mask's last true key) are not
        // computed; the fallback below adds them back where they matter.
        if (u.skip || u.begin > j0 || u.end < j1) any_skipped = true;
        if (u.skip) continue;
        if (kWiden && !widened) {
          widen(b, h, j0, j1, scratch);
          widened = true;
        }
        block_tile(b, h, blk, r0, r1, u.begin, u.end, j0, u, scratch);
      }
    }
    if (any_skipped) {
      // Rows whose max is within reach of lowest(T) would see the skipped (masked)
      // entries: re-run those tiles for their blocks, masks applied.
      for (Index blk = 0; blk < nblk; ++blk) {
        const Index r0 = row_begin + blk * QB, r1 = std::min(row_end, r0 + QB);
        bool needed = false;
        for (Index r = 0; r < r1 - r0; ++r) needed = needed || std::exp(lowest() - m_all[blk * QB + r]) != C(0);
        if (!needed) continue;
        for (Index t = 0; t < n_ktiles_; ++t) {
          const Index j0 = t * tk_, j1 = std::min(a_.Lk, j0 + tk_);
          const TileUse u = classify(b, h, r0, r1, j0, j1);
          // the parts not computed: the whole tile, or the keys outside [begin, end)
          const Index parts[2][2] = {{j0, u.skip ? j1 : u.begin}, {u.skip ? j1 : u.end, j1}};
          if (parts[0][0] >= parts[0][1] && parts[1][0] >= parts[1][1]) continue;
          TileUse all;
          all.mask_mixed = static_cast<bool>(a_.mask);
          all.causal_cut = a_.causal;
          if (kWiden) widen(b, h, j0, j1, scratch);
          for (const auto& part : parts)
            if (part[0] < part[1]) block_tile(b, h, blk, r0, r1, part[0], part[1], j0, all, scratch);
        }
      }
    }

    // out = O / l (times 1/keep_prob under dropout; as O * (1/l): one division per row),
    // then written row by row in place in its layout: W x W blocks transposed in registers
    // where whole, element by element elsewhere.
    for (Index blk = 0; blk < nblk; ++blk) {
      const Index r0 = row_begin + blk * QB, nr = std::min(QB, row_end - r0);
      C* otb = ot_all + blk * a_.Dv * QB;
      C* lb = l_all + blk * QB;
      const P scale = simd::set1<P>(a_.keep ? a_.keep_scale : C(1));
      for (Index v = 0; v < QB; v += W) simd::store(lb + v, simd::div(scale, simd::load<P>(lb + v)));
      for (Index c = 0; c < a_.Dv; ++c)
        for (Index v = 0; v < QB; v += W)
          simd::store(otb + c * QB + v, simd::mul(simd::load<P>(otb + c * QB + v), simd::load<P>(lb + v)));
      T* o0 = a_.out + b * a_.o_sb + r0 * a_.o_sl + h * a_.o_sh;
      Index r = 0;
      if constexpr (std::is_same_v<T, C>) {
        const Index dw = a_.Dv / W * W;
        for (; r + W <= nr; r += W) {
          for (Index c = 0; c < dw; c += W) simd::transpose<P>(otb + c * QB + r, QB, o0 + r * a_.o_sl + c, a_.o_sl);
          for (Index i = r; i < r + W; ++i)
            for (Index c = dw; c < a_.Dv; ++c) o0[i * a_.o_sl + c] = otb[c * QB + i];
        }
      }
      for (; r < nr; ++r)
        for (Index c = 0; c < a_.Dv; ++c) o0[r * a_.o_sl + c] = static_cast<T>(otb[c * QB + r]);
    }
  }

  // dst[0, D) = query row / scale, rounded to T as Flax's division in dtype is.
  void scale_row(const T* q, C* dst) const {
    if constexpr (std::is_same_v<T, C>) {
      const P s = simd::set1<P>(a_.query_scale);
      Index c = 0;
      for (; c + W <= a_.D; c += W) simd::store(dst + c, simd::div(simd::load<P>(q + c), s));
      for (; c < a_.D; ++c) dst[c] = q[c] / a_.query_scale;
    } else {
      for (Index c = 0; c < a_.D; ++c) dst[c] = static_cast<C>(static_cast<T>(q[c] / a_.query_scale));
    }
  }

  // Half types: K and V rows [j0, j1) of head h widened to float, row-major.
  void widen(Index b, Index h, Index j0, Index j1, C* scratch) const {
    C* kc = scratch + off_kc_;
    C* vc = scratch + off_vc_;
    for (Index j = j0; j < j1; ++j) {
      simd::convert(a_.key + b * a_.k_sb + j * a_.k_sl + h * a_.k_sh, kc + (j - j0) * a_.D, a_.D);
      simd::convert(a_.value + b * a_.v_sb + j * a_.v_sl + h * a_.v_sh, vc + (j - j0) * a_.Dv, a_.Dv);
    }
  }

  // Keys [j0, j1) against query block blk (rows [r0, r1)); half types read K and V from
  // the tile widened from key kv0 on.
  void block_tile(Index b, Index h, Index blk, Index r0, Index r1, Index j0, Index j1, Index kv0, const TileUse& u,
                  C* scratch) const {
    const Index nk = j1 - j0, nr = r1 - r0;
    C* st = scratch + off_st_;
    C* m = scratch + off_m_ + blk * QB;
    C* l = scratch + off_l_ + blk * QB;
    const C low = lowest();

    // Logits S^T = K Q^T (the max is tracked on the way).
    const C* k;
    Index ks;
    if constexpr (kWiden) {
      k = scratch + off_kc_ + (j0 - kv0) * a_.D;
      ks = a_.D;
    } else {
      k = a_.key + b * a_.k_sb + j0 * a_.k_sl + h * a_.k_sh;
      ks = a_.k_sl;
    }
    P mx[NR];
    for (int v = 0; v < NR; ++v) mx[v] = simd::set1<P>(low);
    qk_tile<P, MR, NR>(k, ks, nk, scratch + off_qt_ + blk * a_.D * QB, a_.D, st, mx);

    // Bias and a mixed mask, row by row (lanes are rows: strided writes into S^T).
    if (a_.bias) {
      for (Index r = 0; r < nr; ++r) {
        const T* br = a_.bias.row(b, h, r0 + r);
        const Index sk = a_.bias.sk;
        for (Index j = 0; j < nk; ++j) {
          C& s = st[j * QB + r];
          s = static_cast<C>(static_cast<T>(static_cast<C>(static_cast<T>(s)) + static_cast<C>(br[(j0 + j) * sk])));
        }
      }
    }
    if (u.mask_mixed) {
      for (Index r = 0; r < nr; ++r) {
        const bool* mr = a_.mask.row(b, h, r0 + r);
        const Index sk = a_.mask.sk;
        for (Index j = 0; j < nk; ++j)
          if (!mr[(j0 + j) * sk]) st[j * QB + r] = low;
      }
    }
    // Pass 1 when anything changed the logits after the product: rounding to T (half
    // types), bias, mask, the causal cut; recomputes the max.
    if (!std::is_same_v<T, C> || a_.bias || u.mask_mixed || u.causal_cut) {
      const P lowv = simd::set1<P>(low);
      const P lanes = simd::iota<P>(C(0));
      for (int v = 0; v < NR; ++v) mx[v] = lowv;
      for (Index j = 0; j < nk; ++j) {
        for (int v = 0; v < NR; ++v) {
          P s = simd::load<P>(st + j * QB + v * W);
          s = simd::round_to<T>(s);
          if (u.causal_cut) {
            // visible iff j0 + j <= row + offset, row = r0 + v*W + lane
            const Index first = std::clamp<Index>(j0 + j - a_.causal_offset - (r0 + v * W), 0, W);
            s = simd::select(simd::less_equal(simd::set1<P>(C(first)), lanes), s, lowv);
          }
          simd::store(st + j * QB + v * W, s);
          mx[v] = simd::max(mx[v], s);
        }
      }
    }
    // Online softmax: m' = max(m, tile max), alpha = exp(m - m'), p = exp(s - m').
    P mnew[NR], alpha[NR], sum[NR];
    for (int v = 0; v < NR; ++v) {
      const P mo = simd::load<P>(m + v * W);
      mnew[v] = simd::max(mo, mx[v]);
      alpha[v] = simd::exp_nonpositive(simd::sub(mo, mnew[v]));
      sum[v] = simd::set1<P>(C(0));
    }
    for (Index j = 0; j < nk; ++j) {
      for (int v = 0; v < NR; ++v) {
        const P p = simd::exp_nonpositive(simd::sub(simd::load<P>(st + j * QB + v * W), mnew[v]));
        sum[v] = simd::add(sum[v], p);
        simd::store(st + j * QB + v * W, p);
      }
    }
    for (int v = 0; v < NR; ++v) {
      simd::store(m + v * W, mnew[v]);
      simd::store(l + v * W, simd::fmadd(simd::load<P>(l + v * W), alpha[v], sum[v]));
    }
    // Dropout: the sum above is before dropout (Flax normalises, then drops).
    if (a_.keep) {
      for (Index r = 0; r < nr; ++r) {
        const bool* kr = a_.keep.row(b, h, r0 + r);
        for (Index j = 0; j < nk; ++j)
          if (!kr[(j0 + j) * a_.keep.sk]) st[j * QB + r] = C(0);
      }
    }
    // O^T = alpha O^T + V^T P^T.
    const C* v;
    Index vs;
    if constexpr (kWiden) {
      v = scratch + off_vc_ + (j0 - kv0) * a_.Dv;
      vs = a_.Dv;
    } else {
      v = a_.value + b * a_.v_sb + j0 * a_.v_sl + h * a_.v_sh;
      vs = a_.v_sl;
    }
    pv_tile<P, MR, NR>(v, vs, a_.Dv, nk, st, scratch + off_ot_ + blk * a_.Dv * QB, alpha);
  }
};

// The kernel for few query rows (decode steps): a row at a time with the lanes along the
// depth (q.k as a vector dot product, P V as a row update of O), so each K and V element
// is loaded once and used by one FMA per row. A work item is one batch entry and a chunk
// of keys for every head; the chunks' partial states (m, l, O) are merged at the end by
// log-sum-exp, so a single long cache is split across threads. Key chunks masked
// everywhere are skipped (re-run at the merge when a row's max is within reach of
// lowest(T), exactly as the tiled kernel's fallback).
template <class T, class P>
class RowKernel {
 public:
  using C = accum_t<T>;
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold accum_t<T>");
  static constexpr int W = simd::size_v<P>;
  static constexpr bool kWiden = !std::is_same_v<T, C>;

  explicit RowKernel(const FusedAttentionArgs<T>& a) : a_(a) {
    tk_ = a.tuning.tile_keys > 0 ? a.tuning.tile_keys : 64;
    Index kc = a.tuning.chunk_keys;
    if (kc <= 0) {
      // 512 keys a chunk, whatever the thread count, so that the chunks and the order of
      // their merge (and so the bits of the result) do not depend on the threads: 8 work
      // items per sequence at 4096 keys; the merge costs one state per chunk, head and row.
      kc = (512 + tk_ - 1) / tk_ * tk_;
    }
    kc_ = std::max<Index>(1, std::min(kc, a.Lk));
    n_chunks_ = (a.Lk + kc_ - 1) / kc_;
    state_ = a.Dv + 2;  // O[Dv], m, l
    auto round = [](Index n) { return (n + 15) / 16 * 16; };
    off_qs_ = 0;
    off_s_ = off_qs_ + round(a.H * a.Lq * a.D);
    off_tmp_ = off_s_ + round(a.H * a.Lq * tk_);
    scratch_ = off_tmp_ + round(a.Dv) + round(a.Lq * state_) + 16;  // merge: O sum, states
  }

  Index items() const { return a_.B * n_chunks_; }
  Index scratch_elements() const { return scratch_; }
  // Partial states: [B, chunks, H, Lq, Dv + 2]; skipped flags: [B, chunks, H].
  Index partial_elements() const { return a_.B * n_chunks_ * a_.H * a_.Lq * state_; }
  Index flag_elements() const { return a_.B * n_chunks_ * a_.H; }

  // Item (b, chunk): the partial states of every head and row. `uses`: H entries.
  void run(Index item, C* scratch, TileUse* uses, C* partials, unsigned char* skipped) const {
    const Index b = item / n_chunks_, c = item % n_chunks_;
    const Index j0 = c * kc_, j1 = std::min(a_.Lk, j0 + kc_);
    C* qs = scratch + off_qs_;
    load_queries(b, 0, a_.H, qs);
    for (Index h = 0; h < a_.H; ++h) {
      uses[h] = classify_tile(a_, b, h, 0, a_.Lq, j0, j1);
      // this kernel computes whole chunks: the causal mask applies over all of [j0, j1)
      uses[h].causal_cut = a_.causal && j1 - 1 > a_.causal_offset;
      skipped[(b * n_chunks_ + c) * a_.H + h] = uses[h].skip ? 1 : 0;
    }
    chunk(b, j0, j1, 0, a_.H, uses, qs, partials + (b * n_chunks_ + c) * a_.H * a_.Lq * state_, scratch);
  }

  // Combines the chunks' states of every (b, h, row) and writes the output (one thread;
  // `scratch` is a worker's, for re-running skipped chunks).
  void merge(const C* partials, const unsigned char* skipped, C* scratch) const {
    C* qs = scratch + off_qs_;
    C* tmp = scratch + off_tmp_;
    const C low = static_cast<C>(std::numeric_limits<T>::lowest());
    for (Index b = 0; b < a_.B; ++b)
      for (Index h = 0; h < a_.H; ++h)
        for (Index r = 0; r < a_.Lq; ++r) {
          C mx = low;
          for (Index c = 0; c < n_chunks_; ++c) mx = std::max(mx, state(partials, b, c, h, r)[a_.Dv]);
          C l = 0;
          T* o = a_.out + b * a_.o_sb + r * a_.o_sl + h * a_.o_sh;
          // accumulate in place in `tmp` (Dv) in chunk order
          std::fill(tmp, tmp + a_.Dv, C(0));
          auto add = [&](const C* st) {
            const C w = std::exp(st[a_.Dv] - mx);
            l += st[a_.Dv + 1] * w;
            for (Index d = 0; d < a_.Dv; ++d) tmp[d] += st[d] * w;
          };
          for (Index c = 0; c < n_chunks_; ++c) add(state(partials, b, c, h, r));
          if (std::exp(low - mx) != C(0)) {
            // The row sees the skipped (masked) chunks: compute them for this head (every
            // row, into `st`) and add row r's state.
            C* st = tmp + round16(a_.Dv);
            load_queries(b, h, h + 1, qs);
            TileUse u;
            u.mask_mixed = static_cast<bool>(a_.mask);
            u.causal_cut = a_.causal;
            for (Index c = 0; c < n_chunks_; ++c) {
              if (!skipped[(b * n_chunks_ + c) * a_.H + h]) continue;
              const Index j0 = c * kc_, j1 = std::min(a_.Lk, j0 + kc_);
              chunk(b, j0, j1, h, h + 1, &u, qs, st, scratch);
              add(st + r * state_);
            }
          }
          for (Index d = 0; d < a_.Dv; ++d) {
            const C x = tmp[d] / l;
            o[d] = static_cast<T>(a_.keep ? x * a_.keep_scale : x);
          }
        }
  }

 private:
  const FusedAttentionArgs<T>& a_;
  Index tk_ = 0, kc_ = 0, n_chunks_ = 0, state_ = 0;
  Index off_qs_ = 0, off_s_ = 0, off_tmp_ = 0, scratch_ = 0;

  static Index round16(Index n) { return (n + 15) / 16 * 16; }
  const C* state(const C* partials, Index b, Index c, Index h, Index r) const {
    return partials + (((b * n_chunks_ + c) * a_.H + h) * a_.Lq + r) * state_;
  }
  void init_state(C* st) const {
    std::fill(st, st + a_.Dv, C(0));
    st[a_.Dv] = static_cast<C>(std::numeric_limits<T>::lowest());
    st[a_.Dv + 1] = C(0);
  }

  // query / scale rounded to T, for heads [h0, h1): qs[(h - h0) * Lq + r][D].
  void load_queries(Index b, Index h0, Index h1, C* qs) const {
    for (Index h = h0; h < h1; ++h)
      for (Index r = 0; r < a_.Lq; ++r) {
        const T* q = a_.query + b * a_.q_sb + r * a_.q_sl + h * a_.q_sh;
        C* dst = qs + ((h - h0) * a_.Lq + r) * a_.D;
        for (Index d = 0; d < a_.D; ++d) dst[d] = static_cast<C>(static_cast<T>(q[d] / a_.query_scale));
      }
  }

  // The states of keys [j0, j1) for heads [h0, h1) (uses[h - h0]; skipped heads keep the
  // empty state) and every row: part[((h - h0) * Lq + r) * (Dv + 2)]. In key tiles. When
  // the heads lie side by side in a row (Flax's [L, H, D]: head stride = depth), a tile is
  // read key by key across all heads, front to back in memory; otherwise (head-major)
  // head by head, each head's rows being contiguous.
  void chunk(Index b, Index j0, Index j1, Index h0, Index h1, const TileUse* uses, const C* qs, C* part,
             C* scratch) const {
    for (Index i = 0; i < (h1 - h0) * a_.Lq; ++i) init_state(part + i * state_);
    C* s = scratch + off_s_;  // logits / weights of a tile: [h - h0][r][tk]
    const bool side_by_side = a_.k_sh == a_.D && a_.v_sh == a_.Dv && h1 - h0 > 1;
    // Rows are fetched ~8 KiB ahead: the loads are interleaved with arithmetic, and the
    // hardware prefetchers alone left ~40% of the read bandwidth unused (Zen 3).
    const Index k_span = ((h1 - h0 - 1) * a_.k_sh + a_.D) * Index(sizeof(T));
    const Index v_span = ((h1 - h0 - 1) * a_.v_sh + a_.Dv) * Index(sizeof(T));
    const Index ahead = std::max<Index>(2, 8192 / std::max<Index>(k_span, 1));
    for (Index t0 = j0; t0 < j1; t0 += tk_) {
      const Index nk = std::min(tk_, j1 - t0);
      if (side_by_side) {
        // logits of every (head, row), key by key
        for (Index j = 0; j < nk; ++j) {
          const T* krow = a_.key + b * a_.k_sb + (t0 + j) * a_.k_sl;
          if (t0 + j + ahead < a_.Lk) simd::prefetch(krow + ahead * a_.k_sl + h0 * a_.k_sh, k_span);
          for (Index h = h0; h < h1; ++h) {
            if (uses[h - h0].skip) continue;
            for (Index r = 0; r < a_.Lq; ++r) {
              const Index hr = (h - h0) * a_.Lq + r;
              s[hr * tk_ + j] = dot(qs + hr * a_.D, krow + h * a_.k_sh);
            }
          }
        }
        // softmax per (head, row); O *= alpha
        for (Index h = h0; h < h1; ++h) {
          if (uses[h - h0].skip) continue;
          for (Index r = 0; r < a_.Lq; ++r) {
            const Index hr = (h - h0) * a_.Lq + r;
            C* st = part + hr * state_;
            const C alpha = softmax_tile(b, h, r, t0, nk, uses[h - h0], s + hr * tk_, st);
            scale(st, alpha);
          }
        }
        // O += p V, key by key across heads
        for (Index j = 0; j < nk; ++j) {
          const T* vrow = a_.value + b * a_.v_sb + (t0 + j) * a_.v_sl;
          if (t0 + j + ahead < a_.Lk) simd::prefetch(vrow + ahead * a_.v_sl + h0 * a_.v_sh, v_span);
          for (Index h = h0; h < h1; ++h) {
            if (uses[h - h0].skip) continue;
            for (Index r = 0; r < a_.Lq; ++r) {
              const Index hr = (h - h0) * a_.Lq + r;
              axpy(s[hr * tk_ + j], vrow + h * a_.v_sh, part + hr * state_);
            }
          }
        }
      } else {
        for (Index h = h0; h < h1; ++h) {
          const TileUse& u = uses[h - h0];
          if (u.skip) continue;
          // K and V in place (half types widened as they are loaded, so that the loads
          // stay interleaved with the arithmetic, as they are for float).
          const T* k = a_.key + b * a_.k_sb + t0 * a_.k_sl + h * a_.k_sh;
          const T* v = a_.value + b * a_.v_sb + t0 * a_.v_sl + h * a_.v_sh;
          for (Index r = 0; r < a_.Lq; ++r) {
            const Index hr = (h - h0) * a_.Lq + r;
            C* st = part + hr * state_;
            dots(qs + hr * a_.D, k, a_.k_sl, nk, s);
            const C alpha = softmax_tile(b, h, r, t0, nk, u, s, st);
            axpy_rows(s, v, a_.v_sl, nk, alpha, st);
          }
        }
      }
    }
  }

  // Flax's logits of keys [t0, t0 + nk) in s (rounded to T, + bias rounded, masked to
  // lowest(T)), then the online softmax: s becomes the weights exp(s - m') (0 where
  // dropped), the state's m and l are updated; returns alpha = exp(m - m') for O.
  C softmax_tile(Index b, Index h, Index r, Index t0, Index nk, const TileUse& u, C* s, C* st) const {
    const C low = static_cast<C>(std::numeric_limits<T>::lowest());
    C mt = st[a_.Dv];
    const T* br = a_.bias ? a_.bias.row(b, h, r) : nullptr;
    const bool* mr = u.mask_mixed ? a_.mask.row(b, h, r) : nullptr;
    for (Index j = 0; j < nk; ++j) {
      C x = static_cast<C>(static_cast<T>(s[j]));
      if (br) x = static_cast<C>(static_cast<T>(x + static_cast<C>(br[(t0 + j) * a_.bias.sk])));
      if (mr && !mr[(t0 + j) * a_.mask.sk]) x = low;
      if (u.causal_cut && t0 + j > r + a_.causal_offset) x = low;
      s[j] = x;
      mt = std::max(mt, x);
    }
    const C alpha = std::exp(st[a_.Dv] - mt);
    Index j = 0;
    const P mv = simd::set1<P>(mt);
    P sv = simd::set1<P>(C(0));
    for (; j + W <= nk; j += W) {
      const P p = simd::exp_nonpositive(simd::sub(simd::load<P>(s + j), mv));
      sv = simd::add(sv, p);
      simd::store(s + j, p);
    }
    C sum = hsum(sv);
    for (; j < nk; ++j) {
      s[j] = std::exp(s[j] - mt);
      sum += s[j];
    }
    st[a_.Dv] = mt;
    st[a_.Dv + 1] = st[a_.Dv + 1] * alpha + sum;
    if (a_.keep) {
      const bool* kr = a_.keep.row(b, h, r);
      for (Index jj = 0; jj < nk; ++jj)
        if (!kr[(t0 + jj) * a_.keep.sk]) s[jj] = C(0);
    }
    return alpha;
  }

  // q . k over the depth.
  C dot(const C* q, const T* k) const {
    const Index D = a_.D, dv = D / W * W;
    P acc0 = simd::set1<P>(C(0)), acc1 = acc0;
    Index d = 0;
    for (; d + 2 * W <= dv; d += 2 * W) {
      acc0 = simd::fmadd(simd::load<P>(q + d), simd::load_as<P>(k + d), acc0);
      acc1 = simd::fmadd(simd::load<P>(q + d + W), simd::load_as<P>(k + d + W), acc1);
    }
    for (; d < dv; d += W) acc0 = simd::fmadd(simd::load<P>(q + d), simd::load_as<P>(k + d), acc0);
    C x = hsum(simd::add(acc0, acc1));
    for (; d < D; ++d) x += q[d] * static_cast<C>(k[d]);
    return x;
  }

  // o[0, Dv) *= alpha
  void scale(C* o, C alpha) const {
    const Index Dv = a_.Dv;
    Index c = 0;
    const P av = simd::set1<P>(alpha);
    for (; c + W <= Dv; c += W) simd::store(o + c, simd::mul(simd::load<P>(o + c), av));
    for (; c < Dv; ++c) o[c] *= alpha;
  }

  // o[0, Dv) += p * v[0, Dv)
  void axpy(C p, const T* v, C* o) const {
    const Index Dv = a_.Dv;
    Index c = 0;
    const P pv = simd::set1<P>(p);
    for (; c + W <= Dv; c += W) simd::store(o + c, simd::fmadd(pv, simd::load_as<P>(v + c), simd::load<P>(o + c)));
    for (; c < Dv; ++c) o[c] += p * static_cast<C>(v[c]);
  }

  // s[j] = q . k[j*ks .. + D) for j < nk.
  void dots(const C* q, const T* k, Index ks, Index nk, C* s) const {
    const Index D = a_.D, dv = D / W * W;
    Index j = 0;
    for (; j + 4 <= nk; j += 4) {
      const T* k0 = k + j * ks;
      P acc[4];
      unroll<4>([&](auto i) { acc[i] = simd::set1<P>(C(0)); });
      for (Index d = 0; d < dv; d += W) {
        const P qv = simd::load<P>(q + d);
        unroll<4>([&](auto i) { acc[i] = simd::fmadd(qv, simd::load_as<P>(k0 + i * ks + d), acc[i]); });
      }
      unroll<4>([&](auto i) {
        C x = hsum(acc[i]);
        for (Index d = dv; d < D; ++d) x += q[d] * static_cast<C>(k0[i * ks + d]);
        s[j + i] = x;
      });
    }
    for (; j < nk; ++j) {
      const T* kj = k + j * ks;
      P acc = simd::set1<P>(C(0));
      for (Index d = 0; d < dv; d += W) acc = simd::fmadd(simd::load<P>(q + d), simd::load_as<P>(kj + d), acc);
      C x = hsum(acc);
      for (Index d = dv; d < D; ++d) x += q[d] * static_cast<C>(kj[d]);
      s[j] = x;
    }
  }

  static C hsum(const P& x) {
    if constexpr (simd::is_scalar_v<P>) return x;
    else return Eigen::internal::predux(x);
  }

  // O = alpha O + sum_j p[j] v[j*vs .. + Dv), O = st[0, Dv), 8 vectors at a time.
  void axpy_rows(const C* p, const T* v, Index vs, Index nk, C alpha, C* o) const {
    constexpr int NV = 8;
    const Index Dv = a_.Dv;
    Index c = 0;
    const P av = simd::set1<P>(alpha);
    for (; c + NV * W <= Dv; c += NV * W) {
      P acc[NV];
      unroll<NV>([&](auto i) { acc[i] = simd::mul(simd::load<P>(o + c + i * W), av); });
      for (Index j = 0; j < nk; ++j) {
        const P pj = simd::set1<P>(p[j]);
        const T* vj = v + j * vs + c;
        unroll<NV>([&](auto i) { acc[i] = simd::fmadd(pj, simd::load_as<P>(vj + i * W), acc[i]); });
      }
      unroll<NV>([&](auto i) { simd::store(o + c + i * W, acc[i]); });
    }
    for (; c + W <= Dv; c += W) {
      P acc = simd::mul(simd::load<P>(o + c), av);
      for (Index j = 0; j < nk; ++j) acc = simd::fmadd(simd::set1<P>(p[j]), simd::load_as<P>(v + j * vs + c), acc);
      simd::store(o + c, acc);
    }
    for (; c < Dv; ++c) {
      C acc = o[c] * alpha;
      for (Index j = 0; j < nk; ++j) acc += p[j] * static_cast<C>(v[j * vs + c]);
      o[c] = acc;
    }
  }
};

template <class T, class P>
void run_row_kernel(const FusedAttentionArgs<T>& a) {
  using C = accum_t<T>;
  const RowKernel<T, P> kernel(a);
  const Index items = kernel.items();
  const int workers =
      a.pool ? static_cast<int>(std::min<Index>(std::max(1, a.pool->NumThreads()), items)) : 1;
  const Index per = kernel.scratch_elements();
  constexpr Index align = 64 / Index(sizeof(C));
  RowScratch<C> local;
  RowScratch<C>& s = a.row_scratch ? *a.row_scratch : local;
  s.storage.resize(static_cast<std::size_t>(per * workers + align + kernel.partial_elements()));
  s.skipped.resize(static_cast<std::size_t>(kernel.flag_elements()));
  s.uses.resize(static_cast<std::size_t>(a.H * workers));
  C* base = s.storage.data();
  while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
  C* partials = base + per * workers;
  parallel_for_dynamic(a.pool, workers, items, [&](int worker, Index item) {
    kernel.run(item, base + worker * per, s.uses.data() + worker * a.H, partials, s.skipped.data());
  });
  kernel.merge(partials, s.skipped.data(), base);
}

template <class T, class P, int MR, int NR>
void run_kernel(const FusedAttentionArgs<T>& a) {
  using C = accum_t<T>;
  Kernel<T, P, MR, NR> kernel(a);
  const Index items = kernel.items();
  const int workers =
      a.pool ? static_cast<int>(std::min<Index>(std::max(1, a.pool->NumThreads()), items)) : 1;
  const MaskTable table(a, Kernel<T, P, MR, NR>::QB, kernel.tile_keys(), a.pool ? std::max(1, a.pool->NumThreads()) : 1);
  // Counted only when the kernel may leave masked keys out.
  const NonFiniteValues nf = a.mask || (a.causal && !a.causal_hides_values) ? NonFiniteValues(a) : NonFiniteValues();
  kernel.set_tables(&table, &nf);
  // Per-worker scratch, allocated once per call by the caller (so an allocation failure
  // throws here, not in a pool thread), 64-byte aligned, workers 64 bytes apart so that
  // they share no cache line. (A plain std::vector: operator new sees every byte.)
  const Index per = kernel.scratch_elements();
  constexpr Index align = 64 / Index(sizeof(C));
  std::vector<C> storage(static_cast<std::size_t>(per * workers + align));
  C* base = storage.data();
  while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
  parallel_for_dynamic(a.pool, workers, items,
                       [&](int worker, Index item) { kernel.run(item, base + worker * per); });
}

}  // namespace fused

// Computes attention for `a` (see FusedAttentionArgs), writing a.out. The arguments
// must be consistent (dot_product_attention validates them); nothing here throws except
// std::bad_alloc for the scratch: per thread at most ~1 MiB of query-block state plus a few
// tiles (independent of the key length), and for the row kernel one (Dv + 2)-element state
// per key chunk, head and query row.
// P, MR and NR choose the packet type and the register blocking (tests instantiate other
// widths); the defaults are the target's widest packet and its register count's blocking.
template <class T, class P = simd::packet_t<accum_t<T>>, int MR = fused::DefaultBlocking<P>::MR,
          int NR = fused::DefaultBlocking<P>::NR>
void fused_attention(const FusedAttentionArgs<T>& a) {
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  if (a.B == 0 || a.H == 0 || a.Lq == 0 || a.Dv == 0) return;
  // depth 0: q and k may have no storage (nothing is read; offsets need a non-null base)
  static const T none{};
  FusedAttentionArgs<T> args = a;
  if (!args.query) args.query = &none;
  if (!args.key) args.key = &none;
  if (a.Lk == 0) {  // softmax over nothing: Flax's einsum gives zeros
    for (Index b = 0; b < a.B; ++b)
      for (Index i = 0; i < a.Lq; ++i)
        for (Index h = 0; h < a.H; ++h)
          std::fill_n(a.out + b * a.o_sb + i * a.o_sl + h * a.o_sh, a.Dv, T(0));
    return;
  }
  // Decode steps (a query row or two): the row kernel, split over key chunks. A few more
  // rows: the tiled kernel with one vector of rows per block. Else the full blocking.
  const int path = a.tuning.path != 0 ? a.tuning.path : (a.Lq <= 2 ? 2 : 1);
  if (path == 2) fused::run_row_kernel<T, P>(args);
  else if (NR > 1 && a.Lq <= simd::size_v<P>) fused::run_kernel<T, P, MR, 1>(args);
  else fused::run_kernel<T, P, MR, NR>(args);
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_FUSED_ATTENTION_HPP

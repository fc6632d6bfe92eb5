// SPDX-License-Identifier: Apache-2.0
//
// Internal: how a key tile meets a query block (tile classification). Before the forward
// kernels compute a tile they ask whether its logits are all masked (above the causal
// diagonal, or a mask false over the whole tile: then it is skipped), which keys some row
// sees, and whether the mask or the causal cut must be applied entry by entry. The
// answers: TileUse. The mask table (MaskTable) scans a mask once, in memory order, for
// every (query block, key tile); NonFiniteValues counts the values that are inf or NaN,
// since masked keys may be left out only where their values are finite (Flax multiplies
// the zero weights by them anyway).
#ifndef LINEN_DETAIL_ATTENTION_TILES_HPP
#define LINEN_DETAIL_ATTENTION_TILES_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../parallel.hpp"
#include "problem.hpp"

namespace linen {
namespace detail {

// How a key tile meets a query block.
struct TileUse {
  bool skip = false;        // every logit masked: not computed (see the fallback)
  bool mask_mixed = false;  // the user mask has both values here: apply it
  bool causal_cut = false;  // the causal diagonal crosses the tile: apply it
  Index begin = 0, end = 0; // keys outside [begin, end) are masked for every row here
};

inline namespace LINEN_ISA_NAMESPACE {
namespace fused {

// The user mask over rows [r0, r1) x keys [j0, j1) of (b, h), packed in 32 bits: bit 0
// set (so that 0 can mean "not known yet" in a cache), bit 1 = false everywhere, bit 2 =
// both values; then bits 8-19 and 20-31: the first and the last key (from j0) that any
// row sees, when the mask is mixed, contiguous along the keys and the tile is below 4096
// keys (else 0 and j1 - j0 - 1).
template <class T>
std::uint32_t scan_mask(const AttentionProblem<T>& a, Index b, Index h, Index r0, Index r1, Index j0,
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

// True when the values of keys [j0, j1) of (b, h) (its kv head's) are all finite (x * 0 is 0 for finite
// x and NaN for inf and NaN, so one sum tells).
template <class T>
bool values_finite(const AttentionProblem<T>& a, Index b, Index h, Index j0, Index j1) {
  using C = accum_t<T>;
  // (16 sums: in any order a sum of zeros is 0 and one NaN makes it NaN, so the compiler
  // may keep them in vector lanes instead of one chain of additions)
  constexpr int kSums = 16;
  C s[kSums] = {};
  const Index dw = a.Dv / kSums * kSums;
  for (Index j = j0; j < j1; ++j) {
    const T* v = a.value_row(b, j, h);
    for (Index c = 0; c < dw; c += kSums)
      for (int i = 0; i < kSums; ++i) s[i] += static_cast<C>(v[c + i]) * C(0);
    for (Index c = dw; c < a.Dv; ++c) s[0] += static_cast<C>(v[c]) * C(0);
  }
  C all = 0;
  for (int i = 0; i < kSums; ++i) all += s[i];
  return all == C(0);
}

// Per (batch, kv head), how many of the keys [0, j) have a non-finite value, for every j:
// "are the values of keys [j0, j1) finite" in O(1). One pass over V, made before the tiled
// kernel runs when it may leave masked keys out (B * kv heads * (Lk + 1) counts).
class NonFiniteValues {
 public:
  NonFiniteValues() = default;
  // `store`: the counts' storage, kept by the caller (null: the object's own).
  template <class T>
  explicit NonFiniteValues(const AttentionProblem<T>& a, std::vector<std::int32_t>* store = nullptr)
      : H_(a.H / a.kv_group), group_(a.kv_group), Lk_(a.Lk) {
    std::vector<std::int32_t>& counts = store ? *store : own_;
    counts.resize(static_cast<std::size_t>(a.B * H_ * (a.Lk + 1)));
    counts_ = counts.data();
    enabled_ = !counts.empty();
    // key by key, its kv heads inside (in Flax's layout a key's heads lie side by side, so
    // V is read front to back; head by head, the pass read it at the row stride and took
    // ~4% of a windowed call at L = 4096)
    for (Index b = 0; b < a.B; ++b) {
      std::int32_t* c0 = counts.data() + b * H_ * (a.Lk + 1);
      for (Index h = 0; h < H_; ++h) c0[h * (a.Lk + 1)] = 0;
      for (Index j = 0; j < a.Lk; ++j)
        for (Index h = 0; h < H_; ++h) {
          std::int32_t* c = c0 + h * (a.Lk + 1);
          c[j + 1] = c[j] + (values_finite(a, b, h * group_, j, j + 1) ? 0 : 1);
        }
    }
  }
  bool enabled() const { return enabled_; }
  bool finite(Index b, Index h, Index j0, Index j1) const {
    const std::int32_t* c = counts_ + (b * H_ + h / group_) * (Lk_ + 1);
    return c[j1] == c[j0];
  }

 private:
  Index H_ = 0, group_ = 1, Lk_ = 0;
  std::vector<std::int32_t> own_;  // a moved vector keeps its buffer, so counts_ stays valid
  const std::int32_t* counts_ = nullptr;
  bool enabled_ = false;
};

// How keys [j0, j1) meet query rows [r0, r1) of (b, h): skipped when every logit is
// masked (by the band of the causal flag, the window and the key lengths, or by a mask
// that is false over the whole block), and the
// keys [begin, end) that some row sees. `mask_bits`: scan_mask's answer when already known
// (0: scan now). `nf`: the values' finiteness when already counted (null: scan now).
// Keys left out are masked for every row, so their weights are exactly 0 and they change
// nothing, unless a value is inf or NaN: Flax multiplies the zero weights by the values
// anyway, which makes the output NaN. So a range is left out only when its values are
// finite; otherwise it is computed, masked entry by entry, and gives Flax's NaN. (Keys past
// the diagonal with causal_hides_values are exempt: they are never read.)
template <class T>
TileUse classify_tile(const AttentionProblem<T>& a, Index b, Index h, Index r0, Index r1, Index j0, Index j1,
                      std::uint32_t mask_bits = 0, const NonFiniteValues* nf = nullptr) {
  TileUse u;
  u.begin = j0;
  u.end = j1;
  Index visible_end = j1;  // the block's rows see no key past it (the causal flag)
  if (a.causal) visible_end = std::max(j0, std::min(j1, r1 + a.causal_offset_of(b)));  // past the last row's diagonal
  if (a.banded()) {
    // the rows' bands: row r sees [band_begin(r), band_end(b, r)), both non-decreasing
    u.begin = std::min(j1, std::max(j0, a.band_begin(r0)));
    u.end = std::max(u.begin, std::min(j1, a.band_end(b, r1 - 1)));
    u.skip = u.begin == u.end;
    u.causal_cut = !u.skip && (a.band_begin(r1 - 1) > u.begin || a.band_end(b, r0) < u.end);
  }
  if (a.mask && !u.skip) {
    const std::uint32_t m = mask_bits ? mask_bits : scan_mask(a, b, h, r0, r1, j0, j1);
    u.skip = (m & 2u) != 0;
    u.mask_mixed = (m & 4u) != 0;
    if (u.mask_mixed) {
      u.begin = std::max(u.begin, j0 + static_cast<Index>((m >> 8) & 0xFFFu));
      u.end = std::min(u.end, j0 + static_cast<Index>(m >> 20) + 1);
      if (u.begin >= u.end) u.skip = true;  // the mask's keys lie outside the band
    }
  }
  const Index limit = a.causal && a.causal_hides_values ? visible_end : j1;
  auto finite = [&](Index x, Index y) {
    return y <= x || (nf && nf->enabled() ? nf->finite(b, h, x, y) : values_finite(a, b, h, x, y));
  };
  if (!(u.skip ? finite(j0, limit) : finite(j0, u.begin) && finite(u.end, limit))) {
    u.skip = false;
    u.mask_mixed = static_cast<bool>(a.mask);
    u.causal_cut = a.banded();
    u.begin = j0;
    u.end = limit;
  }
  return u;
}

// Query rows [i0, i1) of (b, h), past q_len[b] (AttentionProblem::q_len): 0 times the fully
// masked rows they are (the average of the values), written without computing them: in
// column c, 0, or NaN when a value of column c of the row's kv head is inf or NaN (0 times
// the values, summed); the statistics a fully masked row has (max mask_value(), sum Lk).
template <class Policy>
void write_padded_rows(const AttentionProblem<typename Policy::element_type>& a, Index b, Index h, Index i0,
                       Index i1) {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  if (i0 >= i1) return;
  T* first = a.out + b * a.o_sb + i0 * a.o_sl + h * a.o_sh;
  std::fill_n(first, a.Dv, T(0));
  if (!values_finite(a, b, h, 0, a.Lk)) {
    for (Index j = 0; j < a.Lk; ++j) {
      const T* v = a.value_row(b, j, h);
      for (Index c = 0; c < a.Dv; ++c)
        if (!std::isfinite(static_cast<C>(v[c]))) first[c] = std::numeric_limits<T>::quiet_NaN();
    }
  }
  for (Index i = i0; i < i1; ++i) {
    T* o = a.out + b * a.o_sb + i * a.o_sl + h * a.o_sh;
    if (i > i0) std::copy(first, first + a.Dv, o);
    if (a.out_acc)
      for (Index c = 0; c < a.Dv; ++c) a.out_acc[b * a.o_sb + i * a.o_sl + h * a.o_sh + c] = static_cast<C>(first[c]);
    if (a.row_max) {
      a.row_max[(b * a.H + h) * a.Lq + i] = Policy::mask_value();
      a.row_sum[(b * a.H + h) * a.Lq + i] = static_cast<C>(a.Lk);
    }
  }
}

// scan_mask's answers for every (mask batch, mask head, query block, key tile), made in
// one pass over the mask in memory order before the kernel runs (a scan per tile would
// read the rows of a [L, L] mask strided, one cache miss per row, and once per head). A
// mask shared by the heads or the batch is scanned once. Off (the kernel scans per tile)
// when the mask varies along neither, or the table would pass 16 MiB.
class MaskTable {
 public:
  MaskTable() = default;
  // entries_store, acc_store: storage kept by the caller (null: the table's own).
  template <class T>
  MaskTable(const AttentionProblem<T>& a, Index qb, Index tk, int workers,
            std::vector<std::uint32_t>* entries_store = nullptr, std::vector<Index>* acc_store = nullptr) {
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
    std::vector<std::uint32_t>& entries = entries_store ? *entries_store : own_;
    entries.assign(static_cast<std::size_t>(n), 0);
    entries_ = entries.data();
    // per worker: any, all, first, last of each tile over the block's rows
    std::vector<Index> acc_own;
    std::vector<Index>& acc = acc_store ? *acc_store : acc_own;
    acc.resize(static_cast<std::size_t>(workers * tiles_ * 4));
    const Index sk = a.mask.sk;
    parallel_for(a.pool, workers, nb_ * nh_ * blocks_, [&](int worker, Index item) {
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
      std::uint32_t* out = entries_ + item * tiles_;
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
  bool enabled() const { return entries_ != nullptr; }
  // scan_mask(a, b, h, rows of `block`, keys of `tile`).
  std::uint32_t get(Index b, Index h, Index block, Index tile) const {
    return entries_[static_cast<std::size_t>((((nb_ == 1 ? 0 : b) * nh_ + (nh_ == 1 ? 0 : h)) * blocks_ + block) * tiles_ +
                                             tile)];
  }

 private:
  Index nb_ = 0, nh_ = 0, blocks_ = 0, tiles_ = 0;
  std::vector<std::uint32_t> own_;
  std::uint32_t* entries_ = nullptr;  // null: off
};

}  // namespace fused
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_TILES_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: the tiled ("flash") forward kernel. For each (batch, head, query tile) it
// streams key tiles and keeps, per query row, a running max m, a running sum l and an
// output accumulator O (online softmax), so it never holds more than a tile of logits:
// memory is O(L), never O(L^2).
//
// Layout. Queries are processed in blocks of QB = NR * W rows (W = SIMD lanes), held
// transposed so that the lanes run over query rows: the logits tile is S^T [key][row],
// the softmax needs no horizontal reductions, the per-row rescale alpha is one vector, and
// K and V are read in place through their strides (one scalar broadcast per key element,
// no transpose or packing; half types are widened to float once per key tile). The
// micro-GEMM family (micro_gemm.hpp) does the products:
//   S^T[MR keys][QB rows]  = K[MR keys][d] x Q^T[d][QB rows]                   over d
//   O^T[MR cols][QB rows]  = alpha O^T + V[k][MR cols] x P^T[k][QB rows]       over k
// each an MR x NR block of accumulators (6 x 2 ymm with AVX2, 6 x 4 zmm with AVX-512).
//
// Semantics are the policy's (policy.hpp; Flax's: see detail::attention_reference, the
// oracle). The one difference from the reference: the weights p = exp(s - max) / sum stay
// in the accumulation type (float for half types), as Flax's force_fp32_for_softmax keeps
// them, instead of being rounded to T before the product with V.
//
// Skipping: a key tile whose logits are all masked for a query block (tiles.hpp) is not
// computed. Its entries would add exp(mask_value - m) to the row, exactly 0 unless the
// row's max is itself within ~100 of the mask value (a row masked everywhere else); such
// blocks re-run their skipped tiles at the end, so skipping never changes a result.
//
// Threads: work items (batch, head, query tile) are taken by parallel_for's workers, heavy
// causal tiles first. Each item is computed by one thread start to end, so results do not
// depend on the thread count. Memory: per thread, at most ~1 MiB of query-block state
// plus a few tiles (independent of the key length).
#ifndef LINEN_DETAIL_ATTENTION_TILED_KERNEL_HPP
#define LINEN_DETAIL_ATTENTION_TILED_KERNEL_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../parallel.hpp"
#include "../simd.hpp"
#include "micro_gemm.hpp"
#include "problem.hpp"
#include "tiles.hpp"

namespace linen {
namespace detail {

// The tiled kernel's buffers (shared by every ISA level, like AttentionProblem), kept by a caller between calls (AttentionProblem::
// tiled_scratch): once grown to a problem's size, a call on them allocates nothing.
template <class C>
struct TiledScratch {
  std::vector<C> storage;                    // per-worker state
  std::vector<std::uint32_t> mask_entries;   // MaskTable's
  std::vector<Index> mask_acc;
  std::vector<std::int32_t> nonfinite;       // NonFiniteValues'
  std::size_t bytes() const {
    return storage.capacity() * sizeof(C) + mask_entries.capacity() * sizeof(std::uint32_t) +
           mask_acc.capacity() * sizeof(Index) + nonfinite.capacity() * sizeof(std::int32_t);
  }
};

inline namespace LINEN_ISA_NAMESPACE {
namespace fused {

// The kernel for one problem, one logit policy, one packet type and one register blocking.
template <class Policy, class P, int MR, int NR>
class Kernel {
 public:
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold accum_t<T>");
  static constexpr int W = simd::size_v<P>;
  static constexpr Index QB = Index{NR} * W;  // query rows per block (lanes x NR)
  static constexpr bool kWiden = !std::is_same_v<T, C>;  // half types: widen K, V tiles
  // bfloat16 with avx512_bf16: S^T = K Q^T from K in place and Q^T in pairs, and (where the
  // policy rounds the weights to T, as Flax does) O^T += V^T P^T from a pair-packed V tile
  // and P^T in pairs (gemm::pair_strip); K is then never widened.
  static constexpr bool kPairs = simd::has_bf16_dot_v<P> && std::is_same_v<T, Eigen::bfloat16>;

  explicit Kernel(const AttentionProblem<T>& a) : a_(a), pol_(a) {
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
      // (items differ in cost under a band or lengths, as under a causal mask)
      const Index want = (a.causal || a.windowed || a.q_len || a.kv_len ? 4 : 2) * threads;
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
    off_vc_ = off_kc_ + (kWiden && !kPairs ? round(tk_ * a.D) : 0);
    off_qp_ = off_vc_ + (kWiden ? round(tk_ * a.Dv) : 0);
    // pairs (32 bits each, counted in C): Q^T of every block, the packed V tile, P^T, and
    // one V row widened (a key outside the pairs)
    const Index half_tk = (tk_ + 1) / 2;
    off_vp_ = off_qp_ + (kPairs ? round(nb_ * ((a.D + 1) / 2) * QB) : 0);
    off_pt_ = off_vp_ + (kPairs ? round(half_tk * a.Dv) : 0);
    off_v1_ = off_pt_ + (kPairs ? round(half_tk * QB) : 0);
    scratch_ = off_v1_ + (kPairs ? round(a.Dv) : 0) + 16;
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
  const AttentionProblem<T>& a_;
  const Policy pol_;
  const MaskTable* table_ = nullptr;
  const NonFiniteValues* nf_ = nullptr;
  Index tk_ = 0, nb_ = 0, n_qtiles_ = 0, n_ktiles_ = 0;
  Index off_qt_ = 0, off_ot_ = 0, off_m_ = 0, off_l_ = 0, off_st_ = 0, off_kc_ = 0, off_vc_ = 0, scratch_ = 0;
  Index off_qp_ = 0, off_vp_ = 0, off_pt_ = 0, off_v1_ = 0;

  TileUse classify(Index b, Index h, Index r0, Index r1, Index j0, Index j1) const {
    const std::uint32_t bits = table_ && table_->enabled() ? table_->get(b, h, r0 / QB, j0 / tk_) : 0;
    return classify_tile(a_, b, h, r0, r1, j0, j1, bits, nf_);
  }

  void run_tile(Index b, Index h, Index qt, C* scratch) const {
    const Index row_begin = qt * nb_ * QB;
    const Index rows_end = std::min(a_.Lq, row_begin + nb_ * QB);
    // rows past q_len[b] are not computed (written at the end)
    const Index row_end = std::min(rows_end, std::max(row_begin, a_.q_rows(b)));
    const Index nblk = (row_end - row_begin + QB - 1) / QB;
    C* qt_all = scratch + off_qt_;
    C* ot_all = scratch + off_ot_;
    C* m_all = scratch + off_m_;
    C* l_all = scratch + off_l_;

    // Q^T of every block: the policy's query (Flax: query / scale rounded to T), zero
    // lanes past the last row. Rows are divided into the logits buffer (free until the first
    // tile), then transposed.
    C* rows = scratch + off_st_;
    for (Index blk = 0; blk < nblk; ++blk) {
      C* qtb = qt_all + blk * a_.D * QB;
      const Index r0 = row_begin + blk * QB, nr = std::min(QB, row_end - r0);
      for (Index r = 0; r < nr; ++r)
        pol_.template query_row<P>(a_.query + b * a_.q_sb + (r0 + r) * a_.q_sl + h * a_.q_sh, rows + r * a_.D, a_.D);
      for (Index r = nr; r < QB; ++r) std::fill(rows + r * a_.D, rows + (r + 1) * a_.D, C(0));
      // qtb[c][r] = rows[r][c]: W x W blocks in registers, then the columns left over
      const Index dw = a_.D / W * W;
      for (Index r = 0; r < QB; r += W)
        for (Index c = 0; c < dw; c += W) simd::transpose<P>(rows + r * a_.D + c, a_.D, qtb + c * QB + r, QB);
      for (Index c = dw; c < a_.D; ++c)
        for (Index r = 0; r < QB; ++r) qtb[c * QB + r] = rows[r * a_.D + c];
      if constexpr (kPairs) pack_query_pairs(qtb, scratch + off_qp_ + blk * ((a_.D + 1) / 2) * QB);
      std::fill(ot_all + blk * a_.Dv * QB, ot_all + (blk + 1) * a_.Dv * QB, C(0));
      std::fill(m_all + blk * QB, m_all + (blk + 1) * QB, Policy::initial_max());
      std::fill(l_all + blk * QB, l_all + (blk + 1) * QB, C(0));
    }

    // Key tiles that no row of the item sees (left of the first row's band, right of the
    // last row's) are skipped without classifying them for each block when their values
    // are finite, as classify would skip each of them (a windowed call at L = 4096 spent
    // ~3% of its time classifying tiles outside the band); else every tile is classified.
    Index t_lo = 0, t_hi = n_ktiles_;
    if (a_.banded() && nblk > 0 && nf_ && nf_->enabled()) {
      const Index lo = std::min(a_.band_begin(row_begin) / tk_, n_ktiles_);
      const Index hi = std::max(lo, std::min(n_ktiles_, (a_.band_end(b, row_end - 1) + tk_ - 1) / tk_));
      if (nf_->finite(b, h, 0, std::min(a_.Lk, lo * tk_)) && nf_->finite(b, h, std::min(a_.Lk, hi * tk_), a_.Lk)) {
        t_lo = lo;
        t_hi = hi;
      }
    }
    bool any_skipped = t_lo > 0 || t_hi < n_ktiles_;
    for (Index t = t_lo; t < t_hi; ++t) {
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
          prepare_tile(b, h, j0, j1, scratch);
          widened = true;
        }
        block_tile(b, h, blk, r0, r1, u.begin, u.end, j0, u, scratch);
      }
    }
    if (any_skipped) {
      // Rows whose max is within reach of the mask value would see the skipped (masked)
      // entries: re-run those tiles for their blocks, masks applied.
      for (Index blk = 0; blk < nblk; ++blk) {
        const Index r0 = row_begin + blk * QB, r1 = std::min(row_end, r0 + QB);
        bool needed = false;
        for (Index r = 0; r < r1 - r0; ++r) needed = needed || !Policy::masked_vanish(m_all[blk * QB + r]);
        if (!needed) continue;
        for (Index t = 0; t < n_ktiles_; ++t) {
          const Index j0 = t * tk_, j1 = std::min(a_.Lk, j0 + tk_);
          const TileUse u = classify(b, h, r0, r1, j0, j1);
          // the parts not computed: the whole tile, or the keys outside [begin, end)
          const Index parts[2][2] = {{j0, u.skip ? j1 : u.begin}, {u.skip ? j1 : u.end, j1}};
          if (parts[0][0] >= parts[0][1] && parts[1][0] >= parts[1][1]) continue;
          TileUse all;
          all.mask_mixed = static_cast<bool>(a_.mask);
          all.causal_cut = a_.banded();
          if (kWiden) prepare_tile(b, h, j0, j1, scratch);
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
      const P scale = simd::set1<P>(a_.keep ? pol_.keep_scale() : C(1));
      if (a_.row_max) {  // the statistics the backward needs
        const Index base = (b * a_.H + h) * a_.Lq + r0;
        std::copy(m_all + blk * QB, m_all + blk * QB + nr, a_.row_max + base);
        std::copy(l_all + blk * QB, l_all + blk * QB + nr, a_.row_sum + base);
      }
      for (Index v = 0; v < QB; v += W) simd::store(lb + v, simd::div(scale, simd::load<P>(lb + v)));
      for (Index c = 0; c < a_.Dv; ++c)
        for (Index v = 0; v < QB; v += W)
          simd::store(otb + c * QB + v, simd::mul(simd::load<P>(otb + c * QB + v), simd::load<P>(lb + v)));
      if (a_.out_acc) {
        C* oa = a_.out_acc + b * a_.o_sb + r0 * a_.o_sl + h * a_.o_sh;
        for (Index r = 0; r < nr; ++r)
          for (Index c = 0; c < a_.Dv; ++c) oa[r * a_.o_sl + c] = otb[c * QB + r];
      }
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
      if constexpr (!std::is_same_v<T, C> && !simd::is_scalar_v<P>) {
        // half types: W x W blocks transposed in registers, then narrowed lane by lane
        // (bit for bit as static_cast<T>)
        const Index dw = a_.Dv / W * W;
        alignas(64) C blockt[W * W];
        for (; r + W <= nr; r += W) {
          for (Index c = 0; c < dw; c += W) {
            simd::transpose<P>(otb + c * QB + r, QB, blockt, W);
            for (Index i = 0; i < W; ++i) simd::store_as<T>(o0 + (r + i) * a_.o_sl + c, simd::load<P>(blockt + i * W));
          }
          for (Index i = r; i < r + W; ++i)
            for (Index c = dw; c < a_.Dv; ++c) o0[i * a_.o_sl + c] = static_cast<T>(otb[c * QB + i]);
        }
      }
      for (; r < nr; ++r)
        for (Index c = 0; c < a_.Dv; ++c) o0[r * a_.o_sl + c] = static_cast<T>(otb[c * QB + r]);
    }
    if (row_end < rows_end) write_padded_rows<Policy>(a_, b, h, row_end, rows_end);
  }

  // Half types: what block_tile reads of keys [j0, j1): K and V widened (widen), or with
  // pairs K in place and V pair-packed (or widened where the weights stay in C).
  void prepare_tile(Index b, Index h, Index j0, Index j1, C* scratch) const {
    if constexpr (kPairs) {
      if (pol_.rounds_weights()) pack_values(b, h, j0, j1, scratch);
      else widen_values(b, h, j0, j1, scratch);
    } else {
      widen(b, h, j0, j1, scratch);
    }
  }
  void widen_values(Index b, Index h, Index j0, Index j1, C* scratch) const {
    C* vc = scratch + off_vc_;
    for (Index j = j0; j < j1; ++j)
      simd::convert(a_.value_row(b, j, h), vc + (j - j0) * a_.Dv, a_.Dv);
  }
#if LINEN_SIMD_HAS_BF16_DOT
  using Bf = Eigen::bfloat16;
  static Bf* as_bf16(C* p) { return reinterpret_cast<Bf*>(p); }
  // qp[tp][r] = {lo: Q^T[2tp + 1][r] (0 past D), hi: Q^T[2tp][r]}: the B operand of S^T.
  void pack_query_pairs(const C* qtb, C* qp) const {
    const Index pairs = (a_.D + 1) / 2;
    const P zero = simd::set1<P>(C(0));
    for (Index tp = 0; tp < pairs; ++tp)
      for (Index v = 0; v < QB; v += W) {
        const P hi = simd::load<P>(qtb + 2 * tp * QB + v);
        const P lo = 2 * tp + 1 < a_.D ? simd::load<P>(qtb + (2 * tp + 1) * QB + v) : zero;
        simd::bf16::store(reinterpret_cast<std::uint32_t*>(qp + tp * QB + v), simd::bf16::pack(hi, lo));
      }
  }
  // vp[tp][c] = {lo: V[j0 + 2tp + 1][c] (0 past j1), hi: V[j0 + 2tp][c]}: the A operand of
  // O^T, keys [j0, j1) of head h.
  void pack_values(Index b, Index h, Index j0, Index j1, C* scratch) const {
    Bf* vp = as_bf16(scratch + off_vp_);
    const Index Dv = a_.Dv, dw = Dv / 16 * 16;
    for (Index j = j0; j < j1; j += 2) {
      const Bf* v0 = a_.value_row(b, j, h);
      const bool two = j + 1 < j1;
      const Bf* v1 = two ? a_.value_row(b, j + 1, h) : nullptr;
      Bf* dst = vp + (j - j0) * Dv;  // pair row (j - j0) / 2, 2 * Dv elements
      Index c = 0;
      if (two)
        for (; c < dw; c += 16) simd::bf16::store(reinterpret_cast<std::uint32_t*>(dst + 2 * c), simd::bf16::interleave(v0 + c, v1 + c));
      for (; c < Dv; ++c) {
        dst[2 * c] = two ? v1[c] : Bf(0.0f);
        dst[2 * c + 1] = v0[c];
      }
    }
  }
  // P^T pairs of keys [js, js + 2n) (rows of st from key j0): pt[q][r] = {lo: P[js + 2q + 1][r],
  // hi: P[js + 2q][r]}, rounded to T.
  void pack_weight_pairs(const C* st, Index j0, Index js, Index n, C* pt) const {
    for (Index q = 0; q < n; ++q) {
      const C* hi = st + (js + 2 * q - j0) * QB;
      for (Index v = 0; v < QB; v += W)
        simd::bf16::store(reinterpret_cast<std::uint32_t*>(pt + q * QB + v),
                          simd::bf16::pack(simd::load<P>(hi + v), simd::load<P>(hi + QB + v)));
    }
  }
  // O^T += V[j]^T p[j]^T for one key (its weights rounded to T first), in C.
  template <class Init>
  void single_key(Index b, Index h, Index j, C* prow, C* ot, C* scratch, const Init& init) const {
    C* v1 = scratch + off_v1_;
    simd::convert(a_.value_row(b, j, h), v1, a_.Dv);
    for (Index v = 0; v < QB; v += W) simd::store(prow + v, simd::round_to<T>(simd::load<P>(prow + v)));
    gemm::strip<P, MR, NR>(a_.Dv, 1, v1, 1, 1, prow, QB, ot, QB, 0, init, gemm::Store{});
  }
  // O^T = alpha O^T + V^T P^T over keys [j0, j1) with pairs: the keys whose pair lies
  // whole in [j0, j1) (pairs counted from the tile's first key kv0) from the packed tile,
  // a first or last key left over alone; in key order, so each element is the fmadd chain
  // over the keys of the weights rounded to T.
  void values_pairs(Index b, Index h, Index j0, Index j1, Index kv0, C* st, const P* alpha, C* ot, C* scratch) const {
    Index js = j0, je = j1;
    bool started = false;
    if ((j0 - kv0) % 2 != 0) {
      single_key(b, h, j0, st, ot, scratch, gemm::Rescale<P>{alpha});
      started = true;
      ++js;
    }
    if ((je - js) % 2 != 0) --je;
    if (je > js) {
      C* pt = scratch + off_pt_;
      pack_weight_pairs(st, j0, js, (je - js) / 2, pt);
      const Bf* vp = as_bf16(scratch + off_vp_) + (js - kv0) * a_.Dv;
      const Bf* bp = reinterpret_cast<const Bf*>(pt);
      if (started)
        gemm::pair_strip<MR, NR, false>(a_.Dv, je - js, vp, 2, 2 * a_.Dv, bp, 2 * QB, ot, QB, 0, gemm::ZeroOrLoad{true}, gemm::Store{});
      else
        gemm::pair_strip<MR, NR, false>(a_.Dv, je - js, vp, 2, 2 * a_.Dv, bp, 2 * QB, ot, QB, 0, gemm::Rescale<P>{alpha}, gemm::Store{});
      started = true;
    }
    if (je < j1) {
      if (started) single_key(b, h, je, st + (je - j0) * QB, ot, scratch, gemm::ZeroOrLoad{true});
      else single_key(b, h, je, st + (je - j0) * QB, ot, scratch, gemm::Rescale<P>{alpha});
    }
  }
#else
  void pack_query_pairs(const C*, C*) const {}
  void pack_values(Index, Index, Index, Index, C*) const {}
  void values_pairs(Index, Index, Index, Index, Index, C*, const P*, C*, C*) const {}
#endif

  // Half types: K and V rows [j0, j1) of head h widened to float, row-major.
  void widen(Index b, Index h, Index j0, Index j1, C* scratch) const {
    C* kc = scratch + off_kc_;
    C* vc = scratch + off_vc_;
    for (Index j = j0; j < j1; ++j) {
      simd::convert(a_.key_row(b, j, h), kc + (j - j0) * a_.D, a_.D);
      simd::convert(a_.value_row(b, j, h), vc + (j - j0) * a_.Dv, a_.Dv);
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
    const C low = Policy::mask_value();

    // Logits S^T = K Q^T (the max is tracked on the way).
    const C* k;
    Index ks;
    if constexpr (kWiden) {
      k = scratch + off_kc_ + (j0 - kv0) * a_.D;
      ks = a_.D;
    } else {
      k = a_.key_row(b, j0, h);
      ks = a_.k_sl;
    }
    P mx[NR];
    for (int v = 0; v < NR; ++v) mx[v] = simd::set1<P>(Policy::initial_max());
    // Where only the policy's logit changes the product (no bias, mask or causal cut
    // here), it is applied in the product's epilogue instead of a pass of its own.
    const bool to_logits = Policy::changes_logits() && !a_.bias;
    const bool folded = to_logits && !u.mask_mixed && !u.causal_cut;
    // K read in place is walked in runs at the row stride (a paged problem's blocks:
    // AttentionProblem::kv_run); each logit is its key's, so runs change no arithmetic.
    auto runs = [&](auto&& f) {
      for (Index j = 0; j < nk;) {
        const Index m = kWiden && !kPairs ? nk - j : std::min(nk - j, a_.kv_run(j0 + j));
        f(j, m);
        j += m;
      }
    };
    auto product = [&](const auto& epi) {
#if LINEN_SIMD_HAS_BF16_DOT
      if constexpr (kPairs) {
        runs([&](Index j, Index m) {
          gemm::pair_strip<MR, NR, true>(m, a_.D, a_.key_row(b, j0 + j, h), a_.k_sl, 0,
                                         reinterpret_cast<const Eigen::bfloat16*>(scratch + off_qp_ + blk * ((a_.D + 1) / 2) * QB),
                                         2 * QB, st + j * QB, QB, 0, gemm::Zero{}, epi);
        });
        return;
      }
#endif
      runs([&](Index j, Index m) {
        const C* kj;
        if constexpr (kWiden) kj = k + j * ks;
        else kj = a_.key_row(b, j0 + j, h);
        gemm::strip<P, MR, NR>(m, a_.D, kj, ks, 1, scratch + off_qt_ + blk * a_.D * QB, QB, st + j * QB, QB, 0,
                               gemm::Zero{}, epi);
      });
    };
    if (folded) product(gemm::StoreLogitMax<P, Policy>{mx, &pol_});
    else product(gemm::StoreMax<P>{mx});

    // Bias and a mixed mask, row by row (lanes are rows: strided writes into S^T); the
    // bias meets the logit as the policy makes it from the product.
    if (a_.bias) {
      for (Index r = 0; r < nr; ++r) {
        const T* br = a_.bias.row(b, h, r0 + r);
        const Index sk = a_.bias.sk;
        for (Index j = 0; j < nk; ++j) {
          C& s = st[j * QB + r];
          s = pol_.add_bias(pol_.logit(s), br[(j0 + j) * sk]);
        }
      }
    }
    // The policy's logit before a mixed mask's fill where it scales (jax.nn's: the fill must
    // not be scaled); Flax's rounding leaves the fill as it is and stays in pass 1.
    const bool logit_first = Policy::kScalesLogits && to_logits && !folded && u.mask_mixed;
    if (logit_first) {
      for (Index j = 0; j < nk; ++j)
        for (int v = 0; v < NR; ++v)
          simd::store(st + j * QB + v * W, pol_.template logit<P>(simd::load<P>(st + j * QB + v * W)));
    }
    if (u.mask_mixed) {
      for (Index r = 0; r < nr; ++r) {
        const bool* mr = a_.mask.row(b, h, r0 + r);
        const Index sk = a_.mask.sk;
        for (Index j = 0; j < nk; ++j)
          if (!mr[(j0 + j) * sk]) st[j * QB + r] = low;
      }
    }
    // Pass 1 when anything changes the logits after the product: the policy's logit
    // (Flax: rounding to T, for half types; done above with the bias), bias, mask, the
    // causal cut; recomputes the max.
    if ((to_logits && !folded) || a_.bias || u.mask_mixed || u.causal_cut) {
      const P lowv = simd::set1<P>(low);
      const P lanes = simd::iota<P>(C(0));
      for (int v = 0; v < NR; ++v) mx[v] = simd::set1<P>(Policy::initial_max());
      for (Index j = 0; j < nk; ++j) {
        for (int v = 0; v < NR; ++v) {
          P s = simd::load<P>(st + j * QB + v * W);
          if (to_logits && !logit_first) s = pol_.template logit<P>(s);
          if (u.causal_cut) {
            // row = r0 + v*W + lane sees key jj = j0 + j iff it is in the row's band:
            // lanes [first, last]
            const Index jj = j0 + j, rb = r0 + v * W;
            Index first = 0, last = W - 1;
            if (jj >= a_.kv_keys(b)) first = W;
            if (a_.causal) first = std::max(first, jj - a_.causal_offset_of(b) - rb);
            if (a_.windowed) {
              first = std::max(first, jj - a_.window_right - rb);
              last = std::min(last, jj + a_.window_left - rb);
            }
            first = std::clamp<Index>(first, 0, W);
            last = std::clamp<Index>(last, -1, W - 1);
            s = simd::select(simd::less_equal(simd::set1<P>(C(first)), lanes), s, lowv);
            if (last < W - 1) s = simd::select(simd::less_equal(lanes, simd::set1<P>(C(last))), s, lowv);
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
    if constexpr (kPairs) {
      if (pol_.rounds_weights()) {
        values_pairs(b, h, j0, j1, kv0, st, alpha, scratch + off_ot_ + blk * a_.Dv * QB, scratch);
        return;
      }
    }
    C* ot = scratch + off_ot_ + blk * a_.Dv * QB;
    if constexpr (kWiden) {
      gemm::strip<P, MR, NR>(a_.Dv, nk, scratch + off_vc_ + (j0 - kv0) * a_.Dv, 1, a_.Dv, st, QB, ot, QB, 0,
                             gemm::Rescale<P>{alpha}, gemm::Store{});
    } else {
      // in runs at the row stride (paged blocks), each continuing the sum of the run
      // before in key order: the contiguous path's chain of fmadds
      runs([&](Index j, Index m) {
        const C* vj = a_.value_row(b, j0 + j, h);
        if (j == 0)
          gemm::strip<P, MR, NR>(a_.Dv, m, vj, 1, a_.v_sl, st, QB, ot, QB, 0, gemm::Rescale<P>{alpha}, gemm::Store{});
        else
          gemm::strip<P, MR, NR>(a_.Dv, m, vj, 1, a_.v_sl, st + j * QB, QB, ot, QB, 0, gemm::ZeroOrLoad{true},
                                 gemm::Store{});
      });
    }
  }
};

}  // namespace fused


namespace fused {

template <class Policy, class P, int MR, int NR>
void run_kernel(const AttentionProblem<typename Policy::element_type>& a) {
  using C = typename Policy::accum_type;
  Kernel<Policy, P, MR, NR> kernel(a);
  const Index items = kernel.items();
  const int workers =
      a.pool ? static_cast<int>(std::min<Index>(std::max(1, a.pool->NumThreads()), items)) : 1;
  TiledScratch<C>* kept = a.tiled_scratch;
  const MaskTable table(a, Kernel<Policy, P, MR, NR>::QB, kernel.tile_keys(), a.pool ? std::max(1, a.pool->NumThreads()) : 1,
                        kept ? &kept->mask_entries : nullptr, kept ? &kept->mask_acc : nullptr);
  // Counted only when the kernel may leave masked keys out.
  const NonFiniteValues nf = a.mask || a.windowed || a.kv_len || (a.causal && !a.causal_hides_values)
                                 ? NonFiniteValues(a, kept ? &kept->nonfinite : nullptr)
                                 : NonFiniteValues();
  kernel.set_tables(&table, &nf);
  // Per-worker scratch, allocated once per call by the caller (so an allocation failure
  // throws here, not in a pool thread), 64-byte aligned, workers 64 bytes apart so that
  // they share no cache line. (A plain std::vector: operator new sees every byte.) Kept
  // between calls in a.tiled_scratch when set.
  const Index per = kernel.scratch_elements();
  constexpr Index align = 64 / Index(sizeof(C));
  std::vector<C> own;
  std::vector<C>& storage = kept ? kept->storage : own;
  storage.resize(static_cast<std::size_t>(per * workers + align));
  C* base = storage.data();
  while (reinterpret_cast<std::uintptr_t>(base) % 64 != 0) ++base;
  parallel_for(a.pool, workers, items,
                       [&](int worker, Index item) { kernel.run(item, base + worker * per); });
}

}  // namespace fused
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_TILED_KERNEL_HPP

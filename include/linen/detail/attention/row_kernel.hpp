// SPDX-License-Identifier: Apache-2.0
//
// Internal: the forward kernel for few query rows (decode steps: one or two), RowKernel:
// a row at a time with the lanes along the depth (q.k as a vector dot product, P V as a row
// update of O), so each K and V element is loaded once and used by one FMA per row. A work
// item is one batch entry and a chunk of keys for every head; the chunks' partial states
// (m, l, O) are merged at the end by log-sum-exp, so a single long cache is split across
// threads. Key chunks masked everywhere are skipped (re-run at the merge when a row's max
// is within reach of the mask value, exactly as the tiled kernel's fallback). Flax's
// [L, H, D] rows are read in blocks of keys across heads, K and V side by side, each
// block fetched into L2 ahead of its use. Semantics are the policy's (policy.hpp), as in
// the tiled kernel.
#ifndef LINEN_DETAIL_ATTENTION_ROW_KERNEL_HPP
#define LINEN_DETAIL_ATTENTION_ROW_KERNEL_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

// See AttentionProblem::row_scratch.
template <class C>
struct RowScratch {
  std::vector<C> storage;
  std::vector<unsigned char> skipped;
  std::vector<TileUse> uses;
};

inline namespace LINEN_ISA_NAMESPACE {
namespace fused {

// The kernel for few query rows (decode steps): a row at a time with the lanes along the
// depth (q.k as a vector dot product, P V as a row update of O), so each K and V element
// is loaded once and used by one FMA per row. A work item is one batch entry and a chunk
// of keys for every head; the chunks' partial states (m, l, O) are merged at the end by
// log-sum-exp, so a single long cache is split across threads. Key chunks masked
// everywhere are skipped (re-run at the merge when a row's max is within reach of
// the mask value, exactly as the tiled kernel's fallback).
template <class Policy, class P>
class RowKernel {
 public:
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold accum_t<T>");
  static constexpr int W = simd::size_v<P>;
  static constexpr bool kWiden = !std::is_same_v<T, C>;
  // bfloat16 with avx512_bf16: q.k (and p V where the policy rounds the weights to T) as
  // pair products (simd::bf16::dot2), reading K and V as they lie.
  static constexpr bool kPairs = simd::has_bf16_dot_v<P> && std::is_same_v<T, Eigen::bfloat16>;

  explicit RowKernel(const AttentionProblem<T>& a) : a_(a), pol_(a) {
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
    off_qb_ = off_qs_ + round(a.H * a.Lq * a.D);
    off_s_ = off_qb_ + (kPairs ? round((a.H * a.Lq * a.D + 1) / 2) : 0);  // the queries in T
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
      // this kernel computes whole chunks: the band applies over all of [j0, j1) where
      // some row's band is narrower
      uses[h].causal_cut = a_.banded() && (a_.band_begin(a_.Lq - 1) > j0 || a_.band_end(b, 0) < j1);
      skipped[(b * n_chunks_ + c) * a_.H + h] = uses[h].skip ? 1 : 0;
    }
    chunk(b, j0, j1, 0, a_.H, uses, qs, partials + (b * n_chunks_ + c) * a_.H * a_.Lq * state_, scratch);
  }

  // Combines the chunks' states of every (b, h, row) and writes the output (one thread;
  // `scratch` is a worker's, for re-running skipped chunks).
  void merge(const C* partials, const unsigned char* skipped, C* scratch) const {
    C* qs = scratch + off_qs_;
    C* tmp = scratch + off_tmp_;
    for (Index b = 0; b < a_.B; ++b)
      for (Index h = 0; h < a_.H; ++h) {
        // rows past q_len[b]: computed (one or two rows), but written as the rule says
        const Index rows = a_.q_rows(b);
        if (rows < a_.Lq) write_padded_rows<Policy>(a_, b, h, rows, a_.Lq);
        for (Index r = 0; r < rows; ++r) {
          C mx = Policy::initial_max();
          for (Index c = 0; c < n_chunks_; ++c) mx = std::max(mx, state(partials, b, c, h, r)[a_.Dv]);
          C l = 0;
          T* o = a_.out + b * a_.o_sb + r * a_.o_sl + h * a_.o_sh;
          // accumulate in place in `tmp` (Dv) in chunk order
          std::fill(tmp, tmp + a_.Dv, C(0));
          auto add = [&](const C* st) {
            if (st[a_.Dv] > mx) {
              // a re-run chunk (below) above the computed chunks' max (a policy whose
              // initial max is below its mask value): rescale what is summed so far
              const C down = std::exp(mx - st[a_.Dv]);
              l *= down;
              for (Index d = 0; d < a_.Dv; ++d) tmp[d] *= down;
              mx = st[a_.Dv];
            }
            const C w = std::exp(st[a_.Dv] - mx);
            l += st[a_.Dv + 1] * w;
            for (Index d = 0; d < a_.Dv; ++d) tmp[d] += st[d] * w;
          };
          for (Index c = 0; c < n_chunks_; ++c) add(state(partials, b, c, h, r));
          if (!Policy::masked_vanish(mx)) {
            // The row sees the skipped (masked) chunks: compute them for this head (every
            // row, into `st`) and add row r's state.
            C* st = tmp + round16(a_.Dv);
            load_queries(b, h, h + 1, qs);
            TileUse u;
            u.mask_mixed = static_cast<bool>(a_.mask);
            u.causal_cut = a_.banded();
            for (Index c = 0; c < n_chunks_; ++c) {
              if (!skipped[(b * n_chunks_ + c) * a_.H + h]) continue;
              const Index j0 = c * kc_, j1 = std::min(a_.Lk, j0 + kc_);
              chunk(b, j0, j1, h, h + 1, &u, qs, st, scratch);
              add(st + r * state_);
            }
          }
          C* oa = a_.out_acc ? a_.out_acc + b * a_.o_sb + r * a_.o_sl + h * a_.o_sh : nullptr;
          for (Index d = 0; d < a_.Dv; ++d) {
            const C x = tmp[d] / l;
            const C y = a_.keep ? x * pol_.keep_scale() : x;
            o[d] = static_cast<T>(y);
            if (oa) oa[d] = y;
          }
          if (a_.row_max) {  // the statistics the backward needs
            a_.row_max[(b * a_.H + h) * a_.Lq + r] = mx;
            a_.row_sum[(b * a_.H + h) * a_.Lq + r] = l;
          }
        }
      }
  }

 private:
  const AttentionProblem<T>& a_;
  const Policy pol_;
  Index tk_ = 0, kc_ = 0, n_chunks_ = 0, state_ = 0;
  Index off_qs_ = 0, off_qb_ = 0, off_s_ = 0, off_tmp_ = 0, scratch_ = 0;

  static Index round16(Index n) { return (n + 15) / 16 * 16; }
  const C* state(const C* partials, Index b, Index c, Index h, Index r) const {
    return partials + (((b * n_chunks_ + c) * a_.H + h) * a_.Lq + r) * state_;
  }
  void init_state(C* st) const {
    std::fill(st, st + a_.Dv, C(0));
    st[a_.Dv] = Policy::initial_max();
    st[a_.Dv + 1] = C(0);
  }

  // The policy's query (Flax: query / scale rounded to T), for heads [h0, h1):
  // qs[(h - h0) * Lq + r][D].
  void load_queries(Index b, Index h0, Index h1, C* qs) const {
    for (Index h = h0; h < h1; ++h)
      for (Index r = 0; r < a_.Lq; ++r) {
        const T* q = a_.query + b * a_.q_sb + r * a_.q_sl + h * a_.q_sh;
        C* dst = qs + ((h - h0) * a_.Lq + r) * a_.D;
        for (Index d = 0; d < a_.D; ++d) dst[d] = pol_.query(q[d]);
        if constexpr (kPairs) {
          // the same values in T (exact: the policy's query is rounded to T)
          T* qb = query_pairs(qs) + ((h - h0) * a_.Lq + r) * a_.D;
          for (Index d = 0; d < a_.D; ++d) qb[d] = static_cast<T>(dst[d]);
        }
      }
  }
  // The queries in T beside qs (kPairs).
  T* query_pairs(const C* qs) const { return reinterpret_cast<T*>(const_cast<C*>(qs) + (off_qb_ - off_qs_)); }

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
    // Rows are fetched ahead: the loads are interleaved with arithmetic, and the hardware
    // prefetchers alone left ~40% of the read bandwidth unused (Zen 3). Flax's layout:
    // 32 KiB ahead (at least a block of keys), into L2 (simd::prefetch<2>); else 8 KiB.
    // (the kv heads of heads [h0, h1): one per group of kv_group heads)
    const Index kv0 = a_.kv_head(h0), kv_n = a_.kv_head(h1 - 1) - kv0 + 1;
    const Index k_span = ((kv_n - 1) * a_.k_sh + a_.D) * Index(sizeof(T));
    const Index v_span = ((kv_n - 1) * a_.v_sh + a_.Dv) * Index(sizeof(T));
    const Index ahead = std::max<Index>(2, (side_by_side ? 32768 : 8192) / std::max<Index>(k_span, 1));
    // the rows read and prefetched, key by key (paged: one block lookup per block)
    auto kw = a_.key_walk(b), kpw = a_.key_walk(b), vw = a_.value_walk(b), vpw = a_.value_walk(b);
    for (Index t0 = j0; t0 < j1; t0 += tk_) {
      const Index nk = std::min(tk_, j1 - t0);
      if (side_by_side) {
        // In blocks of kBlock keys: the block's rows (K and V, every head) are fetched
        // `ahead` keys in advance, then for each head and each group of kRows rows the
        // rows' logits (dots_block) and online-softmax updates, then their P V (O in
        // registers over the block, axpy_group): K and V are read side by side, block
        // after block, and a block's arithmetic for one row never depends on another row
        // (so n rows give n single rows' bits).
        for (Index j = 0; j < nk; j += kBlock) {
          const Index m = std::min<Index>(kBlock, nk - j);
          const T* krows[kBlock];
          const T* vrows[kBlock];
          for (Index i = 0; i < m; ++i) {
            krows[i] = a_.key + a_.walk(kw, t0 + j + i);
            vrows[i] = a_.value + a_.walk(vw, t0 + j + i);
          }
          // the rows `ahead` keys on, fetched a share at each head: spread over the block's
          // arithmetic, not in one burst before it (a burst waits for the miss buffers, and
          // nothing is computed meanwhile: ~20% of a grouped-query step stalled there)
          const Index nh = h1 - h0;
          for (Index h = h0; h < h1; ++h) {
            for (Index i = m * (h - h0) / nh, ie = m * (h - h0 + 1) / nh; i < ie; ++i) {
              const Index t = t0 + j + i + ahead;
              if (t >= a_.Lk) break;
              simd::prefetch<2>(a_.key + a_.walk(kpw, t) + kv0 * a_.k_sh, k_span);
              simd::prefetch<2>(a_.value + a_.walk(vpw, t) + kv0 * a_.v_sh, v_span);
            }
            if (uses[h - h0].skip) continue;
            const Index koff = a_.kv_head(h) * a_.k_sh, voff = a_.kv_head(h) * a_.v_sh;
            // rows in groups of kRows: each row's logits and softmax, then the group's P V
            // (each value packet loaded once for the group)
            for (Index r0 = 0; r0 < a_.Lq; r0 += kRows) {
              const int nr = static_cast<int>(std::min<Index>(kRows, a_.Lq - r0));
              C alpha[kRows];
              const C* pr[kRows];
              C* str[kRows];
              for (int g = 0; g < nr; ++g) {
                const Index r = r0 + g, hr = (h - h0) * a_.Lq + r;
                const C* q = qs + hr * a_.D;
                C* sj = s + hr * tk_;  // the block's logits, then weights
                C* st = part + hr * state_;
                Index i = 0;
                if constexpr (kPairs) {
                  for (; i < m; ++i) sj[i] = dot_pairs(q, query_pairs(qs) + hr * a_.D, krows[i] + koff);
                } else {
                  if constexpr (2 * kDotBlock <= kBlock) {
                    for (; i + 2 * kDotBlock <= m; i += 2 * kDotBlock)
                      dots_block2(q, [&](int x) { return krows[i + x] + koff; }, sj + i);
                  }
                  for (; i + kDotBlock <= m; i += kDotBlock)
                    dots_block(q, [&](int x) { return krows[i + x] + koff; }, sj + i);
                  for (; i < m; ++i) sj[i] = dot(q, krows[i] + koff);
                }
                alpha[g] = softmax_tile(b, h, r, t0 + j, m, uses[h - h0], sj, st);
                pr[g] = sj;
                str[g] = st;
                if constexpr (kPairs) {
                  if (pol_.rounds_weights()) {
                    // bfloat16: two keys at a time, as pairs, the weights rounded to T
                    round_weights(sj, m);
                    if (alpha[g] != C(1)) scale(st, alpha[g]);
                    i = 0;
                    for (; i + 2 <= m; i += 2) axpy_pairs(sj + i, vrows[i] + voff, vrows[i + 1] - vrows[i], st);
                    if (i < m) axpy_rows(sj + i, [&](Index x) { return vrows[i + x] + voff; }, m - i, C(1), st);
                  }
                }
              }
              if constexpr (kPairs) {
                if (pol_.rounds_weights()) continue;
              }
              auto vrow = [&](Index x) { return vrows[x] + voff; };
              if (nr == kRows) {
                axpy_group<kRows>(pr, vrow, m, alpha, str);
              } else {
                for (int g = 0; g < nr; ++g) axpy_rows(pr[g], vrow, m, alpha[g], str[g]);
              }
            }
          }
        }
      } else {
        for (Index h = h0; h < h1; ++h) {
          const TileUse& u = uses[h - h0];
          if (u.skip) continue;
          // K and V in place (half types widened as they are loaded, so that the loads
          // stay interleaved with the arithmetic, as they are for float), in runs of keys
          // at the row stride (a paged problem's blocks: see AttentionProblem::kv_run).
          // Runs change no arithmetic: the logits are per key, and O continues from the
          // run before (times 1). (bfloat16 pairs: a run of odd length, an odd block
          // size, takes its last key alone.)
          auto runs = [&](auto&& f) {
            for (Index j = 0; j < nk;) {
              const Index m = std::min(nk - j, a_.kv_run(t0 + j));
              f(j, m);
              j += m;
            }
          };
          for (Index r = 0; r < a_.Lq; ++r) {
            const Index hr = (h - h0) * a_.Lq + r;
            C* st = part + hr * state_;
            runs([&](Index j, Index m) {
              const T* k = a_.key_row(b, t0 + j, h);
              if constexpr (kPairs) dots_pairs(qs + hr * a_.D, query_pairs(qs) + hr * a_.D, k, a_.k_sl, m, s + j);
              else dots(qs + hr * a_.D, k, a_.k_sl, m, s + j);
            });
            const C alpha = softmax_tile(b, h, r, t0, nk, u, s, st);
            if constexpr (kPairs) {
              if (pol_.rounds_weights()) {
                for (Index jj = 0; jj < nk; ++jj) s[jj] = static_cast<C>(static_cast<T>(s[jj]));
                runs([&](Index j, Index m) {
                  axpy_rows_pairs(s + j, a_.value_row(b, t0 + j, h), a_.v_sl, m, j == 0 ? alpha : C(1), st);
                });
                continue;
              }
            }
            runs([&](Index j, Index m) {
              const T* v = a_.value_row(b, t0 + j, h);
              axpy_rows(s + j, [&](Index i) { return v + i * a_.v_sl; }, m, j == 0 ? alpha : C(1), st);
            });
          }
        }
      }
    }
  }

  // The policy's logits of keys [t0, t0 + nk) in s (Flax: rounded to T, + bias rounded,
  // masked to lowest(T)), then the online softmax: s becomes the weights exp(s - m') (0
  // where dropped), the state's m and l are updated; returns alpha = exp(m - m') for O.
  // (inlined: the Flax-layout path calls it once per (head, row) and block of keys; a
  // call cost ~7% of a 4-row step)
  EIGEN_ALWAYS_INLINE C softmax_tile(Index b, Index h, Index r, Index t0, Index nk, const TileUse& u, C* s, C* st) const {
    const C low = Policy::mask_value();
    C mt = st[a_.Dv];
    const T* br = a_.bias ? a_.bias.row(b, h, r) : nullptr;
    const bool* mr = u.mask_mixed ? a_.mask.row(b, h, r) : nullptr;
    Index j0 = 0;
    if (!br && !mr && !u.causal_cut) {
      // (the max is exact in any order; lanes never hold NaN: simd::max keeps its first)
      P mv = simd::set1<P>(mt);
      for (; j0 + W <= nk; j0 += W) {
        const P x = pol_.logit(simd::load<P>(s + j0));
        simd::store(s + j0, x);
        mv = simd::max(mv, x);
      }
      mt = std::max(mt, simd::hmax(mv));
    }
    for (Index j = j0; j < nk; ++j) {
      C x = pol_.logit(s[j]);
      if (br) x = pol_.add_bias(x, br[(t0 + j) * a_.bias.sk]);
      if (mr && !mr[(t0 + j) * a_.mask.sk]) x = low;
      if (u.causal_cut && !a_.in_band(b, r, t0 + j)) x = low;
      s[j] = x;
      mt = std::max(mt, x);
    }
    // (exp(0) = 1: a block that leaves the max where it was rescales nothing)
    const C alpha = mt == st[a_.Dv] && std::isfinite(mt) ? C(1) : std::exp(st[a_.Dv] - mt);
    Index j = 0;
    const P mv = simd::set1<P>(mt);
    P sv = simd::set1<P>(C(0));
    for (; j + W <= nk; j += W) {
      const P p = simd::exp_nonpositive(simd::sub(simd::load<P>(s + j), mv));
      sv = simd::add(sv, p);
      simd::store(s + j, p);
    }
    C sum = simd::hsum(sv);
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
    C x = simd::hsum(simd::add(acc0, acc1));
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

  // Keys per dots_block (2 accumulators a key in registers), and per block of the
  // Flax-layout path: at least a packet (the block's softmax runs in packets).
  static constexpr int kDotBlock = simd::kRegisters >= 32 ? 8 : 4;
  static constexpr int kBlock = std::max(W, kDotBlock);

  // s[i] = q . row(i)[0, D) for i < kDotBlock, bit for bit dot(q, row(i)) (the same
  // accumulators, lane sums in predux's order): the block's products side by side, q
  // loaded once for the block, the lane sums together (simd::hsum_n).
  template <class Row>
  void dots_block(const C* q, const Row& row, C* s) const {
    P acc[kDotBlock];
    dot_sums(q, row, acc);
    simd::hsum_n<kDotBlock>(acc, s);
    dot_tails(q, row, kDotBlock, s);
  }
  // dots_block for 2 kDotBlock keys (s[0, 2 kDotBlock)), their sums stored at once
  // (simd::hsum_n2: a packet where 2 kDotBlock keys fill one, so that the softmax's
  // packet load of s forwards from the store).
  template <class Row>
  void dots_block2(const C* q, const Row& row, C* s) const {
    P a[kDotBlock], b[kDotBlock];
    dot_sums(q, row, a);
    dot_sums(q, [&](int x) { return row(kDotBlock + x); }, b);
    simd::hsum_n2<kDotBlock>(a, b, s);
    dot_tails(q, row, 2 * kDotBlock, s);
  }
  // acc[i]: the lanes of q . row(i) over the whole packets of the depth, for i <
  // kDotBlock: dot()'s two accumulators, added.
  template <class Row>
  void dot_sums(const C* q, const Row& row, P* acc) const {
    constexpr int KB = kDotBlock;
    const Index D = a_.D, dv = D / W * W;
    const T* k[KB];
    P acc1[KB];
    gemm::unroll<KB>([&](auto i) {
      k[i] = row(i);
      acc[i] = acc1[i] = simd::set1<P>(C(0));
    });
    Index d = 0;
    for (; d + 2 * W <= dv; d += 2 * W) {
      const P q0 = simd::load<P>(q + d), q1 = simd::load<P>(q + d + W);
      gemm::unroll<KB>([&](auto i) {
        acc[i] = simd::fmadd(q0, simd::load_as<P>(k[i] + d), acc[i]);
        acc1[i] = simd::fmadd(q1, simd::load_as<P>(k[i] + d + W), acc1[i]);
      });
    }
    for (; d < dv; d += W) {
      const P q0 = simd::load<P>(q + d);
      gemm::unroll<KB>([&](auto i) { acc[i] = simd::fmadd(q0, simd::load_as<P>(k[i] + d), acc[i]); });
    }
    gemm::unroll<KB>([&](auto i) { acc[i] = simd::add(acc[i], acc1[i]); });
  }
  // s[i] += the depth past the whole packets, for i < n (as dot's scalar tail).
  template <class Row>
  void dot_tails(const C* q, const Row& row, int n, C* s) const {
    const Index D = a_.D, dv = D / W * W;
    if (dv == D) return;
    for (int i = 0; i < n; ++i) {
      const T* k = row(i);
      C x = s[i];
      for (Index d = dv; d < D; ++d) x += q[d] * static_cast<C>(k[d]);
      s[i] = x;
    }
  }

  // s[j] = q . k[j*ks .. + D) for j < nk.
  void dots(const C* q, const T* k, Index ks, Index nk, C* s) const {
    const Index D = a_.D, dv = D / W * W;
    Index j = 0;
    for (; j + 4 <= nk; j += 4) {
      const T* k0 = k + j * ks;
      P acc[4];
      gemm::unroll<4>([&](auto i) { acc[i] = simd::set1<P>(C(0)); });
      for (Index d = 0; d < dv; d += W) {
        const P qv = simd::load<P>(q + d);
        gemm::unroll<4>([&](auto i) { acc[i] = simd::fmadd(qv, simd::load_as<P>(k0 + i * ks + d), acc[i]); });
      }
      gemm::unroll<4>([&](auto i) {
        C x = simd::hsum(acc[i]);
        for (Index d = dv; d < D; ++d) x += q[d] * static_cast<C>(k0[i * ks + d]);
        s[j + i] = x;
      });
    }
    for (; j < nk; ++j) {
      const T* kj = k + j * ks;
      P acc = simd::set1<P>(C(0));
      for (Index d = 0; d < dv; d += W) acc = simd::fmadd(simd::load<P>(q + d), simd::load_as<P>(kj + d), acc);
      C x = simd::hsum(acc);
      for (Index d = dv; d < D; ++d) x += q[d] * static_cast<C>(kj[d]);
      s[j] = x;
    }
  }

#if LINEN_SIMD_HAS_BF16_DOT
  // q . k over the depth as pair products: qb is q in T (qf the same in C, for the tail).
  C dot_pairs(const C* qf, const T* qb, const T* k) const {
    namespace b16 = simd::bf16;
    const Index D = a_.D, dp = D / 32 * 32;
    P acc0 = simd::set1<P>(C(0)), acc1 = acc0;
    Index d = 0;
    for (; d + 64 <= dp; d += 64) {
      acc0 = b16::dot2(acc0, b16::load(k + d), b16::load(qb + d));
      acc1 = b16::dot2(acc1, b16::load(k + d + 32), b16::load(qb + d + 32));
    }
    if (d < dp) {
      acc0 = b16::dot2(acc0, b16::load(k + d), b16::load(qb + d));
      d += 32;
    }
    C x = simd::hsum(simd::add(acc0, acc1));
    for (; d < D; ++d) x += qf[d] * static_cast<C>(k[d]);
    return x;
  }
  // s[j] = q . k[j*ks .. + D) for j < nk, as pair products.
  void dots_pairs(const C* qf, const T* qb, const T* k, Index ks, Index nk, C* s) const {
    for (Index j = 0; j < nk; ++j) s[j] = dot_pairs(qf, qb, k + j * ks);
  }
  // Weights s[0, n) rounded to T (what the pairs multiply).
  void round_weights(C* s, Index n) const {
    Index j = 0;
    for (; j + W <= n; j += W) simd::store(s + j, simd::round_to<T>(simd::load<P>(s + j)));
    for (; j < n; ++j) s[j] = static_cast<C>(static_cast<T>(s[j]));
  }
  // The pair (lo = p[0], hi = p[1]) in every lane, for weights already rounded to T (the
  // high halves of their bits are the bfloat16 values).
  static simd::bf16::Pairs weight_pair(const C* p) {
    std::uint32_t u0, u1;
    std::memcpy(&u0, p, sizeof u0);
    std::memcpy(&u1, p + 1, sizeof u1);
    return _mm512_set1_epi32(static_cast<int>((u0 >> 16) | (u1 & 0xFFFF0000u)));
  }
  // o[0, Dv) += p[0] * v[0, Dv) + p[1] * v[vs, vs + Dv) (p already in T's values), the
  // two keys as pairs where 32 columns are whole.
  void axpy_pairs(const C* p, const T* v, Index vs, C* o) const {
    namespace b16 = simd::bf16;
    const Index Dv = a_.Dv;
    const b16::Pairs pv = weight_pair(p);  // lo = p[0], hi = p[1]
    Index c = 0;
    for (; c + 32 <= Dv; c += 32) {
      b16::Pairs x0, x1;
      b16::interleave32(v + c, v + vs + c, x0, x1);  // lo = v[c + i], hi = v[vs + c + i]
      simd::store(o + c, b16::dot2(simd::load<P>(o + c), pv, x0));
      simd::store(o + c + 16, b16::dot2(simd::load<P>(o + c + 16), pv, x1));
    }
    for (; c < Dv; ++c) o[c] = (o[c] + p[1] * static_cast<C>(v[vs + c])) + p[0] * static_cast<C>(v[c]);
  }
  // O = alpha O + sum_j p[j] v[j*vs .. + Dv) with pairs of keys (p already in T's values).
  void axpy_rows_pairs(const C* p, const T* v, Index vs, Index nk, C alpha, C* o) const {
    namespace b16 = simd::bf16;
    const Index Dv = a_.Dv;
    const P av = simd::set1<P>(alpha);
    Index c = 0;
    for (; c + 32 <= Dv; c += 32) {
      P acc0 = simd::mul(simd::load<P>(o + c), av), acc1 = simd::mul(simd::load<P>(o + c + 16), av);
      Index j = 0;
      for (; j + 2 <= nk; j += 2) {
        const b16::Pairs pv = weight_pair(p + j);
        b16::Pairs x0, x1;
        b16::interleave32(v + j * vs + c, v + (j + 1) * vs + c, x0, x1);
        acc0 = b16::dot2(acc0, pv, x0);
        acc1 = b16::dot2(acc1, pv, x1);
      }
      if (j < nk) {
        acc0 = simd::fmadd(simd::set1<P>(p[j]), simd::load_as<P>(v + j * vs + c), acc0);
        acc1 = simd::fmadd(simd::set1<P>(p[j]), simd::load_as<P>(v + j * vs + c + 16), acc1);
      }
      simd::store(o + c, acc0);
      simd::store(o + c + 16, acc1);
    }
    for (; c < Dv; ++c) {
      C acc = o[c] * alpha;
      for (Index j = 0; j < nk; ++j) acc += p[j] * static_cast<C>(v[j * vs + c]);
      o[c] = acc;
    }
  }
#else
  C dot_pairs(const C*, const T*, const T*) const { return C(0); }
  void dots_pairs(const C*, const T*, const T*, Index, Index, C*) const {}
  void round_weights(C*, Index) const {}
  void axpy_pairs(const C*, const T*, Index, C*) const {}
  void axpy_rows_pairs(const C*, const T*, Index, Index, C, C*) const {}
#endif

  // Query rows per P V group of the Flax-layout path (axpy_group).
  static constexpr int kRows = simd::kRegisters >= 32 ? 4 : 2;

  // For rows g < R: O_g = alpha[g] O_g + sum_j p[g][j] row(j)[0, Dv) for j < nk in key
  // order (O_g = o[g][0, Dv)), in registers 8 (one row), 4, then 1 packets at a time, a
  // value packet loaded once for the R rows. Each element's arithmetic is the same
  // whatever R and the packet stage (so R rows give R single rows' bits).
  template <int R, class Row>
  void axpy_group(const C* const* p, const Row& row, Index nk, const C* alpha, C* const* o) const {
    const Index Dv = a_.Dv;
    Index c = 0;
    auto packets = [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      for (; c + NV * W <= Dv; c += NV * W) {
        P acc[R][NV];
        gemm::unroll<R>([&](auto g) {
          const P av = simd::set1<P>(alpha[g]);
          gemm::unroll<NV>([&](auto k) { acc[g][k] = simd::mul(simd::load<P>(o[g] + c + k * W), av); });
        });
        for (Index j = 0; j < nk; ++j) {
          const T* vj = row(j) + c;
          P v[NV];
          gemm::unroll<NV>([&](auto k) { v[k] = simd::load_as<P>(vj + k * W); });
          gemm::unroll<R>([&](auto g) {
            const P pj = simd::set1<P>(p[g][j]);
            gemm::unroll<NV>([&](auto k) { acc[g][k] = simd::fmadd(pj, v[k], acc[g][k]); });
          });
        }
        gemm::unroll<R>([&](auto g) { gemm::unroll<NV>([&](auto k) { simd::store(o[g] + c + k * W, acc[g][k]); }); });
      }
    };
    if constexpr (R == 1) packets(std::integral_constant<int, 8>{});
    packets(std::integral_constant<int, 4>{});
    packets(std::integral_constant<int, 1>{});
    for (int g = 0; g < R; ++g)
      for (Index cc = c; cc < Dv; ++cc) {
        C acc = o[g][cc] * alpha[g];
        for (Index j = 0; j < nk; ++j) acc += p[g][j] * static_cast<C>(row(j)[cc]);
        o[g][cc] = acc;
      }
  }

  // O = alpha O + sum_j p[j] row(j)[0, Dv) for j < nk in key order (row(j): key j's value
  // row), O = o[0, Dv): axpy_group for one row.
  template <class Row>
  void axpy_rows(const C* p, const Row& row, Index nk, C alpha, C* o) const {
    axpy_group<1>(&p, row, nk, &alpha, &o);
  }
};

template <class Policy, class P>
void run_row_kernel(const AttentionProblem<typename Policy::element_type>& a) {
  using C = typename Policy::accum_type;
  const RowKernel<Policy, P> kernel(a);
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
  parallel_for(a.pool, workers, items, [&](int worker, Index item) {
    kernel.run(item, base + worker * per, s.uses.data() + worker * a.H, partials, s.skipped.data());
  });
  kernel.merge(partials, s.skipped.data(), base);
}

}  // namespace fused
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_ROW_KERNEL_HPP

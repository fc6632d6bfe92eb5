// SPDX-License-Identifier: Apache-2.0
//
// Internal: the attention core's gradient kernels, on AttentionProblem (batch dims
// flattened into B) with the logit policy's numerics:
//   attention_backward_reference  one head at a time, the [Lq, Lk] weights recomputed with
//                                 exactly the reference forward's arithmetic and rounding;
//   attention_backward_fused      FlashAttention-2 style: the fused forward (fused_attention
//                                 with row_max / row_sum set) keeps two numbers per query
//                                 row (row max m, softmax denominator l: the log-sum-exp in
//                                 two parts); the backward recomputes score tiles
//                                 [block_q, block_k] from them, working memory O(L) per
//                                 worker. Tiles are held transposed (lanes over query rows)
//                                 and multiplied by the micro-GEMM family (micro_gemm.hpp).
// Gradient tensors have their primal's strides: dout the output's, dq the query's, dk the
// key's, dv the value's. A bias gradient is a zeroed accumulator of the bias's own shape
// (the view's `size` elements, addressed by its offsets).
#ifndef LINEN_DETAIL_ATTENTION_BACKWARD_HPP
#define LINEN_DETAIL_ATTENTION_BACKWARD_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../dispatch.hpp"
#include "../parallel.hpp"
#include "../simd.hpp"
#include "micro_gemm.hpp"
#include "policy.hpp"
#include "problem.hpp"

namespace linen {
namespace detail {

// The fused backward's buffers (AttentionProblem::backward_scratch), kept by the caller
// between calls: once grown to a problem's size, a call without a pool allocates nothing.
// Each worker w of a call uses workers[w] alone (run_workers gives every w to one thread),
// grown by that worker; dq_acc and bias_private are sized by the calling thread before
// the workers start. std::vector storage (not Eigen's allocator), so that a scratch grown
// by one instruction-set level's kernel may be freed by code built with other flags.
template <class C>
struct BackwardScratch {
  std::vector<std::vector<C>> workers;  // per worker: its head's q and dO, its tiles
  std::vector<C> dq_acc;                // [groups][B, Lq, H, D]
  std::vector<C> bias_private;          // [workers - 1][bias size], when workers may meet
  std::size_t bytes() const {
    std::size_t n = workers.capacity() * sizeof(std::vector<C>) + (dq_acc.capacity() + bias_private.capacity()) * sizeof(C);
    for (const auto& w : workers) n += w.capacity() * sizeof(C);
    return n;
  }
};

// The fused backward's slots under AttentionProblem::backward_fixed_split: the work is cut
// into this many parts (or fewer, one per unit) whatever the thread count, so that results
// do not depend on it; at most this many threads share one backward.
constexpr int kBackwardFixedSlots = 16;

inline namespace LINEN_ISA_NAMESPACE {

template <class C>
using RowMat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Matrices carved out of one kept buffer, each starting on a 64-byte boundary (as Eigen's
// own allocations start on its packet boundary), so that Eigen's expressions over them
// split into packets and scalars as over a freshly allocated RowMat: the same bits.
// reserve(n) counts a matrix of n elements, then carve() hands them out in the same order.
template <class C>
class KeptMatrices {
 public:
  static constexpr std::size_t kAlign = 64 / sizeof(C);
  static std::size_t rounded(Index n) { return (static_cast<std::size_t>(n) + kAlign - 1) / kAlign * kAlign; }
  void reserve(Index n) { total_ += rounded(n); }
  // Grows `buf` to what was reserved (no allocation once it has grown) and starts carving.
  void start(std::vector<C>& buf) {
    if (buf.size() < total_ + kAlign) buf.resize(total_ + kAlign);
    const auto addr = reinterpret_cast<std::uintptr_t>(buf.data());
    next_ = buf.data() + (kAlign - (addr / sizeof(C)) % kAlign) % kAlign;
  }
  C* carve(Index n) {
    C* p = next_;
    next_ += rounded(n);
    return p;
  }

 private:
  std::size_t total_ = 0;
  C* next_ = nullptr;
};

// The policy's logits on the tiles of one problem, shared by both backward kernels so that
// they see the forward's numbers: the query as the product reads it, the logits (policy's
// rounding, bias, mask, causal cut), the dropout factors.
template <class Policy>
struct BackwardLogits {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  const AttentionProblem<T>& a;
  const Policy pol;

  explicit BackwardLogits(const AttentionProblem<T>& problem) : a(problem), pol(problem) {}

  // The policy's query (Flax: query / sqrt(depth) rounded to T), rows [i0, i0 + n) of (b, h),
  // into qs [n, D] (resized) or qs [n x D] row-major.
  void load_query(Index b, Index h, Index i0, Index n, RowMat<C>& qs) const {
    qs.resize(n, a.D);
    load_query(b, h, i0, n, qs.data());
  }
  void load_query(Index b, Index h, Index i0, Index n, C* qs) const {
    for (Index i = 0; i < n; ++i) {
      const T* src = a.query + b * a.q_sb + (i0 + i) * a.q_sl + h * a.q_sh;
      for (Index c = 0; c < a.D; ++c) qs[i * a.D + c] = pol.query(src[c]);
    }
  }
  // Rows [j0, j0 + n) of head (b, h) of a strided tensor (strides sb, sl, sh), in C: into
  // dst [n, width] (resized) or dst [n x width] row-major.
  template <class X>
  static void load_rows(const X* src, Index sb, Index sl, Index sh, Index b, Index h, Index j0, Index n, Index width,
                        RowMat<C>& dst) {
    dst.resize(n, width);
    load_rows(src, sb, sl, sh, b, h, j0, n, width, dst.data());
  }
  template <class X>
  static void load_rows(const X* src, Index sb, Index sl, Index sh, Index b, Index h, Index j0, Index n, Index width,
                        C* dst) {
    for (Index j = 0; j < n; ++j) {
      const X* s = src + b * sb + (j0 + j) * sl + h * sh;
      for (Index c = 0; c < width; ++c) dst[j * width + c] = static_cast<C>(s[c]);
    }
  }
  template <class Dst>
  void load_keys(Index b, Index h, Index j0, Index n, Dst&& dst) const {
    load_rows(a.key, a.k_sb, a.k_sl, a.k_sh, b, h, j0, n, a.D, dst);
  }
  template <class Dst>
  void load_values(Index b, Index h, Index j0, Index n, Dst&& dst) const {
    load_rows(a.value, a.v_sb, a.v_sl, a.v_sh, b, h, j0, n, a.Dv, dst);
  }
  // Rows of the output's cotangent (the output's strides).
  template <class Dst>
  void load_dout(const T* dout, Index b, Index h, Dst&& dst) const {
    load_rows(dout, a.o_sb, a.o_sl, a.o_sh, b, h, 0, a.Lq, a.Dv, dst);
  }

  // Whether key j is outside row i's band (problem.hpp: causal, window, key length),
  // i.e. masked as the causal mask (Flax) or jax.nn's index masks make it.
  bool band_masked(Index b, Index i, Index j) const { return a.banded() && !a.in_band(b, i, j); }
  // Row i's band of keys [lo, hi) (hi <= lo: empty); every key without band rules.
  std::pair<Index, Index> band(Index b, Index i) const {
    if (!a.banded()) return {0, a.Lk};
    return {a.band_begin(i), a.band_end(b, i)};
  }
  // Turns raw products q.k of row i, keys [j0, j0 + n), into the logits softmax sees.
  void finish_row(Index b, Index h, Index i, Index j0, C* row, Index n) const {
    if constexpr (Policy::changes_logits()) {
      for (Index j = 0; j < n; ++j) row[j] = pol.logit(row[j]);
    }
    if (a.bias) {
      const T* br = a.bias.row(b, h, i) + j0 * a.bias.sk;
      for (Index j = 0; j < n; ++j) row[j] = pol.add_bias(row[j], br[j * a.bias.sk]);
    }
    if (a.mask) {
      const bool* mr = a.mask.row(b, h, i) + j0 * a.mask.sk;
      for (Index j = 0; j < n; ++j)
        if (!mr[j * a.mask.sk]) row[j] = Policy::mask_value();
    }
    if (a.banded())
      for (Index j = 0; j < n; ++j)
        if (band_masked(b, i, j0 + j)) row[j] = Policy::mask_value();
  }
  // Whether finish_row / finish_transposed change anything, and whether anything is masked.
  bool finishes() const { return Policy::changes_logits() || a.bias || a.mask || a.banded(); }
  bool masks() const { return a.mask || a.banded(); }
  // finish_row on a transposed tile t [keys j0.., rows i0..] (the fused kernels' layout):
  // each element through logit(), add_bias(), then the mask's and the band's fill, as
  // finish_row; passes over the tile's contiguous rows, the band's fill only where it
  // falls.
  template <class M>
  void finish_transposed(Index b, Index h, Index i0, Index j0, M& t) const {
    const Index nk = t.rows(), nr = t.cols();
    C* const d = t.data();
    if constexpr (Policy::changes_logits()) {
      for (Index e = 0; e < nk * nr; ++e) d[e] = pol.logit(d[e]);
    }
    if (a.bias)
      for (Index r = 0; r < nr; ++r) {
        const T* br = a.bias.row(b, h, i0 + r) + j0 * a.bias.sk;
        for (Index k = 0; k < nk; ++k) d[k * nr + r] = pol.add_bias(d[k * nr + r], br[k * a.bias.sk]);
      }
    fill_masked(b, h, i0, j0, nk, nr, d, Policy::mask_value());
  }
  // Zeroes the entries of a transposed tile t [keys j0.., rows i0..] that are masked.
  template <class M>
  void zero_masked_transposed(Index b, Index h, Index i0, Index j0, M& t) const {
    fill_masked(b, h, i0, j0, t.rows(), t.cols(), t.data(), C(0));
  }
  // d[k * nr + r] = x where (row i0 + r, key j0 + k) is masked (the mask, or outside the
  // row's band).
  void fill_masked(Index b, Index h, Index i0, Index j0, Index nk, Index nr, C* d, C x) const {
    if (a.mask)
      for (Index r = 0; r < nr; ++r) {
        const bool* mr = a.mask.row(b, h, i0 + r) + j0 * a.mask.sk;
        for (Index k = 0; k < nk; ++k)
          if (!mr[k * a.mask.sk]) d[k * nr + r] = x;
      }
    // The band: nothing when every row sees every key of the tile (both ends of a band are
    // non-decreasing in the row); else, for chunks of rows, each key's row of the tile
    // (contiguous) filled where it lies outside [lo, hi) (an empty band: everywhere).
    if (a.banded() && nr > 0 && !(a.band_begin(i0 + nr - 1) <= j0 && a.band_end(b, i0) >= j0 + nk)) {
      constexpr Index R = 64;
      Index lo[R], hi[R];
      for (Index rc = 0; rc < nr; rc += R) {
        const Index n = std::min(R, nr - rc);
        for (Index r = 0; r < n; ++r) {
          const auto [l, e] = band(b, i0 + rc + r);
          lo[r] = l - j0;
          hi[r] = e - j0;
        }
        for (Index k = 0; k < nk; ++k) {
          C* row = d + k * nr + rc;
          for (Index r = 0; r < n; ++r)
            if (k < lo[r] || k >= hi[r]) row[r] = x;
        }
      }
    }
  }
  bool masked(Index b, Index h, Index i, Index j) const {
    return band_masked(b, i, j) || (a.mask && !a.mask.row(b, h, i)[j * a.mask.sk]);
  }
  // Whether every logit of the tile rows [i0, i0 + ni) x keys [j0, j0 + nj) is masked
  // (outside each row's band, or by the mask), so that its weights are
  // exp(mask_value - m) = 0 unless a row's max m is itself near the mask value (a row
  // masked everywhere; see Policy::masked_vanish).
  bool tile_masked(Index b, Index h, Index i0, Index ni, Index j0, Index nj) const {
    for (Index i = i0; i < i0 + ni; ++i) {
      const auto [blo, bhi] = band(b, i);
      const Index lo = std::max(j0, blo), hi = std::min(j0 + nj, bhi);
      if (lo >= hi) continue;  // the row sees none of the tile's keys
      if (!a.mask) return false;
      const bool* mr = a.mask.row(b, h, i);
      for (Index j = lo; j < hi; ++j)
        if (mr[j * a.mask.sk]) return false;
      if (a.mask.sq == 0 && !a.banded()) break;  // every row reads the same mask row and band
    }
    return true;
  }
  // The keep row of query i (element j at [j * keep_sk()]), or null without dropout.
  const bool* keep_row(Index b, Index h, Index i) const { return a.keep ? a.keep.row(b, h, i) : nullptr; }
  Index keep_sk() const { return a.keep.sk; }
};

// ---------------------------------------------------------------------------------------
// Reference backward: for each (b, h), recompute the weights as the reference forward did
// (attention_reference's arithmetic, rounding included), then
//   dV = P'^T dO,  dP' = dO V^T,  dP = dP' * keep * multiplier,
//   dS = P * (dP - rowsum(P * dP)) (0 where masked),  dbias += dS,
//   dq = dS K / sqrt(depth),  dK = dS^T (q / sqrt(depth)),
// with P the weights before dropout and P' after.
//   dout: the output's cotangent; dq, dk, dv: written (their primals' strides);
//   dbias: null, or a zeroed accumulator of the bias's own shape.
template <class Policy>
void attention_backward_reference(const AttentionProblem<typename Policy::element_type>& a,
                                  const typename Policy::element_type* dout, typename Policy::element_type* dq,
                                  typename Policy::element_type* dk, typename Policy::element_type* dv,
                                  typename Policy::accum_type* dbias) {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  LINEN_ASSERT(!a.has_index_rules());  // GQA, windows, lengths: the fused backward's alone
  const BackwardLogits<Policy> lg(a);
  const Policy& pol = lg.pol;
  RowMat<C> qs, kc, vc, go, s, p, dp, m;
  const C dq_scale = pol.query_derivative();
  for (Index b = 0; b < a.B; ++b) {
    for (Index h = 0; h < a.H; ++h) {
      lg.load_query(b, h, 0, a.Lq, qs);
      lg.load_keys(b, h, 0, a.Lk, kc);
      lg.load_values(b, h, 0, a.Lk, vc);
      lg.load_dout(dout, b, h, go);
      s.noalias() = qs * kc.transpose();
      p.resize(a.Lq, a.Lk);
      for (Index i = 0; i < a.Lq; ++i) {
        C* row = s.data() + i * a.Lk;
        lg.finish_row(b, h, i, 0, row, a.Lk);
        C mx = -std::numeric_limits<C>::infinity();
        for (Index j = 0; j < a.Lk; ++j) mx = std::max(mx, row[j]);
        C sum = 0;
        for (Index j = 0; j < a.Lk; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const bool* kr = lg.keep_row(b, h, i);
        for (Index j = 0; j < a.Lk; ++j) {
          C w = pol.weight(row[j] / sum);
          p(i, j) = w;  // the weights before dropout
          if (kr) w = pol.dropout(w, kr[j * lg.keep_sk()]);
          row[j] = w;  // s now holds P', what multiplies the values
        }
      }
      // dV = P'^T dO
      m.noalias() = s.transpose() * go;
      for (Index j = 0; j < a.Lk; ++j) {
        T* dst = dv + b * a.v_sb + j * a.v_sl + h * a.v_sh;
        for (Index c = 0; c < a.Dv; ++c) dst[c] = static_cast<T>(m(j, c));
      }
      dp.noalias() = go * vc.transpose();
      for (Index i = 0; i < a.Lq; ++i) {
        C* row = dp.data() + i * a.Lk;
        const bool* kr = lg.keep_row(b, h, i);
        if (kr)
          for (Index j = 0; j < a.Lk; ++j) row[j] = kr[j * lg.keep_sk()] ? row[j] * pol.keep_scale() : C(0);
        C delta = 0;
        for (Index j = 0; j < a.Lk; ++j) delta += p(i, j) * row[j];
        for (Index j = 0; j < a.Lk; ++j) row[j] = lg.masked(b, h, i, j) ? C(0) : p(i, j) * (row[j] - delta);
        if (dbias) {  // (the cotangent where the bias meets the logits: after the scale)
          C* db = dbias + a.bias.offset(b, h, i);
          for (Index j = 0; j < a.Lk; ++j) db[j * a.bias.sk] += row[j];
        }
        if constexpr (Policy::kScalesLogits)
          for (Index j = 0; j < a.Lk; ++j) row[j] *= pol.logit_derivative();
      }
      // dp now holds dS, the cotangent of the logits.
      m.noalias() = dp * kc;
      for (Index i = 0; i < a.Lq; ++i) {
        T* dst = dq + b * a.q_sb + i * a.q_sl + h * a.q_sh;
        for (Index c = 0; c < a.D; ++c) dst[c] = static_cast<T>(m(i, c) * dq_scale);
      }
      m.noalias() = dp.transpose() * qs;
      for (Index j = 0; j < a.Lk; ++j) {
        T* dst = dk + b * a.k_sb + j * a.k_sl + h * a.k_sh;
        for (Index c = 0; c < a.D; ++c) dst[c] = static_cast<T>(m(j, c));
      }
    }
  }
}

// One tile product of the backward (see gemm::product): Cm (+)= A B.
template <class P>
inline void tile_product(Index M, Index N, Index K, const simd::scalar_t<P>* A, Index am, Index at,
                         const simd::scalar_t<P>* B, Index bt, simd::scalar_t<P>* Cm, Index cm, bool accumulate) {
  gemm::product<P, gemm::BackwardBlocking<P>::MR, gemm::BackwardBlocking<P>::NR>(
      M, N, K, A, am, at, B, bt, Cm, cm, gemm::ZeroOrLoad{accumulate}, gemm::Store{});
}

// ---------------------------------------------------------------------------------------
// Fused backward. Work units are (b, kv head, key group): each owns its key rows' dK, dV
// and, for each of its key tiles, walks every query head of the kv head's group (the
// kv_group heads reading it; one head without GQA) and their query tiles, recomputing
// S = q.k^T and P = exp(S - m) / l from the forward's row statistics, then
// (FlashAttention-2)
//   dV_j += P'^T dO_i,  dP = (dO_i V_j^T) * keep * multiplier,
//   dS = P * (dP - delta_i) with delta_i = rowsum(dO_i * O_i),
//   dK_j += dS^T qs_i,  dQ_i += dS K_j,
// so that dK and dV are summed over the group inside one unit (no two units meet there)
// and each K, V tile is loaded once for its whole group.
// Index rules (problem.hpp): a tile whose entries are all outside their rows' bands
// (causal, window, key lengths) or masked is skipped, unless a row of it has its max near
// the mask value (a fully masked row is uniform over all keys: its weights reach every
// value, as jax.nn's and Flax's finite fills make it); masked entries get dS = 0. Query
// rows past q_len[b] are not visited: their output is 0 times the row, so no cotangent
// reaches the row (dq 0, nothing to dk, dv, dbias).
// Tiles are held transposed, [keys, query rows], so that SIMD lanes run over query rows:
// the per-row m, l and delta are vectors, and all five products are tile_product over
// operands in place (q and dO are transposed once per head, O(Lq) memory per head of the
// group).
// The split: units are cut into `slots` of consecutive units, each slot run start to end
// by one worker. Heads are split into key groups only when there are fewer (batch, kv
// head) pairs than slots; each group then adds dQ into its own copy, and a bias gradient
// that two slots may meet is accumulated per slot; both are summed in a fixed order
// afterwards. With a.backward_fixed_split, slots and key groups follow from the problem
// alone (kBackwardFixedSlots), so results are equal for every thread count; otherwise
// (the Flax path's split, as its golden gradients were made) one slot per worker.
//   out: the forward's output in C (the output's strides; fused_attention's out_acc for
//   half types); row_max, row_sum: [B, H, Lq] (fused_attention's);
//   dbias: null, or a zeroed accumulator of the bias's own shape.
// (attention_backward_fused's kernel, for packet type P.)
template <class Policy, class P>
void attention_backward_kernel(const AttentionProblem<typename Policy::element_type>& a,
                               const typename Policy::accum_type* out, const typename Policy::accum_type* row_max,
                               const typename Policy::accum_type* row_sum, const typename Policy::element_type* dout,
                               typename Policy::element_type* dq, typename Policy::element_type* dk,
                               typename Policy::element_type* dv, typename Policy::accum_type* dbias, Index block_q,
                               Index block_k) {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  using Vec = Eigen::Array<C, 1, Eigen::Dynamic>;
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold the policy's accum_type");
  const BackwardLogits<Policy> lg(a);
  const Policy& pol = lg.pol;
  Eigen::ThreadPoolInterface* pool = a.pool;
  const Index G = a.kv_group;
  LINEN_ASSERT(G >= 1 && a.H % G == 0);
  const Index HK = a.H / G;   // kv heads
  const Index BK = a.B * HK;  // (batch, kv head) pairs
  const Index nkt = a.Lk == 0 ? 0 : (a.Lk + block_k - 1) / block_k;
  const int avail = pool_workers(pool);
  const Index target = a.backward_fixed_split ? Index{kBackwardFixedSlots} : Index{avail};
  const Index groups = (BK >= target || nkt == 0) ? 1 : std::min<Index>(nkt, (target + BK - 1) / BK);
  const Index units = BK * groups;
  const int slots = static_cast<int>(std::min<Index>(target, std::max<Index>(units, 1)));
  const int workers = std::min(avail, slots);
  const Index HD = a.H * a.D;
  const Index q_size = a.B * a.Lq * HD;  // dq accumulators: [groups][B, Lq, H, D]
  BackwardScratch<C> local;  // when the caller keeps none: this call's
  BackwardScratch<C>& scratch = a.backward_scratch ? *a.backward_scratch : local;
  scratch.dq_acc.assign(static_cast<std::size_t>(groups * q_size), C(0));
  C* const dq_acc = scratch.dq_acc.data();

  // dbias: straight into the caller's accumulator when no two slots can meet there, else
  // one private accumulator per extra slot, summed in slot order at the end.
  const Index bias_size = dbias ? a.bias.size : 0;
  const bool shared_bias = dbias && slots > 1 && !view_rows_disjoint(a.bias, a.B, a.H, a.Lk, groups > 1);
  scratch.bias_private.assign(shared_bias ? static_cast<std::size_t>((slots - 1) * bias_size) : 0, C(0));
  C* const bias_private = scratch.bias_private.data();

  const C dq_scale = pol.query_derivative();
  const auto round_weight = [&pol](C x) { return pol.weight(x); };
  const Index ldt = a.Lq + 64 / static_cast<Index>(sizeof(C));  // row stride of the transposed q, dO
  // Each worker's matrices, carved from its kept buffer: for each head of a group its q and
  // dO (both ways round), delta and 1/l (the group's heads side by side); its tiles (at
  // most bk keys by bq query rows).
  const Index bq = std::min(block_q, a.Lq), bk = std::min(block_k, a.Lk);
  using Kept = KeptMatrices<C>;
  const Index s_qs = static_cast<Index>(Kept::rounded(a.Lq * a.D)), s_qt = static_cast<Index>(Kept::rounded(a.D * ldt));
  const Index s_go = static_cast<Index>(Kept::rounded(a.Lq * a.Dv)), s_gt = static_cast<Index>(Kept::rounded(a.Dv * ldt));
  const Index s_row = static_cast<Index>(Kept::rounded(a.Lq));
  Kept layout;
  for (const Index n : {G * s_qs, G * s_qt, G * s_go, G * s_gt, G * s_row, G * s_row, bk * a.D, bk * a.Dv, bk * a.D,
                        bk * a.Dv, bk * bq, bk * bq, bk * bq, bk * bq})
    layout.reserve(n);
  if (scratch.workers.size() < static_cast<std::size_t>(workers)) scratch.workers.resize(static_cast<std::size_t>(workers));
  using Mat = Eigen::Map<RowMat<C>, Eigen::AlignedMax>;  // aligned as a RowMat of its own
  using VecMap = Eigen::Map<Vec, Eigen::AlignedMax>;

  run_workers(pool, workers, [&](int w) {
    Kept mats = layout;
    mats.start(scratch.workers[static_cast<std::size_t>(w)]);
    C* const qs_p = mats.carve(G * s_qs);
    C* const qt_p = mats.carve(G * s_qt);
    C* const go_p = mats.carve(G * s_go);
    C* const gt_p = mats.carve(G * s_gt);
    C* const delta_p = mats.carve(G * s_row);
    C* const inv_l_p = mats.carve(G * s_row);
    C* const kc_p = mats.carve(bk * a.D);
    C* const vc_p = mats.carve(bk * a.Dv);
    C* const dkj_p = mats.carve(bk * a.D);
    C* const dvj_p = mats.carve(bk * a.Dv);
    C* const st_p = mats.carve(bk * bq);
    C* const pt_p = mats.carve(bk * bq);
    C* const dst_p = mats.carve(bk * bq);
    C* const keep_p = mats.carve(bk * bq);
    const auto [s0, s1] = share(slots, workers, w);
    for (Index slot = s0; slot < s1; ++slot) {
      C* my_bias = !dbias ? nullptr : (shared_bias && slot > 0 ? bias_private + (slot - 1) * bias_size : dbias);
      const auto [u0, u1] = share(units, slots, static_cast<int>(slot));
      Index loaded = -1;
      for (Index u = u0; u < u1; ++u) {
        const Index bkv = u / groups, g = u % groups, b = bkv / HK, kh = bkv % HK;
        const Index rows = a.q_rows(b);  // the rows past q_len[b] take no part
        if (bkv != loaded) {  // the group's queries and output cotangents (both ways round), delta
          for (Index hh = 0; hh < G; ++hh) {
            const Index h = kh * G + hh;
            Mat qs(qs_p + hh * s_qs, a.Lq, a.D), qt(qt_p + hh * s_qt, a.D, ldt);
            Mat go(go_p + hh * s_go, a.Lq, a.Dv), gt(gt_p + hh * s_gt, a.Dv, ldt);
            VecMap delta(delta_p + hh * s_row, a.Lq), inv_l(inv_l_p + hh * s_row, a.Lq);
            lg.load_query(b, h, 0, a.Lq, qs.data());
            lg.load_dout(dout, b, h, go.data());
            // Transposed with a padded row stride: at a power-of-two Lq the rows of a plain
            // transpose would all fall into the same cache sets.
            qt.leftCols(a.Lq) = qs.transpose();
            gt.leftCols(a.Lq) = go.transpose();
            for (Index i = 0; i < rows; ++i) {
              const C* o = out + b * a.o_sb + i * a.o_sl + h * a.o_sh;
              C sum = 0;
              for (Index c = 0; c < a.Dv; ++c) sum += go(i, c) * o[c];
              delta(i) = sum;
              inv_l(i) = C(1) / row_sum[(b * a.H + h) * a.Lq + i];
            }
          }
          loaded = bkv;
        }
        const Index kt0 = nkt * g / groups, kt1 = nkt * (g + 1) / groups;
        for (Index tile = kt0; tile < kt1; ++tile) {
          const Index j0 = tile * block_k, nj = std::min(block_k, a.Lk - j0);
          Mat kc(kc_p, nj, a.D), vc(vc_p, nj, a.Dv);
          lg.load_keys(b, kh, j0, nj, kc.data());  // (K and V's strides address kv heads)
          lg.load_values(b, kh, j0, nj, vc.data());
          Mat dkj(dkj_p, nj, a.D), dvj(dvj_p, nj, a.Dv);
          dkj.setZero();
          dvj.setZero();
          for (Index hh = 0; hh < G; ++hh) {
            const Index h = kh * G + hh, bh = b * a.H + h;
            const C* const qs = qs_p + hh * s_qs;
            const C* const qt = qt_p + hh * s_qt;
            const C* const go = go_p + hh * s_go;
            const C* const gt = gt_p + hh * s_gt;
            const VecMap inv_l(inv_l_p + hh * s_row, a.Lq), delta(delta_p + hh * s_row, a.Lq);
            const C* mrow = row_max + bh * a.Lq;
            for (Index i0 = 0; i0 < rows; i0 += block_q) {
              const Index ni = std::min(block_q, rows - i0);
              if (lg.tile_masked(b, h, i0, ni, j0, nj) &&
                  std::all_of(mrow + i0, mrow + i0 + ni, [](C m) { return Policy::masked_vanish(m); }))
                continue;  // every weight of the tile is 0 and every dS is masked
              const Eigen::Map<const Vec> m_i(mrow + i0, ni);
              const auto l_i = inv_l.segment(i0, ni);
              const auto delta_i = delta.segment(i0, ni);
              // S^T = K_j qs_i^T, then P^T = exp(S^T - m) / l, as the forward normalised it
              Mat st(st_p, nj, ni), pt(pt_p, nj, ni), keep(keep_p, nj, ni), dst(dst_p, nj, ni);
              tile_product<P>(nj, ni, a.D, kc.data(), a.D, 1, qt + i0, ldt, st.data(), ni, false);
              if (lg.finishes()) lg.finish_transposed(b, h, i0, j0, st);
              for (Index k = 0; k < nj; ++k) st.row(k).array() = (st.row(k).array() - m_i).exp() * l_i;
              if (pol.rounds_weights()) st = st.unaryExpr(round_weight);
              const Mat* pd = &st;  // P'^T, what multiplied the values
              if (a.keep) {
                for (Index r = 0; r < ni; ++r) {
                  const bool* kr = lg.keep_row(b, h, i0 + r);
                  for (Index k = 0; k < nj; ++k) keep(k, r) = kr[(j0 + k) * lg.keep_sk()] ? pol.keep_scale() : C(0);
                }
                pt.array() = st.array() * keep.array();
                if (pol.rounds_weights()) pt = pt.unaryExpr(round_weight);
                pd = &pt;
              }
              // dV_j += P'^T dO_i
              tile_product<P>(nj, a.Dv, ni, pd->data(), ni, 1, go + i0 * a.Dv, a.Dv, dvj.data(), a.Dv, true);
              // dP^T = V_j dO_i^T (times the keep factors), dS^T = P^T * (dP^T - delta)
              tile_product<P>(nj, ni, a.Dv, vc.data(), a.Dv, 1, gt + i0, ldt, dst.data(), ni, false);
              if (a.keep) dst.array() *= keep.array();
              for (Index k = 0; k < nj; ++k) dst.row(k).array() = st.row(k).array() * (dst.row(k).array() - delta_i);
              if (lg.masks()) lg.zero_masked_transposed(b, h, i0, j0, dst);
              // dS is the cotangent of the logits after the scale, where the bias meets
              // them: dbias takes it as it is, the product's cotangent times the scale.
              if (my_bias)
                for (Index r = 0; r < ni; ++r) {
                  C* db = my_bias + a.bias.offset(b, h, i0 + r) + j0 * a.bias.sk;
                  for (Index k = 0; k < nj; ++k) db[k * a.bias.sk] += dst(k, r);
                }
              if constexpr (Policy::kScalesLogits) dst *= pol.logit_derivative();
              // dK_j += dS^T qs_i;  dQ_i += dS K_j
              tile_product<P>(nj, a.D, ni, dst.data(), ni, 1, qs + i0 * a.D, a.D, dkj.data(), a.D, true);
              tile_product<P>(ni, a.D, nj, dst.data(), 1, ni, kc.data(), a.D,
                              dq_acc + g * q_size + (b * a.Lq + i0) * HD + h * a.D, HD, true);
            }
          }
          for (Index j = 0; j < nj; ++j) {
            T* kd = dk + b * a.k_sb + (j0 + j) * a.k_sl + kh * a.k_sh;
            for (Index c = 0; c < a.D; ++c) kd[c] = static_cast<T>(dkj(j, c));
            T* vd = dv + b * a.v_sb + (j0 + j) * a.v_sl + kh * a.v_sh;
            for (Index c = 0; c < a.Dv; ++c) vd[c] = static_cast<T>(dvj(j, c));
          }
        }
      }
    }
  });

  // dq = (sum of the groups' accumulators) times the query's derivative; 0 without keys
  // (nothing flows to the values or keys then).
  for (Index b = 0; b < a.B; ++b)
    for (Index i = 0; i < a.Lq; ++i)
      for (Index h = 0; h < a.H; ++h) {
        T* dst = dq + b * a.q_sb + i * a.q_sl + h * a.q_sh;
        const Index e0 = (b * a.Lq + i) * HD + h * a.D;
        for (Index c = 0; c < a.D; ++c) {
          if (nkt == 0) {
            dst[c] = T(0);
            continue;
          }
          C sum = dq_acc[e0 + c];
          for (Index g = 1; g < groups; ++g) sum += dq_acc[g * q_size + e0 + c];
          dst[c] = static_cast<T>(sum * dq_scale);
        }
      }
  for (int slot = 1; shared_bias && slot < slots; ++slot) {
    const C* src = bias_private + (slot - 1) * bias_size;
    for (Index e = 0; e < bias_size; ++e) dbias[e] += src[e];
  }
}

// The fused backward (above). P: the packet type; left at its default, the target's: the
// active level's kernel through linen::dispatch's table when LINEN_DISPATCH is defined,
// else this translation unit's widest packet.
template <class Policy, class P = dispatch::TargetPacket>
void attention_backward_fused(const AttentionProblem<typename Policy::element_type>& a,
                              const typename Policy::accum_type* out, const typename Policy::accum_type* row_max,
                              const typename Policy::accum_type* row_sum, const typename Policy::element_type* dout,
                              typename Policy::element_type* dq, typename Policy::element_type* dk,
                              typename Policy::element_type* dv, typename Policy::accum_type* dbias, Index block_q,
                              Index block_k) {
  if constexpr (std::is_same_v<P, dispatch::TargetPacket>) {
#if defined(LINEN_DISPATCH)
    dispatch::call<dispatch::Backward<Policy>>(a, out, row_max, row_sum, dout, dq, dk, dv, dbias, block_q, block_k);
#else
    attention_backward_kernel<Policy, simd::packet_t<typename Policy::accum_type>>(
        a, out, row_max, row_sum, dout, dq, dk, dv, dbias, block_q, block_k);
#endif
  } else {
    attention_backward_kernel<Policy, P>(a, out, row_max, row_sum, dout, dq, dk, dv, dbias, block_q, block_k);
  }
}

}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_BACKWARD_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: the attention core's gradient kernels, batch dims flattened into B.
//   attention_backward_reference  one head at a time, the [Lq, Lk] weights recomputed with
//                                 exactly the forward's arithmetic and rounding;
//   attention_forward_fused /     FlashAttention-2 style: the forward keeps two numbers per
//   attention_backward_fused      query row (row max m, softmax denominator l; the
//                                 log-sum-exp m + log l in two parts), the backward
//                                 recomputes score tiles [block_q, block_k] from them.
//                                 Working memory O(L) per worker. Tiles are held
//                                 transposed (lanes over query rows) and multiplied by
//                                 gemm::product, a packing-free register-blocked kernel
//                                 over Eigen's packet primitives.
// Layouts are Flax's, row-major: q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, Dv],
// out [B, Lq, H, Dv], row statistics [B, H, Lq].
#ifndef LINEN_DETAIL_GRAD_ATTENTION_HPP
#define LINEN_DETAIL_GRAD_ATTENTION_HPP

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../dot_product_attention.hpp"
#include "../tensor.hpp"
#include "broadcast.hpp"

namespace linen {
namespace detail {

template <class C>
using RowMat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// How many workers a pool offers (1 without one).
inline int pool_workers(Eigen::ThreadPoolInterface* pool) { return pool ? std::max(1, pool->NumThreads()) : 1; }

// Runs fn(w) for every w in [0, workers): w = 0 on the calling thread, the others as tasks
// of `pool`, and returns when all have finished. The first exception a worker threw is
// rethrown here (the others still run to completion first, so no task outlives the call).
template <class F>
void run_workers(Eigen::ThreadPoolInterface* pool, int workers, const F& fn) {
  if (pool == nullptr || workers <= 1) {
    for (int w = 0; w < workers; ++w) fn(w);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(workers));
  Eigen::Barrier done(static_cast<unsigned>(workers - 1));
  for (int w = 1; w < workers; ++w) {
    pool->Schedule([&fn, &errors, &done, w] {
      try {
        fn(w);
      } catch (...) {
        errors[static_cast<std::size_t>(w)] = std::current_exception();
      }
      done.Notify();
    });
  }
  try {
    fn(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  done.Wait();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// [begin, end) of the w-th of `workers` contiguous shares of n items.
inline std::pair<Index, Index> share(Index n, int workers, int w) {
  return {n * w / workers, n * (w + 1) / workers};
}

// ---------------------------------------------------------------------------------------
// A small GEMM without packing, for the fused backward's tile products:
//   Cm[m * cm + n] (+)= sum_t A[m * am + t * at] * B[t * bt + n],  m < M, n < N, t < K,
// B's rows contiguous along n. Register-blocked: MR rows of C by NR packets of n, one
// broadcast of A and NR loads of B per step of t. Eigen's own product would pack the
// [block_q, block_k] weight tiles before each use, which costs about as much as the
// arithmetic at head_dim 64; here every operand is read where it lies.
namespace gemm {

namespace ei = Eigen::internal;
template <class C>
using packet = typename ei::packet_traits<C>::type;
template <class C>
inline constexpr int lanes = ei::unpacket_traits<packet<C>>::size;
// 16 vector registers (AVX2, NEON...): 6 x 2 accumulators; 32 (AVX-512): 8 x 3.
inline constexpr int kMR = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 6;
inline constexpr int kNR = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 3 : 2;

template <class C, int MR, int NR>
inline void micro(Index K, const C* A, Index am, Index at, const C* B, Index bt, C* Cm, Index cm, bool accumulate) {
  using P = packet<C>;
  constexpr int W = lanes<C>;
  P acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n)
      acc[m][n] = accumulate ? ei::ploadu<P>(Cm + m * cm + n * W) : ei::pset1<P>(C(0));
  for (Index t = 0; t < K; ++t) {
    P b[NR];
    for (int n = 0; n < NR; ++n) b[n] = ei::ploadu<P>(B + t * bt + n * W);
    for (int m = 0; m < MR; ++m) {
      const P x = ei::pset1<P>(A[m * am + t * at]);
      for (int n = 0; n < NR; ++n) acc[m][n] = ei::pmadd(x, b[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) ei::pstoreu(Cm + m * cm + n * W, acc[m][n]);
}

// The MR-row blocks of one NR-packet column strip, then the leftover rows one by one.
template <class C, int NR>
inline void strip(Index M, Index K, const C* A, Index am, Index at, const C* B, Index bt, C* Cm, Index cm,
                  bool accumulate) {
  Index m = 0;
  for (; m + kMR <= M; m += kMR) micro<C, kMR, NR>(K, A + m * am, am, at, B, bt, Cm + m * cm, cm, accumulate);
  for (; m < M; ++m) micro<C, 1, NR>(K, A + m * am, am, at, B, bt, Cm + m * cm, cm, accumulate);
}

template <class C>
void product(Index M, Index N, Index K, const C* A, Index am, Index at, const C* B, Index bt, C* Cm, Index cm,
             bool accumulate) {
  constexpr int W = lanes<C>;
  Index n = 0;
  for (; n + kNR * W <= N; n += kNR * W) strip<C, kNR>(M, K, A, am, at, B + n, bt, Cm + n, cm, accumulate);
  for (; n + W <= N; n += W) strip<C, 1>(M, K, A, am, at, B + n, bt, Cm + n, cm, accumulate);
  for (; n < N; ++n)  // the last columns, fewer than a packet
    for (Index m = 0; m < M; ++m) {
      C sum = accumulate ? Cm[m * cm + n] : C(0);
      for (Index t = 0; t < K; ++t) sum += A[m * am + t * at] * B[t * bt + n];
      Cm[m * cm + n] = sum;
    }
}

}  // namespace gemm

// One attention problem as the gradient kernels see it.
template <class T>
struct AttentionCore {
  AttentionDims d;             // d.batch: the caller's batch dims (masks and biases broadcast over them)
  const T* query = nullptr;    // [B, Lq, H, D]
  const T* key = nullptr;      // [B, Lk, H, D]
  const T* value = nullptr;    // [B, Lk, H, Dv]
  ArrayRef<T> bias{};          // broadcastable to [batch..., H, Lq, Lk]
  ArrayRef<bool> mask{};       // broadcastable to [batch..., H, Lq, Lk]
  const bool* keep = nullptr;  // the dropout keep mask drawn by the forward; null: no dropout
  bool broadcast_dropout = true;  // keep is [Lq, Lk] (else [B, H, Lq, Lk])
  double dropout_rate = 0.0;
  bool fp32_softmax = false;   // half types: weights kept in float (force_fp32_for_softmax)
  bool causal = false;         // AttentionOptions::is_causal: key j is visible to query i iff j <= i
};

// The forward's arithmetic on one head's logits, shared by every kernel here so that
// they all see the same numbers: half-type rounding of the product, the bias, the mask.
template <class T>
struct Logits {
  using C = accum_t<T>;
  const AttentionCore<T>& a;
  Broadcast<T> bias;
  Broadcast<bool> mask;
  C lowest;
  T scale;
  C multiplier;  // Flax: keep.astype(dtype) / jnp.asarray(keep_prob, dtype)
  bool round_weights;

  Logits(const AttentionCore<T>& core, const std::string& fn)
      : a(core),
        bias(core.bias, core.d, (fn + ": bias").c_str()),
        mask(core.mask, core.d, (fn + ": mask").c_str()),
        lowest(static_cast<C>(std::numeric_limits<T>::lowest())),
        scale(depth_scale<T>(core.d.D)),
        multiplier(static_cast<C>(static_cast<T>(1) / static_cast<T>(1.0 - core.dropout_rate))),
        round_weights(is_half_type_v<T> && !core.fp32_softmax) {}

  // query / sqrt(depth) rounded to T (Flax divides in dtype), rows [i0, i0 + n) of head (b, h).
  void load_query(Index b, Index h, Index i0, Index n, RowMat<C>& qs) const {
    const AttentionDims& d = a.d;
    qs.resize(n, d.D);
    for (Index i = 0; i < n; ++i) {
      const T* src = a.query + ((b * d.Lq + i0 + i) * d.H + h) * d.D;
      for (Index c = 0; c < d.D; ++c) qs(i, c) = static_cast<C>(static_cast<T>(src[c] / scale));
    }
  }
  // Rows [j0, j0 + n) of head (b, h) of a [B, L, H, width] tensor, in C.
  static void load_rows(const T* src, Index b, Index h, Index j0, Index n, Index L, Index H, Index width,
                        RowMat<C>& dst) {
    dst.resize(n, width);
    for (Index j = 0; j < n; ++j) {
      const T* s = src + ((b * L + j0 + j) * H + h) * width;
      for (Index c = 0; c < width; ++c) dst(j, c) = static_cast<C>(s[c]);
    }
  }
  // Turns raw products q.k of row i, keys [j0, j0 + n), into the logits softmax sees.
  void finish_row(Index b, Index h, Index i, Index j0, C* row, Index n) const {
    if constexpr (is_half_type_v<T>) {  // the einsum's result is stored in dtype
      for (Index j = 0; j < n; ++j) row[j] = static_cast<C>(static_cast<T>(row[j]));
    }
    if (bias) {
      const T* br = bias.row(b, h, i) + j0 * bias.sk;
      for (Index j = 0; j < n; ++j) row[j] = static_cast<C>(static_cast<T>(row[j] + static_cast<C>(br[j * bias.sk])));
    }
    if (mask) {
      const bool* mr = mask.row(b, h, i) + j0 * mask.sk;
      for (Index j = 0; j < n; ++j)
        if (!mr[j * mask.sk]) row[j] = lowest;
    }
    if (a.causal)
      for (Index j = std::max<Index>(i + 1 - j0, 0); j < n; ++j) row[j] = lowest;
  }
  // Whether finish_row / finish_transposed change anything (plain float/double logits need
  // no pass), and whether anything is masked.
  bool finishes() const { return is_half_type_v<T> || bias || mask || a.causal; }
  bool masks() const { return mask || a.causal; }
  // finish_row on a transposed tile t [keys j0.., rows i0..] (the fused kernels' layout).
  void finish_transposed(Index b, Index h, Index i0, Index j0, RowMat<C>& t) const {
    for (Index r = 0; r < t.cols(); ++r) {
      const Index i = i0 + r;
      const T* br = bias ? bias.row(b, h, i) : nullptr;
      const bool* mr = mask ? mask.row(b, h, i) : nullptr;
      for (Index k = 0; k < t.rows(); ++k) {
        const Index j = j0 + k;
        C x = t(k, r);
        if constexpr (is_half_type_v<T>) x = static_cast<C>(static_cast<T>(x));
        if (br) x = static_cast<C>(static_cast<T>(x + static_cast<C>(br[j * bias.sk])));
        if ((mr && !mr[j * mask.sk]) || (a.causal && j > i)) x = lowest;
        t(k, r) = x;
      }
    }
  }
  bool masked(Index b, Index h, Index i, Index j) const {
    return (a.causal && j > i) || (mask && !mask.row(b, h, i)[j * mask.sk]);
  }
  // Whether every logit of the tile rows [i0, i0 + ni) x keys [j0, j0 + nj) is masked
  // (causal or mask), so that its weights are exp(lowest - m) = 0 unless a row's max m is
  // itself near lowest (a row masked everywhere; see skippable_max).
  bool tile_masked(Index b, Index h, Index i0, Index ni, Index j0, Index nj) const {
    if (a.causal && j0 > i0 + ni - 1) return true;
    if (!mask) return false;
    for (Index i = i0; i < i0 + ni; ++i) {
      const bool* mr = mask.row(b, h, i) + j0 * mask.sk;
      const Index jn = a.causal ? std::min(nj, i + 1 - j0) : nj;  // causal part already masked
      for (Index j = 0; j < jn; ++j)
        if (mr[j * mask.sk]) return false;
      if (mask.sq == 0) break;  // every row reads the same mask row
    }
    return true;
  }
  // exp(lowest - m) is exactly 0 in float and double once m > lowest + 1000.
  bool skippable_max(C m) const { return m > lowest + C(1000); }
  // The keep row of query i (keys from 0), or null without dropout.
  const bool* keep_row(Index b, Index h, Index i) const {
    if (!a.keep) return nullptr;
    const AttentionDims& d = a.d;
    return a.keep + (a.broadcast_dropout ? i * d.Lk : ((b * d.H + h) * d.Lq + i) * d.Lk);
  }
  // Offset of bias element (b, h, i, j) in the bias's own row-major layout.
  Index bias_offset(Index b, Index h, Index i) const { return bias.row(b, h, i) - bias.data; }
};

// Whether heads (b, h) and key groups can add into one shared bias gradient without two
// workers touching the same element: true when the bias has its own batch and head dims
// (no broadcasting over them) and, with key groups, its own key dim.
inline bool bias_grad_disjoint(const Shape& bias_shape, const AttentionDims& d, bool key_groups) {
  const Shape w = d.weights_shape();
  const std::vector<Index> s = broadcast_strides(bias_shape, w, "bias");
  const std::size_t nb = d.batch.size();
  for (std::size_t i = 0; i <= nb; ++i)
    if (w[i] > 1 && s[i] == 0) return false;
  if (key_groups && d.Lk > 1 && s[nb + 2] == 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------
// Reference backward: for each (b, h), recompute the weights as the forward did
// (dot_product_attention's arithmetic, rounding included), then
//   dV = P'^T dO,  dP' = dO V^T,  dP = dP' * keep * multiplier,
//   dS = P * (dP - rowsum(P * dP)) (0 where masked),  dbias += dS,
//   dq = dS K / sqrt(depth),  dK = dS^T (q / sqrt(depth)),
// with P the weights before dropout and P' after.
//   dout: [B, Lq, H, Dv]; dq, dk, dv: outputs of the inputs' shapes;
//   dbias: null, or a zeroed accumulator of the bias's own shape.
template <class T>
void attention_backward_reference(const AttentionCore<T>& a, const T* dout, T* dq, T* dk, T* dv,
                                  accum_t<T>* dbias, const std::string& fn) {
  using C = accum_t<T>;
  const AttentionDims& d = a.d;
  const Logits<T> lg(a, fn);
  RowMat<C> qs, kc, vc, go, s, p, dp, m;
  const C inv_scale = C(1) / static_cast<C>(lg.scale);
  for (Index b = 0; b < d.B; ++b) {
    for (Index h = 0; h < d.H; ++h) {
      lg.load_query(b, h, 0, d.Lq, qs);
      Logits<T>::load_rows(a.key, b, h, 0, d.Lk, d.Lk, d.H, d.D, kc);
      Logits<T>::load_rows(a.value, b, h, 0, d.Lk, d.Lk, d.H, d.Dv, vc);
      Logits<T>::load_rows(dout, b, h, 0, d.Lq, d.Lq, d.H, d.Dv, go);
      s.noalias() = qs * kc.transpose();
      p.resize(d.Lq, d.Lk);
      for (Index i = 0; i < d.Lq; ++i) {
        C* row = s.data() + i * d.Lk;
        lg.finish_row(b, h, i, 0, row, d.Lk);
        C mx = -std::numeric_limits<C>::infinity();
        for (Index j = 0; j < d.Lk; ++j) mx = std::max(mx, row[j]);
        C sum = 0;
        for (Index j = 0; j < d.Lk; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const bool* kr = lg.keep_row(b, h, i);
        for (Index j = 0; j < d.Lk; ++j) {
          C w = row[j] / sum;
          if (lg.round_weights) w = static_cast<C>(static_cast<T>(w));
          p(i, j) = w;  // the weights before dropout
          if (kr) {
            w = kr[j] ? w * lg.multiplier : C(0);
            if (lg.round_weights) w = static_cast<C>(static_cast<T>(w));
          }
          row[j] = w;  // s now holds P', what multiplies the values
        }
      }
      // dV = P'^T dO
      m.noalias() = s.transpose() * go;
      for (Index j = 0; j < d.Lk; ++j) {
        T* dst = dv + ((b * d.Lk + j) * d.H + h) * d.Dv;
        for (Index c = 0; c < d.Dv; ++c) dst[c] = static_cast<T>(m(j, c));
      }
      dp.noalias() = go * vc.transpose();
      for (Index i = 0; i < d.Lq; ++i) {
        C* row = dp.data() + i * d.Lk;
        const bool* kr = lg.keep_row(b, h, i);
        if (kr)
          for (Index j = 0; j < d.Lk; ++j) row[j] = kr[j] ? row[j] * lg.multiplier : C(0);
        C delta = 0;
        for (Index j = 0; j < d.Lk; ++j) delta += p(i, j) * row[j];
        for (Index j = 0; j < d.Lk; ++j) row[j] = lg.masked(b, h, i, j) ? C(0) : p(i, j) * (row[j] - delta);
        if (dbias) {
          C* db = dbias + lg.bias_offset(b, h, i);
          for (Index j = 0; j < d.Lk; ++j) db[j * lg.bias.sk] += row[j];
        }
      }
      // dp now holds dS, the cotangent of the logits.
      m.noalias() = dp * kc;
      for (Index i = 0; i < d.Lq; ++i) {
        T* dst = dq + ((b * d.Lq + i) * d.H + h) * d.D;
        for (Index c = 0; c < d.D; ++c) dst[c] = static_cast<T>(m(i, c) * inv_scale);
      }
      m.noalias() = dp.transpose() * qs;
      for (Index j = 0; j < d.Lk; ++j) {
        T* dst = dk + ((b * d.Lk + j) * d.H + h) * d.D;
        for (Index c = 0; c < d.D; ++c) dst[c] = static_cast<T>(m(j, c));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fused forward: per (b, h, query tile), an online softmax over key tiles
// (FlashAttention-2): running max m, running denominator l, output accumulator rescaled
// by exp(m_old - m_new). Writes out [B, Lq, H, Dv] (T), optionally the unrounded output in
// C (`out_acc`, for the backward's rowsum(dO * O) when T is a half type), and the row
// statistics m, l [B, H, Lq]. A fully masked row keeps m = finfo.min, l = Lk: its weights
// exp(s - m) / l = 1 / Lk are Flax's uniform average (m + log l would round back to
// finfo.min and lose them, which is why the two parts are kept apart).
template <class T>
void attention_forward_fused(const AttentionCore<T>& a, T* out, accum_t<T>* out_acc, accum_t<T>* row_max,
                             accum_t<T>* row_sum, Index block_q, Index block_k, Eigen::ThreadPoolInterface* pool,
                             const std::string& fn) {
  using C = accum_t<T>;
  const AttentionDims& d = a.d;
  const Logits<T> lg(a, fn);
  const Index nqt = d.Lq == 0 ? 0 : (d.Lq + block_q - 1) / block_q;
  const Index units = d.B * d.H * nqt;
  const int workers = static_cast<int>(std::min<Index>(pool_workers(pool), std::max<Index>(units, 1)));
  run_workers(pool, workers, [&](int w) {
    // Tiles are held transposed, [keys, query rows], as in the backward: lanes run over
    // query rows, so the running max and sum are vectors and both products are
    // gemm::product over operands in place.
    using Vec = Eigen::Array<C, 1, Eigen::Dynamic>;
    RowMat<C> qs, qt, kc, vc, st, acc;
    Vec mrow, lrow, mnew, alpha;
    const auto [u0, u1] = share(units, workers, w);
    for (Index u = u0; u < u1; ++u) {
      const Index bh = u / nqt, qi = u % nqt, b = bh / d.H, h = bh % d.H;
      const Index i0 = qi * block_q, ni = std::min(block_q, d.Lq - i0);
      lg.load_query(b, h, i0, ni, qs);
      qt = qs.transpose();
      // One pass of the online softmax over the key tiles; returns whether it skipped any.
      const auto pass = [&](bool skip) {
        mrow.setConstant(ni, -std::numeric_limits<C>::infinity());
        lrow.setZero(ni);
        acc.setZero(ni, d.Dv);
        bool skipped = false;
        for (Index j0 = 0; j0 < d.Lk; j0 += block_k) {
          const Index nj = std::min(block_k, d.Lk - j0);
          if (skip && lg.tile_masked(b, h, i0, ni, j0, nj)) {
            skipped = true;
            continue;
          }
          Logits<T>::load_rows(a.key, b, h, j0, nj, d.Lk, d.H, d.D, kc);
          Logits<T>::load_rows(a.value, b, h, j0, nj, d.Lk, d.H, d.Dv, vc);
          st.resize(nj, ni);
          gemm::product<C>(nj, ni, d.D, kc.data(), d.D, 1, qt.data(), ni, st.data(), ni, false);
          if (lg.finishes()) lg.finish_transposed(b, h, i0, j0, st);
          mnew = mrow;
          for (Index k = 0; k < nj; ++k) mnew = mnew.max(st.row(k).array());
          alpha.resize(ni);
          for (Index r = 0; r < ni; ++r) alpha(r) = std::exp(mrow(r) - mnew(r));  // exp(-inf) = 0 at first
          lrow *= alpha;
          for (Index k = 0; k < nj; ++k) {
            auto row = st.row(k).array();
            row = (row - mnew).exp();
            lrow += row;
          }
          mrow = mnew;
          if (a.keep)
            for (Index r = 0; r < ni; ++r) {
              const bool* kr = lg.keep_row(b, h, i0 + r) + j0;
              for (Index k = 0; k < nj; ++k) st(k, r) = kr[k] ? st(k, r) * lg.multiplier : C(0);
            }
          acc.array().colwise() *= alpha.transpose();
          gemm::product<C>(ni, d.Dv, nj, st.data(), 1, ni, vc.data(), d.Dv, acc.data(), d.Dv, true);
        }
        return skipped;
      };
      // Fully masked tiles are skipped. If a row's max then stays near lowest (a row masked
      // everywhere, whose weights are uniform over all keys, skipped ones included), the
      // query tile is computed again without skipping.
      if (pass(true) && !std::all_of(mrow.data(), mrow.data() + ni, [&](C m) { return lg.skippable_max(m); }))
        pass(false);
      for (Index r = 0; r < ni; ++r) {
        const C l = lrow(r);
        const C inv = l > C(0) ? C(1) / l : C(0);  // l = 0 only when there are no keys at all
        const Index o = ((b * d.Lq + i0 + r) * d.H + h) * d.Dv;
        for (Index c = 0; c < d.Dv; ++c) {
          const C v = acc(r, c) * inv;
          out[o + c] = static_cast<T>(v);
          if (out_acc) out_acc[o + c] = v;
        }
        row_max[(b * d.H + h) * d.Lq + i0 + r] = mrow(r);
        row_sum[(b * d.H + h) * d.Lq + i0 + r] = l;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Fused backward. Work units are (b, h, key group): each owns its key rows' dK, dV and
// walks all query tiles, recomputing S = q.k^T and P = exp(S - m) / l from the saved row
// statistics, then (FlashAttention-2)
//   dV_j += P'^T dO_i,  dP = (dO_i V_j^T) * keep * multiplier,
//   dS = P * (dP - delta_i) with delta_i = rowsum(dO_i * O_i),
//   dK_j += dS^T qs_i,  dQ_i += dS K_j.
// Tiles are held transposed, [keys, query rows], so that SIMD lanes run over query rows:
// the per-row m, l and delta are vectors, and all five products are gemm::product over
// operands in place (q and dO are transposed once per head, O(Lq) memory).
// Heads are split into key groups only when there are fewer heads than workers; each
// group then adds dQ into its own copy, summed in a fixed order afterwards, so results do
// not depend on scheduling.
//   out: the forward's output in C [B, Lq, H, Dv]; row_max, row_sum: [B, H, Lq];
//   dbias: null, or a zeroed accumulator of the bias's own shape.
template <class T>
void attention_backward_fused(const AttentionCore<T>& a, const accum_t<T>* out, const accum_t<T>* row_max,
                              const accum_t<T>* row_sum, const T* dout, T* dq, T* dk, T* dv, accum_t<T>* dbias,
                              Index block_q, Index block_k, Eigen::ThreadPoolInterface* pool, const std::string& fn) {
  using C = accum_t<T>;
  using Vec = Eigen::Array<C, 1, Eigen::Dynamic>;
  const AttentionDims& d = a.d;
  const Logits<T> lg(a, fn);
  const Index BH = d.B * d.H;
  const Index nkt = d.Lk == 0 ? 0 : (d.Lk + block_k - 1) / block_k;
  const int avail = pool_workers(pool);
  const Index groups = (BH >= avail || nkt == 0) ? 1 : std::min<Index>(nkt, (avail + BH - 1) / BH);
  const Index units = BH * groups;
  const int workers = static_cast<int>(std::min<Index>(avail, std::max<Index>(units, 1)));
  const Index q_size = d.B * d.Lq * d.H * d.D;
  std::vector<C> dq_acc(static_cast<std::size_t>(groups * q_size), C(0));

  // dbias: straight into the caller's accumulator when no two workers can meet there,
  // else one private accumulator per extra worker, summed in worker order at the end.
  const Index bias_size = dbias ? num_elements(a.bias.shape()) : 0;
  const bool shared_bias = dbias && workers > 1 && !bias_grad_disjoint(a.bias.shape(), d, groups > 1);
  std::vector<C> bias_private(shared_bias ? static_cast<std::size_t>((workers - 1) * bias_size) : 0, C(0));

  const C inv_scale = C(1) / static_cast<C>(lg.scale);
  const Index HD = d.H * d.D;
  const auto round_t = [](C x) { return static_cast<C>(static_cast<T>(x)); };
  const Index ldt = d.Lq + 64 / static_cast<Index>(sizeof(C));  // row stride of the transposed q, dO

  run_workers(pool, workers, [&](int w) {
    C* my_bias = !dbias ? nullptr : (shared_bias && w > 0 ? bias_private.data() + (w - 1) * bias_size : dbias);
    RowMat<C> qs, qt, go, gt, kc, vc, st, pt, dst, keep;
    Vec delta, inv_l;
    const auto [u0, u1] = share(units, workers, w);
    Index loaded_bh = -1;
    for (Index u = u0; u < u1; ++u) {
      const Index bh = u / groups, g = u % groups, b = bh / d.H, h = bh % d.H;
      if (bh != loaded_bh) {  // the head's queries and output cotangent (both ways round), delta
        lg.load_query(b, h, 0, d.Lq, qs);
        Logits<T>::load_rows(dout, b, h, 0, d.Lq, d.Lq, d.H, d.Dv, go);
        // Transposed with a padded row stride: at a power-of-two Lq the rows of a plain
        // transpose would all fall into the same cache sets.
        qt.resize(d.D, ldt);
        gt.resize(d.Dv, ldt);
        qt.leftCols(d.Lq) = qs.transpose();
        gt.leftCols(d.Lq) = go.transpose();
        delta.resize(d.Lq);
        inv_l.resize(d.Lq);
        for (Index i = 0; i < d.Lq; ++i) {
          const C* o = out + ((b * d.Lq + i) * d.H + h) * d.Dv;
          C sum = 0;
          for (Index c = 0; c < d.Dv; ++c) sum += go(i, c) * o[c];
          delta(i) = sum;
          inv_l(i) = C(1) / row_sum[bh * d.Lq + i];
        }
        loaded_bh = bh;
      }
      const C* mrow = row_max + bh * d.Lq;
      const Index kt0 = nkt * g / groups, kt1 = nkt * (g + 1) / groups;
      for (Index tile = kt0; tile < kt1; ++tile) {
        const Index j0 = tile * block_k, nj = std::min(block_k, d.Lk - j0);
        Logits<T>::load_rows(a.key, b, h, j0, nj, d.Lk, d.H, d.D, kc);
        Logits<T>::load_rows(a.value, b, h, j0, nj, d.Lk, d.H, d.Dv, vc);
        RowMat<C> dkj = RowMat<C>::Zero(nj, d.D), dvj = RowMat<C>::Zero(nj, d.Dv);
        for (Index i0 = 0; i0 < d.Lq; i0 += block_q) {
          const Index ni = std::min(block_q, d.Lq - i0);
          if (lg.tile_masked(b, h, i0, ni, j0, nj) &&
              std::all_of(mrow + i0, mrow + i0 + ni, [&](C m) { return lg.skippable_max(m); }))
            continue;  // every weight of the tile is 0 and every dS is masked
          const Eigen::Map<const Vec> m_i(mrow + i0, ni);
          const auto l_i = inv_l.segment(i0, ni);
          const auto delta_i = delta.segment(i0, ni);
          // S^T = K_j qs_i^T, then P^T = exp(S^T - m) / l, as the forward normalised it
          st.resize(nj, ni);
          gemm::product<C>(nj, ni, d.D, kc.data(), d.D, 1, qt.data() + i0, ldt, st.data(), ni, false);
          if (lg.finishes()) lg.finish_transposed(b, h, i0, j0, st);
          for (Index k = 0; k < nj; ++k) st.row(k).array() = (st.row(k).array() - m_i).exp() * l_i;
          if (lg.round_weights) st = st.unaryExpr(round_t);
          const RowMat<C>* pd = &st;  // P'^T, what multiplied the values
          if (a.keep) {
            keep.resize(nj, ni);
            for (Index r = 0; r < ni; ++r) {
              const bool* kr = lg.keep_row(b, h, i0 + r) + j0;
              for (Index k = 0; k < nj; ++k) keep(k, r) = kr[k] ? lg.multiplier : C(0);
            }
            pt.array() = st.array() * keep.array();
            if (lg.round_weights) pt = pt.unaryExpr(round_t);
            pd = &pt;
          }
          // dV_j += P'^T dO_i
          gemm::product<C>(nj, d.Dv, ni, pd->data(), ni, 1, go.data() + i0 * d.Dv, d.Dv, dvj.data(), d.Dv, true);
          // dP^T = V_j dO_i^T (times the keep factors), dS^T = P^T * (dP^T - delta)
          dst.resize(nj, ni);
          gemm::product<C>(nj, ni, d.Dv, vc.data(), d.Dv, 1, gt.data() + i0, ldt, dst.data(), ni, false);
          if (a.keep) dst.array() *= keep.array();
          for (Index k = 0; k < nj; ++k) dst.row(k).array() = st.row(k).array() * (dst.row(k).array() - delta_i);
          if (lg.masks())
            for (Index r = 0; r < ni; ++r)
              for (Index k = 0; k < nj; ++k)
                if (lg.masked(b, h, i0 + r, j0 + k)) dst(k, r) = C(0);
          if (my_bias)
            for (Index r = 0; r < ni; ++r) {
              C* db = my_bias + lg.bias_offset(b, h, i0 + r) + j0 * lg.bias.sk;
              for (Index k = 0; k < nj; ++k) db[k * lg.bias.sk] += dst(k, r);
            }
          // dK_j += dS^T qs_i;  dQ_i += dS K_j
          gemm::product<C>(nj, d.D, ni, dst.data(), ni, 1, qs.data() + i0 * d.D, d.D, dkj.data(), d.D, true);
          gemm::product<C>(ni, d.D, nj, dst.data(), 1, ni, kc.data(), d.D,
                           dq_acc.data() + g * q_size + (b * d.Lq + i0) * HD + h * d.D, HD, true);
        }
        for (Index j = 0; j < nj; ++j) {
          T* kd = dk + ((b * d.Lk + j0 + j) * d.H + h) * d.D;
          for (Index c = 0; c < d.D; ++c) kd[c] = static_cast<T>(dkj(j, c));
          T* vd = dv + ((b * d.Lk + j0 + j) * d.H + h) * d.Dv;
          for (Index c = 0; c < d.Dv; ++c) vd[c] = static_cast<T>(dvj(j, c));
        }
      }
    }
  });

  if (nkt == 0) {  // no keys: nothing flows to the values or keys, and q's cotangent is 0
    std::fill(dq, dq + q_size, T(0));
  } else {
    for (Index e = 0; e < q_size; ++e) {
      C sum = dq_acc[static_cast<std::size_t>(e)];
      for (Index g = 1; g < groups; ++g) sum += dq_acc[static_cast<std::size_t>(g * q_size + e)];
      dq[e] = static_cast<T>(sum * inv_scale);
    }
  }
  for (int w = 1; shared_bias && w < workers; ++w) {
    const C* src = bias_private.data() + (w - 1) * bias_size;
    for (Index e = 0; e < bias_size; ++e) dbias[e] += src[e];
  }
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GRAD_ATTENTION_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: the backward passes of DenseGeneral and LayerNorm over raw row-major memory,
// with the forward's promotion rules (Flax's promote_dtype: inputs and parameters cast to
// the module's dtype T, products accumulated in accum_t<T>; LayerNorm statistics in at
// least float32).
#ifndef LINEN_DETAIL_GRAD_LAYERS_HPP
#define LINEN_DETAIL_GRAD_LAYERS_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../tensor.hpp"
#include "grad_attention.hpp"  // RowMat, KeptMatrices, run_workers, share
#include "normalization.hpp"   // norm_stat_t, norm_rsqrt

namespace linen {
namespace detail {

// dense_backward's buffers, kept by the caller between calls (null: the call's own): the
// promoted copies of half types and, per worker, products on their way to P or I.
template <class C>
struct DenseBackwardScratch {
  std::vector<C> x, dy, kernel;
  std::vector<std::vector<C>> workers;  // per worker: products before their cast, bias sums
  std::vector<std::vector<C>> packing;  // per worker: Eigen's GEMM packing buffers
  std::size_t bytes() const {
    std::size_t n = (x.capacity() + dy.capacity() + kernel.capacity()) * sizeof(C) +
                    (workers.capacity() + packing.capacity()) * sizeof(std::vector<C>);
    for (const auto& w : workers) n += w.capacity() * sizeof(C);
    for (const auto& w : packing) n += w.capacity() * sizeof(C);
    return n;
  }
};

// Eigen's GEMM blocking with its packing buffers carved from a kept buffer (64-byte
// aligned, as Eigen's own) instead of the heap; the block sizes are Eigen's.
template <class Blocking, class C>
struct KeptBlocking : Blocking {
  KeptBlocking(Index rows, Index cols, Index depth, std::vector<C>& buf) : Blocking(rows, cols, depth, 1, true) {
    const Index size_a = this->mc() * this->kc(), size_b = this->kc() * this->nc();  // as the GEMM sizes them
    KeptMatrices<C> kept;
    kept.reserve(size_a);
    kept.reserve(size_b);
    kept.start(buf);
    this->m_blockA = kept.carve(size_a);
    this->m_blockB = kept.carve(size_b);
  }
  ~KeptBlocking() {  // the memory is the buffer's
    this->m_blockA = nullptr;
    this->m_blockB = nullptr;
  }
  KeptBlocking(const KeptBlocking&) = delete;
  KeptBlocking& operator=(const KeptBlocking&) = delete;
};

// dst = lhs * rhs (or dst += lhs * rhs with `add`), computed exactly as Eigen's
// `dst.noalias() (+)= lhs * rhs` computes it (Eigen 3.4's GemmProduct: the coefficient-
// based product for tiny sizes, GEMV for a vector, else its GEMM with its own blocking),
// except that the GEMM's packing buffers come from `packing` rather than the heap.
template <class Dst, class Lhs, class Rhs, class C>
void kept_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs, bool add, std::vector<C>& packing) {
  namespace ei = Eigen::internal;
  using D = std::remove_reference_t<Dst>;
  using Scalar = typename Eigen::Product<Lhs, Rhs>::Scalar;
  using Impl = ei::generic_product_impl<Lhs, Rhs, Eigen::DenseShape, Eigen::DenseShape, Eigen::GemmProduct>;
  static_assert(std::is_same_v<Scalar, C>, "linen: internal: kept_product's buffer type");
  const bool lazy = (rhs.rows() + dst.rows() + dst.cols()) < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD && rhs.rows() > 0;
  if (lazy || dst.cols() == 1 || dst.rows() == 1 || lhs.cols() == 0 || lhs.rows() == 0 || rhs.cols() == 0) {
    if (add) dst.noalias() += lhs * rhs;  // nothing on the heap at these sizes
    else dst.noalias() = lhs * rhs;
    return;
  }
  if (!add) dst.setZero();  // evalTo's, before its scaleAndAddTo
  // Impl::scaleAndAddTo's GEMM branch with KeptBlocking for its BlockingType.
  using LhsBlas = typename Impl::LhsBlasTraits;
  using RhsBlas = typename Impl::RhsBlasTraits;
  using ActualLhs = typename Impl::ActualLhsTypeCleaned;
  using ActualRhs = typename Impl::ActualRhsTypeCleaned;
  typename ei::add_const_on_value_type<typename Impl::ActualLhsType>::type a = LhsBlas::extract(lhs);
  typename ei::add_const_on_value_type<typename Impl::ActualRhsType>::type b = RhsBlas::extract(rhs);
  const Scalar alpha = ei::combine_scalar_factors(Scalar(1), lhs, rhs);
  using Blocking = ei::gemm_blocking_space<(D::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor,
                                           typename Lhs::Scalar, typename Rhs::Scalar, D::MaxRowsAtCompileTime,
                                           D::MaxColsAtCompileTime, Impl::MaxDepthAtCompileTime>;
  using Functor = ei::gemm_functor<
      Scalar, Index,
      ei::general_matrix_matrix_product<
          Index, typename Lhs::Scalar, (ActualLhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor,
          bool(LhsBlas::NeedToConjugate), typename Rhs::Scalar,
          (ActualRhs::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor, bool(RhsBlas::NeedToConjugate),
          (D::Flags & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor, D::InnerStrideAtCompileTime>,
      ActualLhs, ActualRhs, D, Blocking>;
  KeptBlocking<Blocking, C> blocking(dst.rows(), dst.cols(), a.cols(), packing);
  ei::parallelize_gemm<(D::MaxRowsAtCompileTime > 32 || D::MaxRowsAtCompileTime == Eigen::Dynamic)>(
      Functor(a, b, dst, alpha, blocking), lhs.rows(), rhs.cols(), lhs.cols(), D::Flags & Eigen::RowMajorBit);
}

// A C matrix view of rows x cols elements of X, read as Flax's promotion reads them
// (X -> T -> C). No copy when X and C are the same type; else into `storage`, carved on
// a 64-byte boundary (as Eigen aligns its own matrices).
template <class T, class C, class X>
Eigen::Map<const RowMat<C>> promoted_view(const X* p, Index rows, Index cols, std::vector<C>& storage) {
  if constexpr (std::is_same_v<X, C> && std::is_same_v<X, T>) {
    (void)storage;
    return Eigen::Map<const RowMat<C>>(p, rows, cols);
  } else {
    KeptMatrices<C> kept;
    kept.reserve(rows * cols);
    kept.start(storage);
    C* dst = kept.carve(rows * cols);
    for (Index i = 0; i < rows * cols; ++i) dst[i] = static_cast<C>(static_cast<T>(p[i]));
    return Eigen::Map<const RowMat<C>>(dst, rows, cols);
  }
}

// The backward of y[M, out] = x[M, in] . kernel[in, out] + bias[out] (DenseGeneral with
// its contracted dims and feature dims each flattened).
//   x: the input as the forward used it, already in T; dy: [M, out].
//   dkernel: [in, out]; dbias: [out] or null (no bias);
//   dx: [M, in] or null (not wanted); with add_dx the input cotangent is added to dx.
//   scratch: kept buffers (null: the call's own); with one, a call without a pool
//   allocates nothing once they have grown (Eigen's GEMM packing buffers included).
// The products are Eigen's (kept_product), bit for bit.
// Columns of dkernel and rows of dx are shared among the pool's workers.
template <class T, class P, class I>
void dense_backward(const T* x, Index M, Index in, Index out, const P* kernel, const T* dy, P* dkernel, P* dbias,
                    I* dx, Eigen::ThreadPoolInterface* pool, bool add_dx = false,
                    DenseBackwardScratch<accum_t<T>>* scratch = nullptr) {
  using C = accum_t<T>;
  using Mat = Eigen::Map<RowMat<C>, Eigen::AlignedMax>;
  using RowVec = Eigen::Map<Eigen::Matrix<C, 1, Eigen::Dynamic>, Eigen::AlignedMax>;
  DenseBackwardScratch<C> local;
  DenseBackwardScratch<C>& s = scratch ? *scratch : local;
  const auto xm = promoted_view<T, C>(x, M, in, s.x);
  const auto dym = promoted_view<T, C>(dy, M, out, s.dy);
  const auto km = promoted_view<T, C>(kernel, in, out, s.kernel);
  const int workers = static_cast<int>(std::min<Index>(pool_workers(pool), std::max<Index>({out, M, Index(1)})));
  if (s.workers.size() < static_cast<std::size_t>(workers)) s.workers.resize(static_cast<std::size_t>(workers));
  if (s.packing.size() < static_cast<std::size_t>(workers)) s.packing.resize(static_cast<std::size_t>(workers));
  run_workers(pool, workers, [&](int w) {
    const auto [c0, c1] = share(out, workers, w);
    const auto [r0, r1] = share(M, workers, w);
    // This worker's products before their cast, and its bias sums.
    KeptMatrices<C> kept;
    if constexpr (!std::is_same_v<P, C>) kept.reserve(in * (c1 - c0));
    if constexpr (!std::is_same_v<I, C>) kept.reserve((r1 - r0) * in);
    kept.reserve(c1 - c0);
    kept.start(s.workers[static_cast<std::size_t>(w)]);
    std::vector<C>& packing = s.packing[static_cast<std::size_t>(w)];
    if (c1 > c0) {
      if constexpr (std::is_same_v<P, C>) {  // straight into the caller's buffer
        Eigen::Map<RowMat<C>> dk(dkernel, in, out);
        kept_product(dk.middleCols(c0, c1 - c0), xm.transpose(), dym.middleCols(c0, c1 - c0), false, packing);
      } else {
        Mat g(kept.carve(in * (c1 - c0)), in, c1 - c0);
        kept_product(g, xm.transpose(), dym.middleCols(c0, c1 - c0), false, packing);
        for (Index i = 0; i < in; ++i)
          for (Index c = c0; c < c1; ++c) dkernel[i * out + c] = static_cast<P>(g(i, c - c0));
      }
      if (dbias) {
        RowVec sb(kept.carve(c1 - c0), c1 - c0);
        sb = dym.middleCols(c0, c1 - c0).colwise().sum();
        for (Index c = c0; c < c1; ++c) dbias[c] = static_cast<P>(sb(c - c0));
      }
    }
    if (dx) {
      if (r1 > r0) {
        if constexpr (std::is_same_v<I, C>) {
          Eigen::Map<RowMat<C>> dxm(dx, M, in);
          kept_product(dxm.middleRows(r0, r1 - r0), dym.middleRows(r0, r1 - r0), km.transpose(), add_dx, packing);
        } else {
          Mat g(kept.carve((r1 - r0) * in), r1 - r0, in);
          kept_product(g, dym.middleRows(r0, r1 - r0), km.transpose(), false, packing);
          for (Index r = r0; r < r1; ++r)
            for (Index i = 0; i < in; ++i)
              dx[r * in + i] = static_cast<I>(add_dx ? static_cast<C>(dx[r * in + i]) + g(r - r0, i) : g(r - r0, i));
        }
      }
    }
  });
}

// The backward of LayerNorm's y = (x - mean) * (rsqrt(var + eps) * scale) + bias over rows
// of f features, var = max(0, E[x^2] - mean^2) (fast variance; jnp.maximum's derivative,
// 1 above 0, 1/2 at 0, 0 below) or E[(x - mean)^2].
//   x: [rows, f]; dy: [rows, f]; scale: [f] or null (use_scale=false);
//   dx: [rows, f] or null; dscale, dbias: [f] accumulators (added to) or null.
//   scratch: a kept buffer for the row's scaled cotangent (null: the call's own).
template <class T, class I, class P, class S = norm_stat_t<T, I>>
void layer_norm_backward(const I* x, Index rows, Index f, double epsilon, bool fast_variance, const P* scale,
                         const T* dy, I* dx, S* dscale, S* dbias, std::vector<S>* scratch = nullptr) {
  if (f == 0) return;
  const S n = static_cast<S>(f);
  std::vector<S> local;
  std::vector<S>& g = scratch ? *scratch : local;
  g.resize(static_cast<std::size_t>(f));
  for (Index r = 0; r < rows; ++r) {
    const I* xr = x + r * f;
    const T* gr = dy + r * f;
    S m1 = 0, m2 = 0;
    for (Index j = 0; j < f; ++j) {
      const S v = static_cast<S>(xr[j]);
      m1 += v;
      m2 += v * v;
    }
    const S mean = m1 / n;
    S var = 0, clip = 1;
    if (fast_variance) {
      const S raw = m2 / n - mean * mean;
      var = std::max(S(0), raw);
      clip = raw > S(0) ? S(1) : (raw == S(0) ? S(0.5) : S(0));
    } else {
      for (Index j = 0; j < f; ++j) {
        const S c = static_cast<S>(xr[j]) - mean;
        var += c * c;
      }
      var /= n;
    }
    const S rs = norm_rsqrt(var, epsilon);
    S dr = 0, sum_g = 0;
    for (Index j = 0; j < f; ++j) {
      const S gy = static_cast<S>(gr[j]);
      const S c = static_cast<S>(xr[j]) - mean;
      if (dscale) dscale[j] += gy * c * rs;
      if (dbias) dbias[j] += gy;
      const S gj = scale ? gy * static_cast<S>(scale[j]) : gy;
      g[static_cast<std::size_t>(j)] = gj;
      dr += gj * c;
      sum_g += gj;
    }
    if (!dx) continue;
    const S dvar = dr * S(-0.5) * rs * rs * rs;
    if (fast_variance) {
      // var = E[x^2] - mean^2: d/dx_j = (2 x_j - 2 mean) / n through both moments.
      const S dm2 = dvar * clip;
      const S dmean = -rs * sum_g - S(2) * mean * dm2;
      for (Index j = 0; j < f; ++j)
        dx[r * f + j] = static_cast<I>(g[static_cast<std::size_t>(j)] * rs + dmean / n +
                                       dm2 * S(2) * static_cast<S>(xr[j]) / n);
    } else {
      S sum_c = 0;
      for (Index j = 0; j < f; ++j) sum_c += static_cast<S>(xr[j]) - mean;
      const S dmean = -rs * sum_g - S(2) * dvar * sum_c / n;
      for (Index j = 0; j < f; ++j)
        dx[r * f + j] = static_cast<I>(g[static_cast<std::size_t>(j)] * rs + dmean / n +
                                       dvar * S(2) * (static_cast<S>(xr[j]) - mean) / n);
    }
  }
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GRAD_LAYERS_HPP

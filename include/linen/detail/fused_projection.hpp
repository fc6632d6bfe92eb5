// SPDX-License-Identifier: Apache-2.0
//
// Internal: the modules' projections on a thread pool.
//   project_rows:  y[M, N] = x[M, K] w[K, N] (+ bias[N]), row blocks spread over a thread
//                  pool, each block one Eigen product on the calling thread's share.
// float and double only (T = accum_t<T>): half types follow DenseGeneral's dtype promotion
// and rounding, which this helper does not restate.
#ifndef LINEN_DETAIL_FUSED_PROJECTION_HPP
#define LINEN_DETAIL_FUSED_PROJECTION_HPP

#include <algorithm>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"
#include "fused_attention.hpp"

namespace linen {
namespace detail {

// y[M, N] = x[M, K] w[K, N] + bias[N] (bias may be null). Row-major, with row strides ldx,
// ldw, ldy (elements). Rows go to pool->NumThreads() threads in blocks of at least 64 rows
// (null pool: the calling thread). Eigen's product on each block, so each block gives the
// bits the single-threaded product gives for those rows.
template <class T>
void project_rows(Eigen::ThreadPoolInterface* pool, Index M, Index K, Index N, const T* x, Index ldx, const T* w,
                  Index ldw, const T* bias, T* y, Index ldy) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: project_rows is for float and double");
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
  using OMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
  if (M <= 0 || N <= 0) return;
  const int threads = pool ? std::max(1, pool->NumThreads()) : 1;
  const Index block = std::max<Index>(64, (M + 2 * threads - 1) / (2 * threads));
  const Index blocks = (M + block - 1) / block;
  const CMap wm(w, K, N, Eigen::OuterStride<>(ldw));
  parallel_for_dynamic(pool, static_cast<int>(std::min<Index>(threads, blocks)), blocks, [&](int, Index i) {
    const Index r0 = i * block, rows = std::min(block, M - r0);
    OMap ym(y + r0 * ldy, rows, N, Eigen::OuterStride<>(ldy));
    ym.noalias() = CMap(x + r0 * ldx, rows, K, Eigen::OuterStride<>(ldx)) * wm;
    if (bias) ym.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, N);
  });
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_FUSED_PROJECTION_HPP

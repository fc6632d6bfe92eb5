// SPDX-License-Identifier: Apache-2.0
//
// Internal: the modules' projections on a thread pool, with linen's GEMM (or CBLAS in a
// LINEN_USE_BLAS build: detail/gemm/product.hpp).
//   project_rows:  y[M, N] = x[M, K] w[K, N] (+ bias[N])
//   project_qkv:   the q, k, v projections of one input as one GEMM (x packed once for
//                  the three column groups)
// float and double only (T = accum_t<T>): half types follow DenseGeneral's dtype promotion
// and rounding, which these helpers do not restate.
#ifndef LINEN_DETAIL_FUSED_PROJECTION_HPP
#define LINEN_DETAIL_FUSED_PROJECTION_HPP

#include <type_traits>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"
#include "gemm/product.hpp"

namespace linen {
namespace detail {

// y[M, N] = x[M, K] w[K, N] + bias[N] (bias may be null). Row-major, with row strides ldx,
// ldw, ldy (elements). The GEMM's row blocks go to pool->NumThreads() threads (null pool:
// the calling thread); with linen's GEMM the bits do not depend on the pool.
template <class T>
void project_rows(Eigen::ThreadPoolInterface* pool, Index M, Index K, Index N, const T* x, Index ldx, const T* w,
                  Index ldw, const T* bias, T* y, Index ldy) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: project_rows is for float and double");
  gemm::multiply<T>(M, N, K, x, ldx, w, ldw, bias, y, ldy, pool);
}

// y[g][M, n[g]] = x[M, K] w[g][K, n[g]] + bias[g] for g < 3 (a bias may be null), every
// operand dense (row strides K and n[g]): what three project_rows calls give (with
// linen's GEMM, bit for bit).
template <class T>
void project_qkv(Eigen::ThreadPoolInterface* pool, Index M, Index K, const T* x, const T* const (&w)[3],
                 const Index (&n)[3], const T* const (&bias)[3], T* const (&y)[3]) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: project_qkv is for float and double");
  gemm::Output<T> outs[3];
  for (int g = 0; g < 3; ++g) outs[g] = {w[g], n[g], n[g], bias[g], y[g], n[g]};
  gemm::multiply_outputs<T>(M, K, x, K, outs, 3, pool);
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_FUSED_PROJECTION_HPP

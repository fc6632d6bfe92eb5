// SPDX-License-Identifier: Apache-2.0
//
// Internal: the optional CBLAS route for the projections' products, compiled only when
// the build defines LINEN_HAS_CBLAS (CMake: -DLINEN_USE_BLAS=ON, which finds a BLAS
// library, OpenBLAS or any other with the C interface, and links it). Never part of the
// default build.
//   cblas_gemm<T>(M, N, K, A, lda, B, ldb, bias, C, ldc)
//       C[M, N] = A[M, K] B[K, N] (+ bias[N]), row-major, on the calling thread's share
//       (the BLAS library may start threads of its own: OpenBLAS honours
//       OPENBLAS_NUM_THREADS=1; linen splits rows over the caller's pool itself).
// The library sums in its own order: results differ from linen's GEMM by rounding only.
#ifndef LINEN_DETAIL_GEMM_CBLAS_HPP
#define LINEN_DETAIL_GEMM_CBLAS_HPP

#if !defined(LINEN_HAS_CBLAS)
#error "linen: detail/gemm/cblas.hpp needs LINEN_HAS_CBLAS (configure with -DLINEN_USE_BLAS=ON)"
#endif

#include <type_traits>

#include <cblas.h>

#include "../../config.hpp"
#include "../../tensor.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

template <class T>
void cblas_gemm(Index M, Index N, Index K, const T* A, Index lda, const T* B, Index ldb, const T* bias, T* C,
                Index ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: cblas_gemm is for float and double");
  if (M <= 0 || N <= 0) return;
  // The bias first, then C = A B + 1 * C: one pass over C.
  for (Index i = 0; i < M; ++i)
    for (Index j = 0; j < N; ++j) C[i * ldc + j] = bias ? bias[j] : T(0);
  if (K <= 0) return;
  const T beta = bias ? T(1) : T(0);
  // The C interface's sizes are int (LP64 builds; multiply() in product.hpp keeps larger
  // ones on linen's GEMM).
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, A, la, B, lb, beta, C, lc);
  } else {
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0, A, la, B, lb, beta, C, lc);
  }
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_CBLAS_HPP

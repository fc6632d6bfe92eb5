// SPDX-License-Identifier: Apache-2.0
//
// Internal: the products DenseGeneral and the modules' projections call, routed to one
// backend:
//   multiply<T>(M, N, K, A, lda, B, ldb, bias, C, ldc, pool)
//       C[M, N] = A[M, K] B[K, N] (+ bias[N]; bias may be null), row-major
//   multiply_outputs<T>(M, K, A, lda, outs, count, pool)
//       the same for column groups sharing A (gemm.hpp's Output)
//   multiply_rows<T>(M, N, K, A, lda, B, ldb, bias, C, ldc, pool)
//       the same product for the few rows of a decode step (DenseGeneral's by_row): linen's
//       GEMV (gemv.hpp) up to kGemvMaxRows rows, linen's GEMM past them, never CBLAS; the
//       two give the same bits, so a row's result does not depend on how many rows came
//       with it, nor on the pool
//   pair_products()
//       whether the bfloat16 pair products below run (vdpbf16ps: with linen::dispatch,
//       the active level is avx512_bf16; header-only, this translation unit targets it)
//   pair_gemm()
//       whether DenseGeneral's bfloat16 GEMM takes multiply_pairs: pair_products() where
//       they are the faster product (pair_preference.hpp: AMD; elsewhere the float GEMM of
//       the widened operands, the same bits); the decode step's pair GEMV runs wherever
//       pair_products()
//   multiply_pairs(M, N, K, A, lda, B, ldb, C, ldc, pool)
//       C[M, N] (float) = A[M, K] B[K, N], both bfloat16 (gemm/pairs.hpp's gemm_pairs)
//   multiply_pair_panels(M, N, K, x, ldx, panels, y, ldy, pool)
//       y[M, N] (float) = x[M, K] W, W kept in pair panels (pair_panels.hpp; gemv_pairs)
//   Both give the fmadd chain of the float products over the widened operands (pairs.hpp).
// By default linen's own GEMM (gemm.hpp; the bits do not depend on the pool), with
// linen::dispatch the active level's (detail/dispatch.hpp), else this translation unit's. A build
// with LINEN_HAS_CBLAS (CMake option LINEN_USE_BLAS) calls cblas_sgemm / cblas_dgemm
// instead, rows split over the pool in blocks (each block on one worker; run the BLAS
// library's own threads off, e.g. OPENBLAS_NUM_THREADS=1, or it oversubscribes); then
// the bits depend on the library and may depend on the split.
#ifndef LINEN_DETAIL_GEMM_PRODUCT_HPP
#define LINEN_DETAIL_GEMM_PRODUCT_HPP

#include <algorithm>
#include <limits>
#include <type_traits>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../parallel.hpp"
#include "../dispatch.hpp"
#include "gemm.hpp"
#include "gemv.hpp"
#include "pair_preference.hpp"
#include "pairs.hpp"
#if defined(LINEN_HAS_CBLAS)
#include "cblas.hpp"
#endif

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

template <class T>
void multiply_outputs(Index M, Index K, const T* A, Index lda, const Output<T>* outs, int count,
                      Eigen::ThreadPoolInterface* pool = nullptr) {
#if defined(LINEN_HAS_CBLAS)
  constexpr Index kIntMax = std::numeric_limits<int>::max();
  bool fits = M <= kIntMax && K <= kIntMax && lda <= kIntMax;
  double columns = 0;
  for (int g = 0; g < count; ++g) {
    fits = fits && outs[g].n <= kIntMax && outs[g].ldb <= kIntMax && outs[g].ldc <= kIntMax;
    columns += static_cast<double>(std::max<Index>(outs[g].n, 0));
  }
  if (fits && M > 0) {
    const double flops = static_cast<double>(M) * static_cast<double>(K) * columns;
    const int threads = flops >= kParallelMinFlops ? pool_workers(pool) : 1;
    const Index block = std::max<Index>(64, (M + 2 * threads - 1) / (2 * threads));
    const Index blocks = (M + block - 1) / block;
    parallel_for(pool, static_cast<int>(std::min<Index>(threads, blocks)), blocks, [&](int, Index i) {
      const Index r0 = i * block, rows = std::min(block, M - r0);
      for (int g = 0; g < count; ++g) {
        const Output<T>& o = outs[g];
        cblas_gemm<T>(rows, o.n, K, A + r0 * lda, lda, o.B, o.ldb, o.bias, o.C + r0 * o.ldc, o.ldc);
      }
    });
    return;
  }
#endif
#if defined(LINEN_DISPATCH)
  dispatch::call<dispatch::Gemm<T>>(M, K, A, lda, outs, count, pool);  // the active level's gemm_outputs
#else
  gemm_outputs<T>(M, K, A, lda, outs, count, pool);
#endif
}

template <class T>
void multiply(Index M, Index N, Index K, const T* A, Index lda, const T* B, Index ldb, const T* bias, T* C, Index ldc,
              Eigen::ThreadPoolInterface* pool = nullptr) {
  const Output<T> out{B, ldb, N, bias, C, ldc};
  multiply_outputs<T>(M, K, A, lda, &out, 1, pool);
}

// The most rows multiply_rows gives the GEMV (each group of kGemvGroupRows rows reads the
// kernel once; the GEMM reads it, writes it packed and reads that back).
inline constexpr Index kGemvMaxRows = 8;

template <class T>
void multiply_rows(Index M, Index N, Index K, const T* A, Index lda, const T* B, Index ldb, const T* bias, T* C,
                   Index ldc, Eigen::ThreadPoolInterface* pool = nullptr) {
  if (M > kGemvMaxRows) {
    const Output<T> out{B, ldb, N, bias, C, ldc};
#if defined(LINEN_DISPATCH)
    dispatch::call<dispatch::Gemm<T>>(M, K, A, lda, &out, 1, pool);
#else
    gemm_outputs<T>(M, K, A, lda, &out, 1, pool);
#endif
    return;
  }
#if defined(LINEN_DISPATCH)
  dispatch::call<dispatch::Gemv<T>>(M, N, K, A, lda, B, ldb, bias, C, ldc, pool);  // the active level's gemv
#else
  gemv<T>(M, N, K, A, lda, B, ldb, bias, C, ldc, pool);
#endif
}

inline bool pair_products() {
#if defined(LINEN_DISPATCH)
  return dispatch::available<dispatch::GemmPairs>() && dispatch::available<dispatch::GemvPairs>();
#else
  return LINEN_SIMD_HAS_BF16_DOT != 0;
#endif
}

inline bool pair_gemm() { return pairs_preferred() && pair_products(); }

// Callers check pair_products() first.
inline void multiply_pairs(Index M, Index N, Index K, const Eigen::bfloat16* A, Index lda, const Eigen::bfloat16* B,
                           Index ldb, float* C, Index ldc, Eigen::ThreadPoolInterface* pool = nullptr) {
  LINEN_ASSERT(pair_products());
  const GemmOutput<float, Eigen::bfloat16> out{B, ldb, N, nullptr, C, ldc};
#if defined(LINEN_DISPATCH)
  dispatch::call<dispatch::GemmPairs>(M, K, A, lda, &out, 1, pool);
#elif LINEN_SIMD_HAS_BF16_DOT
  gemm_pairs(M, K, A, lda, &out, 1, pool);
#else
  (void)M, (void)K, (void)A, (void)lda, (void)out, (void)pool;
#endif
}

inline void multiply_pair_panels(Index M, Index N, Index K, const Eigen::bfloat16* x, Index ldx,
                                 const Eigen::bfloat16* panels, float* y, Index ldy,
                                 Eigen::ThreadPoolInterface* pool = nullptr) {
  LINEN_ASSERT(pair_products());
#if defined(LINEN_DISPATCH)
  dispatch::call<dispatch::GemvPairs>(M, N, K, x, ldx, panels, y, ldy, pool);
#elif LINEN_SIMD_HAS_BF16_DOT
  gemv_pairs(M, N, K, x, ldx, panels, y, ldy, pool);
#else
  (void)M, (void)N, (void)K, (void)x, (void)ldx, (void)panels, (void)y, (void)ldy, (void)pool;
#endif
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_PRODUCT_HPP

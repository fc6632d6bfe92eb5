// SPDX-License-Identifier: Apache-2.0
//
// Internal: one column group of a GEMM sharing its left operand (gemm.hpp's
// gemm_outputs): C[M, n] = A B[K, n] + bias[n]. Outside the ISA namespace (config.hpp's
// LINEN_ISA_NAMESPACE), like AttentionProblem: linen::dispatch's tables take it, so every
// level must see one type.
#ifndef LINEN_DETAIL_GEMM_OUTPUT_HPP
#define LINEN_DETAIL_GEMM_OUTPUT_HPP

#include "../../tensor.hpp"

namespace linen {
namespace detail {

// C[M, n] (row stride ldc) = A B[K, n] (row stride ldb) + bias[n] (bias may be null).
// TB, B's element type: T, or bfloat16 for the pair products (gemm/pairs.hpp: C float).
template <class T, class TB = T>
struct GemmOutput {
  const TB* B = nullptr;
  Index ldb = 0;
  Index n = 0;
  const T* bias = nullptr;
  T* C = nullptr;
  Index ldc = 0;
};

// The most column groups one gemm_outputs call takes (q, k, v and one spare).
inline constexpr int kGemmMaxOutputs = 4;

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_OUTPUT_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: packing for linen's GEMM. The micro-kernel (kernel.hpp) reads both operands
// as contiguous streams in the order it consumes them:
//   pack_a  rows [0, m) x depth [0, kc) of A (row stride lda) into panels of MR rows,
//           each panel [kc][MR] (row r of the panel at offset k * MR + r); rows past m
//           are zero.
//   pack_b  depth [0, kc) x columns [0, n) of B (row stride ldb) into one panel of NRW
//           columns, [kc][NRW]; columns past n are zero.
// The zero padding lets edge tiles run the full kernel: padded lanes never mix with
// real ones (a lane of C sums its own column only), and they are never stored.
#ifndef LINEN_DETAIL_GEMM_PACK_HPP
#define LINEN_DETAIL_GEMM_PACK_HPP

#include <algorithm>
#include <cstring>

#include "../../config.hpp"
#include "../../tensor.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

// Panels of MR rows: ceil(m / MR) panels of kc * MR elements each, one after another.
template <int MR, class T>
inline void pack_a(Index m, Index kc, const T* A, Index lda, T* dst) {
  for (Index i0 = 0; i0 < m; i0 += MR, dst += kc * MR) {
    const Index mv = std::min<Index>(MR, m - i0);
    if (mv == MR) {
      // Row by row: contiguous reads, stores MR apart (they stay in L1).
      for (int r = 0; r < MR; ++r) {
        const T* src = A + (i0 + r) * lda;
        for (Index k = 0; k < kc; ++k) dst[k * MR + r] = src[k];
      }
    } else {
      for (Index k = 0; k < kc; ++k) {
        for (Index r = 0; r < mv; ++r) dst[k * MR + r] = A[(i0 + r) * lda + k];
        for (Index r = mv; r < MR; ++r) dst[k * MR + r] = T(0);
      }
    }
  }
}

// One panel of NRW columns (n <= NRW of them real).
template <int NRW, class T>
inline void pack_b(Index n, Index kc, const T* B, Index ldb, T* dst) {
  if (n == NRW) {
    for (Index k = 0; k < kc; ++k) std::memcpy(dst + k * NRW, B + k * ldb, sizeof(T) * NRW);
  } else {
    for (Index k = 0; k < kc; ++k) {
      T* d = dst + k * NRW;
      const T* s = B + k * ldb;
      for (Index c = 0; c < n; ++c) d[c] = s[c];
      for (Index c = n; c < NRW; ++c) d[c] = T(0);
    }
  }
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_PACK_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: the blocking of linen's packed GEMM (detail/gemm/gemm.hpp), per packet type.
//   register tile  MR rows of C x NR packets of columns (MR * NR accumulators)
//   cache blocks   KC (depth of one packed panel pair), MC (rows of A packed per work
//                  item, held in L2), NC (columns of B packed per pass, shared by the
//                  threads)
// The register tile follows the attention micro-GEMM family (detail/attention/
// micro_gemm.hpp): accumulators plus the NR operand packets and one broadcast fit the
// register file. 32 registers (AVX-512): 14 x 2 packets = 28 accumulators + 2 + 1 = 31;
// 16 registers (AVX2, SSE, NEON): 6 x 2 = 12 + 2 + 1 = 15. Measured on Zen 5 (float,
// AVX-512, one thread, the layer's shapes), 14 x 2 at KC 512 gave 180-195 GFLOP/s, ahead of
// 12 x 2 (170-185), 8 x 3 (155-177) and 6 x 4 (157-175); KC 256 or 128 cost 5-15%
// (the C tile is reloaded once per depth block, A and B packed in more passes). The
// panels are read in the order they are packed, so the blocking changes speed only:
// every element of C is one chain of fused multiply-adds over k in order, whatever MR,
// NR, KC, MC, NC (see kernel.hpp).
#ifndef LINEN_DETAIL_GEMM_BLOCKING_HPP
#define LINEN_DETAIL_GEMM_BLOCKING_HPP

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

template <class P>
struct PackedBlocking {
  static constexpr int W = simd::size_v<P>;
  static constexpr int MR = simd::is_scalar_v<P> ? 4 : (simd::kRegisters >= 32 ? 14 : 6);
  static constexpr int NR = simd::is_scalar_v<P> ? 4 : 2;
  static constexpr int NRW = NR * W;  // columns of one register tile
  // The projections' K (256, 512) in one depth block; a KC x NRW micro-panel of B (64 KiB
  // for float AVX-512) and the MC x KC block of A are read from L2, which serves the
  // 128 bytes of B and 56 of A per 28 multiply-adds with room to spare.
  static constexpr Index KC = 512;
  static constexpr Index MC = MR * 10;    // the most rows of A one work item packs
  static constexpr Index NC = NRW * 64;   // the most columns of B one pass packs
};

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_BLOCKING_HPP

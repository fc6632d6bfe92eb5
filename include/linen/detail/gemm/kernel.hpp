// SPDX-License-Identifier: Apache-2.0
//
// Internal: the register-tiled micro-kernel of linen's GEMM. One tile is MR rows x NR
// packets of C, computed from a packed A panel ([kc][MR], pack.hpp) and a packed B panel
// ([kc][NR * W]): per step of k, NR packet loads of B, MR broadcasts of A, MR x NR fused
// multiply-adds into accumulators that stay in registers.
//
// Each element of C is one chain of simd::fmadd over k in order: the first depth block
// starts from zero, a later one from the value the previous block stored, so splitting K
// into blocks, M and N into tiles or the work into threads gives the same bits, and so do
// the packet width and the scalar member (simd::fmadd rounds as the packets do). The
// bias, when given, is added once after the last block (Flax: dot, then + bias).
#ifndef LINEN_DETAIL_GEMM_KERNEL_HPP
#define LINEN_DETAIL_GEMM_KERNEL_HPP

#include <algorithm>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../attention/micro_gemm.hpp"  // gemm::unroll
#include "../simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

// C[0, MR) x [0, NR * W) (row stride ldc) = (accumulate ? C : 0) + a . b (+ bias[0, NR * W)).
template <class P, int MR, int NR>
inline void micro_kernel(Index kc, const simd::scalar_t<P>* a, const simd::scalar_t<P>* b, simd::scalar_t<P>* c,
                         Index ldc, bool accumulate, const simd::scalar_t<P>* bias) {
  constexpr int W = simd::size_v<P>;
  using S = simd::scalar_t<P>;
  P acc[MR][NR];
  if (accumulate) {
    unroll<MR>([&](auto m) { unroll<NR>([&](auto n) { acc[m][n] = simd::load<P>(c + m * ldc + n * W); }); });
  } else {
    unroll<MR>([&](auto m) { unroll<NR>([&](auto n) { acc[m][n] = simd::set1<P>(S(0)); }); });
  }
  for (Index t = 0; t < kc; ++t, a += MR, b += NR * W) {
    P bv[NR];
    unroll<NR>([&](auto n) { bv[n] = simd::load<P>(b + n * W); });
    unroll<MR>([&](auto m) {
      const P x = simd::set1<P>(a[m]);
      unroll<NR>([&](auto n) { acc[m][n] = simd::fmadd(x, bv[n], acc[m][n]); });
    });
  }
  if (bias) {
    P bb[NR];
    unroll<NR>([&](auto n) { bb[n] = simd::load<P>(bias + n * W); });
    unroll<MR>([&](auto m) { unroll<NR>([&](auto n) { acc[m][n] = simd::add(acc[m][n], bb[n]); }); });
  }
  unroll<MR>([&](auto m) { unroll<NR>([&](auto n) { simd::store(c + m * ldc + n * W, acc[m][n]); }); });
}

// A tile of which only rows [0, mv) and columns [0, nv) exist in C: the full kernel on a
// copy (the padding of the packed panels is zero), then the real part written back.
template <class P, int MR, int NR>
inline void edge_kernel(Index mv, Index nv, Index kc, const simd::scalar_t<P>* a, const simd::scalar_t<P>* b,
                        simd::scalar_t<P>* c, Index ldc, bool accumulate, const simd::scalar_t<P>* bias) {
  using S = simd::scalar_t<P>;
  constexpr int NRW = NR * simd::size_v<P>;
  alignas(64) S tile[MR * NRW];
  alignas(64) S tile_bias[NRW];
  if (accumulate) {
    std::fill(tile, tile + MR * NRW, S(0));
    for (Index r = 0; r < mv; ++r) std::copy(c + r * ldc, c + r * ldc + nv, tile + r * NRW);
  }
  if (bias) {
    std::copy(bias, bias + nv, tile_bias);
    std::fill(tile_bias + nv, tile_bias + NRW, S(0));
  }
  micro_kernel<P, MR, NR>(kc, a, b, tile, NRW, accumulate, bias ? tile_bias : nullptr);
  for (Index r = 0; r < mv; ++r) std::copy(tile + r * NRW, tile + r * NRW + nv, c + r * ldc);
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_KERNEL_HPP

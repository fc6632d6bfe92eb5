// SPDX-License-Identifier: Apache-2.0
//
// Internal: the bfloat16 products of DenseGeneral and the modules' projections where the
// target has avx512_bf16 (vdpbf16ps, simd::bf16::dot2: two steps of k per instruction,
// accumulated in float). Row-major; the operands are bfloat16 already rounded (Flax's
// promote_dtype), the product float:
//   gemm_pairs(M, K, A, lda, outs, count, pool)
//       outs[g].C[M, n] = A[M, K] outs[g].B[K, n] (+ outs[g].bias): linen's GEMM driver
//       (gemm.hpp) with A and B packed in pairs (PairOps)
//   gemv_pairs(M, N, K, x, ldx, panels, y, ldy, pool)
//       y[M, N] = x[M, K] W, W kept in pair panels (pair_panels.hpp): the decode step's
//       projections, the kernel streamed once per group of rows, nothing packed per call
// Both tiles are the attention family's pair member (attention/micro_gemm.hpp,
// pair_block). A pair holds (hi = element 2kp, lo = element 2kp + 1), so every element of
// C is the fmadd chain over k in order from zero, as linen's float GEMM and GEMV compute
// the widened operands (a bfloat16 product is exact in float): the same bits, except that
// vdpbf16ps reads denormal inputs as zero and flushes denormal sums (simd.hpp). The two
// give the same bits for the same row, so a decode step equals apply's row.
#ifndef LINEN_DETAIL_GEMM_PAIRS_HPP
#define LINEN_DETAIL_GEMM_PAIRS_HPP

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../attention/micro_gemm.hpp"
#include "../parallel.hpp"
#include "../simd.hpp"
#include "gemm.hpp"
#include "output.hpp"
#include "pair_panels.hpp"

#if LINEN_SIMD_HAS_BF16_DOT
namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

// Store, plus bias[col] when given (the GEMM's bias, added once after the last block).
struct StoreBias {
  const float* bias = nullptr;
  template <class P>
  void finish(float* c, Index col, const P& acc) const {
    simd::store(c, bias ? simd::add(acc, simd::load<P>(bias + col)) : acc);
  }
};

// The pair member of the GEMM driver: the float member's register tile (14 x 2 packets
// on 32 registers) over pairs of k, so a depth block of kc takes ceil(kc / 2) pair rows
// (a last odd element paired with zero: 0 * 0 adds nothing).
// (P, the 16-lane float packet, is a defaulted parameter: naming it draws
// -Wignored-attributes.)
template <class P = simd::packet_t<float>>
struct PairOps {
  static_assert(simd::has_bf16_dot_v<P>, "linen: the pair products need avx512_bf16's 16-lane float packets");
  using Bf = Eigen::bfloat16;
  using Packed = Bf;
  static constexpr int MR = PackedBlocking<P>::MR, NR = PackedBlocking<P>::NR, NRW = PackedBlocking<P>::NRW;
  static constexpr Index KC = PackedBlocking<P>::KC, MC = PackedBlocking<P>::MC, NC = PackedBlocking<P>::NC;
  static_assert(KC % 2 == 0, "linen: the pair GEMM's depth blocks must start on a pair");
  static constexpr Index depth(Index kc) { return (kc + 1) / 2 * 2; }

  static std::uint16_t bits(const Bf& x) {
    std::uint16_t h;
    std::memcpy(&h, &x, sizeof h);
    return h;
  }
  // Panels of MR rows, [ceil(kc / 2)][MR] pairs: pair (kp, r) = {A(r, 2kp + 1), A(r, 2kp)};
  // rows past m, and the low half past kc, are zero.
  static void pack_a(Index m, Index kc, const Bf* A, Index lda, Bf* dst) {
    const Index pairs = (kc + 1) / 2;
    for (Index i0 = 0; i0 < m; i0 += MR, dst += 2 * pairs * MR) {
      const Index mv = std::min<Index>(MR, m - i0);
      auto* d = reinterpret_cast<std::uint32_t*>(dst);
      for (Index r = 0; r < MR; ++r) {
        if (r >= mv) {
          for (Index kp = 0; kp < pairs; ++kp) d[kp * MR + r] = 0;
          continue;
        }
        const Bf* src = A + (i0 + r) * lda;
        for (Index kp = 0; kp < kc / 2; ++kp)
          d[kp * MR + r] = (std::uint32_t(bits(src[2 * kp])) << 16) | bits(src[2 * kp + 1]);
        if (kc % 2 != 0) d[(pairs - 1) * MR + r] = std::uint32_t(bits(src[kc - 1])) << 16;
      }
    }
  }
  // One panel of NRW columns, [ceil(kc / 2)][NRW] pairs: pair (kp, c) = {B(2kp + 1, c),
  // B(2kp, c)}; columns past n, and the low half past kc, are zero.
  static void pack_b(Index n, Index kc, const Bf* B, Index ldb, Bf* dst) {
    const Index pairs = (kc + 1) / 2;
    auto* d = reinterpret_cast<std::uint32_t*>(dst);
    for (Index kp = 0; kp < pairs; ++kp, d += NRW) {
      const Bf* hi = B + 2 * kp * ldb;
      const bool whole = 2 * kp + 1 < kc;
      if (n == NRW && whole) {
        unroll<NRW / 16>([&](auto v) { simd::bf16::store(d + 16 * v, simd::bf16::interleave(hi + 16 * v, hi + ldb + 16 * v)); });
        continue;
      }
      for (Index c = 0; c < n; ++c)
        d[c] = (std::uint32_t(bits(hi[c])) << 16) | (whole ? bits(hi[ldb + c]) : 0u);
      for (Index c = n; c < NRW; ++c) d[c] = 0;
    }
  }
  // One tile: the pair block over the padded depth, on a copy where the tile is partial.
  static void tile(Index mv, Index nv, Index kc, const Bf* a, const Bf* b, float* c, Index ldc, bool accumulate,
                   const float* bias) {
    const Index kd = depth(kc);
    if (mv == MR && nv == NRW) {
      pair_block<MR, NR, false>(kd, a, 2, 2 * MR, b, 2 * NRW, c, ldc, 0, ZeroOrLoad{accumulate}, StoreBias{bias});
      return;
    }
    alignas(64) float t[MR * NRW];
    alignas(64) float tb[NRW];
    if (accumulate) {
      std::fill(t, t + MR * NRW, 0.0f);
      for (Index r = 0; r < mv; ++r) std::copy(c + r * ldc, c + r * ldc + nv, t + r * NRW);
    }
    if (bias) {
      std::copy(bias, bias + nv, tb);
      std::fill(tb + nv, tb + NRW, 0.0f);
    }
    pair_block<MR, NR, false>(kd, a, 2, 2 * MR, b, 2 * NRW, t, NRW, 0, ZeroOrLoad{accumulate},
                              StoreBias{bias ? tb : nullptr});
    for (Index r = 0; r < mv; ++r) std::copy(t + r * NRW, t + r * NRW + nv, c + r * ldc);
  }
};

template <class P = simd::packet_t<float>>
void gemm_pairs(Index M, Index K, const Eigen::bfloat16* A, Index lda, const GemmOutput<float, Eigen::bfloat16>* outs,
                int count, Eigen::ThreadPoolInterface* pool = nullptr) {
  gemm_driver<PairOps<P>>(M, K, A, lda, outs, count, pool);
}

// Rows [0, R) of x against one panel (kPairPanel columns, y's row stride ldy): column
// strips of S packets, R x S accumulators within the register file (R 1, 2: the panel's
// 8 packets at once; 3, 4: two strips of 4), in blocks of kGemvPairBlock pair rows, the
// next block's lines prefetched before each; a block continues each element's chain from
// the value the previous one stored. Measured on an Intel Xeon (KVM guest, noisy), one
// row against a 2048 x 2048 kernel from DRAM: 1.32x the float GEMV without the prefetch,
// 1.5-1.6x with it; against 512 x 512 in L2 the prefetch costs (2.0-2.7x down to 1.5-1.9x).
inline constexpr Index kGemvPairBlock = 16;

template <int R>
inline void gemv_pair_panel(Index K, const Eigen::bfloat16* x, Index ldx, const Eigen::bfloat16* panel, float* y,
                            Index ldy) {
  constexpr int S = R <= 2 ? 8 : 4;
  constexpr int strips = static_cast<int>(kPairPanel) / (16 * S);
  constexpr Index row = 2 * kPairPanel;  // bfloat16 elements of one pair row
  const Index pairs = (K + 1) / 2;
  for (Index kp0 = 0; kp0 < pairs; kp0 += kGemvPairBlock) {
    const Index kb = std::min<Index>(kGemvPairBlock, pairs - kp0);
    // The block's depth in elements: whole pairs, the last odd element alone at the end.
    const Index kd = kp0 + kb == pairs ? K - 2 * kp0 : 2 * kb;
    const Eigen::bfloat16* blk = panel + kp0 * row;
    if (kp0 + 2 * kGemvPairBlock <= pairs) {
      const char* next = reinterpret_cast<const char*>(blk + kGemvPairBlock * row);
      simd::prefetch(next, kGemvPairBlock * row * 2);
    }
    unroll<strips>([&](auto s) {
      pair_block<R, S, true>(kd, x + 2 * kp0, ldx, 0, blk + s * 32 * S, row, y + s * 16 * S, ldy, 0,
                             ZeroOrLoad{kp0 > 0}, Store{});
    });
  }
}

// Below this many bytes of panels a product runs on the calling thread (the float GEMV's
// rule, gemv.hpp).
inline constexpr double kGemvPairsParallelMinBytes = 256.0 * 1024;

inline void gemv_pairs(Index M, Index N, Index K, const Eigen::bfloat16* x, Index ldx, const Eigen::bfloat16* panels,
                       float* y, Index ldy, Eigen::ThreadPoolInterface* pool = nullptr) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum
    for (Index i = 0; i < M; ++i) std::fill(y + i * ldy, y + i * ldy + N, 0.0f);
    return;
  }
  const Index count = (N + kPairPanel - 1) / kPairPanel;
  const Index panel_size = (K + 1) / 2 * 2 * kPairPanel;
  const double bytes = static_cast<double>(panel_size) * static_cast<double>(count) * 2;
  const int workers = bytes >= kGemvPairsParallelMinBytes ? static_cast<int>(std::min<Index>(pool_workers(pool), count)) : 1;
  auto run = [&](Index p0, Index p1) {
    alignas(64) float t[4 * kPairPanel];
    for (Index p = p0; p < p1; ++p) {
      const Eigen::bfloat16* panel = panels + p * panel_size;
      const Index j = p * kPairPanel, nv = std::min<Index>(kPairPanel, N - j);
      for (Index i = 0; i < M; i += 4) {
        const Index rows = std::min<Index>(4, M - i);
        const bool whole = nv == kPairPanel;
        float* out = whole ? y + i * ldy + j : t;
        const Index ld = whole ? ldy : kPairPanel;
        const Eigen::bfloat16* xi = x + i * ldx;
        switch (rows) {
          case 1: gemv_pair_panel<1>(K, xi, ldx, panel, out, ld); break;
          case 2: gemv_pair_panel<2>(K, xi, ldx, panel, out, ld); break;
          case 3: gemv_pair_panel<3>(K, xi, ldx, panel, out, ld); break;
          default: gemv_pair_panel<4>(K, xi, ldx, panel, out, ld); break;
        }
        if (!whole)
          for (Index r = 0; r < rows; ++r) std::copy(t + r * kPairPanel, t + r * kPairPanel + nv, y + (i + r) * ldy + j);
      }
    }
  };
  if (workers <= 1) {
    run(0, count);
    return;
  }
  run_workers(pool, workers, [&](int w) {
    const auto [p0, p1] = share(count, workers, w);
    run(p0, p1);
  });
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen
#endif  // LINEN_SIMD_HAS_BF16_DOT

#endif  // LINEN_DETAIL_GEMM_PAIRS_HPP

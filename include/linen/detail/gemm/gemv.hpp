// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen's GEMV-shaped product, the projections of a decode step (one row, or a
// few, times a projection kernel). Row-major throughout:
//   gemv<T>(M, N, K, x, ldx, W, ldw, bias, y, ldy, pool)
//       y[M, N] = x[M, K] W[K, N] (+ bias[N]; bias may be null)
// T is float or double; P, the packet type, defaults to the translation unit's widest
// (linen::dispatch instantiates one per level, detail/dispatch.hpp's Gemv entry).
//
// No packing: the rows go in groups of up to kGemvGroupRows, and for each group W is read
// once, straight from memory, front to back in blocks of KB rows (GemvBlocking), each block
// in column tiles of NB packets: per step of k, NB packet loads of W's row k, one broadcast
// of x[r, k] per row and R x NB fused multiply-adds into accumulators held in registers;
// the next block is prefetched while one runs. A few rows thus stream the kernel once at memory bandwidth; DenseGeneral's by_row
// products (decode steps) take it through gemm::multiply_rows (product.hpp).
//
// Numerics, the GEMM's (kernel.hpp): every element of y is one chain of simd::fmadd over k
// in order, starting from zero, then + bias[j] once. So the bits do not depend on the row
// groups, the column tiles, the depth blocks (a block continues the chain from the value
// the previous one stored), the packet width (scalar columns included), the prefetch or the
// threads (columns split among them), and they equal gemm<T>'s for the same rows at the
// same level: a step of decode and apply over the same row agree. Like the GEMM, a level
// with FMA rounds each multiply-add once and the SSE2 level twice (simd::fmadd), so the
// bits may differ between those levels, by rounding only.
#ifndef LINEN_DETAIL_GEMM_GEMV_HPP
#define LINEN_DETAIL_GEMM_GEMV_HPP

#include <algorithm>
#include <cstddef>
#include <tuple>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../attention/micro_gemm.hpp"  // gemm::unroll
#include "../parallel.hpp"
#include "../simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

// The most rows one pass over W serves; more rows take more passes (multiply_rows hands
// products of more than kGemvMaxRows rows to the GEMM, which gives the same bits).
inline constexpr int kGemvGroupRows = 4;

// The column tile of a group of R rows: R x NB accumulators, plus R broadcasts and the
// loads, within the register file (32 registers: NB 16, 8, 8, 4 for R 1..4; 16: 8, 4, 2, 2).
// Powers of two, so that the layers' widths (multiples of 64) need no narrower tile. KB:
// the steps of k of one block (every tile of a block is done before the next block: W is
// read front to back), the next block prefetched while one runs. Measured on Zen 5 (float,
// AVX-512, W from DRAM, a loaded machine): blocks of 8 rows ran M = 4 x [2048, 2048]
// ~25% faster than whole-depth tiles with an 8-row prefetch, and M = 1 5-15% faster;
// blocks of 4, 16 or 32 rows were within the noise of 8 (see bench_gemm.cpp's BM_gemv).
template <class P>
struct GemvBlocking {
  static constexpr int kAcc = simd::kRegisters - 4;  // registers for accumulators
  static constexpr int cap(int r) {
    int nb = simd::kRegisters / 2;
    while (nb > 1 && nb * r > kAcc) nb /= 2;
    return nb;
  }
  template <int R>
  static constexpr int NB = simd::is_scalar_v<P> ? 4 : cap(R);
  static constexpr Index KB = 8;
  static constexpr bool prefetch = true;
};

// y[0, R) x [0, NB * W) = (accumulate ? y : 0) + x[0, R) . W[0, kb) (+ bias): one
// column tile of one group over one block of kb steps of k (x and W point at the block's
// first step). `next` (may be null): the same tile in the next block, prefetched a row per
// step.
template <class P, int R, int NB>
inline void gemv_tile(Index kb, const simd::scalar_t<P>* x, Index ldx, const simd::scalar_t<P>* w, Index ldw,
                      const simd::scalar_t<P>* next, bool accumulate, const simd::scalar_t<P>* bias,
                      simd::scalar_t<P>* y, Index ldy) {
  constexpr int W = simd::size_v<P>;
  using S = simd::scalar_t<P>;
  P acc[R][NB];
  if (accumulate) {
    unroll<R>([&](auto r) { unroll<NB>([&](auto n) { acc[r][n] = simd::load<P>(y + r * ldy + n * W); }); });
  } else {
    unroll<R>([&](auto r) { unroll<NB>([&](auto n) { acc[r][n] = simd::set1<P>(S(0)); }); });
  }
  // The tile's cache lines of a row, prefetched one instruction each (unrolled here: the
  // loop simd::prefetch runs, left to -O2, cost ~15% of what -O3 or -march=native gave).
  constexpr int kLines = std::max<int>(1, static_cast<int>(sizeof(S)) * NB * W / 64);
  for (Index k = 0; k < kb; ++k, w += ldw) {
    if (next) {
      const char* line = reinterpret_cast<const char*>(next + k * ldw);
      unroll<kLines>([&](auto l) { simd::prefetch(line + 64 * l, 1); });
    }
    unroll<R>([&](auto r) {
      const P xv = simd::set1<P>(x[r * ldx + k]);
      unroll<NB>([&](auto n) { acc[r][n] = simd::fmadd(xv, simd::load<P>(w + n * W), acc[r][n]); });
    });
  }
  if (bias) {
    unroll<NB>([&](auto n) {
      const P b = simd::load<P>(bias + n * W);
      unroll<R>([&](auto r) { acc[r][n] = simd::add(acc[r][n], b); });
    });
  }
  unroll<R>([&](auto r) { unroll<NB>([&](auto n) { simd::store(y + r * ldy + n * W, acc[r][n]); }); });
}

// Columns [j0, j1) of a group of R rows, block of KB steps of k after block: in each,
// tiles of NB packets, then of one packet, then single columns (the scalar member:
// simd::fmadd rounds as the packets do). A block's rows are read whole before the next
// block's (W streams front to back even when a row holds several tiles); a later block
// continues each element's chain from the value the previous one stored in y, and the
// bias is added after the last.
template <class P, int R, class Blk>
inline void gemv_columns(Index j0, Index j1, Index K, const simd::scalar_t<P>* x, Index ldx,
                         const simd::scalar_t<P>* w, Index ldw, const simd::scalar_t<P>* bias, simd::scalar_t<P>* y,
                         Index ldy) {
  using S = simd::scalar_t<P>;
  constexpr int W = simd::size_v<P>;
  constexpr int NB = Blk::template NB<R>;
  for (Index k0 = 0; k0 < K; k0 += Blk::KB) {
    const Index kb = std::min<Index>(Blk::KB, K - k0);
    const bool accumulate = k0 > 0, last = k0 + kb == K;
    const bool fetch = Blk::prefetch && k0 + 2 * Blk::KB <= K;  // the next block is whole
    const S* xk = x + k0;
    const S* wk = w + k0 * ldw;
    auto tile_args = [&](Index j) {
      return std::make_tuple(wk + j, fetch ? wk + Blk::KB * ldw + j : nullptr, last && bias ? bias + j : nullptr, y + j);
    };
    Index j = j0;
    for (; j + NB * W <= j1; j += NB * W) {
      const auto [wj, nj, bj, yj] = tile_args(j);
      gemv_tile<P, R, NB>(kb, xk, ldx, wj, ldw, nj, accumulate, bj, yj, ldy);
    }
    if constexpr (NB > 1) {
      for (; j + W <= j1; j += W) {
        const auto [wj, nj, bj, yj] = tile_args(j);
        gemv_tile<P, R, 1>(kb, xk, ldx, wj, ldw, nj, accumulate, bj, yj, ldy);
      }
    }
    if constexpr (W > 1) {
      for (; j < j1; ++j) {
        const auto [wj, nj, bj, yj] = tile_args(j);
        gemv_tile<S, R, 1>(kb, xk, ldx, wj, ldw, nj, accumulate, bj, yj, ldy);
      }
    }
  }
}

// Below this many bytes of W a product runs on the calling thread (a pool's task costs a
// few microseconds; 256 KiB stream in about 7 us at 37 GB/s).
inline constexpr double kGemvParallelMinBytes = 256.0 * 1024;

template <class T, class P = simd::packet_t<T>, class Blk = GemvBlocking<P>>
void gemv(Index M, Index N, Index K, const T* x, Index ldx, const T* W, Index ldw, const T* bias, T* y, Index ldy,
          Eigen::ThreadPoolInterface* pool = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: gemv is for float and double");
  static_assert(std::is_same_v<simd::scalar_t<P>, T>, "linen: gemv's packet type must hold T");
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: y = bias (or 0)
    for (Index i = 0; i < M; ++i)
      for (Index j = 0; j < N; ++j) y[i * ldy + j] = bias ? bias[j] : T(0);
    return;
  }
  constexpr int Wd = simd::size_v<P>;
  // The columns go to the workers in runs of whole packets (each column's sum is its own:
  // the split changes nothing but who computes it).
  const double bytes = static_cast<double>(K) * static_cast<double>(N) * sizeof(T);
  const Index units = (N + Wd - 1) / Wd;
  const int workers =
      bytes >= kGemvParallelMinBytes ? static_cast<int>(std::min<Index>(pool_workers(pool), units)) : 1;
  auto columns = [&](Index j0, Index j1) {
    for (Index i = 0; i < M;) {
      const Index rows = std::min<Index>(kGemvGroupRows, M - i);
      const T* xi = x + i * ldx;
      T* yi = y + i * ldy;
      switch (rows) {
        case 1: gemv_columns<P, 1, Blk>(j0, j1, K, xi, ldx, W, ldw, bias, yi, ldy); break;
        case 2: gemv_columns<P, 2, Blk>(j0, j1, K, xi, ldx, W, ldw, bias, yi, ldy); break;
        case 3: gemv_columns<P, 3, Blk>(j0, j1, K, xi, ldx, W, ldw, bias, yi, ldy); break;
        default: gemv_columns<P, 4, Blk>(j0, j1, K, xi, ldx, W, ldw, bias, yi, ldy); break;
      }
      i += rows;
    }
  };
  if (workers <= 1) {
    columns(0, N);
    return;
  }
  run_workers(pool, workers, [&](int w) {
    const auto [u0, u1] = share(units, workers, w);
    columns(u0 * Wd, std::min<Index>(u1 * Wd, N));
  });
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_GEMV_HPP

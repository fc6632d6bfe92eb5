// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen's packed GEMM, the products behind DenseGeneral and the modules'
// projections. Row-major throughout:
//   gemm<T>(M, N, K, A, lda, B, ldb, bias, C, ldc, pool)
//       C[M, N] = A[M, K] B[K, N] (+ bias[N]; bias may be null)
//   gemm_outputs<T>(M, K, A, lda, outs, count, pool)
//       the same for `count` column groups sharing A: outs[g].C = A outs[g].B + outs[g].bias
//       (the q, k, v projections of one input: A is packed once for all of them)
// T is float or double; P, the packet type, defaults to the translation unit's widest
// (so a runtime-dispatch build can instantiate one per instruction set).
//
// Goto/BLIS blocking (blocking.hpp): for each pass over NC columns and KC of depth, B's
// block is packed once (by all workers) into NRW-column panels (pack.hpp); the rows go in
// blocks of at most MC to the workers (detail/parallel.hpp), each packing its A block
// into MR-row panels and sweeping the register tiles (kernel.hpp). Every element of C is
// one chain of fused multiply-adds over k in order, plus the bias: the bits do not
// depend on the blocking, the thread count or the work split; they differ from Eigen's
// product (which splits each dot product into several partial sums) by rounding only.
//
// The packed blocks live in buffers each thread keeps for later calls (at most
// KC * NC elements for B on the calling thread, MC * KC for A on every worker): after
// the first call of a size a call allocates nothing but the pool's tasks.
#ifndef LINEN_DETAIL_GEMM_GEMM_HPP
#define LINEN_DETAIL_GEMM_GEMM_HPP

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../config.hpp"
#include "../../tensor.hpp"
#include "../parallel.hpp"
#include "../simd.hpp"
#include "blocking.hpp"
#include "kernel.hpp"
#include "output.hpp"
#include "pack.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

// One column group of gemm_outputs (output.hpp).
template <class T>
using Output = GemmOutput<T>;
inline constexpr int kMaxOutputs = kGemmMaxOutputs;

// A 64-byte aligned buffer a thread keeps across calls; it only grows.
template <class T>
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { Eigen::internal::aligned_free(data_); }
  T* get(Index n) {
    if (n > size_) {
      Eigen::internal::aligned_free(data_);
      data_ = nullptr;
      size_ = 0;
      data_ = static_cast<T*>(Eigen::internal::aligned_malloc(static_cast<std::size_t>(n) * sizeof(T)));
      size_ = n;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  Index size_ = 0;
};

// The calling thread's buffer for packed B blocks, and each worker's for packed A blocks.
template <class T>
inline ScratchBuffer<T>& packed_b_buffer() {
  thread_local ScratchBuffer<T> buffer;
  return buffer;
}
template <class T>
inline ScratchBuffer<T>& packed_a_buffer() {
  thread_local ScratchBuffer<T> buffer;
  return buffer;
}

// Below this many multiply-adds a product runs on the calling thread (a pool's task
// costs a few microseconds).
inline constexpr double kParallelMinFlops = 4.0e6;

// The float and double members of the driver below: Packed, the packed panels' element
// type; depth(kc), the packed rows a depth block of kc takes (a panel of MR rows of A is
// depth(kc) * MR elements, one of NRW columns of B depth(kc) * NRW); pack_a, pack_b
// (pack.hpp); tile, one register tile (kernel.hpp). gemm/pairs.hpp has the bfloat16
// pair member.
template <class T, class P, class Blk>
struct PlainOps {
  using Packed = T;
  static constexpr int MR = Blk::MR, NR = Blk::NR, NRW = Blk::NRW;
  static constexpr Index KC = Blk::KC, MC = Blk::MC, NC = Blk::NC;
  static constexpr Index depth(Index kc) { return kc; }
  static void pack_a(Index m, Index kc, const T* A, Index lda, T* dst) { gemm::pack_a<MR>(m, kc, A, lda, dst); }
  static void pack_b(Index n, Index kc, const T* B, Index ldb, T* dst) { gemm::pack_b<NRW>(n, kc, B, ldb, dst); }
  static void tile(Index mv, Index nv, Index kc, const T* a, const T* b, T* c, Index ldc, bool accumulate,
                   const T* bias) {
    if (mv == MR && nv == NRW) micro_kernel<P, MR, NR>(kc, a, b, c, ldc, accumulate, bias);
    else edge_kernel<P, MR, NR>(mv, nv, kc, a, b, c, ldc, accumulate, bias);
  }
};

// The Goto/BLIS driver of every member (see the top of this file): C[M, n_g] = A B_g +
// bias_g for the groups of `outs`, with Ops' packing and register tile.
template <class Ops, class TA, class T, class TB>
void gemm_driver(Index M, Index K, const TA* A, Index lda, const GemmOutput<T, TB>* outs, int count,
                 Eigen::ThreadPoolInterface* pool) {
  using Packed = typename Ops::Packed;
  constexpr int MR = Ops::MR, NRW = Ops::NRW;
  LINEN_ASSERT(count >= 0 && count <= kMaxOutputs);
  if (M <= 0) return;
  // Panels of NRW columns, numbered across the groups: group g holds [first[g], first[g + 1]).
  Index first[kMaxOutputs + 1] = {0};
  Index N = 0;
  for (int g = 0; g < count; ++g) {
    first[g + 1] = first[g] + (std::max<Index>(outs[g].n, 0) + NRW - 1) / NRW;
    N += std::max<Index>(outs[g].n, 0);
  }
  const Index panels = first[count];
  if (panels == 0) return;
  if (K <= 0) {  // an empty sum: C = bias (or 0)
    for (int g = 0; g < count; ++g)
      for (Index i = 0; i < M; ++i)
        for (Index j = 0; j < outs[g].n; ++j) outs[g].C[i * outs[g].ldc + j] = outs[g].bias ? outs[g].bias[j] : T(0);
    return;
  }

  const double flops = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const int pool_threads = flops >= kParallelMinFlops ? pool_workers(pool) : 1;
  // Row blocks: runs of whole MR-row tiles, at most MC rows, as many blocks as a multiple
  // of the workers, the tiles shared evenly among them (blocks of equal rows rounded up to
  // MR gave one worker 280 rows and the other 232 at M = 512 on two threads).
  const Index tiles = (M + MR - 1) / MR;
  Index blocks = (M + Ops::MC - 1) / Ops::MC;
  if (pool_threads > 1) blocks = std::min<Index>((blocks + pool_threads - 1) / pool_threads * pool_threads, tiles);
  const Index mc = (tiles + blocks - 1) / blocks * MR;  // the most rows of one block
  const int workers = static_cast<int>(std::min<Index>(pool_threads, blocks));

  const Index kc_max = std::min<Index>(K, Ops::KC);
  const Index nc_panels = std::max<Index>(1, Ops::NC / NRW);
  Packed* packed_b = packed_b_buffer<Packed>().get(std::min(panels, nc_panels) * Ops::depth(kc_max) * NRW);
  auto group_of = [&](Index p) {
    int g = 0;
    while (p >= first[g + 1]) ++g;
    return g;
  };

  for (Index p0 = 0; p0 < panels; p0 += nc_panels) {
    const Index p1 = std::min(panels, p0 + nc_panels);
    for (Index k0 = 0; k0 < K; k0 += Ops::KC) {
      const Index kc = std::min<Index>(Ops::KC, K - k0), dk = Ops::depth(kc);
      const bool accumulate = k0 > 0, last = k0 + kc == K;
      // Pack B's block [k0, k0 + kc) x panels [p0, p1), panels split among the workers.
      const Index npan = p1 - p0;
      const Index chunks = std::min<Index>(npan, workers);
      parallel_for(pool, workers, chunks, [&](int, Index ch) {
        const auto [q0, q1] = share(npan, static_cast<int>(chunks), static_cast<int>(ch));
        for (Index q = q0; q < q1; ++q) {
          const Index p = p0 + q;
          const int g = group_of(p);
          const Index j = (p - first[g]) * NRW;
          Ops::pack_b(std::min<Index>(NRW, outs[g].n - j), kc, outs[g].B + k0 * outs[g].ldb + j, outs[g].ldb,
                      packed_b + q * dk * NRW);
        }
      });
      // The row blocks: pack A's block, then every tile of it against every panel.
      parallel_for(pool, workers, blocks, [&](int, Index blk) {
        const auto [t0, t1] = share(tiles, static_cast<int>(blocks), static_cast<int>(blk));
        const Index i0 = t0 * MR, mb = std::min(t1 * MR, M) - i0;
        Packed* packed_a = packed_a_buffer<Packed>().get(mc * dk);
        Ops::pack_a(mb, kc, A + i0 * lda + k0, lda, packed_a);
        for (Index q = 0; q < npan; ++q) {
          const Index p = p0 + q;
          const int g = group_of(p);
          const GemmOutput<T, TB>& o = outs[g];
          const Index j = (p - first[g]) * NRW, nv = std::min<Index>(NRW, o.n - j);
          const Packed* b = packed_b + q * dk * NRW;
          const T* bias = last && o.bias ? o.bias + j : nullptr;
          for (Index r = 0; r < mb; r += MR) {
            const Index mv = std::min<Index>(MR, mb - r);
            Ops::tile(mv, nv, kc, packed_a + r * dk, b, o.C + (i0 + r) * o.ldc + j, o.ldc, accumulate, bias);
          }
        }
      });
    }
  }
}

template <class T, class P = simd::packet_t<T>, class Blk = PackedBlocking<P>>
void gemm_outputs(Index M, Index K, const T* A, Index lda, const Output<T>* outs, int count,
                  Eigen::ThreadPoolInterface* pool = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "linen: gemm is for float and double");
  static_assert(std::is_same_v<simd::scalar_t<P>, T>, "linen: gemm's packet type must hold T");
  gemm_driver<PlainOps<T, P, Blk>>(M, K, A, lda, outs, count, pool);
}

template <class T, class P = simd::packet_t<T>, class Blk = PackedBlocking<P>>
void gemm(Index M, Index N, Index K, const T* A, Index lda, const T* B, Index ldb, const T* bias, T* C, Index ldc,
          Eigen::ThreadPoolInterface* pool = nullptr) {
  const Output<T> out{B, ldb, N, bias, C, ldc};
  gemm_outputs<T, P, Blk>(M, K, A, lda, &out, 1, pool);
}

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_GEMM_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: the one register-blocked micro-GEMM family behind every attention product,
// forward (S^T = K Q^T, O^T = alpha O^T + V^T P^T) and backward (the five tile products),
//   Cm[m * cm + n] = init + sum_t A[m * am + t * at] * B[t * bt + n],  m < M, n < N, t < K,
// without packing: every operand is read where it lies (K and V through Flax's strides,
// the transposed tiles in place), B's rows contiguous along n. A block is MR rows of C by
// NR packets of n: one broadcast of A and NR loads of B per step of t, MR x NR
// accumulators. Templated on the packet type P (Eigen's Packet16f / Packet8f / Packet4f,
// the doubles, or a plain scalar) and on the blocking, so that one source serves every
// instruction set (and, with runtime dispatch, one instantiation per ISA).
//
// Each element of C is one chain of fmadds over t in order from its initial value,
// whatever the blocking, the remainder handling or the packet width: every instantiation
// of the family gives the same bits for the same operands (tests check it). Eigen's own
// product would pack the tiles before each use, which costs about as much as the
// arithmetic at head_dim 64.
#ifndef LINEN_DETAIL_ATTENTION_MICRO_GEMM_HPP
#define LINEN_DETAIL_ATTENTION_MICRO_GEMM_HPP

#include <type_traits>
#include <utility>

#include "../../tensor.hpp"
#include "../../config.hpp"
#include "../simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace gemm {

template <int... I, class F>
inline void unroll_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>), unrolled.
template <int N, class F>
inline void unroll(F&& f) {
  unroll_impl(std::make_integer_sequence<int, N>{}, f);
}

// --- how a block's accumulators start (init) and end (epilogue) --------------------------
// init(c, col) -> P: the initial accumulator of C's packet at c (column col of C).
// epilogue(c, col, acc): what to do with the final accumulator.

// acc = 0 (Cm is written).
struct Zero {
  template <class P>
  P start(const simd::scalar_t<P>*, Index) const {
    return simd::set1<P>(simd::scalar_t<P>(0));
  }
};
// acc = Cm (Cm += A B); or 0 when !accumulate.
struct ZeroOrLoad {
  bool accumulate = true;
  template <class P>
  P start(const simd::scalar_t<P>* c, Index) const {
    return accumulate ? simd::load<P>(c) : simd::set1<P>(simd::scalar_t<P>(0));
  }
};
// acc = Cm * alpha[col / W] (the online softmax's rescale of O^T, one factor per lane).
template <class P>
struct Rescale {
  const P* alpha;
  template <class Q>
  Q start(const simd::scalar_t<P>* c, Index col) const {
    static_assert(std::is_same_v<Q, P>, "linen: Rescale serves whole strips of its packet type");
    return simd::mul(simd::load<P>(c), alpha[col / simd::size_v<P>]);
  }
};

struct Store {
  template <class P>
  void finish(simd::scalar_t<P>* c, Index, const P& acc) const {
    simd::store(c, acc);
  }
};
// Store, and mx[col / W] = max(mx[col / W], acc): the logits tile's running max, rows in
// order (the NaN rule of simd::max keeps its first operand).
template <class P>
struct StoreMax {
  P* mx;
  template <class Q>
  void finish(simd::scalar_t<P>* c, Index col, const Q& acc) const {
    static_assert(std::is_same_v<Q, P>, "linen: StoreMax serves whole strips of its packet type");
    simd::store(c, acc);
    P& m = mx[col / simd::size_v<P>];
    m = simd::max(m, acc);
  }
};

// StoreMax of the policy's logit of acc (Flax: rounded to T): the logits pass folded into
// the product's epilogue, where nothing else changes the logits.
template <class P, class Policy>
struct StoreLogitMax {
  P* mx;
  const Policy* pol;
  template <class Q>
  void finish(simd::scalar_t<P>* c, Index col, const Q& acc) const {
    static_assert(std::is_same_v<Q, P>, "linen: StoreLogitMax serves whole strips of its packet type");
    const P x = pol->template logit<P>(acc);
    simd::store(c, x);
    P& m = mx[col / simd::size_v<P>];
    m = simd::max(m, x);
  }
};

// --- the family --------------------------------------------------------------------------

// One MR x NR block: C rows [0, MR) x columns [col0, col0 + NR * W).
template <class P, int MR, int NR, class Init, class Epi>
inline void block(Index K, const simd::scalar_t<P>* A, Index am, Index at, const simd::scalar_t<P>* B, Index bt,
                  simd::scalar_t<P>* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  constexpr int W = simd::size_v<P>;
  P acc[MR][NR];
  unroll<MR>([&](auto m) {
    unroll<NR>([&](auto n) { acc[m][n] = init.template start<P>(Cm + m * cm + n * W, col0 + n * W); });
  });
  for (Index t = 0; t < K; ++t) {
    P b[NR];
    unroll<NR>([&](auto n) { b[n] = simd::load<P>(B + t * bt + n * W); });
    unroll<MR>([&](auto m) {
      const P x = simd::set1<P>(A[m * am + t * at]);
      unroll<NR>([&](auto n) { acc[m][n] = simd::fmadd(x, b[n], acc[m][n]); });
    });
  }
  unroll<MR>([&](auto m) {
    unroll<NR>([&](auto n) { epi.finish(Cm + m * cm + n * W, col0 + n * W, acc[m][n]); });
  });
}

// The remainder block of m rows (1 <= m <= M), M unrolled down to 1.
template <class P, int M, int NR, class Init, class Epi>
inline void rest(Index m, Index K, const simd::scalar_t<P>* A, Index am, Index at, const simd::scalar_t<P>* B,
                 Index bt, simd::scalar_t<P>* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  if constexpr (M >= 1) {
    if (m == M) block<P, M, NR>(K, A, am, at, B, bt, Cm, cm, col0, init, epi);
    else rest<P, M - 1, NR>(m, K, A, am, at, B, bt, Cm, cm, col0, init, epi);
  }
}

// One strip of NR packets of columns (from col0): full blocks of MR rows, then one
// remainder block.
template <class P, int MR, int NR, class Init, class Epi>
inline void strip(Index M, Index K, const simd::scalar_t<P>* A, Index am, Index at, const simd::scalar_t<P>* B,
                  Index bt, simd::scalar_t<P>* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  Index m = 0;
  for (; m + MR <= M; m += MR) block<P, MR, NR>(K, A + m * am, am, at, B, bt, Cm + m * cm, cm, col0, init, epi);
  if (m < M) rest<P, MR - 1, NR>(M - m, K, A + m * am, am, at, B, bt, Cm + m * cm, cm, col0, init, epi);
}

// The whole product: strips of NR packets, then strips of one packet, then the columns
// left (fewer than a packet) with the scalar member of the family.
template <class P, int MR, int NR, class Init, class Epi>
inline void product(Index M, Index N, Index K, const simd::scalar_t<P>* A, Index am, Index at,
                    const simd::scalar_t<P>* B, Index bt, simd::scalar_t<P>* Cm, Index cm, const Init& init,
                    const Epi& epi) {
  using S = simd::scalar_t<P>;
  constexpr int W = simd::size_v<P>;
  Index n = 0;
  for (; n + NR * W <= N; n += NR * W) strip<P, MR, NR>(M, K, A, am, at, B + n, bt, Cm + n, cm, n, init, epi);
  if constexpr (NR > 1)
    for (; n + W <= N; n += W) strip<P, MR, 1>(M, K, A, am, at, B + n, bt, Cm + n, cm, n, init, epi);
  if constexpr (W > 1)
    for (; n < N; ++n) strip<S, MR, 1>(M, K, A, am, at, B + n, bt, Cm + n, cm, n, init, epi);
}

// --- the pair member: bfloat16 operands, avx512_bf16 (simd::bf16::dot2) --------------
//
// The same product with A and B in bfloat16 and two steps of t per instruction:
//   Cm[m * cm + n] = init + sum_t A(m, t) * B(t, n),  t < K, in t order,
// B laid out in pairs (Bp[tp * bp + n * 2 + {0, 1}] = {B(2tp + 1, n), B(2tp, n)}, so that
// t = 2tp is accumulated first; bp in bfloat16 elements, a pair row padded to whole
// packets; for odd K the last pair's t = K (low half) is 0). A(m, t) is either read in
// place, t contiguous (kInPlace: A + m * am + t; a pair is swapped in registers, and the
// last element of an odd K is read alone), or from a pair-packed copy (A + m * am + tp * ap
// holds {A(m, 2tp + 1), A(m, 2tp)}; then K is even). Every element of C is then the fmadd
// chain of the float family over t in order, except that vdpbf16ps reads denormal inputs
// as 0 and flushes denormal sums to 0 (simd.hpp).
#if LINEN_SIMD_HAS_BF16_DOT
template <int MR, int NR, bool kInPlace, class Init, class Epi>
inline void pair_block(Index K, const Eigen::bfloat16* A, Index am, Index ap, const Eigen::bfloat16* Bp, Index bp,
                       float* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  namespace b16 = simd::bf16;
  using P = b16::Packet;
  constexpr int W = 16;
  P acc[MR][NR];
  unroll<MR>([&](auto m) {
    unroll<NR>([&](auto n) { acc[m][n] = init.template start<P>(Cm + m * cm + n * W, col0 + n * W); });
  });
  const Index pairs = K / 2;
  for (Index tp = 0; tp < pairs; ++tp) {
    b16::Pairs b[NR];
    unroll<NR>([&](auto n) { b[n] = b16::load(Bp + tp * bp + n * 2 * W); });
    unroll<MR>([&](auto m) {
      const b16::Pairs x = kInPlace ? b16::broadcast_swapped(A + m * am + 2 * tp) : b16::broadcast(A + m * am + tp * ap);
      unroll<NR>([&](auto n) { acc[m][n] = b16::dot2(acc[m][n], x, b[n]); });
    });
  }
  if (K % 2 != 0) {
    b16::Pairs b[NR];
    unroll<NR>([&](auto n) { b[n] = b16::load(Bp + pairs * bp + n * 2 * W); });
    unroll<MR>([&](auto m) {
      const b16::Pairs x = b16::broadcast_high(A + m * am + (kInPlace ? 2 * pairs : pairs * ap + 1));
      unroll<NR>([&](auto n) { acc[m][n] = b16::dot2(acc[m][n], x, b[n]); });
    });
  }
  unroll<MR>([&](auto m) {
    unroll<NR>([&](auto n) { epi.finish(Cm + m * cm + n * W, col0 + n * W, acc[m][n]); });
  });
}

template <int M, int NR, bool kInPlace, class Init, class Epi>
inline void pair_rest(Index m, Index K, const Eigen::bfloat16* A, Index am, Index ap, const Eigen::bfloat16* Bp,
                      Index bp, float* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  if constexpr (M >= 1) {
    if (m == M) pair_block<M, NR, kInPlace>(K, A, am, ap, Bp, bp, Cm, cm, col0, init, epi);
    else pair_rest<M - 1, NR, kInPlace>(m, K, A, am, ap, Bp, bp, Cm, cm, col0, init, epi);
  }
}

// One strip of NR packets of columns (every column of B's pair rows is whole): full
// blocks of MR rows, then one remainder block.
template <int MR, int NR, bool kInPlace, class Init, class Epi>
inline void pair_strip(Index M, Index K, const Eigen::bfloat16* A, Index am, Index ap, const Eigen::bfloat16* Bp,
                       Index bp, float* Cm, Index cm, Index col0, const Init& init, const Epi& epi) {
  Index m = 0;
  for (; m + MR <= M; m += MR) pair_block<MR, NR, kInPlace>(K, A + m * am, am, ap, Bp, bp, Cm + m * cm, cm, col0, init, epi);
  if (m < M) pair_rest<MR - 1, NR, kInPlace>(M - m, K, A + m * am, am, ap, Bp, bp, Cm + m * cm, cm, col0, init, epi);
}
#endif

// Register blockings: MR rows x NR packets of accumulators, plus NR operand packets and
// one broadcast.
//  Forward: 16 registers (AVX2): 6 x 2 + 2 + 1 = 15, the classic 6x16 shape; it keeps its
//  operands in registers and measured 88-93% of the FMA peak on Zen 3, where 4 x 3 (the
//  compiler reloads operands from memory) reached ~50%. 32 registers (AVX-512): 6 x 4 +
//  4 + 1 = 29. NR * W is the forward's query block (its lanes are query rows).
//  Backward: 32 registers: 8 x 3 + 3 + 1 = 28 (its tiles are narrower: block_q rows).
template <class P>
struct ForwardBlocking {
  static constexpr int MR = simd::is_scalar_v<P> ? 4 : 6;
  static constexpr int NR = simd::is_scalar_v<P> ? 4 : (simd::kRegisters >= 32 ? 4 : 2);
};
template <class P>
struct BackwardBlocking {
  static constexpr int MR = simd::is_scalar_v<P> ? 4 : (simd::kRegisters >= 32 ? 8 : 6);
  static constexpr int NR = simd::is_scalar_v<P> ? 1 : (simd::kRegisters >= 32 ? 3 : 2);
};

}  // namespace gemm
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_MICRO_GEMM_HPP

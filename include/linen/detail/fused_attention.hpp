// SPDX-License-Identifier: Apache-2.0
//
// Internal: the fused attention forward behind dot_product_attention's fast path, the
// modules' decode steps and the vjp's forward: fused_attention(problem) picks the kernel
// for the problem's shape. The parts, one concept a file (detail/attention/):
//   problem.hpp       AttentionProblem, the one descriptor (and Flax's layout), with its
//                     index rules (grouped-query heads, a key band, per-batch lengths)
//   policy.hpp        FlaxLogits and JaxNnLogits, the logit arithmetic every kernel applies
//   micro_gemm.hpp    the register-blocked micro-GEMM family (forward and backward)
//   tiles.hpp         how a key tile meets a query block (skipping, mask tables)
//   tiled_kernel.hpp  the tiled online-softmax kernel (many query rows)
//   row_kernel.hpp    the row kernel (decode steps: one or two query rows)
//   backward.hpp      the gradient kernels
// and detail/parallel.hpp, the thread loop. Kernels are templates on the policy, the
// packet type and the register blocking: a second numerics is a second policy, another
// instruction set another packet type, never another kernel. With linen::dispatch, the
// default kernels are the CPU's level's (detail/dispatch.hpp, isa.hpp).
#ifndef LINEN_DETAIL_FUSED_ATTENTION_HPP
#define LINEN_DETAIL_FUSED_ATTENTION_HPP

#include <algorithm>
#include <type_traits>

#include "../config.hpp"
#include "../tensor.hpp"
#include "attention/micro_gemm.hpp"
#include "attention/policy.hpp"
#include "attention/problem.hpp"
#include "attention/row_kernel.hpp"
#include "attention/tiled_kernel.hpp"
#include "dispatch.hpp"
#include "parallel.hpp"
#include "simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace fused {
// The forward's register blocking (its name before the family was one).
template <class P>
using DefaultBlocking = gemm::ForwardBlocking<P>;
}  // namespace fused

// attend's kernel, for packet type P and register blocking MR x NR.
template <class Policy, class P, int MR, int NR>
void attend_kernel(const AttentionProblem<typename Policy::element_type>& a) {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  static_assert(is_element_type_v<T>, "linen: element type must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(std::is_same_v<simd::scalar_t<P>, C>, "linen: packet type must hold the policy's accum_type");
  if (a.B == 0 || a.H == 0 || a.Lq == 0) return;
  if (a.Dv == 0 && !a.row_max) return;  // nothing to write (the backward still wants m, l)
  // depth 0: q and k may have no storage (nothing is read; offsets need a non-null base)
  static const T none{};
  AttentionProblem<T> args = a;
  if (!args.query) args.query = &none;
  if (!args.key) args.key = &none;
  if (a.Lk == 0) {  // softmax over nothing: Flax's einsum gives zeros
    for (Index b = 0; b < a.B; ++b)
      for (Index i = 0; i < a.Lq; ++i)
        for (Index h = 0; h < a.H; ++h) {
          std::fill_n(a.out + b * a.o_sb + i * a.o_sl + h * a.o_sh, a.Dv, T(0));
          if (a.out_acc) std::fill_n(a.out_acc + b * a.o_sb + i * a.o_sl + h * a.o_sh, a.Dv, C(0));
          if (a.row_max) {
            a.row_max[(b * a.H + h) * a.Lq + i] = Policy::initial_max();
            a.row_sum[(b * a.H + h) * a.Lq + i] = C(0);
          }
        }
    return;
  }
  // Decode steps (a query row or two): the row kernel, split over key chunks. A few more
  // rows: the tiled kernel with one vector of rows per block. Else the full blocking.
  const int path = a.tuning.path != 0 ? a.tuning.path : (a.Lq <= 2 ? 2 : 1);
  if (path == 2) fused::run_row_kernel<Policy, P>(args);
  else if (NR > 1 && a.Lq <= simd::size_v<P>) fused::run_kernel<Policy, P, MR, 1>(args);
  else fused::run_kernel<Policy, P, MR, NR>(args);
}

// Computes attention for `a` (see AttentionProblem) with the numerics of `Policy`,
// writing a.out (and a.row_max, a.row_sum, a.out_acc when set). The arguments must be
// consistent (dot_product_attention validates them); nothing here throws except
// std::bad_alloc for the scratch: per thread at most ~1 MiB of query-block state plus a
// few tiles (independent of the key length), and for the row kernel one (Dv + 2)-element
// state per key chunk, head and query row (and, with linen::dispatch, the
// linen::invalid_argument of an unusable LINEN_ISA: see isa.hpp).
// P, MR and NR choose the packet type and the register blocking (tests instantiate other
// widths; MR, NR = 0: P's default blocking). Left at their defaults, the kernel is the
// target's: the active level's through linen::dispatch's table when LINEN_DISPATCH is
// defined, else this translation unit's widest packet and its register count's blocking.
template <class Policy, class P = dispatch::TargetPacket, int MR = 0, int NR = 0>
void attend(const AttentionProblem<typename Policy::element_type>& a) {
  using C = typename Policy::accum_type;
  if constexpr (std::is_same_v<P, dispatch::TargetPacket> && MR == 0 && NR == 0) {
#if defined(LINEN_DISPATCH)
    dispatch::call<dispatch::Forward<Policy>>(a);
#else
    attend<Policy, simd::packet_t<C>>(a);
#endif
  } else if constexpr (std::is_same_v<P, dispatch::TargetPacket>) {
    attend<Policy, simd::packet_t<C>, MR, NR>(a);
  } else {
    attend_kernel<Policy, P, MR != 0 ? MR : gemm::ForwardBlocking<P>::MR, NR != 0 ? NR : gemm::ForwardBlocking<P>::NR>(
        a);
  }
}

// attend with Flax's numerics (the name every caller uses).
template <class T, class P = dispatch::TargetPacket, int MR = 0, int NR = 0>
void fused_attention(const AttentionProblem<T>& a) {
  attend<FlaxLogits<T>, P, MR, NR>(a);
}

}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_FUSED_ATTENTION_HPP

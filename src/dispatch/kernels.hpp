// SPDX-License-Identifier: Apache-2.0
//
// linen::dispatch: one level's kernel table. Included by exactly one translation unit per
// level (sse2.cpp, avx2.cpp, ...), each compiled with its level's flags, so that Eigen
// and linen's kernels (detail/simd.hpp, detail/attention/) pick that level's packets and
// register blocking; the kernels are then in the level's ISA namespace
// (LINEN_ISA_NAMESPACE, config.hpp). LINEN_DISPATCH_LEVEL(name) defines the level's one
// exported symbol, extern "C" linen_dispatch_table_<name>(): CMake partially links each
// level's object and makes every other symbol in it local (cmake/linenDispatch.cmake),
// so that no inline function compiled with these flags (linen's, Eigen's or the standard
// library's) can stand in for another translation unit's copy.
#ifndef LINEN_SRC_DISPATCH_KERNELS_HPP
#define LINEN_SRC_DISPATCH_KERNELS_HPP

#if defined(LINEN_DISPATCH)
#error "linen: src/dispatch/ compiles the kernels themselves: LINEN_DISPATCH must not be defined here"
#endif

#include <type_traits>

#include "linen/detail/attention/backward.hpp"
#include "linen/detail/dispatch.hpp"
#include "linen/detail/fused_attention.hpp"
#include "linen/detail/gemm/gemm.hpp"
#include "linen/detail/gemm/gemv.hpp"
#include "linen/detail/gemm/pairs.hpp"
#include "linen/detail/simd.hpp"

namespace linen {
namespace detail {
inline namespace LINEN_ISA_NAMESPACE {
namespace dispatch_level {

// Impl<E>::run: entry E (detail/dispatch.hpp) as this level compiles it: the header
// kernel with the level's widest packet and its default blocking.
template <class E>
struct Impl;

template <class Policy>
struct Impl<dispatch::Forward<Policy>> {
  static void run(const AttentionProblem<typename Policy::element_type>& a) {
    attend<Policy, simd::packet_t<typename Policy::accum_type>>(a);
  }
};

template <class Policy>
struct Impl<dispatch::Backward<Policy>> {
  using T = typename dispatch::Backward<Policy>::T;
  using C = typename dispatch::Backward<Policy>::C;
  static void run(const AttentionProblem<T>& a, const C* out, const C* row_max, const C* row_sum, const T* dout, T* dq,
                  T* dk, T* dv, C* dbias, Index block_q, Index block_k) {
    attention_backward_fused<Policy, simd::packet_t<C>>(a, out, row_max, row_sum, dout, dq, dk, dv, dbias, block_q,
                                                        block_k);
  }
};

template <class T>
struct Impl<dispatch::Gemm<T>> {
  static void run(Index M, Index K, const T* A, Index lda, const GemmOutput<T>* outs, int count,
                  Eigen::ThreadPoolInterface* pool) {
    gemm::gemm_outputs<T, simd::packet_t<T>>(M, K, A, lda, outs, count, pool);
  }
};

template <class T>
struct Impl<dispatch::Gemv<T>> {
  static void run(Index M, Index N, Index K, const T* x, Index ldx, const T* W, Index ldw, const T* bias, T* y,
                  Index ldy, Eigen::ThreadPoolInterface* pool) {
    gemm::gemv<T, simd::packet_t<T>>(M, N, K, x, ldx, W, ldw, bias, y, ldy, pool);
  }
};

// The pair products exist where this level targets avx512_bf16; elsewhere the entries
// are null (dispatch::available).
#if LINEN_SIMD_HAS_BF16_DOT
template <>
struct Impl<dispatch::GemmPairs> {
  static void run(Index M, Index K, const Eigen::bfloat16* A, Index lda,
                  const GemmOutput<float, Eigen::bfloat16>* outs, int count, Eigen::ThreadPoolInterface* pool) {
    gemm::gemm_pairs(M, K, A, lda, outs, count, pool);
  }
};
template <>
struct Impl<dispatch::GemvPairs> {
  static void run(Index M, Index N, Index K, const Eigen::bfloat16* x, Index ldx, const Eigen::bfloat16* panels,
                  float* y, Index ldy, Eigen::ThreadPoolInterface* pool) {
    gemm::gemv_pairs(M, N, K, x, ldx, panels, y, ldy, pool);
  }
};
template <class E>
constexpr typename E::fn entry() {
  return &Impl<E>::run;
}
#else
template <class E>
constexpr typename E::fn entry() {
  if constexpr (std::is_same_v<E, dispatch::GemmPairs> || std::is_same_v<E, dispatch::GemvPairs>) return nullptr;
  else return &Impl<E>::run;
}
#endif

template <class... E>
dispatch::Table make_table(dispatch::List<E...>) {
  return dispatch::Table{entry<E>()...};
}

}  // namespace dispatch_level
}  // namespace LINEN_ISA_NAMESPACE
}  // namespace detail
}  // namespace linen

// Defines linen_dispatch_table_<level>(), the level's table (its one global symbol).
#define LINEN_DISPATCH_LEVEL(level)                                                              \
  extern "C" __attribute__((visibility("default"))) const linen::detail::dispatch::Table*      \
  linen_dispatch_table_##level() {                                                             \
    static const linen::detail::dispatch::Table table =                                        \
        linen::detail::dispatch_level::make_table(linen::detail::dispatch::Entries{});         \
    return &table;                                                                             \
  }

#endif  // LINEN_SRC_DISPATCH_KERNELS_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Internal: the function tables of linen::dispatch (runtime ISA dispatch, see isa.hpp).
// A table holds one function pointer per entry (a kernel entry point for one policy or
// element type); src/dispatch/ compiles one table per level, each in its own
// translation unit with that level's flags, and the library picks one table for the
// process. The kernels' front doors (detail::attend, attention_backward_fused) call
// through it when LINEN_DISPATCH is defined and their packet parameter is left at
// TargetPacket; with an explicit packet type, or header-only, they run the kernel
// compiled in the calling translation unit.
//
// Adding a logit policy: one line in Policies. Adding an entry: its type here (the
// function's signature as `fn`, listed in PolicyEntries or OtherEntries), its Impl in
// src/dispatch/kernels.hpp, and dispatch::call<Entry>(...) at its front door.
#ifndef LINEN_DETAIL_DISPATCH_HPP
#define LINEN_DETAIL_DISPATCH_HPP

#include <cstddef>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include "../isa.hpp"
#include "../tensor.hpp"
#include "attention/policy.hpp"
#include "attention/problem.hpp"
#include "gemm/output.hpp"

namespace linen {
namespace detail {
namespace dispatch {

// The default of the kernels' packet parameter: the widest packet of the level that runs
// (with linen::dispatch, the active level's; header-only, this translation unit's).
struct TargetPacket {};

template <class... E>
struct List {};

// The logit policies the tables serve.
using Policies = List<FlaxLogits<float>, FlaxLogits<double>, FlaxLogits<Eigen::half>, FlaxLogits<Eigen::bfloat16>,
                      JaxNnLogits<float>, JaxNnLogits<double>, JaxNnLogits<Eigen::half>, JaxNnLogits<Eigen::bfloat16>>;

// detail::attend<Policy> (fused_attention.hpp): the forward.
template <class Policy>
struct Forward {
  using fn = void (*)(const AttentionProblem<typename Policy::element_type>&);
};
// detail::attention_backward_fused<Policy> (attention/backward.hpp).
template <class Policy>
struct Backward {
  using T = typename Policy::element_type;
  using C = typename Policy::accum_type;
  using fn = void (*)(const AttentionProblem<T>&, const C* out, const C* row_max, const C* row_sum, const T* dout,
                      T* dq, T* dk, T* dv, C* dbias, Index block_q, Index block_k);
};

// detail::gemm::gemm_outputs<T> (gemm/gemm.hpp), the projections' products: float, double.
template <class T>
struct Gemm {
  using fn = void (*)(Index M, Index K, const T* A, Index lda, const GemmOutput<T>* outs, int count,
                      Eigen::ThreadPoolInterface* pool);
};

// detail::gemm::gemv<T> (gemm/gemv.hpp), the decode step's projections: float, double.
template <class T>
struct Gemv {
  using fn = void (*)(Index M, Index N, Index K, const T* x, Index ldx, const T* W, Index ldw, const T* bias, T* y,
                      Index ldy, Eigen::ThreadPoolInterface* pool);
};

// detail::gemm::gemm_pairs and gemv_pairs (gemm/pairs.hpp), the bfloat16 projections'
// products with vdpbf16ps: only levels whose compiler targets avx512_bf16 have them, the
// other levels' tables hold null (see available()).
struct GemmPairs {
  using fn = void (*)(Index M, Index K, const Eigen::bfloat16* A, Index lda,
                      const GemmOutput<float, Eigen::bfloat16>* outs, int count, Eigen::ThreadPoolInterface* pool);
};
struct GemvPairs {
  using fn = void (*)(Index M, Index N, Index K, const Eigen::bfloat16* x, Index ldx, const Eigen::bfloat16* panels,
                      float* y, Index ldy, Eigen::ThreadPoolInterface* pool);
};

// The entries of each policy (a forward and its backward), and those tied to no policy.
template <class Policy>
struct EntriesOf {
  using type = List<Forward<Policy>, Backward<Policy>>;
};
template <class Policy>
using PolicyEntries = typename EntriesOf<Policy>::type;
using OtherEntries = List<Gemm<float>, Gemm<double>, Gemv<float>, Gemv<double>, GemmPairs, GemvPairs>;

template <class... L>
struct Concat;
template <class... A>
struct Concat<List<A...>> {
  using type = List<A...>;
};
template <class... A, class... B, class... R>
struct Concat<List<A...>, List<B...>, R...> : Concat<List<A..., B...>, R...> {};

template <class L>
struct AllEntries;
template <class... P>
struct AllEntries<List<P...>> : Concat<PolicyEntries<P>..., OtherEntries> {};

// Every entry, in table order.
using Entries = typename AllEntries<Policies>::type;

template <class E, class L>
struct IndexOf;
template <class E, class... R>
struct IndexOf<E, List<E, R...>> : std::integral_constant<std::size_t, 0> {};
template <class E, class F, class... R>
struct IndexOf<E, List<F, R...>> : std::integral_constant<std::size_t, 1 + IndexOf<E, List<R...>>::value> {};

template <class L>
struct TableOf;
template <class... E>
struct TableOf<List<E...>> {
  using type = std::tuple<typename E::fn...>;
};
// One level's kernels: a pointer per entry, in Entries' order.
using Table = typename TableOf<Entries>::type;

// The active level's table (linen::active_isa()); defined by linen::dispatch.
const Table& active_table();
// The table of `level` (which the CPU must support); defined by linen::dispatch.
const Table& table_of(Isa level);

// Entry E of the active level, called with `args`.
template <class E, class... A>
void call(A&&... args) {
  std::get<IndexOf<E, Entries>::value>(active_table())(std::forward<A>(args)...);
}

// Whether the active level has entry E (a level may hold null for an entry its
// instruction set lacks: GemmPairs, GemvPairs).
template <class E>
bool available() {
  return std::get<IndexOf<E, Entries>::value>(active_table()) != nullptr;
}

// Bit i set: the CPU supports level Isa(i) (detected once).
unsigned cpu_levels();
// The level LINEN_ISA=`value` asks for on a CPU with levels `cpu` (cpu_levels()'s bits):
// `what` names the setting in the message of the linen::invalid_argument thrown for an
// unknown name or a level the CPU lacks.
Isa choose_level(std::string_view value, unsigned cpu, const char* what);
// Throws linen::invalid_argument (naming `what`, the level and the CPU's levels) unless
// `cpu` has `level`.
void require_level(Isa level, unsigned cpu, const char* what);

}  // namespace dispatch
}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_DISPATCH_HPP

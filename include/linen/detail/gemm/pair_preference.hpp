// SPDX-License-Identifier: Apache-2.0
//
// Internal: where vdpbf16ps (the bfloat16 pair products, simd::bf16::dot2) is the faster
// product for compute-bound work: on AMD CPUs. Measured on an Intel Xeon with avx512_bf16
// (Sapphire Rapids class, a KVM guest, 2026-12-02): the pair register tile of the GEMM ran
// at 0.53-0.60x the float tile (vdpbf16ps there issues at about a quarter of the FMA rate,
// two products a lane each), the pair GEMM at 0.66-0.70x the float GEMM, and the bfloat16
// attention core with pairs at 0.51-0.73x float32, against 0.91-1.05x with K and V widened
// to float. There linen::dispatch's avx512_bf16 level runs the avx512 level's bfloat16
// forward kernels (dispatch.cpp) and DenseGeneral the float GEMM (gemm::pair_gemm): the
// same bits on normal numbers (the pair member gives the float family's). The decode
// step's pair GEMV over kept panels, memory-bound, gained 1.4-2.7x there and runs at
// avx512_bf16 on every CPU. (The AMD side rests on the README's Zen 5 measurements of the
// pair kernels, not on a run of this rule there.)
#ifndef LINEN_DETAIL_GEMM_PAIR_PREFERENCE_HPP
#define LINEN_DETAIL_GEMM_PAIR_PREFERENCE_HPP

#include <cstdlib>
#include <string>

#include "../../errors.hpp"

namespace linen {
namespace detail {

// LINEN_BF16_PAIRS=1 (or 0) in the environment forces (or forbids) the pair products
// wherever this rule decides, on any CPU with avx512_bf16: the test suite's avx512_bf16
// runs set it to 1, so that the pair kernels run on every machine that has them. Read
// once per process; another value throws linen::invalid_argument naming it.
inline bool pairs_preferred() {
  static const bool preferred = [] {
    const char* env = std::getenv("LINEN_BF16_PAIRS");
    if (env && *env) {
      const std::string v(env);
      if (v == "1") return true;
      if (v == "0") return false;
      throw linen::invalid_argument("linen: LINEN_BF16_PAIRS is \"" + v + "\"; expected 1 (use vdpbf16ps) or 0 (never)");
    }
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
#else
    return false;
#endif
  }();
  return preferred;
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GEMM_PAIR_PREFERENCE_HPP

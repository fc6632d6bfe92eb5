// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_CONFIG_HPP
#define LINEN_CONFIG_HPP

#include <cstdlib>
#include <cstdio>

// LINEN_ASSERT checks internal invariants (never user input: that throws).
// Tests, or users, may define LINEN_ASSERT before including linen to throw
// instead of aborting.
#ifndef LINEN_ASSERT
#define LINEN_ASSERT(cond)                                                        \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "linen: internal invariant failed at %s:%d: %s\n",     \
                   __FILE__, __LINE__, #cond);                                    \
      std::abort();                                                               \
    }                                                                             \
  } while (false)
#endif

// LINEN_ISA_NAMESPACE names the instruction set this translation unit compiles linen's
// SIMD kernels for (Eigen picks its packet types from the same compiler macros). The
// kernels (detail/simd.hpp, detail/attention/) live in `inline namespace
// LINEN_ISA_NAMESPACE`, so that the same templates compiled with different ISA flags in
// two translation units (linen::dispatch's per-level objects, or a program mixing
// -march settings) are different functions, never merged by the linker. Types shared by
// all levels (AttentionProblem, the logit policies, RowScratch) stay outside it.
#if defined(EIGEN_DONT_VECTORIZE)
#define LINEN_ISA_NAMESPACE isa_scalar
#elif defined(__AVX512F__) && defined(__AVX512BF16__)
#define LINEN_ISA_NAMESPACE isa_avx512_bf16
#elif defined(__AVX512F__)
#define LINEN_ISA_NAMESPACE isa_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define LINEN_ISA_NAMESPACE isa_avx2_fma
#elif defined(__AVX2__)
#define LINEN_ISA_NAMESPACE isa_avx2
#elif defined(__AVX__) && defined(__FMA__)
#define LINEN_ISA_NAMESPACE isa_avx_fma
#elif defined(__AVX__)
#define LINEN_ISA_NAMESPACE isa_avx
#elif defined(__SSE4_1__)
#define LINEN_ISA_NAMESPACE isa_sse4
#elif defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#define LINEN_ISA_NAMESPACE isa_sse2
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
#define LINEN_ISA_NAMESPACE isa_neon
#else
#define LINEN_ISA_NAMESPACE isa_generic
#endif

#endif  // LINEN_CONFIG_HPP

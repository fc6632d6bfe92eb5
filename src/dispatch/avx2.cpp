// SPDX-License-Identifier: Apache-2.0
// linen::dispatch: the avx2 level, compiled with -march=x86-64 -mavx2 -mfma -mf16c.
#include "kernels.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__) || defined(__AVX512F__)
#error "linen: src/dispatch/avx2.cpp must be compiled with -mavx2 -mfma -mf16c and without AVX-512"
#endif
static_assert(linen::detail::simd::kRegisters == 16, "linen: avx2 blocks for 16 vector registers");

LINEN_DISPATCH_LEVEL(avx2)

// SPDX-License-Identifier: Apache-2.0
// linen::dispatch: the sse2 level (x86-64's baseline), compiled with -march=x86-64.
#include "kernels.hpp"

#if !defined(__SSE2__) || defined(__SSE3__) || defined(__AVX__)
#error "linen: src/dispatch/sse2.cpp must be compiled for x86-64's baseline (-march=x86-64, no -m flags beyond it)"
#endif
static_assert(linen::detail::simd::kRegisters == 16, "linen: sse2 blocks for 16 vector registers");

LINEN_DISPATCH_LEVEL(sse2)

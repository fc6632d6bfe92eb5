// SPDX-License-Identifier: Apache-2.0
// linen::dispatch: the avx512 level, compiled with avx2's flags and -mavx512f -mavx512bw
// -mavx512vl -mavx512dq.
#include "kernels.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    defined(__AVX512BF16__)
#error "linen: src/dispatch/avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq, without -mavx512bf16"
#endif
static_assert(linen::detail::simd::kRegisters == 32, "linen: avx512 blocks for 32 vector registers");

LINEN_DISPATCH_LEVEL(avx512)

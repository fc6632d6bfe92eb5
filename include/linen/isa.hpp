// SPDX-License-Identifier: Apache-2.0
//
// The instruction-set levels of linen's attention kernels, and (with linen::dispatch) the
// level they run at.
//
// Header-only (linen::linen), the kernels are compiled for the flags of the translation
// unit that includes them (-march=native gives the machine's best). A program linked
// with linen::dispatch (x86-64, GCC or Clang) carries the kernels of every level below,
// each compiled with its own flags, and runs those of one level, chosen once for the
// process: the LINEN_ISA environment variable when it is set, else the best level the
// CPU and the operating system support. Results may differ between levels by rounding
// (FMA contraction, lane order), never beyond the kernels' tolerance.
#ifndef LINEN_ISA_HPP
#define LINEN_ISA_HPP

#include <string_view>
#include <vector>

namespace linen {

// The levels, lowest first; each implies the ones before it.
//   sse2         x86-64's baseline: every x86-64 CPU
//   avx2         AVX2, FMA and F16C (Intel Haswell, AMD Zen and later)
//   avx512       avx2 and AVX-512 F, BW, VL, DQ (Intel Skylake-SP, AMD Zen 4 and later)
//   avx512_bf16  avx512 and AVX512_BF16 (Intel Cooper Lake, Sapphire Rapids; AMD Zen 4+)
enum class Isa : int { sse2 = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

// The level's name as LINEN_ISA spells it: "sse2", "avx2", "avx512", "avx512_bf16".
constexpr const char* isa_name(Isa level) noexcept {
  switch (level) {
    case Isa::sse2: return "sse2";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_bf16: return "avx512_bf16";
  }
  return "unknown";
}

#if defined(LINEN_DISPATCH)  // defined by linking linen::dispatch
// The levels this CPU and its operating system support (libgcc's / compiler-rt's
// __builtin_cpu_supports, which also check that the OS saves the AVX / AVX-512 state),
// lowest first; sse2 always.
std::vector<Isa> supported_isas();
// The best of supported_isas().
Isa detected_isa();
// The level named `name`: "sse2", "avx2", "avx512", "avx512_bf16", or "native" (the
// detected level). Throws linen::invalid_argument naming `name` and the known names.
Isa parse_isa(std::string_view name);
// The level the kernels run at. Chosen at the first call of this or of a kernel: the
// level LINEN_ISA names (when set and not empty), else detected_isa(). Throws linen::invalid_argument when
// LINEN_ISA names no level or one this CPU lacks (naming it and the CPU's levels): linen
// never falls back silently.
Isa active_isa();
// Makes `level` the active level for the whole process, overriding LINEN_ISA; calls in
// flight on other threads finish at the level they started with. Throws
// linen::invalid_argument naming the level and the CPU's levels when the CPU lacks it
// (the active level is then unchanged).
void set_isa(Isa level);
// set_isa(parse_isa(name)).
void set_isa(std::string_view name);
#endif

}  // namespace linen

#endif  // LINEN_ISA_HPP

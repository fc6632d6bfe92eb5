// SPDX-License-Identifier: Apache-2.0
//
// linen::dispatch: which level's table runs (isa.hpp). Compiled with the consumer's
// flags (no ISA flags): it only detects the CPU and picks a table.
#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <cpuid.h>

#include "linen/detail/dispatch.hpp"
#include "linen/detail/gemm/pair_preference.hpp"
#include "linen/errors.hpp"
#include "linen/isa.hpp"

// The levels' tables (src/dispatch/<level>.cpp, each its object's one global symbol).
extern "C" {
const linen::detail::dispatch::Table* linen_dispatch_table_sse2();
const linen::detail::dispatch::Table* linen_dispatch_table_avx2();
const linen::detail::dispatch::Table* linen_dispatch_table_avx512();
const linen::detail::dispatch::Table* linen_dispatch_table_avx512_bf16();
}

namespace linen {
namespace detail {
namespace dispatch {
namespace {

constexpr Isa kLevels[] = {Isa::sse2, Isa::avx2, Isa::avx512, Isa::avx512_bf16};

// F16C (CPUID.1:ECX bit 29): clang 14's __builtin_cpu_supports has no name for it.
bool has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
}

unsigned detect() {
  __builtin_cpu_init();
  // __builtin_cpu_supports reports AVX and AVX-512 features only when the OS saves their
  // register state (libgcc and compiler-rt check XGETBV's YMM / ZMM bits).
  unsigned levels = 1u << static_cast<int>(Isa::sse2);  // x86-64
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  if (!avx2) return levels;
  levels |= 1u << static_cast<int>(Isa::avx2);
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return levels;
  levels |= 1u << static_cast<int>(Isa::avx512);
  if (__builtin_cpu_supports("avx512bf16")) levels |= 1u << static_cast<int>(Isa::avx512_bf16);
  return levels;
}

bool has(unsigned cpu, Isa level) { return (cpu >> static_cast<int>(level)) & 1u; }

std::string level_list(unsigned cpu) {
  std::string s;
  for (Isa l : kLevels) {
    if (!has(cpu, l)) continue;
    if (!s.empty()) s += ", ";
    s += isa_name(l);
  }
  return s;
}

Isa best(unsigned cpu) {
  Isa b = Isa::sse2;
  for (Isa l : kLevels)
    if (has(cpu, l)) b = l;
  return b;
}

// The table of a level, unchecked.
const Table* table_ptr(Isa level) {
  switch (level) {
    case Isa::sse2: return linen_dispatch_table_sse2();
    case Isa::avx2: return linen_dispatch_table_avx2();
    case Isa::avx512: return linen_dispatch_table_avx512();
    case Isa::avx512_bf16: {
      // Where vdpbf16ps is not the faster product (gemm/pair_preference.hpp), the bfloat16
      // forward kernels of avx512 (K and V widened to float: the same bits on normal
      // numbers); the pair GEMM and GEMV entries stay (DenseGeneral chooses by
      // gemm::pair_gemm, the decode step's GEMV is memory-bound).
      static const Table table = [] {
        Table t = *linen_dispatch_table_avx512_bf16();
        if (!pairs_preferred()) {
          const Table& w = *linen_dispatch_table_avx512();
          using Flax = Forward<FlaxLogits<Eigen::bfloat16>>;
          using JaxNn = Forward<JaxNnLogits<Eigen::bfloat16>>;
          std::get<IndexOf<Flax, Entries>::value>(t) = std::get<IndexOf<Flax, Entries>::value>(w);
          std::get<IndexOf<JaxNn, Entries>::value>(t) = std::get<IndexOf<JaxNn, Entries>::value>(w);
        }
        return t;
      }();
      return &table;
    }
  }
  return nullptr;
}

// The active level (-1: not chosen yet); its table is table_ptr(level).
std::atomic<int> active_level{-1};

// The first choice: LINEN_ISA, else the CPU's best. Runs once (a static's initialiser);
// when it throws, the next kernel call tries (and throws) again. set_isa, when it ran
// first, wins.
Isa initial_level() {
  static const Isa first = [] {
    const unsigned cpu = cpu_levels();
    const char* env = std::getenv("LINEN_ISA");
    const Isa level = env && *env ? choose_level(env, cpu, "LINEN_ISA") : best(cpu);  // empty: unset
    int none = -1;
    active_level.compare_exchange_strong(none, static_cast<int>(level), std::memory_order_acq_rel);
    return level;
  }();
  (void)first;
  return static_cast<Isa>(active_level.load(std::memory_order_acquire));
}

Isa current_level() {
  const int l = active_level.load(std::memory_order_acquire);
  return l >= 0 ? static_cast<Isa>(l) : initial_level();
}

}  // namespace

unsigned cpu_levels() {
  static const unsigned levels = detect();
  return levels;
}

void require_level(Isa level, unsigned cpu, const char* what) {
  if (has(cpu, level)) return;
  throw linen::invalid_argument(std::string("linen: ") + what + ": this CPU does not support " + isa_name(level) +
                                " (it supports " + level_list(cpu) + ")");
}

Isa choose_level(std::string_view value, unsigned cpu, const char* what) {
  for (Isa l : kLevels) {
    if (value == isa_name(l)) {
      require_level(l, cpu, (std::string(what) + "=" + std::string(value)).c_str());
      return l;
    }
  }
  if (value == "native") return best(cpu);
  throw linen::invalid_argument(std::string("linen: ") + what + ": '" + std::string(value) +
                                "' is not an instruction-set level (known: sse2, avx2, avx512, avx512_bf16, native; "
                                "this CPU supports " + level_list(cpu) + ")");
}

const Table& table_of(Isa level) {
  require_level(level, cpu_levels(), "linen::dispatch");
  const Table* t = table_ptr(level);
  if (!t) throw linen::invalid_argument("linen::dispatch: no level " + std::to_string(static_cast<int>(level)));
  return *t;
}

const Table& active_table() { return *table_ptr(current_level()); }

}  // namespace dispatch
}  // namespace detail

std::vector<Isa> supported_isas() {
  std::vector<Isa> v;
  const unsigned cpu = detail::dispatch::cpu_levels();
  for (Isa l : detail::dispatch::kLevels)
    if (detail::dispatch::has(cpu, l)) v.push_back(l);
  return v;
}

Isa detected_isa() { return detail::dispatch::best(detail::dispatch::cpu_levels()); }

Isa parse_isa(std::string_view name) {
  // Unknown names throw whatever the CPU; known ones the CPU lacks are still levels.
  for (Isa l : detail::dispatch::kLevels)
    if (name == isa_name(l)) return l;
  return detail::dispatch::choose_level(name, detail::dispatch::cpu_levels(), "linen::parse_isa");
}

Isa active_isa() { return detail::dispatch::current_level(); }

void set_isa(Isa level) {
  detail::dispatch::require_level(level, detail::dispatch::cpu_levels(),
                                  (std::string("linen::set_isa(") + isa_name(level) + ")").c_str());
  detail::dispatch::active_level.store(static_cast<int>(level), std::memory_order_release);
}

void set_isa(std::string_view name) { set_isa(parse_isa(name)); }

}  // namespace linen

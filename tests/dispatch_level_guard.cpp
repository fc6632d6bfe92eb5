// SPDX-License-Identifier: Apache-2.0
// Linked into the test binaries that ctest runs once per instruction-set level
// (tests/CMakeLists.txt, with LINEN_ISA=<level> in their environment): on a CPU without
// that level the binary exits with 77, ctest's SKIP_RETURN_CODE, before any test runs,
// saying why. Names that are no level are left to the kernels, which throw for them.
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include <linen/isa.hpp>

namespace {

const bool level_checked = [] {
  const char* env = std::getenv("LINEN_ISA");
  if (!env || !*env) return true;
  for (linen::Isa l : {linen::Isa::sse2, linen::Isa::avx2, linen::Isa::avx512, linen::Isa::avx512_bf16}) {
    if (std::string_view(env) != linen::isa_name(l)) continue;
    for (linen::Isa s : linen::supported_isas())
      if (s == l) return true;
    std::fprintf(stderr, "SKIP: LINEN_ISA=%s: this CPU lacks the level (its best is %s)\n", env,
                 linen::isa_name(linen::detected_isa()));
    std::exit(77);
  }
  return true;
}();

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: the Orbax parsers of linen::io (OCDBT manifest, OCDBT B+tree
// node, zarr v2/v3 array metadata) on arbitrary bytes, with the re-encoding
// properties of fuzz_orbax_checks.hpp.
// Run: fuzz_orbax -dict=fuzz/orbax.dict CORPUS_DIR fuzz/corpus/orbax
#include <cstddef>
#include <cstdint>

#include "fuzz_orbax_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  linen_fuzz::check_orbax(data, size);
  return 0;
}

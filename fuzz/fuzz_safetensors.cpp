// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: linen::io::parse_safetensors (and format detection) on arbitrary
// bytes; on success the writer round trips, in both formats, must give the same
// variables back (fuzz_checks.hpp).
// Run: fuzz_safetensors -dict=fuzz/safetensors.dict CORPUS_DIR fuzz/corpus/safetensors
#include <cstddef>
#include <cstdint>

#include "fuzz_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  linen_fuzz::check_safetensors(data, size);
  linen_fuzz::check_checkpoint(data, size);
  return 0;
}

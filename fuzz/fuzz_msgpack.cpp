// SPDX-License-Identifier: Apache-2.0
// libFuzzer target: linen::io::parse_msgpack (and format detection) on arbitrary
// bytes; on success the writer round trips must give the same variables back
// (fuzz_checks.hpp). Run: fuzz_msgpack -dict=fuzz/msgpack.dict CORPUS_DIR fuzz/corpus/msgpack
#include <cstddef>
#include <cstdint>

#include "fuzz_checks.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  linen_fuzz::check_msgpack(data, size);
  linen_fuzz::check_checkpoint(data, size);
  return 0;
}

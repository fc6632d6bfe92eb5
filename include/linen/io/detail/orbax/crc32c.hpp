// SPDX-License-Identifier: Apache-2.0
//
// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of every OCDBT
// manifest, version tree node and B+tree node, and of zarr v3's `crc32c` codec
// (sharding indexes). Table-driven, one byte a step: checksums cover metadata and
// sharding indexes, never the array data itself, so speed does not matter here.
#ifndef LINEN_IO_DETAIL_ORBAX_CRC32C_HPP
#define LINEN_IO_DETAIL_ORBAX_CRC32C_HPP

#include <array>
#include <cstddef>
#include <cstdint>

namespace linen::io::detail {

inline const std::array<std::uint32_t, 256>& crc32c_table() {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0x82F63B78u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// CRC-32C of n bytes at p ("123456789" -> 0xE3069283).
inline std::uint32_t crc32c(const std::uint8_t* p, std::size_t n) {
  const auto& t = crc32c_table();
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_CRC32C_HPP

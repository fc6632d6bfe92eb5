// SPDX-License-Identifier: Apache-2.0
//
// SHA-1 (FIPS 180-4), only for Flax's rng derivation: Flax folds module names and
// rng counters into a PRNG key through the first four bytes of their SHA-1 digest
// (flax/core/scope.py `_fold_in_static`). Not for security.
#ifndef LINEN_DETAIL_SHA1_HPP
#define LINEN_DETAIL_SHA1_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace linen::detail {

// Incremental SHA-1: update() any number of times, then digest() once.
class Sha1 {
 public:
  void update(const void* data, std::size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    total_bytes_ += size;
    while (size > 0) {
      const std::size_t take = size < 64 - fill_ ? size : 64 - fill_;
      for (std::size_t i = 0; i < take; ++i) block_[fill_ + i] = p[i];
      fill_ += take;
      p += take;
      size -= take;
      if (fill_ == 64) {
        compress();
        fill_ = 0;
      }
    }
  }
  void update(std::string_view s) { update(s.data(), s.size()); }

  // The 20-byte digest; the object is spent afterwards.
  std::array<std::uint8_t, 20> digest() {
    const std::uint64_t bit_length = total_bytes_ * 8u;
    const unsigned char pad = 0x80;
    update(&pad, 1);
    const unsigned char zero = 0;
    while (fill_ != 56) update(&zero, 1);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(bit_length >> (56 - 8 * i));
    update(len, 8);
    std::array<std::uint8_t, 20> out{};
    for (std::size_t i = 0; i < 5; ++i)
      for (std::size_t j = 0; j < 4; ++j) out[4 * i + j] = static_cast<std::uint8_t>(h_[i] >> (24 - 8 * j));
    return out;
  }

 private:
  static std::uint32_t rotl(std::uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

  void compress() {
    std::uint32_t w[80];
    for (std::size_t i = 0; i < 16; ++i)
      w[i] = (std::uint32_t{block_[4 * i]} << 24) | (std::uint32_t{block_[4 * i + 1]} << 16) |
             (std::uint32_t{block_[4 * i + 2]} << 8) | std::uint32_t{block_[4 * i + 3]};
    for (std::size_t i = 16; i < 80; ++i) w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    std::uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4];
    for (std::size_t i = 0; i < 80; ++i) {
      std::uint32_t f, k;
      if (i < 20) {
        f = (b & c) | (~b & d);
        k = 0x5A827999u;
      } else if (i < 40) {
        f = b ^ c ^ d;
        k = 0x6ED9EBA1u;
      } else if (i < 60) {
        f = (b & c) | (b & d) | (c & d);
        k = 0x8F1BBCDCu;
      } else {
        f = b ^ c ^ d;
        k = 0xCA62C1D6u;
      }
      const std::uint32_t t = rotl(a, 5) + f + e + k + w[i];
      e = d;
      d = c;
      c = rotl(b, 30);
      b = a;
      a = t;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
  }

  std::array<std::uint32_t, 5> h_{0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
  std::array<unsigned char, 64> block_{};
  std::size_t fill_ = 0;
  std::uint64_t total_bytes_ = 0;
};

// SHA-1 of a whole string.
inline std::array<std::uint8_t, 20> sha1(std::string_view s) {
  Sha1 h;
  h.update(s);
  return h.digest();
}

}  // namespace linen::detail

#endif  // LINEN_DETAIL_SHA1_HPP

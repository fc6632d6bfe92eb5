// SPDX-License-Identifier: Apache-2.0
//
// Names from files, shown safely (not part of the public API). A tensor name or map
// key read from a file may hold any byte: a NUL would cut a C string, a control byte
// would garble a terminal. Every loader message and listing shows such names through
// escape_bytes / quote_bytes, one rule for every format.
#ifndef LINEN_IO_DETAIL_TEXT_HPP
#define LINEN_IO_DETAIL_TEXT_HPP

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>

namespace linen::io::detail {

// `s` with printable ASCII kept and every other byte (and '\') as \xNN.
inline std::string escape_bytes(std::string_view s) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

// `s` quoted for an error message: escape_bytes of its first 80 bytes, in single
// quotes, with the length when cut: 'params/query/kernel', 'a\x00b'.
inline std::string quote_bytes(std::string_view s) {
  const std::size_t n = std::min<std::size_t>(s.size(), 80);
  std::string out = "'" + escape_bytes(s.substr(0, n));
  if (s.size() > n) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out + "'";
}

// The offset of the first byte of `s` that is not part of valid UTF-8 (no overlong
// forms, no surrogates, nothing above U+10FFFF), or s.size() if it is all valid.
inline std::size_t utf8_error_offset(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c == 0xe0) { len = 3; lo = 0xa0; }
    else if (c >= 0xe1 && c <= 0xec) len = 3;
    else if (c == 0xed) { len = 3; hi = 0x9f; }
    else if (c >= 0xee && c <= 0xef) len = 3;
    else if (c == 0xf0) { len = 4; lo = 0x90; }
    else if (c >= 0xf1 && c <= 0xf3) len = 4;
    else if (c == 0xf4) { len = 4; hi = 0x8f; }
    else return i;
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    i += len;
  }
  return n;
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_TEXT_HPP

// SPDX-License-Identifier: Apache-2.0
//
// A bounded cursor over a byte buffer, with the encodings OCDBT uses: uint8,
// uint32 big-endian (magic values), uint32/uint64 little-endian, int32le, and
// LEB128 varints (at most 10 bytes; the 10th may only carry the top bit of a
// uint64). Every read is checked against the end of the buffer and against the
// caller's bound for the field; a fault throws linen::io_error naming the buffer
// (file), the field and the byte offset. Nothing is read out of bounds.
//
// OCDBT (tensorstore) uses riegeli's varints, which are LEB128; fields declared
// uint32 or uint16 in tensorstore (key lengths, path lengths, entry counts) are
// read as uint64 here and then bounded by the caller, so an oversized value is an
// error, never a silent truncation.
#ifndef LINEN_IO_DETAIL_ORBAX_BYTE_READER_HPP
#define LINEN_IO_DETAIL_ORBAX_BYTE_READER_HPP

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "../../../errors.hpp"

namespace linen::io::detail {

class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size, std::string what)
      : data_(data), size_(size), what_(std::move(what)) {}

  std::size_t pos() const { return pos_; }
  std::size_t size() const { return size_; }
  std::size_t remaining() const { return size_ - pos_; }
  bool at_end() const { return pos_ == size_; }
  const std::string& what() const { return what_; }

  [[noreturn]] void fail(const std::string& msg) const {
    throw io_error(what_ + ": " + msg + " (at byte " + std::to_string(pos_) + " of " + std::to_string(size_) + ")");
  }

  // n bytes, returned as a pointer into the buffer.
  const std::uint8_t* bytes(std::uint64_t n, const char* field) {
    if (n > remaining())
      fail(std::string(field) + " needs " + std::to_string(n) + " bytes, only " + std::to_string(remaining()) +
           " left");
    const std::uint8_t* p = data_ + pos_;
    pos_ += static_cast<std::size_t>(n);
    return p;
  }

  std::uint8_t u8(const char* field) { return *bytes(1, field); }

  std::uint32_t u32be(const char* field) {
    const std::uint8_t* p = bytes(4, field);
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
  }
  std::uint32_t u32le(const char* field) { return static_cast<std::uint32_t>(le(4, field)); }
  std::uint64_t u64le(const char* field) { return le(8, field); }
  std::int32_t i32le(const char* field) {
    const std::uint32_t u = u32le(field);
    return u <= 0x7FFFFFFFu ? static_cast<std::int32_t>(u)
                            : static_cast<std::int32_t>(static_cast<std::int64_t>(u) - (std::int64_t{1} << 32));
  }

  // A LEB128 varint no larger than `max`.
  std::uint64_t varint(const char* field, std::uint64_t max = std::numeric_limits<std::uint64_t>::max()) {
    const std::size_t start = pos_;
    std::uint64_t v = 0;
    for (int i = 0;; ++i) {
      if (at_end()) {
        pos_ = start;
        fail(std::string("truncated varint ") + field);
      }
      const std::uint8_t b = data_[pos_++];
      if (i == 9 && b > 1) {
        pos_ = start;
        fail(std::string("varint ") + field + " does not fit in 64 bits");
      }
      v |= static_cast<std::uint64_t>(b & 0x7Fu) << (7 * i);
      if ((b & 0x80u) == 0) break;
    }
    if (v > max) {
      pos_ = start;
      fail(std::string(field) + " = " + std::to_string(v) + " exceeds its limit " + std::to_string(max));
    }
    return v;
  }

 private:
  std::uint64_t le(int n, const char* field) {
    const std::uint8_t* p = bytes(static_cast<std::uint64_t>(n), field);
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    return v;
  }

  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::string what_;
};

// Appends LEB128 / little-endian / big-endian encodings (the writers' side).
template <class Bytes>
void put_varint(Bytes& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<std::uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<std::uint8_t>(v));
}
template <class Bytes>
void put_le(Bytes& out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
template <class Bytes>
void put_u32be(Bytes& out, std::uint32_t v) {
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_BYTE_READER_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Where a loader reads its bytes from (not part of the public API): an image in memory
// (parse_safetensors, parse_msgpack) or a file (load_safetensors, load_msgpack). The
// loaders are templates over the source, so one parser serves both, and a file's tensor
// bytes are read once, straight into the array that keeps them: loading a file needs
// the tensors' bytes plus a 64 KiB window, never a second copy of the file.
//
// A source has size(), byte(pos), read(pos, n, dst); callers check bounds first.
#ifndef LINEN_IO_DETAIL_BYTE_SOURCE_HPP
#define LINEN_IO_DETAIL_BYTE_SOURCE_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "file.hpp"

namespace linen::io::detail {

// An image in memory.
class memory_source {
 public:
  memory_source(const std::uint8_t* data, std::size_t size) : d_(data), size_(size) {}
  std::size_t size() const { return size_; }
  std::uint8_t byte(std::size_t pos) { return d_[pos]; }
  void read(std::size_t pos, std::size_t n, void* dst) {
    if (n > 0) std::memcpy(dst, d_ + pos, n);
  }

 private:
  const std::uint8_t* d_;
  std::size_t size_;
};

// A file, read through a small window for headers and directly for large reads.
class file_source {
 public:
  static constexpr std::size_t kWindow = std::size_t{1} << 16;

  explicit file_source(input_file& f) : f_(f) {}
  std::size_t size() const { return f_.size(); }
  std::uint8_t byte(std::size_t pos) {
    if (pos - begin_ >= buf_.size()) fill(pos);
    return buf_[pos - begin_];
  }
  void read(std::size_t pos, std::size_t n, void* dst) {
    if (n == 0) return;
    if (n >= kWindow) {
      f_.read_at(pos, dst, n);
      return;
    }
    if (pos < begin_ || pos + n > begin_ + buf_.size()) fill(pos);
    std::memcpy(dst, buf_.data() + (pos - begin_), n);
  }

 private:
  void fill(std::size_t pos) {
    const std::size_t n = std::min(kWindow, f_.size() - pos);
    buf_.resize(n);
    begin_ = pos;
    f_.read_at(pos, buf_.data(), n);
  }

  input_file& f_;
  std::vector<std::uint8_t> buf_;
  std::size_t begin_ = 0;
};

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_BYTE_SOURCE_HPP

// SPDX-License-Identifier: Apache-2.0
//
// The Flax msgpack writer (not part of the public API; io/msgpack.hpp documents
// to_msgpack / save_msgpack): msgpack items in the smallest format, as msgpack-python
// writes them, and Flax's chunking of large arrays.
#ifndef LINEN_IO_DETAIL_MSGPACK_WRITER_HPP
#define LINEN_IO_DETAIL_MSGPACK_WRITER_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "../../errors.hpp"
#include "../../tensor.hpp"
#include "../variables.hpp"
#include "msgpack_reader.hpp"  // kChunkMarker, the limits the writer keeps to

namespace linen::io::detail {

// Appends msgpack items in the smallest format, as msgpack-python's packer
// (use_bin_type=True) chooses them.
class msgpack_writer {
 public:
  std::vector<std::uint8_t> out;

  void byte(unsigned b) { out.push_back(static_cast<std::uint8_t>(b)); }
  void be(std::uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) byte(static_cast<unsigned>((v >> (8 * i)) & 0xff));
  }
  void uint(std::uint64_t v) {
    if (v < 0x80) byte(static_cast<unsigned>(v));
    else if (v <= 0xff) { byte(0xcc); be(v, 1); }
    else if (v <= 0xffff) { byte(0xcd); be(v, 2); }
    else if (v <= 0xffffffffu) { byte(0xce); be(v, 4); }
    else { byte(0xcf); be(v, 8); }
  }
  void boolean(bool b) { byte(b ? 0xc3 : 0xc2); }
  void str(std::string_view s) {
    const auto n = static_cast<std::uint64_t>(s.size());
    if (n < 32) byte(0xa0 | static_cast<unsigned>(n));
    else if (n <= 0xff) { byte(0xd9); be(n, 1); }
    else if (n <= 0xffff) { byte(0xda); be(n, 2); }
    else if (n <= 0xffffffffu) { byte(0xdb); be(n, 4); }
    else throw io_error("cannot write msgpack: a str of " + std::to_string(n) + " bytes exceeds msgpack's 2**32 - 1");
    out.insert(out.end(), s.begin(), s.end());
  }
  void bin_header(std::uint64_t n) {
    if (n <= 0xff) { byte(0xc4); be(n, 1); }
    else if (n <= 0xffff) { byte(0xc5); be(n, 2); }
    else if (n <= 0xffffffffu) { byte(0xc6); be(n, 4); }
    else throw io_error("cannot write msgpack: bin of " + std::to_string(n) + " bytes exceeds msgpack's 2**32 - 1");
  }
  void container_header(std::uint64_t n, unsigned fix, unsigned c16, unsigned c32) {
    if (n <= 0x0f) byte(fix | static_cast<unsigned>(n));
    else if (n <= 0xffff) { byte(c16); be(n, 2); }
    else if (n <= 0xffffffffu) { byte(c32); be(n, 4); }
    else throw io_error("cannot write msgpack: " + std::to_string(n) + " entries exceed msgpack's 2**32 - 1");
  }
  void array_header(std::uint64_t n) { container_header(n, 0x90, 0xdc, 0xdd); }
  void map_header(std::uint64_t n) { container_header(n, 0x80, 0xde, 0xdf); }
  void ext_header(int type, std::uint64_t n) {
    switch (n) {
      case 1: byte(0xd4); break;
      case 2: byte(0xd5); break;
      case 4: byte(0xd6); break;
      case 8: byte(0xd7); break;
      case 16: byte(0xd8); break;
      default:
        if (n <= 0xff) { byte(0xc7); be(n, 1); }
        else if (n <= 0xffff) { byte(0xc8); be(n, 2); }
        else if (n <= 0xffffffffu) { byte(0xc9); be(n, 4); }
        else throw io_error("cannot write msgpack: an ext of " + std::to_string(n) + " bytes exceeds msgpack's 2**32 - 1");
    }
    byte(static_cast<unsigned>(type) & 0xff);
  }

  // ext 1 holding [shape, dtype name, data] (flax's _ndarray_to_bytes) of `n` bytes at `data`.
  void ndarray(DType dtype, const Shape& shape, const std::uint8_t* data, std::size_t n) {
    msgpack_writer prefix;
    prefix.array_header(3);
    prefix.array_header(shape.size());
    for (Index d : shape) prefix.uint(static_cast<std::uint64_t>(d));
    prefix.str(numpy_name(dtype));
    msgpack_writer bin;
    bin.bin_header(n);
    ext_header(1, prefix.out.size() + bin.out.size() + n);
    out.insert(out.end(), prefix.out.begin(), prefix.out.end());
    out.insert(out.end(), bin.out.begin(), bin.out.end());
    if (n > 0) out.insert(out.end(), data, data + n);
  }
};

// The variable tree rebuilt from flat paths.
struct msgpack_node {
  const Array* leaf = nullptr;
  std::map<std::string, msgpack_node> children;
};

inline void write_array(msgpack_writer& w, const Array& a, std::size_t max_chunk_bytes) {
  const auto& bytes = a.bytes();
  if (bytes.size() <= max_chunk_bytes) {
    w.ndarray(a.dtype(), a.shape(), bytes.data(), bytes.size());
    return;
  }
  // flax.serialization._chunk: flat chunks of max(1, MAX_CHUNK_SIZE / itemsize) elements.
  const std::size_t item = itemsize(a.dtype());
  const std::size_t per_chunk = std::max<std::size_t>(1, max_chunk_bytes / item);
  const auto n = static_cast<std::size_t>(a.size());
  const std::size_t count = (n + per_chunk - 1) / per_chunk;
  w.map_header(3);
  w.str(kChunkMarker);
  w.boolean(true);
  w.str("shape");
  w.map_header(a.shape().size());
  for (std::size_t i = 0; i < a.shape().size(); ++i) {
    w.str(std::to_string(i));
    w.uint(static_cast<std::uint64_t>(a.shape()[i]));
  }
  w.str("chunks");
  w.map_header(count);
  for (std::size_t c = 0; c < count; ++c) {
    const std::size_t begin = c * per_chunk, len = std::min(per_chunk, n - begin);
    w.str(std::to_string(c));
    w.ndarray(a.dtype(), Shape{static_cast<Index>(len)}, bytes.data() + begin * item, len * item);
  }
}

inline void write_node(msgpack_writer& w, const msgpack_node& node, std::size_t max_chunk_bytes) {
  w.map_header(node.children.size());
  for (const auto& [key, child] : node.children) {
    w.str(key);
    if (child.leaf) write_array(w, *child.leaf, max_chunk_bytes);
    else write_node(w, child, max_chunk_bytes);
  }
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_MSGPACK_WRITER_HPP

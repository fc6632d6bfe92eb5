// SPDX-License-Identifier: Apache-2.0
//
// Flax msgpack checkpoints (flax/serialization.py: to_bytes / from_bytes).
//
// What flax.serialization.to_bytes(variables) writes is one msgpack map, nested as
// the state dict: string keys, one map per collection and module, and array leaves
// as msgpack ext values:
//
//   ext type 1 (ndarray)       payload: the msgpack array [shape, dtype name, data]
//                              shape an array of ints, dtype name numpy's
//                              ("float32", "bfloat16", ...), data bin, C-order,
//                              little-endian;
//   ext type 3 (numpy scalar)  the same payload with shape ();
//   ext type 2 (Python complex) is refused: linen has no complex dtype.
//
// A Python bool, int or float leaf (a TrainState's `step`) is a plain msgpack value;
// it is read as a 0-d array.
//
// Arrays of more than MAX_CHUNK_SIZE = 2**30 bytes are written as a map
// {"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": ext 1,
// ...}} of flat chunks of 2**30 / itemsize elements; the reader joins them back.
// Flattened with '/', the tree becomes linen::io::Variables ("params/query/kernel").
//
// The reader is linen's own (detail/msgpack_reader.hpp says why not msgpack-cxx):
// every fault is a linen::io_error naming the file, the byte offset and the variable
// path; nothing is read out of bounds; every declared length is checked against the
// bytes left before anything is reserved; maps and arrays nest at most
// kMsgpackMaxDepth deep, and paths are at most kMsgpackMaxPathBytes long, so memory
// stays a small multiple of the input's size. load_msgpack reads each array's bytes
// once, from the file into the array. This header needs no JSON library.
//
// Either format, told apart by content (load_checkpoint): io/checkpoint.hpp.
#ifndef LINEN_IO_MSGPACK_HPP
#define LINEN_IO_MSGPACK_HPP

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "detail/byte_source.hpp"
#include "detail/file.hpp"
#include "detail/msgpack_reader.hpp"  // also kMsgpackMaxChunkSize, kMsgpackMaxDepth, kMsgpackMaxPathBytes
#include "detail/msgpack_writer.hpp"
#include "detail/text.hpp"
#include "variables.hpp"

namespace linen::io {

// Reads the Flax msgpack image (flax.serialization.to_bytes) of `size` bytes at
// `data` into flat variables: {"params": {"query": {"kernel": <ext 1 [16, 4, 4]
// float32>}}} becomes "params/query/kernel" -> float32 array of shape (16, 4, 4).
// Accepts ext type 1 (ndarray) and 3 (numpy scalar, stored with shape ()) leaves of
// the dtypes float16, bfloat16, float32, float64, int8..int64, uint8..uint64, bool,
// and chunked arrays; Python bool, int and float leaves (TrainState.step) become 0-d
// bool, int64 (uint64 above INT64_MAX), float32 or float64 arrays as msgpack stored
// them (and are written back as ext 1). Empty maps hold no variable and leave nothing
// behind. `name` (the file name) starts every error message.
// Throws io_error, naming the byte offset and path, on: truncation anywhere; a
// declared length past the end; the byte 0xc1; nesting deeper than kMsgpackMaxDepth;
// a root that is not a map; trailing bytes after it; map keys that are not str, are
// empty, invalid UTF-8, contain '/', or repeat; paths longer than
// kMsgpackMaxPathBytes; leaves that are not arrays or numbers (nil, str, bin,
// msgpack arrays; ext 2 complex; unknown ext types); ext payloads that are not exactly
// [array of non-negative ints, str/bin dtype name, bin data]; negative, too large or
// overflowing dims; unknown dtypes; data of other than prod(shape) * itemsize bytes;
// ext 3 of a shape other than (); chunked arrays whose marker is not true, whose
// keys are not exactly the three, whose shape/chunks maps are not keyed "0".."n-1",
// whose chunks are not 1-D ext 1 of one dtype, or hold other than prod(shape)
// elements.
inline Variables parse_msgpack(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>") {
  if (data == nullptr && size != 0) throw io_error(name + ": null data of size " + std::to_string(size));
  static const std::uint8_t empty = 0;
  detail::memory_source src(data ? data : &empty, size);
  return detail::msgpack_reader<detail::memory_source>(src, name).read_root();
}

// Reads the Flax msgpack file `file` (see parse_msgpack; io_error names the file),
// each array's bytes read once, straight into the array: the peak memory is the
// arrays' bytes plus a 64 KiB window. Refuses (io_error) anything but a regular file:
// a directory, a FIFO (without blocking on it), a device.
inline Variables load_msgpack(const std::string& file) {
  detail::input_file in(file);
  detail::file_source src(in);
  return detail::msgpack_reader<detail::file_source>(src, file).read_root();
}

// The msgpack image of `v` that flax.serialization.from_bytes / msgpack_restore read
// back: paths split at '/' into nested maps (keys sorted; Flax keeps insertion
// order, which from_bytes does not depend on), each array an ext type 1 [shape, dtype
// name, C-order little-endian data] (so 0-d arrays too: Flax writes jax arrays this
// way), items in the smallest msgpack format as msgpack-python writes them. Arrays of
// more than `max_chunk_bytes` bytes (Flax's MAX_CHUNK_SIZE = 2**30; smaller values are
// for tests) are chunked exactly as Flax's _chunk does. Metadata is not written:
// Flax's format has no place for it.
// Throws io_error if a path is both an array and a prefix of another ("a" and
// "a/b"), a path component is not valid UTF-8, a path is longer than
// kMsgpackMaxPathBytes, or nests deeper than kMsgpackMaxDepth (maps of a chunked
// array included): parse_msgpack would refuse the image. Throws
// std::invalid_argument if max_chunk_bytes is 0.
inline std::vector<std::uint8_t> to_msgpack(const Variables& v, std::size_t max_chunk_bytes = kMsgpackMaxChunkSize) {
  if (max_chunk_bytes == 0) throw linen::invalid_argument("linen::io: to_msgpack: max_chunk_bytes must be positive");
  detail::msgpack_node root;
  std::size_t total = 16;
  for (const auto& [path, a] : v) {
    if (path.size() > kMsgpackMaxPathBytes)
      throw io_error("cannot write msgpack: path " + detail::quote_bytes(path) + " is longer than " +
                     std::to_string(kMsgpackMaxPathBytes) + " bytes");
    if (const auto bad = detail::utf8_error_offset(path); bad != path.size())
      throw io_error("cannot write msgpack: path " + detail::quote_bytes(path) + " is not valid UTF-8 (at byte " +
                     std::to_string(bad) + ")");
    detail::msgpack_node* node = &root;
    int depth = 0;
    std::size_t begin = 0;
    while (true) {
      const std::size_t slash = path.find('/', begin);
      const std::string key = path.substr(begin, slash == std::string::npos ? std::string::npos : slash - begin);
      if (node->leaf)
        throw io_error("cannot write msgpack: '" + path.substr(0, begin - 1) + "' is an array and also a prefix of '" +
                       path + "'");
      node = &node->children[key];
      ++depth;
      if (slash == std::string::npos) break;
      begin = slash + 1;
    }
    if (!node->children.empty())
      throw io_error("cannot write msgpack: '" + path + "' is an array and also a prefix of '" + path + "/" +
                     node->children.begin()->first + "...'");
    const int levels = depth + (a.bytes().size() > max_chunk_bytes ? 2 : 0);
    if (levels > kMsgpackMaxDepth)
      throw io_error("cannot write msgpack: '" + path + "' nests " + std::to_string(levels) +
                     " maps deep, more than the limit of " + std::to_string(kMsgpackMaxDepth));
    node->leaf = &a;
    total += a.bytes().size() + path.size() + 32;
  }
  detail::msgpack_writer w;
  w.out.reserve(total);
  detail::write_node(w, root, max_chunk_bytes);
  return std::move(w.out);
}

// Writes to_msgpack(v) to `file` (replacing it); io_error names the file on failure.
inline void save_msgpack(const std::string& file, const Variables& v) {
  detail::write_file_bytes(file, to_msgpack(v));
}

}  // namespace linen::io

#endif  // LINEN_IO_MSGPACK_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Flax msgpack checkpoints (flax/serialization.py: to_bytes / from_bytes), and
// format-agnostic checkpoint loading.
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
// The reader is written here rather than taken from msgpack-cxx: a strict reader
// of the dozen msgpack formats a Flax file can hold makes the hostile-input
// guarantees easy to check, and keeps linen::io's dependencies at nlohmann_json.
// Every fault is a linen::io_error naming the file, the byte offset and the
// variable path; nothing is read out of bounds; every declared length is checked
// against the bytes left before anything is reserved; maps and arrays nest at most
// kMsgpackMaxDepth deep, and paths are at most kMsgpackMaxPathBytes long, so memory
// stays a small multiple of the input's size.
#ifndef LINEN_IO_MSGPACK_HPP
#define LINEN_IO_MSGPACK_HPP

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"
#include "safetensors.hpp"
#include "variables.hpp"

namespace linen::io {

// Flax's MAX_CHUNK_SIZE: arrays of more bytes are written in chunks.
inline constexpr std::size_t kMsgpackMaxChunkSize = std::size_t{1} << 30;
// Maps and arrays nested deeper than this are refused (the root map is depth 1;
// a chunked array's inner maps count too).
inline constexpr int kMsgpackMaxDepth = 64;
// Variable paths longer than this (in bytes, '/' included) are refused: a long key
// is repeated in the path of every array under it.
inline constexpr std::size_t kMsgpackMaxPathBytes = 1024;

namespace detail {

inline constexpr std::string_view kChunkMarker = "__msgpack_chunked_array__";

// `s` quoted for an error message: printable ASCII kept, other bytes as \xNN,
// cut after 80 bytes.
inline std::string quote_bytes(std::string_view s) {
  static const char* hex = "0123456789abcdef";
  std::string out = "'";
  const std::size_t n = std::min<std::size_t>(s.size(), 80);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
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
    if (c < 0x80) { ++i; continue; }
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

// The msgpack value families.
enum class msgpack_kind { nil, boolean, uint, sint, float32, float64, str, bin, array, map, ext };

inline const char* kind_name(msgpack_kind k) {
  switch (k) {
    case msgpack_kind::nil: return "nil";
    case msgpack_kind::boolean: return "bool";
    case msgpack_kind::uint:
    case msgpack_kind::sint: return "int";
    case msgpack_kind::float32: return "float32";
    case msgpack_kind::float64: return "float64";
    case msgpack_kind::str: return "str";
    case msgpack_kind::bin: return "bin";
    case msgpack_kind::array: return "array";
    case msgpack_kind::map: return "map";
    case msgpack_kind::ext: return "ext";
  }
  return "?";
}

// One decoded msgpack header. Scalars are consumed whole; for str, bin and ext
// the reader stops at the payload (`body`, `length` bytes, already checked to be
// in bounds); for array and map at the first element (`length` elements / pairs).
struct msgpack_head {
  msgpack_kind kind = msgpack_kind::nil;
  std::size_t at = 0;          // offset of the format byte
  std::uint64_t length = 0;    // uint value; float bits; str/bin/ext bytes; array/map count
  std::int64_t value = 0;      // sint value
  bool truth = false;          // bool value
  int ext_type = 0;            // ext type (-128..127)
  std::size_t body = 0;        // str/bin/ext payload offset

  // "msgpack int", "msgpack array of 3", "msgpack str of 5 bytes", "msgpack ext type 1 of 21 bytes".
  std::string describe() const {
    std::string s = std::string("msgpack ") + kind_name(kind);
    if (kind == msgpack_kind::ext) s += " type " + std::to_string(ext_type);
    if (kind == msgpack_kind::array || kind == msgpack_kind::map) s += " of " + std::to_string(length);
    if (kind == msgpack_kind::str || kind == msgpack_kind::bin || kind == msgpack_kind::ext)
      s += " of " + std::to_string(length) + " bytes";
    return s;
  }
};

// A parsed ext 1 / ext 3 payload: the data stays in the input until it is copied once.
struct msgpack_ndarray {
  DType dtype = DType::F32;
  Shape shape;
  Index count = 0;
  const std::uint8_t* data = nullptr;
  std::size_t nbytes = 0;
};

// A key of a map, viewing the input.
struct msgpack_key {
  std::string_view text;
  std::size_t at = 0;  // offset of the key's format byte
};

class msgpack_reader {
 public:
  msgpack_reader(const std::uint8_t* data, std::size_t size, const std::string& name)
      : d_(data), end_(size), name_(name) {}

  Variables read_root() {
    const msgpack_head h = head("");
    if (h.kind != msgpack_kind::map)
      fail(h.at, "", "the root is a " + h.describe() + ", expected a map (Flax's state dict, {'params': {...}, ...})");
    Variables out;
    read_map(h, "", 1, out);
    if (pos_ != end_)
      fail(pos_, "", std::to_string(end_ - pos_) + " trailing bytes after the root map (which ends at byte " +
                         std::to_string(pos_) + " of " + std::to_string(end_) + ")");
    return out;
  }

 private:
  [[noreturn]] void fail(std::size_t at, const std::string& path, const std::string& msg) const {
    std::string s = name_ + ": byte " + std::to_string(at);
    if (!path.empty()) s += ", at " + quote_bytes(path);
    throw io_error(s + ": " + msg);
  }

  std::size_t left() const { return end_ - pos_; }
  const char* scope() const { return in_payload_ ? "the ext payload" : "the input"; }

  // Reads an n-byte big-endian unsigned integer (msgpack is big-endian).
  std::uint64_t be(std::size_t n, std::size_t at, const std::string& path, const char* what) {
    if (left() < n)
      fail(at, path, std::string("truncated: ") + what + " needs " + std::to_string(n) + " more bytes at byte " +
                         std::to_string(pos_) + ", " + std::to_string(left()) + " left in " + scope());
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v = (v << 8) | d_[pos_ + i];
    pos_ += n;
    return v;
  }

  // Decodes the header at pos_. `path` is the variable the value belongs to (for errors).
  msgpack_head head(const std::string& path) {
    msgpack_head h;
    h.at = pos_;
    if (left() == 0)
      fail(pos_, path, std::string("truncated: a msgpack value was expected, ") + scope() + " ends here");
    const unsigned c = d_[pos_++];
    auto sized = [&](msgpack_kind k, std::size_t width, const char* what) {
      h.kind = k;
      h.length = be(width, h.at, path, what);
    };
    if (c <= 0x7f) { h.kind = msgpack_kind::uint; h.length = c; return h; }
    if (c >= 0xe0) { h.kind = msgpack_kind::sint; h.value = static_cast<std::int64_t>(c) - 256; return h; }
    if (c >= 0x80 && c <= 0x8f) { h.kind = msgpack_kind::map; h.length = c & 0x0f; }
    else if (c >= 0x90 && c <= 0x9f) { h.kind = msgpack_kind::array; h.length = c & 0x0f; }
    else if (c >= 0xa0 && c <= 0xbf) { h.kind = msgpack_kind::str; h.length = c & 0x1f; }
    else {
      switch (c) {
        case 0xc0: h.kind = msgpack_kind::nil; return h;
        case 0xc1: fail(h.at, path, "byte 0xc1 is not a msgpack format (never used)");
        case 0xc2: case 0xc3: h.kind = msgpack_kind::boolean; h.truth = c == 0xc3; return h;
        case 0xc4: sized(msgpack_kind::bin, 1, "bin 8 length"); break;
        case 0xc5: sized(msgpack_kind::bin, 2, "bin 16 length"); break;
        case 0xc6: sized(msgpack_kind::bin, 4, "bin 32 length"); break;
        case 0xc7: sized(msgpack_kind::ext, 1, "ext 8 length"); break;
        case 0xc8: sized(msgpack_kind::ext, 2, "ext 16 length"); break;
        case 0xc9: sized(msgpack_kind::ext, 4, "ext 32 length"); break;
        case 0xca: h.kind = msgpack_kind::float32; h.length = be(4, h.at, path, "float 32"); return h;
        case 0xcb: h.kind = msgpack_kind::float64; h.length = be(8, h.at, path, "float 64"); return h;
        case 0xcc: case 0xcd: case 0xce: case 0xcf:
          h.kind = msgpack_kind::uint;
          h.length = be(std::size_t{1} << (c - 0xcc), h.at, path, "uint");
          return h;
        case 0xd0: h.kind = msgpack_kind::sint; h.value = static_cast<std::int8_t>(be(1, h.at, path, "int 8")); return h;
        case 0xd1: h.kind = msgpack_kind::sint; h.value = static_cast<std::int16_t>(be(2, h.at, path, "int 16")); return h;
        case 0xd2: h.kind = msgpack_kind::sint; h.value = static_cast<std::int32_t>(be(4, h.at, path, "int 32")); return h;
        case 0xd3: h.kind = msgpack_kind::sint; h.value = static_cast<std::int64_t>(be(8, h.at, path, "int 64")); return h;
        case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
          h.kind = msgpack_kind::ext;
          h.length = std::uint64_t{1} << (c - 0xd4);
          break;
        case 0xd9: sized(msgpack_kind::str, 1, "str 8 length"); break;
        case 0xda: sized(msgpack_kind::str, 2, "str 16 length"); break;
        case 0xdb: sized(msgpack_kind::str, 4, "str 32 length"); break;
        case 0xdc: sized(msgpack_kind::array, 2, "array 16 length"); break;
        case 0xdd: sized(msgpack_kind::array, 4, "array 32 length"); break;
        case 0xde: sized(msgpack_kind::map, 2, "map 16 length"); break;
        case 0xdf: sized(msgpack_kind::map, 4, "map 32 length"); break;
        default: fail(h.at, path, "unhandled msgpack format byte");  // unreachable: every byte is covered
      }
    }
    if (h.kind == msgpack_kind::ext) h.ext_type = static_cast<std::int8_t>(be(1, h.at, path, "ext type"));
    // Every element takes at least one byte, every pair two: a count the bytes left
    // cannot hold is refused before anything is reserved for it.
    std::uint64_t min_bytes = h.length;
    if (h.kind == msgpack_kind::map) min_bytes = 2 * h.length;  // length < 2**32
    if (min_bytes > left()) {
      const bool container = h.kind == msgpack_kind::array || h.kind == msgpack_kind::map;
      fail(h.at, path, "truncated: " + h.describe() +
                           (container ? " entries need at least " + std::to_string(min_bytes) + " bytes" : "") +
                           ", only " + std::to_string(left()) + " left in " + scope());
    }
    h.body = pos_;
    return h;
  }

  // Steps over one value (of any kind) nested inside `depth` containers.
  void skip(int depth, const std::string& path) {
    const msgpack_head h = head(path);
    switch (h.kind) {
      case msgpack_kind::str:
      case msgpack_kind::bin:
      case msgpack_kind::ext: pos_ = h.body + static_cast<std::size_t>(h.length); break;
      case msgpack_kind::array:
      case msgpack_kind::map: {
        if (depth + 1 > kMsgpackMaxDepth)
          fail(h.at, path, "maps and arrays nest deeper than " + std::to_string(kMsgpackMaxDepth));
        const std::uint64_t n = h.kind == msgpack_kind::map ? 2 * h.length : h.length;
        for (std::uint64_t i = 0; i < n; ++i) skip(depth + 1, path);
        break;
      }
      default: break;
    }
  }

  std::string child_path(const std::string& path, const msgpack_key& key) const {
    const std::size_t n = path.empty() ? key.text.size() : path.size() + 1 + key.text.size();
    if (n > kMsgpackMaxPathBytes)
      fail(key.at, path, "the path through key " + quote_bytes(key.text) + " is " + std::to_string(n) +
                             " bytes long, longer than the limit of " + std::to_string(kMsgpackMaxPathBytes));
    return path.empty() ? std::string(key.text) : path + "/" + std::string(key.text);
  }

  // A map key: a non-empty UTF-8 str without '/'.
  msgpack_key read_key(const std::string& path) {
    const msgpack_head h = head(path);
    if (h.kind != msgpack_kind::str)
      fail(h.at, path, "map key is a " + h.describe() + ", expected a str (Flax state dict keys are strings)");
    msgpack_key k{std::string_view(reinterpret_cast<const char*>(d_ + h.body), static_cast<std::size_t>(h.length)),
                  h.at};
    pos_ = h.body + static_cast<std::size_t>(h.length);
    if (k.text.empty()) fail(h.at, path, "empty map key (a variable path has no empty component)");
    if (const auto bad = utf8_error_offset(k.text); bad != k.text.size())
      fail(h.body + bad, path, "map key " + quote_bytes(k.text) + " is not valid UTF-8");
    if (k.text.find('/') != std::string_view::npos)
      fail(h.at, path, "map key " + quote_bytes(k.text) + " contains '/', which would alias another variable path");
    return k;
  }

  // Reads the map whose header is `h` (nested `depth` deep) into `out` under `path`.
  void read_map(const msgpack_head& h, const std::string& path, int depth, Variables& out) {
    if (depth > kMsgpackMaxDepth)
      fail(h.at, path, "maps and arrays nest deeper than " + std::to_string(kMsgpackMaxDepth));
    const std::size_t first = pos_;
    // First pass: the keys, values stepped over, to refuse duplicates and to spot a
    // chunked array, whose marker key may come in any position. A malformed entry
    // ends the pass: the second pass meets the same fault on its way down and
    // reports it with the exact path.
    std::vector<msgpack_key> keys;
    keys.reserve(static_cast<std::size_t>(h.length));  // h.length <= bytes left / 2
    bool chunked = false;
    std::optional<io_error> scan_error;
    std::uint64_t scanned = 0;
    for (; scanned < h.length; ++scanned) {
      try {
        keys.push_back(read_key(path));
        chunked = chunked || keys.back().text == kChunkMarker;
        skip(depth, path);
      } catch (const io_error& e) {
        scan_error = e;
        break;
      }
    }
    std::sort(keys.begin(), keys.end(), [](const msgpack_key& a, const msgpack_key& b) {
      return a.text != b.text ? a.text < b.text : a.at < b.at;
    });
    for (std::size_t i = 1; i < keys.size(); ++i)
      if (keys[i].text == keys[i - 1].text)
        fail(keys[i].at, path, "duplicate map key " + quote_bytes(keys[i].text) + " (first at byte " +
                                   std::to_string(keys[i - 1].at) + ")");
    pos_ = first;
    if (chunked) {
      if (path.empty())
        fail(h.at, path, "the root map is a chunked array (" + std::string(kChunkMarker) +
                             "), expected a map of variables");
      if (scan_error) throw *scan_error;
      read_chunked(h, path, depth, out);
      return;
    }
    for (std::uint64_t i = 0; i < h.length; ++i) {
      if (scan_error && i > scanned) throw *scan_error;  // not reached: entry `scanned` throws below
      const msgpack_key key = read_key(path);
      const std::string child = child_path(path, key);
      const msgpack_head v = head(child);
      if (v.kind == msgpack_kind::map) {
        read_map(v, child, depth + 1, out);
      } else if (v.kind == msgpack_kind::ext) {
        const msgpack_ndarray a = read_leaf(v, child);
        store(out, child, v.at, a);
      } else if (v.kind == msgpack_kind::uint || v.kind == msgpack_kind::sint || v.kind == msgpack_kind::float32 ||
                 v.kind == msgpack_kind::float64 || v.kind == msgpack_kind::boolean) {
        store_native_scalar(out, child, v);
      } else {
        fail(v.at, child, "value is a " + v.describe() +
                              ", expected a map (a collection or module), an array (ext type 1 or 3) or a number");
      }
    }
  }

  // A Python bool, int or float leaf (e.g. TrainState.step) as a 0-d array: bool,
  // int64 (uint64 above INT64_MAX), float32 or float64 as msgpack stored it.
  void store_native_scalar(Variables& out, const std::string& path, const msgpack_head& v) {
    DType dtype = DType::BOOL;
    std::uint64_t bits = 0;
    switch (v.kind) {
      case msgpack_kind::boolean: bits = v.truth ? 1 : 0; break;
      case msgpack_kind::uint:
        dtype = v.length > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ? DType::U64 : DType::I64;
        bits = v.length;
        break;
      case msgpack_kind::sint: dtype = DType::I64; bits = static_cast<std::uint64_t>(v.value); break;
      case msgpack_kind::float32: dtype = DType::F32; bits = v.length; break;
      default: dtype = DType::F64; bits = v.length; break;
    }
    std::vector<std::uint8_t> bytes(itemsize(dtype));
    for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(bits >> (8 * i));
    msgpack_ndarray a;
    a.dtype = dtype;
    a.count = 1;
    a.data = bytes.data();
    a.nbytes = bytes.size();
    store(out, path, v.at, a);
  }

  void store(Variables& out, const std::string& path, std::size_t at, const msgpack_ndarray& a) {
    if (auto why = Variables::path_error(path)) fail(at, path, "not a valid variable path: " + *why);
    out.set(path, Array(a.dtype, a.shape, std::vector<std::uint8_t>(a.data, a.data + a.nbytes)));
  }

  // An ext value holding an array: type 1 (ndarray) or 3 (numpy scalar, shape ()).
  msgpack_ndarray read_leaf(const msgpack_head& v, const std::string& path) {
    switch (v.ext_type) {
      case 1: return read_ndarray(v, path, "ext type 1 (ndarray)");
      case 3: {
        msgpack_ndarray a = read_ndarray(v, path, "ext type 3 (numpy scalar)");
        if (!a.shape.empty())
          fail(v.at, path, "ext type 3 (numpy scalar) has shape " + to_string(a.shape) + ", expected ()");
        return a;
      }
      case 2: fail(v.at, path, "ext type 2 (Python complex) is not supported: linen has no complex dtype");
      default:
        fail(v.at, path, "unknown ext type " + std::to_string(v.ext_type) +
                             " (Flax writes 1 = ndarray, 3 = numpy scalar)");
    }
  }

  // A non-negative int (a dimension); `what` names it for errors.
  Index read_dim(const std::string& path, const std::string& what) {
    const msgpack_head e = head(path);
    if (e.kind == msgpack_kind::uint) {
      if (e.length > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
        fail(e.at, path, what + " " + std::to_string(e.length) + " is too large");
      return static_cast<Index>(e.length);
    }
    if (e.kind == msgpack_kind::sint) {
      if (e.value < 0) fail(e.at, path, what + " is negative: " + std::to_string(e.value));
      return static_cast<Index>(e.value);
    }
    fail(e.at, path, what + " is a " + e.describe() + ", expected an int");
  }

  // prod(shape), refusing overflow.
  Index element_count(const Shape& shape, std::size_t at, const std::string& path) const {
    Index n = 1;
    for (Index d : shape) {
      if (d != 0 && n > std::numeric_limits<Index>::max() / d)
        fail(at, path, "element count of shape " + to_string(shape) + " overflows");
      n *= d;
    }
    return n;
  }

  // The payload of ext `v`: the msgpack array [shape, dtype name, data], exactly.
  msgpack_ndarray read_ndarray(const msgpack_head& v, const std::string& path, const std::string& what) {
    const std::size_t saved_end = end_;
    const bool saved_scope = in_payload_;
    pos_ = v.body;
    end_ = v.body + static_cast<std::size_t>(v.length);
    in_payload_ = true;

    const msgpack_head a = head(path);
    if (a.kind != msgpack_kind::array || a.length != 3)
      fail(a.at, path, what + " payload is a " + a.describe() + ", expected an array [shape, dtype name, data]");
    msgpack_ndarray out;
    const msgpack_head s = head(path);
    if (s.kind != msgpack_kind::array)
      fail(s.at, path, what + " shape is a " + s.describe() + ", expected an array of ints");
    out.shape.reserve(static_cast<std::size_t>(s.length));  // s.length <= bytes left
    for (std::uint64_t j = 0; j < s.length; ++j)
      out.shape.push_back(read_dim(path, what + " shape dimension " + std::to_string(j)));
    out.count = element_count(out.shape, s.at, path);

    const msgpack_head n = head(path);
    if (n.kind != msgpack_kind::str && n.kind != msgpack_kind::bin)
      fail(n.at, path, what + " dtype name is a " + n.describe() + ", expected a str");
    const std::string_view dname(reinterpret_cast<const char*>(d_ + n.body), static_cast<std::size_t>(n.length));
    pos_ = n.body + static_cast<std::size_t>(n.length);
    const auto dtype = dtype_from_numpy_name(dname);
    if (!dtype)
      fail(n.at, path, what + " dtype " + quote_bytes(dname) +
                           " is not supported (supported: float16 bfloat16 float32 float64 int8 int16 int32 "
                           "int64 uint8 uint16 uint32 uint64 bool)");
    out.dtype = *dtype;

    const msgpack_head b = head(path);
    if (b.kind != msgpack_kind::bin) fail(b.at, path, what + " data is a " + b.describe() + ", expected bin");
    const auto item = static_cast<Index>(itemsize(out.dtype));
    if (out.count > std::numeric_limits<Index>::max() / item)
      fail(s.at, path, what + " byte count of shape " + to_string(out.shape) + " overflows");
    if (b.length != static_cast<std::uint64_t>(out.count * item))
      fail(b.at, path, what + " of dtype " + numpy_name(out.dtype) + " and shape " + to_string(out.shape) +
                           " needs " + std::to_string(out.count * item) + " bytes of data, got " +
                           std::to_string(b.length));
    out.data = d_ + b.body;
    out.nbytes = static_cast<std::size_t>(b.length);
    pos_ = b.body + out.nbytes;
    if (pos_ != end_)
      fail(pos_, path, std::to_string(end_ - pos_) + " trailing bytes inside the " + what + " payload");
    end_ = saved_end;
    in_payload_ = saved_scope;
    return out;
  }

  // The map `h` at pos_ with keys exactly "0".."n-1" (any order); calls
  // f(index, value path) with pos_ at each value, which f must consume.
  template <class F>
  void read_index_map(const msgpack_head& h, const std::string& path, int depth, const char* what, F&& f) {
    if (depth > kMsgpackMaxDepth)
      fail(h.at, path, "maps and arrays nest deeper than " + std::to_string(kMsgpackMaxDepth));
    std::vector<bool> seen(static_cast<std::size_t>(h.length));  // h.length <= bytes left / 2
    for (std::uint64_t i = 0; i < h.length; ++i) {
      const msgpack_key k = read_key(path);
      std::uint64_t idx = 0;
      bool ok = k.text.size() <= 10 && (k.text.size() == 1 || k.text[0] != '0');
      for (char c : k.text) {
        ok = ok && c >= '0' && c <= '9';
        if (ok) idx = idx * 10 + static_cast<std::uint64_t>(c - '0');
      }
      if (!ok || idx >= h.length)
        fail(k.at, path, std::string(what) + " map has key " + quote_bytes(k.text) + ", expected the keys \"0\"..\"" +
                             std::to_string(h.length - 1) + "\"");
      if (seen[idx]) fail(k.at, path, std::string(what) + " map repeats key " + quote_bytes(k.text));
      seen[idx] = true;
      f(static_cast<std::size_t>(idx));
    }
  }

  // A chunked-array map {"__msgpack_chunked_array__": true, "shape": {...}, "chunks": {...}}.
  void read_chunked(const msgpack_head& h, const std::string& path, int depth, Variables& out) {
    if (h.length != 3)
      fail(h.at, path, "chunked array map has " + std::to_string(h.length) + " keys, expected exactly " +
                           std::string(kChunkMarker) + ", shape, chunks");
    Shape shape;
    std::size_t shape_at = h.at;
    std::vector<msgpack_ndarray> chunks;
    std::vector<std::size_t> chunk_at;
    for (int i = 0; i < 3; ++i) {
      const msgpack_key key = read_key(path);
      const msgpack_head v = head(path);
      if (key.text == kChunkMarker) {
        if (v.kind != msgpack_kind::boolean)
          fail(v.at, path, std::string(kChunkMarker) + " is a " + v.describe() + ", expected true");
        if (!v.truth) fail(v.at, path, std::string(kChunkMarker) + " is false, expected true");
      } else if (key.text == "shape") {
        if (v.kind != msgpack_kind::map)
          fail(v.at, path, "chunked array shape is a " + v.describe() + ", expected a map {\"0\": dim, ...}");
        shape_at = v.at;
        shape.assign(static_cast<std::size_t>(v.length), 0);
        read_index_map(v, path, depth + 1, "chunked array shape", [&](std::size_t j) {
          shape[j] = read_dim(path, "chunked array shape dimension " + std::to_string(j));
        });
      } else if (key.text == "chunks") {
        if (v.kind != msgpack_kind::map)
          fail(v.at, path, "chunked array chunks is a " + v.describe() + ", expected a map {\"0\": array, ...}");
        if (v.length == 0) fail(v.at, path, "chunked array has no chunks");
        chunks.resize(static_cast<std::size_t>(v.length));
        chunk_at.resize(chunks.size());
        read_index_map(v, path, depth + 1, "chunked array chunks", [&](std::size_t j) {
          const msgpack_head c = head(path);
          if (c.kind != msgpack_kind::ext || c.ext_type != 1)
            fail(c.at, path, "chunk " + std::to_string(j) + " is a " + c.describe() + ", expected ext type 1 (ndarray)");
          chunks[j] = read_ndarray(c, path, "chunk " + std::to_string(j));
          chunk_at[j] = c.at;
          if (chunks[j].shape.size() != 1)
            fail(c.at, path, "chunk " + std::to_string(j) + " has shape " + to_string(chunks[j].shape) +
                                 ", expected a flat (1-D) chunk");
        });
      } else {
        fail(key.at, path, "chunked array map has key " + quote_bytes(key.text) + ", expected exactly " +
                               std::string(kChunkMarker) + ", shape, chunks");
      }
    }
    Index total = 0;  // <= the input's size: every element's bytes are in it
    for (std::size_t j = 0; j < chunks.size(); ++j) {
      if (chunks[j].dtype != chunks[0].dtype)
        fail(chunk_at[j], path, "chunk " + std::to_string(j) + " is " + numpy_name(chunks[j].dtype) + ", chunk 0 is " +
                                    numpy_name(chunks[0].dtype) + " (mixed dtypes)");
      total += chunks[j].count;
    }
    const Index count = element_count(shape, shape_at, path);
    if (total != count)
      fail(h.at, path, "chunks hold " + std::to_string(total) + " elements, shape " + to_string(shape) + " needs " +
                           std::to_string(count));
    std::vector<std::uint8_t> bytes;
    bytes.reserve(static_cast<std::size_t>(count) * itemsize(chunks[0].dtype));
    for (const auto& c : chunks) bytes.insert(bytes.end(), c.data, c.data + c.nbytes);
    if (auto why = Variables::path_error(path)) fail(h.at, path, "not a valid variable path: " + *why);
    out.set(path, Array(chunks[0].dtype, std::move(shape), std::move(bytes)));
  }

  const std::uint8_t* d_;
  std::size_t pos_ = 0;
  std::size_t end_;
  bool in_payload_ = false;
  const std::string& name_;
};

// ---- writer -----------------------------------------------------------------

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

}  // namespace detail

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
  return detail::msgpack_reader(data ? data : &empty, size, name).read_root();
}

// Reads the Flax msgpack file `file` (see parse_msgpack); io_error names the file.
inline Variables load_msgpack(const std::string& file) {
  const auto bytes = detail::read_file_bytes(file);
  return parse_msgpack(bytes.data(), bytes.size(), file);
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

// ---- either format ------------------------------------------------------------

enum class CheckpointFormat { safetensors, msgpack };

inline const char* format_name(CheckpointFormat f) {
  return f == CheckpointFormat::safetensors ? "safetensors" : "msgpack";
}

// The format of a checkpoint image, by content: safetensors starts with its header
// length as 8 little-endian bytes (the top four zero: headers are capped at 100 MB)
// followed by '{'; a Flax msgpack starts with a map (bytes 0x80-0x8f, 0xde, 0xdf).
// Throws io_error (naming `name` and the first bytes) if it is neither.
inline CheckpointFormat detect_checkpoint_format(const std::uint8_t* data, std::size_t size,
                                                 const std::string& name = "<memory>") {
  if (data == nullptr && size != 0) throw io_error(name + ": null data of size " + std::to_string(size));
  const bool msgpack_map = size >= 1 && ((data[0] & 0xf0) == 0x80 || data[0] == 0xde || data[0] == 0xdf);
  const bool st_length = size >= 8 && data[4] == 0 && data[5] == 0 && data[6] == 0 && data[7] == 0;
  const bool st_brace = size >= 9 && data[8] == '{';
  if (st_length && (st_brace || !msgpack_map)) return CheckpointFormat::safetensors;
  if (msgpack_map) return CheckpointFormat::msgpack;
  std::string first;
  static const char* hex = "0123456789abcdef";
  for (std::size_t i = 0; i < size && i < 9; ++i) {
    first += i ? " " : "";
    first += hex[data[i] >> 4];
    first += hex[data[i] & 15];
  }
  throw io_error(name + ": neither safetensors (an 8-byte little-endian header length, then '{') nor Flax msgpack "
                 "(a map) (" + std::to_string(size) + " bytes" + (size ? ", starting " + first : std::string()) + ")");
}

// Reads a checkpoint image of either format (detect_checkpoint_format), as
// parse_safetensors or parse_msgpack would.
inline Variables parse_checkpoint(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>") {
  return detect_checkpoint_format(data, size, name) == CheckpointFormat::safetensors
             ? parse_safetensors(data, size, name)
             : parse_msgpack(data, size, name);
}

// Reads the checkpoint file `file`, safetensors or Flax msgpack told apart by content.
inline Variables load_checkpoint(const std::string& file) {
  const auto bytes = detail::read_file_bytes(file);
  return parse_checkpoint(bytes.data(), bytes.size(), file);
}

// The paths of `all` that lie under none of `used_prefixes` (a path is under p when
// it equals p or starts with p + "/"; a trailing '/' on p is ignored; "" covers
// everything), in path order: what binding modules by path left unread, e.g.
//   unused_paths(vars, {"params/encoder", "cache/encoder"}).
inline std::vector<std::string> unused_paths(const Variables& all, const std::vector<std::string>& used_prefixes) {
  std::vector<std::string> prefixes;
  prefixes.reserve(used_prefixes.size());
  for (std::string p : used_prefixes) {
    while (!p.empty() && p.back() == '/') p.pop_back();
    prefixes.push_back(std::move(p));
  }
  std::vector<std::string> out;
  for (const auto& kv : all) {
    const std::string& path = kv.first;
    const bool used = std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) {
      return p.empty() || (path.compare(0, p.size(), p) == 0 && (path.size() == p.size() || path[p.size()] == '/'));
    });
    if (!used) out.push_back(path);
  }
  return out;
}

// An h5ls-style listing of `v`: a header line, then one line per array in path
// order with its path, numpy dtype name, shape and byte count in aligned columns,
// then "<n> arrays, <total> bytes". E.g.
//   path               dtype    shape           bytes
//   cache/cache_index  int32    ()                  4
//   params/out/bias    float32  (16,)              64
//   2 arrays, 68 bytes
inline std::string list_tensors(const Variables& v) {
  std::size_t wp = 4, wd = 5, ws = 5, wb = 5;
  std::uint64_t total = 0;
  for (const auto& [path, a] : v) {
    wp = std::max(wp, path.size());
    wd = std::max(wd, std::strlen(numpy_name(a.dtype())));
    ws = std::max(ws, to_string(a.shape()).size());
    wb = std::max(wb, std::to_string(a.bytes().size()).size());
    total += a.bytes().size();
  }
  auto row = [&](const std::string& p, const std::string& d, const std::string& s, const std::string& b) {
    std::string line = p + std::string(wp - p.size() + 2, ' ') + d + std::string(wd - d.size() + 2, ' ') + s +
                       std::string(ws - s.size() + 2, ' ') + std::string(wb - b.size(), ' ') + b;
    return line + "\n";
  };
  std::string out = row("path", "dtype", "shape", "bytes");
  for (const auto& [path, a] : v)
    out += row(path, numpy_name(a.dtype()), to_string(a.shape()), std::to_string(a.bytes().size()));
  out += std::to_string(v.size()) + (v.size() == 1 ? " array, " : " arrays, ") + std::to_string(total) + " bytes\n";
  return out;
}

}  // namespace linen::io

#endif  // LINEN_IO_MSGPACK_HPP

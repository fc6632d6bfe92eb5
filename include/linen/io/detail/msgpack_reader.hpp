// SPDX-License-Identifier: Apache-2.0
//
// The Flax msgpack reader (not part of the public API; io/msgpack.hpp documents the
// format and parse_msgpack / load_msgpack).
//
// linen reads msgpack itself rather than through msgpack-cxx: a strict reader of the
// dozen msgpack formats a Flax file can hold is what makes the loader's guarantees
// checkable here, in one place. msgpack-cxx's unpacker builds a whole object tree
// (allocating per its own zone rules, before anything is validated) and knows no
// variable paths; this reader
//   - allocates nothing a declared length asks for before checking it against the bytes
//     left in the input, so memory stays a small multiple of the input's size;
//   - nests at most kMsgpackMaxDepth deep, and paths are at most kMsgpackMaxPathBytes;
//   - names the byte offset and the variable path in every error (a linen::io_error);
//   - reads each array's bytes once, straight into the array that keeps them, from
//     memory or from a file (byte_source.hpp), so a file loads in about its own size.
#ifndef LINEN_IO_DETAIL_MSGPACK_READER_HPP
#define LINEN_IO_DETAIL_MSGPACK_READER_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../errors.hpp"
#include "../../tensor.hpp"
#include "../variables.hpp"
#include "text.hpp"

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

// A parsed ext 1 / ext 3 payload: its data stays in the source until it is read once,
// into the array that keeps it.
struct msgpack_ndarray {
  DType dtype = DType::F32;
  Shape shape;
  Index count = 0;
  std::size_t data = 0;  // offset of the data in the source
  std::size_t nbytes = 0;
};

// A key of a map.
struct msgpack_key {
  std::string text;
  std::size_t at = 0;  // offset of the key's format byte
};

// Reads a Flax msgpack image from a Source (byte_source.hpp: memory or file).
template <class Source>
class msgpack_reader {
 public:
  msgpack_reader(Source& src, const std::string& name) : src_(src), end_(src.size()), name_(name) {}

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
    for (std::size_t i = 0; i < n; ++i) v = (v << 8) | src_.byte(pos_ + i);
    pos_ += n;
    return v;
  }

  // Decodes the header at pos_. `path` is the variable the value belongs to (for errors).
  msgpack_head head(const std::string& path) {
    msgpack_head h;
    h.at = pos_;
    if (left() == 0)
      fail(pos_, path, std::string("truncated: a msgpack value was expected, ") + scope() + " ends here");
    const unsigned c = src_.byte(pos_++);
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
    return path.empty() ? key.text : path + "/" + key.text;
  }

  // A map key: a non-empty UTF-8 str without '/'.
  msgpack_key read_key(const std::string& path) {
    const msgpack_head h = head(path);
    if (h.kind != msgpack_kind::str)
      fail(h.at, path, "map key is a " + h.describe() + ", expected a str (Flax state dict keys are strings)");
    msgpack_key k{text(h.body, static_cast<std::size_t>(h.length)), h.at};
    pos_ = h.body + static_cast<std::size_t>(h.length);
    if (k.text.empty()) fail(h.at, path, "empty map key (a variable path has no empty component)");
    if (const auto bad = utf8_error_offset(k.text); bad != k.text.size())
      fail(h.body + bad, path, "map key " + quote_bytes(k.text) + " is not valid UTF-8");
    if (k.text.find('/') != std::string::npos)
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
    // h.length <= bytes left / 2; keys beyond the first few thousand are paid for by the
    // bytes they occupy, never reserved on the header's word alone.
    keys.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(h.length, 4096)));
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
    if (auto why = Variables::path_error(path)) fail(v.at, path, "not a valid variable path: " + *why);
    out.set(path, Array(dtype, Shape{}, std::move(bytes)));
  }

  // Reads the data of `a` from the source, once, into the array stored at `path`.
  void store(Variables& out, const std::string& path, std::size_t at, const msgpack_ndarray& a) {
    if (auto why = Variables::path_error(path)) fail(at, path, "not a valid variable path: " + *why);
    std::vector<std::uint8_t> bytes(a.nbytes);
    src_.read(a.data, a.nbytes, bytes.data());
    out.set(path, Array(a.dtype, a.shape, std::move(bytes)));
  }

  // `n` bytes at `pos` (in bounds) as a string.
  std::string text(std::size_t pos, std::size_t n) {
    std::string s(n, '\0');
    src_.read(pos, n, s.data());
    return s;
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

  // prod(shape) (dims are non-negative here), refusing overflow.
  Index element_count(const Shape& shape, std::size_t at, const std::string& path) const {
    const linen::detail::size_check n = linen::detail::checked_element_count(shape);
    if (!n) fail(at, path, "element count of shape " + to_string(shape) + " overflows");
    return n.value;
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
    // No dtype name is longer than 8 bytes: read what an error message can show.
    const std::string dname = text(n.body, static_cast<std::size_t>(std::min<std::uint64_t>(n.length, 81)));
    pos_ = n.body + static_cast<std::size_t>(n.length);
    const auto dtype = n.length == dname.size() ? dtype_from_numpy_name(dname) : std::nullopt;
    if (!dtype)
      fail(n.at, path, what + " dtype " + quote_bytes(dname) +
                           " is not supported (supported: float16 bfloat16 float32 float64 int8 int16 int32 "
                           "int64 uint8 uint16 uint32 uint64 bool)");
    out.dtype = *dtype;

    const msgpack_head b = head(path);
    if (b.kind != msgpack_kind::bin) fail(b.at, path, what + " data is a " + b.describe() + ", expected bin");
    const linen::detail::size_check nbytes =
        linen::detail::checked_byte_count(out.count, static_cast<Index>(itemsize(out.dtype)));
    if (!nbytes) fail(s.at, path, what + " byte count of shape " + to_string(out.shape) + " overflows");
    if (b.length != static_cast<std::uint64_t>(nbytes.value))
      fail(b.at, path, what + " of dtype " + numpy_name(out.dtype) + " and shape " + to_string(out.shape) +
                           " needs " + std::to_string(nbytes.value) + " bytes of data, got " +
                           std::to_string(b.length));
    out.data = b.body;
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
    if (auto why = Variables::path_error(path)) fail(h.at, path, "not a valid variable path: " + *why);
    // Each chunk's data read once, into its place in the joined array.
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(count) * itemsize(chunks[0].dtype));
    std::size_t at = 0;
    for (const auto& c : chunks) {
      src_.read(c.data, c.nbytes, bytes.data() + at);
      at += c.nbytes;
    }
    out.set(path, Array(chunks[0].dtype, std::move(shape), std::move(bytes)));
  }

  Source& src_;
  std::size_t pos_ = 0;
  std::size_t end_;
  bool in_payload_ = false;
  const std::string& name_;
};

}  // namespace detail
}  // namespace linen::io

#endif  // LINEN_IO_DETAIL_MSGPACK_READER_HPP

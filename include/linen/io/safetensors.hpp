// SPDX-License-Identifier: Apache-2.0
//
// safetensors reader and writer (https://github.com/huggingface/safetensors):
//
//   [8 bytes: N, little-endian u64] [N bytes: JSON header] [data]
//
// The header maps each tensor name to {"dtype": "F32", "shape": [2, 3],
// "data_offsets": [begin, end]} (byte offsets into the data section), plus an
// optional "__metadata__" object of strings. The reader is strict: every fault is
// a linen::io_error naming the file and what is wrong, nothing is read out of
// bounds, and no allocation exceeds the input's size (the header is capped at
// 100 MB, offsets are checked against the real data size before anything is copied).
// Tensor names in messages are quoted with their bytes escaped (a NUL shows as \x00).
// load_safetensors reads each tensor's bytes once, from the file straight into its
// Array: loading needs the tensors' bytes plus the header, never a copy of the file.
// (Mapping the file instead would need an Array that views a mapping, not the owning
// byte vector Array::bytes() returns, and a file truncated under a mapping is a
// SIGBUS, not an io_error.)
#ifndef LINEN_IO_SAFETENSORS_HPP
#define LINEN_IO_SAFETENSORS_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"
#include "detail/byte_source.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"
#include "detail/text.hpp"
#include "variables.hpp"

namespace linen::io {

// Headers longer than this are refused before anything is allocated (the
// reference implementation's limit).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100'000'000;

namespace detail {

// Thrown from inside the JSON parser callback, turned into an io_error outside.
struct safetensors_header_fault {
  std::string message;
};

inline std::string json_type(const nlohmann::json& j) { return j.type_name(); }

// Reads a non-negative JSON integer that fits in Index; nullopt otherwise.
inline std::optional<Index> json_index(const nlohmann::json& j) {
  if (j.is_number_unsigned()) {
    const auto v = j.get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) return std::nullopt;
    return static_cast<Index>(v);
  }
  if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v < 0) return std::nullopt;
    return static_cast<Index>(v);
  }
  return std::nullopt;
}

// Parses the header JSON, refusing duplicate keys at any level (nlohmann would keep
// the last one silently) and nesting deeper than a safetensors header has
// (root object > entry object > shape array), which also bounds memory.
inline nlohmann::json parse_safetensors_header(const char* begin, const char* end, const std::string& name) {
  std::vector<std::set<std::string>> keys;  // keys seen, per open object
  int depth = 0;
  nlohmann::json::parser_callback_t cb = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (ev) {
      case E::object_start:
      case E::array_start:
        if (++depth > 3)
          throw safetensors_header_fault{"header nests deeper than a safetensors header (object > entry > shape)"};
        if (ev == E::object_start) keys.emplace_back();
        break;
      case E::object_end:
      case E::array_end:
        --depth;
        if (ev == E::object_end && !keys.empty()) keys.pop_back();
        break;
      case E::key: {
        auto k = parsed.get<std::string>();
        if (!keys.empty() && !keys.back().insert(k).second)
          throw safetensors_header_fault{keys.size() == 1 ? "duplicate tensor name " + quote_bytes(k) + " in the header"
                                                          : "duplicate key " + quote_bytes(k) + " inside a header entry"};
        break;
      }
      case E::value:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(begin, end, cb);
  } catch (const safetensors_header_fault& f) {
    throw io_error(name + ": " + f.message);
  } catch (const nlohmann::json::exception& e) {
    throw io_error(name + ": header is not valid JSON: " + e.what());
  }
}

struct safetensors_entry {
  std::string name;
  DType dtype;
  Shape shape;
  std::uint64_t begin, end;
};

inline safetensors_entry parse_safetensors_entry(const std::string& key, const nlohmann::json& v,
                                                 std::uint64_t data_size, const std::string& name) {
  const std::string where = name + ": tensor " + quote_bytes(key);
  if (!v.is_object()) throw io_error(where + ": entry must be an object, got " + json_type(v));
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!v.contains(field)) throw io_error(where + ": entry has no '" + field + "'");
  const auto& jd = v["dtype"];
  const auto& js = v["shape"];
  const auto& jo = v["data_offsets"];

  if (!jd.is_string()) throw io_error(where + ": 'dtype' must be a string, got " + json_type(jd));
  const auto dname = jd.get<std::string>();
  const auto dtype = dtype_from_safetensors_name(dname);
  if (!dtype)
    throw io_error(where + ": unknown dtype " + quote_bytes(dname) +
                   " (supported: F64 F32 F16 BF16 BOOL I8 I16 I32 I64 U8 U16 U32 U64)");

  if (!js.is_array()) throw io_error(where + ": 'shape' must be an array, got " + json_type(js));
  Shape shape;
  shape.reserve(js.size());
  for (const auto& d : js) {
    if (!d.is_number_integer())
      throw io_error(where + ": shape " + js.dump() + " has a non-integer dimension " + d.dump());
    const auto dim = json_index(d);
    if (!dim) throw io_error(where + ": shape " + js.dump() + " has a negative or too large dimension " + d.dump());
    shape.push_back(*dim);
  }
  const linen::detail::size_check count = linen::detail::checked_element_count(shape);  // dims are >= 0
  if (!count) throw io_error(where + ": element count of shape " + js.dump() + " overflows");
  const linen::detail::size_check bytes =
      linen::detail::checked_byte_count(count.value, static_cast<Index>(itemsize(*dtype)));
  if (!bytes) throw io_error(where + ": byte count of shape " + js.dump() + " overflows");
  const auto nbytes = static_cast<std::uint64_t>(bytes.value);

  if (!jo.is_array() || jo.size() != 2)
    throw io_error(where + ": 'data_offsets' must be an array [begin, end], got " + jo.dump());
  std::uint64_t off[2];
  for (int i = 0; i < 2; ++i) {
    if (!jo[static_cast<std::size_t>(i)].is_number_unsigned())
      throw io_error(where + ": 'data_offsets' " + jo.dump() + " must hold non-negative integers");
    off[i] = jo[static_cast<std::size_t>(i)].get<std::uint64_t>();
  }
  if (off[0] > off[1]) throw io_error(where + ": data_offsets " + jo.dump() + " has begin > end");
  if (off[1] > data_size)
    throw io_error(where + ": data_offsets " + jo.dump() + " run past the end of the data (" +
                   std::to_string(data_size) + " bytes)");
  if (off[1] - off[0] != nbytes)
    throw io_error(where + ": " + dname + " shape " + js.dump() + " needs " + std::to_string(nbytes) +
                   " bytes, data_offsets " + jo.dump() + " hold " + std::to_string(off[1] - off[0]));
  return {key, *dtype, std::move(shape), off[0], off[1]};
}

}  // namespace detail

// Reads a safetensors image of `size` bytes at `data`. `name` (the file name) starts
// every error message. Throws io_error on any malformation: truncation, a header
// that is not a JSON object of valid entries, duplicate names, unknown dtypes,
// negative or overflowing dims, byte counts that do not match the shape, offsets
// that do not tile the data section exactly (overlaps, gaps, out of bounds,
// trailing bytes), a `__metadata__` that is not an object of strings, or a tensor
// name that is not a valid variable path.
inline Variables parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>");

namespace detail {

// parse_safetensors over a byte source (byte_source.hpp): everything is checked before
// any tensor's bytes are read, then each tensor is read once, into its Array.
template <class Source>
Variables read_safetensors(Source& src, const std::string& name) {
  const std::size_t size = src.size();
  if (size < 8) throw io_error(name + ": " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  std::uint8_t len[8];
  src.read(0, 8, len);
  const auto n = load_le<std::uint64_t>(len);
  if (n > kSafetensorsMaxHeader)
    throw io_error(name + ": header length " + std::to_string(n) + " exceeds the limit of " +
                   std::to_string(kSafetensorsMaxHeader) + " bytes");
  if (n > size - 8)
    throw io_error(name + ": header length " + std::to_string(n) + " runs past the end of the file (" +
                   std::to_string(size) + " bytes)");
  std::string text(static_cast<std::size_t>(n), '\0');
  src.read(8, text.size(), text.data());
  // nlohmann stops at a NUL as at the end of input, which would hide what follows;
  // JSON text never holds a raw NUL.
  if (const auto nul = text.find('\0'); nul != std::string::npos)
    throw io_error(name + ": header is not valid JSON: NUL byte at header offset " + std::to_string(nul));
  const nlohmann::json header = parse_safetensors_header(text.data(), text.data() + text.size(), name);
  if (!header.is_object()) throw io_error(name + ": header must be a JSON object, got " + header.type_name());

  const std::size_t body = 8 + static_cast<std::size_t>(n);
  const std::uint64_t data_size = size - 8 - n;
  Variables out;
  std::vector<safetensors_entry> entries;
  entries.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        throw io_error(name + ": __metadata__ must be an object of strings, got " + value.type_name());
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          throw io_error(name + ": __metadata__ value of " + quote_bytes(mk) + " must be a string, got " +
                         mv.type_name());
        out.metadata.emplace(mk, mv.template get<std::string>());
      }
      continue;
    }
    if (auto why = Variables::path_error(key))
      throw io_error(name + ": tensor name " + quote_bytes(key) + " is not a valid variable path: " + *why);
    entries.push_back(parse_safetensors_entry(key, value, data_size, name));
  }

  // Sorted by range, the tensors must tile [0, data_size) exactly.
  std::vector<const safetensors_entry*> order;
  order.reserve(entries.size());
  for (const auto& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
  });
  std::uint64_t pos = 0;
  const safetensors_entry* prev = nullptr;
  for (const auto* e : order) {
    const auto range = [](const safetensors_entry* x) {
      return quote_bytes(x->name) + " [" + std::to_string(x->begin) + ", " + std::to_string(x->end) + ")";
    };
    if (e->begin < pos) throw io_error(name + ": data of " + range(e) + " overlaps " + range(prev));
    if (e->begin > pos)
      throw io_error(name + ": gap of " + std::to_string(e->begin - pos) + " bytes in the data before " + range(e));
    pos = e->end;
    prev = e;
  }
  if (pos != data_size)
    throw io_error(name + ": " + std::to_string(data_size - pos) + " trailing bytes after the last tensor (data is " +
                   std::to_string(data_size) + " bytes, tensors end at " + std::to_string(pos) + ")");

  for (auto& e : entries) {
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(e.end - e.begin));
    src.read(body + static_cast<std::size_t>(e.begin), bytes.size(), bytes.data());
    out.set(e.name, Array(e.dtype, std::move(e.shape), std::move(bytes)));
  }
  return out;
}

}  // namespace detail

inline Variables parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& name) {
  if (data == nullptr && size != 0) throw io_error(name + ": null data of size " + std::to_string(size));
  static const std::uint8_t empty = 0;
  detail::memory_source src(data ? data : &empty, size);
  return detail::read_safetensors(src, name);
}

// Reads the safetensors file `file`; io_error names the file on any fault (cannot
// open or read; not a regular file: a directory, a FIFO (never blocked on), a
// device; or any malformation listed at parse_safetensors). Each tensor's bytes are
// read once, from the file into its Array: the peak memory is the tensors' bytes
// plus the header.
inline Variables load_safetensors(const std::string& file) {
  detail::input_file in(file);
  detail::file_source src(in);
  return detail::read_safetensors(src, file);
}

// The safetensors image of `v`: tensors sorted by path, their data laid out
// contiguously in that order, `__metadata__` written when non-empty, the header
// padded with spaces to a multiple of 8 bytes (as the reference writer does).
inline std::vector<std::uint8_t> to_safetensors(const Variables& v) {
  nlohmann::json header = nlohmann::json::object();
  if (!v.metadata.empty()) header["__metadata__"] = v.metadata;
  std::uint64_t off = 0;
  for (const auto& [path, a] : v) {
    const auto n = static_cast<std::uint64_t>(a.bytes().size());
    header[path] = {{"dtype", safetensors_name(a.dtype())},
                    {"shape", a.shape()},
                    {"data_offsets", nlohmann::json::array({off, off + n})}};
    off += n;
  }
  std::string h;
  try {
    h = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not valid UTF-8
    throw io_error(std::string("cannot write safetensors header: ") + e.what());
  }
  h.append((8 - h.size() % 8) % 8, ' ');
  std::vector<std::uint8_t> out(8 + h.size() + off);
  detail::store_le<std::uint64_t>(out.data(), h.size());
  std::memcpy(out.data() + 8, h.data(), h.size());
  std::uint8_t* p = out.data() + 8 + h.size();
  for (const auto& kv : v) {
    const auto& b = kv.second.bytes();
    if (!b.empty()) std::memcpy(p, b.data(), b.size());
    p += b.size();
  }
  return out;
}

// Writes to_safetensors(v) to `file` (replacing it); io_error names the file on failure.
inline void save_safetensors(const std::string& file, const Variables& v) {
  detail::write_file_bytes(file, to_safetensors(v));
}

}  // namespace linen::io

#endif  // LINEN_IO_SAFETENSORS_HPP

// SPDX-License-Identifier: Apache-2.0
//
// zarr v2 (`.zarray`) and zarr v3 (`zarr.json`) arrays as tensorstore writes them
// for Orbax: metadata parsing, chunk keys, chunk decoding into a C-order array
// buffer, and (v2 only, the layout save_orbax writes) metadata and chunk encoding.
//
// Supported, because Orbax writes it:
//   v2: dtypes <f2 <f4 <f8 bfloat16 |i1 <i2 <i4 <i8 |u1 <u2 <u4 <u8 |b1 (and the
//       '>' big-endian forms), compressor null or zstd, filters null, order C,
//       dimension_separator "." (the default) or "/", fill_value null (zeros),
//       a number, "NaN", "Infinity", "-Infinity" or a bool.
//   v3: data_type by name (float32, bfloat16, bool, ...), chunk_grid regular,
//       chunk_key_encoding default ("c/0/1") or v2 ("0.1"), codecs `bytes`
//       (endian little or big), `zstd`, `crc32c`, `sharding_indexed` (inner codecs
//       of the same set; index codecs `bytes` + `crc32c`; index at the end or the
//       start), fill_value a number, "NaN", "Infinity", "-Infinity", "0x..." bits
//       or a bool.
// Everything else (blosc, gzip, zlib, bz2, lzma, transpose, filters, order F,
// other chunk grids) is an io_error naming the codec.
//
// Absent chunks hold fill_value. Every decoded chunk must be exactly its shape's
// byte count (zstd never decodes past it: zstd.hpp), every sharding-index entry
// must lie inside its shard, every crc32c must match.
//
// Surprises: tensorstore's zarr v2 `fill_value: null` means zeros when read; its
// zarr v2 chunks are zstd frames without a content size; zarr v3's
// sharding_indexed index is (offset, nbytes) uint64 pairs in C order of the inner
// grid, followed by its own crc32c, and (2^64-1, 2^64-1) marks an absent inner
// chunk; a rank-0 array's only chunk is "0" in v2 and "c" in v3's default keys.
#ifndef LINEN_IO_DETAIL_ORBAX_ZARR_HPP
#define LINEN_IO_DETAIL_ORBAX_ZARR_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "../../variables.hpp"
#include "crc32c.hpp"
#include "json.hpp"
#include "zstd.hpp"

namespace linen::io::detail {

inline constexpr int kZarrMaxRank = 32;
inline constexpr int kZarrMaxShardingDepth = 4;

struct ZarrCodec {
  enum Kind { kBytes, kZstd, kCrc32c, kSharding } kind = kBytes;
  bool big_endian = false;  // bytes
  int level = 0;            // zstd
  // sharding_indexed
  Shape inner_chunk;
  std::vector<ZarrCodec> inner, index;
  bool index_at_end = true;
};

struct ZarrArray {
  int format = 2;
  DType dtype = DType::F32;
  bool big_endian = false;
  Shape shape, chunks;             // chunks: the stored (outer) chunk shape
  std::vector<std::uint8_t> fill;  // one element, little-endian
  // v2
  bool v2_zstd = false;
  int v2_level = 0;
  // keys: v2 and v3 "v2" encoding: indices joined by separator, rank 0 "0";
  // v3 default: "c" then separator and each index, rank 0 "c".
  char separator = '.';
  bool v3_default_keys = false;
  std::vector<ZarrCodec> codecs;  // v3

  Index chunk_elements() const {
    Index n = 1;
    for (Index c : chunks) n *= c;
    return n;
  }
  std::size_t chunk_bytes() const { return static_cast<std::size_t>(chunk_elements()) * itemsize(dtype); }
  std::size_t array_bytes() const {
    Index n = 1;
    for (Index d : shape) n *= d;
    return static_cast<std::size_t>(n) * itemsize(dtype);
  }
};

// ---- dtypes and fill values ---------------------------------------------------

inline const char* zarr_v2_dtype_name(DType d) {
  switch (d) {
    case DType::F16: return "<f2";
    case DType::BF16: return "bfloat16";
    case DType::F32: return "<f4";
    case DType::F64: return "<f8";
    case DType::I8: return "|i1";
    case DType::I16: return "<i2";
    case DType::I32: return "<i4";
    case DType::I64: return "<i8";
    case DType::U8: return "|u1";
    case DType::U16: return "<u2";
    case DType::U32: return "<u4";
    case DType::U64: return "<u8";
    case DType::BOOL: return "|b1";
  }
  return "?";
}

// "<f4" -> (F32, little endian); nullopt for anything else.
inline std::optional<std::pair<DType, bool>> zarr_v2_dtype(const std::string& s) {
  if (s == "bfloat16") return std::make_pair(DType::BF16, false);
  if (s.size() != 3 || (s[0] != '<' && s[0] != '>' && s[0] != '|')) return std::nullopt;
  for (DType d : kAllDTypes) {
    if (d == DType::BF16) continue;
    const std::string n = zarr_v2_dtype_name(d);
    if (n.substr(1) != s.substr(1)) continue;
    if (s[0] == '|' && itemsize(d) != 1) return std::nullopt;
    return std::make_pair(d, s[0] == '>' && itemsize(d) > 1);
  }
  return std::nullopt;
}

inline void byteswap_elements(std::uint8_t* p, std::size_t bytes, std::size_t item) {
  if (item <= 1) return;
  for (std::size_t i = 0; i + item <= bytes; i += item) std::reverse(p + i, p + i + item);
}

// The element bytes of fill value `j` for dtype d (null: zeros).
inline std::vector<std::uint8_t> zarr_fill_bytes(const nlohmann::json& j, DType d, const std::string& what) {
  std::vector<std::uint8_t> out(itemsize(d), 0);
  if (j.is_null()) return out;
  const std::string bad = what + ": fill_value " + j.dump() + " is not a valid " + numpy_name(d);
  if (d == DType::BOOL) {
    if (j.is_boolean()) out[0] = j.get<bool>() ? 1 : 0;
    else if (j.is_number_integer() && (j.get<std::int64_t>() == 0 || j.get<std::int64_t>() == 1))
      out[0] = static_cast<std::uint8_t>(j.get<std::int64_t>());
    else throw io_error(bad);
    return out;
  }
  return visit_dtype(d, [&](auto tag) -> std::vector<std::uint8_t> {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, bool>) {
      return out;
    } else if constexpr (std::is_integral_v<T>) {
      if (j.is_number_unsigned()) {
        const auto v = j.get<std::uint64_t>();
        if (!int_fits<T>(v)) throw io_error(bad);
        store_element<T>(out.data(), static_cast<T>(v));
      } else if (j.is_number_integer()) {
        const auto v = j.get<std::int64_t>();
        if (!int_fits<T>(v)) throw io_error(bad);
        store_element<T>(out.data(), static_cast<T>(v));
      } else {
        throw io_error(bad);
      }
      return out;
    } else {
      if (j.is_number()) {
        store_element<T>(out.data(), float_cast<T>(j.get<double>()));
      } else if (j.is_string()) {
        const std::string s = j.get<std::string>();
        if (s == "NaN") store_element<T>(out.data(), float_cast<T>(std::numeric_limits<double>::quiet_NaN()));
        else if (s == "Infinity") store_element<T>(out.data(), float_cast<T>(HUGE_VAL));
        else if (s == "-Infinity") store_element<T>(out.data(), float_cast<T>(-HUGE_VAL));
        else if (s.size() == 2 + 2 * out.size() && s[0] == '0' && s[1] == 'x') {
          std::uint64_t bits = 0;
          for (std::size_t i = 2; i < s.size(); ++i) {
            const char c = s[i];
            int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (v < 0) throw io_error(bad);
            bits = (bits << 4) | static_cast<std::uint64_t>(v);
          }
          for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::uint8_t>(bits >> (8 * i));
        } else {
          throw io_error(bad);
        }
      } else {
        throw io_error(bad);
      }
      return out;
    }
  });
}

// ---- metadata -------------------------------------------------------------------

inline Shape zarr_shape(const nlohmann::json& j, const std::string& what, bool positive) {
  if (!j.is_array()) throw io_error(what + " must be an array, got " + j.dump());
  if (j.size() > static_cast<std::size_t>(kZarrMaxRank)) throw io_error(what + ": rank above " + std::to_string(kZarrMaxRank));
  Shape s;
  for (const auto& d : j) {
    const Index v = static_cast<Index>(json_count(d, what + " entry", std::numeric_limits<std::int32_t>::max() * Index{1024}));
    if (positive && v == 0) throw io_error(what + ": chunk dimensions must be positive, got " + j.dump());
    s.push_back(v);
  }
  return s;
}

// Checks that shape and chunks agree and that their byte counts do not overflow.
inline void zarr_check_shapes(ZarrArray& a, const std::string& what) {
  if (a.chunks.size() != a.shape.size())
    throw io_error(what + ": chunk shape " + to_string(a.chunks) + " and shape " + to_string(a.shape) +
                   " differ in rank");
  const std::size_t item = itemsize(a.dtype);
  const std::size_t max = std::numeric_limits<std::size_t>::max() / 2 / item;
  for (const Shape* s : {&a.shape, &a.chunks}) {
    std::size_t n = 1;
    for (Index d : *s) {
      if (d != 0 && n > max / static_cast<std::size_t>(d))
        throw io_error(what + ": byte count of shape " + to_string(*s) + " overflows");
      n *= static_cast<std::size_t>(d);
    }
  }
}

inline std::vector<ZarrCodec> zarr_v3_codecs(const nlohmann::json& j, const std::string& what, std::size_t rank,
                                             int depth);

inline ZarrCodec zarr_v3_codec(const nlohmann::json& c, const std::string& what, std::size_t rank, int depth) {
  std::string name;
  nlohmann::json conf = nlohmann::json::object();
  if (c.is_string()) {
    name = c.get<std::string>();
  } else {
    name = json_string(json_field(c, "name", what), what + ": codec name");
    if (c.contains("configuration")) conf = c["configuration"];
    if (!conf.is_object()) throw io_error(what + ": codec '" + name + "' configuration must be an object");
  }
  ZarrCodec z;
  if (name == "bytes") {
    z.kind = ZarrCodec::kBytes;
    if (conf.contains("endian")) {
      const std::string e = json_string(conf["endian"], what + ": bytes endian");
      if (e != "little" && e != "big") throw io_error(what + ": bytes codec endian '" + e + "' is not little or big");
      z.big_endian = e == "big";
    }
  } else if (name == "zstd") {
    z.kind = ZarrCodec::kZstd;
  } else if (name == "crc32c") {
    z.kind = ZarrCodec::kCrc32c;
  } else if (name == "sharding_indexed") {
    if (depth >= kZarrMaxShardingDepth) throw io_error(what + ": sharding_indexed nested too deeply");
    z.kind = ZarrCodec::kSharding;
    z.inner_chunk = zarr_shape(json_field(conf, "chunk_shape", what + ": sharding_indexed"), what + ": sharding chunk_shape", true);
    if (z.inner_chunk.size() != rank) throw io_error(what + ": sharding chunk_shape rank differs from the array's");
    z.inner = zarr_v3_codecs(json_field(conf, "codecs", what + ": sharding_indexed"), what + " (inner codecs)", rank, depth + 1);
    if (conf.contains("index_codecs")) {
      z.index = zarr_v3_codecs(conf["index_codecs"], what + " (index codecs)", rank + 1, kZarrMaxShardingDepth);
    } else {
      ZarrCodec crc;
      crc.kind = ZarrCodec::kCrc32c;
      z.index = {ZarrCodec{}, crc};
    }
    for (const auto& ic : z.index)
      if (ic.kind != ZarrCodec::kBytes && ic.kind != ZarrCodec::kCrc32c)
        throw io_error(what + ": sharding index codecs other than bytes and crc32c are not supported");
    if (conf.contains("index_location")) {
      const std::string loc = json_string(conf["index_location"], what + ": index_location");
      if (loc != "start" && loc != "end") throw io_error(what + ": index_location '" + loc + "' is not start or end");
      z.index_at_end = loc == "end";
    }
  } else {
    throw io_error(what + ": zarr v3 codec '" + name + "' is not supported (linen reads bytes, zstd, crc32c, " +
                   "sharding_indexed: the codecs Orbax writes)");
  }
  return z;
}

inline std::vector<ZarrCodec> zarr_v3_codecs(const nlohmann::json& j, const std::string& what, std::size_t rank,
                                             int depth) {
  if (!j.is_array() || j.empty()) throw io_error(what + ": codecs must be a non-empty array");
  if (j.size() > 16) throw io_error(what + ": more than 16 codecs");
  std::vector<ZarrCodec> out;
  int array_to_bytes = 0;
  for (const auto& c : j) {
    out.push_back(zarr_v3_codec(c, what, rank, depth));
    const bool ab = out.back().kind == ZarrCodec::kBytes || out.back().kind == ZarrCodec::kSharding;
    if (ab && ++array_to_bytes > 1) throw io_error(what + ": more than one array-to-bytes codec");
    if (!ab && array_to_bytes == 0) throw io_error(what + ": a bytes-to-bytes codec before the array-to-bytes codec");
  }
  if (array_to_bytes != 1) throw io_error(what + ": no array-to-bytes codec (bytes or sharding_indexed)");
  return out;
}

// The array described by .zarray (zarr_format 2) or zarr.json (zarr_format 3) bytes.
inline ZarrArray parse_zarr_metadata(const std::uint8_t* data, std::size_t size, const std::string& what) {
  const nlohmann::json j = parse_json_bounded(data, size, what);
  if (!j.is_object()) throw io_error(what + ": zarr metadata must be a JSON object");
  ZarrArray a;
  const std::int64_t format = json_count(json_field(j, "zarr_format", what), what + ": zarr_format", 3);
  if (format != 2 && format != 3) throw io_error(what + ": zarr_format " + std::to_string(format) + " is not 2 or 3");
  a.format = static_cast<int>(format);
  if (a.format == 2) {
    const std::string dt = json_string(json_field(j, "dtype", what), what + ": dtype");
    const auto d = zarr_v2_dtype(dt);
    if (!d) throw io_error(what + ": zarr dtype '" + dt + "' is not supported (float16/32/64, bfloat16, integers, bool)");
    a.dtype = d->first;
    a.big_endian = d->second;
    a.shape = zarr_shape(json_field(j, "shape", what), what + ": shape", false);
    a.chunks = zarr_shape(json_field(j, "chunks", what), what + ": chunks", true);
    const auto& comp = json_field(j, "compressor", what);
    if (!comp.is_null()) {
      const std::string id = json_string(json_field(comp, "id", what + ": compressor"), what + ": compressor id");
      if (id != "zstd")
        throw io_error(what + ": zarr compressor '" + id + "' is not supported (linen reads zstd and none: what Orbax writes)");
      a.v2_zstd = true;
      if (comp.contains("level") && comp["level"].is_number_integer()) a.v2_level = comp["level"].get<int>();
    }
    if (j.contains("filters") && !j["filters"].is_null()) {
      std::string ids;
      if (j["filters"].is_array())
        for (const auto& f : j["filters"])
          ids += (ids.empty() ? "" : ", ") + (f.is_object() && f.contains("id") ? f["id"].dump() : f.dump());
      throw io_error(what + ": zarr filters [" + ids + "] are not supported (Orbax writes none)");
    }
    const std::string order = j.contains("order") ? json_string(j["order"], what + ": order") : "C";
    if (order != "C") throw io_error(what + ": zarr order '" + order + "' is not supported (only C; Orbax writes C)");
    if (j.contains("dimension_separator")) {
      const std::string s = json_string(j["dimension_separator"], what + ": dimension_separator");
      if (s != "." && s != "/") throw io_error(what + ": dimension_separator '" + s + "' is not '.' or '/'");
      a.separator = s[0];
    }
    a.fill = zarr_fill_bytes(j.contains("fill_value") ? j["fill_value"] : nlohmann::json(), a.dtype, what);
  } else {
    if (j.contains("node_type") && json_string(j["node_type"], what + ": node_type") != "array")
      throw io_error(what + ": zarr.json node_type is not 'array'");
    const std::string dt = json_string(json_field(j, "data_type", what), what + ": data_type");
    const auto d = dtype_from_numpy_name(dt);
    if (!d) throw io_error(what + ": zarr data_type '" + dt + "' is not supported (float16/32/64, bfloat16, integers, bool)");
    a.dtype = *d;
    a.shape = zarr_shape(json_field(j, "shape", what), what + ": shape", false);
    const auto& grid = json_field(j, "chunk_grid", what);
    const std::string gname = json_string(json_field(grid, "name", what + ": chunk_grid"), what + ": chunk_grid name");
    if (gname != "regular") throw io_error(what + ": chunk_grid '" + gname + "' is not supported (only regular)");
    a.chunks = zarr_shape(json_field(json_field(grid, "configuration", what + ": chunk_grid"), "chunk_shape",
                                     what + ": chunk_grid configuration"),
                          what + ": chunk_shape", true);
    a.v3_default_keys = true;
    a.separator = '/';
    if (j.contains("chunk_key_encoding")) {
      const auto& e = j["chunk_key_encoding"];
      const std::string name = json_string(json_field(e, "name", what + ": chunk_key_encoding"), what + ": chunk_key_encoding name");
      if (name == "v2") {
        a.v3_default_keys = false;
        a.separator = '.';
      } else if (name != "default") {
        throw io_error(what + ": chunk_key_encoding '" + name + "' is not supported (default or v2)");
      }
      if (e.contains("configuration") && e["configuration"].is_object() && e["configuration"].contains("separator")) {
        const std::string s = json_string(e["configuration"]["separator"], what + ": separator");
        if (s != "." && s != "/") throw io_error(what + ": chunk key separator '" + s + "' is not '.' or '/'");
        a.separator = s[0];
      }
    }
    a.codecs = zarr_v3_codecs(json_field(j, "codecs", what), what, a.shape.size(), 0);
    for (const auto& c : a.codecs)
      if (c.kind == ZarrCodec::kSharding)
        for (std::size_t i = 0; i < a.chunks.size(); ++i)
          if (a.chunks[i] % c.inner_chunk[i] != 0)
            throw io_error(what + ": sharding chunk_shape " + to_string(c.inner_chunk) + " does not divide the chunk shape " +
                           to_string(a.chunks));
    a.fill = zarr_fill_bytes(json_field(j, "fill_value", what), a.dtype, what);
  }
  zarr_check_shapes(a, what);
  return a;
}

// "zstd(level=1)", "sharding_indexed(chunk_shape=(8), codecs=[bytes(little), zstd])", ...
inline std::string describe_codecs(const std::vector<ZarrCodec>& cs) {
  std::string s;
  for (const auto& c : cs) {
    if (!s.empty()) s += ", ";
    switch (c.kind) {
      case ZarrCodec::kBytes: s += c.big_endian ? "bytes(big)" : "bytes(little)"; break;
      case ZarrCodec::kZstd: s += "zstd"; break;
      case ZarrCodec::kCrc32c: s += "crc32c"; break;
      case ZarrCodec::kSharding:
        s += "sharding_indexed(chunk_shape=" + to_string(c.inner_chunk) + ", codecs=[" + describe_codecs(c.inner) +
             "], index_codecs=[" + describe_codecs(c.index) + "])";
        break;
    }
  }
  return s;
}
inline std::string describe_codecs(const ZarrArray& a) {
  if (a.format == 3) return describe_codecs(a.codecs);
  return a.v2_zstd ? "zstd(level=" + std::to_string(a.v2_level) + ")" : "none";
}

// ---- chunk keys -----------------------------------------------------------------

inline std::string zarr_chunk_key(const ZarrArray& a, const std::vector<Index>& cell) {
  std::string k = a.v3_default_keys ? "c" : "";
  if (cell.empty()) return a.v3_default_keys ? k : "0";
  for (std::size_t i = 0; i < cell.size(); ++i) {
    if (i > 0 || a.v3_default_keys) k += a.separator;
    k += std::to_string(cell[i]);
  }
  return k;
}

// The grid cell of chunk key `key`; nullopt if it is not one of this array's keys.
inline std::optional<std::vector<Index>> zarr_parse_chunk_key(const ZarrArray& a, std::string_view key) {
  std::vector<Index> cell;
  if (a.v3_default_keys) {
    if (key.empty() || key[0] != 'c') return std::nullopt;
    key.remove_prefix(1);
    if (a.shape.empty()) return key.empty() ? std::optional<std::vector<Index>>(cell) : std::nullopt;
    if (key.empty() || key[0] != a.separator) return std::nullopt;
    key.remove_prefix(1);
  } else if (a.shape.empty()) {
    return key == "0" ? std::optional<std::vector<Index>>(cell) : std::nullopt;
  }
  std::size_t i = 0;
  while (true) {
    std::size_t j = i;
    Index v = 0;
    while (j < key.size() && key[j] >= '0' && key[j] <= '9') {
      if (v > (std::numeric_limits<Index>::max() - 9) / 10) return std::nullopt;
      v = v * 10 + (key[j] - '0');
      ++j;
    }
    if (j == i) return std::nullopt;
    cell.push_back(v);
    if (j == key.size()) break;
    if (key[j] != a.separator) return std::nullopt;
    i = j + 1;
  }
  if (cell.size() != a.shape.size()) return std::nullopt;
  for (std::size_t d = 0; d < cell.size(); ++d) {
    const Index grid = a.shape[d] == 0 ? 0 : (a.shape[d] + a.chunks[d] - 1) / a.chunks[d];
    if (cell[d] >= grid) return std::nullopt;
  }
  return cell;
}

// ---- block copies -----------------------------------------------------------------

// Copies the box of `extent` elements from src (shape src_shape) at src_origin to
// dst (shape dst_shape) at dst_origin; C order, `item` bytes an element.
inline void copy_box(std::uint8_t* dst, const Shape& dst_shape, const std::vector<Index>& dst_origin,
                     const std::uint8_t* src, const Shape& src_shape, const std::vector<Index>& src_origin,
                     const std::vector<Index>& extent, std::size_t item) {
  const std::size_t r = extent.size();
  if (r == 0) {
    std::memcpy(dst, src, item);
    return;
  }
  for (Index e : extent)
    if (e <= 0) return;
  std::vector<std::size_t> ds(r), ss(r);  // strides in bytes
  ds[r - 1] = ss[r - 1] = item;
  for (std::size_t i = r - 1; i > 0; --i) {
    ds[i - 1] = ds[i] * static_cast<std::size_t>(dst_shape[i]);
    ss[i - 1] = ss[i] * static_cast<std::size_t>(src_shape[i]);
  }
  std::vector<Index> idx(r, 0);
  const std::size_t row = static_cast<std::size_t>(extent[r - 1]) * item;
  while (true) {
    std::size_t d = 0, s = 0;
    for (std::size_t i = 0; i < r; ++i) {
      d += static_cast<std::size_t>(dst_origin[i] + idx[i]) * ds[i];
      s += static_cast<std::size_t>(src_origin[i] + idx[i]) * ss[i];
    }
    std::memcpy(dst + d, src + s, row);
    std::size_t k = r - 1;
    while (k > 0) {
      if (++idx[k - 1] < extent[k - 1]) break;
      idx[k - 1] = 0;
      --k;
    }
    if (k == 0) return;
  }
}

inline void fill_elements(std::uint8_t* p, std::size_t bytes, const std::vector<std::uint8_t>& fill) {
  const std::size_t item = fill.size();
  bool zero = std::all_of(fill.begin(), fill.end(), [](std::uint8_t b) { return b == 0; });
  if (zero) {
    if (bytes) std::memset(p, 0, bytes);
    return;
  }
  for (std::size_t i = 0; i + item <= bytes; i += item) std::memcpy(p + i, fill.data(), item);
}

// ---- decoding ------------------------------------------------------------------

// The chunk of shape `shape` that the v3 codec chain `cs` encodes as n bytes at data,
// C order, little-endian, `item` bytes an element.
inline std::vector<std::uint8_t> zarr_v3_decode(const std::vector<ZarrCodec>& cs, const std::uint8_t* data,
                                                std::size_t n, const Shape& shape, std::size_t item,
                                                const std::vector<std::uint8_t>& fill, const std::string& what) {
  std::size_t elements = 1;
  for (Index d : shape) elements *= static_cast<std::size_t>(d);
  const std::size_t nbytes = elements * item;
  std::size_t ab = 0;
  while (cs[ab].kind != ZarrCodec::kBytes && cs[ab].kind != ZarrCodec::kSharding) ++ab;
  // The largest byte count the array-to-bytes codec may produce.
  std::size_t bound = nbytes;
  if (cs[ab].kind == ZarrCodec::kSharding) bound = nbytes * 2 + (elements + 1) * 16 + 4096;
  std::vector<std::uint8_t> buf(data, data + n);
  for (std::size_t k = cs.size(); k-- > ab + 1;) {
    // bytes-to-bytes codecs, undone last to first; `b` bounds this stage's output.
    std::size_t b = bound;
    for (std::size_t m = ab + 1; m < k; ++m)
      if (cs[m].kind == ZarrCodec::kCrc32c) b += 4;
    if (cs[k].kind == ZarrCodec::kCrc32c) {
      if (buf.size() < 4) throw io_error(what + ": crc32c codec: fewer than 4 bytes");
      const std::size_t m = buf.size() - 4;
      const std::uint32_t stored = load_le<std::uint32_t>(buf.data() + m);
      if (stored != crc32c(buf.data(), m)) throw io_error(what + ": crc32c codec checksum mismatch");
      buf.resize(m);
    } else {
      buf = zstd_decompress(buf.data(), buf.size(), b, what);
    }
  }
  if (cs[ab].kind == ZarrCodec::kBytes) {
    if (buf.size() != nbytes)
      throw io_error(what + ": chunk of shape " + to_string(shape) + " decodes to " + std::to_string(buf.size()) +
                     " bytes, expected " + std::to_string(nbytes));
    if (cs[ab].big_endian) byteswap_elements(buf.data(), buf.size(), item);
    return buf;
  }
  // sharding_indexed: inner chunks, then (or first) the index.
  const ZarrCodec& sh = cs[ab];
  Shape grid;
  std::size_t inner_count = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    grid.push_back(shape[i] / sh.inner_chunk[i]);
    inner_count *= static_cast<std::size_t>(grid.back());
  }
  std::size_t index_bytes = inner_count * 16;
  for (const auto& ic : sh.index)
    if (ic.kind == ZarrCodec::kCrc32c) index_bytes += 4;
  if (buf.size() < index_bytes)
    throw io_error(what + ": shard of " + std::to_string(buf.size()) + " bytes is shorter than its index (" +
                   std::to_string(index_bytes) + " bytes)");
  const std::size_t index_at = sh.index_at_end ? buf.size() - index_bytes : 0;
  Shape index_shape = grid;
  index_shape.push_back(2);
  const std::vector<std::uint8_t> index =
      zarr_v3_decode(sh.index, buf.data() + index_at, index_bytes, index_shape, 8, std::vector<std::uint8_t>(8, 0),
                     what + " (shard index)");
  const std::size_t lo = sh.index_at_end ? 0 : index_bytes;
  const std::size_t hi = sh.index_at_end ? index_at : buf.size();
  std::vector<std::uint8_t> out(nbytes);
  fill_elements(out.data(), out.size(), fill);
  std::vector<Index> cell(shape.size(), 0), origin(shape.size()), zero(shape.size(), 0);
  for (std::size_t c = 0; c < inner_count; ++c) {
    const std::uint64_t off = load_le<std::uint64_t>(index.data() + c * 16);
    const std::uint64_t len = load_le<std::uint64_t>(index.data() + c * 16 + 8);
    const std::uint64_t none = std::numeric_limits<std::uint64_t>::max();
    if (!(off == none && len == none)) {
      if (off < lo || off > hi || len > hi - off)
        throw io_error(what + ": shard index entry " + std::to_string(c) + " (offset " + std::to_string(off) +
                       ", " + std::to_string(len) + " bytes) lies outside the shard's data [" + std::to_string(lo) +
                       ", " + std::to_string(hi) + ")");
      const std::vector<std::uint8_t> inner =
          zarr_v3_decode(sh.inner, buf.data() + off, static_cast<std::size_t>(len), sh.inner_chunk, item, fill,
                         what + " (inner chunk " + std::to_string(c) + ")");
      for (std::size_t i = 0; i < shape.size(); ++i) origin[i] = cell[i] * sh.inner_chunk[i];
      copy_box(out.data(), shape, origin, inner.data(), sh.inner_chunk, zero, sh.inner_chunk, item);
    }
    for (std::size_t i = shape.size(); i-- > 0;) {
      if (++cell[i] < grid[i]) break;
      cell[i] = 0;
    }
  }
  return out;
}

// The stored chunk of n bytes at data, decoded: a.chunk_bytes() bytes, C order,
// little-endian, bools checked to be 0 or 1.
inline std::vector<std::uint8_t> zarr_decode_chunk_bytes(const ZarrArray& a, const std::uint8_t* data, std::size_t n,
                                                         const std::string& what) {
  const std::size_t item = itemsize(a.dtype);
  const std::size_t nbytes = a.chunk_bytes();
  std::vector<std::uint8_t> chunk;
  if (a.format == 2) {
    if (a.v2_zstd) {
      chunk = zstd_decompress(data, n, nbytes, what);
    } else {
      chunk.assign(data, data + n);
    }
    if (chunk.size() != nbytes)
      throw io_error(what + ": chunk of shape " + to_string(a.chunks) + " decodes to " + std::to_string(chunk.size()) +
                     " bytes, expected " + std::to_string(nbytes));
    if (a.big_endian) byteswap_elements(chunk.data(), chunk.size(), item);
  } else {
    chunk = zarr_v3_decode(a.codecs, data, n, a.chunks, item, a.fill, what);
  }
  if (a.dtype == DType::BOOL)
    for (std::size_t i = 0; i < chunk.size(); ++i)
      if (chunk[i] > 1)
        throw io_error(what + ": bool chunk holds byte " + std::to_string(chunk[i]) + " at element " + std::to_string(i));
  return chunk;
}

// Decodes the stored chunk at grid `cell` (n bytes at data) into `out`, the
// array's C-order buffer (a.array_bytes() bytes), clipping at the array's edges.
inline void zarr_decode_chunk(const ZarrArray& a, const std::vector<Index>& cell, const std::uint8_t* data,
                              std::size_t n, std::uint8_t* out, const std::string& what) {
  const std::vector<std::uint8_t> chunk = zarr_decode_chunk_bytes(a, data, n, what);
  std::vector<Index> origin(a.shape.size()), extent(a.shape.size()), zero(a.shape.size(), 0);
  for (std::size_t i = 0; i < a.shape.size(); ++i) {
    origin[i] = cell[i] * a.chunks[i];
    extent[i] = std::min(a.chunks[i], a.shape[i] - origin[i]);
  }
  copy_box(out, a.shape, origin, chunk.data(), a.chunks, zero, extent, itemsize(a.dtype));
}

// ---- encoding (zarr v2, what save_orbax writes) -------------------------------------

// The .zarray of a zstd-compressed C-order zarr v2 array, as tensorstore writes it
// for Orbax (keys sorted, fill_value null).
inline std::string zarr_v2_metadata_json(DType d, const Shape& shape, const Shape& chunks, int level) {
  nlohmann::json j;
  j["chunks"] = chunks;
  j["compressor"] = {{"id", "zstd"}, {"level", level}};
  j["dimension_separator"] = ".";
  j["dtype"] = zarr_v2_dtype_name(d);
  j["fill_value"] = nullptr;
  j["filters"] = nullptr;
  j["order"] = "C";
  j["shape"] = shape;
  j["zarr_format"] = 2;
  return j.dump();
}

// The chunk at grid `cell` of the C-order array `src` (shape a.shape), padded with
// zeros past the array's edges, as a zstd frame.
inline std::vector<std::uint8_t> zarr_v2_encode_chunk(const ZarrArray& a, const std::uint8_t* src,
                                                      const std::vector<Index>& cell, const std::string& what) {
  const std::size_t item = itemsize(a.dtype);
  std::vector<std::uint8_t> chunk(a.chunk_bytes(), 0);
  std::vector<Index> origin(a.shape.size()), extent(a.shape.size()), zero(a.shape.size(), 0);
  for (std::size_t i = 0; i < a.shape.size(); ++i) {
    origin[i] = cell[i] * a.chunks[i];
    extent[i] = std::min(a.chunks[i], a.shape[i] - origin[i]);
  }
  copy_box(chunk.data(), a.chunks, zero, src, a.shape, origin, extent, item);
  return zstd_compress(chunk.data(), chunk.size(), a.v2_level, what);
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_ZARR_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Orbax checkpoints (orbax-checkpoint, the checkpointing library of Flax and JAX),
// read into and written from linen::io::Variables:
//
//   ocp.StandardCheckpointer().save(path, params)   ->  linen::io::load_orbax(path)
//   ocp.StandardCheckpointer().restore(path)        <-  linen::io::save_orbax(path, variables)
//   ocp.CheckpointManager(root).save(step, ...)     ->  load_orbax(root, {.step = 3, .item = "state"})
//
// A checkpoint item is an OCDBT key-value store (tensorstore; detail/orbax/ocdbt*.hpp)
// holding one zarr array per PyTree leaf (zarr v2 with zstd, or zarr v3 with sharding
// for Orbax's v1 API; detail/orbax/zarr.hpp). Its `_METADATA` file, when present,
// gives the PyTree structure: each leaf's keys, from which Orbax built the array's
// name by joining them with '.' (`params.query.kernel`). linen joins the same keys
// with '/' (`params/query/kernel`); list indices are keys like any other ("0", "1").
// Without `_METADATA` the names come from the OCDBT keys alone, split at '.' (a key
// that itself holds a '.' cannot be told apart then). When every leaf's last key is
// `value` (an nnx.State: `query.kernel.value`), that last key is dropped.
//
// Directory layouts accepted by load_orbax / list_orbax / is_orbax_checkpoint:
//   item dir       <dir>/{manifest.ocdbt, d/, ocdbt.process_N/, _METADATA, ...}
//   composite dir  <dir>/<item>/... (Checkpointer(CompositeCheckpointHandler), ocp.v1)
//   manager root   <dir>/<step>/<item>/... (CheckpointManager; steps are integers)
//
// Limits: the checkpoint's arrays must be OCDBT-stored (use_ocdbt, Orbax's default
// since 2024), with the codecs Orbax writes (zstd or none; zarr3 bytes, zstd,
// crc32c, sharding_indexed); strings and other non-array leaves are skipped; every
// array is read whole (no slicing), at most OrbaxOptions::max_array_bytes each.
// Everything read stays inside the checkpoint directory (data-file paths with ".."
// or absolute paths, and symlinks leaving it, are refused). Needs libzstd
// (LINEN_HAS_ZSTD): without it every call throws io_error saying so.
#ifndef LINEN_IO_ORBAX_HPP
#define LINEN_IO_ORBAX_HPP

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "detail/orbax/json.hpp"
#include "detail/orbax/ocdbt_store.hpp"
#include "detail/orbax/ocdbt_writer.hpp"
#include "detail/orbax/zarr.hpp"
#include "detail/orbax/zstd.hpp"
#include "detail/text.hpp"
#include "variables.hpp"

namespace linen::io {

struct OrbaxOptions {
  // CheckpointManager root: the step to read (default: the latest).
  std::optional<long long> step;
  // Composite checkpoint or manager step: the item to read ("default", "state", ...);
  // empty: the only PyTree item.
  std::string item;
  // Arrays whose decoded size exceeds this are refused (a shape in a hostile file
  // could otherwise ask for any amount of memory).
  std::size_t max_array_bytes = std::size_t{16} << 30;
};

struct OrbaxSaveOptions {
  // 0: one chunk per array (what Orbax writes for a single-device array); else the
  // largest chunk in bytes (leading dimensions are halved until a chunk fits).
  std::size_t max_chunk_bytes = 0;
  // zstd level of the array chunks (Orbax writes 1).
  int zstd_level = 1;
};

// One stored array, as list_orbax describes it.
struct OrbaxArrayInfo {
  std::string name;        // Flax path: "params/query/kernel"
  std::string param_name;  // Orbax's name, the OCDBT key prefix: "params.query.kernel"
  DType dtype = DType::F32;
  Shape shape;
  Shape chunk_shape;
  int zarr_format = 2;
  std::string codecs;  // "zstd(level=1)", "bytes(little), sharding_indexed(...)", ...
  std::size_t stored_chunks = 0;
  std::uint64_t stored_bytes = 0;  // encoded bytes of the stored chunks
};

namespace detail {

namespace fs = std::filesystem;

inline constexpr std::uint64_t kOrbaxMaxJsonFileBytes = std::uint64_t{256} << 20;
inline constexpr std::uint64_t kOrbaxMaxZarrMetadataBytes = std::uint64_t{16} << 20;

inline bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}
inline bool exists_path(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}

// An item directory: an OCDBT store (merged or per process) or a PyTree _METADATA.
inline bool is_orbax_item_dir(const fs::path& p) {
  if (!is_dir(p)) return false;
  if (exists_path(p / "manifest.ocdbt") || exists_path(p / "_METADATA") || is_dir(p / "ocdbt.process_0")) return true;
  return false;
}

inline std::vector<std::string> orbax_items(const fs::path& p) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(p, ec), end; !ec && it != end; it.increment(ec))
    if (is_orbax_item_dir(it->path())) out.push_back(it->path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

inline bool is_step_name(const std::string& s) {
  return !s.empty() && s.size() <= 18 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

inline std::vector<long long> orbax_steps(const fs::path& p) {
  std::vector<long long> out;
  std::error_code ec;
  for (fs::directory_iterator it(p, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (is_step_name(n) && is_dir(it->path()) && (is_orbax_item_dir(it->path()) || !orbax_items(it->path()).empty()))
      out.push_back(std::stoll(n));
  }
  std::sort(out.begin(), out.end());
  return out;
}

template <class T>
std::string join_list(const std::vector<T>& v) {
  std::string s;
  for (const auto& x : v) {
    if (!s.empty()) s += ", ";
    if constexpr (std::is_same_v<T, std::string>)
      s += "'" + x + "'";
    else
      s += std::to_string(x);
  }
  return s.empty() ? "none" : s;
}

// The item directory that `dir` and `opts` name (see the layouts above).
inline fs::path resolve_orbax_item(const fs::path& dir, const OrbaxOptions& opts) {
  const std::string d = dir.string();
  if (!is_dir(dir)) throw io_error(d + ": not a directory (an Orbax checkpoint is a directory)");
  if (is_orbax_item_dir(dir)) {
    if (opts.step) throw io_error(d + ": step " + std::to_string(*opts.step) + " given, but this is a checkpoint item, not a CheckpointManager root");
    if (!opts.item.empty()) throw io_error(d + ": item '" + opts.item + "' given, but this is a checkpoint item itself");
    return dir;
  }
  fs::path composite = dir;
  const std::vector<long long> steps = orbax_steps(dir);
  const std::vector<std::string> top_items = orbax_items(dir);
  if (!steps.empty() && top_items.empty()) {
    long long s = steps.back();
    if (opts.step) {
      if (!std::binary_search(steps.begin(), steps.end(), *opts.step))
        throw io_error(d + ": CheckpointManager root has no step " + std::to_string(*opts.step) + " (steps: " +
                       join_list(steps) + ")");
      s = *opts.step;
    }
    composite = dir / std::to_string(s);
    if (is_orbax_item_dir(composite)) {
      if (!opts.item.empty()) throw io_error(composite.string() + ": item '" + opts.item + "' given, but the step is a single item");
      return composite;
    }
  } else if (opts.step) {
    throw io_error(d + ": step " + std::to_string(*opts.step) + " given, but this is not a CheckpointManager root (no step directories)");
  }
  const std::vector<std::string> items = orbax_items(composite);
  if (items.empty())
    throw io_error(composite.string() + ": not an Orbax checkpoint (no manifest.ocdbt or _METADATA, no item or step directories)");
  if (!opts.item.empty()) {
    if (!std::binary_search(items.begin(), items.end(), opts.item))
      throw io_error(composite.string() + ": no checkpoint item '" + opts.item + "' (items: " + join_list(items) + ")");
    return composite / opts.item;
  }
  if (items.size() > 1)
    throw io_error(composite.string() + ": several PyTree items (" + join_list(items) +
                   "): choose one with OrbaxOptions::item");
  return composite / items.front();
}

// One PyTree leaf to read: its keys (from _METADATA, or split from its name).
struct OrbaxLeaf {
  std::vector<std::string> keys;
  std::string param_name;
};

// The keys of a '/'-joined Flax path ("params/query/kernel" -> params, query, kernel;
// empty keys kept, so that every path maps to one key list and back).
inline std::vector<std::string> flax_path_keys(const std::string& path) {
  std::vector<std::string> keys;
  std::size_t i = 0;
  while (true) {
    const std::size_t j = path.find('/', i);
    keys.push_back(path.substr(i, j == std::string::npos ? std::string::npos : j - i));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return keys;
}

inline std::string orbax_param_name(const std::vector<std::string>& keys) {
  std::string s;
  for (const auto& k : keys) s += (s.empty() ? "" : ".") + k;
  return s;
}

inline std::string zarr_metadata_key(const OcdbtStore& store, const std::string& param) {
  if (store.contains(param + "/.zarray")) return param + "/.zarray";
  if (store.contains(param + "/zarr.json")) return param + "/zarr.json";
  return "";
}

// The leaves of the item: from _METADATA when present, else from the OCDBT keys.
inline std::vector<OrbaxLeaf> orbax_leaves(const fs::path& item, const fs::path& boundary, const OcdbtStore& store) {
  std::vector<OrbaxLeaf> leaves;
  const fs::path meta = item / "_METADATA";
  if (exists_path(meta)) {
    const std::string what = meta.string();
    const auto bytes = read_small_file(meta, boundary, kOrbaxMaxJsonFileBytes, what);
    const nlohmann::json j = parse_json_bounded(bytes.data(), bytes.size(), what, 64);
    const nlohmann::json& tree = json_field(j, "tree_metadata", what);
    if (!tree.is_object()) throw io_error(what + ": tree_metadata must be an object");
    if (j.contains("use_ocdbt") && j["use_ocdbt"].is_boolean() && !j["use_ocdbt"].get<bool>())
      throw io_error(what + ": use_ocdbt is false: checkpoints without OCDBT (one directory per array) are not supported");
    for (auto it = tree.begin(); it != tree.end(); ++it) {
      const std::string ctx = what + ": leaf " + it.key();
      const nlohmann::json& km = json_field(it.value(), "key_metadata", ctx);
      if (!km.is_array() || km.empty()) throw io_error(ctx + ": key_metadata must be a non-empty array");
      OrbaxLeaf leaf;
      for (const auto& k : km) {
        const nlohmann::json& key = json_field(k, "key", ctx);
        if (key.is_string()) leaf.keys.push_back(key.get<std::string>());
        else if (key.is_number_integer()) leaf.keys.push_back(std::to_string(key.get<std::int64_t>()));
        else throw io_error(ctx + ": key " + key.dump() + " is neither a string nor an integer");
      }
      leaf.param_name = orbax_param_name(leaf.keys);
      bool skip = false;
      std::string value_type;
      if (it.value().contains("value_metadata") && it.value()["value_metadata"].is_object()) {
        const auto& vm = it.value()["value_metadata"];
        if (vm.contains("skip_deserialize") && vm["skip_deserialize"].is_boolean()) skip = vm["skip_deserialize"].get<bool>();
        if (vm.contains("value_type") && vm["value_type"].is_string()) value_type = vm["value_type"].get<std::string>();
      }
      if (skip) continue;
      if (zarr_metadata_key(store, leaf.param_name).empty()) {
        if (value_type == "jax.Array" || value_type == "np.ndarray" || value_type == "scalar")
          throw io_error(item.string() + ": _METADATA lists array '" + leaf.param_name +
                         "', but the OCDBT store has no '" + leaf.param_name + "/.zarray' or '" + leaf.param_name +
                         "/zarr.json' for it");
        continue;  // strings, empty containers: not arrays
      }
      leaves.push_back(std::move(leaf));
    }
  } else {
    for (const auto& kv : store.entries()) {
      const std::string& k = kv.first;
      std::string param;
      for (const char* m : {"/.zarray", "/zarr.json"}) {
        const std::string suffix = m;
        if (k.size() > suffix.size() && k.compare(k.size() - suffix.size(), suffix.size(), suffix) == 0)
          param = k.substr(0, k.size() - suffix.size());
      }
      if (param.empty()) continue;
      OrbaxLeaf leaf;
      leaf.param_name = param;
      std::size_t i = 0;
      while (true) {
        const std::size_t j = param.find('.', i);
        leaf.keys.push_back(param.substr(i, j == std::string::npos ? std::string::npos : j - i));
        if (j == std::string::npos) break;
        i = j + 1;
      }
      leaves.push_back(std::move(leaf));
    }
  }
  // nnx.State: every leaf ends in a `value` key.
  const bool nnx = !leaves.empty() && std::all_of(leaves.begin(), leaves.end(), [](const OrbaxLeaf& l) {
    return l.keys.size() >= 2 && l.keys.back() == "value";
  });
  if (nnx)
    for (auto& l : leaves) l.keys.pop_back();
  return leaves;
}

inline std::string orbax_flax_path(const OrbaxLeaf& leaf, const std::string& item) {
  std::string p;
  for (const auto& k : leaf.keys) p += (p.empty() ? "" : "/") + k;
  if (auto why = Variables::path_error(p))
    throw io_error(item + ": array '" + leaf.param_name + "' has no valid Flax path ('" + p + "': " + *why + ")");
  return p;
}

struct OrbaxOpened {
  fs::path item;
  fs::path boundary;
  OcdbtStore store;
  std::vector<OrbaxLeaf> leaves;
};

inline OrbaxOpened open_orbax(const std::string& dir, const OrbaxOptions& opts) {
  require_zstd("linen::io: Orbax checkpoint " + dir);
  OrbaxOpened o;
  o.item = resolve_orbax_item(fs::path(dir), opts);
  o.boundary = resolved_path(o.item, "linen::io: Orbax checkpoint");
  o.store = OcdbtStore::open(o.item);
  o.leaves = orbax_leaves(o.item, o.boundary, o.store);
  return o;
}

inline ZarrArray orbax_zarr(const OrbaxOpened& o, const OrbaxLeaf& leaf, const std::string& meta_key,
                            std::size_t max_array_bytes) {
  const std::string what = o.item.string() + ": key '" + meta_key + "'";
  const auto it = o.store.entries().find(meta_key);
  if (it->second.indirect && it->second.ref.length > kOrbaxMaxZarrMetadataBytes)
    throw io_error(what + ": zarr metadata of " + std::to_string(it->second.ref.length) + " bytes is too large");
  const auto bytes = o.store.read(meta_key, it->second);
  ZarrArray a = parse_zarr_metadata(bytes.data(), bytes.size(), what);
  if (a.array_bytes() > max_array_bytes || a.chunk_bytes() > max_array_bytes)
    throw io_error(what + ": array '" + leaf.param_name + "' of shape " + to_string(a.shape) + " (chunks " +
                   to_string(a.chunks) + ") exceeds OrbaxOptions::max_array_bytes = " + std::to_string(max_array_bytes));
  return a;
}

// Calls f(chunk key, cell, value) for every stored chunk of the array.
template <class F>
void for_each_orbax_chunk(const OrbaxOpened& o, const OrbaxLeaf& leaf, const ZarrArray& a, F&& f) {
  const std::string prefix = leaf.param_name + "/";
  const auto& m = o.store.entries();
  for (auto it = m.lower_bound(prefix); it != m.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    const std::string rest = it->first.substr(prefix.size());
    if (rest == ".zarray" || rest == "zarr.json" || rest == ".zattrs") continue;
    const auto cell = zarr_parse_chunk_key(a, rest);
    if (!cell)
      throw io_error(o.item.string() + ": key '" + it->first + "' is not a chunk of array '" + leaf.param_name +
                     "' of shape " + to_string(a.shape) + " and chunks " + to_string(a.chunks));
    f(it->first, *cell, it->second);
  }
}

// custom_metadata of _CHECKPOINT_METADATA, in the item dir or the one above it.
inline std::map<std::string, std::string> orbax_custom_metadata(const fs::path& item) {
  std::map<std::string, std::string> out;
  for (const fs::path& dir : {item, item.parent_path()}) {
    const fs::path p = dir / "_CHECKPOINT_METADATA";
    if (!exists_path(p)) continue;
    const std::string what = p.string();
    const auto bytes = read_small_file(p, resolved_path(dir, what), kOrbaxMaxJsonFileBytes, what);
    const nlohmann::json j = parse_json_bounded(bytes.data(), bytes.size(), what, 64);
    if (j.is_object() && j.contains("custom_metadata") && j["custom_metadata"].is_object())
      for (auto it = j["custom_metadata"].begin(); it != j["custom_metadata"].end(); ++it)
        out[it.key()] = it.value().is_string() ? it.value().get<std::string>() : it.value().dump();
    break;
  }
  return out;
}

// Python's repr() of a str, as Orbax writes the keys of _METADATA's tree ("('a', 'b')").
// Exact for ASCII; other UTF-8 is kept as it is (Python keeps printable characters).
inline std::string python_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == static_cast<unsigned char>(q)) out += std::string("\\") + q;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + q;
}

inline std::string python_tuple_repr(const std::vector<std::string>& keys) {
  std::string s = "(";
  for (std::size_t i = 0; i < keys.size(); ++i) s += (i ? ", " : "") + python_repr(keys[i]);
  return s + (keys.size() == 1 ? ",)" : ")");
}

inline std::string base64(const std::string& in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8) |
                       static_cast<unsigned char>(in[i + 2]);
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += t[v & 63];
  }
  if (i + 1 == in.size()) {
    const unsigned v = static_cast<unsigned char>(in[i]) << 16;
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const unsigned v = (static_cast<unsigned char>(in[i]) << 16) | (static_cast<unsigned char>(in[i + 1]) << 8);
    out += t[v >> 18];
    out += t[(v >> 12) & 63];
    out += t[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

inline void write_text_file(const fs::path& p, const std::string& s) {
  write_bytes_file(p, std::vector<std::uint8_t>(s.begin(), s.end()));
}

// The chunk shape save_orbax uses for `shape` (see OrbaxSaveOptions::max_chunk_bytes).
inline Shape orbax_chunk_shape(const Shape& shape, std::size_t item, std::size_t max_chunk_bytes) {
  Shape c;
  for (Index d : shape) c.push_back(d > 0 ? d : 1);
  if (max_chunk_bytes == 0) return c;
  auto bytes = [&] {
    std::size_t n = item;
    for (Index d : c) n *= static_cast<std::size_t>(d);
    return n;
  };
  for (std::size_t i = 0; i < c.size() && bytes() > max_chunk_bytes; ++i)
    while (c[i] > 1 && bytes() > max_chunk_bytes) c[i] = (c[i] + 1) / 2;
  return c;
}

}  // namespace detail

// Is `dir` an Orbax checkpoint: an item directory, a composite checkpoint or a
// CheckpointManager root? Looks at a few directory entries only.
inline bool is_orbax_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path p(dir);
  if (!detail::is_dir(p)) return false;
  if (detail::is_orbax_item_dir(p)) return true;
  if (!detail::orbax_items(p).empty()) return true;
  return !detail::orbax_steps(p).empty();
}

// The arrays of the Orbax checkpoint at `dir` (item, composite or manager root; see
// the header comment), without reading their chunks.
inline std::vector<OrbaxArrayInfo> list_orbax(const std::string& dir, const OrbaxOptions& opts = {}) {
  const detail::OrbaxOpened o = detail::open_orbax(dir, opts);
  std::vector<OrbaxArrayInfo> out;
  for (const auto& leaf : o.leaves) {
    const std::string meta_key = detail::zarr_metadata_key(o.store, leaf.param_name);
    const detail::ZarrArray a = detail::orbax_zarr(o, leaf, meta_key, opts.max_array_bytes);
    OrbaxArrayInfo info;
    info.name = detail::orbax_flax_path(leaf, o.item.string());
    info.param_name = leaf.param_name;
    info.dtype = a.dtype;
    info.shape = a.shape;
    info.chunk_shape = a.chunks;
    info.zarr_format = a.format;
    info.codecs = detail::describe_codecs(a);
    detail::for_each_orbax_chunk(o, leaf, a, [&](const std::string&, const std::vector<Index>&, const auto& v) {
      ++info.stored_chunks;
      info.stored_bytes += v.indirect ? v.ref.length : v.bytes.size();
    });
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

// The storage of each array list_orbax found, a line each, for a lister (ckpt_ls):
//   storage  params/query/kernel  zarr v2  chunks (4, 2, 2)  1 chunk, 80 bytes  zstd(level=1)
inline std::string list_orbax_storage(const std::vector<OrbaxArrayInfo>& arrays) {
  std::string out;
  for (const OrbaxArrayInfo& a : arrays) {
    out += "storage  " + detail::escape_bytes(a.name) + "  zarr v" + std::to_string(a.zarr_format) + "  chunks " +
           to_string(a.chunk_shape) + "  " + std::to_string(a.stored_chunks) +
           (a.stored_chunks == 1 ? " chunk, " : " chunks, ") + std::to_string(a.stored_bytes) + " bytes  " +
           detail::escape_bytes(a.codecs) + "\n";
  }
  return out;
}

// The variables of the Orbax checkpoint at `dir`, at their Flax paths
// ("params/query/kernel"); metadata = the checkpoint's custom_metadata (strings).
// Throws io_error naming the file and key at fault.
inline Variables load_orbax(const std::string& dir, const OrbaxOptions& opts = {}) {
  const detail::OrbaxOpened o = detail::open_orbax(dir, opts);
  Variables v;
  for (const auto& leaf : o.leaves) {
    const std::string path = detail::orbax_flax_path(leaf, o.item.string());
    if (v.contains(path))
      throw io_error(o.item.string() + ": two arrays map to the Flax path '" + path + "'");
    const std::string meta_key = detail::zarr_metadata_key(o.store, leaf.param_name);
    const detail::ZarrArray a = detail::orbax_zarr(o, leaf, meta_key, opts.max_array_bytes);
    std::vector<std::uint8_t> bytes;
    // One chunk covering the array exactly (what Orbax writes for a single-device
    // array): decoded straight into the array's buffer, no fill, no copy.
    const std::string whole = leaf.param_name + "/" + detail::zarr_chunk_key(a, std::vector<Index>(a.shape.size(), 0));
    if (a.chunks == a.shape && a.array_bytes() > 0 && o.store.contains(whole)) {
      detail::for_each_orbax_chunk(o, leaf, a, [](const std::string&, const std::vector<Index>&, const auto&) {});
      const auto stored = o.store.read(whole);
      bytes = detail::zarr_decode_chunk_bytes(a, stored.data(), stored.size(), o.item.string() + ": key '" + whole + "'");
      v.set(path, Array(a.dtype, a.shape, std::move(bytes)));
      continue;
    }
    try {
      bytes.resize(a.array_bytes());
    } catch (const std::bad_alloc&) {
      throw io_error(o.item.string() + ": cannot allocate " + std::to_string(a.array_bytes()) + " bytes for array '" +
                     leaf.param_name + "'");
    }
    detail::fill_elements(bytes.data(), bytes.size(), a.fill);
    detail::for_each_orbax_chunk(o, leaf, a, [&](const std::string& key, const std::vector<Index>& cell, const auto& val) {
      const auto stored = o.store.read(key, val);
      detail::zarr_decode_chunk(a, cell, stored.data(), stored.size(), bytes.data(), o.item.string() + ": key '" + key + "'");
    });
    v.set(path, Array(a.dtype, a.shape, std::move(bytes)));
  }
  v.metadata = detail::orbax_custom_metadata(o.item);
  return v;
}

// Writes `v` at `dir` as ocp.StandardCheckpointer().save(dir, tree) would: the
// PyTree {'params': {'query': {'kernel': array}}} for path "params/query/kernel",
// OCDBT + zarr v2 + zstd, with _METADATA, _CHECKPOINT_METADATA (custom_metadata =
// v.metadata), _sharding (every array on "cpu:0") and array_metadatas/.
// `dir` must not exist or be an empty directory (io_error otherwise); the
// checkpoint is built beside it and renamed into place, so a failed call leaves
// nothing behind. Throws invalid_argument for an empty `v` or for two paths that
// Orbax would store under the same name ("a.b/c" and "a/b.c").
inline void save_orbax(const std::string& dir, const Variables& v, const OrbaxSaveOptions& opts = {}) {
  namespace fs = std::filesystem;
  detail::require_zstd("linen::io: save_orbax " + dir);
  if (v.empty()) throw linen::invalid_argument("linen::io: save_orbax(" + dir + "): no variables to save");
  const fs::path target(dir);
  std::error_code ec;
  if (fs::exists(target, ec)) {
    if (!fs::is_directory(target, ec)) throw io_error(dir + ": exists and is not a directory; save_orbax will not overwrite it");
    if (!fs::is_empty(target, ec)) throw io_error(dir + ": directory exists and is not empty; save_orbax will not overwrite it");
  }
  std::map<std::string, std::string> names;  // param name -> Flax path
  for (const auto& [path, a] : v) {
    const std::vector<std::string> keys = detail::flax_path_keys(path);
    const std::string param = detail::orbax_param_name(keys);
    auto [it, fresh] = names.emplace(param, path);
    if (!fresh)
      throw linen::invalid_argument("linen::io: save_orbax: '" + it->second + "' and '" + path +
                                    "' would both be stored as Orbax array '" + param + "'");
  }

  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const fs::path tmp = parent / ("." + target.filename().string() + ".linen-tmp-" + detail::random_hex_name().substr(0, 12));
  try {
    fs::create_directories(tmp);
    std::map<std::string, std::vector<std::uint8_t>> kv;
    nlohmann::json tree = nlohmann::json::object(), sharding = nlohmann::json::object();
    nlohmann::json array_metas = nlohmann::json::array();
    for (const auto& [param, path] : names) {
      const Array& a = v.at(path);
      const std::vector<std::string> keys = detail::flax_path_keys(path);
      detail::ZarrArray z;
      z.dtype = a.dtype();
      z.shape = a.shape();
      z.chunks = detail::orbax_chunk_shape(a.shape(), itemsize(a.dtype()), opts.max_chunk_bytes);
      z.v2_zstd = true;
      z.v2_level = opts.zstd_level;
      const std::string meta = detail::zarr_v2_metadata_json(z.dtype, z.shape, z.chunks, opts.zstd_level);
      kv[param + "/.zarray"] = std::vector<std::uint8_t>(meta.begin(), meta.end());
      if (a.size() > 0) {
        std::vector<Index> grid, cell(z.shape.size(), 0);
        for (std::size_t d = 0; d < z.shape.size(); ++d) grid.push_back((z.shape[d] + z.chunks[d] - 1) / z.chunks[d]);
        while (true) {
          kv[param + "/" + detail::zarr_chunk_key(z, cell)] =
              detail::zarr_v2_encode_chunk(z, a.bytes().data(), cell, dir + ": array '" + param + "'");
          std::size_t d = cell.size();
          while (d > 0) {
            if (++cell[d - 1] < grid[d - 1]) break;
            cell[d - 1] = 0;
            --d;
          }
          if (d == 0) break;
        }
      }
      nlohmann::json km = nlohmann::json::array();
      for (const auto& k : keys) km.push_back({{"key", k}, {"key_type", 2}});
      tree[detail::python_tuple_repr(keys)] = {
          {"key_metadata", km},
          {"value_metadata", {{"value_type", "jax.Array"}, {"skip_deserialize", false}, {"write_shape", a.shape()}}}};
      sharding[detail::base64(param)] = "{\"sharding_type\": \"SingleDeviceSharding\", \"device_str\": \"cpu:0\"}";
      array_metas.push_back({{"array_metadata",
                              {{"param_name", param},
                               {"write_shape", a.shape()},
                               {"chunk_shape", z.chunks},
                               {"ext_metadata", nullptr}}}});
    }
    detail::write_ocdbt_database(tmp, kv);
    const nlohmann::json metadata = {{"tree_metadata", tree},
                                     {"use_ocdbt", true},
                                     {"use_zarr3", false},
                                     {"store_array_data_equal_to_fill_value", true},
                                     {"custom_metadata", nullptr}};
    detail::write_text_file(tmp / "_METADATA", metadata.dump());
    detail::write_text_file(tmp / "_sharding", sharding.dump());
    fs::create_directories(tmp / "array_metadatas");
    detail::write_text_file(tmp / "array_metadatas" / "process_0", nlohmann::json{{"array_metadatas", array_metas}}.dump());
    const auto now = static_cast<std::int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
    nlohmann::json custom = nlohmann::json::object();
    for (const auto& [k, s] : v.metadata) custom[k] = s;
    const nlohmann::json ckpt = {
        {"item_handlers", "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"},
        {"metrics", nlohmann::json::object()},
        {"performance_metrics", nlohmann::json::object()},
        {"init_timestamp_nsecs", now},
        {"commit_timestamp_nsecs", now},
        {"custom_metadata", custom}};
    detail::write_text_file(tmp / "_CHECKPOINT_METADATA", ckpt.dump());
    if (fs::exists(target, ec)) fs::remove(target);  // empty, checked above
    fs::rename(tmp, target);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw io_error(dir + ": save_orbax failed: " + e.what());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace linen::io

#endif  // LINEN_IO_ORBAX_HPP

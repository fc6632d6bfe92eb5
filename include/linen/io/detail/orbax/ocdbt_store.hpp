// SPDX-License-Identifier: Apache-2.0
//
// An OCDBT database in a directory, read: the manifest (`manifest.ocdbt`, or, when
// a checkpoint was never merged, each `ocdbt.process_N/manifest.ocdbt`), the
// latest generation's B+tree walked to its leaves, every key with its value
// reference (inline bytes, or a byte range of a data file), and values read on
// demand. Encodings are ocdbt.hpp.
//
// The directory is a boundary: a data-file path is refused if it is empty,
// absolute, or has an empty, "." or ".." component, and the file it names (after
// symlinks are resolved) must be a regular file inside the directory; a range must
// lie inside the file. The walk checks each node's height against its parent's
// (root height from the manifest, then one less per level: this also rules out
// cycles, which are reported as such), caps the node count, and requires keys in
// strictly increasing order. Every fault is an io_error naming the file and the
// key (or the node) at fault.
#ifndef LINEN_IO_DETAIL_ORBAX_OCDBT_STORE_HPP
#define LINEN_IO_DETAIL_ORBAX_OCDBT_STORE_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "../../../errors.hpp"
#include "ocdbt.hpp"

namespace linen::io::detail {

namespace fs = std::filesystem;

inline constexpr std::size_t kOcdbtMaxNodes = std::size_t{1} << 20;

// `p`, made absolute and with symlinks resolved; io_error if it does not exist.
inline fs::path resolved_path(const fs::path& p, const std::string& what) {
  std::error_code ec;
  fs::path c = fs::canonical(p, ec);
  if (ec) throw io_error(what + ": " + p.string() + " does not exist or cannot be resolved (" + ec.message() + ")");
  return c;
}

inline bool path_within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

// The regular file `p` (which must resolve to a place inside `boundary`) as bytes
// [offset, offset + length); io_error naming `what` otherwise.
inline std::vector<std::uint8_t> read_file_range(const fs::path& p, const fs::path& boundary, std::uint64_t offset,
                                                 std::uint64_t length, const std::string& what) {
  const fs::path c = resolved_path(p, what);
  if (!path_within(c, boundary))
    throw io_error(what + ": " + p.string() + " resolves to " + c.string() + ", outside the checkpoint directory " +
                   boundary.string() + " (symlinks leaving the checkpoint are not followed)");
  std::error_code ec;
  if (!fs::is_regular_file(c, ec)) throw io_error(what + ": " + p.string() + " is not a regular file");
  const std::uint64_t size = fs::file_size(c, ec);
  if (ec) throw io_error(what + ": cannot stat " + p.string() + " (" + ec.message() + ")");
  if (offset > size || length > size - offset)
    throw io_error(what + ": byte range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                   ") lies outside " + p.string() + " (" + std::to_string(size) + " bytes)");
  std::vector<std::uint8_t> out(static_cast<std::size_t>(length));
  std::ifstream in(c, std::ios::binary);
  if (!in) throw io_error(what + ": cannot open " + p.string());
  in.seekg(static_cast<std::streamoff>(offset));
  if (length) in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(length));
  if (!in) throw io_error(what + ": cannot read " + std::to_string(length) + " bytes of " + p.string());
  return out;
}

// A whole small file (at most max_bytes), under the same rules.
inline std::vector<std::uint8_t> read_small_file(const fs::path& p, const fs::path& boundary, std::uint64_t max_bytes,
                                                 const std::string& what) {
  const fs::path c = resolved_path(p, what);
  std::error_code ec;
  if (!path_within(c, boundary))
    throw io_error(what + ": " + p.string() + " resolves outside the checkpoint directory " + boundary.string());
  if (!fs::is_regular_file(c, ec)) throw io_error(what + ": " + p.string() + " is not a regular file");
  const std::uint64_t size = fs::file_size(c, ec);
  if (ec) throw io_error(what + ": cannot stat " + p.string());
  if (size > max_bytes)
    throw io_error(what + ": " + p.string() + " has " + std::to_string(size) + " bytes, more than the " +
                   std::to_string(max_bytes) + " allowed");
  return read_file_range(c, boundary, 0, size, what);
}

// Why data-file path `rel` may not be followed, or "" if it may.
inline std::string data_path_error(const std::string& rel) {
  if (rel.empty()) return "empty path";
  if (rel.front() == '/') return "absolute path";
  if (rel.find('\0') != std::string::npos) return "NUL byte in path";
  std::size_t i = 0;
  while (i <= rel.size()) {
    std::size_t j = rel.find('/', i);
    if (j == std::string::npos) j = rel.size();
    const std::string c = rel.substr(i, j - i);
    if (c.empty()) return "empty path component";
    if (c == "." || c == "..") return "'" + c + "' path component";
    i = j + 1;
  }
  return "";
}

class OcdbtStore {
 public:
  struct Value {
    bool indirect = false;
    std::vector<std::uint8_t> bytes;  // inline value
    fs::path db;                      // database directory the reference is relative to
    OcdbtDataRef ref;
  };

  // The database of checkpoint item directory `dir`.
  static OcdbtStore open(const fs::path& dir) {
    OcdbtStore s;
    s.name_ = dir.string();
    s.boundary_ = resolved_path(dir, "linen::io: Orbax checkpoint");
    std::error_code ec;
    if (fs::exists(dir / "manifest.ocdbt", ec)) {
      s.load_database(dir);
      return s;
    }
    std::vector<fs::path> procs;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().filename().string().rfind("ocdbt.process_", 0) == 0 && fs::exists(e.path() / "manifest.ocdbt"))
        procs.push_back(e.path());
    if (procs.empty())
      throw io_error(dir.string() + ": no OCDBT database (neither manifest.ocdbt nor ocdbt.process_*/manifest.ocdbt)");
    std::sort(procs.begin(), procs.end());
    for (const auto& p : procs) s.load_database(p);
    return s;
  }

  const std::map<std::string, Value>& entries() const { return entries_; }
  const std::string& name() const { return name_; }
  const OcdbtConfig& config() const { return config_; }

  bool contains(const std::string& key) const { return entries_.count(key) != 0; }

  // The value of `key`; io_error if absent or (for an out-of-line value) unreadable.
  std::vector<std::uint8_t> read(const std::string& key) const {
    auto it = entries_.find(key);
    if (it == entries_.end()) throw io_error(name_ + ": key '" + key + "' is not in the OCDBT store");
    return read(key, it->second);
  }
  std::vector<std::uint8_t> read(const std::string& key, const Value& v) const {
    if (!v.indirect) return v.bytes;
    const std::string what = name_ + ": key '" + key + "'";
    return read_data_file(v.db, v.ref, what);
  }

 private:
  std::vector<std::uint8_t> read_data_file(const fs::path& db, const OcdbtDataRef& ref, const std::string& what) const {
    const std::string why = data_path_error(ref.file.path);
    if (!why.empty())
      throw io_error(what + ": data file path '" + ref.file.path + "' is refused (" + why +
                     "): it would leave the checkpoint directory");
    const fs::path p = db / ref.file.path;
    std::error_code ec;
    if (!fs::exists(p, ec))
      throw io_error(what + ": data file '" + ref.file.path + "' is missing (" + p.string() + " does not exist)");
    return read_file_range(p, boundary_, ref.offset, ref.length, what + ", data file '" + ref.file.path + "'");
  }

  void load_database(const fs::path& db) {
    const fs::path mpath = db / "manifest.ocdbt";
    const std::string mwhat = mpath.string();
    const std::vector<std::uint8_t> mbytes = read_small_file(mpath, boundary_, kOcdbtMaxManifestBytes, mwhat);
    const OcdbtManifest m = parse_ocdbt_manifest(mbytes.data(), mbytes.size(), mwhat);
    config_ = m.config;
    const OcdbtVersion& v = m.versions.back();
    if (v.empty) return;
    std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>> stack;
    std::string last;
    bool have_last = false;
    std::size_t nodes = 0;
    walk(db, v.root, v.root_height, "", m.config.max_decoded_node_bytes,
         mwhat + ": generation " + std::to_string(v.generation) + " root node", stack, last, have_last, nodes);
  }

  void walk(const fs::path& db, const OcdbtDataRef& ref, int height, const std::string& prefix,
            std::uint64_t max_node_bytes, const std::string& via,
            std::vector<std::tuple<std::string, std::uint64_t, std::uint64_t>>& stack, std::string& last,
            bool& have_last, std::size_t& nodes) {
    const auto id = std::make_tuple(ref.file.path, ref.offset, ref.length);
    for (const auto& a : stack)
      if (a == id)
        throw io_error(via + ": B+tree cycle: the node at data file '" + ref.file.path + "' offset " +
                       std::to_string(ref.offset) + " is its own ancestor");
    if (++nodes > kOcdbtMaxNodes) throw io_error(name_ + ": B+tree has more than " + std::to_string(kOcdbtMaxNodes) + " nodes");
    const std::vector<std::uint8_t> bytes = read_data_file(db, ref, via);
    const std::string what = via + " (data file '" + ref.file.path + "' offset " + std::to_string(ref.offset) + ")";
    const OcdbtNode node = parse_ocdbt_btree_node(bytes.data(), bytes.size(), what, ref.file.base_path, max_node_bytes);
    if (node.height != height)
      throw io_error(what + ": B+tree node has height " + std::to_string(node.height) + ", its parent expects " +
                     std::to_string(height));
    stack.push_back(id);
    if (node.height == 0) {
      for (const auto& e : node.leaves) {
        std::string key = prefix + e.key;
        if (have_last && !(last < key))
          throw io_error(what + ": key '" + key + "' is out of order or repeated (after '" + last + "')");
        Value val;
        val.indirect = e.indirect;
        val.bytes = e.value;
        val.db = db;
        val.ref = e.ref;
        if (entries_.count(key)) throw io_error(what + ": key '" + key + "' appears in two databases");
        entries_.emplace(key, std::move(val));
        last = std::move(key);
        have_last = true;
      }
    } else {
      for (const auto& c : node.children) {
        const std::string child_prefix = prefix + c.key.substr(0, static_cast<std::size_t>(c.subtree_common_prefix_length));
        walk(db, c.ref, node.height - 1, child_prefix, max_node_bytes, name_ + ": B+tree child '" + prefix + c.key + "'",
             stack, last, have_last, nodes);
      }
    }
    stack.pop_back();
  }

  std::string name_;
  fs::path boundary_;
  OcdbtConfig config_;
  std::map<std::string, Value> entries_;
};

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_OCDBT_STORE_HPP

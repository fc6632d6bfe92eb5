// SPDX-License-Identifier: Apache-2.0
//
// Writes an OCDBT database the way Orbax leaves one after a single-process save:
//
//   <dir>/ocdbt.process_0/manifest.ocdbt     the process database: one generation
//   <dir>/ocdbt.process_0/d/<32 hex>         its B+tree nodes, then its out-of-line values
//   <dir>/manifest.ocdbt                     the merged root database
//   <dir>/d/<32 hex>                         the merged root's own copy of the root node
//
// Values up to max_inline_value_bytes (1024, Orbax's setting) are stored inline in
// the leaves, longer ones out of line in a data file. Leaves hold at most
// `max_leaf_entries` keys; interior levels are added as needed. The merged root's
// node is the process root re-encoded with its data-file table's base paths
// prefixed by `ocdbt.process_0/` (so its children, and their tables, resolve inside
// the process database); when every value is inline that copy is byte-identical,
// as in Orbax's own checkpoints. Manifests and nodes are zstd-compressed (level 0,
// as Orbax's config says).
#ifndef LINEN_IO_DETAIL_ORBAX_OCDBT_WRITER_HPP
#define LINEN_IO_DETAIL_ORBAX_OCDBT_WRITER_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../../../errors.hpp"
#include "ocdbt.hpp"

namespace linen::io::detail {

struct OcdbtWriteOptions {
  std::size_t max_leaf_entries = 4096;
  std::size_t max_interior_entries = 4096;
  std::uint64_t max_inline_value_bytes = 1024;
  std::string process_dir = "ocdbt.process_0";
};

// 32 lowercase hex digits of 128 random bits (tensorstore's data file names).
inline std::string random_hex_name() {
  static thread_local std::mt19937_64 gen{std::random_device{}() ^
                                          static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())};
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int k = 0; k < 2; ++k) {
    const std::uint64_t v = gen();
    for (int i = 0; i < 16; ++i) s += hex[(v >> (4 * i)) & 0xF];
  }
  return s;
}

inline void write_bytes_file(const std::filesystem::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  if (!out) throw io_error("cannot create " + p.string());
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  out.close();
  if (!out) throw io_error("cannot write " + p.string());
}

// Writes the key/value pairs `kv` as the database layout above under `dir`.
inline void write_ocdbt_database(const std::filesystem::path& dir,
                                 const std::map<std::string, std::vector<std::uint8_t>>& kv,
                                 const OcdbtWriteOptions& opt = {}) {
  namespace fs = std::filesystem;
  if (kv.empty()) throw io_error(dir.string() + ": an OCDBT database needs at least one key");
  const fs::path proc = dir / opt.process_dir;
  fs::create_directories(proc / "d");
  fs::create_directories(dir / "d");

  OcdbtConfig config;
  std::random_device rd;
  for (auto& b : config.uuid) b = static_cast<std::uint8_t>(rd());
  config.max_inline_value_bytes = opt.max_inline_value_bytes;
  const std::string what = dir.string() + ": writing OCDBT";

  // Out-of-line values, concatenated in one data file.
  const std::string value_file = "d/" + random_hex_name();
  std::vector<std::uint8_t> values;
  std::vector<OcdbtLeafValue> leaves_all;
  for (const auto& [k, v] : kv) {
    OcdbtLeafValue e;
    e.key = k;
    if (v.size() > opt.max_inline_value_bytes) {
      e.indirect = true;
      e.offset = values.size();
      e.length = v.size();
      values.insert(values.end(), v.begin(), v.end());
    } else {
      e.value = v;
    }
    leaves_all.push_back(std::move(e));
  }

  // Nodes, bottom-up, in one data file of the process database.
  const std::string node_file = "d/" + random_hex_name();
  std::vector<std::uint8_t> nodes;
  struct Built {
    std::string first_key;
    std::uint64_t offset, length;
    OcdbtStatistics stats;
    std::vector<std::uint8_t> body;  // decoded body (for the merged root's copy)
  };
  std::vector<Built> level;
  for (std::size_t i = 0; i < leaves_all.size(); i += opt.max_leaf_entries) {
    std::vector<OcdbtLeafValue> part(leaves_all.begin() + static_cast<std::ptrdiff_t>(i),
                                     leaves_all.begin() + static_cast<std::ptrdiff_t>(std::min(leaves_all.size(), i + opt.max_leaf_entries)));
    bool any_indirect = false;
    OcdbtStatistics st;
    for (auto& e : part) {
      any_indirect |= e.indirect;
      e.file = 0;
      if (e.indirect) st.num_indirect_value_bytes += e.length;
    }
    st.num_keys = part.size();
    std::vector<OcdbtPathPair> table;
    if (any_indirect) table.push_back({"", value_file});
    Built b{part.front().key, nodes.size(), 0, st, ocdbt_encode_leaf_body(table, part)};
    const auto enc = ocdbt_seal_envelope(kOcdbtBtreeNodeMagic, b.body, true, config.zstd_level, what);
    b.length = enc.size();
    b.stats.num_tree_bytes = enc.size();
    nodes.insert(nodes.end(), enc.begin(), enc.end());
    level.push_back(std::move(b));
  }
  std::uint8_t height = 0;
  while (level.size() > 1) {
    ++height;
    std::vector<Built> up;
    for (std::size_t i = 0; i < level.size(); i += opt.max_interior_entries) {
      std::vector<OcdbtChildRef> refs;
      OcdbtStatistics st;
      for (std::size_t j = i; j < std::min(level.size(), i + opt.max_interior_entries); ++j) {
        OcdbtChildRef c;
        c.key = level[j].first_key;
        c.subtree_common_prefix_length = 0;
        c.file = 0;
        c.offset = level[j].offset;
        c.length = level[j].length;
        c.stats = level[j].stats;
        st.num_keys += c.stats.num_keys;
        st.num_tree_bytes += c.stats.num_tree_bytes;
        st.num_indirect_value_bytes += c.stats.num_indirect_value_bytes;
        refs.push_back(std::move(c));
      }
      Built b{refs.front().key, nodes.size(), 0, st, ocdbt_encode_interior_body(height, {{"", node_file}}, refs)};
      const auto enc = ocdbt_seal_envelope(kOcdbtBtreeNodeMagic, b.body, true, config.zstd_level, what);
      b.length = enc.size();
      b.stats.num_tree_bytes += enc.size();
      nodes.insert(nodes.end(), enc.begin(), enc.end());
      up.push_back(std::move(b));
    }
    level = std::move(up);
  }
  const Built& root = level.front();
  if (!values.empty()) write_bytes_file(proc / value_file, values);
  write_bytes_file(proc / node_file, nodes);

  const std::uint64_t now = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  OcdbtVersion v;
  v.generation = 1;
  v.root_height = height;
  v.root.offset = root.offset;
  v.root.length = root.length;
  v.stats = root.stats;
  v.commit_time = now;
  write_bytes_file(proc / "manifest.ocdbt",
                   ocdbt_seal_envelope(kOcdbtManifestMagic, ocdbt_encode_manifest_body(config, {"", node_file}, v), true,
                                       config.zstd_level, what));

  // The merged root: the root node again, its table re-based into the process database.
  std::vector<std::uint8_t> body = root.body;
  {
    ByteReader r(body.data(), body.size(), what);
    (void)r.u8("height");
    const std::size_t table_at = r.pos();
    const auto files = ocdbt_read_data_file_table(r, "");
    std::vector<OcdbtPathPair> rebased;
    for (const auto& f : files)
      rebased.push_back({opt.process_dir + "/" + f.base_path, f.path.substr(f.base_path.size())});
    std::vector<std::uint8_t> re(body.begin(), body.begin() + static_cast<std::ptrdiff_t>(table_at));
    ocdbt_write_data_file_table(re, rebased);
    re.insert(re.end(), body.begin() + static_cast<std::ptrdiff_t>(r.pos()), body.end());
    body = std::move(re);
  }
  const auto root_enc = ocdbt_seal_envelope(kOcdbtBtreeNodeMagic, body, true, config.zstd_level, what);
  const std::string root_file = "d/" + random_hex_name();
  write_bytes_file(dir / root_file, root_enc);
  OcdbtConfig root_config = config;
  for (auto& b : root_config.uuid) b = static_cast<std::uint8_t>(rd());
  OcdbtVersion rv = v;
  rv.root.offset = 0;
  rv.root.length = root_enc.size();
  rv.stats.num_tree_bytes = root.stats.num_tree_bytes - root.length + root_enc.size();
  write_bytes_file(dir / "manifest.ocdbt",
                   ocdbt_seal_envelope(kOcdbtManifestMagic, ocdbt_encode_manifest_body(root_config, {"", root_file}, rv),
                                       true, config.zstd_level, what));
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_OCDBT_WRITER_HPP

// SPDX-License-Identifier: Apache-2.0
//
// OCDBT's on-disk encodings (tensorstore's "Optionally-Cooperative Distributed
// B+Tree", kvstore/ocdbt/index.rst and kvstore/ocdbt/format/*.cc): the manifest,
// B+tree nodes and the data-file tables inside both, decoded from and encoded to
// memory buffers. Reading a database from a directory is ocdbt_store.hpp.
//
// Every encoded object is an envelope:
//   magic uint32be | length uint64le (of the whole object) | version varint (0) |
//   compression varint (0 raw, 1 zstd) | body | crc32c uint32le
// where the crc32c covers everything before it, header included. The crc32c is
// checked before anything else is decoded.
//
// Surprises, written down for whoever reads the format next:
//   - The manifest config has a `manifest_kind` byte between the uuid and
//     max_inline_value_bytes that index.rst does not list (0 = single manifest
//     holding the version tree, 1 = numbered manifests `manifest.%016x`, which
//     this reader refuses with a clear error: Orbax never writes them).
//   - `value_kind` of a leaf entry is one byte, not a varint (same bytes for 0/1).
//   - `commit_time` is nanoseconds since the epoch (the fixtures hold
//     1778718340783462382), not milliseconds as index.rst says.
//   - index.rst's leaf table lists data_file_id and data_file_offset for
//     out-of-line values but no length: it is value_length.
//   - Keys in a node are relative: a child's keys are prefixed with the first
//     subtree_common_prefix_length bytes of its parent entry's key (recursively).
//   - Orbax writes zstd level 0 (libzstd's default, 3) for nodes and manifests, as
//     streamed frames without a content size.
//   - The merged root that Orbax writes (`manifest.ocdbt` + `d/` beside the
//     per-process databases `ocdbt.process_N/`) has its own copy of the root
//     B+tree node; its data-file table reaches the process databases' files with
//     paths relative to the root, e.g. base path `ocdbt.process_0/`.
//   - The latest generation is always the last of the manifest's inline versions
//     (older ones go to version tree nodes), so reading the newest state never
//     needs the version tree nodes; they are parsed and bounded, not followed.
#ifndef LINEN_IO_DETAIL_ORBAX_OCDBT_HPP
#define LINEN_IO_DETAIL_ORBAX_OCDBT_HPP

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "../../../errors.hpp"
#include "byte_reader.hpp"
#include "crc32c.hpp"
#include "zstd.hpp"

namespace linen::io::detail {

inline constexpr std::uint32_t kOcdbtManifestMagic = 0x0cdb3a2a;
inline constexpr std::uint32_t kOcdbtVersionNodeMagic = 0x0cdb1234;
inline constexpr std::uint32_t kOcdbtBtreeNodeMagic = 0x0cdb20de;
inline constexpr std::uint64_t kOcdbtMaxKeyLength = 65535;   // tensorstore's kMaxKeyLength
inline constexpr std::uint64_t kOcdbtMaxPathLength = 65535;  // tensorstore's kMaxPathLength
inline constexpr std::uint64_t kOcdbtMaxNodeArity = 1024 * 1024;
// Decoded bodies are refused past these, whatever a config claims.
inline constexpr std::size_t kOcdbtMaxManifestBytes = std::size_t{64} << 20;
inline constexpr std::size_t kOcdbtMaxNodeBytes = std::size_t{256} << 20;
inline constexpr int kOcdbtMaxHeight = 32;  // B+tree heights accepted (tensorstore never nears this)

// One entry of a data-file table: the full path (transitive + base + relative),
// relative to the database root, and the transitive path its children inherit.
struct OcdbtDataFile {
  std::string path;       // transitive + base_path + relative_path
  std::string base_path;  // transitive + base_path: the children's transitive path
};

// A byte range of a data file.
struct OcdbtDataRef {
  OcdbtDataFile file;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};

struct OcdbtConfig {
  std::array<std::uint8_t, 16> uuid{};
  std::uint8_t manifest_kind = 0;
  std::uint64_t max_inline_value_bytes = 1024;
  std::uint64_t max_decoded_node_bytes = 100000000;
  std::uint8_t version_tree_arity_log2 = 4;
  std::uint64_t compression = 1;  // 0 none, 1 zstd
  std::int32_t zstd_level = 0;
};

struct OcdbtStatistics {
  std::uint64_t num_keys = 0, num_tree_bytes = 0, num_indirect_value_bytes = 0;
};

struct OcdbtVersion {
  std::uint64_t generation = 0;
  std::uint8_t root_height = 0;
  bool empty = false;  // no root node: an empty database
  OcdbtDataRef root;
  OcdbtStatistics stats;
  std::uint64_t commit_time = 0;
};

struct OcdbtManifest {
  OcdbtConfig config;
  std::vector<OcdbtVersion> versions;  // the inline versions, oldest first
  std::size_t num_version_nodes = 0;   // references to older version tree nodes
};

struct OcdbtLeafEntry {
  std::string key;  // relative to the node's inherited prefix
  bool indirect = false;
  std::vector<std::uint8_t> value;  // inline value
  OcdbtDataRef ref;                 // out-of-line value
};

struct OcdbtInteriorEntry {
  std::string key;  // relative to the node's inherited prefix
  std::uint64_t subtree_common_prefix_length = 0;
  OcdbtDataRef ref;
  OcdbtStatistics stats;
};

struct OcdbtNode {
  std::uint8_t height = 0;
  std::vector<OcdbtLeafEntry> leaves;         // height 0
  std::vector<OcdbtInteriorEntry> children;   // height > 0
};

// ---- decoding ---------------------------------------------------------------

// The body of the envelope at data (checked: size, magic, length, crc32c, version,
// compression), decompressed to at most max_body bytes.
inline std::vector<std::uint8_t> ocdbt_open_envelope(const std::uint8_t* data, std::size_t size,
                                                     std::uint32_t magic, const char* kind, std::size_t max_body,
                                                     const std::string& what) {
  ByteReader r(data, size, what);
  if (size < 4 + 8 + 1 + 1 + 4)
    r.fail(std::string(kind) + " of " + std::to_string(size) + " bytes is shorter than its header and checksum");
  const std::uint32_t m = r.u32be("magic");
  if (m != magic) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "magic 0x%08x, expected 0x%08x for an OCDBT ", m, magic);
    throw io_error(what + ": " + buf + kind);
  }
  const std::uint64_t length = r.u64le("length");
  if (length != size)
    throw io_error(what + ": " + kind + " header gives length " + std::to_string(length) + ", but it has " +
                   std::to_string(size) + " bytes (truncated or padded)");
  const std::uint32_t stored = static_cast<std::uint32_t>(data[size - 4]) |
                               (static_cast<std::uint32_t>(data[size - 3]) << 8) |
                               (static_cast<std::uint32_t>(data[size - 2]) << 16) |
                               (static_cast<std::uint32_t>(data[size - 1]) << 24);
  const std::uint32_t actual = crc32c(data, size - 4);
  if (stored != actual) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " crc32c mismatch (stored 0x%08x, computed 0x%08x)", stored, actual);
    throw io_error(what + ": " + kind + buf);
  }
  ByteReader body(data, size - 4, what);
  (void)body.bytes(12, "header");
  const std::uint64_t version = body.varint("version");
  if (version != 0) body.fail(std::string(kind) + " format version " + std::to_string(version) + ", only 0 is known");
  const std::uint64_t compression = body.varint("compression_format");
  const std::size_t n = body.remaining();
  const std::uint8_t* p = body.bytes(n, "body");
  if (compression == 0) {
    if (n > max_body)
      body.fail(std::string(kind) + " body of " + std::to_string(n) + " bytes exceeds the limit " +
                std::to_string(max_body));
    return std::vector<std::uint8_t>(p, p + n);
  }
  if (compression == 1) return zstd_decompress(p, n, max_body, what + " (" + kind + " body)");
  body.fail(std::string(kind) + " compression format " + std::to_string(compression) + " is unknown (0 raw, 1 zstd)");
}

// The data-file table at r (index.rst "Data file table format"); paths are
// prefixed with `transitive`.
inline std::vector<OcdbtDataFile> ocdbt_read_data_file_table(ByteReader& r, const std::string& transitive) {
  if (transitive.size() > kOcdbtMaxPathLength) r.fail("transitive data file path longer than 65535 bytes");
  const std::uint64_t max_path = kOcdbtMaxPathLength - transitive.size();
  // Each file needs at least its suffix and base path lengths (2 bytes).
  const std::uint64_t num_files = r.varint("data file table num_files", r.remaining() / 2);
  std::vector<std::uint64_t> prefix(num_files, 0), suffix(num_files), base(num_files);
  for (std::uint64_t i = 1; i < num_files; ++i) prefix[i] = r.varint("data file path_prefix_length", max_path);
  for (std::uint64_t i = 0; i < num_files; ++i) suffix[i] = r.varint("data file path_suffix_length", max_path);
  for (std::uint64_t i = 0; i < num_files; ++i) base[i] = r.varint("data file base_path_length", max_path);
  std::vector<OcdbtDataFile> files(num_files);
  std::string prev;  // previous base_path + relative_path (without transitive)
  std::uint64_t prev_base = 0;
  for (std::uint64_t i = 0; i < num_files; ++i) {
    const std::string ctx = "data file " + std::to_string(i);
    if (prefix[i] > prev.size())
      r.fail(ctx + ": path_prefix_length " + std::to_string(prefix[i]) + " exceeds the previous path's length " +
             std::to_string(prev.size()));
    const std::uint64_t len = prefix[i] + suffix[i];
    if (len > max_path) r.fail(ctx + ": path longer than 65535 bytes");
    if (base[i] > len) r.fail(ctx + ": base_path_length exceeds the path length");
    if (prefix[i] > std::min(prev_base, base[i]) && base[i] != prev_base)
      r.fail(ctx + ": common prefix extends past a base path that differs from the previous one");
    const std::uint8_t* s = r.bytes(suffix[i], "data file path_suffix");
    std::string path = prev.substr(0, static_cast<std::size_t>(prefix[i]));
    path.append(reinterpret_cast<const char*>(s), static_cast<std::size_t>(suffix[i]));
    files[i].path = transitive + path;
    files[i].base_path = transitive + path.substr(0, static_cast<std::size_t>(base[i]));
    prev = std::move(path);
    prev_base = base[i];
  }
  return files;
}

inline const OcdbtDataFile& ocdbt_file_at(ByteReader& r, const std::vector<OcdbtDataFile>& table) {
  if (table.empty()) r.fail("data_file_id given but the data file table is empty");
  const std::uint64_t id = r.varint("data_file_id", table.size() - 1);
  return table[static_cast<std::size_t>(id)];
}

// The manifest at data (manifest.ocdbt).
inline OcdbtManifest parse_ocdbt_manifest(const std::uint8_t* data, std::size_t size, const std::string& what) {
  const std::vector<std::uint8_t> body =
      ocdbt_open_envelope(data, size, kOcdbtManifestMagic, "manifest", kOcdbtMaxManifestBytes, what);
  ByteReader r(body.data(), body.size(), what + " (manifest body)");
  OcdbtManifest m;
  OcdbtConfig& c = m.config;
  const std::uint8_t* uuid = r.bytes(16, "uuid");
  std::copy(uuid, uuid + 16, c.uuid.begin());
  c.manifest_kind = r.u8("manifest_kind");
  if (c.manifest_kind == 1)
    r.fail("numbered manifests (manifest_kind 1, manifest.<generation> files) are not supported: Orbax writes a "
           "single manifest.ocdbt");
  if (c.manifest_kind != 0) r.fail("manifest_kind " + std::to_string(c.manifest_kind) + " is unknown");
  c.max_inline_value_bytes = r.varint("max_inline_value_bytes", 0xFFFFFFFFu);
  c.max_decoded_node_bytes = r.varint("max_decoded_node_bytes", 0xFFFFFFFFu);
  c.version_tree_arity_log2 = r.u8("version_tree_arity_log2");
  if (c.version_tree_arity_log2 < 1 || c.version_tree_arity_log2 > 16)
    r.fail("version_tree_arity_log2 " + std::to_string(c.version_tree_arity_log2) + " outside [1, 16]");
  c.compression = r.varint("compression_method", 0xFFFFFFFFu);
  if (c.compression == 1) {
    c.zstd_level = r.i32le("zstd level");
  } else if (c.compression != 0) {
    r.fail("compression_method " + std::to_string(c.compression) + " is unknown (0 none, 1 zstd)");
  }
  const std::vector<OcdbtDataFile> table = ocdbt_read_data_file_table(r, "");
  // Inline versions: at most 2^arity_log2 of them.
  const std::uint64_t n = r.varint("num_versions", std::uint64_t{1} << c.version_tree_arity_log2);
  if (n == 0) r.fail("manifest references no version");
  m.versions.resize(static_cast<std::size_t>(n));
  for (auto& v : m.versions) v.generation = r.varint("generation_number");
  for (std::size_t i = 0; i < m.versions.size(); ++i) {
    if (m.versions[i].generation == 0) r.fail("generation_number 0");
    if (i > 0 && m.versions[i].generation <= m.versions[i - 1].generation)
      r.fail("generation numbers not strictly increasing");
  }
  for (auto& v : m.versions) {
    v.root_height = r.u8("root_height");
    if (v.root_height > kOcdbtMaxHeight) r.fail("root_height " + std::to_string(v.root_height) + " too large");
  }
  // An empty tree has no root: tensorstore writes offset and length 2^64-1 and
  // no data file (allow_missing); the file id is then absent from an empty table.
  std::vector<bool> has_file(m.versions.size(), false);
  for (std::size_t i = 0; i < m.versions.size(); ++i) {
    if (table.empty()) continue;
    m.versions[i].root.file = ocdbt_file_at(r, table);
    has_file[i] = true;
  }
  for (auto& v : m.versions) v.root.offset = r.varint("root data_file_offset");
  for (auto& v : m.versions) v.root.length = r.varint("root data_file_length");
  for (std::size_t i = 0; i < m.versions.size(); ++i) {
    auto& v = m.versions[i];
    const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    if (v.root.offset == max && v.root.length == max) {
      v.empty = true;
    } else {
      if (!has_file[i]) r.fail("version root references a data file, but the data file table is empty");
      if (v.root.offset > max - v.root.length) r.fail("root offset + length overflows");
    }
  }
  for (auto& v : m.versions) v.stats.num_keys = r.varint("num_keys");
  for (auto& v : m.versions) v.stats.num_tree_bytes = r.varint("num_tree_bytes");
  for (auto& v : m.versions) v.stats.num_indirect_value_bytes = r.varint("num_indirect_value_bytes");
  for (auto& v : m.versions) v.commit_time = r.u64le("commit_time");
  // Version tree nodes (older generations): at most one per height.
  const std::uint64_t max_nodes = 63 / c.version_tree_arity_log2;
  const std::uint64_t k = r.varint("num_version_nodes", max_nodes);
  m.num_version_nodes = static_cast<std::size_t>(k);
  for (std::uint64_t i = 0; i < k; ++i) (void)r.varint("version node generation_number");
  for (std::uint64_t i = 0; i < k; ++i) (void)ocdbt_file_at(r, table);
  for (std::uint64_t i = 0; i < k; ++i) (void)r.varint("version node offset");
  for (std::uint64_t i = 0; i < k; ++i) (void)r.varint("version node length");
  for (std::uint64_t i = 0; i < k; ++i) (void)r.varint("version node num_generations");
  for (std::uint64_t i = 0; i < k; ++i) (void)r.u64le("version node commit_time");
  for (std::uint64_t i = 0; i < k; ++i) (void)r.u8("version node height");
  if (!r.at_end()) r.fail(std::to_string(r.remaining()) + " unexpected bytes after the version tree");
  return m;
}

// The B+tree node at data. Data-file paths are prefixed with `transitive` (the
// parent's base path); the decoded body may not exceed max_decoded_node_bytes.
inline OcdbtNode parse_ocdbt_btree_node(const std::uint8_t* data, std::size_t size, const std::string& what,
                                        const std::string& transitive = "",
                                        std::uint64_t max_decoded_node_bytes = kOcdbtMaxNodeBytes) {
  const std::size_t limit = static_cast<std::size_t>(std::min<std::uint64_t>(max_decoded_node_bytes, kOcdbtMaxNodeBytes));
  const std::vector<std::uint8_t> body = ocdbt_open_envelope(data, size, kOcdbtBtreeNodeMagic, "B+tree node", limit, what);
  ByteReader r(body.data(), body.size(), what + " (B+tree node body)");
  OcdbtNode node;
  node.height = r.u8("height");
  if (node.height > kOcdbtMaxHeight) r.fail("B+tree node height " + std::to_string(node.height) + " too large");
  const std::vector<OcdbtDataFile> table = ocdbt_read_data_file_table(r, transitive);
  // Every entry takes at least two bytes (suffix length, value length or file id).
  const std::uint64_t n = r.varint("num_entries", std::min<std::uint64_t>(kOcdbtMaxNodeArity, r.remaining() / 2));
  if (n == 0) r.fail("empty B+tree node");
  const bool leaf = node.height == 0;
  std::vector<std::uint64_t> prefix(n, 0), suffix(n), common(leaf ? 0 : n);
  for (std::uint64_t i = 1; i < n; ++i) prefix[i] = r.varint("key_prefix_length", kOcdbtMaxKeyLength);
  for (std::uint64_t i = 0; i < n; ++i) suffix[i] = r.varint("key_suffix_length", kOcdbtMaxKeyLength);
  if (!leaf)
    for (std::uint64_t i = 0; i < n; ++i) common[i] = r.varint("subtree_common_prefix_length", kOcdbtMaxKeyLength);
  std::vector<std::string> keys(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    const std::string prev = i ? keys[i - 1] : std::string();
    if (prefix[i] > prev.size())
      r.fail("key " + std::to_string(i) + ": prefix length " + std::to_string(prefix[i]) +
             " exceeds the previous key's length " + std::to_string(prev.size()));
    if (prefix[i] + suffix[i] > kOcdbtMaxKeyLength) r.fail("key " + std::to_string(i) + " longer than 65535 bytes");
    const std::uint8_t* s = r.bytes(suffix[i], "key_suffix");
    keys[i] = prev.substr(0, static_cast<std::size_t>(prefix[i]));
    keys[i].append(reinterpret_cast<const char*>(s), static_cast<std::size_t>(suffix[i]));
    if (i > 0 && !(keys[i - 1] < keys[i])) r.fail("keys out of order at entry " + std::to_string(i));
    if (!leaf && common[i] > keys[i].size())
      r.fail("key " + std::to_string(i) + ": subtree_common_prefix_length exceeds the key length");
  }
  if (leaf) {
    node.leaves.resize(n);
    std::vector<std::uint64_t> len(n);
    for (auto& l : len) l = r.varint("value_length");
    for (std::uint64_t i = 0; i < n; ++i) {
      const std::uint8_t kind = r.u8("value_kind");
      if (kind > 1) r.fail("value_kind " + std::to_string(kind) + " of key '" + keys[i] + "' is not 0 or 1");
      node.leaves[i].indirect = kind == 1;
      node.leaves[i].key = std::move(keys[i]);
    }
    for (auto& e : node.leaves)
      if (e.indirect) e.ref.file = ocdbt_file_at(r, table);
    for (std::uint64_t i = 0; i < n; ++i) {
      auto& e = node.leaves[i];
      if (!e.indirect) continue;
      e.ref.offset = r.varint("value data_file_offset");
      e.ref.length = len[i];
      if (e.ref.offset > std::numeric_limits<std::uint64_t>::max() - e.ref.length)
        r.fail("offset + length of key '" + e.key + "' overflows");
    }
    for (std::uint64_t i = 0; i < n; ++i) {
      auto& e = node.leaves[i];
      if (e.indirect) continue;
      const std::uint8_t* v = r.bytes(len[i], "inline value");
      e.value.assign(v, v + len[i]);
    }
  } else {
    node.children.resize(n);
    for (std::uint64_t i = 0; i < n; ++i) {
      node.children[i].key = std::move(keys[i]);
      node.children[i].subtree_common_prefix_length = common[i];
    }
    for (auto& e : node.children) e.ref.file = ocdbt_file_at(r, table);
    for (auto& e : node.children) e.ref.offset = r.varint("child data_file_offset");
    for (auto& e : node.children) {
      e.ref.length = r.varint("child data_file_length");
      if (e.ref.offset > std::numeric_limits<std::uint64_t>::max() - e.ref.length)
        r.fail("child offset + length overflows");
    }
    for (auto& e : node.children) e.stats.num_keys = r.varint("num_keys");
    for (auto& e : node.children) e.stats.num_tree_bytes = r.varint("num_tree_bytes");
    for (auto& e : node.children) e.stats.num_indirect_value_bytes = r.varint("num_indirect_value_bytes");
  }
  if (!r.at_end()) r.fail(std::to_string(r.remaining()) + " unexpected bytes after the node's entries");
  return node;
}

// ---- encoding (the writer's side) ---------------------------------------------

// An envelope around `body`, zstd-compressed when `zstd_level` is set.
inline std::vector<std::uint8_t> ocdbt_seal_envelope(std::uint32_t magic, const std::vector<std::uint8_t>& body,
                                                     bool compress, int zstd_level, const std::string& what) {
  std::vector<std::uint8_t> out;
  put_u32be(out, magic);
  put_le(out, 0, 8);  // length, filled in below
  put_varint(out, 0);  // version
  put_varint(out, compress ? 1 : 0);
  if (compress) {
    const std::vector<std::uint8_t> z = zstd_compress(body.data(), body.size(), zstd_level, what);
    out.insert(out.end(), z.begin(), z.end());
  } else {
    out.insert(out.end(), body.begin(), body.end());
  }
  const std::uint64_t length = out.size() + 4;
  for (int i = 0; i < 8; ++i) out[4 + static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(length >> (8 * i));
  put_le(out, crc32c(out.data(), out.size()), 4);
  return out;
}

// A data-file table of `paths` (base path, relative path), in the given order
// (which must be sorted, without duplicates, as tensorstore writes them).
struct OcdbtPathPair {
  std::string base, relative;
};
inline void ocdbt_write_data_file_table(std::vector<std::uint8_t>& out, const std::vector<OcdbtPathPair>& files) {
  put_varint(out, files.size());
  auto common = [](const std::string& a, const std::string& b) {
    std::size_t i = 0;
    while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
    return i;
  };
  std::vector<std::size_t> prefix(files.size(), 0);
  for (std::size_t i = 1; i < files.size(); ++i) {
    const auto& a = files[i - 1];
    const auto& b = files[i];
    std::size_t p = common(a.base, b.base);
    if (a.base.size() == b.base.size() && p == b.base.size()) p += common(a.relative, b.relative);
    prefix[i] = p;
    put_varint(out, p);
  }
  for (std::size_t i = 0; i < files.size(); ++i) put_varint(out, files[i].base.size() + files[i].relative.size() - prefix[i]);
  for (const auto& f : files) put_varint(out, f.base.size());
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string path = files[i].base + files[i].relative;
    out.insert(out.end(), path.begin() + static_cast<std::ptrdiff_t>(prefix[i]), path.end());
  }
}

// The keys' prefix / suffix columns (and their bytes) of a node's entries.
inline void ocdbt_write_keys(std::vector<std::uint8_t>& out, const std::vector<std::string>& keys,
                             const std::vector<std::uint64_t>* subtree_common) {
  std::vector<std::size_t> prefix(keys.size(), 0);
  for (std::size_t i = 1; i < keys.size(); ++i) {
    const std::string& a = keys[i - 1];
    const std::string& b = keys[i];
    std::size_t p = 0;
    while (p < a.size() && p < b.size() && a[p] == b[p]) ++p;
    prefix[i] = p;
    put_varint(out, p);
  }
  for (std::size_t i = 0; i < keys.size(); ++i) put_varint(out, keys[i].size() - prefix[i]);
  if (subtree_common)
    for (auto c : *subtree_common) put_varint(out, c);
  for (std::size_t i = 0; i < keys.size(); ++i)
    out.insert(out.end(), keys[i].begin() + static_cast<std::ptrdiff_t>(prefix[i]), keys[i].end());
}

// A value of a leaf node as the writer gives it: inline bytes, or a range of data
// file `file` (an index into the node's table).
struct OcdbtLeafValue {
  std::string key;
  bool indirect = false;
  std::vector<std::uint8_t> value;
  std::size_t file = 0;
  std::uint64_t offset = 0, length = 0;
};

inline std::vector<std::uint8_t> ocdbt_encode_leaf_body(const std::vector<OcdbtPathPair>& table,
                                                        const std::vector<OcdbtLeafValue>& entries) {
  std::vector<std::uint8_t> b;
  b.push_back(0);  // height
  ocdbt_write_data_file_table(b, table);
  put_varint(b, entries.size());
  std::vector<std::string> keys;
  for (const auto& e : entries) keys.push_back(e.key);
  ocdbt_write_keys(b, keys, nullptr);
  for (const auto& e : entries) put_varint(b, e.indirect ? e.length : e.value.size());
  for (const auto& e : entries) b.push_back(e.indirect ? 1 : 0);
  for (const auto& e : entries)
    if (e.indirect) put_varint(b, e.file);
  for (const auto& e : entries)
    if (e.indirect) put_varint(b, e.offset);
  for (const auto& e : entries)
    if (!e.indirect) b.insert(b.end(), e.value.begin(), e.value.end());
  return b;
}

struct OcdbtChildRef {
  std::string key;  // first key of the child's subtree (relative to this node)
  std::uint64_t subtree_common_prefix_length = 0;
  std::size_t file = 0;
  std::uint64_t offset = 0, length = 0;
  OcdbtStatistics stats;
};

inline std::vector<std::uint8_t> ocdbt_encode_interior_body(std::uint8_t height, const std::vector<OcdbtPathPair>& table,
                                                            const std::vector<OcdbtChildRef>& children) {
  std::vector<std::uint8_t> b;
  b.push_back(height);
  ocdbt_write_data_file_table(b, table);
  put_varint(b, children.size());
  std::vector<std::string> keys;
  std::vector<std::uint64_t> common;
  for (const auto& c : children) {
    keys.push_back(c.key);
    common.push_back(c.subtree_common_prefix_length);
  }
  ocdbt_write_keys(b, keys, &common);
  for (const auto& c : children) put_varint(b, c.file);
  for (const auto& c : children) put_varint(b, c.offset);
  for (const auto& c : children) put_varint(b, c.length);
  for (const auto& c : children) put_varint(b, c.stats.num_keys);
  for (const auto& c : children) put_varint(b, c.stats.num_tree_bytes);
  for (const auto& c : children) put_varint(b, c.stats.num_indirect_value_bytes);
  return b;
}

// A manifest body with one generation whose root node is `root` (a range of the
// single data file `root_file`, with its base path).
inline std::vector<std::uint8_t> ocdbt_encode_manifest_body(const OcdbtConfig& c, const OcdbtPathPair& root_file,
                                                            const OcdbtVersion& v) {
  std::vector<std::uint8_t> b(c.uuid.begin(), c.uuid.end());
  b.push_back(c.manifest_kind);
  put_varint(b, c.max_inline_value_bytes);
  put_varint(b, c.max_decoded_node_bytes);
  b.push_back(c.version_tree_arity_log2);
  put_varint(b, c.compression);
  if (c.compression == 1) put_le(b, static_cast<std::uint32_t>(c.zstd_level), 4);
  ocdbt_write_data_file_table(b, {root_file});
  put_varint(b, 1);  // num_versions
  put_varint(b, v.generation);
  b.push_back(v.root_height);
  put_varint(b, 0);  // data_file_id
  put_varint(b, v.root.offset);
  put_varint(b, v.root.length);
  put_varint(b, v.stats.num_keys);
  put_varint(b, v.stats.num_tree_bytes);
  put_varint(b, v.stats.num_indirect_value_bytes);
  put_le(b, v.commit_time, 8);
  put_varint(b, 0);  // no version tree nodes
  return b;
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_ORBAX_OCDBT_HPP

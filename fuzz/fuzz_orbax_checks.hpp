// SPDX-License-Identifier: Apache-2.0
//
// The properties of the Orbax parsers (include/linen/io/detail/orbax/), shared by
// the libFuzzer target fuzz_orbax.cpp and by tests/test_fuzz_regressions.cpp, which
// replays the corpus in the normal build. Every input goes through the three
// parsers over memory buffers (an OCDBT manifest, an OCDBT B+tree node, zarr v2/v3
// array metadata):
//
//   - each either returns or throws linen::io_error, nothing else;
//   - a B+tree node that parses, encoded again by linen's encoder, parses to the
//     same keys, values and references;
//   - zarr metadata that parses gives chunk keys that parse back to their cell, a
//     codec description, and a fill-value chunk decode of a zero-filled chunk
//     works or throws io_error.
// A broken property throws linen_fuzz::property_failure (not an io_error).
#ifndef LINEN_FUZZ_FUZZ_ORBAX_CHECKS_HPP
#define LINEN_FUZZ_FUZZ_ORBAX_CHECKS_HPP

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <linen/io/orbax.hpp>

namespace linen_fuzz {

struct orbax_property_failure : std::logic_error {
  explicit orbax_property_failure(const std::string& what)
      : std::logic_error("linen orbax fuzz property broken: " + what) {}
};

inline void orbax_require(bool ok, const std::string& what) {
  if (!ok) throw orbax_property_failure(what);
}

namespace orbax_detail = linen::io::detail;

// The node `n` encoded again (uncompressed) by linen's encoders.
inline std::vector<std::uint8_t> reencode_node(const orbax_detail::OcdbtNode& n) {
  std::vector<orbax_detail::OcdbtPathPair> table;
  std::map<std::pair<std::string, std::string>, std::size_t> index;
  auto file_index = [&](const orbax_detail::OcdbtDataFile& f) {
    std::pair<std::string, std::string> k{f.base_path, f.path.substr(f.base_path.size())};
    auto it = index.find(k);
    if (it != index.end()) return it->second;
    index.emplace(k, table.size());
    table.push_back({k.first, k.second});
    return table.size() - 1;
  };
  std::vector<std::uint8_t> body;
  if (n.height == 0) {
    std::vector<orbax_detail::OcdbtLeafValue> out;
    for (const auto& e : n.leaves) {
      orbax_detail::OcdbtLeafValue l;
      l.key = e.key;
      l.indirect = e.indirect;
      l.value = e.value;
      if (e.indirect) {
        l.file = file_index(e.ref.file);
        l.offset = e.ref.offset;
        l.length = e.ref.length;
      }
      out.push_back(std::move(l));
    }
    body = orbax_detail::ocdbt_encode_leaf_body(table, out);
  } else {
    std::vector<orbax_detail::OcdbtChildRef> out;
    for (const auto& e : n.children) {
      orbax_detail::OcdbtChildRef c;
      c.key = e.key;
      c.subtree_common_prefix_length = e.subtree_common_prefix_length;
      c.file = file_index(e.ref.file);
      c.offset = e.ref.offset;
      c.length = e.ref.length;
      c.stats = e.stats;
      out.push_back(std::move(c));
    }
    body = orbax_detail::ocdbt_encode_interior_body(n.height, table, out);
  }
  return orbax_detail::ocdbt_seal_envelope(orbax_detail::kOcdbtBtreeNodeMagic, body, false, 0, "re-encoded node");
}

inline bool same_ref(const orbax_detail::OcdbtDataRef& a, const orbax_detail::OcdbtDataRef& b) {
  return a.file.path == b.file.path && a.file.base_path == b.file.base_path && a.offset == b.offset &&
         a.length == b.length;
}

inline bool same_node(const orbax_detail::OcdbtNode& a, const orbax_detail::OcdbtNode& b) {
  if (a.height != b.height || a.leaves.size() != b.leaves.size() || a.children.size() != b.children.size()) return false;
  for (std::size_t i = 0; i < a.leaves.size(); ++i) {
    const auto &x = a.leaves[i], &y = b.leaves[i];
    if (x.key != y.key || x.indirect != y.indirect || x.value != y.value) return false;
    if (x.indirect && !same_ref(x.ref, y.ref)) return false;
  }
  for (std::size_t i = 0; i < a.children.size(); ++i) {
    const auto &x = a.children[i], &y = b.children[i];
    if (x.key != y.key || x.subtree_common_prefix_length != y.subtree_common_prefix_length || !same_ref(x.ref, y.ref) ||
        x.stats.num_keys != y.stats.num_keys || x.stats.num_tree_bytes != y.stats.num_tree_bytes ||
        x.stats.num_indirect_value_bytes != y.stats.num_indirect_value_bytes)
      return false;
  }
  return true;
}

// One input through the three parsers; returns how many accepted it.
inline int check_orbax(const std::uint8_t* data, std::size_t size) {
  int parsed = 0;
  try {
    (void)orbax_detail::parse_ocdbt_manifest(data, size, "fuzz manifest");
    ++parsed;
  } catch (const linen::io_error&) {
  }
  try {
    const auto n = orbax_detail::parse_ocdbt_btree_node(data, size, "fuzz node", "", std::size_t{64} << 20);
    ++parsed;
    const auto again = reencode_node(n);
    const auto m = orbax_detail::parse_ocdbt_btree_node(again.data(), again.size(), "re-encoded node");
    orbax_require(same_node(n, m), "parse(encode(node)) != node");
  } catch (const linen::io_error&) {
  }
  try {
    const auto a = orbax_detail::parse_zarr_metadata(data, size, "fuzz zarr metadata");
    ++parsed;
    (void)orbax_detail::describe_codecs(a);
    const std::vector<linen::Index> cell(a.shape.size(), 0);
    const bool nonempty = a.array_bytes() > 0;
    if (nonempty) {
      const std::string key = orbax_detail::zarr_chunk_key(a, cell);
      const auto back = orbax_detail::zarr_parse_chunk_key(a, key);
      orbax_require(back && *back == cell, "zarr chunk key '" + key + "' does not parse back to its cell");
    }
    // Decoding garbage into a small array: io_error or success, never a crash.
    if (nonempty && a.array_bytes() <= (std::size_t{1} << 20) && a.chunk_bytes() <= (std::size_t{1} << 20)) {
      std::vector<std::uint8_t> out(a.array_bytes());
      try {
        orbax_detail::zarr_decode_chunk(a, cell, data, size, out.data(), "fuzz chunk");
      } catch (const linen::io_error&) {
      }
    }
  } catch (const linen::io_error&) {
  }
  return parsed;
}

}  // namespace linen_fuzz

#endif  // LINEN_FUZZ_FUZZ_ORBAX_CHECKS_HPP

// SPDX-License-Identifier: Apache-2.0
// Tests for linen/io/orbax.hpp: Orbax's own checkpoints (tests/data/orbax/), layout
// selection (item, composite, CheckpointManager root), save_orbax round trips of
// every dtype, and hostile checkpoints built here piece by piece with the OCDBT and
// zarr encoders of detail/orbax/, each giving a linen::io_error naming file and key.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <linen/io/checkpoint.hpp>
#include <linen/io/orbax.hpp>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD
#include <zstd.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace d = linen::io::detail;
using linen::Shape;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;
using linen_test::io_error_message;
using Bytes = std::vector<std::uint8_t>;
using KV = std::map<std::string, Bytes>;

const std::string kOrbax = linen_test::data_path("orbax");
const std::string kV0Direct = kOrbax + "/v0_checkpoints/direct_checkpoint/checkpoint_metadata_present/";
const std::string kV0Composite = kOrbax + "/v0_checkpoints/composite_checkpoint/checkpoint_metadata_present/";
const std::string kV1Composite = kOrbax + "/v1_checkpoints/composite_checkpoint/checkpoint_metadata_present/";
const std::string kMissingD =
    kOrbax + "/v0_checkpoints/direct_checkpoint/critical_metadata_alterations/missing_pytree_data_dir_d";

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
#define EXPECT_MESSAGE(msg, part) EXPECT_TRUE(contains((msg), (part))) << "message: " << (msg) << "\nlacks: " << (part)

#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD

Bytes read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void write_file(const fs::path& p, const Bytes& b) {
  fs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
Bytes text(const std::string& s) { return Bytes(s.begin(), s.end()); }

// A fresh directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("linen_test_orbax_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& s) const { return path_ / s; }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A writable copy of fixture directory `src` at `dst`.
void copy_tree(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  fs::copy(src, dst, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  for (const auto& e : fs::recursive_directory_iterator(dst))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
}

// The PyTree every Orbax fixture holds: {'a': int32 0..7, 'b': {'c': int32 [1, 2, 3]}}.
void expect_fixture_tree(const Variables& v) {
  ASSERT_EQ(v.paths(), (std::vector<std::string>{"a", "b/c"}));
  EXPECT_EQ(v.at("a").dtype(), DType::I32);
  EXPECT_EQ(v.at("a").shape(), Shape({8}));
  EXPECT_EQ(v.at("a").to_vector<std::int32_t>(), (std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(v.at("b/c").dtype(), DType::I32);
  EXPECT_EQ(v.at("b/c").shape(), Shape({3}));
  EXPECT_EQ(v.at("b/c").to_vector<std::int32_t>(), (std::vector<std::int32_t>{1, 2, 3}));
  EXPECT_EQ(v.metadata, (std::map<std::string, std::string>{{"custom", "meta"}}));
}

// .zarray text for a test array.
std::string zarray(const std::string& dtype, const std::string& shape, const std::string& chunks,
                   const std::string& compressor = R"({"id":"zstd","level":1})", const std::string& extra = "") {
  return R"({"chunks":)" + chunks + R"(,"compressor":)" + compressor + R"(,"dtype":")" + dtype +
         R"(","fill_value":null,"filters":null,"order":"C","shape":)" + shape + R"(,"zarr_format":2)" + extra + "}";
}

Bytes i32_bytes(std::initializer_list<std::int32_t> xs) {
  Bytes b;
  for (auto x : xs) d::put_le(b, static_cast<std::uint32_t>(x), 4);
  return b;
}

// OrbaxOptions for a step and/or item (C++17: no designated initializers).
linen::io::OrbaxOptions pick(std::optional<long long> step, const std::string& item = "") {
  linen::io::OrbaxOptions o;
  o.step = step;
  o.item = item;
  return o;
}
linen::io::OrbaxOptions item(const std::string& name) { return pick(std::nullopt, name); }

Bytes zstd(const Bytes& b) { return d::zstd_compress(b.data(), b.size(), 1, "test"); }

// ---- Orbax's own checkpoints -----------------------------------------------------

struct FixtureCase {
  std::string dir, item;
  int zarr_format;
};

class OrbaxFixtures : public ::testing::TestWithParam<FixtureCase> {};

TEST_P(OrbaxFixtures, LoadsTheTreeWithNamesShapesDtypesValues) {
  const FixtureCase& c = GetParam();
  expect_fixture_tree(linen::io::load_orbax(c.dir));
  if (!c.item.empty()) expect_fixture_tree(linen::io::load_orbax(c.dir, item(c.item)));
  EXPECT_TRUE(linen::io::is_orbax_checkpoint(c.dir));
  const auto info = linen::io::list_orbax(c.dir);
  ASSERT_EQ(info.size(), 2u);
  EXPECT_EQ(info[0].name, "a");
  EXPECT_EQ(info[0].param_name, "a");
  EXPECT_EQ(info[1].name, "b/c");
  EXPECT_EQ(info[1].param_name, "b.c");
  EXPECT_EQ(info[1].shape, Shape({3}));
  EXPECT_EQ(info[1].chunk_shape, Shape({3}));
  EXPECT_EQ(info[1].dtype, DType::I32);
  EXPECT_EQ(info[1].stored_chunks, 1u);
  EXPECT_EQ(info[1].zarr_format, c.zarr_format);
  EXPECT_MESSAGE(info[1].codecs, c.zarr_format == 2 ? "zstd(level=1)" : "sharding_indexed(chunk_shape=(3,)");
}

INSTANTIATE_TEST_SUITE_P(
    AllPublic, OrbaxFixtures,
    ::testing::Values(FixtureCase{kV0Direct + "pytree_checkpointable_has_metadata", "", 2},
                      FixtureCase{kV0Direct + "pytree_checkpointable_missing_metadata", "", 2},
                      FixtureCase{kV0Composite + "pytree_checkpointable_has_metadata", "state", 2},
                      FixtureCase{kV0Composite + "pytree_checkpointable_missing_metadata", "state", 2},
                      FixtureCase{kV1Composite + "pytree_checkpointable_has_metadata", "state", 3},
                      FixtureCase{kV1Composite + "pytree_checkpointable_missing_metadata", "state", 3}));

TEST(OrbaxLayout, LoadCheckpointRecognisesOrbaxDirectories) {
  // load_checkpoint / read_checkpoint read an Orbax directory as load_orbax does; the
  // options choose the item there too; a damaged one fails with load_orbax's reason.
  const std::string direct = kV0Direct + "pytree_checkpointable_has_metadata";
  const linen::io::Checkpoint c = linen::io::read_checkpoint(direct);
  EXPECT_EQ(c.format, linen::io::CheckpointFormat::orbax);
  EXPECT_STREQ(linen::io::format_name(c.format), "orbax");
  expect_fixture_tree(c.variables);
  expect_fixture_tree(linen::io::load_checkpoint(kV1Composite + "pytree_checkpointable_missing_metadata", item("state")));
  const std::string m = io_error_message([] { linen::io::load_checkpoint(kMissingD); });
  EXPECT_MESSAGE(m, "data file 'd/");
  // A directory that is no Orbax checkpoint is still refused as not a regular file.
  EXPECT_MESSAGE(io_error_message([] { linen::io::load_checkpoint(linen_test::data_path("flax")); }),
                 "not a regular file");
}

TEST(OrbaxLayout, CompositeItemDirectlyAndByName) {
  expect_fixture_tree(linen::io::load_orbax(kV0Composite + "pytree_checkpointable_has_metadata/state"));
  const std::string c = kV1Composite + "pytree_checkpointable_has_metadata";
  const std::string m1 = io_error_message([&] { linen::io::load_orbax(c, item("metadata")); });
  EXPECT_MESSAGE(m1, "no checkpoint item 'metadata'");
  EXPECT_MESSAGE(m1, "'state'");
  const std::string m2 = io_error_message([&] { linen::io::load_orbax(c + "/state", item("state")); });
  EXPECT_MESSAGE(m2, "is a checkpoint item itself");
  const std::string m3 = io_error_message([&] { linen::io::load_orbax(c, pick(3)); });
  EXPECT_MESSAGE(m3, "not a CheckpointManager root");
}

TEST(OrbaxLayout, MissingDataDirectoryNamesTheMissingFile) {
  const std::string m = io_error_message([] { linen::io::load_orbax(kMissingD); });
  EXPECT_MESSAGE(m, "manifest.ocdbt");
  EXPECT_MESSAGE(m, "data file 'd/");
  EXPECT_MESSAGE(m, "is missing");
  EXPECT_TRUE(linen::io::is_orbax_checkpoint(kMissingD));  // recognised, then refused
  (void)io_error_message([] { linen::io::list_orbax(kMissingD); });
}

TEST(OrbaxLayout, IsOrbaxCheckpointIsFalseForOtherThings) {
  TempDir t;
  EXPECT_FALSE(linen::io::is_orbax_checkpoint(t.path().string()));
  EXPECT_FALSE(linen::io::is_orbax_checkpoint((t / "absent").string()));
  EXPECT_FALSE(linen::io::is_orbax_checkpoint(linen_test::data_path("flax")));
  EXPECT_FALSE(linen::io::is_orbax_checkpoint(linen_test::data_path("flax/dpa_nobatch.safetensors")));
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax(t.path().string()); }), "not an Orbax checkpoint");
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "absent").string()); }), "not a directory");
}

Variables small(std::int32_t x) {
  Variables v;
  v.set("params/w", Array(DType::I32, {2}, i32_bytes({x, x + 1})));
  return v;
}

TEST(OrbaxLayout, CheckpointManagerRootPicksLatestOrGivenStepAndItem) {
  TempDir t;
  const fs::path root = t / "run";
  linen::io::save_orbax((root / "1" / "default").string(), small(10));
  linen::io::save_orbax((root / "3" / "default").string(), small(30));
  copy_tree(kV0Composite + "pytree_checkpointable_has_metadata", root / "2");
  fs::create_directories(root / "4.orbax-checkpoint-tmp-17" / "default");  // unfinished save: not a step
  EXPECT_TRUE(linen::io::is_orbax_checkpoint(root.string()));
  EXPECT_EQ(linen::io::load_orbax(root.string()), small(30));
  EXPECT_EQ(linen::io::load_orbax(root.string(), pick(1)), small(10));
  EXPECT_EQ(linen::io::load_orbax(root.string(), pick(3, "default")), small(30));
  expect_fixture_tree(linen::io::load_orbax(root.string(), pick(2)));
  expect_fixture_tree(linen::io::load_orbax(root.string(), pick(2, "state")));
  const std::string m = io_error_message([&] { linen::io::load_orbax(root.string(), pick(7)); });
  EXPECT_MESSAGE(m, "no step 7 (steps: 1, 2, 3)");
  const std::string m2 = io_error_message([&] { linen::io::load_orbax(root.string(), pick(1, "state")); });
  EXPECT_MESSAGE(m2, "no checkpoint item 'state' (items: 'default')");
  // Two PyTree items: ambiguous unless one is named.
  linen::io::save_orbax((root / "5" / "default").string(), small(50));
  linen::io::save_orbax((root / "5" / "ema").string(), small(51));
  const std::string m3 = io_error_message([&] { linen::io::load_orbax(root.string()); });
  EXPECT_MESSAGE(m3, "several PyTree items ('default', 'ema')");
  EXPECT_EQ(linen::io::load_orbax(root.string(), item("ema")), small(51));
}

// ---- the writer ------------------------------------------------------------------

Bytes random_bytes(DType dt, std::size_t n, std::mt19937& g) {
  Bytes b(n * linen::io::itemsize(dt));
  for (auto& x : b) x = static_cast<std::uint8_t>(dt == DType::BOOL ? g() % 2 : g());
  return b;
}

Variables every_dtype(std::mt19937& g) {
  Variables v;
  for (DType dt : linen::io::kAllDTypes) {
    const std::string n = linen::io::numpy_name(dt);
    v.set("params/" + n + "/scalar", Array(dt, {}, random_bytes(dt, 1, g)));
    v.set("params/" + n + "/vector", Array(dt, {5}, random_bytes(dt, 5, g)));
    v.set("params/" + n + "/kernel", Array(dt, {3, 2, 4}, random_bytes(dt, 24, g)));
    v.set("params/" + n + "/empty", Array(dt, {2, 0}, {}));
    v.set("params/" + n + "/large", Array(dt, {37, 129}, random_bytes(dt, 37 * 129, g)));
  }
  v.metadata["step"] = "12";
  return v;
}

TEST(OrbaxWriter, RoundTripsEveryDtypeBitForBit) {
  std::mt19937 g(7);
  const Variables v = every_dtype(g);
  TempDir t;
  for (std::size_t chunk : {std::size_t{0}, std::size_t{1000}}) {
    const std::string dir = (t / ("ckpt" + std::to_string(chunk))).string();
    linen::io::OrbaxSaveOptions so;
    so.max_chunk_bytes = chunk;
    linen::io::save_orbax(dir, v, so);
    const Variables w = linen::io::load_orbax(dir);
    EXPECT_EQ(w.paths(), v.paths());
    for (const auto& [p, a] : v) EXPECT_EQ(w.at(p), a) << p;  // dtype, shape and bytes
    EXPECT_EQ(w.metadata, v.metadata);
    EXPECT_TRUE(w == v);
    for (const auto& info : linen::io::list_orbax(dir)) {
      if (info.name.find("/large") == std::string::npos) continue;
      if (chunk == 0) {
        EXPECT_EQ(info.chunk_shape, info.shape) << info.name;
        EXPECT_EQ(info.stored_chunks, 1u);
      } else {
        EXPECT_GT(info.stored_chunks, 4u) << info.name;  // spans chunks, edge chunks padded
      }
    }
  }
}

TEST(OrbaxWriter, LayoutMatchesStandardCheckpointer) {
  TempDir t;
  const fs::path dir = t / "ckpt";
  Variables v;
  v.set("a", Array(DType::I32, {8}, i32_bytes({0, 1, 2, 3, 4, 5, 6, 7})));
  v.set("b/c", Array(DType::I32, {3}, i32_bytes({1, 2, 3})));
  v.metadata["custom"] = "meta";
  linen::io::save_orbax(dir.string(), v);
  const fs::path fixture = kV0Direct + "pytree_checkpointable_has_metadata";
  auto names = [](const fs::path& p) {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(p)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  };
  EXPECT_EQ(names(dir), names(fixture));
  EXPECT_EQ(names(dir / "ocdbt.process_0"), names(fixture / "ocdbt.process_0"));
  EXPECT_EQ(names(dir / "array_metadatas"), names(fixture / "array_metadatas"));
  expect_fixture_tree(linen::io::load_orbax(dir.string()));
  // Same JSON documents as Orbax's (timestamps and key order aside).
  for (const char* f : {"_METADATA", "_sharding", "array_metadatas/process_0"}) {
    const Bytes a = read_file(dir / f), b = read_file(fixture / f);
    EXPECT_EQ(nlohmann::json::parse(a), nlohmann::json::parse(b)) << f;
  }
  auto ckpt = nlohmann::json::parse(read_file(dir / "_CHECKPOINT_METADATA"));
  auto orig = nlohmann::json::parse(read_file(fixture / "_CHECKPOINT_METADATA"));
  for (auto* j : {&ckpt, &orig}) {
    j->erase("init_timestamp_nsecs");
    j->erase("commit_timestamp_nsecs");
  }
  EXPECT_EQ(ckpt, orig);
}

// The fixture's root B+tree node and manifest, re-encoded by linen's encoders, give
// Orbax's bytes back (before compression).
TEST(OrbaxWriter, EncodersReproduceOrbaxBytes) {
  const fs::path fixture = kV0Direct + "pytree_checkpointable_has_metadata";
  const Bytes mf = read_file(fixture / "manifest.ocdbt");
  const auto m = d::parse_ocdbt_manifest(mf.data(), mf.size(), "manifest");
  const Bytes mbody = d::ocdbt_open_envelope(mf.data(), mf.size(), d::kOcdbtManifestMagic, "manifest", 1 << 20, "m");
  ASSERT_EQ(m.versions.size(), 1u);
  EXPECT_EQ(d::ocdbt_encode_manifest_body(m.config, {"", m.versions[0].root.file.path}, m.versions[0]), mbody);
  EXPECT_EQ(m.config.max_inline_value_bytes, 1024u);
  EXPECT_EQ(m.config.max_decoded_node_bytes, 100000000u);
  const Bytes nf = read_file(fixture / m.versions[0].root.file.path);
  const auto node = d::parse_ocdbt_btree_node(nf.data(), nf.size(), "node");
  const Bytes nbody = d::ocdbt_open_envelope(nf.data(), nf.size(), d::kOcdbtBtreeNodeMagic, "node", 1 << 20, "n");
  std::vector<d::OcdbtLeafValue> leaves;
  for (const auto& e : node.leaves) {
    d::OcdbtLeafValue l;
    l.key = e.key;
    l.value = e.value;
    leaves.push_back(l);
  }
  ASSERT_EQ(leaves.size(), 4u);
  EXPECT_EQ(leaves[0].key, "a/.zarray");
  EXPECT_EQ(leaves[3].key, "b.c/0");
  EXPECT_EQ(d::ocdbt_encode_leaf_body({}, leaves), nbody);
  const std::string meta = d::zarr_v2_metadata_json(DType::I32, {8}, {8}, 1);
  EXPECT_EQ(Bytes(meta.begin(), meta.end()), leaves[0].value);
}

TEST(OrbaxWriter, OutOfLineValuesInteriorNodesAndProcessDatabases) {
  std::mt19937 g(3);
  TempDir t;
  // Values over 1024 bytes go out of line; the merged root re-bases their paths.
  Variables v;
  v.set("big", Array(DType::U8, {5000}, random_bytes(DType::U8, 5000, g)));
  v.set("small", Array(DType::U8, {3}, {1, 2, 3}));
  const fs::path dir = t / "ckpt";
  linen::io::save_orbax(dir.string(), v);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir / "ocdbt.process_0" / "d"), fs::directory_iterator{}), 2);
  EXPECT_EQ(linen::io::load_orbax(dir.string()), v);
  fs::remove(dir / "manifest.ocdbt");  // unmerged: the process databases alone
  EXPECT_EQ(linen::io::load_orbax(dir.string()), v);
  // A three-level tree.
  KV kv;
  for (int i = 0; i < 11; ++i) kv["k" + std::to_string(i)] = Bytes(static_cast<std::size_t>(i * 300), static_cast<std::uint8_t>(i));
  d::OcdbtWriteOptions o;
  o.max_leaf_entries = 2;
  o.max_interior_entries = 2;
  d::write_ocdbt_database(t / "db", kv, o);
  const auto store = d::OcdbtStore::open(t / "db");
  ASSERT_EQ(store.entries().size(), kv.size());
  for (const auto& [k, b] : kv) EXPECT_EQ(store.read(k), b) << k;
}

TEST(OrbaxWriter, NamesWithDotsAndQuotesSurviveThroughMetadata) {
  TempDir t;
  Variables v;
  v.set("params/my.layer/it's", Array(DType::F32, {}, {0, 0, 128, 63}));
  v.set("params/\"q\"/back\\slash", Array(DType::U8, {1}, {9}));
  const std::string dir = (t / "ckpt").string();
  linen::io::save_orbax(dir, v);
  EXPECT_EQ(linen::io::load_orbax(dir), v);
  const Bytes meta_bytes = read_file(fs::path(dir) / "_METADATA");
  const std::string meta(meta_bytes.begin(), meta_bytes.end());
  const auto tree = nlohmann::json::parse(meta)["tree_metadata"];
  EXPECT_TRUE(tree.contains("('params', 'my.layer', \"it's\")")) << meta;
  EXPECT_TRUE(tree.contains("('params', '\"q\"', 'back\\\\slash')")) << meta;
  EXPECT_EQ(d::python_tuple_repr({"a"}), "('a',)");
  const auto info = linen::io::list_orbax(dir);
  ASSERT_EQ(info.size(), 2u);
  EXPECT_EQ(info[1].param_name, "params.my.layer.it's");
  // Without _METADATA the dots are taken for separators (the documented ambiguity).
  fs::remove(fs::path(dir) / "_METADATA");
  EXPECT_TRUE(linen::io::load_orbax(dir).contains("params/my/layer/it's"));
}

TEST(OrbaxWriter, NnxStateValueLeavesAreDropped) {
  TempDir t;
  Variables v;
  v.set("query/kernel/value", Array(DType::U8, {1}, {1}));
  v.set("query/bias/value", Array(DType::U8, {1}, {2}));
  linen::io::save_orbax((t / "nnx").string(), v);
  EXPECT_EQ(linen::io::load_orbax((t / "nnx").string()).paths(), (std::vector<std::string>{"query/bias", "query/kernel"}));
  v.set("query/count", Array(DType::U8, {1}, {3}));  // not every leaf is a `value`: kept as is
  linen::io::save_orbax((t / "mixed").string(), v);
  EXPECT_EQ(linen::io::load_orbax((t / "mixed").string()), v);
}

TEST(OrbaxWriter, RefusesToOverwriteAndCollidingNames) {
  TempDir t;
  const fs::path dir = t / "ckpt";
  write_file(dir / "keep.txt", text("precious"));
  const std::string m = io_error_message([&] { linen::io::save_orbax(dir.string(), small(1)); });
  EXPECT_MESSAGE(m, "not empty");
  EXPECT_EQ(read_file(dir / "keep.txt"), text("precious"));
  write_file(t / "file", text("x"));
  EXPECT_MESSAGE(io_error_message([&] { linen::io::save_orbax((t / "file").string(), small(1)); }), "not a directory");
  fs::create_directories(t / "empty");
  linen::io::save_orbax((t / "empty").string(), small(2));  // an empty directory is fine
  EXPECT_EQ(linen::io::load_orbax((t / "empty").string()), small(2));
  Variables clash;
  clash.set("a.b/c", Array(DType::U8, {1}, {1}));
  clash.set("a/b.c", Array(DType::U8, {1}, {2}));
  EXPECT_THROW(linen::io::save_orbax((t / "clash").string(), clash), linen::invalid_argument);
  EXPECT_THROW(linen::io::save_orbax((t / "none").string(), Variables()), linen::invalid_argument);
  EXPECT_FALSE(fs::exists(t / "clash"));
  std::size_t left = 0;
  for (const auto& e : fs::directory_iterator(t.path())) left += e.path().filename().string().find("linen-tmp") != std::string::npos;
  EXPECT_EQ(left, 0u);
}

// ---- hostile input -----------------------------------------------------------------

// A checkpoint item at `dir` holding exactly the key/values `kv` (no _METADATA).
void make_item(const fs::path& dir, const KV& kv) { d::write_ocdbt_database(dir, kv); }

// A database whose manifest.ocdbt references node `node` (written to d/node) at `height`.
void make_raw_db(const fs::path& dir, const Bytes& node, std::uint8_t height) {
  write_file(dir / "d" / "node", node);
  d::OcdbtConfig c;
  d::OcdbtVersion v;
  v.generation = 1;
  v.root_height = height;
  v.root.length = node.size();
  write_file(dir / "manifest.ocdbt",
             d::ocdbt_seal_envelope(d::kOcdbtManifestMagic, d::ocdbt_encode_manifest_body(c, {"", "d/node"}, v), false, 0, "t"));
}

Bytes leaf_node(const std::vector<d::OcdbtPathPair>& table, const std::vector<d::OcdbtLeafValue>& entries) {
  return d::ocdbt_seal_envelope(d::kOcdbtBtreeNodeMagic, d::ocdbt_encode_leaf_body(table, entries), true, 0, "t");
}

d::OcdbtLeafValue inline_value(const std::string& k, const Bytes& b) {
  d::OcdbtLeafValue l;
  l.key = k;
  l.value = b;
  return l;
}

TEST(OrbaxHostile, CorruptChecksum) {
  TempDir t;
  copy_tree(kV0Direct + "pytree_checkpointable_has_metadata", t / "c");
  Bytes m = read_file(t / "c" / "manifest.ocdbt");
  m[20] ^= 0x01;
  write_file(t / "c" / "manifest.ocdbt", m);
  const std::string msg = io_error_message([&] { linen::io::load_orbax((t / "c").string()); });
  EXPECT_MESSAGE(msg, "manifest.ocdbt");
  EXPECT_MESSAGE(msg, "crc32c mismatch");
  // A B+tree node's checksum, too.
  copy_tree(kV0Direct + "pytree_checkpointable_has_metadata", t / "n");
  for (const auto& e : fs::directory_iterator(t / "n" / "d")) {
    Bytes b = read_file(e.path());
    b[b.size() - 1] ^= 0x80;
    write_file(e.path(), b);
  }
  const std::string msg2 = io_error_message([&] { linen::io::load_orbax((t / "n").string()); });
  EXPECT_MESSAGE(msg2, "B+tree node crc32c mismatch");
  EXPECT_MESSAGE(msg2, "data file 'd/");
}

TEST(OrbaxHostile, TruncatedManifest) {
  TempDir t;
  copy_tree(kV0Direct + "pytree_checkpointable_has_metadata", t / "c");
  Bytes m = read_file(t / "c" / "manifest.ocdbt");
  for (std::size_t n : {std::size_t{0}, std::size_t{10}, m.size() - 1}) {
    write_file(t / "c" / "manifest.ocdbt", Bytes(m.begin(), m.begin() + static_cast<std::ptrdiff_t>(n)));
    const std::string msg = io_error_message([&] { linen::io::load_orbax((t / "c").string()); });
    EXPECT_MESSAGE(msg, "manifest.ocdbt");
    EXPECT_TRUE(contains(msg, "shorter than its header") || contains(msg, "(truncated or padded)")) << msg;
  }
}

TEST(OrbaxHostile, OversizedVarint) {
  Bytes body(16, 0);  // uuid
  body.push_back(0);  // manifest_kind
  for (int i = 0; i < 11; ++i) body.push_back(0xFF);
  Bytes m = d::ocdbt_seal_envelope(d::kOcdbtManifestMagic, body, false, 0, "t");
  const std::string msg = io_error_message([&] { d::parse_ocdbt_manifest(m.data(), m.size(), "x/manifest.ocdbt"); });
  EXPECT_MESSAGE(msg, "x/manifest.ocdbt");
  EXPECT_MESSAGE(msg, "varint max_inline_value_bytes does not fit in 64 bits");
  body.resize(17);
  d::put_varint(body, std::uint64_t{1} << 40);  // fits 64 bits, not the field
  m = d::ocdbt_seal_envelope(d::kOcdbtManifestMagic, body, false, 0, "t");
  EXPECT_MESSAGE(io_error_message([&] { d::parse_ocdbt_manifest(m.data(), m.size(), "m"); }),
                 "max_inline_value_bytes = 1099511627776 exceeds its limit");
  // A key length past the end of the node, a num_entries past any possible count.
  Bytes node = {0, 0, 1};  // height 0, no data files, one entry
  d::put_varint(node, 60000);
  Bytes n = d::ocdbt_seal_envelope(d::kOcdbtBtreeNodeMagic, node, false, 0, "t");
  EXPECT_MESSAGE(io_error_message([&] { d::parse_ocdbt_btree_node(n.data(), n.size(), "node"); }), "key_suffix needs 60000 bytes");
  node = {0, 0};
  d::put_varint(node, 1u << 30);
  n = d::ocdbt_seal_envelope(d::kOcdbtBtreeNodeMagic, node, false, 0, "t");
  EXPECT_MESSAGE(io_error_message([&] { d::parse_ocdbt_btree_node(n.data(), n.size(), "node"); }), "num_entries");
}

TEST(OrbaxHostile, NodeCycleAndHeights) {
  TempDir t;
  // An interior node whose only child is itself.
  Bytes enc;
  std::uint64_t len = 40;
  for (int i = 0; i < 8; ++i) {
    d::OcdbtChildRef c;
    c.key = "a";
    c.length = len;
    enc = d::ocdbt_seal_envelope(d::kOcdbtBtreeNodeMagic, d::ocdbt_encode_interior_body(1, {{"", "d/node"}}, {c}), false, 0, "t");
    if (enc.size() == len) break;
    len = enc.size();
  }
  ASSERT_EQ(enc.size(), len);
  make_raw_db(t / "cycle", enc, 1);
  const std::string msg = io_error_message([&] { linen::io::load_orbax((t / "cycle").string()); });
  EXPECT_MESSAGE(msg, "B+tree cycle");
  EXPECT_MESSAGE(msg, "d/node");
  // A leaf reached where the manifest promises height 2.
  make_raw_db(t / "height", leaf_node({}, {inline_value("a/.zarray", text("{}"))}), 2);
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "height").string()); }),
                 "B+tree node has height 0, its parent expects 2");
  // A root height no B+tree has.
  make_raw_db(t / "deep", enc, 200);
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "deep").string()); }), "root_height 200 too large");
}

TEST(OrbaxHostile, DecompressionBomb) {
  TempDir t;
  const Bytes zeros(std::size_t{64} << 20, 0);
  const Bytes declared = zstd(zeros);  // declares 64 MiB in its header
  ASSERT_LT(declared.size(), 64u * 1024);
  make_item(t / "declared", {{"a/.zarray", text(zarray("<i4", "[8]", "[8]"))}, {"a/0", declared}});
  std::string msg = io_error_message([&] { linen::io::load_orbax((t / "declared").string()); });
  EXPECT_MESSAGE(msg, "key 'a/0'");
  EXPECT_MESSAGE(msg, "declares 67108864 bytes, more than the 32 bytes");
  // The same frame streamed, without a declared size: stopped at the bound.
  ZSTD_CCtx* cx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cx, ZSTD_c_contentSizeFlag, 0);
  Bytes streamed(ZSTD_compressBound(zeros.size()));
  ZSTD_outBuffer ob{streamed.data(), streamed.size(), 0};
  ZSTD_inBuffer ib{zeros.data(), zeros.size(), 0};
  ASSERT_EQ(ZSTD_compressStream2(cx, &ob, &ib, ZSTD_e_end), 0u);
  ZSTD_freeCCtx(cx);
  streamed.resize(ob.pos);
  ASSERT_EQ(ZSTD_getFrameContentSize(streamed.data(), streamed.size()), ZSTD_CONTENTSIZE_UNKNOWN);
  make_item(t / "streamed", {{"a/.zarray", text(zarray("<i4", "[8]", "[8]"))}, {"a/0", streamed}});
  msg = io_error_message([&] { linen::io::load_orbax((t / "streamed").string()); });
  EXPECT_MESSAGE(msg, "key 'a/0'");
  EXPECT_MESSAGE(msg, "decompresses past the 32 bytes");
  // A B+tree node body past max_decoded_node_bytes.
  const Bytes n = d::ocdbt_seal_envelope(d::kOcdbtBtreeNodeMagic, Bytes(5000, 0), true, 0, "t");
  EXPECT_MESSAGE(io_error_message([&] { d::parse_ocdbt_btree_node(n.data(), n.size(), "node", "", 4096); }),
                 "declares 5000 bytes, more than the 4096 bytes");
}

TEST(OrbaxHostile, ShapeAgainstByteCount) {
  TempDir t;
  make_item(t / "short", {{"a/.zarray", text(zarray("<i4", "[8]", "[8]"))}, {"a/0", zstd(i32_bytes({1, 2, 3, 4}))}});
  std::string msg = io_error_message([&] { linen::io::load_orbax((t / "short").string()); });
  EXPECT_MESSAGE(msg, "key 'a/0'");
  EXPECT_MESSAGE(msg, "decodes to 16 bytes, expected 32");
  make_item(t / "raw", {{"a/.zarray", text(zarray("<i4", "[8]", "[8]", "null"))}, {"a/0", i32_bytes({1, 2, 3})}});
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "raw").string()); }), "decodes to 12 bytes, expected 32");
  make_item(t / "huge", {{"a/.zarray", text(zarray("<f8", "[1099511627776]", "[1024]"))}});
  msg = io_error_message([&] { linen::io::load_orbax((t / "huge").string()); });
  EXPECT_MESSAGE(msg, "exceeds OrbaxOptions::max_array_bytes");
  make_item(t / "stray", {{"a/.zarray", text(zarray("<i4", "[8]", "[8]"))}, {"a/5", zstd(i32_bytes({1}))}});
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "stray").string()); }), "key 'a/5' is not a chunk of array 'a'");
  make_item(t / "bool", {{"a/.zarray", text(zarray("|b1", "[2]", "[2]"))}, {"a/0", zstd({1, 7})}});
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "bool").string()); }), "bool chunk holds byte 7");
  // Absent chunks hold fill_value.
  make_item(t / "fill", {{"a/.zarray", text(zarray("<i4", "[4]", "[2]"))}, {"a/1", zstd(i32_bytes({5, 6}))}});
  EXPECT_EQ(linen::io::load_orbax((t / "fill").string()).at("a").to_vector<std::int32_t>(),
            (std::vector<std::int32_t>{0, 0, 5, 6}));
}

TEST(OrbaxHostile, DataFilePathsLeavingTheDirectory) {
  TempDir t;
  write_file(t / "outside", Bytes(64, 1));
  for (const std::string bad : {"../outside", "/etc/passwd", "d/../../outside", "d//x", "./d/x"}) {
    d::OcdbtLeafValue v;
    v.key = "a/0";
    v.indirect = true;
    v.length = 8;
    const fs::path dir = t / ("c" + std::to_string(std::hash<std::string>{}(bad)));
    make_raw_db(dir, leaf_node({{"", bad}}, {inline_value("a/.zarray", text(zarray("<i4", "[2]", "[2]", "null"))), v}), 0);
    const std::string msg = io_error_message([&] { linen::io::load_orbax(dir.string()); });
    EXPECT_MESSAGE(msg, "key 'a/0'");
    EXPECT_MESSAGE(msg, "data file path '" + bad + "' is refused");
  }
}

TEST(OrbaxHostile, SymlinksLeavingTheDirectory) {
  std::mt19937 g(5);
  TempDir t;
  Variables v;
  v.set("big", Array(DType::U8, {4000}, random_bytes(DType::U8, 4000, g)));
  const fs::path dir = t / "ckpt";
  linen::io::save_orbax(dir.string(), v);
  // The out-of-line value file becomes a symlink to a copy outside the checkpoint.
  fs::path value_file;
  for (const auto& e : fs::directory_iterator(dir / "ocdbt.process_0" / "d"))
    if (fs::file_size(e.path()) >= 4000) value_file = e.path();
  ASSERT_FALSE(value_file.empty());
  fs::copy_file(value_file, t / "stolen");
  fs::remove(value_file);
  fs::create_symlink(t / "stolen", value_file);
  std::string msg = io_error_message([&] { linen::io::load_orbax(dir.string()); });
  EXPECT_MESSAGE(msg, "key 'big/0'");
  EXPECT_MESSAGE(msg, "outside the checkpoint directory");
  // A manifest that is a symlink to a device.
  fs::remove(dir / "manifest.ocdbt");
  fs::create_symlink("/dev/zero", dir / "manifest.ocdbt");
  msg = io_error_message([&] { linen::io::load_orbax(dir.string()); });
  EXPECT_MESSAGE(msg, "manifest.ocdbt");
  EXPECT_MESSAGE(msg, "outside the checkpoint directory");
}

TEST(OrbaxHostile, UnknownCodecsAreNamed) {
  TempDir t;
  const std::vector<std::pair<std::string, std::string>> v2 = {
      {zarray("<f4", "[2]", "[2]", R"({"id":"blosc","cname":"lz4"})"), "zarr compressor 'blosc'"},
      {zarray("<f4", "[2]", "[2]", R"({"id":"gzip","level":1})"), "zarr compressor 'gzip'"},
      {R"({"chunks":[2],"compressor":null,"dtype":"<f4","fill_value":null,"filters":[{"id":"delta"}],"order":"C","shape":[2],"zarr_format":2})",
       "zarr filters [\"delta\"]"},
      {R"({"chunks":[2],"compressor":null,"dtype":"<f4","fill_value":null,"filters":null,"order":"F","shape":[2],"zarr_format":2})",
       "zarr order 'F'"},
      {zarray("<c8", "[2]", "[2]"), "zarr dtype '<c8'"},
  };
  int i = 0;
  for (const auto& [meta, expected] : v2) {
    const fs::path dir = t / ("v2_" + std::to_string(i++));
    make_item(dir, {{"w/.zarray", text(meta)}});
    const std::string msg = io_error_message([&] { linen::io::load_orbax(dir.string()); });
    EXPECT_MESSAGE(msg, "key 'w/.zarray'");
    EXPECT_MESSAGE(msg, expected);
  }
  const std::string head =
      R"({"zarr_format":3,"node_type":"array","shape":[2],"data_type":"float32","fill_value":0,)"
      R"("chunk_grid":{"name":"regular","configuration":{"chunk_shape":[2]}},"chunk_key_encoding":{"name":"default"},"codecs":)";
  for (const std::string codec : {"transpose", "gzip", "blosc"}) {
    const fs::path dir = t / ("v3_" + codec);
    make_item(dir, {{"w/zarr.json", text(head + R"([{"name":")" + codec + R"(","configuration":{}},{"name":"bytes"}]})")}});
    const std::string msg = io_error_message([&] { linen::io::load_orbax(dir.string()); });
    EXPECT_MESSAGE(msg, "key 'w/zarr.json'");
    EXPECT_MESSAGE(msg, "zarr v3 codec '" + codec + "' is not supported");
  }
}

// A zarr v3 sharded array of shape [4] (inner chunks [2]) and its shard.
std::string zarr3_sharded() {
  return R"({"zarr_format":3,"node_type":"array","shape":[4],"data_type":"int32","fill_value":-1,)"
         R"("chunk_grid":{"name":"regular","configuration":{"chunk_shape":[4]}},"chunk_key_encoding":{"name":"default"},)"
         R"("codecs":[{"name":"sharding_indexed","configuration":{"chunk_shape":[2],)"
         R"("codecs":[{"name":"bytes","configuration":{"endian":"little"}},{"name":"zstd","configuration":{"level":3}}],)"
         R"("index_codecs":[{"name":"bytes","configuration":{"endian":"little"}},{"name":"crc32c"}]}}]})";
}
Bytes shard(std::uint64_t off0, std::uint64_t len0) {
  Bytes s = zstd(i32_bytes({7, 8}));
  if (len0 == 0) len0 = s.size();
  Bytes index;
  d::put_le(index, off0, 8);
  d::put_le(index, len0, 8);
  d::put_le(index, ~std::uint64_t{0}, 8);  // second inner chunk absent: fill_value
  d::put_le(index, ~std::uint64_t{0}, 8);
  d::put_le(index, d::crc32c(index.data(), index.size()), 4);
  s.insert(s.end(), index.begin(), index.end());
  return s;
}

TEST(OrbaxHostile, ShardIndexChecked) {
  TempDir t;
  make_item(t / "ok", {{"w/zarr.json", text(zarr3_sharded())}, {"w/c/0", shard(0, 0)}});
  EXPECT_EQ(linen::io::load_orbax((t / "ok").string()).at("w").to_vector<std::int32_t>(),
            (std::vector<std::int32_t>{7, 8, -1, -1}));
  make_item(t / "out", {{"w/zarr.json", text(zarr3_sharded())}, {"w/c/0", shard(4, 1000)}});
  std::string msg = io_error_message([&] { linen::io::load_orbax((t / "out").string()); });
  EXPECT_MESSAGE(msg, "key 'w/c/0'");
  EXPECT_MESSAGE(msg, "lies outside the shard's data");
  Bytes bad = shard(0, 0);
  bad[bad.size() - 10] ^= 1;
  make_item(t / "crc", {{"w/zarr.json", text(zarr3_sharded())}, {"w/c/0", bad}});
  msg = io_error_message([&] { linen::io::load_orbax((t / "crc").string()); });
  EXPECT_MESSAGE(msg, "key 'w/c/0' (shard index)");
  EXPECT_MESSAGE(msg, "crc32c codec checksum mismatch");
}

TEST(OrbaxHostile, MetadataListsAnArrayTheStoreLacks) {
  TempDir t;
  copy_tree(kV0Direct + "pytree_checkpointable_has_metadata", t / "c");
  auto meta = nlohmann::json::parse(read_file(t / "c" / "_METADATA"));
  meta["tree_metadata"]["('z',)"] = {{"key_metadata", {{{"key", "z"}, {"key_type", 2}}}},
                                     {"value_metadata", {{"value_type", "jax.Array"}, {"skip_deserialize", false}}}};
  write_file(t / "c" / "_METADATA", text(meta.dump()));
  const std::string msg = io_error_message([&] { linen::io::load_orbax((t / "c").string()); });
  EXPECT_MESSAGE(msg, "_METADATA lists array 'z'");
  EXPECT_MESSAGE(msg, "no 'z/.zarray'");
  write_file(t / "c" / "_METADATA", text("{\"tree_metadata\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]"));
  EXPECT_MESSAGE(io_error_message([&] { linen::io::load_orbax((t / "c").string()); }), "_METADATA");
}

#else  // no zstd

TEST(OrbaxWithoutZstd, SaysZstdIsNotBuiltIn) {
  const std::string m = io_error_message([] { linen::io::load_orbax(kV0Direct + "pytree_checkpointable_has_metadata"); });
  EXPECT_MESSAGE(m, "zstd support is not built in");
}

#endif

}  // namespace

// SPDX-License-Identifier: Apache-2.0
//
// Writes the seed corpora of the fuzzers, fuzz/corpus/msgpack/, fuzz/corpus/safetensors/
// and fuzz/corpus/orbax/ (orbax_seeds below): two small Flax fixtures of each format, copied from
// tests/data/flax/, and small files made here with linen's writers (every dtype and
// rank, nesting, chunked arrays, wide msgpack formats, metadata, empty files) or by
// hand (a numpy-scalar ext 3 leaf), so that the fuzzers start from every structure
// the readers know.
//
//   make_seeds <linen source dir>      (fuzz/CMakeLists.txt builds it as linen_fuzz_make_seeds)
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <linen/io/msgpack.hpp>
#include <linen/io/orbax.hpp>
#include <linen/io/safetensors.hpp>

namespace {

namespace fs = std::filesystem;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;
using Bytes = std::vector<std::uint8_t>;

void write(const fs::path& file, const Bytes& bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + file.string());
  std::printf("%-60s %6zu bytes\n", file.string().c_str(), bytes.size());
}

Bytes read(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file.string());
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Deterministic bytes for an array of `d` with n elements (BOOL: 0/1).
Bytes pattern(DType d, std::size_t n) {
  Bytes b(n * linen::io::itemsize(d));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::uint8_t>(d == DType::BOOL ? i % 2 : 37 * i + 11);
  return b;
}

Variables every_dtype() {
  Variables v;
  for (DType d : linen::io::kAllDTypes) {
    const std::string name = linen::io::numpy_name(d);
    v.set("params/" + name + "/scalar", Array(d, {}, pattern(d, 1)));
    v.set("params/" + name + "/vector", Array(d, {3}, pattern(d, 3)));
    v.set("params/" + name + "/matrix", Array(d, {2, 1, 2}, pattern(d, 4)));
    v.set("params/" + name + "/empty", Array(d, {2, 0}, {}));
  }
  return v;
}

Variables nested() {
  Variables v;
  v.set("params/encoder/layers_0/attn/query/kernel", Array(DType::F32, {2, 1, 2}, pattern(DType::F32, 4)));
  v.set("params/encoder/layers_0/attn/query/bias", Array(DType::F32, {1, 2}, pattern(DType::F32, 2)));
  v.set("params/decoder/cross/out/kernel", Array(DType::BF16, {1, 2, 2}, pattern(DType::BF16, 4)));
  v.set("cache/decoder/self/cached_key", Array(DType::F16, {1, 2, 1, 2}, pattern(DType::F16, 4)));
  v.set("cache/decoder/self/cache_index", Array(DType::I32, {}, {1, 0, 0, 0}));
  return v;
}

Variables wide() {
  Variables v;
  for (int i = 0; i < 17; ++i) v.set("m/" + std::to_string(i), Array(DType::U8, {1}, {static_cast<std::uint8_t>(i)}));
  v.set(std::string(40, 'k'), Array(DType::U8, {260}, pattern(DType::U8, 260)));
  return v;
}

// fuzz/corpus/orbax/: OCDBT manifests and B+tree nodes and zarr metadata taken from
// Orbax's own checkpoints (tests/data/orbax/), and from databases written here
// (interior nodes, out-of-line values, a merged root), plus zarr v2/v3 metadata
// with the variants the reader knows (sharding, big-endian, '/' keys, fill values).
void orbax_seeds(const fs::path& root, const fs::path& out) {
  namespace od = linen::io::detail;
  fs::create_directories(out);
  const fs::path data = root / "tests" / "data" / "orbax";
  const std::vector<std::pair<std::string, fs::path>> items = {
      {"v0", data / "v0_checkpoints/direct_checkpoint/checkpoint_metadata_present/pytree_checkpointable_has_metadata"},
      {"v1", data / "v1_checkpoints/composite_checkpoint/checkpoint_metadata_present/pytree_checkpointable_has_metadata/state"}};
  for (const auto& [tag, item] : items) {
    write(out / (tag + "_root_manifest.ocdbt"), read(item / "manifest.ocdbt"));
    write(out / (tag + "_process_manifest.ocdbt"), read(item / "ocdbt.process_0" / "manifest.ocdbt"));
    for (const auto& e : fs::directory_iterator(item / "d")) write(out / (tag + "_root_node.btree"), read(e.path()));
    const auto store = od::OcdbtStore::open(item);
    for (const auto& [key, value] : store.entries()) {
      const std::string name = key.substr(key.find('/') + 1);
      if (name == ".zarray" || name == "zarr.json")
        write(out / (tag + "_" + key.substr(0, key.find('/')) + "_" + (name == ".zarray" ? "zarray" : "zarr_json") + ".json"),
              store.read(key, value));
    }
  }
  // Databases written by linen: a three-level tree with out-of-line values.
  const fs::path tmp = fs::temp_directory_path() / ("linen_fuzz_seeds_" + od::random_hex_name());
  std::map<std::string, Bytes> kv;
  for (int i = 0; i < 9; ++i) kv["layer_" + std::to_string(i) + "/0"] = pattern(DType::U8, static_cast<std::size_t>(i) * 400);
  od::OcdbtWriteOptions o;
  o.max_leaf_entries = 2;
  o.max_interior_entries = 2;
  od::write_ocdbt_database(tmp, kv, o);
  for (const auto& e : fs::directory_iterator(tmp / "d")) write(out / "linen_interior_root.btree", read(e.path()));
  write(out / "linen_root_manifest.ocdbt", read(tmp / "manifest.ocdbt"));
  fs::remove_all(tmp);
  kv.clear();
  kv["big/0"] = pattern(DType::U8, 3000);
  kv["small/0"] = pattern(DType::U8, 10);
  od::write_ocdbt_database(tmp, kv);
  for (const auto& e : fs::directory_iterator(tmp / "d")) write(out / "linen_leaf_out_of_line.btree", read(e.path()));
  write(out / "linen_process_manifest.ocdbt", read(tmp / "ocdbt.process_0" / "manifest.ocdbt"));
  fs::remove_all(tmp);
  // zarr metadata variants.
  auto text = [](const std::string& s) { return Bytes(s.begin(), s.end()); };
  write(out / "zarr2_bf16_slash.json",
        text(R"({"chunks":[2,3],"compressor":{"id":"zstd","level":1},"dimension_separator":"/","dtype":"bfloat16",)"
             R"("fill_value":"NaN","filters":null,"order":"C","shape":[5,7],"zarr_format":2})"));
  write(out / "zarr2_big_endian_raw.json",
        text(R"({"chunks":[4],"compressor":null,"dtype":">u2","fill_value":7,"filters":null,"order":"C","shape":[4],"zarr_format":2})"));
  write(out / "zarr2_scalar_bool.json",
        text(R"({"chunks":[],"compressor":null,"dtype":"|b1","fill_value":true,"filters":null,"order":"C","shape":[],"zarr_format":2})"));
  write(out / "zarr3_nested_sharding.json",
        text(R"({"zarr_format":3,"node_type":"array","shape":[8,4],"data_type":"float16","fill_value":"0x3c00",)"
             R"("chunk_grid":{"name":"regular","configuration":{"chunk_shape":[8,4]}},)"
             R"("chunk_key_encoding":{"name":"v2","configuration":{"separator":"/"}},)"
             R"("codecs":[{"name":"sharding_indexed","configuration":{"chunk_shape":[4,4],"index_location":"start",)"
             R"("codecs":[{"name":"bytes","configuration":{"endian":"big"}},{"name":"zstd"},{"name":"crc32c"}],)"
             R"("index_codecs":[{"name":"bytes","configuration":{"endian":"little"}},{"name":"crc32c"}]}}]})"));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds <linen source dir>\n");
    return 2;
  }
  try {
    const fs::path root = argv[1];
    const fs::path flax = root / "tests" / "data" / "flax";
    const fs::path mp = root / "fuzz" / "corpus" / "msgpack";
    const fs::path st = root / "fuzz" / "corpus" / "safetensors";
    fs::create_directories(mp);
    fs::create_directories(st);

    // msgpack
    write(mp / "flax_msgpack_f32.msgpack", read(flax / "msgpack_f32.msgpack"));
    write(mp / "flax_msgpack_bf16.msgpack", read(flax / "msgpack_bf16.msgpack"));
    write(mp / "every_dtype.msgpack", linen::io::to_msgpack(every_dtype()));
    write(mp / "nested.msgpack", linen::io::to_msgpack(nested()));
    write(mp / "chunked.msgpack", linen::io::to_msgpack(nested(), 4));
    write(mp / "wide_formats.msgpack", linen::io::to_msgpack(wide()));
    write(mp / "empty.msgpack", linen::io::to_msgpack(Variables()));
    // {"step": ext 3 (numpy scalar) [(), "int64", 8 bytes]}, as Flax writes np.int64(5).
    const std::string s = "int64";
    Bytes scalar = {0x81, 0xa4, 's', 't', 'e', 'p', 0xc7, 0x12, 0x03, 0x93, 0x90, 0xa5};
    scalar.insert(scalar.end(), s.begin(), s.end());
    scalar.insert(scalar.end(), {0xc4, 0x08, 5, 0, 0, 0, 0, 0, 0, 0});
    (void)linen::io::parse_msgpack(scalar.data(), scalar.size(), "numpy_scalar seed");  // checks it
    write(mp / "numpy_scalar.msgpack", scalar);

    // safetensors
    write(st / "flax_dpa_nobatch.safetensors", read(flax / "dpa_nobatch.safetensors"));
    write(st / "flax_self_nobias.safetensors", read(flax / "self_nobias.safetensors"));
    write(st / "every_dtype.safetensors", linen::io::to_safetensors(every_dtype()));
    Variables meta = nested();
    meta.metadata["format"] = "flax";
    meta.metadata["config"] = "{\"num_heads\": 2}";
    write(st / "nested_metadata.safetensors", linen::io::to_safetensors(meta));
    write(st / "empty.safetensors", linen::io::to_safetensors(Variables()));

    // orbax (needs libzstd)
    if (linen::io::detail::kHasZstd) orbax_seeds(root, root / "fuzz" / "corpus" / "orbax");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
    return 1;
  }
}

// SPDX-License-Identifier: Apache-2.0
//
// Writes the seed corpora of the fuzzers, fuzz/corpus/msgpack/ and
// fuzz/corpus/safetensors/: two small Flax fixtures of each format, copied from
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
#include <string>
#include <vector>

#include <linen/io/msgpack.hpp>
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
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
    return 1;
  }
}

// SPDX-License-Identifier: Apache-2.0
// Tests for linen/io/msgpack.hpp: the Flax msgpack fixtures (against their safetensors
// twins, and through a decode step of the module), the writer (exact bytes, chunking,
// every dtype), every kind of malformed image (built byte by byte here, independently
// of the library's writer, so each test shows its fault), format detection,
// unused_paths and the listing.
#include <linen/io/msgpack.hpp>
#include <linen/io/checkpoint.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "attention_fixture.hpp"

// Records the largest single allocation while g_track is on: the hostile-length tests
// check that a declared length never turns into an allocation.
// malloc and free go through volatile pointers so that g++ cannot pair an inlined
// operator new with free (-Wmismatched-new-delete).
namespace {
std::atomic<bool> g_track{false};
std::atomic<std::size_t> g_largest{0};
void* (*volatile g_malloc)(std::size_t) = std::malloc;
void (*volatile g_free)(void*) = std::free;
}  // namespace

void* operator new(std::size_t n) {
  if (g_track.load(std::memory_order_relaxed)) {
    std::size_t cur = g_largest.load(std::memory_order_relaxed);
    while (n > cur && !g_largest.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
    }
  }
  if (void* p = g_malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { g_free(p); }
void operator delete(void* p, std::size_t) noexcept { g_free(p); }

namespace {

namespace fs = std::filesystem;
using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;
using Bytes = std::vector<std::uint8_t>;

const std::string kFlaxDir = std::string(LINEN_TEST_DATA_DIR) + "/flax";

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// ---------------------------------------------------------------- a msgpack encoder for the tests
// Written from the msgpack spec, separately from the library's writer; the width
// variants let the tests reach every format.
struct Mp {
  Bytes b;

  Mp& raw(std::initializer_list<int> bytes) {
    for (int x : bytes) b.push_back(static_cast<std::uint8_t>(x));
    return *this;
  }
  Mp& append(const Bytes& more) {
    b.insert(b.end(), more.begin(), more.end());
    return *this;
  }
  Mp& be(std::uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
    return *this;
  }
  Mp& map(std::uint64_t n) { return n < 16 ? raw({0x80 | static_cast<int>(n)}) : raw({0xde}).be(n, 2); }
  Mp& map32(std::uint64_t n) { return raw({0xdf}).be(n, 4); }
  Mp& arr(std::uint64_t n) { return n < 16 ? raw({0x90 | static_cast<int>(n)}) : raw({0xdc}).be(n, 2); }
  Mp& arr32(std::uint64_t n) { return raw({0xdd}).be(n, 4); }
  Mp& str(const std::string& s) {
    if (s.size() < 32) raw({0xa0 | static_cast<int>(s.size())});
    else if (s.size() <= 0xff) raw({0xd9}).be(s.size(), 1);
    else raw({0xda}).be(s.size(), 2);
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Mp& str16(const std::string& s) {
    raw({0xda}).be(s.size(), 2);
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Mp& str32(const std::string& s) {
    raw({0xdb}).be(s.size(), 4);
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Mp& bin(const Bytes& d) {
    if (d.size() <= 0xff) raw({0xc4}).be(d.size(), 1);
    else raw({0xc5}).be(d.size(), 2);
    return append(d);
  }
  Mp& bin32(const Bytes& d) { return raw({0xc6}).be(d.size(), 4).append(d); }
  Mp& uint(std::uint64_t v) {
    if (v < 0x80) return raw({static_cast<int>(v)});
    if (v <= 0xff) return raw({0xcc}).be(v, 1);
    if (v <= 0xffff) return raw({0xcd}).be(v, 2);
    if (v <= 0xffffffffu) return raw({0xce}).be(v, 4);
    return raw({0xcf}).be(v, 8);
  }
  Mp& t() { return raw({0xc3}); }
  Mp& f() { return raw({0xc2}); }
  // ext with msgpack-python's choice of format (fixext for 1/2/4/8/16 bytes).
  Mp& ext(int type, const Bytes& payload) {
    const std::size_t n = payload.size();
    if (n == 1) raw({0xd4});
    else if (n == 2) raw({0xd5});
    else if (n == 4) raw({0xd6});
    else if (n == 8) raw({0xd7});
    else if (n == 16) raw({0xd8});
    else if (n <= 0xff) raw({0xc7}).be(n, 1);
    else if (n <= 0xffff) raw({0xc8}).be(n, 2);
    else raw({0xc9}).be(n, 4);
    raw({type & 0xff});
    return append(payload);
  }
  Mp& ext32(int type, const Bytes& payload) { return raw({0xc9}).be(payload.size(), 4).raw({type & 0xff}).append(payload); }
};

// The ext payload [shape, dtype name, data] of flax's _ndarray_to_bytes.
Bytes payload(const std::vector<std::uint64_t>& shape, const std::string& dtype, const Bytes& data) {
  Mp m;
  m.arr(3).arr(shape.size());
  for (auto d : shape) m.uint(d);
  return m.str(dtype).bin(data).b;
}

Bytes f32_bytes(std::initializer_list<float> xs) {
  Bytes out;
  for (float x : xs) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(u >> (8 * i)));
  }
  return out;
}

// {"params": {"w": <ext 1 payload>}}.
Bytes wrap_leaf(const Bytes& leaf_payload, int ext_type = 1) {
  return Mp().map(1).str("params").map(1).str("w").ext(ext_type, leaf_payload).b;
}

// A valid ext 1 payload: float32 (2,) = [1, 2].
Bytes good_payload() { return payload({2}, "float32", f32_bytes({1.0f, 2.0f})); }

Variables parse(const Bytes& b, const std::string& name = "bad.msgpack") {
  return linen::io::parse_msgpack(b.data(), b.size(), name);
}

// The io_error message of parsing `b`; fails the test if it parses or throws anything else.
std::string parse_error(const Bytes& b) {
  return linen_test::io_error_message([&] { parse(b); });
}

// Parsing `b` throws io_error naming the file, and every part.
void expect_fault(const Bytes& b, std::initializer_list<std::string> parts) {
  const std::string msg = parse_error(b);
  EXPECT_EQ(msg.rfind("linen::io: bad.msgpack: byte ", 0), 0u) << msg;
  for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nlacks: " << p;
}

std::string at(std::size_t offset) { return "byte " + std::to_string(offset) + ","; }
std::string at_root(std::size_t offset) { return "byte " + std::to_string(offset) + ": "; }

// ---------------------------------------------------------------- the Flax fixtures

TEST(MsgpackFixtures, EveryTensorEqualsItsSafetensorsTwin) {
  for (const char* name : {"msgpack_f32", "msgpack_bf16"}) {
    SCOPED_TRACE(name);
    const Variables m = linen::io::load_msgpack(kFlaxDir + "/" + name + ".msgpack");
    const Variables twin = linen::io::load_safetensors(kFlaxDir + "/" + name + ".safetensors");
    std::vector<std::string> expected;
    for (const auto& p : twin.paths())
      if (p.rfind("params/", 0) == 0 || p.rfind("cache/", 0) == 0) expected.push_back(p);
    ASSERT_EQ(expected.size(), 11u);
    EXPECT_EQ(m.paths(), expected);
    for (const auto& p : expected) {
      EXPECT_EQ(m.at(p).dtype(), twin.at(p).dtype()) << p;
      EXPECT_EQ(m.at(p).shape(), twin.at(p).shape()) << p;
      EXPECT_EQ(m.at(p).bytes(), twin.at(p).bytes()) << p;
    }
    EXPECT_TRUE(m.metadata.empty());
    // The cache index Flax keeps: an int32 0-d array (ext 1 of shape ()), 3 steps done.
    const Array& ci = m.at("cache/cache_index");
    EXPECT_EQ(ci.dtype(), DType::I32);
    EXPECT_EQ(ci.shape(), Shape{});
    EXPECT_EQ(ci.to_vector<std::int32_t>(), std::vector<std::int32_t>{3});
    EXPECT_EQ(m.at("params/query/kernel").dtype(), std::string(name) == "msgpack_f32" ? DType::F32 : DType::BF16);
  }
}

TEST(MsgpackFixtures, ConversionToTheRequestedElementType) {
  const Variables m = linen::io::load_msgpack(kFlaxDir + "/msgpack_bf16.msgpack");
  const auto bb = m.get<float, 1>("params/out/bias", {16});
  EXPECT_EQ(bb(0), 0.125f);         // bfloat16 bits 0x3e00, as the safetensors twin reads
  EXPECT_EQ(bb(7), -0.478515625f);  // bits 0xbef5
  const auto bd = m.get<double, 1>("params/out/bias", {16});
  EXPECT_EQ(bd(7), -0.478515625);
  EXPECT_EQ((m.get<std::int64_t, 0>("cache/cache_index", {})()), 3);
  EXPECT_THROW((m.get<std::int32_t, 1>("params/out/bias", {16})), linen::io_error);  // float -> int refused
}

// The writer reproduces Flax's bytes for every leaf; only the map order differs
// (Flax keeps insertion order, linen sorts), so the sizes agree exactly too.
TEST(MsgpackFixtures, WriterReproducesFlaxLeafBytes) {
  for (const char* name : {"msgpack_f32", "msgpack_bf16"}) {
    SCOPED_TRACE(name);
    const Bytes flax = read_file(kFlaxDir + "/" + name + ".msgpack");
    const Variables v = parse(flax, name);
    const Bytes ours = linen::io::to_msgpack(v);
    EXPECT_EQ(ours.size(), flax.size());
    EXPECT_EQ(parse(ours), v);
    for (const auto& [path, a] : v) {
      Variables one;
      one.set("x", a);
      const Bytes enc = linen::io::to_msgpack(one);  // 0x81 0xa1 'x' <ext>
      ASSERT_GT(enc.size(), 3u);
      const Bytes leaf(enc.begin() + 3, enc.end());
      EXPECT_NE(std::search(flax.begin(), flax.end(), leaf.begin(), leaf.end()), flax.end())
          << path << ": our ext bytes are not in Flax's file";
    }
    // Flax's structure: {"params": {...}, "cache": {...}} in insertion order.
    EXPECT_EQ(flax[0], 0x82);
    EXPECT_EQ(std::string(flax.begin() + 2, flax.begin() + 8), "params");
  }
}

TEST(MsgpackFixtures, EveryTruncatedPrefixThrowsTruncated) {
  for (const char* name : {"msgpack_f32", "msgpack_bf16"}) {
    SCOPED_TRACE(name);
    const Bytes full = read_file(kFlaxDir + "/" + name + ".msgpack");
    ASSERT_NO_THROW(parse(full));
    for (std::size_t len = 0; len < full.size(); ++len) {
      const Bytes prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
      const std::string msg = parse_error(prefix);
      EXPECT_NE(msg.find("truncated"), std::string::npos) << "prefix of " << len << " bytes: " << msg;
    }
  }
}

TEST(MsgpackFixtures, RandomCorruptionsThrowIoErrorOrParse) {
  const Bytes full = read_file(kFlaxDir + "/msgpack_bf16.msgpack");
  std::mt19937 rng(2024);
  int parsed = 0, refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes b = full;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const std::size_t pos = rng() % b.size();
      switch (rng() % 3) {
        case 0: b[pos] = static_cast<std::uint8_t>(rng()); break;
        case 1: b[pos] = static_cast<std::uint8_t>(b[pos] ^ (1u << (rng() % 8))); break;
        default: b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos)); break;
      }
    }
    try {
      const Variables v = parse(b);
      ++parsed;
      EXPECT_EQ(parse(linen::io::to_msgpack(v)), v);
    } catch (const linen::io_error&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 1000);
  EXPECT_GT(parsed, 100);  // flips inside the data bytes leave a valid file
  EXPECT_EQ(parsed + refused, 3000);
}

// Step 4 of the decode module, from the msgpack checkpoint; the config comes from
// the safetensors twin's metadata, the input and the expected output from its tensors.
TEST(MsgpackFixtures, DecodeStepFourFromTheMsgpackCheckpoint) {
  {
    const auto twin = linen_test::fixture("msgpack_f32");
    const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(twin));
    ASSERT_TRUE(cfg.decode);
    ASSERT_EQ(cfg.num_heads, 4);
    const Variables ckpt = linen::io::load_checkpoint(kFlaxDir + "/msgpack_f32.msgpack");
    auto vars = linen::io::load_attention(ckpt, cfg);
    ASSERT_TRUE(vars.cache.has_value());
    EXPECT_EQ(vars.cache->cache_index, 3);
    const auto x = twin.get<float, 3>("inputs/q");
    const Tensor<float, 3> out = linen::SelfAttention<float>(cfg).apply(vars, linen_test::position(x, 3));
    const double err = linen_test::rel_err(out, twin.get<double, 3>("next_output"));
    EXPECT_LE(err, 2e-6);
    EXPECT_EQ(vars.cache->cache_index, 4);
    std::printf("msgpack_f32 step 4: rel err %.3g\n", err);
  }
  {
    using bf16 = Eigen::bfloat16;
    const auto twin = linen_test::fixture("msgpack_bf16");
    const auto json = linen_test::fixture_config(twin);
    ASSERT_EQ(linen_test::dtype_of_case(json), "bfloat16");
    ASSERT_EQ(linen_test::param_dtype_of_case(json), "bfloat16");
    const auto cfg = linen_test::config_from<bf16, bf16>(json);
    const Variables ckpt = linen::io::load_checkpoint(kFlaxDir + "/msgpack_bf16.msgpack");
    auto vars = linen::io::load_attention(ckpt, cfg);
    const auto x = twin.get<float, 3>("inputs/q");
    const Tensor<bf16, 3> out = linen::SelfAttention<bf16>(cfg).apply(vars, linen_test::position(x, 3));
    const double err = linen_test::rel_err(out, twin.get<double, 3>("next_output"));
    EXPECT_LE(err, 2e-2);
    EXPECT_EQ(vars.cache->cache_index, 4);
    std::printf("msgpack_bf16 step 4: rel err %.3g\n", err);
  }
}

// ---------------------------------------------------------------- writing

Variables every_dtype() {
  Variables v;
  std::mt19937 rng(11);
  for (DType d : linen::io::kAllDTypes) {
    const Shape shapes[] = {{}, {3}, {2, 0, 4}, {2, 3, 2}, {1, 1, 1, 1, 5}};
    int k = 0;
    for (const Shape& s : shapes) {
      const Index n = linen::num_elements(s);
      Bytes b(static_cast<std::size_t>(n) * linen::io::itemsize(d));
      for (auto& x : b) x = static_cast<std::uint8_t>(d == DType::BOOL ? rng() % 2 : rng());
      v.set(std::string("params/") + linen::io::numpy_name(d) + "/t" + std::to_string(k++), Array(d, s, b));
    }
  }
  return v;
}

TEST(MsgpackWrite, RoundTripEveryDtypeAndRank) {
  const Variables v = every_dtype();
  ASSERT_EQ(v.size(), 13u * 5u);
  const Bytes b = linen::io::to_msgpack(v);
  EXPECT_EQ(linen::io::to_msgpack(v), b);  // deterministic
  const Variables back = parse(b);
  EXPECT_EQ(back, v);
  EXPECT_EQ(linen::io::to_msgpack(back), b);
  // and through safetensors and back
  const Bytes st = linen::io::to_safetensors(back);
  EXPECT_EQ(linen::io::to_msgpack(linen::io::parse_safetensors(st.data(), st.size())), b);
}

// The bytes msgpack-python writes for {"a": {"b": float32 [1, 2]}, "c": int32 7 (0-d),
// "d": float32 0.5 (0-d)}: ext 8 for payloads of 21 and 14 bytes, fixext 16 for the
// 16-byte payload of a 0-d float32.
TEST(MsgpackWrite, ExactBytesOfASmallFile) {
  Variables v;
  v.set("a/b", Array(DType::F32, {2}, f32_bytes({1.0f, 2.0f})));
  v.set("c", Array(DType::I32, {}, {7, 0, 0, 0}));
  v.set("d", Array(DType::F32, {}, f32_bytes({0.5f})));
  const Bytes expected = Mp()
                             .raw({0x83, 0xa1, 'a', 0x81, 0xa1, 'b', 0xc7, 21, 0x01, 0x93, 0x91, 0x02, 0xa7})
                             .append(Bytes{'f', 'l', 'o', 'a', 't', '3', '2'})
                             .raw({0xc4, 0x08, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40})
                             .raw({0xa1, 'c', 0xc7, 14, 0x01, 0x93, 0x90, 0xa5, 'i', 'n', 't', '3', '2'})
                             .raw({0xc4, 0x04, 0x07, 0x00, 0x00, 0x00})
                             .raw({0xa1, 'd', 0xd8, 0x01, 0x93, 0x90, 0xa7})
                             .append(Bytes{'f', 'l', 'o', 'a', 't', '3', '2'})
                             .raw({0xc4, 0x04, 0x00, 0x00, 0x00, 0x3f})
                             .b;
  EXPECT_EQ(linen::io::to_msgpack(v), expected);
  EXPECT_EQ(parse(expected), v);
  EXPECT_EQ(linen::io::to_msgpack(Variables()), (Bytes{0x80}));
  EXPECT_TRUE(parse(Bytes{0x80}).empty());
}

// Lengths past each small format's limit take the next one: str 8 keys, bin 16 data,
// ext 16 payloads, map 16 with more than 15 children, uint 8/16 dims.
TEST(MsgpackWrite, WiderFormatsForLongerItems) {
  Variables v;
  const std::string long_key(40, 'k');
  for (int i = 0; i < 17; ++i) v.set("m/" + std::to_string(100 + i), Array(DType::U8, {1}, {static_cast<std::uint8_t>(i)}));
  v.set(long_key, Array(DType::U8, {300}, Bytes(300, 9)));
  v.set("z", Array(DType::U8, {200, 1}, Bytes(200, 1)));
  const Bytes b = linen::io::to_msgpack(v);
  EXPECT_EQ(parse(b), v);
  const Bytes str8 = Mp().raw({0xd9, 40}).append(Bytes(long_key.begin(), long_key.end())).b;
  EXPECT_NE(std::search(b.begin(), b.end(), str8.begin(), str8.end()), b.end());
  const Bytes u300 = Mp().raw({0xc8, 0x01, 0x3a, 0x01, 0x93, 0x91, 0xcd, 0x01, 0x2c, 0xa5}).b;  // ext 16 of 314 bytes
  EXPECT_NE(std::search(b.begin(), b.end(), u300.begin(), u300.end()), b.end());
  const Bytes bin16 = Mp().raw({0xc5, 0x01, 0x2c, 9, 9}).b;
  EXPECT_NE(std::search(b.begin(), b.end(), bin16.begin(), bin16.end()), b.end());
  const Bytes map16 = Mp().raw({0xa1, 'm', 0xde, 0x00, 0x11}).b;
  EXPECT_NE(std::search(b.begin(), b.end(), map16.begin(), map16.end()), b.end());
  const Bytes dims = Mp().raw({0x93, 0x92, 0xcc, 200, 0x01}).b;
  EXPECT_NE(std::search(b.begin(), b.end(), dims.begin(), dims.end()), b.end());
}

// flax.serialization._chunk, with MAX_CHUNK_SIZE = 8 bytes: float32 (2, 3) becomes 3
// flat chunks of int(8 / 4) = 2 elements.
TEST(MsgpackWrite, ChunksLargeArraysAsFlaxDoes) {
  Variables v;
  v.set("p/x", Array(DType::F32, {2, 3}, f32_bytes({0, 1, 2, 3, 4, 5})));
  v.set("p/small", Array(DType::F32, {2}, f32_bytes({6, 7})));  // 8 bytes: not more than the limit
  const auto chunk = [](std::initializer_list<float> xs) { return payload({xs.size()}, "float32", f32_bytes(xs)); };
  const Bytes expected = Mp()
                             .map(1)
                             .str("p")
                             .map(2)
                             .str("small")
                             .ext(1, payload({2}, "float32", f32_bytes({6, 7})))
                             .str("x")
                             .map(3)
                             .str("__msgpack_chunked_array__")
                             .t()
                             .str("shape")
                             .map(2)
                             .str("0")
                             .uint(2)
                             .str("1")
                             .uint(3)
                             .str("chunks")
                             .map(3)
                             .str("0")
                             .ext(1, chunk({0, 1}))
                             .str("1")
                             .ext(1, chunk({2, 3}))
                             .str("2")
                             .ext(1, chunk({4, 5}))
                             .b;
  EXPECT_EQ(linen::io::to_msgpack(v, 8), expected);
  EXPECT_EQ(parse(expected), v);
  // The last chunk is shorter; an item larger than the limit gives one element per chunk.
  Variables w;
  w.set("y", Array(DType::F64, {3}, Bytes(24, 0x11)));
  const Bytes b = linen::io::to_msgpack(w, 5);
  EXPECT_EQ(parse(b), w);
  const Bytes three_chunks = Mp().str("chunks").map(3).b;
  EXPECT_NE(std::search(b.begin(), b.end(), three_chunks.begin(), three_chunks.end()), b.end());
  Variables u;
  u.set("z", Array(DType::U8, {5}, {1, 2, 3, 4, 5}));
  const Bytes c = linen::io::to_msgpack(u, 2);
  EXPECT_EQ(parse(c), u);
  const Bytes last = Mp().str("2").ext(1, payload({1}, "uint8", {5})).b;  // chunks {1,2}, {3,4}, {5}
  EXPECT_NE(std::search(c.begin(), c.end(), last.begin(), last.end()), c.end());
  EXPECT_THROW(linen::io::to_msgpack(u, 0), std::invalid_argument);
}

TEST(MsgpackWrite, RefusesWhatTheReaderWouldRefuse) {
  auto write_error = [](const Variables& v) {
    try {
      linen::io::to_msgpack(v);
    } catch (const linen::io_error& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "to_msgpack accepted it";
    return std::string();
  };
  const Array one(DType::U8, {1}, {1});
  Variables prefix;
  prefix.set("a", one);
  prefix.set("a/b", one);
  EXPECT_NE(write_error(prefix).find("'a' is an array and also a prefix of 'a/b"), std::string::npos);
  Variables prefix2;
  prefix2.set("a/b", one);
  prefix2.set("a/b/c", one);
  prefix2.set("a-c", one);
  EXPECT_NE(write_error(prefix2).find("'a/b' is an array and also a prefix of 'a/b/c"), std::string::npos);
  Variables long_path;
  long_path.set(std::string(1025, 'x'), one);
  EXPECT_NE(write_error(long_path).find("longer than 1024 bytes"), std::string::npos);
  Variables deep;
  std::string p = "m";
  for (int i = 1; i < 65; ++i) p += "/m";
  deep.set(p, one);  // 65 components: 65 nested maps
  EXPECT_NE(write_error(deep).find("nests 65 maps deep"), std::string::npos);
  Variables bad_utf8;
  bad_utf8.set("a/\xff", one);
  EXPECT_NE(write_error(bad_utf8).find("not valid UTF-8"), std::string::npos);
  // 64 levels are fine, and read back.
  Variables ok;
  ok.set(p.substr(2), one);
  EXPECT_EQ(parse(linen::io::to_msgpack(ok)), ok);
}

TEST(MsgpackWrite, MetadataIsNotWritten) {
  Variables v;
  v.metadata["config"] = "{}";
  v.set("a", Array(DType::U8, {1}, {1}));
  const Variables back = parse(linen::io::to_msgpack(v));
  EXPECT_TRUE(back.metadata.empty());
  EXPECT_EQ(back.at("a"), v.at("a"));
}

class MsgpackFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("linen_test_msgpack_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(MsgpackFiles, SaveAndLoadBothFormats) {
  const Variables v = every_dtype();
  const std::string m = (dir_ / "v.msgpack").string(), s = (dir_ / "v.safetensors").string();
  linen::io::save_msgpack(m, v);
  linen::io::save_safetensors(s, v);
  EXPECT_EQ(read_file(m), linen::io::to_msgpack(v));
  EXPECT_EQ(linen::io::load_msgpack(m), v);
  EXPECT_EQ(linen::io::load_checkpoint(m), v);
  EXPECT_EQ(linen::io::load_checkpoint(s), v);
  linen::io::save_msgpack(m, Variables());  // replaces
  EXPECT_TRUE(linen::io::load_msgpack(m).empty());
}

TEST_F(MsgpackFiles, LoadCheckpointAgreesWithTheLoadersOnFiles) {
  const std::string key("ab\0\0\0\0{", 7);
  const Bytes m = Mp().map(1).str(key).ext(1, good_payload()).b;
  const std::string file = (dir_ / "odd.msgpack").string();
  {
    std::ofstream out(file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(m.data()), static_cast<std::streamsize>(m.size()));
  }
  EXPECT_EQ(linen::io::load_checkpoint(file), linen::io::load_msgpack(file));
  EXPECT_EQ(linen::io::read_checkpoint(file).format, linen::io::CheckpointFormat::msgpack);
  // A FIFO is refused at once, never waited on.
  const std::string fifo = (dir_ / "pipe").string();
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  for (auto load : {&linen::io::load_msgpack, &linen::io::load_checkpoint}) {
    const std::string msg = linen_test::io_error_message([&] { load(fifo); });
    EXPECT_NE(msg.find(fifo + ": not a regular file (a FIFO)"), std::string::npos) << msg;
  }
}

TEST_F(MsgpackFiles, FileErrorsNameTheFile) {
  const std::string missing = (dir_ / "missing.msgpack").string();
  for (auto load : {&linen::io::load_msgpack, &linen::io::load_checkpoint}) {
    try {
      load(missing);
      ADD_FAILURE() << "loaded a missing file";
    } catch (const linen::io_error& e) {
      EXPECT_NE(std::string(e.what()).find(missing + ": cannot open"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(linen::io::load_msgpack(dir_.string()), linen::io_error);
  EXPECT_THROW(linen::io::save_msgpack((dir_ / "no/such/dir.msgpack").string(), Variables()), linen::io_error);
  const std::string bad = (dir_ / "cut.msgpack").string();
  {
    const Bytes full = read_file(kFlaxDir + "/msgpack_f32.msgpack");
    std::ofstream out(bad, std::ios::binary);
    out.write(reinterpret_cast<const char*>(full.data()), 100);
  }
  for (auto load : {&linen::io::load_msgpack, &linen::io::load_checkpoint}) {
    try {
      load(bad);
      ADD_FAILURE() << "loaded a truncated file";
    } catch (const linen::io_error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(bad + ": byte 23, at 'params/query/kernel': truncated: msgpack ext type 1 of 1040 bytes, only 73 left"), std::string::npos) << msg;
    }
  }
}

// ---------------------------------------------------------------- valid images Flax or others may write

TEST(MsgpackRead, NumpyScalarExt3LoadsAsShapeEmpty) {
  const Bytes b = wrap_leaf(payload({}, "float64", Bytes{0, 0, 0, 0, 0, 0, 0xf8, 0x3f}), 3);
  const Variables v = parse(b);
  EXPECT_EQ(v.at("params/w").dtype(), DType::F64);
  EXPECT_EQ(v.at("params/w").shape(), Shape{});
  EXPECT_EQ(v.at("params/w").to_vector<double>(), std::vector<double>{1.5});
  // Written back as ext 1 of shape () (from_bytes gives a 0-d array; a jax array is saved so).
  const Bytes w = linen::io::to_msgpack(v);
  EXPECT_EQ(parse(w), v);
  EXPECT_EQ(w, wrap_leaf(payload({}, "float64", Bytes{0, 0, 0, 0, 0, 0, 0xf8, 0x3f}), 1));
}

TEST(MsgpackRead, EveryWidthOfEveryFormat) {
  // map 32, str 16/32 keys, ext 32, array 32 shape, uint 16/32/64 and int 8 dims,
  // dtype name as bin (msgpack.unpackb(raw=True) gives bytes either way), bin 32 data.
  Mp leaf;
  leaf.arr32(3).arr32(3).raw({0xcd, 0x00, 0x01}).raw({0xce, 0, 0, 0, 2}).raw({0xd0, 0x01});
  leaf.raw({0xc4, 5}).append(Bytes{'u', 'i', 'n', 't', '8'}).bin32({7, 8});
  Mp leaf2;
  leaf2.arr(3).arr(1).raw({0xcf, 0, 0, 0, 0, 0, 0, 0, 2}).raw({0xdb, 0, 0, 0, 4}).append(Bytes{'b', 'o', 'o', 'l'});
  leaf2.bin({1, 0});
  const Bytes b = Mp().map32(2).str16("a").ext32(1, leaf.b).str32("b").ext(1, leaf2.b).b;
  const Variables v = parse(b);
  EXPECT_EQ(v.at("a"), Array(DType::U8, {1, 2, 1}, {7, 8}));
  EXPECT_EQ(v.at("b"), Array(DType::BOOL, {2}, {1, 0}));
}

// TrainState.step and other Python numbers: msgpack ints, floats and bools as 0-d arrays.
TEST(MsgpackRead, NativeNumbersLoadAsZeroDimArrays) {
  const Bytes b = Mp()
                      .map(7)
                      .str("step")
                      .uint(1000)
                      .str("neg")
                      .raw({0xd1, 0xfc, 0x18})  // int 16: -1000
                      .str("big")
                      .uint(0xffffffffffffffffull)
                      .str("lr")
                      .raw({0xcb, 0x3f, 0x50, 0x62, 0x4d, 0xd2, 0xf1, 0xa9, 0xfc})  // 0.001
                      .str("f")
                      .raw({0xca, 0x3f, 0xc0, 0x00, 0x00})  // 1.5f
                      .str("flag")
                      .t()
                      .str("tiny")
                      .raw({0xe0})  // -32
                      .b;
  const Variables v = parse(b);
  EXPECT_EQ(v.at("step").dtype(), DType::I64);
  EXPECT_EQ(v.at("step").shape(), Shape{});
  EXPECT_EQ(v.at("step").to_vector<std::int64_t>(), std::vector<std::int64_t>{1000});
  EXPECT_EQ(v.at("neg").to_vector<std::int64_t>(), std::vector<std::int64_t>{-1000});
  EXPECT_EQ(v.at("tiny").to_vector<std::int64_t>(), std::vector<std::int64_t>{-32});
  EXPECT_EQ(v.at("big").dtype(), DType::U64);
  EXPECT_EQ(v.at("big").to_vector<std::uint64_t>(), std::vector<std::uint64_t>{0xffffffffffffffffull});
  EXPECT_EQ(v.at("lr").dtype(), DType::F64);
  EXPECT_EQ(v.at("lr").to_vector<double>(), std::vector<double>{0.001});
  EXPECT_EQ(v.at("f").dtype(), DType::F32);
  EXPECT_EQ(v.at("f").to_vector<float>(), std::vector<float>{1.5f});
  EXPECT_EQ(v.at("flag"), Array(DType::BOOL, {}, {1}));
  EXPECT_EQ(parse(linen::io::to_msgpack(v)), v);  // written back as ext 1 0-d arrays
}

TEST(MsgpackRead, EmptyMapsHoldNothing) {
  EXPECT_TRUE(parse(Mp().map(0).b).empty());
  const Variables v = parse(Mp().map(2).str("params").map(0).str("cache").map(1).str("w").ext(1, good_payload()).b);
  EXPECT_EQ(v.paths(), std::vector<std::string>{"cache/w"});
}

// Flax's reader accepts the chunk map in any key order and the chunks in any order
// of their keys; so does linen.
TEST(MsgpackRead, ChunkedArrayInAnyKeyOrder) {
  const Bytes b = Mp()
                      .map(1)
                      .str("emb")
                      .map(3)
                      .str("chunks")
                      .map(2)
                      .str("1")
                      .ext(1, payload({1}, "int16", {3, 0}))
                      .str("0")
                      .ext(1, payload({3}, "int16", {0, 0, 1, 0, 2, 0}))
                      .str("shape")
                      .map(2)
                      .str("1")
                      .uint(2)
                      .str("0")
                      .uint(2)
                      .str("__msgpack_chunked_array__")
                      .t()
                      .b;
  const Variables v = parse(b);
  EXPECT_EQ(v.at("emb"), Array(DType::I16, {2, 2}, {0, 0, 1, 0, 2, 0, 3, 0}));
  // A 0-d chunked array (shape {}) is one element.
  const Bytes s = Mp()
                      .map(1)
                      .str("s")
                      .map(3)
                      .str("__msgpack_chunked_array__")
                      .t()
                      .str("shape")
                      .map(0)
                      .str("chunks")
                      .map(1)
                      .str("0")
                      .ext(1, payload({1}, "uint8", {9}))
                      .b;
  EXPECT_EQ(parse(s).at("s"), Array(DType::U8, {}, {9}));
}

// ---------------------------------------------------------------- hostile images, one fault each

TEST(MsgpackMalformed, ValidBaseline) {
  const Variables v = parse(wrap_leaf(good_payload()));
  EXPECT_EQ(v.at("params/w"), Array(DType::F32, {2}, f32_bytes({1.0f, 2.0f})));
}

TEST(MsgpackMalformed, EmptyInput) {
  expect_fault({}, {at_root(0), "truncated: a msgpack value was expected, the input ends here"});
  EXPECT_THROW(linen::io::parse_msgpack(nullptr, 0), linen::io_error);
  EXPECT_THROW(linen::io::parse_msgpack(nullptr, 5), linen::io_error);
}

// Declared lengths beyond the bytes left are refused before anything is allocated.
TEST(MsgpackMalformed, DeclaredLengthsPastTheEndAllocateNothing) {
  struct Case {
    Bytes bytes;
    std::string fault;
  };
  const Case cases[] = {
      {{0xdf, 0xff, 0xff, 0xff, 0xff}, "truncated: msgpack map of 4294967295 entries need at least 8589934590 bytes, only 0 left"},
      {{0xdd, 0xff, 0xff, 0xff, 0xff}, "truncated: msgpack array of 4294967295 entries"},
      {Mp().map(1).raw({0xdb, 0xff, 0xff, 0xff, 0xff}).b, "truncated: msgpack str of 4294967295 bytes, only 0 left"},
      {Mp().map(1).str("a").raw({0xc6, 0xff, 0xff, 0xff, 0xf0, 1}).b, "truncated: msgpack bin of 4294967280 bytes, only 1 left"},
      {Mp().map(1).str("a").raw({0xc9, 0xff, 0xff, 0xff, 0xff, 0x01}).b, "truncated: msgpack ext type 1 of 4294967295 bytes, only 0 left"},
      {Mp().map(1).str("a").raw({0xde, 0xff, 0xff}).b, "truncated: msgpack map of 65535 entries"},
      // inside an ext payload: the payload's end is the limit, not the input's
      {Mp().map(1).str("a").ext(1, Mp().arr(3).arr32(0xffffffff).b).raw({1, 2, 3, 4, 5, 6, 7, 8}).b,
       "truncated: msgpack array of 4294967295 entries need at least 4294967295 bytes, only 0 left in the ext payload"},
      {Mp().map(1).str("a").ext(1, Mp().arr(3).arr(0).str("uint8").raw({0xc6, 0x7f, 0xff, 0xff, 0xff}).b).b,
       "truncated: msgpack bin of 2147483647 bytes, only 0 left in the ext payload"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.fault);
    g_largest = 0;
    g_track = true;
    const std::string msg = parse_error(c.bytes);
    g_track = false;
    EXPECT_NE(msg.find(c.fault), std::string::npos) << msg;
    EXPECT_LE(g_largest.load(), 1024u) << "an allocation of " << g_largest.load() << " bytes";
  }
  // The tracker sees real allocations: a valid 4000-byte array is copied once.
  const Bytes valid = wrap_leaf(payload({1000}, "float32", Bytes(4000, 1)));
  g_largest = 0;
  g_track = true;
  const Variables v = parse(valid);
  g_track = false;
  EXPECT_EQ(v.at("params/w").size(), 1000);
  EXPECT_GE(g_largest.load(), 4000u);
  EXPECT_LT(g_largest.load(), 2 * valid.size());
}

TEST(MsgpackMalformed, TruncatedScalarsAndLengthFields) {
  expect_fault({0xde, 0x00}, {at_root(0), "truncated: map 16 length needs 2 more bytes at byte 1, 1 left in the input"});
  expect_fault(Mp().map(1).str("a").raw({0xcb, 0, 0}).b, {at(3), "'a'", "truncated: float 64 needs 8 more bytes"});
  expect_fault(Mp().map(1).str("a").raw({0xc7}).b, {at(3), "truncated: ext 8 length"});
  expect_fault(Mp().map(1).str("a").raw({0xd4}).b, {at(3), "truncated: ext type needs 1 more bytes at byte 4"});
}

TEST(MsgpackMalformed, NestingDeeperThanTheLimit) {
  auto nested = [](int levels) {
    Mp m;
    for (int i = 1; i < levels; ++i) m.map(1).str("m");
    return m.map(1).str("w").ext(1, good_payload()).b;
  };
  EXPECT_EQ(parse(nested(64)).size(), 1u);  // 64 maps
  expect_fault(nested(65), {"maps and arrays nest deeper than 64"});
  // Depth inside a value that is only stepped over (an array never read as a tree).
  Mp m;
  m.map(1).str("a");
  for (int i = 0; i < 100000; ++i) m.arr(1);
  m.raw({0xc0});
  // The first pass steps over it without recursing past 64 levels; the second
  // refuses the array itself.
  expect_fault(m.b, {at(3), "'a'", "value is a msgpack array of 1, expected a map"});
  // A deep map inside a deep map: the error names the map at depth 65.
  expect_fault(nested(65), {at(192), "at 'm/m/m/m/m/m/m/m/m/m/", "...(127 bytes)': maps and arrays nest deeper than 64"});
}

TEST(MsgpackMalformed, UnknownAndUnsupportedExtTypes) {
  expect_fault(wrap_leaf(good_payload(), 7), {at(11), "'params/w'", "unknown ext type 7 (Flax writes 1 = ndarray, 3 = numpy scalar)"});
  expect_fault(wrap_leaf(good_payload(), -1), {"unknown ext type -1"});  // msgpack timestamp
  expect_fault(wrap_leaf(Mp().arr(2).raw({0xcb, 0, 0, 0, 0, 0, 0, 0, 0}).raw({0xcb, 0, 0, 0, 0, 0, 0, 0, 0}).b, 2),
               {"ext type 2 (Python complex) is not supported"});
}

TEST(MsgpackMalformed, ExtPayloadNotShapeDtypeData) {
  const Bytes f32 = f32_bytes({1.0f, 2.0f});
  expect_fault(wrap_leaf(Mp().map(0).b), {at(13), "'params/w'", "ext type 1 (ndarray) payload is a msgpack map of 0, expected an array [shape, dtype name, data]"});
  expect_fault(wrap_leaf(Mp().arr(2).arr(1).uint(2).str("float32").b), {"payload is a msgpack array of 2, expected"});
  expect_fault(wrap_leaf(Mp().arr(3).uint(2).str("float32").bin(f32).b), {"shape is a msgpack int, expected an array of ints"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).str("2").str("float32").bin(f32).b), {"shape dimension 0 is a msgpack str of 1 bytes, expected an int"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(2).uint(5).bin(f32).b), {"dtype name is a msgpack int, expected a str"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(2).str("float32").str("12345678").b), {"data is a msgpack str of 8 bytes, expected bin"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(2).str("float32").bin(f32).raw({0xc0}).b),
               {"1 trailing bytes inside the ext type 1 (ndarray) payload"});
  expect_fault(wrap_leaf(Bytes{}), {"truncated: a msgpack value was expected, the ext payload ends here"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(2).str("float32").b), {"the ext payload ends here"});
}

TEST(MsgpackMalformed, NegativeTooLargeOrOverflowingDims) {
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).raw({0xff}).str("uint8").bin({}).b), {"shape dimension 0 is negative: -1"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(2).uint(1).raw({0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0}).str("uint8").bin({}).b),
               {"shape dimension 1 is negative: -9223372036854775808"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(0x8000000000000000ull).str("uint8").bin({}).b),
               {"shape dimension 0 9223372036854775808 is too large"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(3).uint(1ull << 32).uint(1ull << 32).uint(1).str("uint8").bin({}).b),
               {"element count of shape (4294967296, 4294967296, 1) overflows"});
  expect_fault(wrap_leaf(Mp().arr(3).arr(1).uint(1ull << 62).str("float64").bin({}).b),
               {"byte count of shape (4611686018427387904,) overflows"});
  // A zero dim makes a huge product harmless.
  EXPECT_EQ(parse(wrap_leaf(Mp().arr(3).arr(3).uint(1ull << 40).uint(0).uint(1ull << 40).str("uint8").bin({}).b))
                .at("params/w")
                .size(),
            0);
}

TEST(MsgpackMalformed, DtypeOutsideTheAllowList) {
  for (const char* name : {"complex64", "float8_e4m3fn", "object", "int4", "", "Float32", "float32 "}) {
    SCOPED_TRACE(name);
    expect_fault(wrap_leaf(payload({1}, name, Bytes(4, 0))),
                 {"'params/w'", "dtype '" + std::string(name) + "' is not supported (supported: float16 bfloat16 float32"});
  }
  expect_fault(wrap_leaf(payload({1}, "\x01\xff", Bytes(4, 0))), {"dtype '\\x01\\xff' is not supported"});
}

TEST(MsgpackMalformed, ByteCountNotShapeTimesItemsize) {
  expect_fault(wrap_leaf(payload({2, 3}, "float32", Bytes(20, 0))),
               {at(26), "'params/w'", "of dtype float32 and shape (2, 3) needs 24 bytes of data, got 20"});
  expect_fault(wrap_leaf(payload({}, "int64", Bytes(9, 0))), {"shape () needs 8 bytes of data, got 9"});
  expect_fault(wrap_leaf(payload({0}, "bool", Bytes(1, 0))), {"shape (0,) needs 0 bytes of data, got 1"});
}

TEST(MsgpackMalformed, NumpyScalarWithAShape) {
  expect_fault(wrap_leaf(good_payload(), 3), {"ext type 3 (numpy scalar) has shape (2,), expected ()"});
}

Bytes chunked(const std::function<void(Mp&)>& body, std::uint64_t keys = 3) {
  Mp m;
  m.map(1).str("emb").map(keys);
  body(m);
  return m.b;
}
void marker(Mp& m) { m.str("__msgpack_chunked_array__").t(); }
void shape2(Mp& m) { m.str("shape").map(1).str("0").uint(2); }
void chunks2(Mp& m) { m.str("chunks").map(1).str("0").ext(1, payload({2}, "uint8", {1, 2})); }

TEST(MsgpackMalformed, ChunkedArrayMarkerNotTrue) {
  ASSERT_EQ(parse(chunked([](Mp& m) { marker(m); shape2(m); chunks2(m); })).at("emb"), Array(DType::U8, {2}, {1, 2}));
  expect_fault(chunked([](Mp& m) { m.str("__msgpack_chunked_array__").f(); shape2(m); chunks2(m); }),
               {at(32), "'emb'", "__msgpack_chunked_array__ is false, expected true"});
  expect_fault(chunked([](Mp& m) { m.str("__msgpack_chunked_array__").uint(1); shape2(m); chunks2(m); }),
               {"__msgpack_chunked_array__ is a msgpack int, expected true"});
}

TEST(MsgpackMalformed, ChunkedArrayWrongKeys) {
  expect_fault(chunked([](Mp& m) { marker(m); shape2(m); }, 2),
               {"'emb'", "chunked array map has 2 keys, expected exactly __msgpack_chunked_array__, shape, chunks"});
  expect_fault(chunked([](Mp& m) { marker(m); shape2(m); chunks2(m); m.str("dtype").str("uint8"); }, 4),
               {"chunked array map has 4 keys"});
  expect_fault(chunked([](Mp& m) { marker(m); shape2(m); m.str("chunk").map(0); }),
               {"chunked array map has key 'chunk', expected exactly"});
  expect_fault(chunked([](Mp& m) { marker(m); m.str("shape").arr(1).uint(2); chunks2(m); }),
               {"chunked array shape is a msgpack array of 1, expected a map"});
  expect_fault(chunked([](Mp& m) { marker(m); m.str("shape").map(1).str("1").uint(2); chunks2(m); }),
               {"chunked array shape map has key '1', expected the keys \"0\"..\"0\""});
  expect_fault(chunked([](Mp& m) { marker(m); m.str("shape").map(2).str("0").uint(1).str("01").uint(2); chunks2(m); }),
               {"chunked array shape map has key '01'"});
  expect_fault(chunked([](Mp& m) { marker(m); m.str("shape").map(1).str("0").raw({0xd0, 0xfe}); chunks2(m); }),
               {"chunked array shape dimension 0 is negative: -2"});
  expect_fault(chunked([](Mp& m) { marker(m); shape2(m); m.str("chunks").arr(1).ext(1, payload({2}, "uint8", {1, 2})); }),
               {"chunked array chunks is a msgpack array of 1, expected a map"});
  expect_fault(chunked([](Mp& m) { marker(m); shape2(m); m.str("chunks").map(0); }), {"chunked array has no chunks"});
}

TEST(MsgpackMalformed, ChunkedArrayBadChunks) {
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(2).str("0").ext(1, payload({1}, "uint8", {1})).str("1").ext(1, payload({1}, "int8", {2}));
               }),
               {"'emb'", "chunk 1 is int8, chunk 0 is uint8 (mixed dtypes)"});
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(2).str("0").ext(1, payload({2}, "uint8", {1, 2})).str("1").ext(1, payload({1}, "uint8", {3}));
               }),
               {"chunks hold 3 elements, shape (2,) needs 2"});
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(1).str("0").ext(1, payload({1, 2}, "uint8", {1, 2}));
               }),
               {"chunk 0 has shape (1, 2), expected a flat (1-D) chunk"});
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(1).str("0").ext(3, payload({}, "uint8", {1}));
               }),
               {"chunk 0 is a msgpack ext type 3 of 11 bytes, expected ext type 1 (ndarray)"});
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(2).str("0").ext(1, payload({1}, "uint8", {1})).str("0").ext(1, payload({1}, "uint8", {2}));
               }),
               {"chunked array chunks map repeats key '0'"});
  expect_fault(chunked([](Mp& m) {
                 marker(m);
                 shape2(m);
                 m.str("chunks").map(1).str("0").ext(1, payload({2}, "uint8", {1}));
               }),
               {"chunk 0 of dtype uint8 and shape (2,) needs 2 bytes of data, got 1"});
}

TEST(MsgpackMalformed, ChunkedRoot) {
  Mp m;
  m.map(3);
  marker(m);
  shape2(m);
  chunks2(m);
  expect_fault(m.b, {at_root(0), "the root map is a chunked array (__msgpack_chunked_array__)"});
}

TEST(MsgpackMalformed, DuplicateKeys) {
  expect_fault(Mp().map(2).str("w").ext(1, good_payload()).str("w").ext(1, good_payload()).b,
               {at_root(27), "duplicate map key 'w' (first at byte 1)"});
  expect_fault(Mp().map(1).str("p").map(3).str("a").map(0).str("b").map(0).str("a").map(0).b,
               {at(10), "'p'", "duplicate map key 'a' (first at byte 4)"});
}

TEST(MsgpackMalformed, MapKeysThatAreNotStrings) {
  expect_fault(Mp().map(1).uint(1).ext(1, good_payload()).b,
               {at_root(1), "map key is a msgpack int, expected a str (Flax state dict keys are strings)"});
  expect_fault(Mp().map(1).bin({'w'}).ext(1, good_payload()).b, {"map key is a msgpack bin of 1 bytes, expected a str"});
  expect_fault(Mp().map(1).str("p").map(1).raw({0xc0}).map(0).b, {at(4), "'p'", "map key is a msgpack nil"});
  expect_fault(Mp().map(1).map(0).map(0).b, {"map key is a msgpack map of 0"});
}

TEST(MsgpackMalformed, KeysThatWouldBreakPaths) {
  expect_fault(Mp().map(1).str("p").map(1).str("a/b").ext(1, good_payload()).b,
               {at(4), "'p'", "map key 'a/b' contains '/', which would alias another variable path"});
  expect_fault(Mp().map(1).str("").ext(1, good_payload()).b, {at_root(1), "empty map key"});
  expect_fault(Mp().map(1).str("a\xc3").ext(1, good_payload()).b, {at_root(3), "map key 'a\\xc3' is not valid UTF-8"});
  expect_fault(Mp().map(1).str("\xed\xa0\x80").ext(1, good_payload()).b, {"is not valid UTF-8"});  // a surrogate
  expect_fault(Mp().map(1).str("\xc0\xaf").ext(1, good_payload()).b, {"is not valid UTF-8"});      // overlong '/'
  expect_fault(Mp().map(1).str("__metadata__").ext(1, good_payload()).b,
               {"'__metadata__'", "not a valid variable path: '__metadata__' is reserved by safetensors"});
  EXPECT_EQ(parse(Mp().map(1).str("\xc3\xa9t\xc3\xa9").ext(1, good_payload()).b).paths(),
            std::vector<std::string>{"\xc3\xa9t\xc3\xa9"});  // "été" is fine
}

TEST(MsgpackMalformed, PathLongerThanTheLimit) {
  const std::string k(600, 'k');
  expect_fault(Mp().map(1).str(k).map(1).str(k).ext(1, good_payload()).b,
               {"the path through key 'kkk", "is 1201 bytes long, longer than the limit of 1024"});
  EXPECT_EQ(parse(Mp().map(1).str(k).map(1).str(std::string(423, 'k')).ext(1, good_payload()).b).size(), 1u);
}

TEST(MsgpackMalformed, TrailingBytesAfterTheRoot) {
  Bytes b = wrap_leaf(good_payload());
  const std::size_t n = b.size();
  b.push_back(0xc0);
  expect_fault(b, {at_root(n), "1 trailing bytes after the root map (which ends at byte " + std::to_string(n)});
  Bytes two = Mp().map(0).map(0).b;
  expect_fault(two, {at_root(1), "1 trailing bytes after the root map"});
}

TEST(MsgpackMalformed, RootNotAMap) {
  expect_fault(Mp().arr(0).b, {at_root(0), "the root is a msgpack array of 0, expected a map (Flax's state dict"});
  expect_fault(Mp().ext(1, good_payload()).b, {"the root is a msgpack ext type 1 of 21 bytes, expected a map"});
  expect_fault(Mp().uint(3).b, {"the root is a msgpack int"});
  expect_fault(Mp().str("params").b, {"the root is a msgpack str of 6 bytes"});
  expect_fault({0xc0}, {"the root is a msgpack nil"});
}

TEST(MsgpackMalformed, LeavesThatAreNotArraysOrNumbers) {
  const std::pair<Bytes, std::string> cases[] = {
      {{0xc0}, "msgpack nil"},
      {Mp().str("x").b, "msgpack str of 1 bytes"},
      {Mp().bin({1}).b, "msgpack bin of 1 bytes"},
      {Mp().arr(1).ext(1, good_payload()).b, "msgpack array of 1"},
  };
  for (const auto& [value, kind] : cases) {
    SCOPED_TRACE(kind);
    expect_fault(Mp().map(1).str("params").map(1).str("step").append(value).b,
                 {at(14), "'params/step'",
                  "value is a " + kind + ", expected a map (a collection or module), an array (ext type 1 or 3) or a number"});
  }
}

TEST(MsgpackMalformed, NeverUsedByteC1) {
  expect_fault(Mp().map(1).str("a").raw({0xc1}).b, {at(3), "'a'", "byte 0xc1 is not a msgpack format"});
  expect_fault({0xc1}, {at_root(0), "byte 0xc1"});
}

// ---------------------------------------------------------------- either format

TEST(Checkpoint, DetectsTheFormatByContent) {
  using linen::io::CheckpointFormat;
  for (const char* name : {"msgpack_f32", "msgpack_bf16"}) {
    const Bytes m = read_file(kFlaxDir + "/" + name + ".msgpack");
    const Bytes s = read_file(kFlaxDir + "/" + name + ".safetensors");
    EXPECT_EQ(linen::io::detect_checkpoint_format(m.data(), m.size()), CheckpointFormat::msgpack);
    EXPECT_EQ(linen::io::detect_checkpoint_format(s.data(), s.size()), CheckpointFormat::safetensors);
    EXPECT_EQ(linen::io::parse_checkpoint(m.data(), m.size()), parse(m));
    EXPECT_EQ(linen::io::parse_checkpoint(s.data(), s.size()), linen::io::parse_safetensors(s.data(), s.size()));
    // A truncated safetensors file is still told apart, and its own parser says what is wrong.
    EXPECT_EQ(linen::io::detect_checkpoint_format(s.data(), 9), CheckpointFormat::safetensors);
  }
  // A safetensors header length whose low byte looks like a msgpack map (0x85 = 133).
  const std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  std::string padded = header + std::string(133 - header.size(), ' ');
  Bytes st{0x85, 0, 0, 0, 0, 0, 0, 0};
  st.insert(st.end(), padded.begin(), padded.end());
  st.push_back(7);
  EXPECT_EQ(linen::io::detect_checkpoint_format(st.data(), st.size()), CheckpointFormat::safetensors);
  EXPECT_EQ(linen::io::parse_checkpoint(st.data(), st.size()).at("a"), Array(DType::U8, {1}, {7}));
  EXPECT_STREQ(linen::io::format_name(CheckpointFormat::msgpack), "msgpack");
  EXPECT_STREQ(linen::io::format_name(CheckpointFormat::safetensors), "safetensors");
}

TEST(Checkpoint, NeitherFormatThrowsNamingTheFirstBytes) {
  const Bytes junk{'G', 'I', 'F', '8', '9', 'a', 1, 2, 3, 4};
  try {
    linen::io::parse_checkpoint(junk.data(), junk.size(), "x.bin");
    ADD_FAILURE() << "parsed junk";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("x.bin: neither safetensors"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("10 bytes, starting 47 49 46 38 39 61 01 02 03"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(linen::io::parse_checkpoint(nullptr, 0), linen::io_error);
}

// A safetensors image: the 8-byte length of `header` (as given), the header, the data.
Bytes st_image(const std::string& header, const Bytes& data) {
  Bytes b(8);
  for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(header.size() >> (8 * i));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

TEST(Checkpoint, WhatSafetensorsAcceptsLoadCheckpointAccepts) {
  // A header length of 0x80 = 128 starts like a msgpack fixmap, and JSON may start with
  // whitespace: parse_safetensors accepts it, so parse_checkpoint must too.
  const std::string entry = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  for (const std::string& lead : {std::string(" \n"), std::string("\t"), std::string(128 - entry.size(), ' ')}) {
    std::string header = lead + entry;
    header.append(128 - std::min<std::size_t>(128, header.size()), ' ');
    ASSERT_EQ(header.size(), 128u);
    const Bytes st = st_image(header, {7});
    ASSERT_EQ(st[0], 0x80);
    const Variables want = linen::io::parse_safetensors(st.data(), st.size());
    EXPECT_EQ(linen::io::parse_checkpoint(st.data(), st.size()), want);
    EXPECT_EQ(linen::io::read_checkpoint(st.data(), st.size()).format, linen::io::CheckpointFormat::safetensors);
  }
}

TEST(Checkpoint, WhatMsgpackAcceptsLoadCheckpointAccepts) {
  // A root map whose first key ("ab\0\0\0\0{") puts zeros at bytes 4-7 and '{' at byte
  // 8: by its first bytes it could be safetensors (a header length of 0x6261a781).
  const std::string key("ab\0\0\0\0{", 7);
  const Bytes m = Mp().map(1).str(key).ext(1, good_payload()).b;
  ASSERT_EQ(m[4], 0);
  ASSERT_EQ(m[8], '{');
  const Variables want = parse(m);
  EXPECT_EQ(linen::io::parse_checkpoint(m.data(), m.size()), want);
  EXPECT_EQ(linen::io::read_checkpoint(m.data(), m.size()).format, linen::io::CheckpointFormat::msgpack);
}

TEST(Checkpoint, AFileNeitherLoaderAcceptsGetsBothReasons) {
  // Looks like safetensors (but its header is not JSON) and starts with a map byte (but
  // is not a msgpack map of variables).
  const Bytes bad = st_image(std::string(0x85, 'x'), {});
  const std::string msg = linen_test::io_error_message([&] { linen::io::parse_checkpoint(bad.data(), bad.size(), "b.ckpt"); });
  EXPECT_NE(msg.find("b.ckpt: not a checkpoint linen can read"), std::string::npos) << msg;
  EXPECT_NE(msg.find("as safetensors: b.ckpt: header is not valid JSON"), std::string::npos) << msg;
  EXPECT_NE(msg.find("as Flax msgpack: b.ckpt: byte 1: map key is a msgpack int"), std::string::npos) << msg;
  // Neither look: still both reasons, after the first bytes.
  const Bytes junk{'G', 'I', 'F', '8', '9', 'a', 1, 2, 3, 4};
  const std::string j = linen_test::io_error_message([&] { linen::io::parse_checkpoint(junk.data(), junk.size(), "x.bin"); });
  EXPECT_NE(j.find("as safetensors: x.bin: header length"), std::string::npos) << j;
  EXPECT_NE(j.find("as Flax msgpack: x.bin: byte 0: the root is a msgpack"), std::string::npos) << j;
}

TEST(Checkpoint, UnusedPathsListsWhatNoPrefixCovers) {
  Variables v;
  const Array one(DType::U8, {1}, {1});
  for (const char* p : {"params/enc/attn/query/kernel", "params/enc/attn/out/bias", "params/enc/attn_1/x",
                        "params/embed/embedding", "cache/enc/attn/cache_index", "batch_stats/bn/mean"})
    v.set(p, one);
  EXPECT_EQ(linen::io::unused_paths(v, {"params/enc/attn", "cache/enc/attn/"}),
            (std::vector<std::string>{"batch_stats/bn/mean", "params/embed/embedding", "params/enc/attn_1/x"}));
  EXPECT_EQ(linen::io::unused_paths(v, {"params", "cache", "batch_stats/bn/mean"}), std::vector<std::string>{});
  EXPECT_EQ(linen::io::unused_paths(v, {""}), std::vector<std::string>{});
  EXPECT_EQ(linen::io::unused_paths(v, {}).size(), v.size());
  EXPECT_EQ(linen::io::unused_paths(v, {"params/enc/att"}).size(), v.size());  // not a component boundary
}

TEST(Checkpoint, ListTensorsTable) {
  Variables v;
  v.set("cache/cache_index", Array(DType::I32, {}, {3, 0, 0, 0}));
  v.set("params/out/bias", Array(DType::BF16, {16}, Bytes(32, 0)));
  v.set("params/query/kernel", Array(DType::F32, {16, 4, 4}, Bytes(1024, 0)));
  EXPECT_EQ(linen::io::list_tensors(v),
            "path                 dtype     shape       bytes\n"
            "cache/cache_index    int32     ()              4\n"
            "params/out/bias      bfloat16  (16,)          32\n"
            "params/query/kernel  float32   (16, 4, 4)   1024\n"
            "3 arrays, 1060 bytes\n");
  EXPECT_EQ(linen::io::list_tensors(Variables()),
            "path  dtype  shape  bytes\n"
            "0 arrays, 0 bytes\n");
  const Variables m = linen::io::load_msgpack(kFlaxDir + "/msgpack_f32.msgpack");
  const std::string table = linen::io::list_tensors(m);
  EXPECT_NE(table.find("params/query/kernel  float32  (16, 4, 4)     1024\n"), std::string::npos) << table;
  EXPECT_NE(table.find("\n11 arrays, 6404 bytes\n"), std::string::npos) << table;
}

}  // namespace

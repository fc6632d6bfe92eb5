// SPDX-License-Identifier: Apache-2.0
// Tests for linen/io/safetensors.hpp: the Flax fixtures, round trips, and every kind
// of malformed file (built byte by byte here, so each test shows its fault).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <linen/io/safetensors.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

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

std::string fixture(const std::string& name) { return kFlaxDir + "/" + name + ".safetensors"; }

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A safetensors image: 8-byte length (default: the header's real length), header, data.
Bytes image(const std::string& header, const Bytes& data = {}, std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  Bytes out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Variables parse(const Bytes& b, const std::string& name = "bad.safetensors") {
  return linen::io::parse_safetensors(b.data(), b.size(), name);
}

// The io_error message of parsing `b`; fails the test if it parses or throws anything else.
std::string parse_error(const Bytes& b) {
  return linen_test::io_error_message([&] { parse(b); });
}

// Parsing `b` throws io_error naming the file and every part.
void expect_fault(const Bytes& b, std::initializer_list<std::string> parts) {
  const std::string msg = parse_error(b);
  EXPECT_NE(msg.find("bad.safetensors: "), std::string::npos) << msg;
  for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nlacks: " << p;
}

// One entry of a header.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// ---------------------------------------------------------------- the Flax fixtures

std::vector<std::string> fixture_files() {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(kFlaxDir))
    if (e.path().extension() == ".safetensors") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(SafetensorsFixtures, EveryFixtureLoads) {
  const auto files = fixture_files();
  ASSERT_GE(files.size(), 34u) << "fixtures missing from " << kFlaxDir;
  for (const auto& f : files) {
    SCOPED_TRACE(f);
    const Variables v = linen::io::load_safetensors(f);
    EXPECT_FALSE(v.empty());
    EXPECT_EQ(v.metadata.at("case"), fs::path(f).stem().string());
    EXPECT_EQ(v.metadata.at("flax"), "0.12.10");
    EXPECT_EQ(v.metadata.at("jax"), "0.11.2");
    for (const auto& [path, a] : v) {
      EXPECT_EQ(static_cast<Index>(a.bytes().size()), a.size() * static_cast<Index>(linen::io::itemsize(a.dtype())))
          << path;
      if (a.dtype() == DType::BOOL) {
        EXPECT_NO_THROW(a.to_vector<bool>(path));  // every byte is 0/1
      }
    }
  }
}

TEST(SafetensorsFixtures, KnownShapesAndValues) {
  const Variables basic = linen::io::load_safetensors(fixture("self_basic"));
  EXPECT_EQ(basic.at("params/query/kernel").shape(), (Shape{16, 4, 4}));
  EXPECT_EQ(basic.at("params/query/kernel").dtype(), DType::F32);
  EXPECT_EQ(basic.at("params/out/kernel").shape(), (Shape{4, 4, 16}));
  EXPECT_EQ(basic.at("params/out/bias").shape(), (Shape{16}));
  EXPECT_EQ(basic.at("inputs/q").shape(), (Shape{2, 5, 16}));
  EXPECT_FALSE(basic.contains("cache/cache_index"));
  EXPECT_THROW(basic.subtree("cache"), linen::io_error);
  EXPECT_EQ(basic.subtree("params").size(), 8u);
  EXPECT_EQ(basic.metadata.at("module"), "SelfAttention");
  EXPECT_EQ(basic.metadata.at("config"), "{\"num_heads\": 4}");
  // First values as Python's struct.unpack('<f') reads them.
  const auto qk = basic.get<float, 3>("params/query/kernel", {16, 4, 4});
  EXPECT_EQ(qk(0, 0, 0), 0.22489160299301147f);
  EXPECT_EQ(qk(0, 0, 1), -0.0591658316552639f);
  EXPECT_EQ(qk(0, 1, 2), 0.4931184649467468f);

  const Variables decode = linen::io::load_safetensors(fixture("decode_basic"));
  const Array& ci = decode.at("cache/cache_index");
  EXPECT_EQ(ci.dtype(), DType::I32);
  EXPECT_EQ(ci.shape(), Shape{});
  EXPECT_EQ((decode.get<std::int32_t, 0>("cache/cache_index", {})()), std::stoi(decode.metadata.at("steps")));
  EXPECT_EQ(decode.at("cache/cached_key").shape(), (Shape{2, 8, 4, 4}));

  const Variables f16 = linen::io::load_safetensors(fixture("self_f16"));
  EXPECT_EQ(f16.at("params/out/bias").dtype(), DType::F16);
  const auto ob = f16.get<float, 1>("params/out/bias", {16});
  EXPECT_EQ(ob(0), 0.278564453125f);
  EXPECT_EQ(ob(1), -0.4482421875f);

  const Variables bf16 = linen::io::load_safetensors(fixture("msgpack_bf16"));
  EXPECT_EQ(bf16.at("params/out/bias").dtype(), DType::BF16);
  const auto bb = bf16.get<float, 1>("params/out/bias", {16});
  EXPECT_EQ(bb(0), 0.125f);         // bits 0x3e00
  EXPECT_EQ(bb(7), -0.478515625f);  // bits 0xbef5
  EXPECT_EQ(bf16.at("inputs/q").dtype(), DType::F32);

  const Variables f64 = linen::io::load_safetensors(fixture("self_f64_causal"));
  const auto out = f64.get<double, 3>("output", {2, 9, 32});
  EXPECT_EQ(out(0, 0, 0), -0.08816239930101277);
  EXPECT_EQ(out(0, 0, 1), -2.0325088797143542);

  const Variables prng = linen::io::load_safetensors(fixture("prng_reference"));
  EXPECT_EQ(prng.at("key123").dtype(), DType::U32);
  EXPECT_EQ(prng.at("key123").to_vector<std::uint32_t>(), (std::vector<std::uint32_t>{0, 123}));
  EXPECT_EQ(prng.at("key0").to_vector<std::uint32_t>(), (std::vector<std::uint32_t>{0, 0}));
  EXPECT_EQ(prng.at("bits0_8").to_vector<std::uint32_t>()[0], 4070199207u);
  EXPECT_THROW(prng.at("bits0_8").to_vector<std::int32_t>(), linen::io_error);  // 4070199207 > INT32_MAX
  EXPECT_EQ(prng.at("split0_3").shape(), (Shape{3, 2}));

  const Variables drop = linen::io::load_safetensors(fixture("dropout_full"));
  EXPECT_EQ(drop.at("dropout/key_data").to_vector<std::uint32_t>(), (std::vector<std::uint32_t>{0, 42}));
  EXPECT_EQ(drop.at("dropout/keep").shape(), (Shape{2, 2, 6, 6}));

  // self_causal's mask is make_causal_mask: key j visible from query i iff j <= i.
  const Variables causal = linen::io::load_safetensors(fixture("self_causal"));
  const auto m = causal.get<bool, 4>("mask", {2, 1, 6, 6});
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 6; ++i)
      for (Index j = 0; j < 6; ++j) EXPECT_EQ(m(b, 0, i, j), j <= i) << b << " " << i << " " << j;
}

TEST(SafetensorsFixtures, RoundTripKeepsTensorsAndDataBytes) {
  for (const auto& f : fixture_files()) {
    SCOPED_TRACE(f);
    const Bytes original = read_file(f);
    const Variables v = linen::io::parse_safetensors(original.data(), original.size(), f);
    const Bytes written = linen::io::to_safetensors(v);
    EXPECT_EQ(linen::io::to_safetensors(v), written);  // deterministic
    const Variables back = linen::io::parse_safetensors(written.data(), written.size());
    EXPECT_EQ(back, v);
    EXPECT_EQ(linen::io::to_safetensors(back), written);
    // The fixtures lay their data out sorted by name too: the data sections are identical.
    std::uint64_t n0 = 0, n1 = 0;
    for (int i = 0; i < 8; ++i) {
      n0 |= static_cast<std::uint64_t>(original[static_cast<std::size_t>(i)]) << (8 * i);
      n1 |= static_cast<std::uint64_t>(written[static_cast<std::size_t>(i)]) << (8 * i);
    }
    EXPECT_EQ(n1 % 8, 0u);
    EXPECT_TRUE(std::equal(original.begin() + static_cast<std::ptrdiff_t>(8 + n0), original.end(),
                           written.begin() + static_cast<std::ptrdiff_t>(8 + n1), written.end()));
  }
}

TEST(SafetensorsFixtures, EveryTruncatedPrefixThrows) {
  const Bytes full = read_file(fixture("dpa_nobatch"));
  ASSERT_GT(full.size(), 1000u);
  EXPECT_NO_THROW(parse(full));
  for (std::size_t len = 0; len < full.size(); ++len) {
    const Bytes prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(parse(prefix), linen::io_error) << "prefix of " << len << " bytes";
  }
}

TEST(SafetensorsFixtures, RandomCorruptionsThrowIoErrorOrParse) {
  const Bytes full = read_file(fixture("self_nobias"));
  std::mt19937 rng(12345);
  int parsed = 0, refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Bytes b = full;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      // Mostly hit the length and the header, where the structure is.
      const std::size_t limit = (rng() % 4 == 0) ? b.size() : std::min<std::size_t>(b.size(), 8 + 640);
      const std::size_t pos = rng() % limit;
      switch (rng() % 3) {
        case 0:
          b[pos] = static_cast<std::uint8_t>(rng());
          break;
        case 1:
          b[pos] = static_cast<std::uint8_t>("0123456789[]{}\",:-.e "[rng() % 21]);
          break;
        default:
          b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos));
          break;
      }
    }
    try {
      parse(b);
      ++parsed;
    } catch (const linen::io_error&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 2000);
  EXPECT_EQ(parsed + refused, 3000);
}

// ---------------------------------------------------------------- writing

Variables every_dtype() {
  Variables v;
  std::mt19937 rng(7);
  int k = 0;
  for (DType d : linen::io::kAllDTypes) {
    const Shape shapes[] = {{}, {3}, {2, 0, 4}, {2, 3, 2}};
    for (const Shape& s : shapes) {
      const Index n = linen::num_elements(s);
      Bytes b(static_cast<std::size_t>(n) * linen::io::itemsize(d));
      for (auto& x : b) x = static_cast<std::uint8_t>(d == DType::BOOL ? rng() % 2 : rng());
      v.set(std::string(linen::io::safetensors_name(d)) + "/t" + std::to_string(k++ % 4), Array(d, s, b));
    }
  }
  return v;
}

TEST(SafetensorsWrite, RoundTripEveryDtype) {
  const Variables v = every_dtype();
  ASSERT_EQ(v.size(), 13u * 4u);
  const Bytes img = linen::io::to_safetensors(v);
  const Variables back = parse(img);
  EXPECT_EQ(back, v);
  for (const auto& [path, a] : v) {
    EXPECT_EQ(back.at(path).dtype(), a.dtype()) << path;
    EXPECT_EQ(back.at(path).shape(), a.shape()) << path;
    EXPECT_EQ(back.at(path).bytes(), a.bytes()) << path;
  }
  EXPECT_TRUE(back.metadata.empty());
}

TEST(SafetensorsWrite, LayoutSortedContiguousPaddedWithSpaces) {
  Variables v = every_dtype();
  v.metadata["format"] = "flax";
  v.metadata["note"] = "ünïcode \"quoted\"";
  const Bytes img = linen::io::to_safetensors(v);
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(img[static_cast<std::size_t>(i)]) << (8 * i);
  ASSERT_EQ(n % 8, 0u);
  const std::string header(img.begin() + 8, img.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  const auto last = header.find_last_not_of(' ');
  EXPECT_EQ(header[last], '}');
  EXPECT_LT(header.size() - last - 1, 8u);  // at most 7 spaces
  const auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["__metadata__"]["format"], "flax");
  EXPECT_EQ(j["__metadata__"]["note"], "ünïcode \"quoted\"");
  std::uint64_t pos = 0;
  for (const auto& [path, a] : v) {  // in path order
    const auto& e = j.at(path);
    EXPECT_EQ(e["dtype"], linen::io::safetensors_name(a.dtype()));
    EXPECT_EQ(e["shape"].get<Shape>(), a.shape());
    EXPECT_EQ(e["data_offsets"][0].get<std::uint64_t>(), pos) << path;
    pos += a.bytes().size();
    EXPECT_EQ(e["data_offsets"][1].get<std::uint64_t>(), pos) << path;
    EXPECT_TRUE(std::equal(a.bytes().begin(), a.bytes().end(),
                           img.begin() + static_cast<std::ptrdiff_t>(8 + n + pos - a.bytes().size())));
  }
  EXPECT_EQ(img.size(), 8 + n + pos);
  EXPECT_EQ(parse(img), v);
}

TEST(SafetensorsWrite, ExactBytesOfASmallFile) {
  Variables v;
  v.set("b", Array(DType::U8, {2}, {7, 9}));
  Tensor<float, 0> s;
  s() = 1.0f;
  v.set("a", s);
  const Bytes img = linen::io::to_safetensors(v);
  const std::string h =
      "{\"a\":{\"data_offsets\":[0,4],\"dtype\":\"F32\",\"shape\":[]},"
      "\"b\":{\"data_offsets\":[4,6],\"dtype\":\"U8\",\"shape\":[2]}}";
  std::string padded = h + std::string((8 - h.size() % 8) % 8, ' ');
  EXPECT_EQ(img, image(padded, {0, 0, 0x80, 0x3F, 7, 9}));
  // No tensors: "{}" padded to 8.
  EXPECT_EQ(linen::io::to_safetensors(Variables()), image("{}      "));
  EXPECT_TRUE(parse(image("{}      ")).empty());
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("linen_test_safetensors_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(TempDir, SaveAndLoadFile) {
  Variables v = linen::io::load_safetensors(fixture("self_nobias"));
  v.set("extra/flag", Array(DType::BOOL, {2}, {1, 0}));
  const std::string f = (dir_ / "v.safetensors").string();
  linen::io::save_safetensors(f, v);
  EXPECT_EQ(linen::io::load_safetensors(f), v);
  EXPECT_EQ(read_file(f), linen::io::to_safetensors(v));
  linen::io::save_safetensors(f, Variables());  // replaces
  EXPECT_TRUE(linen::io::load_safetensors(f).empty());
}

TEST_F(TempDir, FileErrorsNameTheFile) {
  const std::string missing = (dir_ / "missing.safetensors").string();
  try {
    linen::io::load_safetensors(missing);
    ADD_FAILURE() << "loaded a missing file";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  EXPECT_THROW(linen::io::load_safetensors(dir_.string()), linen::io_error);
  EXPECT_THROW(linen::io::save_safetensors((dir_ / "no/such/dir.safetensors").string(), Variables()), linen::io_error);
  const std::string bad = (dir_ / "truncated.safetensors").string();
  {
    std::ofstream out(bad, std::ios::binary);
    out << "abc";
  }
  try {
    linen::io::load_safetensors(bad);
    ADD_FAILURE() << "loaded a 3-byte file";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find(bad + ": 3 bytes"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------- malformed images, one fault each

const std::string kGood = "{" + entry("a", "U8", "[4]", 0, 4) + "}";
const Bytes kData4 = {1, 2, 3, 4};

TEST(SafetensorsMalformed, ValidBaseline) {
  const Variables v = parse(image(kGood, kData4));
  EXPECT_EQ(v.at("a").bytes(), kData4);
  EXPECT_EQ(parse(image("  " + kGood + "\n\t ", kData4)).size(), 1u);  // JSON whitespace around
}

TEST(SafetensorsMalformed, ShorterThanEightBytes) {
  for (std::size_t n = 0; n < 8; ++n) expect_fault(Bytes(n, 0), {std::to_string(n) + " bytes", "8-byte"});
  EXPECT_THROW(linen::io::parse_safetensors(nullptr, 0), linen::io_error);
}

TEST(SafetensorsMalformed, HeaderLengthPastEndOfFile) {
  expect_fault(image(kGood, kData4, kGood.size() + 5), {"header length", "past the end"});
  expect_fault(image("", {}, 1), {"header length 1", "8 bytes"});
  expect_fault(image(kGood, kData4, 100'000'000), {"header length 100000000", "past the end"});
}

TEST(SafetensorsMalformed, HeaderLengthOver100MB) {
  expect_fault(image(kGood, kData4, 100'000'001), {"100000001", "exceeds the limit of 100000000"});
  expect_fault(image(kGood, kData4, std::numeric_limits<std::uint64_t>::max()), {"18446744073709551615", "limit"});
  expect_fault(image(kGood, kData4, std::uint64_t{1} << 63), {"limit"});
}

TEST(SafetensorsMalformed, HeaderNotValidJson) {
  for (const std::string h : {"{", "{\"a\":}", "{'a': 1}", "", "{}x", "{} {}", "{\"a\":[1,2,]}", "\x80\x81"})
    expect_fault(image(h), {"not valid JSON"});
  expect_fault(image(std::string("{\"a\xff\":1}")), {"not valid JSON"});  // invalid UTF-8
  expect_fault(image(std::string("{}\0\0\0\0\0\0", 8)), {"not valid JSON", "NUL byte at header offset 2"});
  expect_fault(image(std::string("{}\0{\"a\":", 7)), {"NUL byte"});  // nothing may hide behind a NUL
}

TEST(SafetensorsMalformed, HeaderNotAnObject) {
  for (const std::string h : {"[]", "[1,2]", "\"text\"", "3", "null", "true"})
    expect_fault(image(h), {"header must be a JSON object"});
}

TEST(SafetensorsMalformed, EntryNotAnObject) {
  expect_fault(image("{\"a\":3}"), {"tensor 'a'", "must be an object", "number"});
  expect_fault(image("{\"a\":[\"U8\",[4],[0,4]]}", kData4), {"tensor 'a'", "must be an object", "array"});
  expect_fault(image("{\"a\":\"U8\"}"), {"must be an object", "string"});
}

TEST(SafetensorsMalformed, EntryMissingAField) {
  expect_fault(image("{\"a\":{\"shape\":[4],\"data_offsets\":[0,4]}}", kData4), {"tensor 'a'", "no 'dtype'"});
  expect_fault(image("{\"a\":{\"dtype\":\"U8\",\"data_offsets\":[0,4]}}", kData4), {"tensor 'a'", "no 'shape'"});
  expect_fault(image("{\"a\":{\"dtype\":\"U8\",\"shape\":[4]}}", kData4), {"tensor 'a'", "no 'data_offsets'"});
  expect_fault(image("{\"a\":{}}"), {"no 'dtype'"});
}

TEST(SafetensorsMalformed, EntryFieldsOfWrongType) {
  const auto with = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return image("{\"a\":{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}}", kData4);
  };
  expect_fault(with("5", "[4]", "[0,4]"), {"'dtype' must be a string", "number"});
  expect_fault(with("null", "[4]", "[0,4]"), {"'dtype' must be a string", "null"});
  expect_fault(with("\"U8\"", "4", "[0,4]"), {"'shape' must be an array", "number"});
  expect_fault(with("\"U8\"", "{\"0\":4}", "[0,4]"), {"'shape' must be an array", "object"});
  expect_fault(with("\"U8\"", "[4.0]", "[0,4]"), {"non-integer dimension 4.0"});
  expect_fault(with("\"U8\"", "[\"4\"]", "[0,4]"), {"non-integer dimension \"4\""});
  expect_fault(with("\"U8\"", "[true]", "[0,4]"), {"non-integer dimension true"});
  expect_fault(with("\"U8\"", "[4]", "\"0-4\""), {"'data_offsets' must be an array [begin, end]"});
  expect_fault(with("\"U8\"", "[4]", "[4]"), {"'data_offsets' must be an array [begin, end]", "[4]"});
  expect_fault(with("\"U8\"", "[4]", "[0,2,4]"), {"'data_offsets' must be an array [begin, end]"});
  expect_fault(with("\"U8\"", "[4]", "[0,4.0]"), {"non-negative integers"});
  expect_fault(with("\"U8\"", "[4]", "[-1,3]"), {"non-negative integers"});
  expect_fault(with("\"U8\"", "[4]", "[0,\"4\"]"), {"non-negative integers"});
  expect_fault(with("\"U8\"", "[[4]]", "[0,4]"), {"nests deeper"});
}

TEST(SafetensorsMalformed, DuplicateTensorNames) {
  const std::string h = "{" + entry("a", "U8", "[2]", 0, 2) + "," + entry("a", "U8", "[2]", 2, 4) + "}";
  expect_fault(image(h, kData4), {"duplicate tensor name 'a'"});
  // Inside an entry and inside __metadata__ too (nlohmann alone would keep the last one).
  expect_fault(image("{\"a\":{\"dtype\":\"U8\",\"dtype\":\"I8\",\"shape\":[4],\"data_offsets\":[0,4]}}", kData4),
               {"duplicate key 'dtype'"});
  expect_fault(image("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"), {"duplicate key 'k'"});
  expect_fault(image("{\"__metadata__\":{},\"__metadata__\":{}}"), {"duplicate tensor name '__metadata__'"});
  // Same name spelled with an escape is the same name.
  const std::string esc = "{" + entry("a", "U8", "[2]", 0, 2) + "," + entry("\\u0061", "U8", "[2]", 2, 4) + "}";
  expect_fault(image(esc, kData4), {"duplicate tensor name 'a'"});
}

TEST(SafetensorsMalformed, UnknownDtype) {
  for (const std::string d : {"F8_E4M3", "f32", "", "FLOAT32", "C64", "U1"})
    expect_fault(image("{" + entry("a", d, "[4]", 0, 4) + "}", kData4), {"tensor 'a'", "unknown dtype '" + d + "'"});
}

TEST(SafetensorsMalformed, NegativeDims) {
  expect_fault(image("{" + entry("a", "U8", "[-4]", 0, 4) + "}", kData4), {"tensor 'a'", "negative", "-4"});
  expect_fault(image("{" + entry("a", "U8", "[-2,-2]", 0, 4) + "}", kData4), {"negative"});
  expect_fault(image("{" + entry("a", "U8", "[0,-1]", 0, 0) + "}"), {"negative"});
}

TEST(SafetensorsMalformed, DimsWhoseProductOverflows) {
  expect_fault(image("{" + entry("a", "U8", "[4294967296,4294967296]", 0, 4) + "}", kData4),
               {"tensor 'a'", "element count", "overflows"});
  expect_fault(image("{" + entry("a", "F64", "[2305843009213693952]", 0, 4) + "}", kData4),  // 2^61 * 8 bytes
               {"byte count", "overflows"});
  expect_fault(image("{" + entry("a", "U8", "[18446744073709551615]", 0, 4) + "}", kData4), {"too large"});
  expect_fault(image("{" + entry("a", "U8", "[99999999999999999999]", 0, 4) + "}", kData4),
               {"non-integer"});  // beyond uint64: JSON gives a float
  // A zero dim makes the product 0 even with huge dims around it.
  const Variables z = parse(image("{" + entry("a", "U8", "[4294967296,0,4294967296]", 0, 0) + "}"));
  EXPECT_EQ(z.at("a").size(), 0);
}

TEST(SafetensorsMalformed, ByteCountNotShapeTimesItemsize) {
  expect_fault(image("{" + entry("a", "F32", "[2]", 0, 4) + "}", kData4), {"tensor 'a'", "needs 8 bytes", "hold 4"});
  expect_fault(image("{" + entry("a", "U8", "[2,3]", 0, 4) + "}", kData4), {"needs 6 bytes"});
  expect_fault(image("{" + entry("a", "BF16", "[]", 0, 4) + "}", kData4), {"needs 2 bytes"});
}

TEST(SafetensorsMalformed, OffsetsOutOfBounds) {
  expect_fault(image("{" + entry("a", "U8", "[8]", 0, 8) + "}", kData4),
               {"tensor 'a'", "past the end of the data (4 bytes)"});
  expect_fault(image("{" + entry("a", "U8", "[1]", 18446744073709551614ull, 18446744073709551615ull) + "}", kData4),
               {"past the end"});
}

TEST(SafetensorsMalformed, BeginAfterEnd) {
  expect_fault(image("{" + entry("a", "U8", "[0]", 4, 0) + "}", kData4), {"tensor 'a'", "begin > end"});
}

TEST(SafetensorsMalformed, OverlappingRanges) {
  const Bytes data(12, 0);
  expect_fault(image("{" + entry("a", "U8", "[8]", 0, 8) + "," + entry("b", "U8", "[8]", 4, 12) + "}", data),
               {"'b' [4, 12) overlaps 'a' [0, 8)"});
  // The same range twice.
  expect_fault(image("{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("b", "U8", "[4]", 0, 4) + "}", kData4),
               {"overlaps"});
  // An empty tensor inside another's range.
  expect_fault(image("{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("b", "U8", "[0]", 2, 2) + "}", kData4),
               {"overlaps"});
}

TEST(SafetensorsMalformed, GapsBetweenRanges) {
  const Bytes data(12, 0);
  expect_fault(image("{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("b", "U8", "[4]", 8, 12) + "}", data),
               {"gap of 4 bytes", "'b' [8, 12)"});
  expect_fault(image("{" + entry("a", "U8", "[2]", 2, 4) + "}", kData4), {"gap of 2 bytes"});  // not at 0
}

TEST(SafetensorsMalformed, TrailingBytes) {
  expect_fault(image(kGood, {1, 2, 3, 4, 5, 6}), {"2 trailing bytes", "data is 6 bytes"});
  expect_fault(image("{}", {0}), {"1 trailing bytes"});
  // Empty tensors at the end are fine.
  const Variables v =
      parse(image("{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("z", "F32", "[0,3]", 4, 4) + "}", kData4));
  EXPECT_EQ(v.at("z").shape(), (Shape{0, 3}));
}

TEST(SafetensorsMalformed, MetadataNotAnObjectOfStrings) {
  expect_fault(image("{\"__metadata__\":[\"a\"]}"), {"__metadata__ must be an object of strings", "array"});
  expect_fault(image("{\"__metadata__\":\"a\"}"), {"__metadata__ must be an object"});
  expect_fault(image("{\"__metadata__\":{\"k\":1}}"), {"__metadata__ value of 'k'", "number"});
  expect_fault(image("{\"__metadata__\":{\"k\":null}}"), {"'k'", "null"});
  expect_fault(image("{\"__metadata__\":{\"k\":{\"x\":\"y\"}}}"), {"'k'", "object"});
  const Variables v =
      parse(image("{\"__metadata__\":{\"k\":\"v\",\"e\":\"\"}," + entry("a", "U8", "[4]", 0, 4) + "}", kData4));
  EXPECT_EQ(v.metadata, (std::map<std::string, std::string>{{"k", "v"}, {"e", ""}}));
}

TEST(SafetensorsMalformed, TensorNameNotAVariablePath) {
  for (const std::string n : {"", "/a", "a/", "a//b"})
    expect_fault(image("{" + entry(n, "U8", "[4]", 0, 4) + "}", kData4),
                 {"tensor name '" + n + "'", "valid variable path"});
}

// Names in messages are quoted with their bytes escaped, as the msgpack reader does: a
// NUL in a name ("\u0000" in the JSON) shows as \x00 and cuts nothing after it.
TEST(SafetensorsMalformed, NamesInMessagesAreEscaped) {
  const std::string nul = "a\\u0000b";  // JSON text for the name "a\0b"
  const std::string m1 = parse_error(image("{" + entry(nul, "X9", "[4]", 0, 4) + "}", kData4));
  EXPECT_NE(m1.find("tensor 'a\\x00b': unknown dtype 'X9'"), std::string::npos) << m1;
  const std::string m2 = parse_error(image("{" + entry(nul, "U8", "[4]", 0, 4) + "," + entry(nul, "U8", "[4]", 0, 4) + "}", kData4));
  EXPECT_NE(m2.find("duplicate tensor name 'a\\x00b'"), std::string::npos) << m2;
  const std::string m3 = parse_error(image("{" + entry(nul, "U8", "[4]", 0, 4) + "," + entry("c\\n", "U8", "[4]", 2, 6) + "}",
                                           Bytes(6, 0)));
  EXPECT_NE(m3.find("data of 'c\\x0a' [2, 6) overlaps 'a\\x00b' [0, 4)"), std::string::npos) << m3;
  EXPECT_NE(parse_error(image("{\"__metadata__\":{\"k\\u0000\":1}}")).find("value of 'k\\x00' must be a string"),
            std::string::npos);
  // Such a name is a valid variable path: it loads, and keeps its bytes.
  const Variables v = parse(image("{" + entry(nul, "U8", "[4]", 0, 4) + "}", kData4));
  EXPECT_TRUE(v.contains(std::string("a\0b", 3)));
}

TEST(SafetensorsMalformed, DeepNestingIsRefusedWithoutRecursion) {
  const std::string deep = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  expect_fault(image(deep), {"nests deeper"});
  const std::string deep_obj = "{\"a\":{\"b\":{\"c\":{}}}}";
  expect_fault(image(deep_obj), {"nests deeper"});
}

TEST(SafetensorsMalformed, BoolByteOtherThanZeroOneFailsOnConversion) {
  const Variables v = parse(image("{" + entry("m", "BOOL", "[4]", 0, 4) + "}", {1, 0, 7, 1}));  // parses: bytes are raw
  try {
    v.get<bool, 1>("m");
    ADD_FAILURE() << "BOOL byte 7 converted";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("m: bool array of shape (4,) holds byte 7 at flat index 2"), std::string::npos)
        << e.what();
  }
}

}  // namespace

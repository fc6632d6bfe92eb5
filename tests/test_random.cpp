// SPDX-License-Identifier: Apache-2.0
// linen::random against jax.random (tests/data/flax/prng_reference.safetensors, made
// by JAX 0.11.2 with threefry2x32 in partitionable mode), SHA-1 against FIPS 180
// vectors, and Flax's rng-suffix hashing rules.
#include <linen/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <linen/dropout_rng.hpp>
#include <linen/io/safetensors.hpp>

#ifndef LINEN_TEST_DATA_DIR
#define LINEN_TEST_DATA_DIR "/work/main/tests/data"
#endif

namespace {

using linen::Index;
using linen::Shape;
namespace random = linen::random;

const linen::io::Variables& prng_fixture() {
  static const linen::io::Variables v =
      linen::io::load_safetensors(std::string(LINEN_TEST_DATA_DIR) + "/flax/prng_reference.safetensors");
  return v;
}

template <class T>
std::vector<T> fixture_vector(const std::string& name) {
  return prng_fixture().at(name).to_vector<T>(name);
}

// Distance in units in the last place between two finite floats of the same sign.
std::int64_t ulp_distance(float a, float b) {
  std::int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if ((ia < 0) != (ib < 0)) return a == b ? 0 : INT64_MAX;
  return std::abs(static_cast<std::int64_t>(ia) - ib);
}

void expect_within_one_ulp(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  std::int64_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const auto d = ulp_distance(got[i], want[i]);
    EXPECT_LE(d, 1) << what << "[" << i << "]: " << got[i] << " vs JAX " << want[i];
    worst = std::max(worst, d);
  }
  ::testing::Test::RecordProperty(std::string(what) + "_max_ulps", std::to_string(worst));
}

std::string hex(const std::array<std::uint8_t, 20>& d) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (auto b : d) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

// ---------------------------------------------------------------- SHA-1 (FIPS 180)

TEST(Sha1, StandardVectors) {
  EXPECT_EQ(hex(linen::detail::sha1("")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
  EXPECT_EQ(hex(linen::detail::sha1("abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
  EXPECT_EQ(hex(linen::detail::sha1("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
  EXPECT_EQ(hex(linen::detail::sha1("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
                                    "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu")),
            "a49b2446a02c645bf419f995b67091253a04a259");
  EXPECT_EQ(hex(linen::detail::sha1("The quick brown fox jumps over the lazy dog")),
            "2fd4e1c67a2d28fced849ee1bb76e7391b93eb12");
}

TEST(Sha1, MillionAsInUnevenPieces) {
  linen::detail::Sha1 h;
  const std::string chunk(997, 'a');  // crosses block boundaries at every offset
  std::size_t left = 1000000;
  while (left > 0) {
    const std::size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(hex(h.digest()), "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
}

TEST(Sha1, PaddingBoundaries) {
  // Lengths 55, 56, 63, 64 and 65 exercise every padding case (the 56-byte FIPS
  // vector above pins one of them): byte-by-byte hashing must equal one-shot.
  for (std::size_t len : {55u, 56u, 63u, 64u, 65u, 119u, 120u}) {
    const std::string s(len, 'x');
    linen::detail::Sha1 h;
    for (char c : s) h.update(&c, 1);
    EXPECT_EQ(hex(h.digest()), hex(linen::detail::sha1(s))) << "length " << len;
  }
}

// ---------------------------------------------------------------- keys

TEST(RandomKey, SeedsMatchJax) {
  const auto key0 = fixture_vector<std::uint32_t>("key0");
  const auto key123 = fixture_vector<std::uint32_t>("key123");
  EXPECT_EQ(random::key_data(random::key(0)), (std::array<std::uint32_t, 2>{key0[0], key0[1]}));
  EXPECT_EQ(random::key_data(random::key(123)), (std::array<std::uint32_t, 2>{key123[0], key123[1]}));
  EXPECT_EQ(random::PRNGKey(123), random::key(123));
  // A 64-bit seed splits into its high and low words (JAX with x64).
  EXPECT_EQ(random::key_data(random::key((std::uint64_t{7} << 32) | 9u)), (std::array<std::uint32_t, 2>{7u, 9u}));
  EXPECT_EQ(random::wrap_key_data({3u, 4u}).data, (std::array<std::uint32_t, 2>{3u, 4u}));
  EXPECT_NE(random::key(1), random::key(2));
}

TEST(RandomKey, SplitMatchesJax) {
  const auto want = fixture_vector<std::uint32_t>("split0_3");  // [3, 2]
  const auto keys = random::split(random::key(0), 3);
  ASSERT_EQ(keys.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(keys[i].data[0], want[2 * i]) << "key " << i;
    EXPECT_EQ(keys[i].data[1], want[2 * i + 1]) << "key " << i;
  }
  // Partitionable mode: key i depends on i alone, so split(k) is split(k, 3)[:2].
  const auto two = random::split(random::key(0));
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[0], keys[0]);
  EXPECT_EQ(two[1], keys[1]);
  EXPECT_TRUE(random::split(random::key(0), 0).empty());
}

TEST(RandomKey, FoldInMatchesJax) {
  const auto want = fixture_vector<std::uint32_t>("fold_in0_7");
  EXPECT_EQ(random::key_data(random::fold_in(random::key(0), 7)), (std::array<std::uint32_t, 2>{want[0], want[1]}));
  EXPECT_NE(random::fold_in(random::key(0), 7), random::fold_in(random::key(0), 8));
}

TEST(RandomKey, FromEngineTakesTwoDraws) {
  std::mt19937 a(5), b(5);
  const random::Key k = random::key_from_engine(a);
  const std::uint32_t w0 = b(), w1 = b();
  EXPECT_EQ(k.data, (std::array<std::uint32_t, 2>{w0, w1}));
  EXPECT_EQ(a(), b());  // exactly two draws consumed
  std::mt19937_64 c(5);
  const random::Key k64 = random::key_from_engine(c);
  EXPECT_NE(k64.data[0], k64.data[1]);
}

// ---------------------------------------------------------------- bits

TEST(RandomBits, MatchJax) {
  const auto k0 = random::key(0);
  EXPECT_EQ(random::bits(k0, {8}), fixture_vector<std::uint32_t>("bits0_8"));
  EXPECT_EQ(random::bits(k0, {3, 5}), fixture_vector<std::uint32_t>("bits0_3x5"));
  // A scalar draw is element 0.
  EXPECT_EQ(random::bits(k0, {}), std::vector<std::uint32_t>{fixture_vector<std::uint32_t>("bits0_8")[0]});
  EXPECT_TRUE(random::bits(k0, {0, 3}).empty());
}

TEST(RandomBits, WidthsComeFromTheSameHashWords) {
  const auto k = random::key(9);
  const Shape shape{4, 3};
  const auto b32 = random::bits(k, shape);
  const auto b64 = random::bits<std::uint64_t>(k, shape);
  const auto b16 = random::bits<std::uint16_t>(k, shape);
  const auto b8 = random::bits<std::uint8_t>(k, shape);
  for (std::size_t i = 0; i < b32.size(); ++i) {
    const auto w = random::threefry2x32(k, 0u, static_cast<std::uint32_t>(i));
    EXPECT_EQ(b32[i], w[0] ^ w[1]);
    EXPECT_EQ(b64[i], (std::uint64_t{w[0]} << 32) | w[1]);
    EXPECT_EQ(b16[i], static_cast<std::uint16_t>(b32[i]));
    EXPECT_EQ(b8[i], static_cast<std::uint8_t>(b32[i]));
  }
}

TEST(RandomBits, Threefry2x32KnownAnswer) {
  // Random123's published known-answer vectors for threefry2x32 with 20 rounds.
  EXPECT_EQ(random::threefry2x32(random::wrap_key_data({0u, 0u}), 0u, 0u),
            (std::array<std::uint32_t, 2>{0x6b200159u, 0x99ba4efeu}));
  EXPECT_EQ(random::threefry2x32(random::wrap_key_data({0xffffffffu, 0xffffffffu}), 0xffffffffu, 0xffffffffu),
            (std::array<std::uint32_t, 2>{0x1cb996fcu, 0xbb002be7u}));
  EXPECT_EQ(random::threefry2x32(random::wrap_key_data({0x13198a2eu, 0x03707344u}), 0x243f6a88u, 0x85a308d3u),
            (std::array<std::uint32_t, 2>{0xc4923a9cu, 0x483df7a0u}));
}

// ---------------------------------------------------------------- float samplers vs JAX

TEST(RandomFloat32, UniformMatchesJax) {
  expect_within_one_ulp(random::uniform<float>(random::key(1), {10}), fixture_vector<float>("uniform1_10"),
                        "uniform1_10");
}

TEST(RandomFloat32, NormalMatchesJax) {
  expect_within_one_ulp(random::normal<float>(random::key(2), {10}), fixture_vector<float>("normal2_10"),
                        "normal2_10");
}

TEST(RandomFloat32, TruncatedNormalMatchesJax) {
  expect_within_one_ulp(random::truncated_normal<float>(random::key(3), -2.0f, 2.0f, {10}),
                        fixture_vector<float>("truncnormal3_10"), "truncnormal3_10");
}

TEST(RandomBernoulli, MatchesJax) {
  const auto want = fixture_vector<bool>("bernoulli4_20");
  EXPECT_EQ(random::bernoulli(random::key(4), 0.3, {20}), want);
  bool buf[20];
  random::key(4).bernoulli(0.3, {4, 5}, buf);  // the member DropoutRng uses
  EXPECT_EQ(std::vector<bool>(buf, buf + 20), want);
}

// Attention dropout's keep masks in the dropout fixtures were drawn by
// jax.random.bernoulli(jax.random.key(42), 0.5, shape).
TEST(RandomBernoulli, MatchesFlaxDropoutKeepMasks) {
  for (const char* name : {"dropout_broadcast", "dropout_full"}) {
    const auto v = linen::io::load_safetensors(std::string(LINEN_TEST_DATA_DIR) + "/flax/" + name + ".safetensors");
    const auto key_words = v.at("dropout/key_data").to_vector<std::uint32_t>("dropout/key_data");
    const random::Key k = random::key(42);
    EXPECT_EQ(k.data, (std::array<std::uint32_t, 2>{key_words[0], key_words[1]})) << name;
    const auto& keep = v.at("dropout/keep");
    EXPECT_EQ(random::bernoulli(k, 0.5, keep.shape()), keep.to_vector<bool>("dropout/keep")) << name;
    // Through linen's dropout source, as attention uses it.
    const linen::DropoutRng rng(k);
    std::vector<unsigned char> mask(static_cast<std::size_t>(keep.size()));
    rng(0.5, keep.shape(), reinterpret_cast<bool*>(mask.data()));
    EXPECT_EQ(std::vector<bool>(mask.begin(), mask.end()), keep.to_vector<bool>("dropout/keep")) << name;
  }
}

// ---------------------------------------------------------------- every element type

template <class T>
class RandomTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
// Names the typed cases by numpy dtype (float32, float64, float16, bfloat16).
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};
TYPED_TEST_SUITE(RandomTyped, ElementTypes, DtypeNames);

template <class T>
std::vector<double> as_doubles(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d[i] = static_cast<double>(v[i]);
  return d;
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

double stddev_of(const std::vector<double>& v) {
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size()));
}

// Mantissa bits jax.random.uniform randomizes for each type: float32 23, float64 52,
// float16 10, bfloat16 7.
template <class T>
constexpr int uniform_mantissa_bits() {
  if constexpr (std::is_same_v<T, float>) return 23;
  else if constexpr (std::is_same_v<T, double>) return 52;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 10;
  else return 7;
}

TYPED_TEST(RandomTyped, UniformIsOnTheMantissaGridWithTheRightMoments) {
  using T = TypeParam;
  const Index n = 1 << 16;
  const auto u = as_doubles(random::uniform<T>(random::key(11), {n}));
  const double step = std::ldexp(1.0, -uniform_mantissa_bits<T>());
  double lo = 1, hi = 0;
  for (double x : u) {
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 1.0);
    ASSERT_EQ(std::fmod(x, step), 0.0) << x << " is not a multiple of " << step;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_NEAR(mean_of(u), 0.5, 6 * std::sqrt(1.0 / 12 / n));
  EXPECT_NEAR(stddev_of(u), std::sqrt(1.0 / 12), 0.01);
  EXPECT_LT(lo, 0.01);
  EXPECT_GT(hi, 0.99);
  // The range maps affinely onto [minval, maxval).
  const auto r = as_doubles(random::uniform<T>(random::key(11), {n}, T(-3.0f), T(5.0f)));
  for (double x : r) {
    ASSERT_GE(x, -3.0);
    ASSERT_LT(x, 5.0);
  }
  EXPECT_NEAR(mean_of(r), 1.0, 6 * 8 * std::sqrt(1.0 / 12 / n) + 0.01);
}

TYPED_TEST(RandomTyped, NormalHasUnitMomentsAndSymmetricTails) {
  using T = TypeParam;
  const Index n = 1 << 16;
  const auto x = as_doubles(random::normal<T>(random::key(12), {n}));
  EXPECT_NEAR(mean_of(x), 0.0, 6 / std::sqrt(static_cast<double>(n)));
  EXPECT_NEAR(stddev_of(x), 1.0, 0.02);
  const auto beyond = [&](double t) {
    return static_cast<double>(std::count_if(x.begin(), x.end(), [t](double v) { return v > t; })) / n;
  };
  EXPECT_NEAR(beyond(1.0), 0.158655, 0.006);  // 1 - Phi(1)
  EXPECT_NEAR(beyond(2.0), 0.022750, 0.003);
  for (double v : x) ASSERT_TRUE(std::isfinite(v));
}

TYPED_TEST(RandomTyped, TruncatedNormalStaysInsideTheOpenInterval) {
  using T = TypeParam;
  const Index n = 1 << 16;
  const auto x = as_doubles(random::truncated_normal<T>(random::key(13), T(-2.0f), T(2.0f), {n}));
  for (double v : x) {
    ASSERT_GT(v, -2.0);
    ASSERT_LT(v, 2.0);
  }
  // JAX draws u on a grid of 2^m points (m mantissa bits; 128 for bfloat16): the mean
  // of a left Riemann sum of x(u) is off by about (x(b) - x(a)) / 2^(m+1) = 4 / 2^(m+1).
  const double grid_bias = 4.0 / std::ldexp(1.0, uniform_mantissa_bits<T>() + 1);
  EXPECT_NEAR(mean_of(x), 0.0, 6 * 0.88 / std::sqrt(static_cast<double>(n)) + grid_bias);
  EXPECT_NEAR(stddev_of(x), 0.87962566103423978, 0.02);
  // A one-sided interval [0.5, inf) has the half-normal tail's mean phi(.5)/(1-Phi(.5)).
  const auto y = as_doubles(random::truncated_normal<T>(random::key(14), T(0.5f), T(INFINITY), {n}));
  for (double v : y) ASSERT_GT(v, 0.5);
  EXPECT_NEAR(mean_of(y), 1.141078, 0.03);
}

TYPED_TEST(RandomTyped, SameKeySameDrawDifferentKeyDifferentDraw) {
  using T = TypeParam;
  const auto a = as_doubles(random::normal<T>(random::key(1), {64}));
  EXPECT_EQ(a, as_doubles(random::normal<T>(random::key(1), {64})));
  EXPECT_NE(a, as_doubles(random::normal<T>(random::key(2), {64})));
  // Row-major counters: a (4, 16) draw is the (64,) draw reshaped.
  EXPECT_EQ(a, as_doubles(random::normal<T>(random::key(1), {4, 16})));
}

TEST(RandomBernoulli, Frequency) {
  const Index n = 1 << 16;
  for (double p : {0.0, 0.1, 0.5, 0.9, 1.0}) {
    const auto b = random::bernoulli(random::key(21), p, {n});
    const double freq = static_cast<double>(std::count(b.begin(), b.end(), true)) / n;
    EXPECT_NEAR(freq, p, 6 * std::sqrt(p * (1 - p) / n) + 1e-12) << "p = " << p;
  }
}

// ---------------------------------------------------------------- errors

TEST(RandomErrors, BadArgumentsThrowNamingTheValue) {
  const auto k = random::key(0);
  float buf[4];
  EXPECT_THROW(random::bits(k, {2, -1}), std::invalid_argument);
  EXPECT_THROW(random::uniform<float>(k, {4}, 0.0f, 1.0f, static_cast<float*>(nullptr)), std::invalid_argument);
  EXPECT_THROW(random::normal<float>(k, {4}, nullptr), std::invalid_argument);
  EXPECT_NO_THROW(random::normal<float>(k, {0}, nullptr));  // nothing to write
  try {
    random::uniform<float>(k, {4}, 2.0f, 1.0f, buf);
    FAIL() << "minval > maxval must throw";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("2.0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(4,)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(random::uniform<float>(k, {4}, -INFINITY, 1.0f, buf), std::invalid_argument);
  EXPECT_THROW(random::uniform<float>(k, {4}, -3e38f, 3e38f, buf), std::invalid_argument);  // range overflows
  EXPECT_THROW(random::uniform<float>(k, {4}, NAN, 1.0f, buf), std::invalid_argument);
  EXPECT_THROW(random::truncated_normal<float>(k, 1.0f, 1.0f, {4}, buf), std::invalid_argument);
  EXPECT_THROW(random::truncated_normal<float>(k, 2.0f, -2.0f, {4}, buf), std::invalid_argument);
  EXPECT_THROW(random::bernoulli(k, 1.5, {4}), std::invalid_argument);
  EXPECT_THROW(random::bernoulli(k, -0.1, {4}), std::invalid_argument);
  EXPECT_THROW(random::bernoulli(k, NAN, {4}), std::invalid_argument);
}

// ---------------------------------------------------------------- Flax rng streams

TEST(FlaxRng, FoldInStaticHashesUtf8AndMinimalBigEndianInts) {
  const auto root = random::key(0);
  // The suffix is hashed as one byte string: ("query", 1) is sha1("query\x01").
  const auto d = linen::detail::sha1(std::string("query\x01", 6));
  const std::uint32_t word = (std::uint32_t{d[0]} << 24) | (std::uint32_t{d[1]} << 16) |
                             (std::uint32_t{d[2]} << 8) | std::uint32_t{d[3]};
  EXPECT_EQ(random::fold_in_static(root, {std::string("query"), std::uint64_t{1}}), random::fold_in(root, word));
  EXPECT_EQ(random::flax_rng(root, {"query"}, 1), random::fold_in(root, word));
  // 0 encodes to no bytes, 256 to two, a string concatenates.
  EXPECT_EQ(random::fold_in_static(root, {std::string("q"), std::uint64_t{0}}),
            random::fold_in_static(root, {std::string("q")}));
  EXPECT_EQ(random::fold_in_static(root, {std::string("q"), std::uint64_t{256}}),
            random::fold_in_static(root, {std::string("q\x01\x00", 3)}));
  EXPECT_EQ(random::fold_in_static(root, {std::string("ab"), std::string("c")}),
            random::fold_in_static(root, {std::string("a"), std::string("bc")}));
  // flax_fix_rng_separator puts a zero byte before each item.
  EXPECT_NE(random::fold_in_static(root, {std::string("ab"), std::string("c")}, true),
            random::fold_in_static(root, {std::string("a"), std::string("bc")}, true));
  EXPECT_EQ(random::fold_in_static(root, {std::string("ab"), std::string("c")}, true),
            random::fold_in_static(root, {std::string("\0ab\0c", 5)}));
  // UTF-8 names hash as their bytes.
  EXPECT_EQ(random::flax_rng(root, {"\xc3\xa9t\xc3\xa9"}, 1),
            random::fold_in_static(root, {std::string("\xc3\xa9t\xc3\xa9\x01")}));
  // No suffix, no fold.
  EXPECT_EQ(random::fold_in_static(root, {}), root);
}

TEST(FlaxRng, ScopeCountsDrawsPerScope) {
  const auto root = random::key(7);
  random::RngScope top(root);
  random::RngScope query = top.push("query");
  EXPECT_EQ(query.path(), (std::vector<std::string>{"query"}));
  EXPECT_EQ(query.make_rng(), random::flax_rng(root, {"query"}, 1));
  EXPECT_EQ(query.make_rng(), random::flax_rng(root, {"query"}, 2));
  EXPECT_EQ(query.counter(), 2u);
  // A sibling and a nested scope start their own counts.
  random::RngScope key = top.push("key");
  EXPECT_EQ(key.make_rng(), random::flax_rng(root, {"key"}, 1));
  random::RngScope nested = query.push("inner");
  EXPECT_EQ(nested.make_rng(), random::flax_rng(root, {"query", "inner"}, 1));
  // The root module's own draws hash the counter alone.
  EXPECT_EQ(top.make_rng(), random::fold_in_static(root, {std::uint64_t{1}}));
  EXPECT_THROW(random::flax_rng(root, {"query"}, 0), std::invalid_argument);
}

}  // namespace

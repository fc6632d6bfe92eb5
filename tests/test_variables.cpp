// SPDX-License-Identifier: Apache-2.0
// Tests for linen/io/variables.hpp: DType, Array (storage and conversions), Variables.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <linen/io/variables.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;

// Runs f and returns the io_error message; fails the test if nothing or something else is thrown.
template <class F>
std::string io_error_message(F&& f) {
  try {
    f();
  } catch (const linen::io_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected linen::io_error, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected linen::io_error, nothing was thrown";
  return {};
}

#define EXPECT_IO_ERROR_HAS(stmt, ...)                                                               \
  do {                                                                                               \
    const std::string msg_ = io_error_message([&] { (void)(stmt); });                                \
    for (const std::string& part_ : std::initializer_list<std::string>{__VA_ARGS__})                 \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "message: " << msg_ << "\nlacks: " << part_; \
  } while (false)

std::uint16_t bits_of(Eigen::half h) { return Eigen::numext::bit_cast<std::uint16_t>(h); }
std::uint16_t bits_of(Eigen::bfloat16 h) { return Eigen::numext::bit_cast<std::uint16_t>(h); }
std::uint32_t bits_of(float f) { return Eigen::numext::bit_cast<std::uint32_t>(f); }

Array raw(DType d, Shape s, std::vector<std::uint8_t> b) { return Array(d, std::move(s), std::move(b)); }

// ---------------------------------------------------------------- DType

TEST(DType, NamesAndSizes) {
  struct Row {
    DType d;
    std::size_t size;
    const char* st;
    const char* np;
  };
  const Row rows[] = {
      {DType::F16, 2, "F16", "float16"}, {DType::BF16, 2, "BF16", "bfloat16"}, {DType::F32, 4, "F32", "float32"},
      {DType::F64, 8, "F64", "float64"}, {DType::I8, 1, "I8", "int8"},         {DType::I16, 2, "I16", "int16"},
      {DType::I32, 4, "I32", "int32"},   {DType::I64, 8, "I64", "int64"},      {DType::U8, 1, "U8", "uint8"},
      {DType::U16, 2, "U16", "uint16"},  {DType::U32, 4, "U32", "uint32"},     {DType::U64, 8, "U64", "uint64"},
      {DType::BOOL, 1, "BOOL", "bool"}};
  for (const Row& r : rows) {
    EXPECT_EQ(linen::io::itemsize(r.d), r.size) << r.st;
    EXPECT_STREQ(linen::io::safetensors_name(r.d), r.st);
    EXPECT_STREQ(linen::io::numpy_name(r.d), r.np);
    EXPECT_EQ(linen::io::dtype_from_safetensors_name(r.st), r.d);
    EXPECT_EQ(linen::io::dtype_from_numpy_name(r.np), r.d);
  }
  EXPECT_FALSE(linen::io::dtype_from_safetensors_name("F8_E4M3"));
  EXPECT_FALSE(linen::io::dtype_from_safetensors_name("f32"));
  EXPECT_FALSE(linen::io::dtype_from_numpy_name("F32"));
}

TEST(DType, DtypeOf) {
  static_assert(linen::io::dtype_of<float>() == DType::F32);
  static_assert(linen::io::dtype_of<double>() == DType::F64);
  static_assert(linen::io::dtype_of<Eigen::half>() == DType::F16);
  static_assert(linen::io::dtype_of<Eigen::bfloat16>() == DType::BF16);
  static_assert(linen::io::dtype_of<bool>() == DType::BOOL);
  static_assert(linen::io::dtype_of<std::int8_t>() == DType::I8);
  static_assert(linen::io::dtype_of<std::int16_t>() == DType::I16);
  static_assert(linen::io::dtype_of<std::int32_t>() == DType::I32);
  static_assert(linen::io::dtype_of<std::int64_t>() == DType::I64);
  static_assert(linen::io::dtype_of<std::uint8_t>() == DType::U8);
  static_assert(linen::io::dtype_of<std::uint16_t>() == DType::U16);
  static_assert(linen::io::dtype_of<std::uint32_t>() == DType::U32);
  static_assert(linen::io::dtype_of<std::uint64_t>() == DType::U64);
  // numpy_name agrees with linen::dtype_name for every element type.
  EXPECT_STREQ(linen::io::numpy_name(linen::io::dtype_of<Eigen::bfloat16>()), linen::dtype_name<Eigen::bfloat16>());
  EXPECT_STREQ(linen::io::numpy_name(linen::io::dtype_of<std::uint16_t>()), linen::dtype_name<std::uint16_t>());
}

// ---------------------------------------------------------------- Array basics

TEST(Array, ConstructorChecksByteCount) {
  const Array a(DType::F32, {2, 3}, std::vector<std::uint8_t>(24));
  EXPECT_EQ(a.size(), 6);
  EXPECT_EQ(a.rank(), 2);
  EXPECT_EQ(a.shape(), (Shape{2, 3}));
  EXPECT_EQ(a.describe(), "float32 array of shape (2, 3)");
  EXPECT_IO_ERROR_HAS(raw(DType::F32, {2, 3}, std::vector<std::uint8_t>(23)), "(2, 3)", "float32", "24", "23");
  EXPECT_IO_ERROR_HAS(raw(DType::BF16, {2, 3}, std::vector<std::uint8_t>(24)), "(2, 3)", "bfloat16", "12", "24");
  EXPECT_IO_ERROR_HAS(raw(DType::F32, {2, -3}, {}), "negative", "(2, -3)");
  const Index big = std::numeric_limits<Index>::max() / 2;
  EXPECT_IO_ERROR_HAS(raw(DType::F32, {big, big}, {}), "overflows");
  EXPECT_IO_ERROR_HAS(raw(DType::F64, {big}, {}), "overflows");
  // A scalar holds one element; a zero-size array none.
  EXPECT_EQ(Array(DType::I32, {}, std::vector<std::uint8_t>(4)).size(), 1);
  EXPECT_IO_ERROR_HAS(raw(DType::I32, {}, {}), "()", "needs 4 bytes, got 0");
  EXPECT_EQ(Array(DType::F64, {0, 7}, {}).size(), 0);
}

TEST(Array, LittleEndianBytes) {
  Tensor<float, 1> f(2);
  f.setValues({1.0f, -2.0f});
  EXPECT_EQ(Array::from(f).bytes(), (std::vector<std::uint8_t>{0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0}));
  Tensor<double, 0> d;
  d() = 1.0;
  EXPECT_EQ(Array::from(d).bytes(), (std::vector<std::uint8_t>{0, 0, 0, 0, 0, 0, 0xF0, 0x3F}));
  EXPECT_EQ(Array::from(d).shape(), Shape{});
  Tensor<Eigen::half, 1> h(1);
  h(0) = Eigen::half(1.0f);
  EXPECT_EQ(Array::from(h).bytes(), (std::vector<std::uint8_t>{0x00, 0x3C}));
  Tensor<Eigen::bfloat16, 1> b(1);
  b(0) = Eigen::bfloat16(1.0f);
  EXPECT_EQ(Array::from(b).bytes(), (std::vector<std::uint8_t>{0x80, 0x3F}));
  Tensor<std::int32_t, 1> i(2);
  i.setValues({0x01020304, -2});
  EXPECT_EQ(Array::from(i).bytes(), (std::vector<std::uint8_t>{4, 3, 2, 1, 0xFE, 0xFF, 0xFF, 0xFF}));
  Tensor<bool, 1> t(3);
  t.setValues({true, false, true});
  EXPECT_EQ(Array::from(t).bytes(), (std::vector<std::uint8_t>{1, 0, 1}));
  EXPECT_EQ(Array::from(t).dtype(), DType::BOOL);
}

TEST(Array, FromMapsAndRowMajorOrder) {
  std::vector<float> buf = {0, 1, 2, 3, 4, 5};
  linen::TensorMap<float, 2> m(buf.data(), 2, 3);
  linen::ConstTensorMap<float, 2> cm(buf.data(), 3, 2);
  const Array a = Array::from(m);
  const Array b = Array::from(cm);
  EXPECT_EQ(a.shape(), (Shape{2, 3}));
  EXPECT_EQ(b.shape(), (Shape{3, 2}));
  EXPECT_EQ(a.bytes(), b.bytes());  // same row-major memory
  const auto t = a.to<float, 2>();
  EXPECT_EQ(t(1, 0), 3.0f);  // row-major: (1, 0) is flat index 3
  EXPECT_EQ(t(0, 2), 2.0f);
  EXPECT_EQ(a.to_vector<float>(), buf);
  EXPECT_THROW(Array::from_data<float>(nullptr, {2}), std::invalid_argument);
  EXPECT_EQ(Array::from_data<float>(nullptr, {0, 2}).size(), 0);
}

TEST(Array, RankMustMatch) {
  const Array a(DType::F32, {16, 4, 4}, std::vector<std::uint8_t>(16 * 4 * 4 * 4));
  EXPECT_IO_ERROR_HAS((a.to<float, 2>("params/query/kernel")), "params/query/kernel", "(16, 4, 4)", "rank-2",
                      "float32");
  EXPECT_IO_ERROR_HAS((a.to<float, 0>("x")), "x:", "rank-0");
  EXPECT_EQ((a.to<float, 3>().dimension(0)), 16);
}

TEST(Array, Equality) {
  const Array a(DType::U8, {2}, {1, 2});
  EXPECT_EQ(a, Array(DType::U8, {2}, {1, 2}));
  EXPECT_NE(a, Array(DType::I8, {2}, {1, 2}));
  EXPECT_NE(a, Array(DType::U8, {2, 1}, {1, 2}));
  EXPECT_NE(a, Array(DType::U8, {2}, {1, 3}));
}

// ---------------------------------------------------------------- float conversions (typed)

// Typed tests are named by numpy dtype: FloatConversion/bfloat16.
struct NumpyNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};

template <class T>
class FloatConversion : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(FloatConversion, FloatTypes, NumpyNames);

// Values exact in every float type, bf16 included (8 significant bits).
std::vector<double> exact_values() {
  std::vector<double> v;
  for (int i = -40; i <= 40; ++i) v.push_back(i * 0.125);
  v.push_back(1.0 / 1024);
  v.push_back(-96.0);
  v.push_back(0.0078125);
  return v;
}

template <class T>
Tensor<T, 2> exact_tensor() {
  const auto vals = exact_values();
  Tensor<T, 2> t(1, static_cast<Index>(vals.size()));
  for (std::size_t i = 0; i < vals.size(); ++i)
    t(0, static_cast<Index>(i)) = static_cast<T>(static_cast<float>(vals[i]));
  return t;
}

template <class U, class T>
void expect_exact_to(const Array& a) {
  const auto vals = exact_values();
  const Tensor<U, 2> u = a.to<U, 2>();
  ASSERT_EQ(u.dimension(1), static_cast<Index>(vals.size()));
  for (std::size_t i = 0; i < vals.size(); ++i)
    EXPECT_EQ(static_cast<double>(static_cast<float>(u(0, static_cast<Index>(i)))), vals[i])
        << linen::dtype_name<T>() << " -> " << linen::dtype_name<U>() << " at " << i;
}

TYPED_TEST(FloatConversion, SameTypeRoundTripIsBitExact) {
  using T = TypeParam;
  Tensor<T, 3> t(2, 3, 4);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(std::sin(0.7f * static_cast<float>(i)) * 3.0f);
  const Array a = Array::from(t);
  EXPECT_EQ(a.dtype(), linen::io::dtype_of<T>());
  EXPECT_EQ(a.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(a.bytes().size(), 24 * sizeof(T));
  const Tensor<T, 3> back = a.to<T, 3>();
  EXPECT_EQ(std::memcmp(back.data(), t.data(), 24 * sizeof(T)), 0);
  const std::vector<T> flat = a.to_vector<T>();
  EXPECT_EQ(std::memcmp(flat.data(), t.data(), 24 * sizeof(T)), 0);
}

TYPED_TEST(FloatConversion, ExactValuesConvertExactlyToEveryFloatType) {
  using T = TypeParam;
  const Array a = Array::from(exact_tensor<T>());
  expect_exact_to<float, T>(a);
  expect_exact_to<double, T>(a);
  expect_exact_to<Eigen::half, T>(a);
  expect_exact_to<Eigen::bfloat16, T>(a);
}

TYPED_TEST(FloatConversion, NarrowingRoundsToNearestEvenLikeEigen) {
  using T = TypeParam;
  // float -> T: the result must equal Eigen's own conversion (identity for float/double).
  Tensor<float, 1> f(6);
  f.setValues({1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8), 1.0f + std::ldexp(1.0f, -11),
               1.0f + 3 * std::ldexp(1.0f, -11), 0.1f, -3.14159f});
  const Tensor<T, 1> got = Array::from(f).to<T, 1>();
  for (Index i = 0; i < f.size(); ++i) {
    const T want = static_cast<T>(f(i));
    EXPECT_EQ(std::memcmp(&got(i), &want, sizeof(T)), 0) << "element " << i;
  }
}

TYPED_TEST(FloatConversion, IntegersAndBoolsConvertToFloat) {
  using T = TypeParam;
  Tensor<std::int32_t, 1> i(5);
  i.setValues({-3, 0, 7, 250, -128});
  const Tensor<T, 1> fi = Array::from(i).to<T, 1>();
  for (Index k = 0; k < 5; ++k) EXPECT_EQ(static_cast<float>(fi(k)), static_cast<float>(i(k)));
  Tensor<std::uint8_t, 1> u(2);
  u.setValues({0, 255});
  EXPECT_EQ(static_cast<float>(Array::from(u).to<T, 1>()(1)), 255.0f);
  Tensor<bool, 2> b(1, 2);
  b.setValues({{true, false}});
  const Tensor<T, 2> fb = Array::from(b).to<T, 2>();
  EXPECT_EQ(static_cast<float>(fb(0, 0)), 1.0f);
  EXPECT_EQ(static_cast<float>(fb(0, 1)), 0.0f);
}

TYPED_TEST(FloatConversion, FloatToIntegerIsRefused) {
  using T = TypeParam;
  const Array a = Array::from(exact_tensor<T>());
  EXPECT_IO_ERROR_HAS((a.to<std::int32_t, 2>("params/x")), "params/x", linen::dtype_name<T>(), "int32", "(1, 84)",
                      "refused");
  EXPECT_IO_ERROR_HAS((a.to<std::uint8_t, 2>()), "uint8");
  EXPECT_IO_ERROR_HAS((a.to<bool, 2>("m")), "m:", "bool");
  EXPECT_IO_ERROR_HAS(a.to_vector<std::int64_t>("v"), "int64");
}

TEST(FloatBits, EveryBf16PatternWidensExactly) {
  std::vector<std::uint8_t> bytes;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    bytes.push_back(static_cast<std::uint8_t>(b));
    bytes.push_back(static_cast<std::uint8_t>(b >> 8));
  }
  const Array a(DType::BF16, {65536}, bytes);
  const auto f = a.to_vector<float>();
  const auto d = a.to_vector<double>();
  for (std::uint32_t b = 0; b < 65536; ++b) {
    ASSERT_EQ(bits_of(f[b]), b << 16) << "bf16 bits " << b;
    if (std::isnan(f[b]))
      ASSERT_TRUE(std::isnan(d[b]));
    else
      ASSERT_EQ(d[b], static_cast<double>(f[b]));
  }
  // And back: float -> bf16 of a widened bf16 is the identity (NaNs stay NaN).
  const auto back = Array::from_data(f.data(), {65536}).to_vector<Eigen::bfloat16>();
  for (std::uint32_t b = 0; b < 65536; ++b) {
    if (std::isnan(f[b]))
      ASSERT_TRUE(Eigen::numext::isnan(back[b]));
    else
      ASSERT_EQ(bits_of(back[b]), b);
  }
}

// IEEE binary16 decoded from its fields.
double decode_half(std::uint32_t h) {
  const int s = static_cast<int>(h >> 15), e = static_cast<int>((h >> 10) & 31), m = static_cast<int>(h & 1023);
  double v;
  if (e == 0)
    v = std::ldexp(m, -24);
  else if (e == 31)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(1024 + m, e - 25);
  return s ? -v : v;
}

TEST(FloatBits, EveryF16PatternWidensExactly) {
  std::vector<std::uint8_t> bytes;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    bytes.push_back(static_cast<std::uint8_t>(b));
    bytes.push_back(static_cast<std::uint8_t>(b >> 8));
  }
  const Array a(DType::F16, {256, 256}, bytes);
  const auto d = a.to<double, 2>();
  const auto f = a.to_vector<float>();
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const double want = decode_half(b);
    const double got = d(static_cast<Index>(b / 256), static_cast<Index>(b % 256));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got) && std::isnan(f[b])) << b;
    } else {
      ASSERT_EQ(got, want) << "f16 bits " << b;
      ASSERT_EQ(static_cast<double>(f[b]), want) << "f16 bits " << b;
      ASSERT_EQ(std::signbit(got), (b >> 15) != 0) << b;
    }
  }
}

TEST(FloatBits, FloatToBf16AndF16RoundToNearestEven) {
  Tensor<float, 1> f(8);
  f.setValues({1.0f + std::ldexp(1.0f, -8),                          // bf16 tie -> even (1.0)
               1.0f + 3 * std::ldexp(1.0f, -8),                      // bf16 tie -> even (1 + 2^-6)
               1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20),  // above the tie -> up
               1.0f + std::ldexp(1.0f, -11),                         // f16 tie -> even (1.0)
               1.0f + 3 * std::ldexp(1.0f, -11),                     // f16 tie -> even (1 + 2^-9)
               65504.0f,                                             // f16: max finite
               65519.0f,                                             // f16: max finite 65504
               -0.0f});
  const auto a = Array::from(f);
  const auto b = a.to_vector<Eigen::bfloat16>();
  EXPECT_EQ(bits_of(b[0]), 0x3F80);
  EXPECT_EQ(bits_of(b[1]), 0x3F82);
  EXPECT_EQ(bits_of(b[2]), 0x3F81);
  EXPECT_EQ(bits_of(b[7]), 0x8000);
  const auto h = a.to_vector<Eigen::half>();
  EXPECT_EQ(bits_of(h[3]), 0x3C00);
  EXPECT_EQ(bits_of(h[4]), 0x3C02);
  EXPECT_EQ(bits_of(h[5]), 0x7BFF);
  EXPECT_EQ(bits_of(h[6]), 0x7BFF);
  EXPECT_EQ(bits_of(h[7]), 0x8000);
  // 65520 rounds up to inf in float16: a finite value that would become inf throws
  // (FloatOverflow below).
  Tensor<float, 1> over(1);
  over.setValues({65520.0f});
  EXPECT_IO_ERROR_HAS(Array::from(over).to_vector<Eigen::half>("w"), "w:", "65520", "flat index 0", "float16");
}

// ---------------------------------------------------------------- overflow to inf (one rule)

// A finite value that would round to +-inf in the target type throws, naming the path,
// the flat index and the value, as an integer that does not fit does; inf and NaN
// stored in the file stay inf and NaN.
TEST(FloatOverflow, FiniteValuesThatWouldBecomeInfThrow) {
  Tensor<double, 2> d(1, 3);
  d.setValues({{1.0, -1e300, 2.0}});
  EXPECT_IO_ERROR_HAS((Array::from(d).to<float, 2>("params/dense/kernel")), "params/dense/kernel:", "float64",
                      "-1.0000000000000001e+300", "flat index 1", "overflows float32");
  Tensor<float, 1> f(2);
  f.setValues({1e30f, 0.5f});
  EXPECT_IO_ERROR_HAS((Array::from(f).to<Eigen::half, 1>("b")), "b:", "float32", "1.00000002e+30", "flat index 0",
                      "overflows float16");
  EXPECT_EQ(static_cast<float>(Array::from(f).to<Eigen::bfloat16, 1>()(0)), 1.0002555517425873e30f);  // in bf16's range
  // float32's largest finite value rounds up to inf in bfloat16 (8 mantissa bits).
  f.setValues({std::numeric_limits<float>::max(), 0.0f});
  EXPECT_IO_ERROR_HAS(Array::from(f).to_vector<Eigen::bfloat16>("x"), "x:", "flat index 0", "overflows bfloat16");
  // The same through Variables::get, the path a module's parameters are bound by.
  Variables v;
  v.set("params/query/kernel", d);
  EXPECT_IO_ERROR_HAS((v.get<float, 2>("params/query/kernel", {1, 3})), "params/query/kernel:", "flat index 1");
  EXPECT_EQ((v.get<double, 2>("params/query/kernel", {1, 3})(0, 1)), -1e300);  // no narrowing, no error
}

TEST(FloatOverflow, StoredInfAndNanStay) {
  const double inf = std::numeric_limits<double>::infinity();
  Tensor<double, 1> d(3);
  d.setValues({inf, -inf, std::numeric_limits<double>::quiet_NaN()});
  const Array a = Array::from(d);
  const auto f = a.to_vector<float>();
  EXPECT_EQ(f[0], std::numeric_limits<float>::infinity());
  EXPECT_EQ(f[1], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f[2]));
  const auto h = a.to_vector<Eigen::half>();
  EXPECT_EQ(bits_of(h[0]), 0x7C00);
  EXPECT_EQ(bits_of(h[1]), 0xFC00);
  EXPECT_TRUE(Eigen::numext::isnan(h[2]));
  const auto b = a.to_vector<Eigen::bfloat16>();
  EXPECT_EQ(bits_of(b[0]), 0x7F80);
  EXPECT_TRUE(Eigen::numext::isnan(b[2]));
}

// int32 and bool arrays bind into float parameters as Flax's promote_dtype computes them
// (jnp.asarray(x, float32): round to nearest even; bool as 0/1), throwing only where
// that would give inf (float16 above 65504).
TEST(FloatOverflow, IntegerAndBoolParametersConvertAsFlaxComputes) {
  Variables v;
  Tensor<std::int32_t, 3> k(1, 1, 3);
  k.setValues({{{16777217, -7, 3}}});  // 2^24 + 1 is not a float32: Flax rounds it to 2^24
  v.set("params/query/kernel", k);
  const Tensor<float, 3> got = v.get<float, 3>("params/query/kernel", {1, 1, 3});
  EXPECT_EQ(got(0, 0, 0), 16777216.0f);
  EXPECT_EQ(got(0, 0, 1), -7.0f);
  EXPECT_EQ(got(0, 0, 2), 3.0f);
  Tensor<bool, 1> m(2);
  m.setValues({true, false});
  v.set("params/out/bias", m);
  const Tensor<Eigen::bfloat16, 1> b = v.get<Eigen::bfloat16, 1>("params/out/bias", {2});
  EXPECT_EQ(static_cast<float>(b(0)), 1.0f);
  EXPECT_EQ(static_cast<float>(b(1)), 0.0f);
  k.setValues({{{1, 70000, 2}}});
  v.set("params/key/kernel", k);
  EXPECT_IO_ERROR_HAS((v.get<Eigen::half, 3>("params/key/kernel", {1, 1, 3})), "params/key/kernel:", "70000",
                      "flat index 1", "overflows float16");
}

TEST(FloatBits, DoubleToHalfTypesRoundsOnce) {
  // Just above a tie: a detour through float would round to the tie, then to even (down).
  Tensor<double, 1> d(4);
  d.setValues({1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40), 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40),
               -(1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40)), 1.0 + std::ldexp(1.0, -8)});
  const auto a = Array::from(d);
  const auto b = a.to_vector<Eigen::bfloat16>();
  EXPECT_EQ(bits_of(b[0]), 0x3F81);
  EXPECT_EQ(bits_of(b[2]), 0xBF81);
  EXPECT_EQ(bits_of(b[3]), 0x3F80);  // exact tie still goes to even
  const auto h = a.to_vector<Eigen::half>();
  EXPECT_EQ(bits_of(h[1]), 0x3C01);
  EXPECT_EQ(bits_of(h[3]), 0x3C04);  // 1 + 2^-8 is exact in f16
}

// ---------------------------------------------------------------- integer conversions (typed)

template <class T>
class IntConversion : public ::testing::Test {};
using IntTypes = ::testing::Types<std::int8_t, std::int16_t, std::int32_t, std::int64_t, std::uint8_t, std::uint16_t,
                                  std::uint32_t, std::uint64_t>;
TYPED_TEST_SUITE(IntConversion, IntTypes, NumpyNames);

TYPED_TEST(IntConversion, RoundTripAndLimits) {
  using T = TypeParam;
  using L = std::numeric_limits<T>;
  Tensor<T, 1> t(4);
  t.setValues({L::min(), L::max(), T(0), T(1)});
  const Array a = Array::from(t);
  EXPECT_EQ(a.dtype(), linen::io::dtype_of<T>());
  const Tensor<T, 1> back = a.to<T, 1>();
  for (Index i = 0; i < 4; ++i) EXPECT_EQ(back(i), t(i));
  // Little-endian: max of an unsigned type is all 0xFF; of a signed type 0x7F last.
  const auto& bytes = a.bytes();
  EXPECT_EQ(bytes[2 * sizeof(T) - 1], std::is_signed_v<T> ? 0x7F : 0xFF);
}

TYPED_TEST(IntConversion, RangeChecked) {
  using T = TypeParam;
  using L = std::numeric_limits<T>;
  Tensor<T, 2> t(1, 3);
  t.setValues({{T(1), L::max(), L::min()}});
  const Array a = Array::from(t);
  // To int64: fits unless the value is a uint64 above INT64_MAX.
  if constexpr (std::is_same_v<T, std::uint64_t>) {
    EXPECT_IO_ERROR_HAS((a.to<std::int64_t, 2>("cache/cache_index")), "cache/cache_index", "18446744073709551615",
                        "flat index 1", "int64");
  } else {
    const auto w = a.to<std::int64_t, 2>();
    EXPECT_EQ(w(0, 1), static_cast<std::int64_t>(L::max()));
    EXPECT_EQ(w(0, 2), static_cast<std::int64_t>(L::min()));
  }
  // To int8: max fits only for int8 itself.
  if constexpr (sizeof(T) == 1 && std::is_signed_v<T>) {
    EXPECT_EQ((a.to<std::int8_t, 2>()(0, 1)), 127);
  } else {
    EXPECT_IO_ERROR_HAS((a.to<std::int8_t, 2>("p")), "p:", "flat index 1", "does not fit in int8",
                        std::to_string(+L::max()));
  }
  // To uint64: signed minimums are negative.
  if constexpr (std::is_signed_v<T>) {
    EXPECT_IO_ERROR_HAS((a.to<std::uint64_t, 2>()), "flat index 2", "uint64", std::to_string(+L::min()));
  } else {
    EXPECT_EQ((a.to<std::uint64_t, 2>()(0, 1)), static_cast<std::uint64_t>(L::max()));
  }
  // Integer -> bool is refused; integer -> float is allowed.
  if constexpr (!std::is_same_v<T, std::uint8_t>) EXPECT_IO_ERROR_HAS((a.to<bool, 2>()), "bool");
  EXPECT_EQ((a.to<double, 2>()(0, 0)), 1.0);
}

TEST(IntConversion, SmallValuesConvertBetweenAllIntegerTypes) {
  Tensor<std::int64_t, 1> t(3);
  t.setValues({0, 5, 127});
  const Array a = Array::from(t);
  EXPECT_EQ((a.to<std::uint8_t, 1>()(2)), 127);
  EXPECT_EQ((a.to<std::int16_t, 1>()(1)), 5);
  EXPECT_EQ((a.to<std::uint32_t, 1>()(2)), 127u);
  EXPECT_EQ(a.to_vector<std::int8_t>(), (std::vector<std::int8_t>{0, 5, 127}));
}

TEST(IntConversion, IntegerOverflowingFloat16Throws) {
  Tensor<std::int32_t, 1> t(2);
  t.setValues({65504, 70000});
  const Array a = Array::from(t);
  EXPECT_IO_ERROR_HAS((a.to<Eigen::half, 1>("w")), "w:", "70000", "flat index 1", "float16");
  EXPECT_EQ(static_cast<float>(a.to<Eigen::bfloat16, 1>()(1)), 70144.0f);  // bf16 has float's range
}

// ---------------------------------------------------------------- bool conversions

TEST(BoolConversion, BoolAndU8ZeroOne) {
  const Array b(DType::BOOL, {2, 2}, {1, 0, 0, 1});
  const auto t = b.to<bool, 2>();
  EXPECT_TRUE(t(0, 0));
  EXPECT_FALSE(t(0, 1));
  EXPECT_TRUE(t(1, 1));
  const Array u(DType::U8, {3}, {0, 1, 1});
  EXPECT_EQ(u.to_vector<bool>(), (std::vector<bool>{false, true, true}));
  EXPECT_EQ(b.to_vector<std::int32_t>(), (std::vector<std::int32_t>{1, 0, 0, 1}));
  EXPECT_IO_ERROR_HAS((Array(DType::I32, {1}, {1, 0, 0, 0}).to<bool, 1>("mask")), "mask:", "int32", "bool");
  EXPECT_IO_ERROR_HAS((Array(DType::I8, {1}, {1}).to<bool, 1>("mask")), "int8");
}

TEST(BoolConversion, ByteOtherThanZeroOneIsAnError) {
  const Array b(DType::BOOL, {4}, {1, 0, 2, 1});
  EXPECT_IO_ERROR_HAS((b.to<bool, 1>("mask")), "mask:", "byte 2", "flat index 2", "bool array of shape (4,)");
  EXPECT_IO_ERROR_HAS((b.to<float, 1>("mask")), "byte 2", "flat index 2");
  EXPECT_IO_ERROR_HAS(b.to_vector<std::int32_t>("mask"), "byte 2");
  const Array u(DType::U8, {2}, {0, 255});
  EXPECT_IO_ERROR_HAS((u.to<bool, 1>("m")), "byte 255", "flat index 1", "uint8");
  EXPECT_EQ(u.to_vector<float>()[1], 255.0f);  // as a number U8 255 is fine
}

// ---------------------------------------------------------------- Variables

Tensor<float, 3> kernel(Index a, Index b, Index c, float start = 0) {
  Tensor<float, 3> t(a, b, c);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = start + static_cast<float>(i);
  return t;
}

Variables sample() {
  Variables v;
  v.set("params/query/kernel", kernel(16, 4, 4));
  v.set("params/query/bias", Tensor<float, 2>(4, 4).setConstant(0.5f));
  v.set("params/key/kernel", kernel(16, 4, 4, 100));
  v.set("params_ema/query/kernel", kernel(2, 2, 2));
  Tensor<std::int32_t, 0> ci;
  ci() = 3;
  v.set("cache/cache_index", ci);
  v.metadata["case"] = "sample";
  return v;
}

TEST(Variables, SetGetContainsEraseAndOrder) {
  Variables v = sample();
  EXPECT_EQ(v.size(), 5u);
  EXPECT_FALSE(v.empty());
  EXPECT_TRUE(v.contains("params/query/kernel"));
  EXPECT_FALSE(v.contains("params/query"));
  EXPECT_EQ(v.paths(), (std::vector<std::string>{"cache/cache_index", "params/key/kernel", "params/query/bias",
                                                 "params/query/kernel", "params_ema/query/kernel"}));
  std::vector<std::string> it;
  for (const auto& [path, a] : v) {
    it.push_back(path);
    EXPECT_GT(a.bytes().size(), 0u);
  }
  EXPECT_EQ(it, v.paths());
  const auto k = v.get<float, 3>("params/key/kernel");
  EXPECT_EQ(k(0, 0, 1), 101.0f);
  EXPECT_EQ((v.get<std::int32_t, 0>("cache/cache_index")()), 3);
  EXPECT_EQ((v.get<std::int64_t, 0>("cache/cache_index")()), 3);
  EXPECT_EQ(v.at("cache/cache_index").dtype(), DType::I32);
  // set replaces.
  v.set("params/query/bias", Array(DType::BF16, {4}, std::vector<std::uint8_t>(8)));
  EXPECT_EQ(v.at("params/query/bias").shape(), Shape{4});
  EXPECT_EQ(v.size(), 5u);
  EXPECT_TRUE(v.erase("params/query/bias"));
  EXPECT_FALSE(v.erase("params/query/bias"));
  EXPECT_EQ(v.size(), 4u);
  EXPECT_TRUE(Variables().empty());
}

TEST(Variables, MissingPathNamesItAndNearbyPaths) {
  const Variables v = sample();
  EXPECT_IO_ERROR_HAS(v.at("params/query/kernl"), "missing tensor 'params/query/kernl'", "params/query/kernel");
  EXPECT_IO_ERROR_HAS((v.get<float, 3>("params/value/kernel")), "missing tensor 'params/value/kernel'", "params/");
  EXPECT_IO_ERROR_HAS(Variables().at("x"), "missing tensor 'x'", "no tensors");
}

TEST(Variables, GetWithExpectedShape) {
  const Variables v = sample();
  const auto k = v.get<float, 3>("params/query/kernel", {16, 4, 4});
  EXPECT_EQ(k(15, 3, 3), 255.0f);
  EXPECT_IO_ERROR_HAS((v.get<float, 3>("params/query/kernel", {16, 4, 2})),
                      "params/query/kernel: shape (16, 4, 2) expected, file has (16, 4, 4)");
  EXPECT_IO_ERROR_HAS((v.get<float, 2>("params/query/bias", {4, 1})), "(4, 1) expected", "(4, 4)");
  EXPECT_THROW((v.get<float, 3>("params/query/kernel", {16, 4})), std::invalid_argument);
  EXPECT_IO_ERROR_HAS((v.get<float, 2>("params/missing", {4, 4})), "missing tensor 'params/missing'");
  // The shape check comes with the dtype conversion.
  EXPECT_EQ((v.get<Eigen::half, 3>("params/query/kernel", {16, 4, 4})(0, 0, 3)), Eigen::half(3.0f));
  EXPECT_EQ((v.get<std::int32_t, 0>("cache/cache_index", {})()), 3);  // scalar: shape ()
  EXPECT_IO_ERROR_HAS((v.get<std::int32_t, 1>("cache/cache_index", {1})), "shape (1,) expected, file has ()");
}

TEST(Variables, InvalidPathsAreRefused) {
  Variables v;
  const Array a(DType::U8, {1}, {0});
  for (const char* bad : {"", "/a", "a/", "a//b", "__metadata__", "/"})
    EXPECT_THROW(v.set(bad, a), std::invalid_argument) << "'" << bad << "'";
  EXPECT_TRUE(v.empty());
  EXPECT_NO_THROW(v.set("a b/c.d-0", a));
}

TEST(Variables, SubtreeStripsThePrefix) {
  const Variables v = sample();
  const Variables p = v.subtree("params");
  EXPECT_EQ(p.paths(), (std::vector<std::string>{"key/kernel", "query/bias", "query/kernel"}));  // not params_ema
  EXPECT_EQ(p.at("query/kernel"), v.at("params/query/kernel"));
  EXPECT_EQ(p.metadata, v.metadata);
  EXPECT_EQ(v.subtree("params/").paths(), p.paths());
  EXPECT_EQ(v.subtree("params/query").paths(), (std::vector<std::string>{"bias", "kernel"}));
  EXPECT_EQ(v.subtree(""), v);
  EXPECT_IO_ERROR_HAS(v.subtree("param"), "param/");
  EXPECT_IO_ERROR_HAS(v.subtree("params/value"), "params/value/");
  EXPECT_IO_ERROR_HAS(v.subtree("params/query/kernel"), "params/query/kernel/");  // a leaf is not a subtree
}

TEST(Variables, MergeUnderAPrefix) {
  const Variables v = sample();
  Variables out;
  out.merge("params", v.subtree("params"));
  out.merge("cache/", v.subtree("cache"));
  out.merge("", v.subtree("params_ema").subtree("query"));
  EXPECT_EQ(out.paths(), (std::vector<std::string>{"cache/cache_index", "kernel", "params/key/kernel",
                                                   "params/query/bias", "params/query/kernel"}));
  EXPECT_EQ(out.at("params/key/kernel"), v.at("params/key/kernel"));
  EXPECT_TRUE(out.metadata.empty());
  // merge replaces what is there.
  Variables w;
  w.set("query/bias", Array(DType::F32, {}, std::vector<std::uint8_t>(4)));
  out.merge("params", w);
  EXPECT_EQ(out.at("params/query/bias").shape(), Shape{});
  EXPECT_THROW(out.merge("/", w), std::invalid_argument);
  EXPECT_THROW(out.merge("a//b", w), std::invalid_argument);
}

TEST(Variables, Equality) {
  Variables a = sample(), b = sample();
  EXPECT_EQ(a, b);
  b.metadata["x"] = "y";
  EXPECT_NE(a, b);
  b = sample();
  b.set("params/query/kernel", kernel(16, 4, 4, 1));
  EXPECT_NE(a, b);
}

}  // namespace

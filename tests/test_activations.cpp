// SPDX-License-Identifier: Apache-2.0
// linen/activations.hpp: gelu (both forms), silu/swish, relu, softmax, log_softmax and
// their vjps, against a float64 restatement of jax/_src/nn/functions.py written out here,
// on properties (softmax sums to 1, log_softmax = log(softmax), shift invariance, no
// overflow), against central finite differences in double, and on the errors.
// Typed over float, double, Eigen::half and Eigen::bfloat16.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include <linen/activations.hpp>

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;

template <class T, int N>
Tensor<T, N> random_tensor(const std::array<Index, N>& dims, unsigned seed, double stddev = 2.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  Tensor<T, N> t(dims);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(normal(gen));
  return t;
}

// One unit in the last place of T at |v| (the spacing of T's values there).
template <class T>
double ulp(double v) {
  const double a = std::max(std::abs(v), static_cast<double>(std::numeric_limits<T>::min()));
  const int e = static_cast<int>(std::floor(std::log2(a)));
  return std::ldexp(1.0, e - (std::numeric_limits<T>::digits - 1));
}

// How far T's result may lie from the float64 restatement `ref`: the final rounding to T
// (one ulp of T for half types) plus the error of computing in float (libm, the order of
// operations, cancellation), a few float ulps of `scale`, the size of the intermediates
// (|x| for the elementwise functions, 1 or |log| for the softmaxes).
template <class T>
double allowed(double ref, double scale) {
  scale = std::max(std::abs(ref), std::abs(scale));
  if constexpr (std::is_same_v<T, double>) return 1e-13 * std::max(1.0, scale);
  else if constexpr (std::is_same_v<T, float>) return 8 * ulp<float>(scale);
  else return ulp<T>(ref) + 8 * ulp<float>(scale);
}

// Every y[i] within allowed() of ref(i); `scale(i)` as for allowed (default |x[i]|).
template <class T, int N, class Ref>
void expect_restated(const Tensor<T, N>& x, const Tensor<T, N>& y, Ref ref, const char* what, double min_scale = 0) {
  ASSERT_EQ(linen::shape_of(x), linen::shape_of(y));
  for (Index i = 0; i < y.size(); ++i) {
    const double r = ref(i), xv = static_cast<double>(x.data()[i]);
    EXPECT_NEAR(static_cast<double>(y.data()[i]), r, allowed<T>(r, std::max(std::abs(xv), min_scale)))
        << what << " at " << i << ", x = " << xv;
  }
}

// jax.nn's constants as rounded to T (np.sqrt(...).astype(dtype), weak Python floats).
template <class T>
double in_dtype(double c) {
  return static_cast<double>(static_cast<T>(c));
}

template <class T>
class Activations : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(Activations, ElementTypes);

// ---- gelu -----------------------------------------------------------------------------

TYPED_TEST(Activations, GeluDefaultIsTheTanhApproximation) {
  using T = TypeParam;
  const auto x = random_tensor<T, 2>({3, 17}, 1);
  const Tensor<T, 2> d = linen::gelu(x), a = linen::gelu(x, true), e = linen::gelu(x, false);
  bool differs = false;
  for (Index i = 0; i < x.size(); ++i) {
    EXPECT_EQ(static_cast<double>(d.data()[i]), static_cast<double>(a.data()[i]));
    differs |= static_cast<double>(a.data()[i]) != static_cast<double>(e.data()[i]);
  }
  EXPECT_TRUE(differs) << "the two forms of gelu must differ somewhere";
}

TYPED_TEST(Activations, GeluApproximateMatchesFloat64Restatement) {
  using T = TypeParam;
  const auto x = random_tensor<T, 3>({2, 3, 11}, 2);
  const auto y = linen::gelu(x, true);
  const double s = in_dtype<T>(std::sqrt(2.0 / 3.14159265358979323846)), c = in_dtype<T>(0.044715);
  expect_restated(x, y, [&](Index i) {
    const double v = static_cast<double>(x.data()[i]);
    return v * (0.5 * (1.0 + std::tanh(s * (v + c * v * v * v))));
  }, "gelu(approximate)");
}

TYPED_TEST(Activations, GeluExactMatchesTheErfForm) {
  using T = TypeParam;
  const auto x = random_tensor<T, 2>({4, 13}, 3);
  const auto y = linen::gelu(x, false);
  // x * Phi(x) = x/2 (1 + erf(x / sqrt 2)): the same function as JAX's erfc form.
  expect_restated(x, y, [&](Index i) {
    const double v = static_cast<double>(x.data()[i]);
    if constexpr (linen::is_half_type_v<T> || std::is_same_v<T, float>) {
      return 0.5 * v * std::erfc(-v * in_dtype<T>(std::sqrt(0.5)));  // the dtype's sqrt(1/2)
    } else {
      return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    }
  }, "gelu(exact)");
}

// For half types the constants are the dtype's: over a grid of bfloat16 / half inputs,
// gelu rounds to the float64 formula with T's sqrt(2/pi) and 0.044715 more often than to
// the one with float64's (they differ by up to 2^-9 relative in bfloat16).
template <class T>
void expect_gelu_uses_dtype_constants() {
  Tensor<T, 1> x(801);
  for (Index i = 0; i < 801; ++i) x(i) = static_cast<T>(-4.0 + 0.01 * static_cast<double>(i));
  const auto y = linen::gelu(x);
  const auto formula = [](double v, double s, double c) { return v * (0.5 * (1.0 + std::tanh(s * (v + c * v * v * v)))); };
  const double s_exact = std::sqrt(2.0 / 3.14159265358979323846), c_exact = 0.044715;
  int dtype_matches = 0, float64_matches = 0;
  for (Index i = 0; i < 801; ++i) {
    const double v = static_cast<double>(x(i)), got = static_cast<double>(y(i));
    dtype_matches += got == static_cast<double>(static_cast<T>(formula(v, in_dtype<T>(s_exact), in_dtype<T>(c_exact))));
    float64_matches += got == static_cast<double>(static_cast<T>(formula(v, s_exact, c_exact)));
  }
  EXPECT_GT(dtype_matches, float64_matches) << linen::dtype_name<T>();
  EXPECT_GE(dtype_matches, 790) << linen::dtype_name<T>();  // all but values next to a rounding boundary
}
TEST(GeluHalfTypes, UseTheDtypesConstants) {
  expect_gelu_uses_dtype_constants<Eigen::bfloat16>();
  expect_gelu_uses_dtype_constants<Eigen::half>();
}

// ---- silu / swish / relu --------------------------------------------------------------

TYPED_TEST(Activations, SiluIsXTimesSigmoidAndSwishIsSilu) {
  using T = TypeParam;
  const auto x = random_tensor<T, 2>({3, 9}, 4, 4.0);
  const auto y = linen::silu(x), w = linen::swish(x);
  expect_restated(x, y, [&](Index i) {
    const double v = static_cast<double>(x.data()[i]);
    return v / (1.0 + std::exp(-v));
  }, "silu");
  for (Index i = 0; i < x.size(); ++i) EXPECT_EQ(static_cast<double>(w.data()[i]), static_cast<double>(y.data()[i]));
}

TYPED_TEST(Activations, ReluKeepsPositivesAndNaN) {
  using T = TypeParam;
  Tensor<T, 1> x(5);
  x.setValues({T(-1.5f), T(0.0f), T(2.25f), T(-0.0f), T(std::numeric_limits<float>::quiet_NaN())});
  const auto y = linen::relu(x);
  EXPECT_EQ(static_cast<double>(y(0)), 0.0);
  EXPECT_EQ(static_cast<double>(y(1)), 0.0);
  EXPECT_EQ(static_cast<double>(y(2)), 2.25);
  EXPECT_EQ(static_cast<double>(y(3)), 0.0);
  EXPECT_TRUE(std::isnan(static_cast<double>(y(4))));  // jnp.maximum propagates NaN
  Tensor<T, 1> g(5);
  g.setConstant(T(3.0f));
  const auto dx = linen::relu_vjp(x, g);
  EXPECT_EQ(static_cast<double>(dx(0)), 0.0);
  EXPECT_EQ(static_cast<double>(dx(1)), 0.0);  // the derivative at 0 is 0 (jax.nn.relu)
  EXPECT_EQ(static_cast<double>(dx(2)), 3.0);
}

// ---- softmax / log_softmax ------------------------------------------------------------

// float64 restatement: exp(x - max) / sum over the groups of `axis` of a [A, B, C] tensor.
template <class T>
std::vector<double> softmax_ref(const Tensor<T, 3>& x, const std::vector<int>& axes, bool log) {
  const Index A = x.dimension(0), B = x.dimension(1), C = x.dimension(2);
  std::vector<bool> red(3, false);
  for (int a : axes) red[static_cast<std::size_t>(a < 0 ? a + 3 : a)] = true;
  std::vector<double> out(static_cast<std::size_t>(x.size()));
  auto key = [&](Index a, Index b, Index c) {  // the group's representative
    return (red[0] ? 0 : a) * B * C + (red[1] ? 0 : b) * C + (red[2] ? 0 : c);
  };
  std::vector<double> mx(static_cast<std::size_t>(x.size()), -INFINITY), sum(static_cast<std::size_t>(x.size()), 0);
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) {
        auto& m = mx[static_cast<std::size_t>(key(a, b, c))];
        m = std::max(m, static_cast<double>(x(a, b, c)));
      }
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c)
        sum[static_cast<std::size_t>(key(a, b, c))] += std::exp(static_cast<double>(x(a, b, c)) - mx[key(a, b, c)]);
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) {
        const std::size_t k = static_cast<std::size_t>(key(a, b, c));
        const double s = static_cast<double>(x(a, b, c)) - mx[k];
        out[static_cast<std::size_t>((a * B + b) * C + c)] = log ? s - std::log(sum[k]) : std::exp(s) / sum[k];
      }
  return out;
}

TYPED_TEST(Activations, SoftmaxMatchesFloat64RestatementOverEveryAxisSet) {
  using T = TypeParam;
  const auto x = random_tensor<T, 3>({3, 4, 5}, 5, 3.0);
  for (const std::vector<int>& axes :
       {std::vector<int>{-1}, std::vector<int>{0}, std::vector<int>{1}, std::vector<int>{0, 2},
        std::vector<int>{2, -1, 1}, std::vector<int>{0, 1, 2}}) {
    SCOPED_TRACE(::testing::Message() << "axes " << ::testing::PrintToString(axes));
    const auto y = linen::softmax(x, axes);
    const auto ref = softmax_ref(x, axes, false);
    expect_restated(x, y, [&](Index i) { return ref[static_cast<std::size_t>(i)]; }, "softmax", 1.0);
    const auto ly = linen::log_softmax(x, axes);
    const auto lref = softmax_ref(x, axes, true);
    expect_restated(x, ly, [&](Index i) { return lref[static_cast<std::size_t>(i)]; }, "log_softmax", 1.0);
  }
  // the int overload is the one-axis set; the default axis is -1
  const auto a = linen::softmax(x), b = linen::softmax(x, 2), c = linen::softmax(x, std::vector<int>{-1});
  for (Index i = 0; i < x.size(); ++i) {
    EXPECT_EQ(static_cast<double>(a.data()[i]), static_cast<double>(b.data()[i]));
    EXPECT_EQ(static_cast<double>(a.data()[i]), static_cast<double>(c.data()[i]));
  }
}

TYPED_TEST(Activations, SoftmaxSumsToOneAndLogSoftmaxIsItsLog) {
  using T = TypeParam;
  const auto x = random_tensor<T, 2>({6, 33}, 6, 5.0);
  for (int axis : {0, 1, -2}) {
    const auto y = linen::softmax(x, axis);
    const auto ly = linen::log_softmax(x, axis);
    const int ax = axis < 0 ? axis + 2 : axis;
    const Index groups = x.dimension(1 - ax), n = x.dimension(ax);
    const double tol = std::is_same_v<T, double> ? 1e-14 : (std::is_same_v<T, float> ? 1e-6 : 2 * ulp<T>(1.0));
    const double eps_t = std::ldexp(1.0, 1 - std::numeric_limits<T>::digits);
    for (Index g = 0; g < groups; ++g) {
      double s = 0;
      for (Index k = 0; k < n; ++k) {
        const Index i = ax == 1 ? g * n + k : k * groups + g;
        const double p = static_cast<double>(y.data()[i]);
        EXPECT_GE(p, 0.0);
        s += p;
        // log_softmax = log(softmax), where softmax is representable in T (not underflowed)
        if (p > 1e-3) {
          EXPECT_NEAR(static_cast<double>(ly.data()[i]), std::log(p),
                      2 * eps_t + 4 * ulp<T>(std::max(std::abs(std::log(p)), 16.0)));
        }
      }
      EXPECT_NEAR(s, 1.0, tol) << "axis " << axis << " group " << g;
    }
  }
}

TYPED_TEST(Activations, SoftmaxIsShiftInvariantAndDoesNotOverflow) {
  using T = TypeParam;
  Tensor<T, 1> x(3), big(3);
  x.setValues({T(1.0f), T(2.0f), T(3.0f)});
  const double shift = linen::is_half_type_v<T> ? 8192.0 : 1.0e4;  // exact in every type
  for (Index i = 0; i < 3; ++i) big(i) = static_cast<T>(static_cast<double>(x(i)) + shift);
  const auto a = linen::softmax(x), b = linen::softmax(big);
  const auto la = linen::log_softmax(x), lb = linen::log_softmax(big);
  for (Index i = 0; i < 3; ++i) {
    if (static_cast<double>(big(i)) - shift != static_cast<double>(x(i))) continue;  // not exact in T
    EXPECT_EQ(static_cast<double>(a(i)), static_cast<double>(b(i)));
    EXPECT_EQ(static_cast<double>(la(i)), static_cast<double>(lb(i)));
    EXPECT_TRUE(std::isfinite(static_cast<double>(lb(i))));
  }
  // a group of -inf is NaN (jnp.max's initial is -inf: -inf - -inf), as in JAX
  Tensor<T, 1> ninf(2);
  ninf.setConstant(T(-std::numeric_limits<float>::infinity()));
  EXPECT_TRUE(std::isnan(static_cast<double>(linen::softmax(ninf)(0))));
}

// ---- vjps against central finite differences in double --------------------------------

template <class F, class V>
void expect_vjp_matches_fd(F forward, V vjp, const Tensor<double, 2>& x0, const char* what) {
  const Tensor<double, 2> g = random_tensor<double, 2>({x0.dimension(0), x0.dimension(1)}, 99, 1.0);
  const Tensor<double, 2> analytic = vjp(x0, g);
  Tensor<double, 2> x = x0;
  const double eps = 1e-6;
  double worst = 0, scale = 0;
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + eps;
    const Tensor<double, 2> up = forward(x);
    x.data()[i] = saved - eps;
    const Tensor<double, 2> down = forward(x);
    x.data()[i] = saved;
    double fd = 0;
    for (Index j = 0; j < x.size(); ++j) fd += g.data()[j] * (up.data()[j] - down.data()[j]) / (2 * eps);
    worst = std::max(worst, std::abs(fd - analytic.data()[i]));
    scale = std::max(scale, std::abs(fd));
  }
  EXPECT_GT(scale, 0.0) << what << ": the finite differences are all zero";
  EXPECT_LE(worst, 1e-7 * std::max(1.0, scale)) << what;
}

TEST(ActivationVjps, MatchCentralFiniteDifferencesInDouble) {
  const auto x = random_tensor<double, 2>({4, 7}, 7, 2.0);
  using X = Tensor<double, 2>;
  expect_vjp_matches_fd([](const X& v) { return linen::gelu(v); },
                        [](const X& v, const X& g) { return linen::gelu_vjp(v, g); }, x, "gelu(approximate)");
  expect_vjp_matches_fd([](const X& v) { return linen::gelu(v, false); },
                        [](const X& v, const X& g) { return linen::gelu_vjp(v, g, false); }, x, "gelu(exact)");
  expect_vjp_matches_fd([](const X& v) { return linen::silu(v); },
                        [](const X& v, const X& g) { return linen::silu_vjp(v, g); }, x, "silu");
  expect_vjp_matches_fd([](const X& v) { return linen::swish(v); },
                        [](const X& v, const X& g) { return linen::swish_vjp(v, g); }, x, "swish");
  expect_vjp_matches_fd([](const X& v) { return linen::relu(v); },
                        [](const X& v, const X& g) { return linen::relu_vjp(v, g); }, x, "relu");
  for (int axis : {0, -1}) {
    expect_vjp_matches_fd([axis](const X& v) { return linen::softmax(v, axis); },
                          [axis](const X& v, const X& g) { return linen::softmax_vjp(v, g, axis); }, x, "softmax");
    expect_vjp_matches_fd([axis](const X& v) { return linen::log_softmax(v, axis); },
                          [axis](const X& v, const X& g) { return linen::log_softmax_vjp(v, g, axis); }, x,
                          "log_softmax");
  }
  const std::vector<int> both{0, 1};
  expect_vjp_matches_fd([&](const X& v) { return linen::softmax(v, both); },
                        [&](const X& v, const X& g) { return linen::softmax_vjp(v, g, both); }, x, "softmax (0, 1)");
  expect_vjp_matches_fd([&](const X& v) { return linen::log_softmax(v, both); },
                        [&](const X& v, const X& g) { return linen::log_softmax_vjp(v, g, both); }, x,
                        "log_softmax (0, 1)");
}

// Half types and float: the vjp is the double vjp rounded (it computes in float).
TYPED_TEST(Activations, VjpsAgreeWithTheFloat64Vjp) {
  using T = TypeParam;
  const auto x = random_tensor<T, 2>({3, 8}, 8);
  const auto g = random_tensor<T, 2>({3, 8}, 9, 1.0);
  const Tensor<double, 2> xd = x.template cast<double>(), gd = g.template cast<double>();
  const auto check = [&](const Tensor<T, 2>& got, const Tensor<double, 2>& want, const char* what) {
    double scale = 0;
    for (Index i = 0; i < want.size(); ++i) scale = std::max(scale, std::abs(want.data()[i]));
    for (Index i = 0; i < want.size(); ++i)
      EXPECT_NEAR(static_cast<double>(got.data()[i]), want.data()[i], allowed<T>(want.data()[i], 4 * scale))
          << what << " at " << i;
  };
  // gelu's derivative restated in float64 with T's constants (for half types they differ
  // from float64's by up to 2^-9 relative: the dtype's function, not float64's).
  const double s = in_dtype<T>(std::sqrt(2.0 / 3.14159265358979323846)), c = in_dtype<T>(0.044715);
  Tensor<double, 2> dgelu(xd.dimensions());
  for (Index i = 0; i < xd.size(); ++i) {
    const double v = xd.data()[i], t = std::tanh(s * (v + c * v * v * v));
    dgelu.data()[i] = gd.data()[i] * (0.5 * (1 + t) + v * 0.5 * (1 - t * t) * s * (1 + 3 * c * v * v));
  }
  check(linen::gelu_vjp(x, g), dgelu, "gelu_vjp");
  check(linen::silu_vjp(x, g), linen::silu_vjp(xd, gd), "silu_vjp");
  check(linen::softmax_vjp(x, g), linen::softmax_vjp(xd, gd), "softmax_vjp");
  check(linen::log_softmax_vjp(x, g), linen::log_softmax_vjp(xd, gd), "log_softmax_vjp");
}

// ---- errors ---------------------------------------------------------------------------

template <class F>
std::string message_of(F f) {
  try {
    f();
  } catch (const linen::invalid_argument& e) {
    return e.what();
  }
  ADD_FAILURE() << "no linen::invalid_argument thrown";
  return {};
}

TEST(ActivationErrors, NameTheAxisAndTheShape) {
  const Tensor<float, 2> x(2, 3);
  EXPECT_NE(message_of([&] { linen::softmax(x, 2); }).find("softmax: axis 2 is out of range for an input of shape (2, 3) (rank 2)"),
            std::string::npos);
  EXPECT_NE(message_of([&] { linen::log_softmax(x, -3); }).find("log_softmax: axis -3"), std::string::npos);
  EXPECT_NE(message_of([&] { linen::softmax(x, std::vector<int>{0, 5}); }).find("axis 5"), std::string::npos);
  const Tensor<float, 2> g(3, 2);
  EXPECT_NE(message_of([&] { linen::gelu_vjp(x, g); }).find("gelu_vjp: cotangent has shape (3, 2), the output's shape is (2, 3)"), std::string::npos);
  EXPECT_NE(message_of([&] { linen::softmax_vjp(x, g); }).find("softmax_vjp: cotangent"), std::string::npos);
  // linen::invalid_argument is a std::invalid_argument too
  EXPECT_THROW(linen::relu_vjp(x, g), std::invalid_argument);
}

// Maps of caller memory are read as tensors are.
TEST(Activations, TakeMaps) {
  std::vector<float> storage{1.0f, -2.0f, 0.5f, 3.0f};
  const linen::ConstTensorMap<float, 2> x(storage.data(), 2, 2);
  const Tensor<float, 2> t = x;
  EXPECT_EQ(linen::softmax(x)(1, 1), linen::softmax(t)(1, 1));
  EXPECT_EQ(linen::gelu_vjp(x, t)(0, 1), linen::gelu_vjp(t, t)(0, 1));
  linen::TensorMap<float, 2> m(storage.data(), 2, 2);
  EXPECT_EQ(linen::relu(m)(0, 1), 0.0f);
}

TEST(ActivationErrors, RankZeroAndEmptyTensors) {
  Tensor<float, 0> s;
  s() = -2.0f;
  EXPECT_EQ(linen::relu(s)(), 0.0f);
  EXPECT_THROW(linen::softmax(s), linen::invalid_argument);  // axis -1 of a rank-0 tensor
  const Tensor<float, 2> empty(0, 4);
  EXPECT_EQ(linen::softmax(empty).size(), 0);
  EXPECT_EQ(linen::gelu(empty).size(), 0);
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// linen::initializers against jax.nn.initializers / flax.linen.initializers:
//   - lecun_normal of a 16x16 kernel under jax.random.key(5) (prng_reference);
//   - SelfAttention(...).init(jax.random.key(seed), x): every kernel re-derived from
//     Flax's rng stream (module path + param counter) and DenseGeneral's flattened
//     shape (init_default, init_qkv_out_normqk);
//   - the statistics, bounds and fan arithmetic of every built-in, in every type.
#include <linen/dense.hpp>
#include <linen/initializers.hpp>
#include <linen/layer_norm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <linen/io/safetensors.hpp>

#ifndef LINEN_TEST_DATA_DIR
#define LINEN_TEST_DATA_DIR "/work/main/tests/data"
#endif

namespace {

using linen::Index;
using linen::Shape;
namespace init = linen::initializers;
namespace random = linen::random;

linen::io::Variables fixture(const std::string& name) {
  return linen::io::load_safetensors(std::string(LINEN_TEST_DATA_DIR) + "/flax/" + name + ".safetensors");
}

std::int64_t ulp_distance(float a, float b) {
  std::int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if ((ia < 0) != (ib < 0)) return a == b ? 0 : INT64_MAX;
  return std::abs(static_cast<std::int64_t>(ia) - ib);
}

template <class P, class Init>
std::vector<P> run(const Init& initializer, const random::Key& key, const Shape& shape) {
  std::vector<P> out(static_cast<std::size_t>(linen::num_elements(shape)));
  initializer(key, shape, out.data());
  return out;
}

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

// ---------------------------------------------------------------- golden: JAX / Flax

TEST(InitializersGolden, LecunNormalMatchesJax) {
  const auto v = fixture("prng_reference");
  const auto want = v.at("lecun_normal5_16x16").to_vector<float>("lecun_normal5_16x16");
  const auto got = run<float>(init::lecun_normal(), random::key(5), {16, 16});
  ASSERT_EQ(got.size(), want.size());
  std::int64_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const auto d = ulp_distance(got[i], want[i]);
    EXPECT_LE(d, 1) << "[" << i << "] " << got[i] << " vs JAX " << want[i];
    worst = std::max(worst, d);
  }
  RecordProperty("max_ulps", std::to_string(worst));
}

struct InitCase {
  const char* file;
  std::uint64_t seed;  // the file's __metadata__ init_seed
  Index in_features, num_heads, head_dim, out_features;
  bool normalize_qk;
};

// Module.init(jax.random.key(seed), x) of nn.SelfAttention: each DenseGeneral `name`
// draws its kernel first (counter 1) and its bias second (counter 2) from the 'params'
// stream folded with its name; the kernel initializer sees DenseGeneral's flattened
// shape (prod(in dims), prod(feature dims)).
TEST(InitializersGolden, FlaxSelfAttentionInitKernels) {
  for (const InitCase& c : {InitCase{"init_default", 0, 16, 4, 4, 16, false},
                            InitCase{"init_qkv_out_normqk", 1, 12, 2, 4, 6, true}}) {
    SCOPED_TRACE(c.file);
    const auto v = fixture(c.file);
    ASSERT_EQ(v.metadata.at("init_seed"), std::to_string(c.seed));
    const random::Key root = random::key(c.seed);
    random::RngScope scope(root);
    const Index hd = c.num_heads * c.head_dim;
    for (const std::string name : {"query", "key", "value", "out"}) {
      SCOPED_TRACE(name);
      const Shape flat = name == "out" ? Shape{hd, c.out_features} : Shape{c.in_features, hd};
      const Shape stored =
          name == "out" ? Shape{c.num_heads, c.head_dim, c.out_features} : Shape{c.in_features, c.num_heads, c.head_dim};
      const auto& kernel = v.at("params/" + name + "/kernel");
      ASSERT_EQ(kernel.shape(), stored);
      const auto want = kernel.to_vector<float>(name);
      random::RngScope module = scope.push(name);
      const random::Key kernel_key = module.make_rng();
      EXPECT_EQ(kernel_key, random::flax_rng(root, {name}, 1));
      const auto got = run<float>(init::lecun_normal(), kernel_key, flat);  // row-major: reshape is free
      double max_abs = 0;
      std::int64_t worst = 0;
      for (std::size_t i = 0; i < got.size(); ++i) {
        max_abs = std::max(max_abs, std::abs(static_cast<double>(got[i]) - want[i]));
        worst = std::max(worst, ulp_distance(got[i], want[i]));
      }
      EXPECT_LE(max_abs, 1e-6);
      EXPECT_LE(worst, 1);
      RecordProperty(std::string(c.file) + "_" + name + "_max_ulps", std::to_string(worst));
      // The bias draws the second key; zeros ignore it.
      const random::Key bias_key = module.make_rng();
      EXPECT_EQ(bias_key, random::flax_rng(root, {name}, 2));
      const auto& bias = v.at("params/" + name + "/bias");
      const auto bias_want = bias.to_vector<float>(name + "/bias");
      EXPECT_EQ(run<float>(init::zeros_init(), bias_key, bias.shape()), bias_want);
    }
    if (c.normalize_qk) {
      for (const std::string name : {"query_ln", "key_ln"}) {
        const auto& scale = v.at("params/" + name + "/scale");
        EXPECT_EQ(run<float>(init::ones_init(), scope.push(name).make_rng(), scale.shape()),
                  scale.to_vector<float>(name));
      }
    }
    // A different seed, or the wrong module name, gives a different kernel.
    const auto other = run<float>(init::lecun_normal(), random::flax_rng(root, {"keys"}, 1), {c.in_features, hd});
    EXPECT_NE(other, v.at("params/key/kernel").to_vector<float>("key"));
  }
}

// DenseGeneral and LayerNorm draw their parameters from their scope's counter in Flax's
// declaration order (flax/linen/linear.py: kernel then bias; normalization.py: scale then
// bias; flax/core/scope.py: each self.param takes make_rng('params'), counting from 1):
// init(key) is a top-level module (the root scope, empty path), init(scope) a submodule at
// the scope's path, whose counter advances as Flax's does.
TEST(ModuleInit, DenseAndLayerNormDrawTheirScopesKeysInDeclarationOrder) {
  linen::DenseGeneral<float, float, 1, 2>::Config dc;
  dc.features = {2, 3};
  dc.bias_init = init::normal{0.5};
  const linen::DenseGeneral<float, float, 1, 2> dense(dc);
  const random::Key root = random::key(3);
  const auto top = dense.init(root, {4});
  EXPECT_EQ(top.kernel.size(), 24);
  const auto same = [](const auto& t, const std::vector<float>& want) {
    return t.size() == static_cast<Index>(want.size()) &&
           std::memcmp(t.data(), want.data(), sizeof(float) * want.size()) == 0;
  };
  EXPECT_TRUE(same(top.kernel, run<float>(init::lecun_normal(), random::flax_rng(root, {}, 1), {4, 6})));
  EXPECT_TRUE(same(top.bias, run<float>(dc.bias_init, random::flax_rng(root, {}, 2), {6})));
  // A submodule at mlp/dense_0, from an input tensor; the caller's scope counts the draws.
  random::RngScope scope = random::RngScope(root).push("mlp").push("dense_0");
  linen::Tensor<float, 3> x(2, 5, 4);
  x.setZero();
  const auto sub = dense.init(scope, x);
  EXPECT_EQ(scope.counter(), 2u);
  EXPECT_TRUE(same(sub.kernel, run<float>(init::lecun_normal(), random::flax_rng(root, {"mlp", "dense_0"}, 1), {4, 6})));
  EXPECT_TRUE(same(sub.bias, run<float>(dc.bias_init, random::flax_rng(root, {"mlp", "dense_0"}, 2), {6})));
  // No bias: the kernel alone draws (counter 1).
  auto nb = dc;
  nb.use_bias = false;
  random::RngScope s2(root);
  const auto nbp = linen::DenseGeneral<float, float, 1, 2>(nb).init(s2, {4});
  EXPECT_EQ(s2.counter(), 1u);
  EXPECT_EQ(nbp.bias.size(), 0);

  linen::LayerNorm<float>::Config lc;
  lc.scale_init = init::normal{0.1};
  lc.bias_init = init::normal{0.2};
  const linen::LayerNorm<float> ln(lc);
  random::RngScope ls = random::RngScope(root).push("ln");
  const auto lp = ln.init(ls, x);
  EXPECT_EQ(ls.counter(), 2u);
  EXPECT_TRUE(same(lp.scale, run<float>(lc.scale_init, random::flax_rng(root, {"ln"}, 1), {4})));
  EXPECT_TRUE(same(lp.bias, run<float>(lc.bias_init, random::flax_rng(root, {"ln"}, 2), {4})));
  auto no_scale = lc;
  no_scale.use_scale = false;
  const auto bp = linen::LayerNorm<float>(no_scale).init(root, 4);  // the bias is the first draw
  EXPECT_TRUE(same(bp.bias, run<float>(lc.bias_init, random::flax_rng(root, {}, 1), {4})));
  // A C++ engine makes the root key from its next two draws.
  std::mt19937 engine(9), copy(9);
  const auto from_engine = ln.init(engine, 4);
  EXPECT_TRUE(same(from_engine.scale, run<float>(lc.scale_init, random::flax_rng(random::key_from_engine(copy), {}, 1), {4})));
}

// The two-key init(in_dims, kernel_key, bias_key) of earlier versions is gone: two
// make_rng() calls in one argument list would draw in an order the compiler picks.
template <class M, class = void>
struct takes_two_keys : std::false_type {};
template <class M>
struct takes_two_keys<M, std::void_t<decltype(std::declval<const M&>().init(
                             4, std::declval<random::Key>(), std::declval<random::Key>()))>> : std::true_type {};
static_assert(!takes_two_keys<linen::LayerNorm<float>>::value);
static_assert(!takes_two_keys<linen::DenseGeneral<float>>::value);

// ---------------------------------------------------------------- fans

TEST(InitializersFans, MatchJaxComputeFans) {
  auto f = init::compute_fans({16, 64});
  EXPECT_EQ(f.fan_in, 16);
  EXPECT_EQ(f.fan_out, 64);
  // A conv kernel (3, 3, 16, 32): receptive field 9.
  f = init::compute_fans({3, 3, 16, 32});
  EXPECT_EQ(f.fan_in, 144);
  EXPECT_EQ(f.fan_out, 288);
  // DenseGeneral-style axes: in = (0, 1), out = (2,).
  f = init::compute_fans({4, 5, 6}, {0, 1}, {2});
  EXPECT_EQ(f.fan_in, 20);
  EXPECT_EQ(f.fan_out, 6);
  // A batch axis is excluded from the receptive field.
  f = init::compute_fans({8, 4, 5}, {-2}, {-1}, {0});
  EXPECT_EQ(f.fan_in, 4);
  EXPECT_EQ(f.fan_out, 5);
  // The unflattened attention kernel (16, 4, 4) with the defaults: in 4, out 4, field 16.
  f = init::compute_fans({16, 4, 4});
  EXPECT_EQ(f.fan_in, 64);
  EXPECT_EQ(f.fan_out, 64);
}

TEST(InitializersFans, BadShapesThrowNamingTheShape) {
  const auto expect_throw_mentioning = [](const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no exception, expected one mentioning " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_throw_mentioning([] { init::compute_fans({16}); }, "(16,)");
  expect_throw_mentioning([] { init::compute_fans({}); }, "()");
  expect_throw_mentioning([] { init::compute_fans({4, 5}, {2}); }, "in_axis 2");
  expect_throw_mentioning([] { init::compute_fans({4, 5}, {-2}, {-3}); }, "out_axis -3");
  expect_throw_mentioning([] { init::compute_fans({0, 5}); }, "(0, 5)");
  float buf[8];
  expect_throw_mentioning([&] { init::lecun_normal()(random::key(0), {8}, buf); }, "(8,)");
  expect_throw_mentioning([&] { init::variance_scaling{-1.0}(random::key(0), {2, 4}, buf); }, "-1.0");
  expect_throw_mentioning([&] { init::truncated_normal{1.0, 2.0, -2.0}(random::key(0), {8}, buf); }, "(8,)");
  expect_throw_mentioning([&] { init::normal{}(random::key(0), {2, 4}, static_cast<float*>(nullptr)); }, "(2, 4)");
  expect_throw_mentioning([&] { init::zeros{}(random::key(0), {2, -4}, buf); }, "(2, -4)");
}

// ---------------------------------------------------------------- every type

template <class P>
class InitializersTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
// Names the typed cases by numpy dtype (float32, float64, float16, bfloat16).
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};
TYPED_TEST_SUITE(InitializersTyped, ElementTypes, DtypeNames);

// Relative slack on a sample stddev: the sampling error over 2^17 draws (6 sigma),
// plus, for bfloat16, its 8-bit significand and 128-point uniform grid.
template <class P>
double stddev_slack() {
  return std::is_same_v<P, Eigen::bfloat16> ? 0.04 : 0.015;
}

// Slack on a sample mean, in units of the stddev, beyond sampling error: JAX draws
// half types from a grid of 2^m uniforms (m = 10 for float16, 7 for bfloat16), whose
// left Riemann sum moves the mean by about (x_max - x_min) / 2^(m+1) <= 6 / 2^(m+1).
template <class P>
double mean_grid_slack() {
  if constexpr (std::is_same_v<P, Eigen::bfloat16>) return 6.0 / 256;
  else if constexpr (std::is_same_v<P, Eigen::half>) return 6.0 / 2048;
  else return 0.0;
}

TYPED_TEST(InitializersTyped, ConstantsFillExactly) {
  using P = TypeParam;
  const Shape shape{3, 5};
  for (double x : as_doubles(run<P>(init::zeros{}, random::key(0), shape))) EXPECT_EQ(x, 0.0);
  for (double x : as_doubles(run<P>(init::ones{}, random::key(0), shape))) EXPECT_EQ(x, 1.0);
  for (double x : as_doubles(run<P>(init::constant{-7.0}, random::key(0), shape))) EXPECT_EQ(x, -7.0);
  // A constant is rounded to the parameter type once, as np.array(value, dtype).
  const double third = static_cast<double>(run<P>(init::constant{1.0 / 3}, random::key(0), {1})[0]);
  EXPECT_NEAR(third, 1.0 / 3, 1.0 / 3 * std::ldexp(1.0, -std::numeric_limits<P>::digits));
}

TYPED_TEST(InitializersTyped, UniformNormalTruncatedNormalScaleTheirDraws) {
  using P = TypeParam;
  const Shape shape{256, 512};
  const double n = 256.0 * 512;
  const auto u = as_doubles(run<P>(init::uniform{0.5}, random::key(1), shape));
  for (double x : u) {
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 0.5);
  }
  EXPECT_NEAR(mean_of(u), 0.25, 6 * 0.5 / std::sqrt(12 * n) + 0.5 / std::sqrt(12.0) * mean_grid_slack<P>());
  EXPECT_NEAR(stddev_of(u), 0.5 / std::sqrt(12.0), 0.5 / std::sqrt(12.0) * stddev_slack<P>());
  // Exactly random.uniform * scale, elementwise in P.
  const auto raw = random::uniform<P>(random::key(1), shape);
  const auto scaled = run<P>(init::uniform{0.5}, random::key(1), shape);
  for (std::size_t i = 0; i < raw.size(); i += 997) EXPECT_EQ(static_cast<double>(scaled[i]), static_cast<double>(P(raw[i] * P(0.5f))));

  const auto g = as_doubles(run<P>(init::normal{0.02}, random::key(2), shape));
  EXPECT_NEAR(mean_of(g), 0.0, 6 * 0.02 / std::sqrt(n) + 0.02 * mean_grid_slack<P>());
  EXPECT_NEAR(stddev_of(g), 0.02, 0.02 * stddev_slack<P>());

  // Flax's truncated_normal(stddev) applies no correction: stddev 0.8796 * stddev.
  const auto t = as_doubles(run<P>(init::truncated_normal{0.1}, random::key(3), shape));
  for (double x : t) {
    ASSERT_GT(x, -0.2 - 1e-3);
    ASSERT_LT(x, 0.2 + 1e-3);
  }
  EXPECT_NEAR(stddev_of(t), 0.1 * 0.87962566103423978, 0.1 * stddev_slack<P>());
  const auto asym = as_doubles(run<P>(init::truncated_normal{1.0, -1.0, 3.0}, random::key(4), shape));
  for (double x : asym) {
    ASSERT_GT(x, -1.0);
    ASSERT_LT(x, 3.0);
  }
}

// variance_scaling: stddev sqrt(scale / fan) for every distribution and mode.
TYPED_TEST(InitializersTyped, VarianceScalingHitsItsVariance) {
  using P = TypeParam;
  const Shape shape{256, 512};  // fan_in 256, fan_out 512, fan_avg 384
  const double n = 256.0 * 512;
  struct Named {
    const char* name;
    init::variance_scaling vs;
    double variance;
  };
  const std::vector<Named> cases = {
      {"lecun_normal", init::lecun_normal(), 1.0 / 256},
      {"lecun_uniform", init::lecun_uniform(), 1.0 / 256},
      {"glorot_normal", init::glorot_normal(), 1.0 / 384},
      {"glorot_uniform", init::glorot_uniform(), 1.0 / 384},
      {"he_normal", init::he_normal(), 2.0 / 256},
      {"he_uniform", init::he_uniform(), 2.0 / 256},
      {"fan_out normal", init::variance_scaling{3.0, init::FanMode::fan_out, init::Distribution::normal}, 3.0 / 512},
  };
  for (const Named& c : cases) {
    SCOPED_TRACE(c.name);
    const auto x = as_doubles(run<P>(c.vs, random::key(5), shape));
    const double sd = std::sqrt(c.variance);
    EXPECT_NEAR(mean_of(x), 0.0, 6 * sd / std::sqrt(n) + sd * mean_grid_slack<P>());
    EXPECT_NEAR(stddev_of(x), sd, sd * stddev_slack<P>());
    double bound = 0;
    switch (c.vs.distribution) {
      case init::Distribution::uniform: bound = std::sqrt(3 * c.variance); break;
      case init::Distribution::truncated_normal: bound = 2 * sd / 0.87962566103423978; break;
      case init::Distribution::normal: bound = 7 * sd; break;
    }
    for (double v : x) ASSERT_LE(std::abs(v), bound * (1 + 1e-2)) << v;
  }
}

TYPED_TEST(InitializersTyped, AliasesAreTheSameInitializers) {
  using P = TypeParam;
  const Shape shape{8, 16};
  const auto k = random::key(6);
  const auto d = [&](const init::variance_scaling& vs) { return as_doubles(run<P>(vs, k, shape)); };
  EXPECT_EQ(d(init::xavier_normal()), d(init::glorot_normal()));
  EXPECT_EQ(d(init::xavier_uniform()), d(init::glorot_uniform()));
  EXPECT_EQ(d(init::kaiming_normal()), d(init::he_normal()));
  EXPECT_EQ(d(init::kaiming_uniform()), d(init::he_uniform()));
  EXPECT_NE(d(init::glorot_normal()), d(init::he_normal()));
  // he = lecun with twice the variance: the same draws, sqrt(2) larger.
  const auto he = d(init::he_normal());
  const auto lecun = d(init::lecun_normal());
  for (std::size_t i = 0; i < he.size(); ++i)
    EXPECT_NEAR(he[i], std::sqrt(2.0) * lecun[i], 4 * std::abs(lecun[i]) * std::ldexp(1.0, 1 - std::numeric_limits<P>::digits));
}

// ---------------------------------------------------------------- callables and engines

TEST(InitializersCallables, BuiltinsAndLambdasAreInitializers) {
  std::vector<init::Initializer<float>> inits = {init::zeros{}, init::ones_init(), init::constant{2.5},
                                                 init::normal{}, init::lecun_normal()};
  int calls = 0;
  inits.emplace_back([&calls](random::Key key, const Shape& shape, float* out) {
    ++calls;
    random::uniform<float>(key, shape, -0.5f, 0.5f, out);
  });
  std::vector<float> buf(12);
  for (const auto& f : inits) f(random::key(3), {3, 4}, buf.data());
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(buf, random::uniform<float>(random::key(3), {3, 4}, -0.5f, 0.5f));
  // The same built-in converts to every parameter type (each type draws its own bits,
  // as in JAX, so the values differ between types).
  init::Initializer<double> d = init::lecun_normal();
  init::Initializer<Eigen::bfloat16> b = init::lecun_normal();
  std::vector<double> dv(12);
  std::vector<Eigen::bfloat16> bv(12);
  d(random::key(3), {3, 4}, dv.data());
  b(random::key(3), {3, 4}, bv.data());
  EXPECT_EQ(dv, run<double>(init::lecun_normal(), random::key(3), {3, 4}));
  const double bound = 2 * std::sqrt(1.0 / 3) / 0.87962566103423978;
  for (std::size_t i = 0; i < 12; ++i) {
    EXPECT_LT(std::abs(dv[i]), bound);
    EXPECT_LT(std::abs(static_cast<double>(bv[i])), bound * 1.01);
  }
}

TEST(InitializersCallables, AnEngineSeedsAKeyWithTwoDraws) {
  std::mt19937 engine(123), copy(123);
  std::vector<float> a(64), b(64);
  init::lecun_normal()(engine, {8, 8}, a.data());
  init::lecun_normal()(random::key_from_engine(copy), {8, 8}, b.data());
  EXPECT_EQ(a, b);
  EXPECT_EQ(engine(), copy());  // both consumed exactly two draws
  init::normal{}(engine, {8, 8}, a.data());
  EXPECT_NE(a, b);
  std::minstd_rand small_range(1);  // 31-bit engine
  init::uniform{}(small_range, {8, 8}, a.data());
  for (float x : a) {
    EXPECT_GE(x, 0.0f);
    EXPECT_LT(x, 0.01f);
  }
}

}  // namespace

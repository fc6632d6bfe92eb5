// SPDX-License-Identifier: Apache-2.0
// linen/embed.hpp, rms_norm.hpp, dropout.hpp, dense_layer.hpp: Embed, RMSNorm, Dropout and
// Dense against
//   - the outputs printed in Flax's own docstrings (doctested by Flax's CI; the source is
//     google/flax at 18f8f311, flax/linen/linear.py and stochastic.py): Embed's table for
//     jax.random.key(0), and the MLP of nn.Dropout's docstring (Dense(4) then
//     Dropout(0.5), init key 0, dropout key 1);
//   - init bit-identical by construction: each parameter equals its initializer run on the
//     key Flax's rng stream gives it (random::flax_rng(root, path, counter), as
//     test_initializers.cpp checks DenseGeneral's);
//   - a float64 restatement of each module and its properties (RMS of RMSNorm's rows,
//     attend = matmul with the transposed table, Dropout's keep rate and scaling);
//   - their vjps against central finite differences in double;
//   - the errors.
#include <array>
#include <cstdint>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <linen/dense_layer.hpp>
#include <linen/dropout.hpp>
#include <linen/embed.hpp>
#include <linen/grad.hpp>  // vjp(DenseGeneral), which a Dense is
#include <linen/rms_norm.hpp>

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
namespace random = linen::random;
namespace init = linen::initializers;

template <class T, int N>
Tensor<T, N> random_tensor(const std::array<Index, N>& dims, unsigned seed, double stddev = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  Tensor<T, N> t(dims);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(normal(gen));
  return t;
}

template <class T, int N>
Tensor<T, N> zeros(const std::array<Index, N>& dims) {
  Tensor<T, N> t(dims);
  t.setZero();
  return t;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (linen::shape_of(a) != linen::shape_of(b)) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (!(static_cast<double>(a.data()[i]) == static_cast<double>(b.data()[i]))) return false;
  return true;
}

template <class P, class Init>
std::vector<P> run(const Init& initializer, const random::Key& key, const Shape& shape) {
  std::vector<P> out(static_cast<std::size_t>(linen::num_elements(shape)));
  initializer(key, shape, out.data());
  return out;
}
template <class T, int N, class P>
bool equals(const Tensor<T, N>& t, const std::vector<P>& v) {
  if (static_cast<std::size_t>(t.size()) != v.size()) return false;
  for (Index i = 0; i < t.size(); ++i)
    if (!(static_cast<double>(t.data()[i]) == static_cast<double>(v[static_cast<std::size_t>(i)]))) return false;
  return true;
}

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
#define EXPECT_MESSAGE(stmt, text) EXPECT_NE(message_of([&] { stmt; }).find(text), std::string::npos) << #stmt

// sum(cotangent * f(x)) differentiated by central differences at each of the n doubles of
// `x` (restored afterwards), compared with `analytic`.
template <class Loss>
void expect_fd(const Loss& loss, double* x, const double* analytic, Index n, const char* what) {
  const double eps = 1e-6;
  double worst = 0, scale = 0;
  for (Index i = 0; i < n; ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double up = loss();
    x[i] = saved - eps;
    const double down = loss();
    x[i] = saved;
    const double fd = (up - down) / (2 * eps);
    worst = std::max(worst, std::abs(fd - analytic[i]));
    scale = std::max(scale, std::abs(fd));
  }
  EXPECT_GT(scale, 0.0) << what << ": the finite differences are all zero";
  EXPECT_LE(worst, 1e-7 * std::max(1.0, scale)) << what;
}
template <class A, class B>
double dot(const A& a, const B& b) {
  double s = 0;
  for (Index i = 0; i < a.size(); ++i) s += static_cast<double>(a.data()[i]) * static_cast<double>(b.data()[i]);
  return s;
}

// ==========================================================================================
// Embed
// ==========================================================================================

linen::Embed<float>::Config embed_config(Index n, Index f) {
  linen::Embed<float>::Config c;
  c.num_embeddings = n;
  c.features = f;
  return c;
}

// flax/linen/linear.py, Embed's docstring: nn.Embed(num_embeddings=5, features=3)
// initialised with jax.random.key(0), then applied to [[0, 1, 2], [-1, -2, -3]].
TEST(Embed, MatchesFlaxDocstring) {
  const linen::Embed<float> embed(embed_config(5, 3));
  Tensor<int, 2> idx(2, 3);
  idx.setValues({{0, 1, 2}, {-1, -2, -3}});
  const auto p = embed.init(random::key(0), idx);
  const double flax[5][3] = {{0.04396089, -0.9328513, -0.97328115},
                             {0.41147125, 0.66334754, 0.49469155},
                             {0.09719624, 0.49861377, 0.49519277},
                             {-0.13316602, 0.6697022, 0.3710195},
                             {-0.5039532, 0.287319, 1.4369922}};
  ASSERT_EQ(linen::shape_of(p.embedding), (Shape{5, 3}));
  for (Index r = 0; r < 5; ++r)
    for (Index c = 0; c < 3; ++c) EXPECT_NEAR(p.embedding(r, c), flax[r][c], 6e-8) << r << ", " << c;
  const auto y = embed.apply(p, idx);
  ASSERT_EQ(linen::shape_of(y), (Shape{2, 3, 3}));
  const int rows[2][3] = {{0, 1, 2}, {4, 3, 2}};  // negative indices wrap, as jnp.take's do
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 3; ++i)
      for (Index c = 0; c < 3; ++c) EXPECT_EQ(y(b, i, c), p.embedding(rows[b][i], c));
}

// variance_scaling(1.0, 'fan_in', 'normal', out_axis=0): fan_in = features (see
// embed.hpp), so the table is N(0, 1) * sqrt(1 / features) on the scope's first key.
TEST(Embed, InitIsTheInitializerOnFlaxsKey) {
  const random::Key root = random::key(7);
  const linen::Embed<float> embed(embed_config(6, 4));
  const auto top = embed.init(root);
  std::vector<float> normal(24);
  random::normal<float>(random::flax_rng(root, {}, 1), Shape{6, 4}, normal.data());
  for (float& v : normal) v *= std::sqrt(1.0f / 4.0f);
  EXPECT_TRUE(equals(top.embedding, normal));
  random::RngScope scope = random::RngScope(root).push("embed");
  const auto sub = embed.init(scope);
  EXPECT_EQ(scope.counter(), 1u);
  EXPECT_TRUE(equals(sub.embedding, run<float>(init::variance_scaling{1.0, init::FanMode::fan_in,
                                                                       init::Distribution::normal, {-2}, {0}, {}},
                                               random::flax_rng(root, {"embed"}, 1), {6, 4})));
  EXPECT_FALSE(same_bits(top.embedding, sub.embedding));
}

TEST(Embed, LooksUpInDtypeAndThrowsOutOfRange) {
  linen::Embed<Eigen::bfloat16, float>::Config c;
  c.num_embeddings = 4;
  c.features = 2;
  const linen::Embed<Eigen::bfloat16, float> embed(c);
  const auto p = embed.init(random::key(1));
  Tensor<unsigned char, 1> idx(3);
  idx.setValues({3, 0, 3});
  const auto y = embed.apply(p, idx);  // promote_dtype: the table cast to dtype first
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 2; ++j) EXPECT_EQ(y(i, j), static_cast<Eigen::bfloat16>(p.embedding(idx(i), j)));
  Tensor<long, 2> bad(1, 3);
  bad.setValues({{1, 4, 0}});
  EXPECT_MESSAGE(embed.apply(p, bad), "Embed: index 4 at flat position 1 is out of range [-4, 4)");
  bad(0, 1) = -5;
  EXPECT_MESSAGE(embed.apply(p, bad), "index -5 at flat position 1");
  bad(0, 1) = -4;
  EXPECT_EQ(embed.apply(p, bad)(0, 1, 0), embed.apply(p, idx)(1, 0));  // -4 wraps to row 0
  const Tensor<float, 2> wrong = zeros<float, 2>({3, 2});
  EXPECT_MESSAGE(embed.apply(linen::EmbedParams<float>{wrong}, idx), "embedding of shape (3, 2), expected (4, 2)");
  EXPECT_MESSAGE(linen::Embed<float>(embed_config(0, 3)), "num_embeddings and features must be positive");
}

// num_embeddings == 1: Flax broadcasts the one row for every index (jnp.broadcast_to);
// linen does the same for the valid indices 0 and -1 and throws for the rest. Maps and
// unsigned 64-bit indices are read as tensors are.
TEST(Embed, OneEmbeddingMapsAndUnsignedIndices) {
  const linen::Embed<float> embed(embed_config(1, 2));
  const auto p = embed.init(random::key(0));
  std::vector<std::int64_t> storage{0, -1, 0};
  const linen::ConstTensorMap<std::int64_t, 1> idx(storage.data(), 3);
  const auto y = embed.apply(p, idx);
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 2; ++j) EXPECT_EQ(y(i, j), p.embedding(0, j));
  Tensor<std::uint64_t, 1> big(2);
  big.setValues({0, std::numeric_limits<std::uint64_t>::max()});
  EXPECT_MESSAGE(embed.apply(p, big), "index 18446744073709551615 at flat position 1 is out of range [-1, 1)");
}

TEST(Embed, AttendIsTheMatmulWithTheTransposedTable) {
  linen::Embed<double>::Config c;
  c.num_embeddings = 7;
  c.features = 5;
  const linen::Embed<double> embed(c);
  const auto p = embed.init(random::key(2));
  const auto q = random_tensor<double, 3>({2, 3, 5}, 3);
  const auto y = embed.attend(p, q);
  ASSERT_EQ(linen::shape_of(y), (Shape{2, 3, 7}));
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 3; ++i)
      for (Index n = 0; n < 7; ++n) {
        double s = 0;
        for (Index f = 0; f < 5; ++f) s += q(b, i, f) * p.embedding(n, f);
        EXPECT_NEAR(y(b, i, n), s, 1e-13);
      }
  // float: the same within float rounding; bfloat16 dtype: the promoted operands' product
  linen::Embed<Eigen::bfloat16, float>::Config cb;
  cb.num_embeddings = 7;
  cb.features = 5;
  const linen::Embed<Eigen::bfloat16, float> eb(cb);
  const auto pb = eb.init(random::key(2));
  const Tensor<float, 3> qf = q.cast<float>();
  const auto yb = eb.attend(pb, qf);
  for (Index i = 0; i < 2 * 3; ++i)
    for (Index n = 0; n < 7; ++n) {
      double s = 0;
      for (Index f = 0; f < 5; ++f)
        s += static_cast<double>(static_cast<Eigen::bfloat16>(qf.data()[i * 5 + f])) *
             static_cast<double>(static_cast<Eigen::bfloat16>(pb.embedding(n, f)));
      EXPECT_NEAR(static_cast<double>(yb.data()[i * 7 + n]), s, std::abs(s) * 0x1p-8 + 1e-6);
    }
  EXPECT_MESSAGE(embed.attend(p, zeros<double, 2>({2, 4})), "query of shape (2, 4) does not end in features=5");
}

TEST(Embed, VjpsMatchFiniteDifferences) {
  linen::Embed<double>::Config c;
  c.num_embeddings = 4;
  c.features = 3;
  const linen::Embed<double> embed(c);
  auto p = embed.init(random::key(3));
  Tensor<int, 2> idx(2, 3);
  idx.setValues({{1, 3, 1}, {-1, 0, 1}});  // row 1 three times, row 3 twice, row 2 never
  const auto g = random_tensor<double, 3>({2, 3, 3}, 4);
  const auto v = linen::vjp(embed, p, idx);
  EXPECT_TRUE(same_bits(v.output, embed.apply(p, idx)));
  const linen::EmbedParams<double> d = v.pullback(g);
  for (Index f = 0; f < 3; ++f) {
    EXPECT_DOUBLE_EQ(d.embedding(1, f), g(0, 0, f) + g(0, 2, f) + g(1, 2, f));  // scatter-add
    EXPECT_EQ(d.embedding(2, f), 0.0);
  }
  expect_fd([&] { return dot(g, embed.apply(p, idx)); }, p.embedding.data(), d.embedding.data(), 12, "Embed table");

  auto q = random_tensor<double, 2>({3, 3}, 5);
  const auto ga = random_tensor<double, 2>({3, 4}, 6);
  const auto va = linen::vjp_attend(embed, p, q);
  EXPECT_TRUE(same_bits(va.output, embed.attend(p, q)));
  const auto da = va.pullback(ga);
  expect_fd([&] { return dot(ga, embed.attend(p, q)); }, p.embedding.data(), da.params.embedding.data(), 12,
            "attend table");
  expect_fd([&] { return dot(ga, embed.attend(p, q)); }, q.data(), da.query.data(), 9, "attend query");
  EXPECT_MESSAGE(v.pullback(zeros<double, 3>({2, 3, 2})), "Embed vjp: cotangent has shape (2, 3, 2)");
}

// ==========================================================================================
// RMSNorm
// ==========================================================================================

// float64 restatement of Flax's RMSNorm over a [A, B, C] input: mean of squares over
// `axes`, y = x * rsqrt(ms + eps) * scale[feature].
std::vector<double> rms_ref(const Tensor<double, 3>& x, const std::vector<int>& axes, int feature_axis,
                            const std::vector<double>& scale, double eps) {
  std::array<bool, 3> red{};
  for (int a : axes) red[static_cast<std::size_t>(a < 0 ? a + 3 : a)] = true;
  const int fa = feature_axis < 0 ? feature_axis + 3 : feature_axis;
  const Index A = x.dimension(0), B = x.dimension(1), C = x.dimension(2);
  auto key = [&](Index a, Index b, Index c) { return ((red[0] ? 0 : a) * B + (red[1] ? 0 : b)) * C + (red[2] ? 0 : c); };
  std::vector<double> ms(static_cast<std::size_t>(x.size()), 0), cnt(static_cast<std::size_t>(x.size()), 0), out;
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) {
        ms[static_cast<std::size_t>(key(a, b, c))] += x(a, b, c) * x(a, b, c);
        cnt[static_cast<std::size_t>(key(a, b, c))] += 1;
      }
  for (Index a = 0; a < A; ++a)
    for (Index b = 0; b < B; ++b)
      for (Index c = 0; c < C; ++c) {
        const std::size_t k = static_cast<std::size_t>(key(a, b, c));
        const Index f = fa == 0 ? a : (fa == 1 ? b : c);
        const double s = scale.empty() ? 1.0 : scale[static_cast<std::size_t>(f)];
        out.push_back(x(a, b, c) / std::sqrt(ms[k] / cnt[k] + eps) * s);
      }
  return out;
}

linen::RMSNorm<double>::Config rms_config(std::vector<int> axes, int feature_axis) {
  linen::RMSNorm<double>::Config c;
  c.reduction_axes = std::move(axes);
  c.feature_axes = feature_axis;
  c.scale_init = init::normal{1.0};
  return c;
}

TEST(RMSNorm, MatchesFloat64RestatementOverAxes) {
  const auto x = random_tensor<double, 3>({3, 4, 5}, 7, 2.0);
  struct Case {
    std::vector<int> axes;
    int feature;
  };
  for (const Case& k : {Case{{-1}, -1}, Case{{1, 2}, -1}, Case{{1}, 1}, Case{{0}, 2}, Case{{2}, 0}, Case{{0, 1, 2}, 1}}) {
    SCOPED_TRACE(::testing::Message() << "reduction_axes " << ::testing::PrintToString(k.axes) << " feature_axes "
                                      << k.feature);
    const linen::RMSNorm<double> norm(rms_config(k.axes, k.feature));
    const auto p = norm.init(random::key(8), x);
    const int fa = k.feature < 0 ? k.feature + 3 : k.feature;
    ASSERT_EQ(p.scale.size(), x.dimension(fa));
    const auto y = norm.apply(p, x);
    const auto ref = rms_ref(x, k.axes, k.feature, std::vector<double>(p.scale.data(), p.scale.data() + p.scale.size()),
                             1e-6);
    for (Index i = 0; i < x.size(); ++i) EXPECT_NEAR(y.data()[i], ref[static_cast<std::size_t>(i)], 1e-13);
  }
}

TEST(RMSNorm, RowsHaveUnitRmsTimesScaleAndInitIsOnes) {
  const linen::RMSNorm<float> norm;  // Flax's defaults: epsilon 1e-6, scale ones, last axis
  EXPECT_EQ(norm.config().epsilon, 1e-6);
  const auto x = random_tensor<float, 3>({2, 3, 64}, 9, 3.0);
  random::RngScope scope = random::RngScope(random::key(0)).push("norm");
  auto p = norm.init(scope, x);
  EXPECT_EQ(scope.counter(), 1u);  // scale is the scope's first draw
  for (Index j = 0; j < 64; ++j) EXPECT_EQ(p.scale(j), 1.0f);
  for (Index j = 0; j < 64; ++j) p.scale(j) = 0.5f + static_cast<float>(j) / 64.0f;
  const auto y = norm.apply(p, x);
  for (Index r = 0; r < 6; ++r) {
    double ms = 0;
    for (Index j = 0; j < 64; ++j) {
      const double v = y.data()[r * 64 + j] / p.scale(j);
      ms += v * v;
    }
    EXPECT_NEAR(std::sqrt(ms / 64), 1.0, 1e-5) << "row " << r;
  }
  // use_scale=false: no parameter, no draw
  linen::RMSNorm<float>::Config c;
  c.use_scale = false;
  random::RngScope s2(random::key(0));
  EXPECT_EQ(linen::RMSNorm<float>(c).init(s2, x).scale.size(), 0);
  EXPECT_EQ(s2.counter(), 0u);
  // a scale_init draws the scope's first key, on shape (features,)
  linen::RMSNorm<float>::Config cn;
  cn.scale_init = init::normal{0.1};
  EXPECT_TRUE(equals(linen::RMSNorm<float>(cn).init(random::key(4), x).scale,
                     run<float>(init::normal{0.1}, random::flax_rng(random::key(4), {}, 1), {64})));
}

TEST(RMSNorm, HalfTypesComputeStatisticsInFloat) {
  linen::RMSNorm<Eigen::bfloat16, float>::Config c;
  c.scale_init = init::normal{1.0};
  const linen::RMSNorm<Eigen::bfloat16, float> norm(c);
  const auto xf = random_tensor<float, 2>({4, 48}, 10, 20.0);
  const Tensor<Eigen::bfloat16, 2> x = xf.cast<Eigen::bfloat16>();
  const auto p = norm.init(random::key(5), x);
  const auto y = norm.apply(p, x);
  const Tensor<double, 3> xd = x.cast<double>().reshape(std::array<Index, 3>{1, 4, 48});
  const auto ref = rms_ref(xd, {-1}, -1, std::vector<double>(p.scale.data(), p.scale.data() + 48), 1e-6);
  for (Index i = 0; i < x.size(); ++i) {
    const double r = ref[static_cast<std::size_t>(i)];
    EXPECT_NEAR(static_cast<double>(y.data()[i]), r, std::abs(r) * 0x1p-8 + 1e-6) << i;  // one bf16 rounding
  }
}

TEST(RMSNorm, VjpMatchesFiniteDifferences) {
  for (const auto& k : {std::pair<std::vector<int>, int>{{-1}, -1}, {{0, 2}, 1}, {{1}, 0}}) {
    SCOPED_TRACE(::testing::PrintToString(k.first));
    const linen::RMSNorm<double> norm(rms_config(k.first, k.second));
    auto x = random_tensor<double, 3>({2, 3, 4}, 11);
    auto p = norm.init(random::key(6), x);
    const auto g = random_tensor<double, 3>({2, 3, 4}, 12);
    const auto v = linen::vjp(norm, p, x);
    EXPECT_TRUE(same_bits(v.output, norm.apply(p, x)));
    const auto d = v.pullback(g);
    expect_fd([&] { return dot(g, norm.apply(p, x)); }, x.data(), d.input.data(), x.size(), "RMSNorm input");
    expect_fd([&] { return dot(g, norm.apply(p, x)); }, p.scale.data(), d.params.scale.data(), p.scale.size(),
              "RMSNorm scale");
  }
  linen::RMSNorm<double>::Config c;
  c.use_scale = false;
  const linen::RMSNorm<double> plain(c);
  auto x = random_tensor<double, 2>({3, 5}, 13);
  const linen::RMSNormParams<double> none;
  const auto g = random_tensor<double, 2>({3, 5}, 14);
  const auto d = linen::vjp(plain, none, x).pullback(g);
  EXPECT_EQ(d.params.scale.size(), 0);
  expect_fd([&] { return dot(g, plain.apply(none, x)); }, x.data(), d.input.data(), x.size(), "no scale");
}

TEST(RMSNorm, Errors) {
  const linen::RMSNorm<float> norm;
  const auto x = random_tensor<float, 2>({2, 6}, 15);
  const auto p = norm.init(random::key(0), x);
  EXPECT_MESSAGE(norm.apply(p, zeros<float, 2>({2, 5})), "RMSNorm: scale of shape (6,) does not fit input of shape (2, 5)");
  linen::RMSNorm<float>::Config c;
  c.reduction_axes = {0, 2};
  EXPECT_MESSAGE(linen::RMSNorm<float>(c).apply(p, x), "RMSNorm: reduction_axes: axis 2 is out of range for an input of shape (2, 6)");
  c = {};
  c.feature_axes = -3;
  EXPECT_MESSAGE(linen::RMSNorm<float>(c).init(random::key(0), x), "RMSNorm: feature_axes: axis -3");
  c = {};
  c.epsilon = -1;
  EXPECT_MESSAGE(linen::RMSNorm<float> bad(c), "epsilon must be >= 0");
}

// ==========================================================================================
// Dense and Dropout
// ==========================================================================================

linen::Dense<float>::Config dense_config(Index features) {
  linen::Dense<float>::Config c;
  c.features = features;
  return c;
}
linen::Dropout::Config dropout_config(double rate, std::vector<int> broadcast_dims = {}) {
  linen::Dropout::Config c;
  c.rate = rate;
  c.broadcast_dims = std::move(broadcast_dims);
  return c;
}
linen::DropoutCall train(linen::DropoutRng rng = {}) {
  linen::DropoutCall c;
  c.deterministic = false;
  c.rng = std::move(rng);
  return c;
}

// flax/linen/stochastic.py, Dropout's docstring: an MLP of nn.Dense(4) (submodule
// Dense_0) and nn.Dropout(0.5) (Dropout_0), init with jax.random.key(0) on ones((1, 3)),
// applied without and with dropout (rngs={'dropout': jax.random.key(1)}).
TEST(DenseAndDropout, MatchFlaxDocstringMlp) {
  const linen::Dense<float> dense(dense_config(4));
  random::RngScope root(random::key(0));
  random::RngScope dense_scope = root.push("Dense_0");
  Tensor<float, 2> x(1, 3);
  x.setConstant(1.0f);
  const auto p = dense.init(dense_scope, x);
  ASSERT_EQ(linen::shape_of(p.kernel), (Shape{3, 4}));
  const auto h = dense.apply(p, x);
  const double flax_eval[4] = {-0.17875527, 1.6255447, -1.2431065, -0.02554005};
  for (Index j = 0; j < 4; ++j) EXPECT_NEAR(h(0, j), flax_eval[j], 2e-7) << j;

  const linen::Dropout dropout(dropout_config(0.5));
  linen::DropoutCall eval;
  eval.deterministic = true;
  EXPECT_TRUE(same_bits(dropout.apply(h, eval), h));
  const random::Key dropout_key = random::RngScope(random::key(1)).push("Dropout_0").make_rng();
  const auto y = dropout.apply(h, train(dropout_key));
  const double flax_train[4] = {-0.35751054, 3.2510893, 0.0, 0.0};
  for (Index j = 0; j < 4; ++j) EXPECT_NEAR(y(0, j), flax_train[j], 4e-7) << j;
}

// Dense is DenseGeneral with one axis: the same kernel and bias from the same scope, and
// the kernel is lecun_normal on (in_features, features) from the scope's first key.
TEST(DenseAndDropout, DenseIsDenseGeneralWithOneAxis) {
  const random::Key root = random::key(3);
  linen::Dense<float>::Config c = dense_config(5);
  c.bias_init = init::normal{0.5};
  const linen::Dense<float> dense(c);
  linen::DenseGeneral<float, float, 1, 1>::Config gc;
  gc.features = {5};
  gc.bias_init = init::normal{0.5};
  const linen::DenseGeneral<float, float, 1, 1> general(gc);
  random::RngScope s1 = random::RngScope(root).push("mlp").push("Dense_1");
  random::RngScope s2 = random::RngScope(root).push("mlp").push("Dense_1");
  const auto p = dense.init(s1, Index{6});
  const auto q = general.init(s2, std::array<Index, 1>{6});
  EXPECT_EQ(s1.counter(), 2u);
  EXPECT_TRUE(same_bits(p.kernel, q.kernel));
  EXPECT_TRUE(same_bits(p.bias, q.bias));
  EXPECT_TRUE(equals(p.kernel, run<float>(init::lecun_normal(), random::flax_rng(root, {"mlp", "Dense_1"}, 1), {6, 5})));
  EXPECT_TRUE(equals(p.bias, run<float>(init::normal{0.5}, random::flax_rng(root, {"mlp", "Dense_1"}, 2), {5})));

  // apply: x . kernel + bias, restated in float64
  linen::Dense<double>::Config cd;
  cd.features = 3;
  cd.bias_init = init::normal{1.0};
  const linen::Dense<double> dd(cd);
  auto x = random_tensor<double, 3>({2, 2, 4}, 16);
  auto pd = dd.init(random::key(9), x);
  const auto y = dd.apply(pd, x);
  ASSERT_EQ(linen::shape_of(y), (Shape{2, 2, 3}));
  for (Index r = 0; r < 4; ++r)
    for (Index j = 0; j < 3; ++j) {
      double s = pd.bias(j);
      for (Index i = 0; i < 4; ++i) s += x.data()[r * 4 + i] * pd.kernel(i, j);
      EXPECT_NEAR(y.data()[r * 3 + j], s, 1e-13);
    }
  // vjp: DenseGeneral's (a Dense is one)
  const auto g = random_tensor<double, 3>({2, 2, 3}, 17);
  const auto v = linen::vjp(dd, pd, x);
  const auto d = v.pullback(g);
  expect_fd([&] { return dot(g, dd.apply(pd, x)); }, x.data(), d.input.data(), x.size(), "Dense input");
  expect_fd([&] { return dot(g, dd.apply(pd, x)); }, pd.kernel.data(), d.params.kernel.data(), pd.kernel.size(),
            "Dense kernel");
  expect_fd([&] { return dot(g, dd.apply(pd, x)); }, pd.bias.data(), d.params.bias.data(), 3, "Dense bias");

  EXPECT_MESSAGE(linen::Dense<float>(dense_config(0)), "Dense: features must be positive, got 0");
  EXPECT_MESSAGE(dense.apply(p, zeros<float, 2>({2, 5})), "kernel of shape (6, 5) does not fit input of shape (2, 5)");
}

TEST(DenseAndDropout, DropoutMaskIsBernoulliScaledByKeepProb) {
  const random::Key key = random::key(11);
  const auto x = random_tensor<float, 2>({40, 50}, 18);
  const linen::Dropout dropout(dropout_config(0.3));
  const auto y = dropout.apply(x, train(key));
  std::vector<bool> keep = random::bernoulli(key, 0.7, Shape{40, 50});  // jax.random.bernoulli's bits
  Index kept = 0;
  const float keep_prob = static_cast<float>(1.0 - 0.3);
  for (Index i = 0; i < x.size(); ++i) {
    if (keep[static_cast<std::size_t>(i)]) {
      ++kept;
      EXPECT_EQ(y.data()[i], x.data()[i] / keep_prob);  // inputs / keep_prob, in dtype
    } else {
      EXPECT_EQ(y.data()[i], 0.0f);
    }
  }
  EXPECT_NEAR(static_cast<double>(kept) / 2000.0, 0.7, 0.03);  // the keep rate
  // the same key, the same mask; bfloat16 divides by keep_prob rounded to bfloat16
  const Tensor<Eigen::bfloat16, 2> xb = x.cast<Eigen::bfloat16>();
  const auto yb = dropout.apply(xb, train(key));
  const float kpb = static_cast<float>(static_cast<Eigen::bfloat16>(1.0 - 0.3));
  for (Index i = 0; i < x.size(); ++i)
    EXPECT_EQ(yb.data()[i], keep[static_cast<std::size_t>(i)] ? static_cast<Eigen::bfloat16>(static_cast<float>(xb.data()[i]) / kpb)
                                                                : Eigen::bfloat16(0.0f));
}

TEST(DenseAndDropout, DropoutBroadcastDimsShareTheMask) {
  const random::Key key = random::key(12);
  const auto x = random_tensor<double, 3>({3, 4, 5}, 19);
  const linen::Dropout dropout(dropout_config(0.5, {0, -1}));
  const auto y = dropout.apply(x, train(key));
  const std::vector<bool> keep = random::bernoulli(key, 0.5, Shape{1, 4, 1});  // the broadcast shape
  for (Index a = 0; a < 3; ++a)
    for (Index b = 0; b < 4; ++b)
      for (Index c = 0; c < 5; ++c)
        EXPECT_EQ(y(a, b, c), keep[static_cast<std::size_t>(b)] ? x(a, b, c) / 0.5 : 0.0);
  EXPECT_MESSAGE(linen::Dropout(dropout_config(0.5, {3})).apply(x, train(key)),
                 "Dropout: broadcast_dims: axis 3 is out of range for an input of shape (3, 4, 5)");
}

TEST(DenseAndDropout, DropoutRatesDeterministicAndErrors) {
  const auto x = random_tensor<float, 2>({3, 4}, 20);
  // rate 1: zeros, no rng needed (Flax: "Prevent gradient NaNs in 1.0 edge-case")
  const auto z = linen::Dropout(dropout_config(1.0)).apply(x, train());
  for (Index i = 0; i < z.size(); ++i) EXPECT_EQ(z.data()[i], 0.0f);
  // rate 0: the inputs, but deterministic must still be given exactly once (merge_param
  // comes first in Flax's __call__)
  EXPECT_TRUE(same_bits(linen::Dropout(dropout_config(0.0)).apply(x, train()), x));
  EXPECT_MESSAGE(linen::Dropout(dropout_config(0.0)).apply(x), "\"deterministic\" must be passed");
  linen::Dropout::Config both = dropout_config(0.2);
  both.deterministic = true;
  linen::DropoutCall call;
  call.deterministic = true;
  EXPECT_MESSAGE(linen::Dropout(both).apply(x, call), "passed to the constructor and at call time");
  EXPECT_TRUE(same_bits(linen::Dropout(both).apply(x), x));
  EXPECT_MESSAGE(linen::Dropout(dropout_config(0.2)).apply(x, train()), "needs an rng (Flax: make_rng('dropout'))");
  EXPECT_MESSAGE(linen::Dropout(dropout_config(1.5)), "Dropout: rate must be in [0, 1], got 1.5");
  EXPECT_MESSAGE(linen::Dropout(dropout_config(-0.1)), "rate must be in [0, 1]");
  EXPECT_EQ(linen::Dropout(dropout_config(0.1)).config().rng_collection, "dropout");
}

TEST(DenseAndDropout, DropoutVjpReusesTheMask) {
  const auto x = random_tensor<double, 2>({6, 7}, 21);
  const auto g = random_tensor<double, 2>({6, 7}, 22);
  std::mt19937 engine(5);  // an engine advances: the vjp must draw once
  const linen::Dropout dropout(dropout_config(0.4, {1}));
  const auto v = linen::vjp(dropout, x, train(engine));
  const auto dx = v.pullback(g);
  for (Index i = 0; i < x.size(); ++i) {
    const bool kept = v.output.data()[i] != 0.0;
    EXPECT_EQ(dx.data()[i], kept ? g.data()[i] / 0.6 : 0.0);
  }
  // against finite differences with the mask fixed (a Key draws the same mask every time)
  auto xv = x;
  const random::Key key = random::key(13);
  const auto vk = linen::vjp(dropout, xv, train(key));
  const auto dk = vk.pullback(g);
  expect_fd([&] { return dot(g, dropout.apply(xv, train(key))); }, xv.data(), dk.data(), xv.size(), "Dropout");
  // deterministic: the identity; rate 1: zeros
  linen::DropoutCall eval;
  eval.deterministic = true;
  EXPECT_TRUE(same_bits(linen::vjp(dropout, x, eval).pullback(g), g));
  const auto z = linen::vjp(linen::Dropout(dropout_config(1.0)), x, train()).pullback(g);
  for (Index i = 0; i < z.size(); ++i) EXPECT_EQ(z.data()[i], 0.0);
  EXPECT_MESSAGE(v.pullback(zeros<double, 2>({7, 6})), "Dropout vjp: cotangent has shape (7, 6)");
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
//
// linen::nnx: Rngs / RngStream (flax/nnx/rnglib.py), Linear, LinearGeneral, Embed
// (nnx/nn/linear.py), LayerNorm, RMSNorm (nnx/nn/normalization.py), Dropout
// (nnx/nn/stochastic.py), their vjps and io/nnx.hpp's names.
//
// What is checked against what:
//   - keys: rnglib's rule restated here with linen::random's primitives (the n-th draw of a
//     stream is threefry2x32(key, (0, n))), and JAX's own fold_in(key(0), 7) from the
//     prng_reference fixture (the 8th draw of nnx.Rngs(0));
//   - known answers printed in Flax's own docstrings (run as doctests by Flax): the table
//     of nnx.Embed(5, 3, rngs=nnx.Rngs(0)) and nnx.Dropout's MLP example (Linear(3, 4)
//     and Dropout(0.5) from one nnx.Rngs(0), eval and train outputs);
//   - init: each module's draws restated (which stream, which counter, the shape the
//     initializer sees);
//   - numbers: float64 restatements of dot_general, the norms and the vjps;
//   - every error path throws linen::invalid_argument / io_error naming what is at fault,
//     and leaves the Rngs as they were.
#include <linen/nnx/attention.hpp>
#include <linen/nnx/grad.hpp>
#include <linen/nnx/linear.hpp>
#include <linen/nnx/normalization.hpp>
#include <linen/nnx/rnglib.hpp>
#include <linen/nnx/stochastic.hpp>
#include <linen/io/nnx.hpp>
#include <linen/io/safetensors.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#ifndef LINEN_TEST_DATA_DIR
#define LINEN_TEST_DATA_DIR "/work/main/tests/data"
#endif

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen::num_elements;
using linen::shape_of;
namespace nnx = linen::nnx;
namespace random = linen::random;
namespace init = linen::initializers;
namespace io = linen::io;

// rnglib.RngStream.__call__, restated: key n of a stream is fold_in(key, n), which is
// threefry2x32 of the counter pair (0, n).
random::Key nth_key(const random::Key& root, std::uint32_t n) { return random::Key{random::threefry2x32(root, 0u, n)}; }

template <class F>
void expect_throw_with(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one containing '" << needle << "'";
  } catch (const linen::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

std::int64_t ulps(float a, float b) {
  std::int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if ((ia < 0) != (ib < 0)) return a == b ? 0 : INT64_MAX;
  return std::abs(static_cast<std::int64_t>(ia) - ib);
}

template <class T, int N>
std::vector<double> as_doubles(const Tensor<T, N>& t) {
  std::vector<double> v(static_cast<std::size_t>(t.size()));
  for (Index i = 0; i < t.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(t.data()[i]);
  return v;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << what << "[" << i << "]";
}

template <class T, int N>
Tensor<T, N> filled(const std::array<Index, N>& dims, std::uint32_t seed, double scale = 1.0) {
  Tensor<T, N> t(dims);
  const auto v = random::normal<float>(random::key(seed), Shape(dims.begin(), dims.end()));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(scale * v[static_cast<std::size_t>(i)]);
  return t;
}

// ==== Rngs / RngStream =====================================================================

TEST(NnxRngs, StreamDrawsFoldInOfItsCountAndCountsUp) {
  nnx::Rngs rngs(0);
  const random::Key root = random::key(0);
  for (std::uint32_t n = 0; n < 7; ++n) {
    EXPECT_EQ(rngs.stream("default").count(), n);
    EXPECT_EQ(rngs(), nth_key(root, n)) << "draw " << n;
  }
  // The 8th draw of nnx.Rngs(0) is JAX's fold_in(key(0), 7), read from JAX's own output.
  const auto want = io::load_safetensors(std::string(LINEN_TEST_DATA_DIR) + "/flax/prng_reference.safetensors")
                        .at("fold_in0_7")
                        .to_vector<std::uint32_t>();
  EXPECT_EQ(random::key_data(rngs()), (std::array<std::uint32_t, 2>{want[0], want[1]}));
  EXPECT_EQ(rngs["default"].count(), 8u);
  EXPECT_EQ(rngs["default"].key(), root);  // the key itself never changes
}

TEST(NnxRngs, NamedStreamsAndTheDefaultFallback) {
  // nnx.Rngs(0, params=1): params from key(1); any other name is `default` itself.
  nnx::Rngs rngs(0, {{"params", 1}});
  EXPECT_EQ(rngs.size(), 2u);
  EXPECT_TRUE(rngs.contains("params"));
  EXPECT_FALSE(rngs.contains("dropout"));
  EXPECT_EQ(rngs.params(), nth_key(random::key(1), 0));
  EXPECT_EQ(rngs.dropout(), nth_key(random::key(0), 0));        // falls back to default
  EXPECT_EQ(rngs["unknown_stream"](), nth_key(random::key(0), 1));  // the same counter
  EXPECT_EQ(rngs(), nth_key(random::key(0), 2));
  EXPECT_EQ(rngs.params(), nth_key(random::key(1), 1));
  EXPECT_EQ(rngs.items()[0].first, "default");
  EXPECT_EQ(rngs.items()[1].first, "params");
  EXPECT_EQ(rngs["dropout"].tag(), "default");

  // nnx.Rngs(params=0, dropout=1): no default; an unknown stream throws, naming it.
  nnx::Rngs two({{"params", 0}, {"dropout", 1}});
  EXPECT_NE(two.params(), two.dropout());
  expect_throw_with([&] { two["noise"](); }, "No RngStream named 'noise' found in Rngs.");
  expect_throw_with([&] { two(); }, "'default'");
  EXPECT_EQ(two["params"].count(), 1u);
  EXPECT_EQ(two["dropout"].count(), 1u);
  expect_throw_with([] { nnx::Rngs({{"params", 0}, {"params", 1}}); }, "stream 'params' given twice");
  expect_throw_with([] { nnx::Rngs(0, {{"default", 1}}); }, "stream 'default' given twice");
  expect_throw_with([] { nnx::Rngs({{"", 1}}); }, "needs a name");
}

TEST(NnxRngs, KeysSeedsAndKeyData) {
  const random::Key k = random::fold_in(random::key(3), 9);
  nnx::Rngs a({{"params", k}});
  EXPECT_EQ(a.params(), nth_key(k, 0));
  nnx::Rngs b({{"params", random::key_data(k)}});  // a uint32 (2,) array: wrap_key_data
  EXPECT_EQ(b.params(), nth_key(k, 0));
  nnx::Rngs c({{"params", std::uint64_t{1} << 33}});
  EXPECT_EQ(c["params"].key(), random::key(std::uint64_t{1} << 33));
  nnx::Rngs d(-1);
  EXPECT_EQ(d["default"].key(), random::key(static_cast<std::uint64_t>(-1)));
}

TEST(NnxRngs, ForkDrawsOnceFromTheParentAndStartsAtZero) {
  nnx::RngStream s(5, "dropout");
  (void)s();
  nnx::RngStream f = s.fork();
  EXPECT_EQ(s.count(), 2u);
  EXPECT_EQ(f.key(), nth_key(random::key(5), 1));
  EXPECT_EQ(f.count(), 0u);
  EXPECT_EQ(f.tag(), "dropout");
  EXPECT_EQ(f(), nth_key(nth_key(random::key(5), 1), 0));

  // Rngs.fork(): every stream forked.
  nnx::Rngs rngs({{"params", 1}, {"dropout", 2}});
  (void)rngs.params();
  nnx::Rngs forked = rngs.fork();
  EXPECT_EQ(forked["params"].key(), nth_key(random::key(1), 1));
  EXPECT_EQ(forked["dropout"].key(), nth_key(random::key(2), 0));
  EXPECT_EQ(rngs["params"].count(), 2u);
  EXPECT_EQ(rngs["dropout"].count(), 1u);
  EXPECT_NE(rngs.params(), forked.params());  // rnglib's own docstring assertion

  // split(k): random.split of the next draw; each lane a stream of one key, counter 0.
  nnx::RngStream p(7, "params");
  const auto lanes = p.split(3);
  const auto keys = random::split(nth_key(random::key(7), 0), 3);
  ASSERT_EQ(lanes.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(lanes[i].key(), keys[i]);
    EXPECT_EQ(lanes[i].count(), 0u);
  }
  EXPECT_EQ(p.count(), 1u);
  expect_throw_with([&] { p.split(0); }, "k >= 1");
  EXPECT_EQ(p.count(), 1u);
}

TEST(NnxRngs, AStreamGivenToRngsGivesItsKeyNotItsCount) {
  nnx::Rngs first({{"params", 4}});
  (void)first.params();
  (void)first.params();
  nnx::Rngs second(std::vector<nnx::RngStream>{first["params"]});  // nnx.Rngs(params=first.params)
  EXPECT_EQ(second["params"].count(), 0u);
  EXPECT_EQ(second.params(), nth_key(random::key(4), 0));
}

// ==== Linear ===============================================================================

TEST(NnxLinear, InitDrawsKernelThenBiasFromTheParamsStream) {
  nnx::Rngs rngs({{"params", 0}, {"dropout", 1}});
  nnx::Linear<float> lin({3, 4});
  EXPECT_TRUE(lin.config().use_bias);
  const auto p = lin.init(rngs);
  ASSERT_EQ(shape_of(p.kernel), (Shape{3, 4}));
  ASSERT_EQ(shape_of(p.bias), (Shape{4}));
  std::vector<float> want(12);
  init::lecun_normal()(nth_key(random::key(0), 0), Shape{3, 4}, want.data());
  for (Index i = 0; i < 12; ++i) EXPECT_EQ(p.kernel.data()[i], want[static_cast<std::size_t>(i)]);
  for (Index i = 0; i < 4; ++i) EXPECT_EQ(p.bias(i), 0.0f);
  EXPECT_EQ(rngs["params"].count(), 2u);  // kernel and bias (zeros ignores its key, but it was drawn)
  EXPECT_EQ(rngs["dropout"].count(), 0u);

  // use_bias=False: one draw; a second Linear continues the counter.
  nnx::Linear<float> nobias({4, 2, false});
  const auto q = nobias.init(rngs);
  EXPECT_EQ(q.bias.size(), 0);
  EXPECT_EQ(rngs["params"].count(), 3u);
  std::vector<float> want2(8);
  init::lecun_normal()(nth_key(random::key(0), 2), Shape{4, 2}, want2.data());
  for (Index i = 0; i < 8; ++i) EXPECT_EQ(q.kernel.data()[i], want2[static_cast<std::size_t>(i)]);
}

// nnx.Dropout's docstring: MLP(Linear(3, 4), Dropout(0.5)) from nnx.Rngs(0), x = ones((1, 3)).
// Both modules draw from `default` (no params / dropout stream): the kernel is draw 0, the
// bias draw 1, and the Dropout forks draw 2; its first call draws key 0 of the fork.
TEST(NnxLinear, FlaxDocstringMlpKnownAnswer) {
  nnx::Rngs rngs(0);
  nnx::Linear<float> linear({3, 4});
  const auto p = linear.init(rngs);
  nnx::Dropout dropout({0.5});
  nnx::DropoutState ds = dropout.init(rngs);
  EXPECT_EQ(rngs["default"].count(), 3u);
  EXPECT_EQ(ds.rngs->key(), nth_key(random::key(0), 2));

  Tensor<float, 2> x(1, 3);
  x.setConstant(1.0f);
  const float eval_want[4] = {1.0533503f, -1.2679932f, -0.7960095f, -1.2619419f};
  const float train_want[4] = {2.1067007f, -2.5359864f, -1.592019f, -2.5238838f};
  const auto h = linear.apply(p, x);
  const auto eval = dropout.apply(ds, h, {true});  // model.eval()
  const auto train = dropout.apply(ds, h);         // model.train(): deterministic=False, the default
  for (int j = 0; j < 4; ++j) {
    EXPECT_LE(ulps(eval(0, j), eval_want[j]), 2) << j << ": " << eval(0, j);
    EXPECT_LE(ulps(train(0, j), train_want[j]), 2) << j << ": " << train(0, j);
  }
  EXPECT_EQ(ds.rngs->count(), 1u);  // the train call drew once; eval drew nothing
  // The mask is bernoulli(fold_in(fork key, 0), 0.5, (1, 4)): all kept here.
  const auto keep = random::bernoulli(nth_key(ds.rngs->key(), 0), 0.5, Shape{1, 4});
  for (int j = 0; j < 4; ++j) EXPECT_TRUE(keep[static_cast<std::size_t>(j)]);
}

TEST(NnxLinear, ApplyMatchesAFloat64DotGeneralAndItsVjp) {
  nnx::Rngs rngs(11);
  nnx::Linear<double> lin({5, 3});
  auto p = lin.init(rngs);
  p.bias = filled<double, 1>({3}, 2);
  const auto x = filled<double, 3>({2, 4, 5}, 3);
  const auto y = lin.apply(p, x);
  ASSERT_EQ(shape_of(y), (Shape{2, 4, 3}));
  std::vector<double> want(24);
  for (Index r = 0; r < 8; ++r)
    for (Index o = 0; o < 3; ++o) {
      double s = p.bias(o);
      for (Index i = 0; i < 5; ++i) s += x.data()[r * 5 + i] * p.kernel(i, o);
      want[static_cast<std::size_t>(r * 3 + o)] = s;
    }
  expect_close(as_doubles(y), want, 1e-13, "y");

  const auto g = filled<double, 3>({2, 4, 3}, 4);
  auto v = nnx::vjp(lin, p, x);
  const auto grads = v.pullback(g);
  std::vector<double> dk(15, 0), db(3, 0), dx(40, 0);
  for (Index r = 0; r < 8; ++r)
    for (Index o = 0; o < 3; ++o) {
      const double gv = g.data()[r * 3 + o];
      db[static_cast<std::size_t>(o)] += gv;
      for (Index i = 0; i < 5; ++i) {
        dk[static_cast<std::size_t>(i * 3 + o)] += x.data()[r * 5 + i] * gv;
        dx[static_cast<std::size_t>(r * 5 + i)] += p.kernel(i, o) * gv;
      }
    }
  expect_close(as_doubles(grads.params.kernel), dk, 1e-13, "dkernel");
  expect_close(as_doubles(grads.params.bias), db, 1e-13, "dbias");
  expect_close(as_doubles(grads.input), dx, 1e-13, "dx");
}

TEST(NnxLinear, BadConfigsParamsAndInputsThrowAndLeaveTheRngsAlone) {
  expect_throw_with([] { nnx::Linear<float>({0, 4}); }, "in_features=0");
  expect_throw_with([] { nnx::Linear<float>({3, -1}); }, "out_features=-1");
  expect_throw_with([] { nnx::Linear<float>({3, 4, true, linen::Precision::Default, {}}); }, "kernel_init is empty");
  nnx::Linear<float>::Config c{3, 4};
  c.bias_init = {};
  expect_throw_with([&] { nnx::Linear<float>{c}; }, "bias_init is empty");

  // An initializer that throws after the kernel key was drawn: nothing is drawn then.
  nnx::Rngs rngs({{"params", 0}});
  nnx::Linear<float>::Config bad{3, 4};
  bad.kernel_init = init::variance_scaling{-1.0};
  expect_throw_with([&] { nnx::Linear<float>(bad).init(rngs); }, "scale must be");
  EXPECT_EQ(rngs["params"].count(), 0u);
  nnx::Rngs no_params({{"dropout", 0}});
  expect_throw_with([&] { nnx::Linear<float>({3, 4}).init(no_params); }, "No RngStream named 'params'");

  nnx::Linear<float> lin({3, 4});
  auto p = lin.init(rngs);
  Tensor<float, 2> x(2, 5);
  x.setZero();
  expect_throw_with([&] { lin.apply(p, x); }, "(2, 5)");
  Tensor<float, 2> x3(2, 3);
  x3.setZero();
  auto wrong = p;
  wrong.kernel.resize(5, 4);
  expect_throw_with([&] { lin.apply(wrong, x3); }, "kernel of shape (5, 4), expected (3, 4)");
  wrong = p;
  wrong.bias.resize(3);
  expect_throw_with([&] { lin.apply(wrong, x3); }, "bias of shape (3,), expected (4,)");
}

// ==== LinearGeneral ========================================================================

// out[b..., free..., o...] = sum_c x[...] k[b, c, o] + bias[b, o], restated in float64 over
// explicit indices: x [batch, f, i0, i1] contracted over (i0, i1) by default.
TEST(NnxLinearGeneral, DocstringShapesAndInitSeesTheFlattenedKernel) {
  nnx::Rngs rngs(0);
  // nnx.LinearGeneral(2, (4, 5)): kernel (2, 4, 5), bias (4, 5).
  nnx::LinearGeneral<float, float, 1, 2> a({{2}, {4, 5}});
  auto pa = a.init(rngs);
  EXPECT_EQ(shape_of(pa.kernel), (Shape{2, 4, 5}));
  EXPECT_EQ(shape_of(pa.bias), (Shape{4, 5}));
  std::vector<float> want(40);
  init::lecun_normal()(nth_key(random::key(0), 0), Shape{2, 20}, want.data());
  for (Index i = 0; i < 40; ++i) EXPECT_EQ(pa.kernel.data()[i], want[static_cast<std::size_t>(i)]);
  EXPECT_EQ(rngs["default"].count(), 2u);

  // nnx.LinearGeneral((2, 3), (4, 5), axis=(1, -1)): kernel (2, 3, 4, 5); y of (16, 2, 3) is (16, 4, 5).
  nnx::LinearGeneral<float, float, 2, 2> b({{2, 3}, {4, 5}, {1, -1}});
  auto pb = b.init(rngs);
  EXPECT_EQ(shape_of(pb.kernel), (Shape{2, 3, 4, 5}));
  EXPECT_EQ(shape_of(pb.bias), (Shape{4, 5}));
  Tensor<float, 3> x(16, 2, 3);
  x.setConstant(1.0f);
  EXPECT_EQ(shape_of(b.apply(pb, x)), (Shape{16, 4, 5}));

  // batch_axis {0: 2}: kernel (2, 3, 4); kernel_init sees (2 * 3, 4) (the batch in fan_in),
  // bias_init (8,): a custom initializer records the shapes it is handed.
  std::vector<Shape> seen;
  nnx::LinearGeneral<float, float, 1, 1, 1>::Config cc{{3}, {4}};
  cc.batch_axis = {{0, 2}};
  cc.kernel_init = [&](random::Key k, const Shape& s, float* out) {
    seen.push_back(s);
    init::lecun_normal()(k, s, out);
  };
  cc.bias_init = [&](random::Key, const Shape& s, float* out) {
    seen.push_back(s);
    for (Index i = 0; i < num_elements(s); ++i) out[i] = 0.5f;
  };
  nnx::LinearGeneral<float, float, 1, 1, 1> c(cc);
  auto pc = c.init(rngs);
  EXPECT_EQ(shape_of(pc.kernel), (Shape{2, 3, 4}));
  EXPECT_EQ(shape_of(pc.bias), (Shape{2, 4}));
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], (Shape{6, 4}));
  EXPECT_EQ(seen[1], (Shape{8}));
  std::vector<float> wantc(24);
  init::lecun_normal()(nth_key(random::key(0), 4), Shape{6, 4}, wantc.data());
  for (Index i = 0; i < 24; ++i) EXPECT_EQ(pc.kernel.data()[i], wantc[static_cast<std::size_t>(i)]);
}

TEST(NnxLinearGeneral, AnyAxesSortedAndBatchAxesMatchAFloat64DotGeneral) {
  nnx::Rngs rngs(1);
  // x [B=2, 3 (contracted), 4 (free), 5 (contracted)], kernel [2, 3, 5, 6], axis (-1, 1).
  nnx::LinearGeneral<double, double, 2, 1, 1>::Config cfg{{3, 5}, {6}, {-1, 1}};
  cfg.batch_axis = {{0, 2}};
  nnx::LinearGeneral<double, double, 2, 1, 1> lg(cfg);
  auto p = lg.init(rngs);
  p.bias = filled<double, 2>({2, 6}, 9);
  const auto x = filled<double, 4>({2, 3, 4, 5}, 8);
  const auto y = lg.apply(p, x);
  ASSERT_EQ(shape_of(y), (Shape{2, 4, 6}));
  std::vector<double> want(48);
  for (Index b = 0; b < 2; ++b)
    for (Index f = 0; f < 4; ++f)
      for (Index o = 0; o < 6; ++o) {
        double s = p.bias(b, o);
        for (Index i = 0; i < 3; ++i)
          for (Index j = 0; j < 5; ++j) s += x(b, i, f, j) * p.kernel(b, i, j, o);
        want[static_cast<std::size_t>((b * 4 + f) * 6 + o)] = s;
      }
  expect_close(as_doubles(y), want, 1e-13, "y");

  // vjp: dkernel, dbias, dx restated.
  const auto g = filled<double, 3>({2, 4, 6}, 10);
  auto v = nnx::vjp(lg, p, x);
  expect_close(as_doubles(v.output), want, 1e-13, "vjp output");
  const auto gr = v.pullback(g);
  std::vector<double> dk(2 * 3 * 5 * 6, 0), db(12, 0), dx(2 * 3 * 4 * 5, 0);
  for (Index b = 0; b < 2; ++b)
    for (Index f = 0; f < 4; ++f)
      for (Index o = 0; o < 6; ++o) {
        const double gv = g(b, f, o);
        db[static_cast<std::size_t>(b * 6 + o)] += gv;
        for (Index i = 0; i < 3; ++i)
          for (Index j = 0; j < 5; ++j) {
            dk[static_cast<std::size_t>(((b * 3 + i) * 5 + j) * 6 + o)] += x(b, i, f, j) * gv;
            dx[static_cast<std::size_t>(((b * 3 + i) * 4 + f) * 5 + j)] += p.kernel(b, i, j, o) * gv;
          }
      }
  expect_close(as_doubles(gr.params.kernel), dk, 1e-13, "dkernel");
  expect_close(as_doubles(gr.params.bias), db, 1e-13, "dbias");
  expect_close(as_doubles(gr.input), dx, 1e-13, "dx");

  // A leading contracted axis: x [3, 7] over axis 0 -> [7, 2].
  nnx::LinearGeneral<double> first({{3}, {2}, {0}});
  auto pf = first.init(rngs);
  const auto x2 = filled<double, 2>({3, 7}, 12);
  const auto y2 = first.apply(pf, x2);
  ASSERT_EQ(shape_of(y2), (Shape{7, 2}));
  for (Index f = 0; f < 7; ++f)
    for (Index o = 0; o < 2; ++o) {
      double s = 0;
      for (Index i = 0; i < 3; ++i) s += x2(i, f) * pf.kernel(i, o);
      EXPECT_NEAR(y2(f, o), s, 1e-13);
    }
}

TEST(NnxLinearGeneral, TheSortedAxesPairWithTheKernelDimsInOrder) {
  // axis (-1, -2) is sorted to (-2, -1): in_features pair with the input's axes in
  // ascending order, whatever order `axis` lists them in.
  nnx::Rngs rngs(2);
  nnx::LinearGeneral<double, double, 2, 1> rev({{2, 3}, {4}, {-1, -2}});
  nnx::LinearGeneral<double, double, 2, 1> fwd({{2, 3}, {4}, {-2, -1}});
  const auto p = rev.init(rngs);
  const auto x = filled<double, 3>({5, 2, 3}, 13);
  const auto a = rev.apply(p, x), b = fwd.apply(p, x);
  expect_close(as_doubles(a), as_doubles(b), 0, "axis order");
  // in_features (3, 2) with the same axes does not fit (x's sorted axes have 2, then 3).
  nnx::LinearGeneral<double, double, 2, 1> mismatched({{3, 2}, {4}, {-1, -2}});
  const auto pm = mismatched.init(rngs);
  expect_throw_with([&] { mismatched.apply(pm, x); }, "has 2 at axis 1, in_features (3, 2)");
}

TEST(NnxLinearGeneral, ErrorsNameTheFieldAndShape) {
  using LG2 = nnx::LinearGeneral<float, float, 2, 1>;
  expect_throw_with([] { LG2({{2, 3}, {4}}); }, "in_features and axis must have the same length. Got (2, 3) and (-1,).");
  expect_throw_with([] { nnx::LinearGeneral<float>({{0}, {4}}); }, "in_features must be positive, got (0,)");
  expect_throw_with([] { nnx::LinearGeneral<float>({{2}, {-4}}); }, "out_features must be positive");
  using LGB = nnx::LinearGeneral<float, float, 1, 1, 1>;
  LGB::Config c{{3}, {4}};
  expect_throw_with([&] { LGB{c}; }, "batch_axis has 0 entries, the module type has Batch = 1");
  c.batch_axis = {{1, 2}};
  expect_throw_with([&] { LGB{c}; }, "batch_dims (1,) must be consecutive leading dimensions starting from 0.");
  c.batch_axis = {{0, 0}};
  expect_throw_with([&] { LGB{c}; }, "batch_axis size of axis 0 must be positive");

  nnx::Rngs rngs(0);
  LG2 lg({{2, 3}, {4}, {-1, 2}});
  const auto p = lg.init(rngs);
  Tensor<float, 3> x(5, 2, 3);
  x.setZero();
  expect_throw_with([&] { lg.apply(p, x); }, "names input axis 2 twice");
  LG2 far({{2, 3}, {4}, {-1, 3}});
  expect_throw_with([&] { far.apply(p, x); }, "axis 3 is out of range for input of shape (5, 2, 3)");
  c.batch_axis = {{0, 2}};
  LGB b(c);
  const auto pb = b.init(rngs);
  Tensor<float, 2> xb(3, 3);
  xb.setZero();
  expect_throw_with([&] { b.apply(pb, xb); }, "has 3 at batch axis 0, batch_axis says 2");
  LGB::Config c0{{2}, {4}, {0}};
  c0.batch_axis = {{0, 2}};
  LGB contracts(c0);
  expect_throw_with([&] { contracts.apply(contracts.init(rngs), xb); }, "contracts batch axis 0");
  auto wrong = p;
  wrong.kernel.resize(2, 3, 5);
  Tensor<float, 3> ok(5, 2, 3);
  ok.setZero();
  LG2 good({{2, 3}, {4}, {-2, -1}});
  expect_throw_with([&] { good.apply(wrong, ok); }, "kernel of shape (2, 3, 5), expected (2, 3, 4)");
}

// LinearGeneral's product is DenseGeneral's core: for every dtype (half types promote and
// accumulate in float) the same bits as linen's DenseGeneral on the same parameters, and the
// same vjp.
template <class T>
class NnxLinearGeneralTyped : public ::testing::Test {};
using NnxTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(NnxLinearGeneralTyped, NnxTypes);

TYPED_TEST(NnxLinearGeneralTyped, BitsAreLinenDenseGeneralsPerBatchSlice) {
  using T = TypeParam;
  nnx::Rngs rngs(3);
  nnx::LinearGeneral<T, float, 2, 1> lg({{3, 4}, {5}, {-2, -1}});
  auto p = lg.init(rngs);
  p.bias = filled<float, 1>({5}, 31);
  const auto x = filled<float, 3>({2, 3, 4}, 32);
  typename linen::DenseGeneral<T, float, 2, 1>::Config dgc;
  dgc.features = {5};
  const linen::DenseGeneral<T, float, 2, 1> dg(dgc);
  const linen::DenseParams<float, 2, 1> dp{p.kernel, p.bias};
  const auto y = lg.apply(p, x), want = dg.apply(dp, x);
  ASSERT_EQ(shape_of(y), shape_of(want));
  for (Index i = 0; i < y.size(); ++i) EXPECT_EQ(static_cast<float>(y.data()[i]), static_cast<float>(want.data()[i])) << i;
  Tensor<T, 2> g(2, 5);
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = static_cast<T>(0.25f * static_cast<float>(i) - 1.0f);
  const auto a = nnx::vjp(lg, p, x).pullback(g);
  const auto b = linen::vjp(dg, dp, x).pullback(g);
  for (Index i = 0; i < a.params.kernel.size(); ++i) EXPECT_EQ(a.params.kernel.data()[i], b.params.kernel.data()[i]);
  for (Index i = 0; i < a.params.bias.size(); ++i) EXPECT_EQ(a.params.bias.data()[i], b.params.bias.data()[i]);
  for (Index i = 0; i < a.input.size(); ++i) EXPECT_EQ(a.input.data()[i], b.input.data()[i]);

  // batch_axis {0: 2}: slice b is a DenseGeneral with kernel[b], bias[b].
  typename nnx::LinearGeneral<T, float, 1, 1, 1>::Config bc{{4}, {3}};
  bc.batch_axis = {{0, 2}};
  nnx::LinearGeneral<T, float, 1, 1, 1> lb(bc);
  auto pb = lb.init(rngs);
  pb.bias = filled<float, 2>({2, 3}, 33);
  const auto xb = filled<float, 3>({2, 5, 4}, 34);
  const auto yb = lb.apply(pb, xb);
  ASSERT_EQ(shape_of(yb), (Shape{2, 5, 3}));
  typename linen::DenseGeneral<T, float, 1, 1>::Config d1c;
  d1c.features = {3};
  const linen::DenseGeneral<T, float, 1, 1> d1(d1c);
  for (Index b = 0; b < 2; ++b) {
    linen::DenseParams<float, 1, 1> sp;
    sp.kernel.resize(4, 3);
    sp.bias.resize(3);
    for (Index i = 0; i < 12; ++i) sp.kernel.data()[i] = pb.kernel.data()[b * 12 + i];
    for (Index i = 0; i < 3; ++i) sp.bias(i) = pb.bias(b, i);
    Tensor<float, 2> xs(5, 4);
    for (Index i = 0; i < 20; ++i) xs.data()[i] = xb.data()[b * 20 + i];
    const auto ys = d1.apply(sp, xs);
    for (Index i = 0; i < 15; ++i)
      EXPECT_EQ(static_cast<float>(yb.data()[b * 15 + i]), static_cast<float>(ys.data()[i])) << b << "," << i;
  }
}

TEST(NnxLinearGeneral, EmptyBatchesGiveEmptyOutputsAndCotangents) {
  nnx::Rngs rngs(0);
  nnx::LinearGeneral<float, float, 1, 1, 1>::Config c{{3}, {4}};
  c.batch_axis = {{0, 2}};
  nnx::LinearGeneral<float, float, 1, 1, 1> lg(c);
  const auto p = lg.init(rngs);
  Tensor<float, 3> x(2, 0, 3);
  const auto y = lg.apply(p, x);
  EXPECT_EQ(shape_of(y), (Shape{2, 0, 4}));
  auto v = nnx::vjp(lg, p, x);
  const auto g = v.pullback(Tensor<float, 3>(2, 0, 4));
  EXPECT_EQ(shape_of(g.input), (Shape{2, 0, 3}));
  for (Index i = 0; i < g.params.kernel.size(); ++i) EXPECT_EQ(g.params.kernel.data()[i], 0.0f);
  for (Index i = 0; i < g.params.bias.size(); ++i) EXPECT_EQ(g.params.bias.data()[i], 0.0f);
  nnx::Linear<float> lin({3, 4});
  const auto lp = lin.init(rngs);
  EXPECT_EQ(shape_of(lin.apply(lp, Tensor<float, 2>(0, 3))), (Shape{0, 4}));
  // A cotangent of the wrong shape is refused, naming both shapes.
  expect_throw_with([&] { v.pullback(Tensor<float, 3>(2, 1, 4)); }, "nnx::LinearGeneral vjp");
}

// ==== Embed ================================================================================

TEST(NnxEmbed, FlaxDocstringTableKnownAnswer) {
  // nnx.Embed(num_embeddings=5, features=3, rngs=nnx.Rngs(0)): Flax's docstring prints it.
  nnx::Rngs rngs(0);
  nnx::Embed<float> embed({5, 3});
  const auto p = embed.init(rngs);
  EXPECT_EQ(rngs["default"].count(), 1u);
  const float want[5][3] = {{0.57966787f, -0.523274f, -0.43195742f},
                            {-0.676289f, -0.50300646f, 0.33996582f},
                            {0.41796115f, -0.59212935f, 0.95934135f},
                            {-1.0917838f, -0.7441663f, 0.07713798f},
                            {-0.66570747f, 0.13815777f, 1.007365f}};
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_LE(ulps(p.embedding(i, j), want[i][j]), 1) << i << "," << j;
  // layer(jnp.array([[0, 1, 2], [-1, -2, -3]])): the first three and last three rows.
  Tensor<int, 2> idx(2, 3);
  idx.setValues({{0, 1, 2}, {-1, -2, -3}});
  const auto y = embed.apply(p, idx);
  ASSERT_EQ(shape_of(y), (Shape{2, 3, 3}));
  for (int j = 0; j < 3; ++j) {
    EXPECT_EQ(y(0, 2, j), p.embedding(2, j));
    EXPECT_EQ(y(1, 0, j), p.embedding(4, j));
    EXPECT_EQ(y(1, 2, j), p.embedding(2, j));
  }
}

TEST(NnxEmbed, InitAttendVjpAndErrors) {
  nnx::Rngs rngs({{"params", 3}});
  nnx::Embed<double> embed({6, 4});
  const auto p = embed.init(rngs);
  std::vector<double> want(24);
  init::variance_scaling{1.0, init::FanMode::fan_in, init::Distribution::normal, {-2}, {0}, {}}(
      nth_key(random::key(3), 0), Shape{6, 4}, want.data());
  for (Index i = 0; i < 24; ++i) EXPECT_EQ(p.embedding.data()[i], want[static_cast<std::size_t>(i)]);
  const auto q = filled<double, 2>({2, 4}, 5);
  const auto logits = embed.attend(p, q);
  ASSERT_EQ(shape_of(logits), (Shape{2, 6}));
  for (Index r = 0; r < 2; ++r)
    for (Index e = 0; e < 6; ++e) {
      double s = 0;
      for (Index f = 0; f < 4; ++f) s += q(r, f) * p.embedding(e, f);
      EXPECT_NEAR(logits(r, e), s, 1e-13);
    }
  auto va = nnx::vjp_attend(embed, p, q);
  const auto g = filled<double, 2>({2, 6}, 6);
  const auto ga = va.pullback(g);
  for (Index r = 0; r < 2; ++r)
    for (Index f = 0; f < 4; ++f) {
      double s = 0;
      for (Index e = 0; e < 6; ++e) s += g(r, e) * p.embedding(e, f);
      EXPECT_NEAR(ga.query(r, f), s, 1e-13);
    }
  Tensor<int, 1> idx(3);
  idx.setValues({1, 1, -1});
  auto v = nnx::vjp(embed, p, idx);
  const auto ge = v.pullback(filled<double, 2>({3, 4}, 7));
  EXPECT_EQ(shape_of(ge.embedding), (Shape{6, 4}));
  EXPECT_EQ(ge.embedding(0, 0), 0.0);

  expect_throw_with([] { nnx::Embed<float>({0, 3}); }, "num_embeddings=0");
  idx.setValues({1, 6, 0});
  expect_throw_with([&] { embed.apply(p, idx); }, "index 6 at flat position 1");
}

// ==== LayerNorm / RMSNorm ==================================================================

TEST(NnxNorm, InitDrawsCountEvenForOnesAndZeros) {
  nnx::Rngs rngs({{"params", 0}});
  nnx::LayerNorm<float> ln({6});
  const auto p = ln.init(rngs);
  EXPECT_EQ(rngs["params"].count(), 2u);  // scale, bias
  for (Index i = 0; i < 6; ++i) {
    EXPECT_EQ(p.scale(i), 1.0f);
    EXPECT_EQ(p.bias(i), 0.0f);
  }
  nnx::LayerNorm<float>::Config off{6};
  off.use_scale = false;
  const auto q = nnx::LayerNorm<float>(off).init(rngs);
  EXPECT_EQ(q.scale.size(), 0);
  EXPECT_EQ(rngs["params"].count(), 3u);
  nnx::RMSNorm<float> rms({6});
  const auto r = rms.init(rngs);
  EXPECT_EQ(rngs["params"].count(), 4u);
  EXPECT_EQ(shape_of(r.scale), (Shape{6}));
  nnx::RMSNorm<float>::Config rno{6};
  rno.use_scale = false;
  (void)nnx::RMSNorm<float>(rno).init(rngs);
  EXPECT_EQ(rngs["params"].count(), 4u);
  // A Linear made after them draws keys 4 and 5.
  const auto lin = nnx::Linear<float>({2, 2}).init(rngs);
  std::vector<float> want(4);
  init::lecun_normal()(nth_key(random::key(0), 4), Shape{2, 2}, want.data());
  for (Index i = 0; i < 4; ++i) EXPECT_EQ(lin.kernel.data()[i], want[static_cast<std::size_t>(i)]);
  // The initializers see (num_features,) and the keys the stream gives, in order.
  std::vector<random::Key> keys;
  nnx::LayerNorm<float>::Config rec{3};
  rec.scale_init = [&](random::Key k, const Shape& s, float* out) {
    keys.push_back(k);
    EXPECT_EQ(s, (Shape{3}));
    for (int i = 0; i < 3; ++i) out[i] = 2;
  };
  rec.bias_init = [&](random::Key k, const Shape&, float* out) {
    keys.push_back(k);
    for (int i = 0; i < 3; ++i) out[i] = 1;
  };
  (void)nnx::LayerNorm<float>(rec).init(rngs);
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0], nth_key(random::key(0), 6));  // after the Linear's kernel (4) and bias (5)
  EXPECT_EQ(keys[1], nth_key(random::key(0), 7));
}

TEST(NnxNorm, LayerNormAndRMSNormMatchFloat64Restatements) {
  nnx::Rngs rngs(0);
  nnx::LayerNorm<double> ln({5});
  auto p = ln.init(rngs);
  p.scale = filled<double, 1>({5}, 20);
  p.bias = filled<double, 1>({5}, 21);
  const auto x = filled<double, 3>({2, 3, 5}, 22, 3.0);
  const auto y = ln.apply(p, x);
  std::vector<double> want(30);
  for (Index r = 0; r < 6; ++r) {
    double m = 0, m2 = 0;
    for (Index j = 0; j < 5; ++j) m += x.data()[r * 5 + j] / 5, m2 += x.data()[r * 5 + j] * x.data()[r * 5 + j] / 5;
    const double inv = 1 / std::sqrt(m2 - m * m + 1e-6);
    for (Index j = 0; j < 5; ++j)
      want[static_cast<std::size_t>(r * 5 + j)] = (x.data()[r * 5 + j] - m) * inv * p.scale(j) + p.bias(j);
  }
  expect_close(as_doubles(y), want, 1e-12, "layer norm");

  // RMSNorm over (-2, -1) with features at -1.
  nnx::RMSNorm<double>::Config rc{5};
  rc.reduction_axes = {-2, -1};
  nnx::RMSNorm<double> rms(rc);
  auto rp = rms.init(rngs);
  rp.scale = filled<double, 1>({5}, 23);
  const auto yr = rms.apply(rp, x);
  for (Index b = 0; b < 2; ++b) {
    double ms = 0;
    for (Index k = 0; k < 15; ++k) ms += x.data()[b * 15 + k] * x.data()[b * 15 + k] / 15;
    const double inv = 1 / std::sqrt(ms + 1e-6);
    for (Index k = 0; k < 15; ++k) want[static_cast<std::size_t>(b * 15 + k)] = x.data()[b * 15 + k] * inv * rp.scale(k % 5);
  }
  expect_close(as_doubles(yr), want, 1e-12, "rms norm");

  // vjps: linen's, through the cast wrappers (here all float64: the same numbers as linen's).
  const auto g = filled<double, 3>({2, 3, 5}, 24);
  auto lv = nnx::vjp(ln, p, x);
  const auto lg = lv.pullback(g);
  auto lin_v = linen::vjp(ln.core(), p, x);
  const auto lin_g = lin_v.pullback(g);
  expect_close(as_doubles(lg.input), as_doubles(lin_g.input), 0, "ln dx");
  expect_close(as_doubles(lg.params.scale), as_doubles(lin_g.params.scale), 0, "ln dscale");
  expect_close(as_doubles(lg.params.bias), as_doubles(lin_g.params.bias), 0, "ln dbias");
  // RMSNorm's dscale restated: sum over the group of g * x * inv.
  auto rv = nnx::vjp(rms, rp, x);
  const auto rg = rv.pullback(g);
  std::vector<double> ds(5, 0);
  for (Index b = 0; b < 2; ++b) {
    double ms = 0;
    for (Index k = 0; k < 15; ++k) ms += x.data()[b * 15 + k] * x.data()[b * 15 + k] / 15;
    const double inv = 1 / std::sqrt(ms + 1e-6);
    for (Index k = 0; k < 15; ++k) ds[static_cast<std::size_t>(k % 5)] += g.data()[b * 15 + k] * x.data()[b * 15 + k] * inv;
  }
  expect_close(as_doubles(rg.params.scale), ds, 1e-12, "rms dscale");
}

TEST(NnxNorm, NnxRoundsTheInputToDtypeBeforeTheStatistics) {
  // x, scale and bias are cast to dtype first (promote_dtype), unlike flax.linen's
  // LayerNorm: 1.0005 .. 1.003 all round to 1 in bfloat16, so nnx sees a constant row
  // (variance 0: the output is the bias), linen's statistics see the float32 values.
  using bf16 = Eigen::bfloat16;
  nnx::Rngs rngs(0);
  nnx::LayerNorm<bf16, float> ln({4});
  const auto p = ln.init(rngs);
  Tensor<float, 2> x(1, 4);
  x.setValues({{1.0005f, 1.001f, 1.002f, 1.003f}});
  const auto y = ln.apply(p, x);
  const auto lin = linen::LayerNorm<bf16, float>().apply(p, x);
  for (int j = 0; j < 4; ++j) EXPECT_EQ(static_cast<float>(y(0, j)), 0.0f) << j;
  EXPECT_NE(static_cast<float>(lin(0, 0)), 0.0f);
  // And it is exactly linen's LayerNorm<bf16, bf16> on the cast values.
  Tensor<bf16, 2> xb(1, 4);
  for (int j = 0; j < 4; ++j) xb(0, j) = static_cast<bf16>(x(0, j));
  Tensor<float, 2> x2 = filled<float, 2>({3, 4}, 30, 2.0);
  const auto y2 = ln.apply(p, x2);
  Tensor<bf16, 2> x2b(3, 4);
  for (Index i = 0; i < 12; ++i) x2b.data()[i] = static_cast<bf16>(x2.data()[i]);
  const auto want2 = linen::LayerNorm<bf16, bf16>().apply(ln.cast_params(p), x2b);
  for (Index i = 0; i < 12; ++i) EXPECT_EQ(static_cast<float>(y2.data()[i]), static_cast<float>(want2.data()[i]));
  // The vjp's cotangents come back in the primal types.
  auto v = nnx::vjp(ln, p, x2);
  Tensor<bf16, 2> g(3, 4);
  g.setConstant(bf16(1.0f));
  const auto gr = v.pullback(g);
  static_assert(std::is_same_v<decltype(gr.input)::Scalar, float>);
  static_assert(std::is_same_v<decltype(gr.params.scale)::Scalar, float>);
  EXPECT_EQ(shape_of(gr.input), (Shape{3, 4}));
}

TEST(NnxNorm, ErrorsNameTheAxesAndFeatures) {
  expect_throw_with([] { nnx::LayerNorm<float>({0}); }, "num_features must be positive, got 0");
  expect_throw_with([] { nnx::RMSNorm<float>({-2}); }, "num_features must be positive, got -2");
  nnx::RMSNorm<float>::Config two{4};
  two.feature_axes = {-2, -1};
  expect_throw_with([&] { nnx::RMSNorm<float>{two}; }, "exactly one feature axis");
  nnx::Rngs rngs(0);
  nnx::LayerNorm<float> ln({4});
  const auto p = ln.init(rngs);
  Tensor<float, 2> x(2, 5);
  x.setZero();
  expect_throw_with([&] { ln.apply(p, x); }, "input of shape (2, 5) has 5 features at axis 1, num_features=4");
  nnx::LayerNorm<float>::Config red{4};
  red.reduction_axes = {-2, -1};
  Tensor<float, 2> x4(2, 4);
  x4.setZero();
  expect_throw_with([&] { nnx::LayerNorm<float>(red).apply(p, x4); }, "linen normalises over the last axis only");
  auto wrong = p;
  wrong.bias.resize(3);
  expect_throw_with([&] { ln.apply(wrong, x4); }, "bias of shape (3,), expected (4,)");
  nnx::RMSNorm<float>::Config far{4};
  far.reduction_axes = {2};
  nnx::RMSNorm<float> rfar(far);
  const auto rp = rfar.init(rngs);
  expect_throw_with([&] { rfar.apply(rp, x4); }, "axis 2 is out of range");
}

// ==== Dropout ==============================================================================

TEST(NnxDropout, ConstructionForksTheDropoutStreamWhateverTheRate) {
  nnx::Rngs rngs({{"params", 0}, {"dropout", 1}});
  nnx::Dropout off({0.0});
  const auto s0 = off.init(rngs);
  EXPECT_EQ(rngs["dropout"].count(), 1u);
  EXPECT_EQ(rngs["params"].count(), 0u);
  EXPECT_EQ(s0.rngs->key(), nth_key(random::key(1), 0));
  nnx::Dropout::Config c{0.3};
  c.rng_collection = "noise";
  nnx::Rngs no_default({{"dropout", 1}});
  expect_throw_with([&] { nnx::Dropout(c).init(no_default); }, "No RngStream named 'noise'");
  EXPECT_EQ(no_default["dropout"].count(), 0u);
  nnx::RngStream stream(9, "dropout");
  const auto s1 = nnx::Dropout({0.5}).init(stream);
  EXPECT_EQ(stream.count(), 1u);
  EXPECT_EQ(s1.rngs->key(), nth_key(random::key(9), 0));
  EXPECT_FALSE(nnx::Dropout({0.5}).init().rngs.has_value());
}

TEST(NnxDropout, MasksComeFromTheForkAndTheCallWins) {
  nnx::Rngs rngs({{"dropout", 5}});
  nnx::Dropout::Config c{0.5};
  c.broadcast_dims = {0};
  nnx::Dropout drop(c);
  auto state = drop.init(rngs);
  const random::Key fork = nth_key(random::key(5), 0);
  const auto x = filled<float, 2>({3, 8}, 40);
  const auto check = [&](const Tensor<float, 2>& y, const random::Key& k) {
    const auto keep = random::bernoulli(k, 0.5, Shape{1, 8});
    for (Index i = 0; i < 3; ++i)
      for (Index j = 0; j < 8; ++j)
        EXPECT_EQ(y(i, j), keep[static_cast<std::size_t>(j)] ? x(i, j) / 0.5f : 0.0f) << i << "," << j;
  };
  check(drop.apply(state, x), nth_key(fork, 0));  // deterministic defaults to False
  check(drop.apply(state, x), nth_key(fork, 1));  // the fork counts up
  EXPECT_EQ(state.rngs->count(), 2u);
  // The call's rngs: an Rngs (its dropout stream), a stream, a key.
  nnx::Rngs other({{"dropout", 6}});
  check(drop.apply(state, x, {std::nullopt, &other}), nth_key(random::key(6), 0));
  EXPECT_EQ(other["dropout"].count(), 1u);
  nnx::RngStream st(7, "x");
  check(drop.apply(state, x, {std::nullopt, &st}), nth_key(random::key(7), 0));
  check(drop.apply(state, x, {std::nullopt, random::key(8)}), random::key(8));
  EXPECT_EQ(state.rngs->count(), 2u);

  // deterministic: the call's wins over the module's, in both directions (no merge error).
  c.deterministic = true;
  nnx::Dropout det(c);
  auto ds = det.init(rngs);
  const auto same = det.apply(ds, x);
  for (Index i = 0; i < x.size(); ++i) EXPECT_EQ(same.data()[i], x.data()[i]);
  check(det.apply(ds, x, {false}), nth_key(ds.rngs->key(), 0));
  const auto same2 = drop.apply(state, x, {true});
  for (Index i = 0; i < x.size(); ++i) EXPECT_EQ(same2.data()[i], x.data()[i]);
  EXPECT_EQ(state.rngs->count(), 2u);

  // rate 1: zeros, nothing drawn. vjp: the same mask on the cotangent.
  nnx::Dropout all({1.0});
  auto as = all.init(rngs);
  const auto z = all.apply(as, x);
  for (Index i = 0; i < x.size(); ++i) EXPECT_EQ(z.data()[i], 0.0f);
  EXPECT_EQ(as.rngs->count(), 0u);
  auto v = nnx::vjp(drop, state, x);
  check(v.output, nth_key(fork, 2));
  const auto dx = v.pullback(x);
  for (Index i = 0; i < x.size(); ++i) EXPECT_EQ(dx.data()[i], v.output.data()[i]);
}

TEST(NnxDropout, FailedCallsDrawNothing) {
  nnx::Dropout::Config nd{0.5};
  nd.deterministic = std::nullopt;
  nnx::Rngs rngs(0);
  nnx::Dropout undecided(nd);
  auto s = undecided.init(rngs);
  const auto x = filled<float, 2>({2, 2}, 1);
  expect_throw_with([&] { undecided.apply(s, x); }, "No `deterministic` argument was provided to Dropout");
  nnx::Dropout plain({0.5});
  auto none = plain.init();
  expect_throw_with([&] { plain.apply(none, x); }, "no `rngs` argument was provided");
  nnx::Dropout::Config bd{0.5};
  bd.broadcast_dims = {5};
  nnx::Dropout bad(bd);
  auto bs = bad.init(rngs);
  expect_throw_with([&] { bad.apply(bs, x); }, "axis 5 is out of range");
  EXPECT_EQ(bs.rngs->count(), 0u);
  nnx::Rngs call({{"dropout", 1}});
  expect_throw_with([&] { bad.apply(bs, x, {std::nullopt, &call}); }, "axis 5");
  EXPECT_EQ(call["dropout"].count(), 0u);
  expect_throw_with([] { nnx::Dropout({1.5}); }, "rate must be in [0, 1], got 1.5");
  nnx::Dropout ok({0.5});
  auto os = ok.init(rngs);
  expect_throw_with([&] { ok.apply(os, x, {std::nullopt, static_cast<nnx::Rngs*>(nullptr)}); }, "null Rngs pointer");
  expect_throw_with([&] { ok.apply(os, x, {std::nullopt, static_cast<nnx::RngStream*>(nullptr)}); },
                    "null RngStream pointer");
  EXPECT_EQ(os.rngs->count(), 0u);
}

// ==== io: nnx state names ==================================================================

TEST(NnxIo, StateNamesWithAndWithoutValueBindToTheModules) {
  nnx::Rngs rngs(0);
  nnx::Linear<float> lin({3, 4});
  nnx::LayerNorm<float> ln({4});
  const auto lp = lin.init(rngs);
  const auto np = ln.init(rngs);
  // An nnx.State flattened with '.' (safetensors / Orbax names), through a file's bytes.
  io::Variables state;
  state.set("linear.kernel.value", lp.kernel);
  state.set("linear.bias.value", lp.bias);
  state.set("norm.scale.value", np.scale);
  state.set("norm.bias.value", np.bias);
  const auto bytes = io::to_safetensors(state);
  const io::Variables vars = io::from_nnx_state(io::parse_safetensors(bytes.data(), bytes.size()));
  EXPECT_EQ(vars.paths(), (std::vector<std::string>{"params/linear/bias", "params/linear/kernel", "params/norm/bias",
                                                    "params/norm/scale"}));
  const auto lq = io::load(vars, lin, "linear");
  for (Index i = 0; i < 12; ++i) EXPECT_EQ(lq.kernel.data()[i], lp.kernel.data()[i]);
  const auto nq = io::load(io::ConstScope(vars).push("norm"), ln);
  EXPECT_EQ(shape_of(nq.bias), (Shape{4}));

  // '/'-joined with /value, and nnx.to_pure_dict's names: the same tree.
  io::Variables slashed, pure;
  slashed.set("linear/kernel/value", lp.kernel);
  slashed.set("linear/bias/value", lp.bias);
  pure.set("linear/kernel", lp.kernel);
  pure.set("linear/bias", lp.bias);
  EXPECT_EQ(io::from_nnx_state(slashed).paths(), io::from_nnx_state(pure).paths());

  // `value` is also an attention projection's name: only a trailing key is dropped.
  io::Variables attn;
  attn.set("value/kernel/value", lp.kernel);
  attn.set("query/kernel/value", lp.kernel);
  EXPECT_EQ(io::from_nnx_state(attn).paths(),
            (std::vector<std::string>{"params/query/kernel", "params/value/kernel"}));
  // Names not all ending in `value` are kept (automatic), or stripped / kept as asked.
  io::Variables mixed;
  mixed.set("a/value", lp.bias);
  mixed.set("b/kernel", lp.kernel);
  EXPECT_EQ(io::from_nnx_state(mixed).paths(), (std::vector<std::string>{"params/a/value", "params/b/kernel"}));
  EXPECT_EQ(io::from_nnx_state(mixed, {"params", io::NnxValueSuffix::strip}).paths(),
            (std::vector<std::string>{"params/a", "params/b/kernel"}));
  EXPECT_EQ(io::from_nnx_state(attn, {"", io::NnxValueSuffix::keep}).paths(),
            (std::vector<std::string>{"query/kernel/value", "value/kernel/value"}));

  // store -> to_nnx_state -> from_nnx_state round trip, LinearGeneral included.
  nnx::LinearGeneral<float, float, 1, 2> lg({{4}, {2, 3}});
  const auto gp = lg.init(rngs);
  io::Variables tree;
  io::store(tree, lp, "linear");
  io::store(tree, gp, "proj");
  const io::Variables out = io::to_nnx_state(tree, "params", true);
  EXPECT_TRUE(out.contains("proj/kernel/value"));
  const auto back = io::load(io::from_nnx_state(out), lg, "proj");
  EXPECT_EQ(shape_of(back.kernel), (Shape{4, 2, 3}));
  for (Index i = 0; i < back.kernel.size(); ++i) EXPECT_EQ(back.kernel.data()[i], gp.kernel.data()[i]);
  // Embed and RMSNorm bind too.
  nnx::Embed<float> emb({5, 4});
  nnx::RMSNorm<float> rms({4});
  io::store(tree, emb.init(rngs), "embed");
  io::store(tree, rms.init(rngs), "final_norm");
  EXPECT_EQ(io::load(tree, emb, "embed").embedding.dimension(0), 5);
  EXPECT_EQ(io::load(tree, rms, "final_norm").scale.dimension(0), 4);
}

// nnx's scan-over-layers pattern (layers made under nnx.vmap, run with nnx.scan): every
// parameter has a leading layer axis, `blocks/linear/kernel.value` [L, in, out]. A layer
// scope reads layer i's slice.
TEST(NnxIo, StackedLayersBindThroughALayerScope) {
  nnx::Rngs rngs(0);
  nnx::Linear<float> lin({3, 2});
  std::vector<io::Variables> layers(3);
  std::vector<nnx::Linear<float>::Params> ps;
  for (auto& l : layers) {
    ps.push_back(lin.init(rngs));
    io::store(l, ps.back(), "linear");
  }
  io::Variables tree;
  io::store_stacked(io::Scope(tree).push("blocks"), layers);
  io::Variables state;
  for (const auto& [path, a] : io::to_nnx_state(tree, "params", true)) {
    std::string dotted = path;
    for (char& ch : dotted)
      if (ch == '/') ch = '.';
    state.set(dotted, a);
  }
  EXPECT_TRUE(state.contains("blocks.linear.kernel.value"));
  EXPECT_EQ(state.at("blocks.linear.kernel.value").shape(), (Shape{3, 3, 2}));
  const io::Variables vars = io::from_nnx_state(state);
  for (Index i = 0; i < 3; ++i) {
    const auto p = io::load(io::ConstScope(vars).push("blocks").layer(i, 3), lin, "linear");
    for (Index j = 0; j < 6; ++j) EXPECT_EQ(p.kernel.data()[j], ps[static_cast<std::size_t>(i)].kernel.data()[j]);
  }
}

TEST(NnxIo, BadNamesAndShapesThrowNamingThePath) {
  io::Variables clash;
  Tensor<float, 1> t(2);
  t.setZero();
  clash.set("a.kernel", t);
  clash.set("a/kernel", t);
  expect_throw_with([&] { io::from_nnx_state(clash); }, "'a.kernel' and 'a/kernel' both become 'params/a/kernel'");
  io::Variables empty_key;
  empty_key.set("a..kernel", t);
  expect_throw_with([&] { io::from_nnx_state(empty_key); }, "'a..kernel' has an empty key");
  io::Variables only_value;
  only_value.set("value", t);
  expect_throw_with([&] { io::from_nnx_state(only_value); }, "is only the `value` key");
  expect_throw_with([&] { io::to_nnx_state(clash, "cache"); }, "no tensor under 'cache/'");

  nnx::Linear<float> lin({3, 4});
  io::Variables vars;
  Tensor<float, 2> k(3, 5);
  k.setZero();
  vars.set("params/linear/kernel", k);
  expect_throw_with([&] { io::load(vars, lin, "linear"); }, "params/linear/kernel: shape (3, 4) expected, file has (3, 5)");
  Tensor<float, 2> k2(3, 4);
  k2.setZero();
  vars.set("params/linear/kernel", k2);
  expect_throw_with([&] { io::load(vars, lin, "linear"); }, "missing tensor 'params/linear/bias'");
  nnx::LayerNorm<float> ln({4});
  vars.set("params/ln/scale", t);
  expect_throw_with([&] { io::load(vars, ln, "ln"); }, "params/ln/scale: shape (4,) expected, file has (2,)");
}

// ==== MultiHeadAttention (the parameter part) ================================================

// The kernel LinearGeneral's init writes for the n-th params key: lecun_normal over `flat`.
std::vector<float> lecun_for(std::uint32_t n, const Shape& flat) {
  std::vector<float> w(static_cast<std::size_t>(num_elements(flat)));
  init::lecun_normal()(nth_key(random::key(0), n), flat, w.data());
  return w;
}
template <int N>
void expect_kernel(const Tensor<float, N>& k, const Shape& shape, std::uint32_t n, const Shape& flat, const char* what) {
  ASSERT_EQ(shape_of(k), shape) << what;
  const auto w = lecun_for(n, flat);
  for (Index i = 0; i < k.size(); ++i) ASSERT_EQ(k.data()[i], w[static_cast<std::size_t>(i)]) << what << "[" << i << "]";
}

TEST(NnxMultiHeadAttention, SubmodulesDrawInConstructionOrderWithGqaShapes) {
  // num_heads=4, in_features=8, qkv_features=16 (head_dim 4), num_kv_heads=2,
  // in_kv_features=6, out_features=5, normalize_qk, dropout_rate 0.1.
  nnx::MultiHeadAttention<float>::Config c{4, 8, 16, 5, 2, 6};
  c.normalize_qk = true;
  c.dropout_rate = 0.1;
  nnx::MultiHeadAttention<float> mha(c);
  EXPECT_EQ(mha.head_dim(), 4);
  nnx::Rngs rngs({{"params", 0}, {"dropout", 1}});
  const auto v = mha.init(rngs);
  const auto& p = v.params;
  expect_kernel(p.query.kernel, {8, 4, 4}, 0, {8, 16}, "query/kernel");
  EXPECT_EQ(shape_of(p.query.bias), (Shape{4, 4}));
  expect_kernel(p.key.kernel, {6, 2, 4}, 2, {6, 8}, "key/kernel");  // [in_kv, num_kv_heads, head_dim]
  EXPECT_EQ(shape_of(p.key.bias), (Shape{2, 4}));
  expect_kernel(p.value.kernel, {6, 2, 4}, 4, {6, 8}, "value/kernel");
  EXPECT_EQ(shape_of(p.query_ln.scale), (Shape{4}));  // keys 6 and 7: ones, drawn all the same
  EXPECT_EQ(p.query_ln.bias.size(), 0);
  EXPECT_EQ(shape_of(p.key_ln.scale), (Shape{4}));
  expect_kernel(p.out.kernel, {4, 4, 5}, 8, {16, 5}, "out/kernel");  // [heads, head_dim, out]
  EXPECT_EQ(shape_of(p.out.bias), (Shape{5}));
  EXPECT_EQ(rngs["params"].count(), 10u);
  // keep_rngs and dropout_rate > 0: the dropout stream forks once, after the params.
  ASSERT_TRUE(v.rngs.has_value());
  EXPECT_EQ(v.rngs->key(), nth_key(random::key(1), 0));
  EXPECT_EQ(rngs["dropout"].count(), 1u);
  mha.check_params(p);
}

TEST(NnxMultiHeadAttention, DefaultsFallbacksAndErrors) {
  // nnx.MultiHeadAttention(2, 6, dropout_rate=0.5, use_bias=False, rngs=nnx.Rngs(0)): every
  // width defaults to in_features; the dropout fork falls back to `default` and comes last.
  nnx::MultiHeadAttention<float>::Config c{2, 6};
  c.use_bias = false;
  c.dropout_rate = 0.5;
  nnx::MultiHeadAttention<float> mha(c);
  EXPECT_EQ(mha.config().qkv_features, 6);
  EXPECT_EQ(mha.config().out_features, 6);
  EXPECT_EQ(mha.config().num_kv_heads, 2);
  EXPECT_EQ(mha.config().in_kv_features, 6);
  nnx::Rngs rngs(0);
  const auto v = mha.init(rngs);
  expect_kernel(v.params.query.kernel, {6, 2, 3}, 0, {6, 6}, "query/kernel");
  expect_kernel(v.params.key.kernel, {6, 2, 3}, 1, {6, 6}, "key/kernel");
  expect_kernel(v.params.out.kernel, {2, 3, 6}, 3, {6, 6}, "out/kernel");
  EXPECT_EQ(v.params.out.bias.size(), 0);
  EXPECT_EQ(v.rngs->key(), nth_key(random::key(0), 4));
  EXPECT_EQ(rngs["default"].count(), 5u);
  // keep_rngs=False, or no dropout: no fork.
  c.keep_rngs = false;
  EXPECT_FALSE(nnx::MultiHeadAttention<float>(c).init(rngs).rngs.has_value());
  EXPECT_EQ(rngs["default"].count(), 9u);
  // out_kernel_init is used for `out` only.
  nnx::MultiHeadAttention<float>::Config oc{2, 6};
  oc.out_kernel_init = init::constant{0.25};
  const auto ov = nnx::MultiHeadAttention<float>(oc).init(rngs);
  EXPECT_EQ(ov.params.out.kernel(1, 2, 5), 0.25f);
  EXPECT_NE(ov.params.query.kernel(0, 0, 0), 0.25f);

  expect_throw_with([] { nnx::MultiHeadAttention<float>({4, 8, 0, 0, 3}); },
                    "num_heads (4) must be divisible by num_kv_heads (3).");
  expect_throw_with([] { nnx::MultiHeadAttention<float>({4, 6}); },
                    "Memory dimension (6) must be divisible by 'num_heads' heads (4).");
  expect_throw_with([] { nnx::MultiHeadAttention<float>({0, 6}); }, "num_heads=0");
  expect_throw_with([] { nnx::MultiHeadAttention<float>({2, 6, -2}); }, "qkv_features must be positive");
  // A failed init (no params stream, no default) leaves the Rngs as they were.
  nnx::Rngs only_dropout({{"dropout", 3}});
  nnx::MultiHeadAttention<float>::Config dc{2, 6};
  dc.dropout_rate = 0.2;
  expect_throw_with([&] { nnx::MultiHeadAttention<float>(dc).init(only_dropout); }, "No RngStream named 'params'");
  EXPECT_EQ(only_dropout["dropout"].count(), 0u);
  auto wrong = v.params;
  wrong.key.kernel.resize(6, 1, 3);
  expect_throw_with([&] { mha.check_params(wrong); }, "kernel of shape (6, 1, 3), expected (6, 2, 3)");
}

TEST(NnxMultiHeadAttention, StateNamesBindThroughIo) {
  nnx::MultiHeadAttention<float>::Config c{4, 8};
  c.num_kv_heads = 2;
  c.normalize_qk = true;
  nnx::MultiHeadAttention<float> mha(c);
  nnx::Rngs rngs(0);
  const auto v = mha.init(rngs);
  io::Variables tree;
  io::store(tree, v.params, "attn");
  // nnx.State names with '.' and `value`, as an nnx user's safetensors file holds them.
  io::Variables state;
  for (const auto& [path, a] : io::to_nnx_state(tree, "params", true)) {
    std::string dotted = path;
    for (char& ch : dotted)
      if (ch == '/') ch = '.';
    state.set(dotted, a);
  }
  EXPECT_TRUE(state.contains("attn.query_ln.scale.value"));
  EXPECT_TRUE(state.contains("attn.value.kernel.value"));
  const auto back = io::load(io::from_nnx_state(state), mha, "attn");
  EXPECT_EQ(shape_of(back.key.kernel), (Shape{8, 2, 2}));
  for (Index i = 0; i < back.value.kernel.size(); ++i) EXPECT_EQ(back.value.kernel.data()[i], v.params.value.kernel.data()[i]);
  EXPECT_EQ(shape_of(back.key_ln.scale), (Shape{2}));
  EXPECT_EQ(tree.size(), 10u);  // 4 kernels, 4 biases, 2 scales
  io::Variables missing = tree;
  missing.erase("params/attn/key_ln/scale");
  expect_throw_with([&] { io::load(missing, mha, "attn"); }, "missing tensor 'params/attn/key_ln/scale'");
}

}  // namespace

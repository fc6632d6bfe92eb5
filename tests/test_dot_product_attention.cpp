// SPDX-License-Identifier: Apache-2.0
// dot_product_attention / dot_product_attention_weights: Flax's golden files, an
// independent double-precision restatement of Flax's maths on random shapes of every
// batch rank, dropout, sowing and every error path.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::fixture;
using linen_test::rel_err;

// ---------------------------------------------------------------------------------------
// Golden files written by flax.linen.dot_product_attention(_weights).

struct DpaCase {
  const char* name;
  bool bias, mask;
};

class DpaGolden : public ::testing::TestWithParam<DpaCase> {};

template <int N>
void check_golden(const DpaCase& c) {
  const auto f = fixture(c.name);
  const auto q = f.get<float, N>("inputs/query");
  const auto k = f.get<float, N>("inputs/key");
  const auto v = f.get<float, N>("inputs/value");
  Tensor<float, N> bias;
  Tensor<bool, N> mask;
  linen::AttentionOptions<float> opt;
  if (c.bias) {
    bias = f.get<float, N>("bias");
    opt.bias = bias;
  }
  if (c.mask) {
    mask = f.get<bool, N>("mask");
    opt.mask = mask;
  }
  const auto out = linen::dot_product_attention(q, k, v, opt);
  const auto w = linen::dot_product_attention_weights(q, k, opt);
  EXPECT_LE(rel_err(out, f.get<float, N>("output")), linen_test::tolerance<float>()) << c.name;
  EXPECT_LE(rel_err(w, f.get<float, N>("attention_weights")), linen_test::tolerance<float>()) << c.name;
}

TEST_P(DpaGolden, MatchesFlax) {
  const DpaCase c = GetParam();
  const auto rank = fixture(c.name).at("inputs/query").shape().size();
  if (rank == 3) check_golden<3>(c);
  else if (rank == 4) check_golden<4>(c);
  else FAIL() << "unexpected rank " << rank;
}

INSTANTIATE_TEST_SUITE_P(Flax, DpaGolden,
                         ::testing::Values(DpaCase{"dpa_bias_mask", true, true},
                                           DpaCase{"dpa_nobatch", false, false},
                                           DpaCase{"dpa_lengths_depths", false, true}),
                         [](const auto& info) { return std::string(info.param.name); });

// The same golden files through every element type: inputs cast to T, result compared
// with Flax's float32 output within T's tolerance.
template <class T>
class DpaTyped : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(DpaTyped, ElementTypes);

TYPED_TEST(DpaTyped, GoldenInEveryElementType) {
  using T = TypeParam;
  for (const char* name : {"dpa_bias_mask", "dpa_lengths_depths"}) {
    const auto f = fixture(name);
    const Tensor<T, 4> q = f.get<T, 4>("inputs/query"), k = f.get<T, 4>("inputs/key"),
                       v = f.get<T, 4>("inputs/value");
    Tensor<T, 4> bias;
    const Tensor<bool, 4> mask = f.get<bool, 4>("mask");
    linen::AttentionOptions<T> opt;
    opt.mask = mask;
    if (f.contains("bias")) {
      bias = f.get<T, 4>("bias");
      opt.bias = bias;
    }
    const Tensor<T, 4> out = linen::dot_product_attention(q, k, v, opt);
    const Tensor<T, 4> w = linen::dot_product_attention_weights(q, k, opt);
    // f64 against a float32 golden can only be as close as float32 itself.
    const double tol = std::max(linen_test::tolerance<T>(), linen_test::tolerance<float>());
    EXPECT_LE(rel_err(out, f.get<float, 4>("output")), tol) << name;
    EXPECT_LE(rel_err(w, f.get<float, 4>("attention_weights")), tol) << name;
  }
}

TYPED_TEST(DpaTyped, FullyMaskedRowAveragesValuesAndNeverNaN) {
  using T = TypeParam;
  Tensor<T, 4> q(1, 2, 1, 3), k(1, 4, 1, 3), v(1, 4, 1, 2);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = T(0.25f * float(i % 5) - 0.5f);
  for (Index i = 0; i < k.size(); ++i) k.data()[i] = T(0.5f * float(i % 3));
  for (Index i = 0; i < v.size(); ++i) v.data()[i] = T(float(i));
  Tensor<bool, 4> mask(1, 1, 2, 4);
  mask.setConstant(false);
  mask(0, 0, 1, 2) = true;  // row 1 sees key 2 only; row 0 sees nothing
  linen::AttentionOptions<T> opt;
  opt.mask = mask;
  const Tensor<T, 4> out = linen::dot_product_attention(q, k, v, opt);
  for (Index c = 0; c < 2; ++c) {
    double mean = 0;
    for (Index j = 0; j < 4; ++j) mean += double(v(0, j, 0, c)) / 4;
    EXPECT_NEAR(double(out(0, 0, 0, c)), mean, 1e-2 * std::abs(mean) + 1e-6);
    EXPECT_NEAR(double(out(0, 1, 0, c)), double(v(0, 2, 0, c)), 1e-6);
  }
}

// ---------------------------------------------------------------------------------------
// An independent restatement of Flax's maths in double, element by element.

// Reads src (row-major, shape `s`) at the multi-index `idx` of the broadcast target
// shape, numpy style.
template <class X>
X at_broadcast(const std::vector<X>& src, const Shape& s, const std::vector<Index>& idx) {
  Index off = 0;
  const std::size_t lead = idx.size() - s.size();
  for (std::size_t d = 0; d < s.size(); ++d) off = off * s[d] + (s[d] == 1 ? 0 : idx[lead + d]);
  return src[static_cast<std::size_t>(off)];
}

struct Problem {
  Shape batch;
  Index lq, lk, h, d, dv;
  Shape mask_shape, bias_shape;  // empty vector of rank 0 means "none" when has_* false
  bool has_mask = false, has_bias = false;
};

// Flax's definition, in double: returns weights [B, H, Lq, Lk] and output [B, Lq, H, Dv]
// (batch flattened).
void reference(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
               const std::vector<double>& v, const std::vector<char>& mask,
               const std::vector<double>& bias, std::vector<double>& w, std::vector<double>& out) {
  Index B = 1;
  for (Index b : p.batch) B *= b;
  w.assign(static_cast<std::size_t>(B * p.h * p.lq * p.lk), 0);
  out.assign(static_cast<std::size_t>(B * p.lq * p.h * p.dv), 0);
  const double scale = std::sqrt(double(p.d));
  for (Index b = 0; b < B; ++b) {
    std::vector<Index> bidx(p.batch.size());
    for (Index r = b, i = Index(p.batch.size()) - 1; i >= 0; --i) {
      bidx[i] = r % p.batch[i];
      r /= p.batch[i];
    }
    for (Index h = 0; h < p.h; ++h)
      for (Index i = 0; i < p.lq; ++i) {
        std::vector<double> row(p.lk);
        for (Index j = 0; j < p.lk; ++j) {
          double s = 0;
          for (Index c = 0; c < p.d; ++c)
            s += q[((b * p.lq + i) * p.h + h) * p.d + c] / scale * k[((b * p.lk + j) * p.h + h) * p.d + c];
          std::vector<Index> idx = bidx;
          idx.insert(idx.end(), {h, i, j});
          if (p.has_bias) s += at_broadcast(bias, p.bias_shape, idx);
          if (p.has_mask && !at_broadcast(mask, p.mask_shape, idx)) s = std::numeric_limits<float>::lowest();
          row[j] = s;
        }
        double mx = -INFINITY, sum = 0;
        for (double x : row) mx = std::max(mx, x);
        for (double& x : row) sum += (x = std::exp(x - mx));
        for (Index j = 0; j < p.lk; ++j) w[((b * p.h + h) * p.lq + i) * p.lk + j] = row[j] / sum;
        for (Index c = 0; c < p.dv; ++c) {
          double acc = 0;
          for (Index j = 0; j < p.lk; ++j)
            acc += row[j] / sum * v[((b * p.lk + j) * p.h + h) * p.dv + c];
          out[((b * p.lq + i) * p.h + h) * p.dv + c] = acc;
        }
      }
  }
}

template <int N>
void run_random_case(const Problem& p, std::mt19937& g) {
  std::normal_distribution<double> normal;
  std::bernoulli_distribution coin(0.7);
  auto make = [&](Shape tail) {
    Shape s = p.batch;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  const Shape qs = make({p.lq, p.h, p.d}), ks = make({p.lk, p.h, p.d}), vs = make({p.lk, p.h, p.dv});
  Tensor<float, N> q(linen::to_dims<N>(qs)), k(linen::to_dims<N>(ks)), v(linen::to_dims<N>(vs));
  std::vector<double> qd, kd, vd, bd;
  std::vector<char> md;
  for (auto* t : {&q, &k, &v}) {
    auto& dst = t == &q ? qd : t == &k ? kd : vd;
    for (Index i = 0; i < t->size(); ++i) {
      t->data()[i] = float(normal(g));
      dst.push_back(double(t->data()[i]));
    }
  }
  linen::AttentionOptions<float> opt;
  std::vector<float> bias_f;
  std::unique_ptr<bool[]> mask_b;
  if (p.has_bias) {
    for (Index i = 0; i < linen::num_elements(p.bias_shape); ++i) {
      bias_f.push_back(float(normal(g)));
      bd.push_back(double(bias_f.back()));
    }
    opt.bias = linen::ArrayRef<float>(bias_f.data(), p.bias_shape);
  }
  if (p.has_mask) {
    const Index n = linen::num_elements(p.mask_shape);
    mask_b.reset(new bool[static_cast<std::size_t>(std::max<Index>(n, 1))]);
    for (Index i = 0; i < n; ++i) {
      mask_b[i] = coin(g);
      md.push_back(mask_b[i]);
    }
    opt.mask = linen::ArrayRef<bool>(mask_b.get(), p.mask_shape);
  }
  std::vector<double> w_ref, out_ref;
  reference(p, qd, kd, vd, md, bd, w_ref, out_ref);
  const Tensor<float, N> out = linen::dot_product_attention(q, k, v, opt);
  const Tensor<float, N> w = linen::dot_product_attention_weights(q, k, opt);
  ASSERT_EQ(linen::shape_of(out), make({p.lq, p.h, p.dv}));
  ASSERT_EQ(linen::shape_of(w), make({p.h, p.lq, p.lk}));
  double err_o = 0, err_w = 0, scale_o = 0;
  for (std::size_t i = 0; i < out_ref.size(); ++i) {
    err_o = std::max(err_o, std::abs(double(out.data()[i]) - out_ref[i]));
    scale_o = std::max(scale_o, std::abs(out_ref[i]));
  }
  for (std::size_t i = 0; i < w_ref.size(); ++i)
    err_w = std::max(err_w, std::abs(double(w.data()[i]) - w_ref[i]));
  EXPECT_LE(err_o / scale_o, 2e-6) << "batch " << linen::to_string(p.batch);
  EXPECT_LE(err_w, 2e-6) << "batch " << linen::to_string(p.batch);
}

TEST(DotProductAttention, MatchesDoubleReferenceForEveryBatchRankAndBroadcast) {
  std::mt19937 g(7);
  // rank 3 (no batch) .. rank 6 (three batch dims), masks and biases of many shapes.
  run_random_case<3>({{}, 4, 6, 2, 3, 5, {6}, {2, 4, 6}, true, true}, g);
  run_random_case<3>({{}, 1, 1, 1, 1, 1, {}, {}, false, false}, g);
  run_random_case<4>({{2}, 5, 3, 3, 4, 2, {2, 1, 5, 3}, {1, 3, 1, 3}, true, true}, g);
  run_random_case<4>({{3}, 7, 9, 2, 8, 8, {1, 7, 9}, {9}, true, true}, g);
  run_random_case<5>({{2, 3}, 4, 5, 2, 4, 3, {3, 2, 4, 5}, {2, 1, 1, 1, 5}, true, true}, g);
  run_random_case<5>({{2, 3}, 3, 4, 1, 2, 2, {2, 1, 1, 3, 4}, {}, true, false}, g);
  run_random_case<6>({{2, 1, 2}, 3, 3, 2, 4, 4, {1, 1, 2, 2, 3, 3}, {2, 1, 1, 2, 1, 3}, true, true}, g);
}

TEST(DotProductAttention, AcceptsMapsOverCallerMemory) {
  std::vector<float> qv(2 * 3 * 4), kv(5 * 3 * 4), vv(5 * 3 * 2);
  for (std::size_t i = 0; i < qv.size(); ++i) qv[i] = std::sin(float(i));
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = std::cos(float(i));
  for (std::size_t i = 0; i < vv.size(); ++i) vv[i] = float(i) * 0.1f;
  linen::ConstTensorMap<float, 3> q(qv.data(), 2, 3, 4), k(kv.data(), 5, 3, 4);
  linen::TensorMap<float, 3> v(vv.data(), 5, 3, 2);
  const Tensor<float, 3> out = linen::dot_product_attention(q, k, v);
  const Tensor<float, 3> qt = q, kt = k, vt = v;
  const Tensor<float, 3> ref = linen::dot_product_attention(qt, kt, vt);
  EXPECT_EQ(rel_err(out, ref), 0.0);
}

// ---------------------------------------------------------------------------------------
// Dropout

TEST(DotProductAttention, DropoutMultipliesByKeepOverKeepProbWithTheSourcesMask) {
  const auto f = fixture("dpa_bias_mask");
  const auto q = f.get<float, 4>("inputs/query"), k = f.get<float, 4>("inputs/key"),
             v = f.get<float, 4>("inputs/value");
  for (bool broadcast : {true, false}) {
    Shape seen;
    std::vector<char> drawn;
    linen::AttentionOptions<float> opt;
    opt.dropout_rate = 0.25;
    opt.broadcast_dropout = broadcast;
    opt.dropout_rng = [&](double keep_prob, const Shape& shape, bool* keep) {
      EXPECT_DOUBLE_EQ(keep_prob, 0.75);
      seen = shape;
      for (Index i = 0; i < linen::num_elements(shape); ++i) {
        keep[i] = (i * 7) % 3 != 0;
        drawn.push_back(keep[i]);
      }
    };
    const auto w = linen::dot_product_attention_weights(q, k, opt);
    const auto w0 = linen::dot_product_attention_weights(q, k);  // Flax default: no dropout
    const Shape ws = linen::shape_of(w0);                        // [2, 3, 5, 5]
    EXPECT_EQ(seen, broadcast ? Shape({1, 1, ws[2], ws[3]}) : ws);
    for (Index b = 0; b < ws[0]; ++b)
      for (Index h = 0; h < ws[1]; ++h)
        for (Index i = 0; i < ws[2]; ++i)
          for (Index j = 0; j < ws[3]; ++j) {
            const Index ki = broadcast ? i * ws[3] + j : ((b * ws[1] + h) * ws[2] + i) * ws[3] + j;
            const float expect = drawn[ki] ? w0(b, h, i, j) * (1.0f / 0.75f) : 0.0f;
            EXPECT_FLOAT_EQ(w(b, h, i, j), expect);
          }
    // The output is those weights times V.
    opt.dropout_rng = [&](double, const Shape& shape, bool* keep) {
      for (Index i = 0; i < linen::num_elements(shape); ++i) keep[i] = drawn[i];
    };
    const auto out = linen::dot_product_attention(q, k, v, opt);
    Tensor<float, 4> expect_out(out.dimensions());
    for (Index b = 0; b < ws[0]; ++b)
      for (Index i = 0; i < ws[2]; ++i)
        for (Index h = 0; h < ws[1]; ++h)
          for (Index c = 0; c < v.dimension(3); ++c) {
            double acc = 0;
            for (Index j = 0; j < ws[3]; ++j) acc += double(w(b, h, i, j)) * v(b, j, h, c);
            expect_out(b, i, h, c) = float(acc);
          }
    EXPECT_LE(rel_err(out, expect_out), 1e-6);
  }
}

TEST(DotProductAttention, DeterministicOrZeroRateSkipsDropout) {
  const auto f = fixture("dpa_nobatch");
  const auto q = f.get<float, 3>("inputs/query"), k = f.get<float, 3>("inputs/key");
  int calls = 0;
  linen::AttentionOptions<float> opt;
  opt.dropout_rng = [&](double, const Shape&, bool*) { ++calls; };
  opt.dropout_rate = 0.5;
  opt.deterministic = true;
  (void)linen::dot_product_attention_weights(q, k, opt);
  opt.deterministic = false;
  opt.dropout_rate = 0.0;
  (void)linen::dot_product_attention_weights(q, k, opt);
  EXPECT_EQ(calls, 0);
}

TEST(DotProductAttention, EngineSourceIsReproducibleAndKeepsAtTheRate) {
  Tensor<float, 4> q(2, 64, 2, 4), k(2, 64, 2, 4);
  q.setZero();  // uniform weights 1/64 before dropout
  k.setZero();
  linen::AttentionOptions<float> opt;
  opt.dropout_rate = 0.3;
  opt.broadcast_dropout = false;
  std::mt19937 g1(123), g2(123);
  opt.dropout_rng = g1;
  const auto w1 = linen::dot_product_attention_weights(q, k, opt);
  opt.dropout_rng = g2;
  const auto w2 = linen::dot_product_attention_weights(q, k, opt);
  EXPECT_EQ(rel_err(w1, w2), 0.0);
  Index kept = 0;
  for (Index i = 0; i < w1.size(); ++i) kept += w1.data()[i] != 0.0f;
  const double rate = double(kept) / double(w1.size());  // n = 16384, sd = 0.0036
  EXPECT_NEAR(rate, 0.7, 0.02);
  const auto w3 = linen::dot_product_attention_weights(q, k, opt);  // g2 advanced: new mask
  EXPECT_GT(rel_err(w3, w1), 0.0);
}

// ---------------------------------------------------------------------------------------
// Sowing, force_fp32_for_softmax

TEST(DotProductAttention, SowWeightsHandsBackTheWeightsBeforeDropout) {
  const auto f = fixture("dpa_bias_mask");
  const auto q = f.get<float, 4>("inputs/query"), k = f.get<float, 4>("inputs/key"),
             v = f.get<float, 4>("inputs/value");
  const auto mask = f.get<bool, 4>("mask");
  const auto bias = f.get<float, 4>("bias");
  linen::AttentionOptions<float> opt;
  opt.mask = mask;
  opt.bias = bias;
  Tensor<float, 4> sown;
  int calls = 0;
  opt.sow_weights = [&](linen::ArrayRef<float> w) {
    ++calls;
    sown = linen::ConstTensorMap<float, 4>(w.data(), linen::to_dims<4>(w.shape()));
  };
  opt.dropout_rate = 0.5;
  std::mt19937 g(1);
  opt.dropout_rng = g;
  (void)linen::dot_product_attention(q, k, v, opt);
  EXPECT_EQ(calls, 1);
  EXPECT_LE(rel_err(sown, f.get<float, 4>("attention_weights")), 2e-6);
}

TEST(DotProductAttention, ForceFp32SoftmaxIsCloserToFloat32ForBfloat16) {
  using bf16 = Eigen::bfloat16;
  const auto f = fixture("dpa_bias_mask");
  const auto q = f.get<bf16, 4>("inputs/query"), k = f.get<bf16, 4>("inputs/key"),
             v = f.get<bf16, 4>("inputs/value");
  const auto qf = f.get<float, 4>("inputs/query"), kf = f.get<float, 4>("inputs/key");
  linen::AttentionOptions<bf16> opt;
  const auto w_bf16 = linen::dot_product_attention_weights(q, k, opt);
  opt.force_fp32_for_softmax = true;
  const auto w_fp32 = linen::dot_product_attention_weights(q, k, opt);
  // Reference: float32 maths on the bf16-rounded inputs.
  const Tensor<float, 4> qr = q.cast<float>(), kr = k.cast<float>();
  const auto w_ref = linen::dot_product_attention_weights(qr, kr);
  EXPECT_LE(rel_err(w_fp32, w_ref), 1e-2);
  EXPECT_LE(rel_err(w_bf16, w_ref), 2e-2);
  (void)v;
  (void)qf;
  (void)kf;
}

// ---------------------------------------------------------------------------------------
// Errors name the shapes at fault.

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no exception>";
}

TEST(DotProductAttention, ShapeErrorsNameTheShapes) {
  Tensor<float, 4> q(2, 3, 4, 8), k(2, 5, 4, 8), v(2, 5, 4, 6);
  q.setZero();
  k.setZero();
  v.setZero();
  Tensor<float, 4> k_batch(3, 5, 4, 8), k_heads(2, 5, 2, 8), k_depth(2, 5, 4, 7), v_len(2, 6, 4, 6),
      v_heads(2, 5, 3, 6), v_batch(1, 5, 4, 6);
  for (auto* t : {&k_batch, &k_heads, &k_depth, &v_len, &v_heads, &v_batch}) t->setZero();
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k_batch, v); }).find("batch dims must match; query (2, 3, 4, 8), key (3, 5, 4, 8)"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k_heads, v); }).find("num_heads must match"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k_depth, v); }).find("depths must match; query (2, 3, 4, 8), key (2, 5, 4, 7)"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k, v_len); }).find("k, v lengths must match; key (2, 5, 4, 8), value (2, 6, 4, 6)"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k, v_heads); }).find("num_heads must match"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k, v_batch); }).find("batch dims must match"), std::string::npos);

  linen::AttentionOptions<float> opt;
  Tensor<bool, 4> bad_mask(2, 4, 3, 4);  // kv length 4, weights have 5
  bad_mask.setConstant(true);
  opt.mask = bad_mask;
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k, v, opt); }).find("mask of shape (2, 4, 3, 4) does not broadcast to shape (2, 4, 3, 5)"), std::string::npos);
  Tensor<bool, 5> deep_mask(1, 1, 1, 1, 5);
  deep_mask.setConstant(true);
  opt.mask = deep_mask;
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, k, v, opt); }).find("(1, 1, 1, 1, 5) does not broadcast"), std::string::npos);
  opt.mask = {};
  Tensor<float, 2> bad_bias(3, 2);
  bad_bias.setZero();
  opt.bias = bad_bias;
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention_weights(q, k, opt); }).find("bias of shape (3, 2) does not broadcast to shape (2, 4, 3, 5)"), std::string::npos);
}

TEST(DotProductAttention, DropoutErrors) {
  Tensor<float, 3> q(2, 1, 4);
  q.setZero();
  linen::AttentionOptions<float> opt;
  opt.dropout_rate = 0.1;  // deterministic=false by default, as in Flax
  EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, q, q, opt); }).find("needs a dropout_rng"), std::string::npos);
  std::mt19937 g(0);
  opt.dropout_rng = g;
  for (double bad : {1.0, -0.1, 1.5, std::nan("")}) {
    opt.dropout_rate = bad;
    EXPECT_NE(error_of([&] { (void)linen::dot_product_attention(q, q, q, opt); }).find("dropout_rate must be in [0, 1)"), std::string::npos) << bad;
  }
}

}  // namespace

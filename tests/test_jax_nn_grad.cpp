// SPDX-License-Identifier: Apache-2.0
// linen::jax_nn::vjp (jax.vjp of jax.nn.dot_product_attention) on the fused backward with
// every index rule: against a float64 restatement written below (the forward of
// _dot_product_attention_core in double and its hand-derived backward: jnp.where passes no
// cotangent to masked logits, padded query rows are multiplied by 0, GQA's dk, dv summed
// over the group), and by properties (GQA equals MHA with K/V repeated and dk, dv summed;
// a window equals its band as a mask; 1 and 2 threads give the same bits). Registered per
// ISA level (label isa).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/jax_nn.hpp>
#include <linen/jax_nn_grad.hpp>

namespace {

using linen::ArrayRef;
using linen::Index;
using linen::Shape;
using linen::Tensor;
namespace jn = linen::jax_nn;

// One problem: dims, the options' arrays (owned here), their flags.
struct Case {
  Index B = 2, T = 5, S = 7, N = 2, K = 2, H = 4;
  Shape bias_shape;  // empty: no bias
  Shape mask_shape;  // empty: no mask
  double mask_p = 0.3;  // probability that a mask entry is false
  std::optional<double> scale;
  bool causal = false;
  std::optional<jn::WindowSize> window;
  std::vector<std::int32_t> q_len, kv_len;  // empty: none
  unsigned seed = 1;
};

// Element (b, n, t, s) of a 4-d array of shape sh broadcast to [B, N, T, S]: its offset.
Index off4(const Shape& s_in, Index b, Index n, Index t, Index s) {
  Shape sh = s_in;
  sh.insert(sh.begin(), 4 - sh.size(), Index{1});
  const Index c[4] = {b, n, t, s};
  Index off = 0;
  for (std::size_t i = 0; i < 4; ++i) off = off * sh[i] + (sh[i] == 1 ? 0 : c[i]);
  return off;
}

Index count(const Shape& s) {
  Index n = 1;
  for (Index x : s) n *= x;
  return n;
}

// The inputs of a case, as doubles (values of T: drawn, rounded to T).
template <class T>
struct Inputs {
  Tensor<T, 4> q, k, v, dout;
  std::vector<T> bias;
  std::unique_ptr<bool[]> mask_b;
};

template <class T>
Tensor<T, 4> draw(const std::array<Index, 4>& d, std::mt19937& g) {
  Tensor<T, 4> t(d);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(u(g));
  return t;
}

template <class T>
void make_inputs(const Case& c, Inputs<T>& in) {
  std::mt19937 g(c.seed);
  in.q = draw<T>({c.B, c.T, c.N, c.H}, g);
  in.k = draw<T>({c.B, c.S, c.K, c.H}, g);
  in.v = draw<T>({c.B, c.S, c.K, c.H}, g);
  in.dout = draw<T>({c.B, c.T, c.N, c.H}, g);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  if (!c.bias_shape.empty()) {
    in.bias.resize(static_cast<std::size_t>(count(c.bias_shape)));
    for (auto& x : in.bias) x = static_cast<T>(u(g));
  }
  if (!c.mask_shape.empty()) {
    const Index n = count(c.mask_shape);
    in.mask_b.reset(new bool[static_cast<std::size_t>(n)]);
    std::uniform_real_distribution<double> p(0.0, 1.0);
    for (Index i = 0; i < n; ++i) in.mask_b[static_cast<std::size_t>(i)] = p(g) >= c.mask_p;
  }
}

template <class T>
jn::Options<T> options_of(const Case& c, const Inputs<T>& in) {
  jn::Options<T> o;
  if (!c.bias_shape.empty()) o.bias = ArrayRef<T>(in.bias.data(), c.bias_shape);
  if (!c.mask_shape.empty()) o.mask = ArrayRef<bool>(in.mask_b.get(), c.mask_shape);
  o.scale = c.scale;
  o.is_causal = c.causal;
  o.local_window_size = c.window;
  if (!c.q_len.empty()) o.query_seq_lengths = ArrayRef<std::int32_t>(c.q_len.data(), {c.B});
  if (!c.kv_len.empty()) o.key_value_seq_lengths = ArrayRef<std::int32_t>(c.kv_len.data(), {c.B});
  return o;
}

struct Expected {
  std::vector<double> out, dq, dk, dv, dbias;
};

// The float64 restatement: forward
//   logits[t, s] = scale * q_t . k_s + bias; masked (mask false, s > t under is_causal,
//   outside t - left <= s <= t + right, t >= q_len, s >= kv_len) -> -0.7 * FLT_MAX;
//   p = softmax over all S; out_t = (t < q_len) * sum_s p[t, s] v_s,
// and its backward, derived by hand:
//   g_t = (t < q_len) * dout_t; dp[t, s] = g_t . v_s; dS = p * (dp - sum_s p dp), 0 where masked;
//   dbias = dS summed into the bias's shape; dq_t = scale * sum_s dS k_s;
//   dk_s += scale * sum_t dS q_t; dv_s += sum_t p g_t (k, v of kv head n / (N / K)).
template <class T>
Expected restatement(const Case& c, const Inputs<T>& in) {
  const Index B = c.B, Tq = c.T, S = c.S, N = c.N, K = c.K, H = c.H, G = N / K;
  const double scale = c.scale ? *c.scale : 1.0 / std::sqrt(static_cast<double>(H));
  const double fill = static_cast<double>(static_cast<float>(-0.7 * static_cast<double>(std::numeric_limits<float>::max())));
  auto Q = [&](Index b, Index t, Index n, Index h) { return static_cast<double>(in.q.data()[((b * Tq + t) * N + n) * H + h]); };
  auto Kv = [&](const Tensor<T, 4>& x, Index b, Index s, Index kh, Index h) {
    return static_cast<double>(x.data()[((b * S + s) * K + kh) * H + h]);
  };
  Expected e;
  e.out.assign(static_cast<std::size_t>(B * Tq * N * H), 0.0);
  e.dq = e.out;
  e.dk.assign(static_cast<std::size_t>(B * S * K * H), 0.0);
  e.dv = e.dk;
  e.dbias.assign(in.bias.size(), 0.0);
  std::vector<double> p(static_cast<std::size_t>(S)), dp(static_cast<std::size_t>(S));
  std::vector<char> vis(static_cast<std::size_t>(S));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      const Index kh = n / G;
      for (Index t = 0; t < Tq; ++t) {
        const bool row_in = c.q_len.empty() || t < c.q_len[static_cast<std::size_t>(b)];
        double mx = -INFINITY;
        for (Index s = 0; s < S; ++s) {
          bool ok = row_in;
          if (!c.mask_shape.empty()) ok = ok && in.mask_b[static_cast<std::size_t>(off4(c.mask_shape, b, n, t, s))];
          if (c.causal) ok = ok && s <= t;
          if (c.window) ok = ok && t - c.window->left <= s && s <= t + c.window->right;
          if (!c.kv_len.empty()) ok = ok && s < c.kv_len[static_cast<std::size_t>(b)];
          vis[static_cast<std::size_t>(s)] = ok;
          double x = 0;
          for (Index h = 0; h < H; ++h) x += Q(b, t, n, h) * Kv(in.k, b, s, kh, h);
          x *= scale;
          if (!c.bias_shape.empty()) x += static_cast<double>(in.bias[static_cast<std::size_t>(off4(c.bias_shape, b, n, t, s))]);
          if (!ok) x = fill;
          p[static_cast<std::size_t>(s)] = x;
          mx = std::max(mx, x);
        }
        double sum = 0;
        for (auto& x : p) sum += (x = std::exp(x - mx));
        for (auto& x : p) x /= sum;
        const double keep = row_in ? 1.0 : 0.0;
        double* o = &e.out[static_cast<std::size_t>(((b * Tq + t) * N + n) * H)];
        for (Index s = 0; s < S; ++s)
          for (Index h = 0; h < H; ++h) o[h] += keep * p[static_cast<std::size_t>(s)] * Kv(in.v, b, s, kh, h);
        // backward
        auto gt = [&](Index h) { return keep * static_cast<double>(in.dout.data()[((b * Tq + t) * N + n) * H + h]); };
        double delta = 0;
        for (Index s = 0; s < S; ++s) {
          double x = 0;
          for (Index h = 0; h < H; ++h) x += gt(h) * Kv(in.v, b, s, kh, h);
          dp[static_cast<std::size_t>(s)] = x;
          delta += p[static_cast<std::size_t>(s)] * x;
        }
        for (Index s = 0; s < S; ++s) {
          const double ps = p[static_cast<std::size_t>(s)];
          for (Index h = 0; h < H; ++h) e.dv[static_cast<std::size_t>(((b * S + s) * K + kh) * H + h)] += ps * gt(h);
          const double ds = vis[static_cast<std::size_t>(s)] ? ps * (dp[static_cast<std::size_t>(s)] - delta) : 0.0;
          if (!c.bias_shape.empty()) e.dbias[static_cast<std::size_t>(off4(c.bias_shape, b, n, t, s))] += ds;
          for (Index h = 0; h < H; ++h) {
            e.dq[static_cast<std::size_t>(((b * Tq + t) * N + n) * H + h)] += scale * ds * Kv(in.k, b, s, kh, h);
            e.dk[static_cast<std::size_t>(((b * S + s) * K + kh) * H + h)] += scale * ds * Q(b, t, n, h);
          }
        }
      }
    }
  return e;
}

// Tolerance relative to the largest |expected| of each array.
template <class T>
double tol() {
  if constexpr (std::is_same_v<T, double>) return 2e-6;  // the softmax's float32 logits
  else if constexpr (std::is_same_v<T, float>) return 2e-5;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 1e-2;
  else return 6e-2;
}

template <class X>
void expect_near(const X* got, const std::vector<double>& want, double rel, const std::string& what) {
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  const double atol = rel * std::max(scale, 1e-3);
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    ASSERT_TRUE(std::abs(g - want[i]) <= atol) << what << "[" << i << "] = " << g << ", expected " << want[i]
                                               << " (tolerance " << atol << ")";
  }
}

template <class T>
void check_case(const Case& c, const char* name) {
  SCOPED_TRACE(name);
  Inputs<T> in;
  make_inputs(c, in);
  const jn::Options<T> o = options_of(c, in);
  auto [out, pullback] = jn::vjp(in.q, in.k, in.v, o);
  const jn::Grads<T, 4, 4> g = pullback(in.dout);
  const Expected e = restatement(c, in);
  const double r = tol<T>();
  expect_near(out.data(), e.out, r, "out");
  expect_near(g.query.data(), e.dq, r, "dq");
  expect_near(g.key.data(), e.dk, r, "dk");
  expect_near(g.value.data(), e.dv, r, "dv");
  if (!c.bias_shape.empty()) {
    ASSERT_EQ(g.bias.size(), static_cast<Index>(e.dbias.size()));
    expect_near(g.bias.data(), e.dbias, r, "dbias");
  } else {
    EXPECT_EQ(g.bias.size(), 0);
  }
  // the output is jax_nn::dot_product_attention's, bit for bit
  const Tensor<T, 4> fwd = jn::dot_product_attention(in.q, in.k, in.v, o);
  for (Index i = 0; i < fwd.size(); ++i) ASSERT_EQ(static_cast<double>(fwd.data()[i]), static_cast<double>(out.data()[i]));
  // padded query rows: dq is 0
  for (Index b = 0; b < c.B && !c.q_len.empty(); ++b)
    for (Index t = c.q_len[static_cast<std::size_t>(b)]; t < c.T; ++t)
      for (Index n = 0; n < c.N; ++n)
        for (Index h = 0; h < c.H; ++h) ASSERT_EQ(static_cast<double>(g.query(b, t, n, h)), 0.0);
}

// Every index rule and option, each in every element type.
std::vector<std::pair<std::string, Case>> cases() {
  std::vector<std::pair<std::string, Case>> v;
  Case c;
  v.push_back({"plain", c});
  c = Case{};
  c.N = 4;
  c.K = 2;
  v.push_back({"gqa", c});
  c.K = 1;
  v.push_back({"mqa", c});
  c = Case{};
  c.window = jn::WindowSize(2, 1);
  v.push_back({"window", c});
  c.causal = true;
  v.push_back({"window_causal", c});
  c = Case{};
  c.causal = true;
  c.T = 7;
  c.S = 4;
  v.push_back({"causal_T_gt_S", c});
  c.T = 3;
  c.S = 8;
  v.push_back({"causal_T_lt_S", c});
  c = Case{};
  c.q_len = {3, 5};
  c.kv_len = {7, 2};
  v.push_back({"lengths", c});
  c.q_len = {0, 5};
  c.kv_len = {0, 4};
  v.push_back({"lengths_zero", c});
  c = Case{};
  c.q_len = {2, 4};
  v.push_back({"q_lengths_only", c});
  c = Case{};
  c.kv_len = {3, 6};
  v.push_back({"kv_lengths_only", c});
  for (const Shape& bs : {Shape{2, 2, 5, 7}, Shape{1, 2, 5, 7}, Shape{2, 1, 5, 7}, Shape{5, 7}, Shape{1, 1, 1, 7}}) {
    c = Case{};
    c.bias_shape = bs;
    v.push_back({"bias" + linen::to_string(bs), c});
  }
  c = Case{};
  c.mask_shape = {2, 2, 5, 7};
  v.push_back({"mask", c});
  c.mask_shape = {2, 1, 1, 7};
  v.push_back({"mask_keys", c});
  c = Case{};
  c.scale = 0.37;
  c.bias_shape = {1, 4, 5, 7};
  c.mask_shape = {2, 1, 5, 7};
  c.causal = true;
  c.window = jn::WindowSize(3, 0);
  c.N = 4;
  c.K = 2;
  c.q_len = {4, 5};
  c.kv_len = {5, 7};
  v.push_back({"everything", c});
  c = Case{};
  c.window = jn::WindowSize(100, 100);  // wider than the sequence: no mask at all
  v.push_back({"window_wide", c});
  c = Case{};
  c.mask_shape = {2, 2, 5, 7};
  c.mask_p = 0.8;  // many rows fully masked
  c.seed = 3;
  v.push_back({"mostly_masked", c});
  return v;
}

template <class T>
class JaxNnGrad : public ::testing::Test {};
using Types = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(JaxNnGrad, Types);

TYPED_TEST(JaxNnGrad, MatchesFloat64Restatement) {
  for (const auto& [name, c] : cases()) check_case<TypeParam>(c, name.c_str());
}

// A row whose keys are all masked is uniform over all S keys: its cotangent reaches every
// value (d_out / S) and nothing else (dq 0, dk and dbias nothing from it).
TYPED_TEST(JaxNnGrad, FullyMaskedRow) {
  using T = TypeParam;
  Case c;
  c.mask_shape = {2, 2, 5, 7};
  c.bias_shape = {2, 2, 5, 7};
  Inputs<T> in;
  make_inputs(c, in);
  for (Index s = 0; s < c.S; ++s) in.mask_b[static_cast<std::size_t>(off4(c.mask_shape, 1, 0, 2, s))] = false;
  const jn::Options<T> o = options_of(c, in);
  auto [out, pullback] = jn::vjp(in.q, in.k, in.v, o);
  const auto g = pullback(in.dout);
  const Expected e = restatement(c, in);
  expect_near(g.query.data(), e.dq, tol<T>(), "dq");
  expect_near(g.key.data(), e.dk, tol<T>(), "dk");
  expect_near(g.value.data(), e.dv, tol<T>(), "dv");
  expect_near(g.bias.data(), e.dbias, tol<T>(), "dbias");
  for (Index h = 0; h < c.H; ++h) EXPECT_EQ(static_cast<double>(g.query(1, 2, 0, h)), 0.0);
  for (Index s = 0; s < c.S; ++s) EXPECT_EQ(static_cast<double>(g.bias(1, 0, 2, s)), 0.0);
  // a key length of 0: every row of the batch entry fully masked
  c = Case{};
  c.kv_len = {0, 7};
  check_case<T>(c, "kv_length_0");
}

// Lengths of 0: the whole batch entry is padding (rows zero, no cotangent anywhere).
TYPED_TEST(JaxNnGrad, ZeroLengthsAndEmptyAxes) {
  using T = TypeParam;
  Case c;
  c.q_len = {0, 0};
  Inputs<T> in;
  make_inputs(c, in);
  auto [out, pullback] = jn::vjp(in.q, in.k, in.v, options_of(c, in));
  const auto g = pullback(in.dout);
  for (Index i = 0; i < g.query.size(); ++i) ASSERT_EQ(static_cast<double>(g.query.data()[i]), 0.0);
  for (Index i = 0; i < g.key.size(); ++i) ASSERT_EQ(static_cast<double>(g.key.data()[i]), 0.0);
  for (Index i = 0; i < g.value.size(); ++i) ASSERT_EQ(static_cast<double>(g.value.data()[i]), 0.0);
  // S = 0 (no keys): zeros out, dq 0; T = 0 (no queries): dk, dv 0
  Case e;
  e.S = 0;
  check_case<T>(e, "S0");
  e = Case{};
  e.T = 0;
  check_case<T>(e, "T0");
}

// GQA equals MHA with the K/V heads repeated, dk and dv summed over each group.
TYPED_TEST(JaxNnGrad, GqaEqualsRepeatedHeads) {
  using T = TypeParam;
  Case c;
  c.N = 6;
  c.K = 2;
  c.T = 9;
  c.S = 11;
  c.causal = true;
  c.bias_shape = {2, 6, 9, 11};
  Inputs<T> in;
  make_inputs(c, in);
  const jn::Options<T> o = options_of(c, in);
  auto [out, pullback] = jn::vjp(in.q, in.k, in.v, o);
  const auto g = pullback(in.dout);
  const Index G = c.N / c.K;
  Tensor<T, 4> kr(c.B, c.S, c.N, c.H), vr(c.B, c.S, c.N, c.H);
  for (Index b = 0; b < c.B; ++b)
    for (Index s = 0; s < c.S; ++s)
      for (Index n = 0; n < c.N; ++n)
        for (Index h = 0; h < c.H; ++h) {
          kr(b, s, n, h) = in.k(b, s, n / G, h);
          vr(b, s, n, h) = in.v(b, s, n / G, h);
        }
  auto [out_r, pullback_r] = jn::vjp(in.q, kr, vr, o);
  const auto gr = pullback_r(in.dout);
  for (Index i = 0; i < out.size(); ++i) ASSERT_EQ(static_cast<double>(out.data()[i]), static_cast<double>(out_r.data()[i]));
  std::vector<double> dk(static_cast<std::size_t>(g.key.size()), 0.0), dv = dk;
  for (Index b = 0; b < c.B; ++b)
    for (Index s = 0; s < c.S; ++s)
      for (Index n = 0; n < c.N; ++n)
        for (Index h = 0; h < c.H; ++h) {
          dk[static_cast<std::size_t>(((b * c.S + s) * c.K + n / G) * c.H + h)] += static_cast<double>(gr.key(b, s, n, h));
          dv[static_cast<std::size_t>(((b * c.S + s) * c.K + n / G) * c.H + h)] += static_cast<double>(gr.value(b, s, n, h));
        }
  // dq and dbias: the same arithmetic per head, bit for bit
  for (Index i = 0; i < g.query.size(); ++i)
    ASSERT_EQ(static_cast<double>(g.query.data()[i]), static_cast<double>(gr.query.data()[i]));
  for (Index i = 0; i < g.bias.size(); ++i)
    ASSERT_EQ(static_cast<double>(g.bias.data()[i]), static_cast<double>(gr.bias.data()[i]));
  expect_near(g.key.data(), dk, 4 * tol<T>(), "dk");
  expect_near(g.value.data(), dv, 4 * tol<T>(), "dv");
}

// A window equals its band given as a mask (jax.nn's _get_window_mask).
TYPED_TEST(JaxNnGrad, WindowEqualsBandMask) {
  using T = TypeParam;
  for (const jn::WindowSize w : {jn::WindowSize(3), jn::WindowSize(0, 2), jn::WindowSize(-1, 3), jn::WindowSize(40)}) {
    Case c;
    c.T = 140;  // more than one query tile (128 rows)
    c.S = 150;
    c.B = 1;
    c.window = w;
    Inputs<T> in;
    make_inputs(c, in);
    const jn::Options<T> o = options_of(c, in);
    auto [out, pullback] = jn::vjp(in.q, in.k, in.v, o);
    const auto g = pullback(in.dout);
    std::unique_ptr<bool[]> band(new bool[static_cast<std::size_t>(c.T * c.S)]);
    for (Index t = 0; t < c.T; ++t)
      for (Index s = 0; s < c.S; ++s) band[static_cast<std::size_t>(t * c.S + s)] = t - w.left <= s && s <= t + w.right;
    jn::Options<T> om;
    om.mask = ArrayRef<bool>(band.get(), {c.T, c.S});
    auto [out_m, pullback_m] = jn::vjp(in.q, in.k, in.v, om);
    const auto gm = pullback_m(in.dout);
    const auto same = [](const auto& x, const auto& y, const char* what) {
      for (Index i = 0; i < x.size(); ++i)
        ASSERT_NEAR(static_cast<double>(x.data()[i]), static_cast<double>(y.data()[i]), 1e-6 + 1e-6 * std::abs(static_cast<double>(y.data()[i])))
            << what << "[" << i << "]";
    };
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      same(out, out_m, "out");
      same(g.query, gm.query, "dq");
      same(g.key, gm.key, "dk");
      same(g.value, gm.value, "dv");
    }
    const Expected e = restatement(c, in);
    expect_near(g.query.data(), e.dq, tol<T>(), "dq");
    expect_near(g.key.data(), e.dk, tol<T>(), "dk");
    expect_near(g.value.data(), e.dv, tol<T>(), "dv");
  }
}

// The backward's work split follows from the problem alone: 1, 2 and 3 threads give the
// same bits (key groups, a bias shared by heads and batch, GQA, a window, lengths).
TYPED_TEST(JaxNnGrad, BitsDoNotDependOnThreads) {
  using T = TypeParam;
  Case c;
  c.B = 1;
  c.N = 4;
  c.K = 1;
  c.T = 150;
  c.S = 700;  // several key tiles: key groups
  c.H = 8;
  c.bias_shape = {1, 1, 150, 700};
  c.window = jn::WindowSize(200, 30);
  c.kv_len = {650};
  c.q_len = {140};
  Inputs<T> in;
  make_inputs(c, in);
  jn::Options<T> o = options_of(c, in);
  auto run = [&](int threads) {
    std::unique_ptr<Eigen::ThreadPool> pool;
    if (threads > 1) pool.reset(new Eigen::ThreadPool(threads));
    o.thread_pool = pool.get();
    auto [out, pullback] = jn::vjp(in.q, in.k, in.v, o);
    return pullback(in.dout);
  };
  const auto g1 = run(1), g2 = run(2), g3 = run(3);
  const auto bits = [](const auto& x, const auto& y, const char* what) {
    ASSERT_EQ(x.size(), y.size());
    for (Index i = 0; i < x.size(); ++i)
      ASSERT_EQ(static_cast<double>(x.data()[i]), static_cast<double>(y.data()[i])) << what << "[" << i << "]";
  };
  for (const auto* g : {&g2, &g3}) {
    bits(g1.query, g->query, "dq");
    bits(g1.key, g->key, "dk");
    bits(g1.value, g->value, "dv");
    bits(g1.bias, g->bias, "dbias");
  }
  if constexpr (std::is_same_v<T, float>) {
    const Expected e = restatement(c, in);
    expect_near(g1.query.data(), e.dq, tol<T>(), "dq");
    expect_near(g1.key.data(), e.dk, tol<T>(), "dk");
    expect_near(g1.value.data(), e.dv, tol<T>(), "dv");
    expect_near(g1.bias.data(), e.dbias, tol<T>(), "dbias");
  }
}

// Rank-3 inputs ([T, N, H], [S, K, H]) are the rank-4 call with B = 1.
TEST(JaxNnGradApi, Rank3) {
  Case c;
  c.B = 1;
  c.N = 4;
  c.K = 2;
  Inputs<float> in;
  make_inputs(c, in);
  const Tensor<float, 3> q = in.q.reshape(std::array<Index, 3>{c.T, c.N, c.H});
  const Tensor<float, 3> k = in.k.reshape(std::array<Index, 3>{c.S, c.K, c.H});
  const Tensor<float, 3> v = in.v.reshape(std::array<Index, 3>{c.S, c.K, c.H});
  const Tensor<float, 3> d = in.dout.reshape(std::array<Index, 3>{c.T, c.N, c.H});
  auto [out, pullback] = jn::vjp(q, k, v);
  const jn::Grads<float, 3, 3> g = pullback(d);
  auto [out4, pullback4] = jn::vjp(in.q, in.k, in.v);
  const auto g4 = pullback4(in.dout);
  ASSERT_EQ(g.query.size(), g4.query.size());
  for (Index i = 0; i < g.query.size(); ++i) ASSERT_EQ(g.query.data()[i], g4.query.data()[i]);
  for (Index i = 0; i < g.key.size(); ++i) ASSERT_EQ(g.key.data()[i], g4.key.data()[i]);
  for (Index i = 0; i < g.value.size(); ++i) ASSERT_EQ(g.value.data()[i], g4.value.data()[i]);
  EXPECT_EQ(g.key.dimension(0), c.S);
}

// The pullback names the cotangent's shape and the output's; the forward's errors are the
// forward's, at vjp.
TEST(JaxNnGradApi, Errors) {
  Case c;
  Inputs<float> in;
  make_inputs(c, in);
  auto [out, pullback] = jn::vjp(in.q, in.k, in.v);
  const Tensor<float, 4> bad(c.B, c.T + 1, c.N, c.H);
  try {
    pullback(bad);
    FAIL() << "no throw";
  } catch (const linen::invalid_argument& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("jax_nn::vjp"), std::string::npos) << m;
    EXPECT_NE(m.find("(2, 6, 2, 4)"), std::string::npos) << m;
    EXPECT_NE(m.find("(2, 5, 2, 4)"), std::string::npos) << m;
  }
  jn::Options<float> o;
  o.implementation = "cudnn";
  EXPECT_THROW(jn::vjp(in.q, in.k, in.v, o), linen::invalid_argument);
  const Tensor<float, 4> k3(c.B, c.S, 3, c.H);
  EXPECT_THROW(jn::vjp(in.q, k3, k3), linen::invalid_argument);
  std::vector<std::int32_t> ql = {6, 1};
  jn::Options<float> ol;
  ol.query_seq_lengths = ArrayRef<std::int32_t>(ql.data(), {2});
  EXPECT_THROW(jn::vjp(in.q, in.k, in.v, ol), linen::invalid_argument);
}

}  // namespace

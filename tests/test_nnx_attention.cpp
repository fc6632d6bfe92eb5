// SPDX-License-Identifier: Apache-2.0
//
// nnx.MultiHeadAttention's call, init_cache and decode steps, and nnx.dot_product_attention
// (flax/nnx/nn/attention.py, Flax 0.12.x), include/linen/nnx/attention.hpp.
//
// What is checked against what:
//   - numbers: a float64 restatement of __call__ written here with explicit per-head loops
//     (the projections, query_ln / key_ln per head, grouped kv heads n / (N / K), the
//     softmax over the visible keys, dropout's keep / keep_prob, the out projection), for
//     both numerics paths; dropout's keep mask restated from the stream's rule
//     (bernoulli(fold_in(key, count), 1 - rate, [1, 1, q, kv]));
//   - the path rule: in float64 the jax.nn path runs its softmax in float32 (so it is
//     ~1e-7 off the restatement) and the einsum path in float64 (~1e-15): Auto picks by
//     dropout_rate and sow_weights, never by deterministic; forced paths equal linen's
//     jax_nn:: and flax.linen functions on the projected q, k, v bit for bit;
//   - GQA equals MHA whose K/V projections repeat each kv head for its group;
//   - decode: a decode loop equals the causal forward, a chunk the steps, the direct step
//     apply's step through attention_fn; the cache overflow and every bad input throw
//     naming what is at fault and change nothing; no allocation after warm-up.
#define EIGEN_RUNTIME_NO_MALLOC
#include <linen/nnx.hpp>
#include <linen/jax_nn.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen::Index;
using linen::Shape;
using linen::shape_of;
using linen::Tensor;
namespace nnx = linen::nnx;

template <class T>
using MHA = nnx::MultiHeadAttention<T>;
template <class T>
using Params = nnx::MultiHeadAttentionParams<T>;

template <class X>
void fill_random(X& t, unsigned seed, double scale = 1.0) {
  std::mt19937 g(seed);
  std::normal_distribution<double> d(0.0, scale);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<typename X::Scalar>(d(g));
}

template <class T>
typename MHA<T>::Config config(Index N, Index K, Index F, Index qkv, bool normalize_qk = false, double rate = 0.0) {
  typename MHA<T>::Config c;
  c.num_heads = N;
  c.in_features = F;
  c.qkv_features = qkv;
  c.num_kv_heads = K;
  c.normalize_qk = normalize_qk;
  c.dropout_rate = rate;
  return c;
}

// Parameters from init, then biases and LayerNorm scales made non-trivial.
template <class T>
typename MHA<T>::Variables make_vars(const MHA<T>& m, std::uint64_t seed) {
  nnx::Rngs rngs(seed);
  auto v = m.init(rngs);
  auto& p = v.params;
  fill_random(p.query.bias, 11, 0.3);
  fill_random(p.key.bias, 12, 0.3);
  fill_random(p.value.bias, 13, 0.3);
  fill_random(p.out.bias, 14, 0.3);
  if (m.config().normalize_qk) {
    fill_random(p.query_ln.scale, 15, 1.0);
    fill_random(p.key_ln.scale, 16, 1.0);
  }
  return v;
}

// ---- the float64 restatement ----------------------------------------------------------

struct RefOptions {
  std::function<bool(Index b, Index n, Index i, Index j)> visible;  // empty: all
  std::function<double(Index b, Index n, Index i, Index j)> keep;   // dropout multiplier
};

// __call__ in float64 with explicit loops: x* [B, L, F] flat; returns [B, Lq, out].
template <class P>
std::vector<double> reference(const typename MHA<P>::Config& c, const Params<P>& p, Index B, Index Lq, Index Lk,
                              const std::vector<double>& xq, const std::vector<double>& xk,
                              const std::vector<double>& xv, const RefOptions& o = {}) {
  const Index N = c.num_heads, K = c.num_kv_heads ? c.num_kv_heads : N, hd = c.qkv_features / N, F = c.in_features,
              Fkv = c.in_kv_features ? c.in_kv_features : F, O = c.out_features ? c.out_features : F, g = N / K;
  auto project = [&](const auto& lin, const std::vector<double>& x, Index L, Index in, Index heads) {
    std::vector<double> y(static_cast<std::size_t>(B * L * heads * hd));
    for (Index r = 0; r < B * L; ++r)
      for (Index h = 0; h < heads; ++h)
        for (Index e = 0; e < hd; ++e) {
          double s = static_cast<double>(lin.bias.data()[h * hd + e]);
          for (Index f = 0; f < in; ++f)
            s += x[static_cast<std::size_t>(r * in + f)] * static_cast<double>(lin.kernel.data()[(f * heads + h) * hd + e]);
          y[static_cast<std::size_t>((r * heads + h) * hd + e)] = s;
        }
    return y;
  };
  auto layer_norm = [&](std::vector<double>& x, const auto& scale) {
    for (std::size_t r = 0; r < x.size() / static_cast<std::size_t>(hd); ++r) {
      double m = 0, v = 0;
      for (Index e = 0; e < hd; ++e) m += x[r * hd + e];
      m /= hd;
      for (Index e = 0; e < hd; ++e) v += (x[r * hd + e] - m) * (x[r * hd + e] - m);
      v /= hd;
      for (Index e = 0; e < hd; ++e)
        x[r * hd + e] = (x[r * hd + e] - m) / std::sqrt(v + 1e-6) * static_cast<double>(scale.data()[e]);
    }
  };
  std::vector<double> q = project(p.query, xq, Lq, F, N), k = project(p.key, xk, Lk, Fkv, K),
                      v = project(p.value, xv, Lk, Fkv, K);
  if (c.normalize_qk) {
    layer_norm(q, p.query_ln.scale);
    layer_norm(k, p.key_ln.scale);
  }
  std::vector<double> x(static_cast<std::size_t>(B * Lq * N * hd), 0.0), w(static_cast<std::size_t>(Lk));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      const Index kh = n / g;  // query head n reads kv head n / (N / K)
      for (Index i = 0; i < Lq; ++i) {
        double mx = -INFINITY;
        bool any = false;
        for (Index j = 0; j < Lk; ++j) {
          double s = 0;
          for (Index e = 0; e < hd; ++e)
            s += q[static_cast<std::size_t>(((b * Lq + i) * N + n) * hd + e)] *
                 k[static_cast<std::size_t>(((b * Lk + j) * K + kh) * hd + e)];
          s /= std::sqrt(static_cast<double>(hd));
          const bool vis = !o.visible || o.visible(b, n, i, j);
          w[static_cast<std::size_t>(j)] = vis ? s : -INFINITY;
          if (vis) mx = std::max(mx, s), any = true;
        }
        double sum = 0;
        for (Index j = 0; j < Lk; ++j) {
          double& wj = w[static_cast<std::size_t>(j)];
          wj = any ? std::exp(wj - mx) : 1.0;  // a fully masked row: uniform over all keys
          sum += wj;
        }
        for (Index j = 0; j < Lk; ++j) {
          const double wj = w[static_cast<std::size_t>(j)] / sum * (o.keep ? o.keep(b, n, i, j) : 1.0);
          for (Index e = 0; e < hd; ++e)
            x[static_cast<std::size_t>(((b * Lq + i) * N + n) * hd + e)] +=
                wj * v[static_cast<std::size_t>(((b * Lk + j) * K + kh) * hd + e)];
        }
      }
    }
  std::vector<double> y(static_cast<std::size_t>(B * Lq * O));
  for (Index r = 0; r < B * Lq; ++r)
    for (Index oo = 0; oo < O; ++oo) {
      double s = static_cast<double>(p.out.bias.data()[oo]);
      for (Index f = 0; f < N * hd; ++f)
        s += x[static_cast<std::size_t>(r * N * hd + f)] * static_cast<double>(p.out.kernel.data()[f * O + oo]);
      y[static_cast<std::size_t>(r * O + oo)] = s;
    }
  return y;
}

template <class X>
std::vector<double> as_doubles(const X& t) {
  std::vector<double> v(static_cast<std::size_t>(t.size()));
  for (Index i = 0; i < t.size(); ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(t.data()[i]);
  return v;
}

// max |a - b| / max |b|.
template <class X>
double rel_err(const X& a, const std::vector<double>& b) {
  EXPECT_EQ(static_cast<std::size_t>(a.size()), b.size());
  double e = 0, s = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    e = std::max(e, std::abs(static_cast<double>(a.data()[i]) - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return e / s;
}

template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  return std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}

// ---- the call -------------------------------------------------------------------------

TEST(NnxAttention, EinsumPathEqualsFloat64Restatement) {
  for (bool nqk : {false, true})
    for (Index K : {Index{4}, Index{2}, Index{1}}) {
      const auto c = config<double>(4, K, 12, 16, nqk, 0.1);  // dropout_rate > 0: the einsum path
      const MHA<double> m(c);
      auto v = make_vars(m, 3);
      Tensor<double, 3> xq(2, 5, 12), xk(2, 7, 12), xv(2, 7, 12);
      fill_random(xq, 1), fill_random(xk, 2), fill_random(xv, 3);
      typename MHA<double>::CallOptions call;
      call.deterministic = true;
      const auto y = m.apply(v.params, xq, xk, xv, call);
      EXPECT_EQ(shape_of(y), (Shape{2, 5, 12}));
      const auto want = reference<double>(m.config(), v.params, 2, 5, 7, as_doubles(xq), as_doubles(xk), as_doubles(xv));
      EXPECT_LT(rel_err(y, want), 1e-13) << "K=" << K << " normalize_qk=" << nqk;
    }
}

TEST(NnxAttention, JaxNnPathRunsItsSoftmaxInFloat32EvenForFloat64) {
  const auto c = config<double>(4, 2, 12, 16);  // dropout_rate 0: jax.nn's path
  const MHA<double> m(c);
  auto v = make_vars(m, 4);
  Tensor<double, 3> x(2, 6, 12);
  fill_random(x, 5);
  const auto y = m.apply(v.params, x);
  const auto want = reference<double>(m.config(), v.params, 2, 6, 6, as_doubles(x), as_doubles(x), as_doubles(x));
  const double err = rel_err(y, want);
  EXPECT_LT(err, 3e-6);   // float32's softmax
  EXPECT_GT(err, 1e-11);  // ... not float64's
  typename MHA<double>::CallOptions einsum;
  einsum.path = nnx::AttentionPath::Einsum;
  EXPECT_LT(rel_err(m.apply(v.params, x, einsum), want), 1e-13);
}

TEST(NnxAttention, JaxNnPathEqualsFloat32RestatementWithMaskAndCausal) {
  const auto c = config<float>(4, 2, 8, 16, true);
  const MHA<float> m(c);
  auto v = make_vars(m, 6);
  Tensor<float, 3> x(3, 6, 8);
  fill_random(x, 7);
  Tensor<bool, 4> mask(3, 1, 6, 6);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (i * 7) % 5 != 0;
  for (Index j = 0; j < 6; ++j) mask(1, 0, 2, j) = false;  // a fully masked row: uniform
  for (bool causal : {false, true}) {
    typename MHA<float>::CallOptions call;
    call.mask = mask;
    call.is_causal = causal;
    const auto y = m.apply(v.params, x, call);
    RefOptions o;
    o.visible = [&](Index b, Index, Index i, Index j) { return mask(b, 0, i, j) && (!causal || j <= i); };
    const auto want = reference<float>(m.config(), v.params, 3, 6, 6, as_doubles(x), as_doubles(x), as_doubles(x), o);
    EXPECT_LT(rel_err(y, want), 2e-5) << "causal=" << causal;
  }
}

TEST(NnxAttention, PathRuleReadsDropoutRateAndSowingNotDeterministic) {
  // float: the two paths round differently (the query scaled before the product or the
  // logits after; head_dim 3, whose sqrt is inexact), so which ran is visible in the bits.
  const Index N = 4, K = 2, F = 8;
  Tensor<float, 3> x(2, 9, F);
  fill_random(x, 8);
  for (double rate : {0.0, 0.25}) {
    const MHA<float> m(config<float>(N, K, F, 12, false, rate));
    const auto v = make_vars(m, 9);
    typename MHA<float>::CallOptions call, jax, einsum;
    call.deterministic = jax.deterministic = einsum.deterministic = true;
    jax.path = nnx::AttentionPath::JaxNn;
    einsum.path = nnx::AttentionPath::Einsum;
    const auto y = m.apply(v.params, x, call), yj = m.apply(v.params, x, jax), ye = m.apply(v.params, x, einsum);
    EXPECT_FALSE(bitwise_equal(yj, ye)) << "the paths should differ in rounding";
    EXPECT_TRUE(bitwise_equal(y, rate == 0.0 ? yj : ye)) << "rate=" << rate;
    // sow_weights: nnx passes module=self, the einsum path.
    Shape sown;
    typename MHA<float>::CallOptions sow = call;
    sow.sow_weights = [&](linen::ArrayRef<float> w) { sown = w.shape(); };
    const auto ys = m.apply(v.params, x, sow);
    EXPECT_EQ(sown, (Shape{2, N, 9, 9}));
    EXPECT_LT(rel_err(ys, as_doubles(ye)), 1e-5);
    EXPECT_FALSE(bitwise_equal(ys, yj));
  }
}

TEST(NnxAttention, ForcedPathsEqualLinensFunctionsOnTheProjections) {
  const Index N = 4, K = 2, F = 8, hd = 4;
  const MHA<float> m(config<float>(N, K, F, N * hd));
  const auto v = make_vars(m, 10);
  Tensor<float, 3> x(2, 5, F);
  fill_random(x, 11);
  Tensor<float, 4> q = m.query().apply(v.params.query, x), k = m.key().apply(v.params.key, x),
                   val = m.value().apply(v.params.value, x);
  // jax.nn's own function (GQA native) and nnx's dot_product_attention.
  const Tensor<float, 4> a = linen::jax_nn::dot_product_attention(q, k, val);
  EXPECT_TRUE(bitwise_equal(nnx::dot_product_attention(q, k, val), a));
  // the einsum path: flax.linen's dot_product_attention on K/V repeated to N heads.
  Tensor<float, 4> kr(2, 5, N, hd), vr(2, 5, N, hd);
  for (Index b = 0; b < 2; ++b)
    for (Index j = 0; j < 5; ++j)
      for (Index n = 0; n < N; ++n)
        for (Index e = 0; e < hd; ++e) kr(b, j, n, e) = k(b, j, n / 2, e), vr(b, j, n, e) = val(b, j, n / 2, e);
  nnx::AttentionOptions<float> eo;
  eo.path = nnx::AttentionPath::Einsum;
  EXPECT_TRUE(bitwise_equal(nnx::dot_product_attention(q, k, val, eo), linen::dot_product_attention(q, kr, vr)));
  // The module: out(attention(q, k, v)).
  const auto y = m.apply(v.params, x);
  const Tensor<float, 3> want = m.out().apply(v.params.out, a);
  EXPECT_TRUE(bitwise_equal(y, want));
}

TEST(NnxAttention, GqaEqualsMhaWithRepeatedKvHeads) {
  const Index N = 6, K = 2, F = 12, hd = 3, g = N / K;
  for (double rate : {0.0, 0.3}) {
    const MHA<double> gqa(config<double>(N, K, F, N * hd, true, rate)), mha(config<double>(N, N, F, N * hd, true, rate));
    const auto vg = make_vars(gqa, 12);
    auto vm = make_vars(mha, 12);
    vm.params.query = vg.params.query;
    vm.params.out = vg.params.out;
    vm.params.query_ln = vg.params.query_ln;
    vm.params.key_ln = vg.params.key_ln;
    for (auto [dst, src] : {std::pair{&vm.params.key, &vg.params.key}, std::pair{&vm.params.value, &vg.params.value}})
      for (Index f = 0; f < F; ++f)
        for (Index n = 0; n < N; ++n)
          for (Index e = 0; e < hd; ++e) {
            dst->kernel(f, n, e) = src->kernel(f, n / g, e);
            dst->bias(n, e) = src->bias(n / g, e);
          }
    Tensor<double, 3> x(2, 7, F);
    fill_random(x, 13);
    nnx::Rngs r1(5), r2(5);
    typename MHA<double>::CallOptions c1, c2;
    c1.deterministic = c2.deterministic = false;
    c1.rngs = &r1;
    c2.rngs = &r2;
    const auto yg = gqa.apply(vg.params, x, c1);
    const auto ym = mha.apply(vm.params, x, c2);
    EXPECT_LT(rel_err(yg, as_doubles(ym)), 1e-14) << "rate=" << rate;
  }
}

TEST(NnxAttention, DropoutDrawsTheStreamAsNnxDoes) {
  const Index N = 4, K = 2, F = 8, L = 6;
  const double rate = 0.4;
  for (bool broadcast : {true, false}) {
    auto c = config<double>(N, K, F, 16, false, rate);
    c.broadcast_dropout = broadcast;
    const MHA<double> m(c);
    nnx::Rngs rngs(nnx::Rngs({{"params", 0}, {"dropout", 7}}));
    auto v = m.init(rngs);  // keep_rngs and dropout_rate > 0: v.rngs is rngs.dropout's fork
    ASSERT_TRUE(v.rngs.has_value());
    Tensor<double, 3> x(2, L, F);
    fill_random(x, 14);
    typename MHA<double>::CallOptions train;
    train.deterministic = false;
    // The module's stream draws dropout_rng = rngs(): fold_in(key, count).
    const linen::random::Key key = linen::random::fold_in(v.rngs->key(), v.rngs->count());
    const std::uint32_t count = v.rngs->count();
    const auto y = m.apply(v, x, train);
    EXPECT_EQ(v.rngs->count(), count + 1);
    const Shape keep_shape = broadcast ? Shape{1, 1, L, L} : Shape{2, N, L, L};
    std::vector<char> keep(static_cast<std::size_t>(linen::num_elements(keep_shape)));
    linen::random::bernoulli(key, 1.0 - rate, keep_shape, reinterpret_cast<bool*>(keep.data()));
    RefOptions o;
    o.keep = [&](Index b, Index n, Index i, Index j) {
      const Index at = broadcast ? i * L + j : ((b * N + n) * L + i) * L + j;
      return keep[static_cast<std::size_t>(at)] ? 1.0 / (1.0 - rate) : 0.0;
    };
    const auto want = reference<double>(m.config(), v.params, 2, L, L, as_doubles(x), as_doubles(x), as_doubles(x), o);
    EXPECT_LT(rel_err(y, want), 1e-13) << "broadcast_dropout=" << broadcast;
    // The next call draws the next key: another mask.
    const auto y2 = m.apply(v, x, train);
    EXPECT_FALSE(bitwise_equal(y, y2));
    // The call's rngs take precedence (an Rngs: its dropout stream), the module's is left.
    nnx::Rngs other({{"dropout", 3}});
    train.rngs = &other;
    const std::uint32_t own = v.rngs->count();
    m.apply(v, x, train);
    EXPECT_EQ(v.rngs->count(), own);
    EXPECT_EQ(other["dropout"].count(), 1u);
    // deterministic: no draw, the same numbers as the einsum path without dropout.
    typename MHA<double>::CallOptions eval;
    eval.deterministic = true;
    const auto ye = m.apply(v, x, eval);
    EXPECT_EQ(v.rngs->count(), own);
    EXPECT_LT(rel_err(ye, reference<double>(m.config(), v.params, 2, L, L, as_doubles(x), as_doubles(x), as_doubles(x))),
              1e-13);
  }
}

TEST(NnxAttention, SowsTheWeightsWithTheBatchDims) {
  const MHA<float> m(config<float>(4, 2, 8, 16));
  const auto v = make_vars(m, 15);
  Tensor<float, 4> x(2, 3, 5, 8);  // batch [2, 3]
  fill_random(x, 16);
  Tensor<float, 5> w;
  typename MHA<float>::CallOptions call;
  call.is_causal = true;
  call.sow_weights = [&](linen::ArrayRef<float> a) {
    ASSERT_EQ(a.shape(), (Shape{2, 3, 4, 5, 5}));
    w = Tensor<float, 5>(2, 3, 4, 5, 5);
    std::copy(a.data(), a.data() + w.size(), w.data());
  };
  const auto y = m.apply(v.params, x, call);
  EXPECT_EQ(shape_of(y), (Shape{2, 3, 5, 8}));
  for (Index b = 0; b < 6; ++b)
    for (Index n = 0; n < 4; ++n)
      for (Index i = 0; i < 5; ++i) {
        double s = 0;
        for (Index j = 0; j < 5; ++j) {
          const float wij = w.data()[(((b * 4 + n) * 5 + i) * 5) + j];
          if (j > i) {
            EXPECT_EQ(wij, 0.0f);
          }
          s += wij;
        }
        EXPECT_NEAR(s, 1.0, 1e-6);
      }
  // Equal to the batch flattened (rank 3) to rounding; the jax path to rounding too.
  call.sow_weights = nullptr;
  call.path = nnx::AttentionPath::Einsum;
  EXPECT_LT(rel_err(y, as_doubles(m.apply(v.params, x, call))), 1e-6);
}

TEST(NnxAttention, BatchRanksAndCrossAttention) {
  auto c = config<double>(2, 1, 6, 8, false, 0.0);
  c.in_kv_features = 5;
  c.out_features = 3;
  const MHA<double> m(c);
  const auto v = make_vars(m, 17);
  for (int einsum = 0; einsum < 2; ++einsum) {
    typename MHA<double>::CallOptions call;
    call.path = einsum ? nnx::AttentionPath::Einsum : nnx::AttentionPath::JaxNn;
    Tensor<double, 4> xq(2, 2, 3, 6), xk(2, 2, 4, 5), xv(2, 2, 4, 5);
    fill_random(xq, 18), fill_random(xk, 19), fill_random(xv, 20);
    const auto y = m.apply(v.params, xq, xk, xv, call);
    EXPECT_EQ(shape_of(y), (Shape{2, 2, 3, 3}));
    const auto want = reference<double>(m.config(), v.params, 4, 3, 4, as_doubles(xq), as_doubles(xk), as_doubles(xv));
    EXPECT_LT(rel_err(y, want), einsum ? 1e-13 : 3e-6);
    Tensor<double, 2> x2(3, 6), k2(4, 5);  // no batch dims
    fill_random(x2, 21), fill_random(k2, 22);
    const auto y2 = m.apply(v.params, x2, k2, call);
    EXPECT_EQ(shape_of(y2), (Shape{3, 3}));
  }
}

TEST(NnxAttention, PluggableAttentionFn) {
  auto c = config<float>(4, 2, 8, 16);
  int calls = 0;
  c.attention_fn = [&](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                       const nnx::AttentionOptions<float>& o) {
    ++calls;
    EXPECT_EQ(shape_of(k), (Shape{2, 5, 2, 4}));  // the kv heads, as nnx passes them
    EXPECT_TRUE(o.is_causal);
    return nnx::dot_product_attention(q, k, v, o);
  };
  const MHA<float> m(c), plain(config<float>(4, 2, 8, 16));
  const auto v = make_vars(m, 22);
  Tensor<float, 3> x(2, 5, 8);
  fill_random(x, 23);
  typename MHA<float>::CallOptions call;
  call.is_causal = true;
  EXPECT_TRUE(bitwise_equal(m.apply(v.params, x, call), plain.apply(v.params, x, call)));
  EXPECT_EQ(calls, 1);
  // A function returning the wrong shape is named.
  auto bad = config<float>(4, 2, 8, 16);
  bad.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>&, const Tensor<float, 4>&,
                        const nnx::AttentionOptions<float>&) { return Tensor<float, 4>(q.dimension(0), 1, 1, 1); };
  EXPECT_THROW(MHA<float>(bad).apply(v.params, x), linen::invalid_argument);
}

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const linen::invalid_argument& e) {
    return e.what();
  }
  return "(no linen::invalid_argument)";
}
#define EXPECT_MESSAGE(stmt, text) EXPECT_NE(message_of([&] { stmt; }).find(text), std::string::npos) << message_of([&] { stmt; })

TEST(NnxAttention, BadInputsNameWhatIsAtFault) {
  const MHA<float> m(config<float>(4, 2, 8, 16, false, 0.2));
  auto v = make_vars(m, 24);
  Tensor<float, 3> x(2, 5, 8), x7(2, 5, 7), xb(3, 5, 8), xl(2, 4, 8);
  fill_random(x, 25);
  typename MHA<float>::CallOptions det;
  det.deterministic = true;
  EXPECT_MESSAGE(m.apply(v.params, x7, det), "Incompatible input dimension, got 7 but module expects 8");
  EXPECT_MESSAGE(m.apply(v.params, x, x7, det), "inputs_k of shape (2, 5, 7)");
  EXPECT_MESSAGE(m.apply(v.params, x, xb, det), "batch dims must match");
  EXPECT_MESSAGE(m.apply(v.params, x, x, xl, det), "k, v lengths must match");
  // dropout_rate > 0: deterministic is required, and rngs when not deterministic.
  EXPECT_MESSAGE(m.apply(v.params, x), "No `deterministic` argument was provided");
  typename MHA<float>::CallOptions train;
  train.deterministic = false;
  EXPECT_MESSAGE(m.apply(v.params, x, train), "'rngs' must be provided");
  // a mask that does not broadcast, a forced jax path that cannot sow or drop out.
  Tensor<bool, 4> mask(2, 3, 5, 5);
  mask.setConstant(true);
  typename MHA<float>::CallOptions bad = det;
  bad.mask = mask;
  EXPECT_MESSAGE(m.apply(v.params, x, bad), "mask");
  typename MHA<float>::CallOptions jax = train;
  nnx::Rngs r(0);
  jax.rngs = &r;
  jax.path = nnx::AttentionPath::JaxNn;
  EXPECT_MESSAGE(m.apply(v.params, x, jax), "path=JaxNn has no dropout");
  EXPECT_EQ(r["default"].count(), 0u);  // a failed call draws nothing
  jax = det;
  jax.path = nnx::AttentionPath::JaxNn;
  jax.sow_weights = [](linen::ArrayRef<float>) {};
  EXPECT_MESSAGE(m.apply(v.params, x, jax), "cannot sow");
  // parameters of the wrong shape.
  auto p = v.params;
  p.key.kernel = Tensor<float, 3>(8, 4, 4);
  EXPECT_MESSAGE(m.apply(p, x, det), "kernel of shape (8, 4, 4), expected (8, 2, 4)");
  // an Rngs without a dropout or default stream.
  nnx::Rngs params_only({{"params", 0}});
  train.rngs = &params_only;
  EXPECT_THROW(m.apply(v.params, x, train), linen::invalid_argument);
  // nnx.dot_product_attention's own checks.
  Tensor<float, 4> q(1, 2, 4, 3), k3(1, 2, 3, 3), kd(1, 2, 2, 5), k(1, 2, 2, 3), vv(1, 3, 2, 3);
  EXPECT_MESSAGE(nnx::dot_product_attention(q, k3, k3), "Query heads (4) must be multiple of Key heads (3)");
  EXPECT_MESSAGE(nnx::dot_product_attention(q, kd, kd), "q, k depths must match, but got 3 and 5");
  EXPECT_MESSAGE(nnx::dot_product_attention(q, k, vv), "k, v lengths must match, but got 2 and 3");
  // config errors, nnx's words.
  EXPECT_MESSAGE(MHA<float>(config<float>(4, 3, 8, 16)), "num_heads (4) must be divisible by num_kv_heads (3)");
  auto decode = config<float>(4, 2, 8, 16);
  decode.decode = true;
  EXPECT_MESSAGE(MHA<float>(decode).apply(v.params, x), "pass the cache");
}

TEST(NnxAttention, DotProductAttentionFlattensBatchDimsAsNnxDoes) {
  // Rank > 4: nnx reshapes q, k, v, mask to (prod(batch), ...) before jax.nn.
  Tensor<float, 5> q(2, 3, 4, 4, 5), k(2, 3, 6, 2, 5), v(2, 3, 6, 2, 5);
  fill_random(q, 50), fill_random(k, 51), fill_random(v, 52);
  Tensor<bool, 5> mask(2, 3, 1, 4, 6);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (i * 5) % 7 != 1;
  nnx::AttentionOptions<float> o;
  o.mask = mask;
  o.is_causal = true;
  const Tensor<float, 5> y = nnx::dot_product_attention(q, k, v, o);
  const Eigen::array<Index, 4> q4{6, 4, 4, 5}, k4{6, 6, 2, 5};
  const Eigen::array<Index, 4> m4{6, 1, 4, 6};
  const Tensor<float, 4> qf = q.reshape(q4), kf = k.reshape(k4), vf = v.reshape(k4);
  const Tensor<bool, 4> mf = mask.reshape(m4);
  linen::jax_nn::Options<float> jo;
  jo.mask = mf;
  jo.is_causal = true;
  EXPECT_TRUE(bitwise_equal(y, linen::jax_nn::dot_product_attention(qf, kf, vf, jo)));
  // The einsum path takes the batch dims as they are (flax.linen's numerics).
  o.path = nnx::AttentionPath::Einsum;
  const Tensor<float, 5> ye = nnx::dot_product_attention(q, k, v, o);
  EXPECT_LT(rel_err(ye, as_doubles(y)), 1e-5);
}

TEST(NnxAttention, HalfTypesFollowBothPaths) {
  using BF = Eigen::bfloat16;
  const MHA<BF> m(config<BF>(4, 2, 8, 16));
  const MHA<float> mf(config<float>(4, 2, 8, 16));
  const auto v = make_vars(m, 53);
  auto vf = make_vars(mf, 53);
  for (auto [dst, src] : {std::pair{&vf.params.query, &v.params.query}, std::pair{&vf.params.key, &v.params.key},
                          std::pair{&vf.params.value, &v.params.value}}) {
    for (Index i = 0; i < dst->kernel.size(); ++i) dst->kernel.data()[i] = static_cast<float>(src->kernel.data()[i]);
    for (Index i = 0; i < dst->bias.size(); ++i) dst->bias.data()[i] = static_cast<float>(src->bias.data()[i]);
  }
  for (Index i = 0; i < vf.params.out.kernel.size(); ++i)
    vf.params.out.kernel.data()[i] = static_cast<float>(v.params.out.kernel.data()[i]);
  for (Index i = 0; i < vf.params.out.bias.size(); ++i)
    vf.params.out.bias.data()[i] = static_cast<float>(v.params.out.bias.data()[i]);
  Tensor<BF, 3> x(2, 6, 8);
  fill_random(x, 54);
  Tensor<float, 3> xf(2, 6, 8);
  for (Index i = 0; i < x.size(); ++i) xf.data()[i] = static_cast<float>(x.data()[i]);
  for (auto path : {nnx::AttentionPath::JaxNn, nnx::AttentionPath::Einsum}) {
    typename MHA<BF>::CallOptions call;
    call.path = path;
    typename MHA<float>::CallOptions callf;
    callf.path = path;
    EXPECT_LT(rel_err(m.apply(v.params, x, call), as_doubles(mf.apply(vf.params, xf, callf))), 3e-2);
  }
}

TEST(NnxAttention, KeepRngsFalseHasNoStream) {
  auto c = config<float>(4, 2, 8, 16, false, 0.5);
  c.keep_rngs = false;
  const MHA<float> m(c);
  nnx::Rngs rngs(0);
  auto v = m.init(rngs);
  EXPECT_FALSE(v.rngs.has_value());
  Tensor<float, 3> x(1, 3, 8);
  fill_random(x, 55);
  typename MHA<float>::CallOptions train;
  train.deterministic = false;
  EXPECT_MESSAGE(m.apply(v, x, train), "'rngs' must be provided");
  nnx::RngStream stream(linen::random::key(3), "dropout");
  train.rngs = &stream;
  m.apply(v, x, train);
  EXPECT_EQ(stream.count(), 1u);
}

// ---- decoding -------------------------------------------------------------------------

TEST(NnxAttention, InitCacheShapesAndDtype) {
  const MHA<float> m(config<float>(8, 2, 16, 32));
  const auto c = m.init_cache({3, 2, 10, 16});
  EXPECT_EQ(c.batch, (Shape{3, 2}));
  EXPECT_EQ(shape_of(c.cached_key), (Shape{6, 10, 2, 4}));  // [prod(batch), max_length, kv_heads, head_dim]
  EXPECT_EQ(shape_of(c.cached_value), (Shape{6, 10, 2, 4}));
  EXPECT_EQ(c.cache_index, 0);
  for (Index i = 0; i < c.cached_key.size(); ++i) EXPECT_EQ(c.cached_key.data()[i], 0.0f);
  EXPECT_MESSAGE(m.init_cache({16}), "input_shape must be [batch..., max_length, features]");
  EXPECT_MESSAGE(m.init_cache({2, 0, 16}), "max_length");
}

template <class T>
void decode_loop_equals_causal_forward(Index N, Index K, bool nqk, double rate, nnx::AttentionPath path) {
  const Index F = 16, hd = 4, L = 12, Lmax = 20;
  const MHA<T> m(config<T>(N, K, F, N * hd, nqk, rate));
  const auto v = make_vars(m, 26);
  Tensor<T, 4> x(2, 3, L, F);  // batch [2, 3]
  fill_random(x, 27);
  typename MHA<T>::CallOptions call;
  call.deterministic = true;
  call.path = path;
  typename MHA<T>::CallOptions causal = call;
  causal.is_causal = true;
  const Tensor<T, 4> full = m.apply(v.params, x, causal);
  auto cache = m.init_cache({2, 3, Lmax, F}), cache2 = cache;
  linen::DecodeWorkspace<T> ws;
  Tensor<T, 4> xt(2, 3, 1, F), out(2, 3, 1, F);
  double err = 0, err_apply = 0;
  for (Index t = 0; t < L; ++t) {
    for (Index b = 0; b < 6; ++b) std::copy_n(x.data() + (b * L + t) * F, F, xt.data() + b * F);
    // nnx's is_causal=True during decode (flax#5591): linen keeps the cache mask.
    m.decode_step(v.params, cache, xt, out, ws, t % 2 ? causal : call);
    const Tensor<T, 4> ya = m.apply(v.params, cache2, xt, call);  // through attention_fn, the whole cache
    for (Index b = 0; b < 6; ++b)
      for (Index o = 0; o < F; ++o) {
        const double want = static_cast<double>(full.data()[(b * L + t) * F + o]);
        err = std::max(err, std::abs(static_cast<double>(out.data()[b * F + o]) - want));
        err_apply = std::max(err_apply, std::abs(static_cast<double>(ya.data()[b * F + o]) - want));
      }
  }
  EXPECT_EQ(cache.cache_index, L);
  EXPECT_TRUE(bitwise_equal(cache.cached_key, cache2.cached_key));
  EXPECT_TRUE(bitwise_equal(cache.cached_value, cache2.cached_value));
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-5;
  EXPECT_LT(err, tol) << "N=" << N << " K=" << K;
  EXPECT_LT(err_apply, tol) << "N=" << N << " K=" << K;
  // A chunk writes the same cache as the steps, and its outputs equal the forward's rows.
  auto cache3 = m.init_cache({2, 3, Lmax, F});
  Tensor<T, 4> xc(2, 3, 5, F), oc(2, 3, 5, F), rest(2, 3, L - 5, F), orest(2, 3, L - 5, F);
  for (Index b = 0; b < 6; ++b) {
    std::copy_n(x.data() + b * L * F, 5 * F, xc.data() + b * 5 * F);
    std::copy_n(x.data() + (b * L + 5) * F, (L - 5) * F, rest.data() + b * (L - 5) * F);
  }
  m.decode_chunk(v.params, cache3, xc, oc, ws, call);
  m.decode_chunk(v.params, cache3, rest, orest, ws, call);
  EXPECT_TRUE(bitwise_equal(cache3.cached_key, cache.cached_key));
  EXPECT_TRUE(bitwise_equal(cache3.cached_value, cache.cached_value));
  double err_chunk = 0;
  for (Index b = 0; b < 6; ++b)
    for (Index t = 0; t < L; ++t)
      for (Index o = 0; o < F; ++o) {
        const double got = static_cast<double>(t < 5 ? oc.data()[(b * 5 + t) * F + o]
                                                     : orest.data()[(b * (L - 5) + t - 5) * F + o]);
        err_chunk = std::max(err_chunk, std::abs(got - static_cast<double>(full.data()[(b * L + t) * F + o])));
      }
  EXPECT_LT(err_chunk, tol);
}

TEST(NnxAttention, DecodeLoopEqualsCausalForward) {
  for (auto path : {nnx::AttentionPath::Auto, nnx::AttentionPath::Einsum}) {
    decode_loop_equals_causal_forward<float>(8, 2, false, 0.0, path);
    decode_loop_equals_causal_forward<float>(4, 4, true, 0.0, path);
    decode_loop_equals_causal_forward<double>(6, 3, true, 0.1, path);  // dropout_rate > 0, deterministic
    decode_loop_equals_causal_forward<float>(4, 1, false, 0.0, path);
  }
}

TEST(NnxAttention, DecodeStepIsTheRowKernelWithTheEinsumNumbersBitForBit) {
  // The direct step and the forward over the same cache: the einsum policy and the jax
  // policy, each equal to linen's fused kernel on the cache (kv_group, no copy).
  const Index N = 8, K = 2, F = 16, hd = 4;
  const MHA<float> m(config<float>(N, K, F, N * hd));
  const auto v = make_vars(m, 28);
  auto cache = m.init_cache({2, 9, F});
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> xt(2, 1, F), out(2, 1, F);
  for (Index t = 0; t < 4; ++t) {
    fill_random(xt, 30 + static_cast<unsigned>(t));
    m.decode_step(v.params, cache, xt, out, ws);
  }
  // The query of the last step restated, attention over positions [0, 4) by linen::jax_nn.
  Tensor<float, 4> q = m.query().apply(v.params.query, xt);
  Tensor<float, 4> k(2, 4, K, hd), val(2, 4, K, hd);
  for (Index b = 0; b < 2; ++b) {
    std::copy_n(cache.cached_key.data() + b * 9 * K * hd, 4 * K * hd, k.data() + b * 4 * K * hd);
    std::copy_n(cache.cached_value.data() + b * 9 * K * hd, 4 * K * hd, val.data() + b * 4 * K * hd);
  }
  const Tensor<float, 3> want = m.out().apply(v.params.out, linen::jax_nn::dot_product_attention(q, k, val));
  EXPECT_LT(rel_err(out, as_doubles(want)), 1e-6);
}

TEST(NnxAttention, CacheOverflowAndBadStepsChangeNothing) {
  const MHA<float> m(config<float>(4, 2, 8, 16));
  const auto v = make_vars(m, 31);
  auto cache = m.init_cache({2, 3, 8});
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> xt(2, 1, 8), out(2, 1, 8);
  fill_random(xt, 32);
  for (int i = 0; i < 3; ++i) m.decode_step(v.params, cache, xt, out, ws);
  const auto before = cache;
  EXPECT_THROW(m.decode_step(v.params, cache, xt, out, ws), linen::cache_overflow);
  EXPECT_THROW(m.apply(v.params, cache, xt), linen::cache_overflow);
  Tensor<float, 3> x2(2, 2, 8), o2(2, 2, 8);
  auto c2 = m.init_cache({2, 3, 8});
  m.decode_step(v.params, c2, xt, out, ws);
  EXPECT_THROW(m.decode_chunk(v.params, c2, Tensor<float, 3>(2, 3, 8), Tensor<float, 3>(2, 3, 8), ws),
               linen::cache_overflow);
  EXPECT_EQ(c2.cache_index, 1);
  EXPECT_EQ(cache.cache_index, before.cache_index);
  EXPECT_TRUE(bitwise_equal(cache.cached_key, before.cached_key));
  EXPECT_TRUE(bitwise_equal(cache.cached_value, before.cached_value));
  // nnx's shape check: one position, the cache's batch; the out shape.
  auto c3 = m.init_cache({2, 5, 8});
  EXPECT_MESSAGE(m.decode_step(v.params, c3, x2, o2, ws), "Autoregressive cache shape error");
  EXPECT_MESSAGE(m.apply(v.params, c3, x2), "Autoregressive cache shape error");
  Tensor<float, 3> x3(3, 1, 8), o3(3, 1, 8);
  EXPECT_MESSAGE(m.decode_step(v.params, c3, x3, o3, ws), "Autoregressive cache shape error");
  Tensor<float, 3> obad(2, 1, 7);
  EXPECT_MESSAGE(m.decode_step(v.params, c3, xt, obad, ws), "out has shape (2, 1, 7)");
  Tensor<bool, 4> mask(2, 3, 1, 5);
  mask.setConstant(true);
  typename MHA<float>::CallOptions bad;
  bad.mask = mask;
  EXPECT_MESSAGE(m.decode_step(v.params, c3, xt, out, ws, bad), "mask");
  // a sowing step goes through apply: its attention_fn throws after the cache write, and
  // the write is undone.
  auto thrower = config<float>(4, 2, 8, 16);
  thrower.attention_fn = [](const Tensor<float, 4>&, const Tensor<float, 4>&, const Tensor<float, 4>&,
                            const nnx::AttentionOptions<float>&) -> Tensor<float, 4> {
    throw linen::invalid_argument("boom");
  };
  EXPECT_THROW(MHA<float>(thrower).decode_step(v.params, c3, xt, out, ws), linen::invalid_argument);
  EXPECT_EQ(c3.cache_index, 0);
  for (Index i = 0; i < c3.cached_key.size(); ++i) ASSERT_EQ(c3.cached_key.data()[i], 0.0f);
}

TEST(NnxAttention, DecodeWithMaskAndDropoutFallback) {
  const Index F = 8, L = 6;
  const MHA<double> m(config<double>(4, 2, F, 16, false, 0.3));
  auto v = make_vars(m, 33);
  auto cache = m.init_cache({2, L, F});
  linen::DecodeWorkspace<double> ws;
  Tensor<double, 3> xt(2, 1, F), out(2, 1, F);
  Tensor<bool, 4> mask(2, 1, 1, L);
  mask.setConstant(true);
  mask(1, 0, 0, 0) = false;
  typename MHA<double>::CallOptions train;
  train.deterministic = false;
  train.mask = mask;
  const std::uint32_t c0 = v.rngs->count();
  for (Index t = 0; t < 3; ++t) {
    fill_random(xt, 40 + static_cast<unsigned>(t));
    m.decode_step(v, cache, xt, out, ws, train);  // dropout: apply's step, the module's stream
  }
  EXPECT_EQ(v.rngs->count(), c0 + 3);
  EXPECT_EQ(cache.cache_index, 3);
  for (Index i = 0; i < out.size(); ++i) EXPECT_TRUE(std::isfinite(out.data()[i]));
}

TEST(NnxAttention, DecodeStepAllocatesNothingAfterWarmUp) {
  for (int variant = 0; variant < 3; ++variant) {
    const bool nqk = variant == 1, masked = variant != 2;  // 2: the grouped rows, no mask
    const MHA<float> m(config<float>(8, 2, 32, 64, nqk));
    const auto v = make_vars(m, 34);
    auto cache = m.init_cache({2, 64, 32});
    linen::DecodeWorkspace<float> ws;
    Tensor<float, 3> xt(2, 1, 32), out(2, 1, 32);
    fill_random(xt, 35);
    Tensor<bool, 4> mask(2, 1, 1, 64);
    mask.setConstant(true);
    typename MHA<float>::CallOptions call;
    if (masked) call.mask = mask;
    m.decode_step(v.params, cache, xt, out, ws, call);  // warm-up
    long news = 0;
    {
      linen_test::NoAllocation guard;
      for (int t = 0; t < 20; ++t) m.decode_step(v.params, cache, xt, out, ws, call);
      news = guard.count();
    }
    EXPECT_EQ(news, 0) << "variant " << variant;
    EXPECT_EQ(cache.cache_index, 21);
  }
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// linen/grad.hpp, functional part: dot_product_attention_vjp (reference and fused kernels)
// against central finite differences in double for every option (mask with fully masked
// rows, bias of several broadcast shapes, dropout with a fixed mask, distinct lengths and
// depths, batch ranks 0..2), fused == reference on lengths that are not multiples of the
// tiles (with and without a thread pool), the four element types, and the
// DenseGeneral / LayerNorm vjps. The module vjps are in test_grad_modules.cpp.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <linen/grad.hpp>
#include <linen/linen.hpp>

#include "grad_support.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;

// ---- helpers (grad_support.hpp has those shared with test_grad_modules.cpp) -------------

using namespace linen_grad_test;

template <class A, class E>
double rel_err(const A& a, const E& e) {
  EXPECT_EQ(a.size(), e.size());
  if (a.size() != e.size()) return INFINITY;
  return rel_err_n(a.data(), e.data(), e.size());
}

template <class T, int N>
bool bit_equal(const Tensor<T, N>& a, const Tensor<T, N>& b) {
  if (a.dimensions() != b.dimensions()) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (!(a.data()[i] == b.data()[i])) return false;
  return true;
}

// ---- dot_product_attention_vjp against finite differences --------------------------------

enum class BiasKind { None, Full, HeadKey, QueryKey };
enum class DropoutKind { None, Broadcast, Full };

struct DpaCase {
  const char* name;
  int batch_rank;
  Index Lq, Lk, H, D, Dv;
  BiasKind bias;
  bool mask;
  DropoutKind dropout;
  bool causal = false;  // AttentionOptions::is_causal
};

std::string case_name(const ::testing::TestParamInfo<DpaCase>& info) { return info.param.name; }

// A problem of batch rank NB with everything the case asks for, in double.
template <int NB>
struct DpaProblem {
  static constexpr int N = NB + 3;
  Tensor<double, N> q, k, v, ct;
  std::vector<double> bias;
  Shape bias_shape;
  Tensor<bool, N> mask;
  linen::AttentionOptions<double> options;

  DpaProblem(const DpaCase& c, unsigned seed) {
    std::mt19937 gen(seed);
    std::array<Index, N> qd{}, kd{}, vd{}, md{};
    Shape batch;
    for (int i = 0; i < NB; ++i) {
      qd[i] = kd[i] = vd[i] = md[i] = 2;
      batch.push_back(2);
    }
    qd[NB] = c.Lq, qd[NB + 1] = c.H, qd[NB + 2] = c.D;
    kd[NB] = c.Lk, kd[NB + 1] = c.H, kd[NB + 2] = c.D;
    vd[NB] = c.Lk, vd[NB + 1] = c.H, vd[NB + 2] = c.Dv;
    q = random_tensor<double, N>(qd, gen, 1.5);
    k = random_tensor<double, N>(kd, gen, 1.5);
    v = random_tensor<double, N>(vd, gen);
    std::array<Index, N> od = qd;
    od[NB + 2] = c.Dv;
    ct = random_tensor<double, N>(od, gen);
    switch (c.bias) {
      case BiasKind::None: break;
      case BiasKind::Full: bias_shape = batch, bias_shape.insert(bias_shape.end(), {c.H, c.Lq, c.Lk}); break;
      case BiasKind::HeadKey: bias_shape = {c.H, 1, c.Lk}; break;
      case BiasKind::QueryKey: bias_shape = {c.Lq, c.Lk}; break;
    }
    if (c.bias != BiasKind::None) {
      std::normal_distribution<double> normal(0.0, 1.0);
      bias.resize(static_cast<std::size_t>(linen::num_elements(bias_shape)));
      for (double& b : bias) b = normal(gen);
      options.bias = linen::ArrayRef<double>(bias.data(), bias_shape);
    }
    if (c.mask) {
      md[NB] = 1, md[NB + 1] = c.Lq, md[NB + 2] = c.Lk;  // [batch..., 1, Lq, Lk]
      mask.resize(md);
      std::bernoulli_distribution keep(0.7);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);
      for (Index j = 0; j < c.Lk; ++j) mask.data()[j] = false;  // the first query of batch 0 sees nothing
      options.mask = mask;
    }
    if (c.dropout != DropoutKind::None) {
      options.dropout_rate = 0.3;
      options.broadcast_dropout = c.dropout == DropoutKind::Broadcast;
      options.dropout_rng = linen::random::key(7);  // a Key: the same mask on every call
    }
    options.is_causal = c.causal;
  }
  double loss() const {
    const Tensor<double, N> y = linen::dot_product_attention(q, k, v, options);
    return inner(ct.data(), y.data(), y.size());
  }
};

class DpaFiniteDifferences : public ::testing::TestWithParam<DpaCase> {};

template <int NB>
void run_dpa_fd(const DpaCase& c) {
  for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
    const std::string which = impl == linen::Implementation::Reference ? "reference" : "fused";
    DpaProblem<NB> p(c, 1234);
    linen::GradOptions go;
    go.implementation = impl;
    go.block_q = 3;  // lengths below are not multiples of the tiles
    go.block_k = 4;
    const auto g = linen::dot_product_attention_vjp(p.q, p.k, p.v, p.ct, p.options, go);
    linen::AttentionOptions<double> as_reference = p.options;
    as_reference.implementation = linen::Implementation::Reference;
    const Tensor<double, NB + 3> y = linen::dot_product_attention(p.q, p.k, p.v, as_reference);
    if (impl == linen::Implementation::Reference)
      EXPECT_TRUE(bit_equal(g.output, y)) << which << ": the vjp's output is dot_product_attention's";
    else
      EXPECT_LE(rel_err(g.output, y), 1e-13) << which;
    auto loss = [&] { return p.loss(); };
    expect_matches_fd(loss, p.q.data(), g.query.data(), p.q.size(), which + " query");
    expect_matches_fd(loss, p.k.data(), g.key.data(), p.k.size(), which + " key");
    expect_matches_fd(loss, p.v.data(), g.value.data(), p.v.size(), which + " value");
    if (c.bias != BiasKind::None) {
      Shape padded(static_cast<std::size_t>(NB + 3) - p.bias_shape.size(), 1);
      padded.insert(padded.end(), p.bias_shape.begin(), p.bias_shape.end());
      EXPECT_EQ(linen::shape_of(g.bias), padded) << "the bias cotangent has the bias's own (broadcast) shape";
      expect_matches_fd(loss, p.bias.data(), g.bias.data(), static_cast<Index>(p.bias.size()), which + " bias");
    } else {
      EXPECT_EQ(g.bias.size(), 0);
    }
  }
}

TEST_P(DpaFiniteDifferences, GradientsMatch) {
  const DpaCase& c = GetParam();
  switch (c.batch_rank) {
    case 0: run_dpa_fd<0>(c); break;
    case 1: run_dpa_fd<1>(c); break;
    case 2: run_dpa_fd<2>(c); break;
    default: FAIL() << "batch rank " << c.batch_rank;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Options, DpaFiniteDifferences,
    ::testing::Values(
        DpaCase{"plain_rank1", 1, 5, 5, 2, 3, 3, BiasKind::None, false, DropoutKind::None},
        DpaCase{"nobatch", 0, 4, 6, 2, 3, 2, BiasKind::None, false, DropoutKind::None},
        DpaCase{"two_batch_dims", 2, 3, 5, 2, 2, 3, BiasKind::None, true, DropoutKind::None},
        DpaCase{"mask_fully_masked_row", 1, 5, 7, 2, 3, 4, BiasKind::None, true, DropoutKind::None},
        DpaCase{"bias_full", 1, 4, 5, 2, 3, 3, BiasKind::Full, false, DropoutKind::None},
        DpaCase{"bias_head_key_broadcast", 1, 5, 6, 3, 2, 2, BiasKind::HeadKey, true, DropoutKind::None},
        DpaCase{"bias_query_key_broadcast", 2, 3, 5, 2, 2, 2, BiasKind::QueryKey, false, DropoutKind::None},
        DpaCase{"dropout_broadcast", 1, 5, 6, 2, 3, 3, BiasKind::None, true, DropoutKind::Broadcast},
        DpaCase{"dropout_full", 1, 5, 6, 2, 3, 3, BiasKind::Full, false, DropoutKind::Full},
        DpaCase{"dropout_nobatch_bias", 0, 6, 5, 2, 3, 4, BiasKind::HeadKey, true, DropoutKind::Full},
        DpaCase{"long_kv", 1, 3, 13, 1, 4, 2, BiasKind::QueryKey, true, DropoutKind::None},
        DpaCase{"is_causal", 1, 9, 7, 2, 3, 2, BiasKind::None, false, DropoutKind::None, true},
        DpaCase{"is_causal_mask_bias_dropout", 1, 7, 9, 2, 2, 3, BiasKind::Full, true, DropoutKind::Broadcast,
                true}),
    case_name);

// ---- fused == reference --------------------------------------------------------------------

// Random shapes, tiles that do not divide the lengths, bias broadcast over heads (so
// workers share its gradient), mask, dropout; serial and with 3 threads.
template <class T>
void fused_vs_reference(double tol) {
  std::mt19937 gen(99);
  std::uniform_int_distribution<int> len(1, 40), small(1, 5);
  Eigen::ThreadPool pool(3);
  for (int trial = 0; trial < 12; ++trial) {
    const Index B = small(gen), Lq = len(gen), Lk = len(gen), H = small(gen), D = small(gen) + 1, Dv = small(gen);
    const auto q = random_tensor<T, 4>({B, Lq, H, D}, gen, 1.5);
    const auto k = random_tensor<T, 4>({B, Lk, H, D}, gen, 1.5);
    const auto v = random_tensor<T, 4>({B, Lk, H, Dv}, gen);
    const auto ct = random_tensor<T, 4>({B, Lq, H, Dv}, gen);
    const auto bias = random_tensor<T, 4>({B, 1, Lq, Lk}, gen);
    Tensor<bool, 4> mask(B, H, Lq, Lk);
    std::bernoulli_distribution keep(0.8);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);
    linen::AttentionOptions<T> o;
    o.mask = mask;
    if (trial % 2 == 0) o.bias = bias;
    if (trial % 3 == 0) {
      o.dropout_rate = 0.25;
      o.broadcast_dropout = trial % 2 == 0;
      o.dropout_rng = linen::random::key(static_cast<std::uint64_t>(trial));
    }
    linen::GradOptions ref;
    ref.implementation = linen::Implementation::Reference;
    const auto r = linen::dot_product_attention_vjp(q, k, v, ct, o, ref);
    for (Eigen::ThreadPoolInterface* tp : {static_cast<Eigen::ThreadPoolInterface*>(nullptr),
                                           static_cast<Eigen::ThreadPoolInterface*>(&pool)}) {
      linen::GradOptions fo;
      fo.block_q = 1 + trial % 7;
      fo.block_k = 2 + trial % 5;
      fo.thread_pool = tp;
      const auto f = linen::dot_product_attention_vjp(q, k, v, ct, o, fo);
      const std::string where = "trial " + std::to_string(trial) + (tp ? " pool" : " serial") + " shape (" +
                                std::to_string(B) + "," + std::to_string(Lq) + "," + std::to_string(Lk) + "," +
                                std::to_string(H) + ")";
      EXPECT_LE(rel_err(f.output, r.output), tol) << where;
      EXPECT_LE(rel_err(f.query, r.query), tol) << where;
      EXPECT_LE(rel_err(f.key, r.key), tol) << where;
      EXPECT_LE(rel_err(f.value, r.value), tol) << where;
      EXPECT_LE(rel_err(f.bias, r.bias), tol) << where;
    }
  }
}

TEST(DotProductAttentionVjp, FusedMatchesReferenceDouble) { fused_vs_reference<double>(1e-12); }
TEST(DotProductAttentionVjp, FusedMatchesReferenceFloat) { fused_vs_reference<float>(2e-5); }

// Fewer heads than threads: the fused backward splits the keys among workers and sums
// their dq copies, and the workers share the gradient of a bias broadcast over heads.
// The result must not depend on the split, and must repeat bit for bit.
TEST(DotProductAttentionVjp, FusedKeyGroupsMatchSerial) {
  std::mt19937 gen(5);
  const auto q = random_tensor<double, 3>({37, 2, 8}, gen), k = random_tensor<double, 3>({53, 2, 8}, gen);
  const auto v = random_tensor<double, 3>({53, 2, 8}, gen), ct = random_tensor<double, 3>({37, 2, 8}, gen);
  const auto bias_qk = random_tensor<double, 2>({37, 53}, gen);  // shared by both heads
  const auto bias_k = random_tensor<double, 2>({1, 53}, gen);    // shared by heads and queries
  Eigen::ThreadPool pool(4);
  for (const auto* b : {&bias_qk, &bias_k}) {
    linen::AttentionOptions<double> o;
    o.bias = *b;
    linen::GradOptions serial, threaded;
    serial.block_k = threaded.block_k = 5;
    threaded.thread_pool = &pool;
    const auto s = linen::dot_product_attention_vjp(q, k, v, ct, o, serial);
    const auto t = linen::dot_product_attention_vjp(q, k, v, ct, o, threaded);
    EXPECT_LE(rel_err(t.query, s.query), 1e-13);
    EXPECT_LE(rel_err(t.key, s.key), 1e-13);
    EXPECT_LE(rel_err(t.value, s.value), 1e-13);
    EXPECT_LE(rel_err(t.bias, s.bias), 1e-13);
    const auto t2 = linen::dot_product_attention_vjp(q, k, v, ct, o, threaded);
    EXPECT_TRUE(bit_equal(t.query, t2.query) && bit_equal(t.bias, t2.bias));
  }
  // A bias constant over the keys cannot change the softmax: its cotangent is 0 (up to
  // rounding) whichever worker adds which key group.
  const auto bias_q = random_tensor<double, 2>({37, 1}, gen);
  linen::AttentionOptions<double> o;
  o.bias = bias_q;
  linen::GradOptions threaded;
  threaded.block_k = 5;
  threaded.thread_pool = &pool;
  const auto t = linen::dot_product_attention_vjp(q, k, v, ct, o, threaded);
  for (Index i = 0; i < t.bias.size(); ++i) EXPECT_NEAR(t.bias.data()[i], 0.0, 1e-14);
}

// Causal problems skip the tiles above the diagonal (in both passes) and fall back to
// every tile for rows that the mask hides entirely (Flax averages all values there).
TEST(DotProductAttentionVjp, FusedSkipsMaskedTilesExactly) {
  std::mt19937 gen(6);
  const Index L = 29;
  const auto q = random_tensor<double, 4>({2, L, 2, 4}, gen), k = random_tensor<double, 4>({2, L, 2, 4}, gen);
  const auto v = random_tensor<double, 4>({2, L, 2, 3}, gen), ct = random_tensor<double, 4>({2, L, 2, 3}, gen);
  Tensor<bool, 4> mask(2, 1, L, L);
  mask.setConstant(true);
  for (Index j = 0; j < L; ++j) mask(1, 0, 20, j) = false;  // row 20 of batch 1 sees nothing
  for (Index i = 0; i < L; ++i)
    for (Index j = 0; j < L; ++j)
      if (j > i) mask(0, 0, i, j) = false;  // batch 0: causal by mask
  for (bool flag : {false, true}) {
    linen::AttentionOptions<double> o;
    o.mask = mask;
    o.is_causal = flag;
    linen::GradOptions ref, fused;
    ref.implementation = linen::Implementation::Reference;
    fused.block_q = 4;
    fused.block_k = 3;
    const auto r = linen::dot_product_attention_vjp(q, k, v, ct, o, ref);
    const auto f = linen::dot_product_attention_vjp(q, k, v, ct, o, fused);
    EXPECT_LE(rel_err(f.output, r.output), 1e-13) << "is_causal=" << flag;
    EXPECT_LE(rel_err(f.query, r.query), 1e-12) << "is_causal=" << flag;
    EXPECT_LE(rel_err(f.key, r.key), 1e-12) << "is_causal=" << flag;
    EXPECT_LE(rel_err(f.value, r.value), 1e-12) << "is_causal=" << flag;
  }
}

// A key mask shared by the query rows ([B, 1, 1, S]) under is_causal, its key masked at the
// first key of a diagonal tile: the tile's first row sees only that key, yet later rows see
// unmasked keys of the tile, so it must not be skipped (it once was: the check stopped at
// the first row of a mask shared by the rows).
TEST(DotProductAttentionVjp, FusedKeepsCausalTilesWithAMaskedFirstKey) {
  std::mt19937 gen(8);
  const Index L = 24;
  const auto q = random_tensor<double, 4>({1, L, 1, 4}, gen), k = random_tensor<double, 4>({1, L, 1, 4}, gen);
  const auto v = random_tensor<double, 4>({1, L, 1, 3}, gen), ct = random_tensor<double, 4>({1, L, 1, 3}, gen);
  Tensor<bool, 4> mask(1, 1, 1, L);
  mask.setConstant(true);
  mask(0, 0, 0, 8) = false;  // the first key of the tile at j0 = 8
  linen::AttentionOptions<double> o;
  o.mask = mask;
  o.is_causal = true;
  linen::GradOptions ref, fused;
  ref.implementation = linen::Implementation::Reference;
  fused.block_q = 8;
  fused.block_k = 8;
  const auto r = linen::dot_product_attention_vjp(q, k, v, ct, o, ref);
  const auto f = linen::dot_product_attention_vjp(q, k, v, ct, o, fused);
  EXPECT_LE(rel_err(f.query, r.query), 1e-12);
  EXPECT_LE(rel_err(f.key, r.key), 1e-12);
  EXPECT_LE(rel_err(f.value, r.value), 1e-12);
}

// ---- element types -------------------------------------------------------------------------

template <class T>
class DpaVjpTypes : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, Eigen::half, Eigen::bfloat16>;
// Names the typed cases by numpy dtype (float32, float64, float16, bfloat16).
struct DtypeNames {
  template <class T>
  static std::string GetName(int) {
    return linen::dtype_name<T>();
  }
};
TYPED_TEST_SUITE(DpaVjpTypes, ElementTypes, DtypeNames);

// One forward: the fused vjp's output is dot_product_attention's fused output bit for
// bit (the same kernel, which also keeps the softmax statistics for the backward), on the
// tiled and the row (one or two queries) kernels, with a pool or without.
TYPED_TEST(DpaVjpTypes, FusedOutputIsTheFusedForwardsBits) {
  using T = TypeParam;
  std::mt19937 gen(23);
  Eigen::ThreadPool pool(3);
  for (Index lq : {1, 2, 9, 40}) {
    const Index lk = 37;
    const Tensor<T, 4> q = random_tensor<double, 4>({2, lq, 2, 8}, gen).cast<T>();
    const Tensor<T, 4> k = random_tensor<double, 4>({2, lk, 2, 8}, gen).cast<T>();
    const Tensor<T, 4> v = random_tensor<double, 4>({2, lk, 2, 5}, gen).cast<T>();
    const Tensor<T, 4> ct = random_tensor<double, 4>({2, lq, 2, 5}, gen).cast<T>();
    const Tensor<T, 3> b = random_tensor<double, 3>({2, lq, lk}, gen).cast<T>();
    Tensor<bool, 4> mask(2, 1, lq, lk);
    std::bernoulli_distribution keep(0.8);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);
    for (Index j = 0; j < lk; ++j) mask(1, 0, 0, j) = false;  // a fully masked row
    for (int variant = 0; variant < 3; ++variant) {
      linen::AttentionOptions<T> o;
      o.implementation = linen::Implementation::Fused;
      o.mask = mask;
      if (variant >= 1) o.bias = b;
      if (variant == 2) {
        o.is_causal = true;
        o.dropout_rate = 0.25;
        o.broadcast_dropout = false;
        o.dropout_rng = linen::random::key(9);
      }
      for (Eigen::ThreadPoolInterface* p : {static_cast<Eigen::ThreadPoolInterface*>(nullptr),
                                            static_cast<Eigen::ThreadPoolInterface*>(&pool)}) {
        o.thread_pool = p;
        const Tensor<T, 4> y = linen::dot_product_attention(q, k, v, o);
        const auto g = linen::dot_product_attention_vjp(q, k, v, ct, o);
        EXPECT_TRUE(bit_equal(g.output, y)) << "lq " << lq << " variant " << variant << " pool " << (p != nullptr);
      }
    }
  }
}

// Every type: the reference output is dot_product_attention's bit for bit, and both
// kernels' cotangents agree with the double computation on the same (rounded) inputs.
TYPED_TEST(DpaVjpTypes, AgreeWithDouble) {
  using T = TypeParam;
  // The fixtures' tolerances (tests/data/flax/README.md), which Flax itself meets.
  const double tol = std::is_same_v<T, double> ? 1e-13
                     : std::is_same_v<T, float> ? 2e-6
                     : std::is_same_v<T, Eigen::half> ? 5e-3
                                                      : 2e-2;
  std::mt19937 gen(17);
  const auto q64 = random_tensor<double, 4>({2, 9, 2, 8}, gen), k64 = random_tensor<double, 4>({2, 11, 2, 8}, gen);
  const auto v64 = random_tensor<double, 4>({2, 11, 2, 4}, gen), ct64 = random_tensor<double, 4>({2, 9, 2, 4}, gen);
  const auto b64 = random_tensor<double, 3>({2, 9, 11}, gen);
  const Tensor<T, 4> q = q64.cast<T>(), k = k64.cast<T>(), v = v64.cast<T>(), ct = ct64.cast<T>();
  const Tensor<T, 3> b = b64.cast<T>();
  // The double problem on exactly the T inputs.
  const Tensor<double, 4> qd = q.template cast<double>(), kd = k.template cast<double>(),
                          vd = v.template cast<double>(), ctd = ct.template cast<double>();
  const Tensor<double, 3> bd = b.template cast<double>();
  Tensor<bool, 4> mask(2, 1, 9, 11);
  std::bernoulli_distribution keep(0.75);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);

  for (bool fp32 : {false, true}) {
    linen::AttentionOptions<T> o;
    o.bias = b;
    o.mask = mask;
    o.force_fp32_for_softmax = fp32;
    o.implementation = linen::Implementation::Reference;  // the forward whose output the vjp's must equal
    o.dropout_rate = 0.2;
    o.dropout_rng = linen::random::key(3);
    linen::AttentionOptions<double> od;
    od.bias = bd;
    od.mask = mask;
    od.dropout_rate = 0.2;
    od.dropout_rng = linen::random::key(3);
    linen::GradOptions ref;
    ref.implementation = linen::Implementation::Reference;
    const auto e = linen::dot_product_attention_vjp(qd, kd, vd, ctd, od, ref);
    const auto r = linen::dot_product_attention_vjp(q, k, v, ct, o, ref);
    EXPECT_TRUE(bit_equal(r.output, Tensor<T, 4>(linen::dot_product_attention(q, k, v, o)))) << "fp32=" << fp32;
    linen::GradOptions fo;
    fo.implementation = linen::Implementation::Fused;
    fo.block_q = 4;
    fo.block_k = 3;
    const auto f = linen::dot_product_attention_vjp(q, k, v, ct, o, fo);
    for (const auto* g : {&r, &f}) {
      const char* which = g == &r ? "reference" : "fused";
      EXPECT_LE(rel_err(g->output, e.output), tol) << which << " fp32=" << fp32;
      EXPECT_LE(rel_err(g->query, e.query), tol) << which << " fp32=" << fp32;
      EXPECT_LE(rel_err(g->key, e.key), tol) << which << " fp32=" << fp32;
      EXPECT_LE(rel_err(g->value, e.value), tol) << which << " fp32=" << fp32;
      EXPECT_LE(rel_err(g->bias, e.bias), tol) << which << " fp32=" << fp32;
    }
  }
}

// ---- dropout sources ---------------------------------------------------------------------

// The mask is drawn once per vjp call, so with an engine the vjp's output is what
// dot_product_attention gives from the same engine state (re-seeded), and its gradients
// are those of that output (checked by replaying the recorded mask).
TEST(DotProductAttentionVjp, EngineDropoutDrawsOnce) {
  std::mt19937 gen(3);
  const auto q = random_tensor<double, 4>({2, 5, 2, 3}, gen), k = random_tensor<double, 4>({2, 6, 2, 3}, gen);
  const auto v = random_tensor<double, 4>({2, 6, 2, 3}, gen), ct = random_tensor<double, 4>({2, 5, 2, 3}, gen);
  std::vector<bool> drawn;
  int draws = 0;
  std::mt19937 engine(42);
  const linen::DropoutRng engine_rng(engine);
  linen::AttentionOptions<double> o;
  o.dropout_rate = 0.4;
  o.broadcast_dropout = false;
  o.dropout_rng = [&](double p, const Shape& s, bool* keep) {
    ++draws;
    engine_rng(p, s, keep);
    drawn.assign(keep, keep + linen::num_elements(s));
  };
  for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
    draws = 0;
    engine.seed(42);
    linen::GradOptions go;
    go.implementation = impl;
    const auto g = linen::dot_product_attention_vjp(q, k, v, ct, o, go);
    EXPECT_EQ(draws, 1);
    std::mt19937 again(42);
    linen::AttentionOptions<double> replay = o;
    replay.dropout_rng = again;
    const Tensor<double, 4> y = linen::dot_product_attention(q, k, v, replay);
    EXPECT_LE(rel_err(g.output, y), 1e-13);
    const std::vector<bool> mask = drawn;
    replay.dropout_rng = [mask](double, const Shape&, bool* keep) { std::copy(mask.begin(), mask.end(), keep); };
    Tensor<double, 4> qq = q;
    auto loss = [&] {
      const Tensor<double, 4> out = linen::dot_product_attention(qq, k, v, replay);
      return inner(ct.data(), out.data(), out.size());
    };
    expect_matches_fd(loss, qq.data(), g.query.data(), qq.size(), "query under an engine's mask");
  }
}

// ---- errors --------------------------------------------------------------------------------

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no std::invalid_argument>";
}

TEST(DotProductAttentionVjp, BadArgumentsThrowNamingTheFault) {
  Tensor<float, 4> q(1, 4, 2, 3), k(1, 5, 2, 3), v(1, 5, 2, 3), ct(1, 4, 2, 3), bad_ct(1, 5, 2, 3);
  q.setConstant(0.1f), k.setConstant(0.2f), v.setConstant(0.3f), ct.setConstant(1.f);
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, bad_ct); }).find("(1, 5, 2, 3)"),
            std::string::npos);
  linen::GradOptions tiles;
  tiles.block_q = 0;
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, ct, {}, tiles); }).find("block_q"),
            std::string::npos);
  Tensor<bool, 2> mask(4, 4);  // kv_length is 5
  mask.setConstant(true);
  linen::AttentionOptions<float> o;
  o.mask = mask;
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, ct, o); }).find("(4, 4)"), std::string::npos);
  linen::AttentionOptions<float> d;
  d.dropout_rate = 0.5;
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, ct, d); }).find("dropout_rng"),
            std::string::npos);
  d.dropout_rate = 1.0;
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, ct, d); }).find("dropout_rate"),
            std::string::npos);
  linen::AttentionOptions<float> s;
  int sown = 0;
  s.sow_weights = [&](linen::ArrayRef<float> w) {
    ++sown;
    EXPECT_EQ(w.shape(), (Shape{1, 2, 4, 5}));
  };
  linen::GradOptions fused;
  fused.implementation = linen::Implementation::Fused;
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k, v, ct, s, fused); }).find("sow"),
            std::string::npos);
  linen::dot_product_attention_vjp(q, k, v, ct, s);  // Auto: sowing picks the reference kernels
  EXPECT_EQ(sown, 1);
  Tensor<float, 4> k_bad(1, 5, 3, 3);
  EXPECT_NE(error_of([&] { linen::dot_product_attention_vjp(q, k_bad, v, ct); }).find("num_heads"),
            std::string::npos);
}

// Zero lengths are legal shapes: no keys gives zero cotangents, as the reference computes.
TEST(DotProductAttentionVjp, EmptyKeys) {
  Tensor<double, 3> q(3, 1, 2), k(0, 1, 2), v(0, 1, 2), ct(3, 1, 2);
  q.setConstant(1.0), ct.setConstant(1.0);
  for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
    linen::GradOptions go;
    go.implementation = impl;
    const auto g = linen::dot_product_attention_vjp(q, k, v, ct, {}, go);
    for (Index i = 0; i < g.query.size(); ++i) EXPECT_EQ(g.query.data()[i], 0.0);
    for (Index i = 0; i < g.output.size(); ++i) EXPECT_EQ(g.output.data()[i], 0.0);
  }
}

// ---- DenseGeneral and LayerNorm ----------------------------------------------------------

template <int Axes, int Features>
void dense_fd(bool use_bias, const std::array<Index, Axes>& in, const std::array<Index, Features>& features) {
  std::mt19937 gen(11);
  typename linen::DenseGeneral<double, double, Axes, Features>::Config c;
  c.features = features;
  c.use_bias = use_bias;
  const linen::DenseGeneral<double, double, Axes, Features> dense(c);
  auto params = dense.init(linen::random::key(1), in);
  for (Index i = 0; i < params.bias.size(); ++i) params.bias.data()[i] = 0.3 * (i % 5) - 0.5;
  std::array<Index, 2 + Axes> xd{};
  xd[0] = 2, xd[1] = 3;
  for (int i = 0; i < Axes; ++i) xd[2 + i] = in[i];
  auto x = random_tensor<double, 2 + Axes>(xd, gen);
  auto [y, pullback] = linen::vjp(dense, params, x);
  std::array<Index, 2 + Features> yd{};
  yd[0] = 2, yd[1] = 3;
  for (int i = 0; i < Features; ++i) yd[2 + i] = features[i];
  const auto ct = random_tensor<double, 2 + Features>(yd, gen);
  const auto g = pullback(ct);
  auto loss = [&] {
    const auto out = dense.apply(params, x);
    return inner(ct.data(), out.data(), out.size());
  };
  expect_matches_fd(loss, params.kernel.data(), g.params.kernel.data(), params.kernel.size(), "kernel");
  if (use_bias) expect_matches_fd(loss, params.bias.data(), g.params.bias.data(), params.bias.size(), "bias");
  else EXPECT_EQ(g.params.bias.size(), 0);
  expect_matches_fd(loss, x.data(), g.input.data(), x.size(), "input");
}

TEST(DenseGeneralVjp, MatchesFiniteDifferences) {
  dense_fd<1, 2>(true, {5}, {2, 3});
  dense_fd<1, 2>(false, {4}, {3, 2});
  dense_fd<2, 1>(true, {2, 3}, {4});
  dense_fd<1, 1>(true, {3}, {6});
}

TEST(DenseGeneralVjp, ThreadPoolGivesTheSameGradients) {
  std::mt19937 gen(8);
  typename linen::DenseGeneral<float, float, 1, 1>::Config c;
  c.features = {37};
  const linen::DenseGeneral<float, float, 1, 1> dense(c);
  const auto params = dense.init(linen::random::key(1), {29});
  const auto x = random_tensor<float, 2>({41, 29}, gen);
  const auto ct = random_tensor<float, 2>({41, 37}, gen);
  Eigen::ThreadPool pool(3);
  linen::GradOptions go;
  go.thread_pool = &pool;
  const auto a = linen::vjp(dense, params, x).pullback(ct);
  const auto b = linen::vjp(dense, params, x, go).pullback(ct);
  EXPECT_LE(rel_err(a.params.kernel, b.params.kernel), 1e-6);
  EXPECT_LE(rel_err(a.params.bias, b.params.bias), 1e-6);
  EXPECT_LE(rel_err(a.input, b.input), 1e-6);
  Tensor<float, 2> wrong(41, 36);
  EXPECT_THROW(linen::vjp(dense, params, x).pullback(wrong), std::invalid_argument);
}

TEST(LayerNormVjp, MatchesFiniteDifferences) {
  for (bool fast : {true, false}) {
    for (bool use_scale : {true, false}) {
      for (bool use_bias : {true, false}) {
        std::mt19937 gen(21);
        typename linen::LayerNorm<double>::Config c;
        c.use_fast_variance = fast;
        c.use_scale = use_scale;
        c.use_bias = use_bias;
        c.epsilon = 1e-3;
        const linen::LayerNorm<double> ln(c);
        auto params = ln.init(linen::random::key(0), 6);
        for (Index i = 0; i < params.scale.size(); ++i) params.scale(i) = 1.0 + 0.2 * static_cast<double>(i % 3);
        for (Index i = 0; i < params.bias.size(); ++i) params.bias(i) = 0.1 * static_cast<double>(i);
        auto x = random_tensor<double, 3>({2, 3, 6}, gen, 2.0);
        const auto ct = random_tensor<double, 3>({2, 3, 6}, gen);
        auto [y, pullback] = linen::vjp(ln, params, x);
        const auto g = pullback(ct);
        auto loss = [&] {
          const auto out = ln.apply(params, x);
          return inner(ct.data(), out.data(), out.size());
        };
        const std::string what = std::string(fast ? "fast" : "two-pass") + (use_scale ? " scale" : "") +
                                 (use_bias ? " bias" : "");
        expect_matches_fd(loss, x.data(), g.input.data(), x.size(), what + ": input");
        if (use_scale)
          expect_matches_fd(loss, params.scale.data(), g.params.scale.data(), 6, what + ": scale");
        else
          EXPECT_EQ(g.params.scale.size(), 0);
        if (use_bias)
          expect_matches_fd(loss, params.bias.data(), g.params.bias.data(), 6, what + ": bias");
        else
          EXPECT_EQ(g.params.bias.size(), 0);
      }
    }
  }
}

// A constant row has zero variance: Flax's max(0, E[x^2] - mean^2) sits at its kink,
// where jnp.maximum's derivative is 1/2; the cotangent stays finite.
TEST(LayerNormVjp, ConstantRowIsFinite) {
  const linen::LayerNorm<float> ln;
  const auto params = ln.init(linen::random::key(0), 4);
  Tensor<float, 2> x(1, 4);
  x.setConstant(2.0f);
  Tensor<float, 2> ct(1, 4);
  ct.setValues({{1.f, -2.f, 0.5f, 3.f}});
  const auto g = linen::vjp(ln, params, x).pullback(ct);
  for (Index i = 0; i < 4; ++i) EXPECT_TRUE(std::isfinite(g.input(0, i)));
  EXPECT_FLOAT_EQ(g.params.bias(1), -2.f);
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// linen/grad.hpp, module part: vjp of SelfAttention and MultiHeadDotProductAttention.
//   - Flax's own gradients (jax.vjp): self_grads_f32, cross_normalize_qk_grads (float32,
//     every tensor within 1e-5 relative) and self_f64_grads (float64, within 1e-10), with
//     both kernel implementations;
//   - central finite differences in double on small random modules for every option:
//     masks, dropout with a fixed mask (broadcast and not), cross-attention with distinct
//     k / v, no bias, qkv/out features, normalize_qk, batch ranks 0..2;
//   - dropout drawn once per vjp (any source, an engine included), half types, thread
//     pools, errors.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include <linen/grad.hpp>

#include "attention_fixture.hpp"
#include "grad_support.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;

// ---- helpers (grad_support.hpp has those shared with test_grad.cpp) ---------------------

using namespace linen_grad_test;

template <class A, class E>
double rel_err(const A& a, const E& e) {
  EXPECT_EQ(linen::shape_of(a), linen::shape_of(e));
  if (linen::shape_of(a) != linen::shape_of(e)) return INFINITY;
  return rel_err_n(a.data(), e.data(), e.size());
}

// Every parameter tensor of an attention module by its Flax path (size-0 ones left out).
template <class P, class Params>
std::vector<std::tuple<std::string, P*, Index>> param_tensors(Params& p) {
  std::vector<std::tuple<std::string, P*, Index>> out;
  auto add = [&](const char* path, auto& t) {
    if (t.size() > 0) out.emplace_back(path, t.data(), t.size());
  };
  add("query/kernel", p.query.kernel), add("query/bias", p.query.bias);
  add("key/kernel", p.key.kernel), add("key/bias", p.key.bias);
  add("value/kernel", p.value.kernel), add("value/bias", p.value.bias);
  add("out/kernel", p.out.kernel), add("out/bias", p.out.bias);
  add("query_ln/scale", p.query_ln.scale), add("key_ln/scale", p.key_ln.scale);
  return out;
}

// The entry of `list` with Flax path `path`, or null.
template <class List>
const typename List::value_type* find_path(const List& list, const std::string& path) {
  for (const auto& e : list)
    if (std::get<0>(e) == path) return &e;
  return nullptr;
}

const char* impl_name(linen::Implementation i) {
  return i == linen::Implementation::Reference ? "reference" : "fused";
}

// ---- Flax's gradients ------------------------------------------------------------------------

struct GoldenCase {
  const char* fixture;
  linen::Implementation implementation;
};

class GradGolden : public ::testing::TestWithParam<GoldenCase> {};

template <class T>
void check_golden(const linen::io::Variables& f, const Tensor<T, 3>& output,
                  const linen::AttentionGrads<T, T, 3>& g, bool normalize_qk, double tol, const std::string& where) {
  const double out_tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;
  EXPECT_LE(rel_err(output, f.get<double, 3>("output")), out_tol) << where;
  double worst = 0;
  for (const auto& [path, data, n] : param_tensors<const T>(g.params)) {
    const auto expected = f.at("grad/params/" + path).template to_vector<double>("grad/params/" + path);
    ASSERT_EQ(static_cast<std::size_t>(n), expected.size()) << path;
    if (path == "key/bias" && !normalize_qk) {
      // Softmax cannot see key/bias (it adds q.b to every key's logit alike): the exact
      // cotangent is 0 and both JAX's and linen's are rounding noise, far below the
      // other cotangents (JAX's: ~1e-7 next to O(1)).
      const auto kk = f.at("grad/params/key/kernel").template to_vector<double>("grad/params/key/kernel");
      double scale = 0;
      for (double v : kk) scale = std::max(scale, std::abs(v));
      for (Index i = 0; i < n; ++i) {
        EXPECT_LE(std::abs(static_cast<double>(data[i])), tol * scale) << where << ": grad/params/key/bias";
        EXPECT_LE(std::abs(expected[static_cast<std::size_t>(i)]), tol * scale) << where << ": the fixture's";
      }
      continue;
    }
    const double e = rel_err_n(data, expected.data(), n);
    EXPECT_LE(e, tol) << where << ": grad/params/" << path;
    worst = std::max(worst, e);
  }
  const double eq = rel_err(g.inputs_q, f.get<double, 3>("grad/inputs/q"));
  EXPECT_LE(eq, tol) << where << ": grad/inputs/q";
  worst = std::max(worst, eq);
  for (const char* in : {"k", "v"}) {
    const std::string path = std::string("grad/inputs/") + in;
    const Tensor<T, 3>& got = in[0] == 'k' ? g.inputs_k : g.inputs_v;
    if (f.contains(path)) {
      const double e = rel_err(got, f.get<double, 3>(path));
      EXPECT_LE(e, tol) << where << ": " << path;
      worst = std::max(worst, e);
    } else {
      EXPECT_EQ(got.size(), 0) << where << ": " << path << " was not an argument";
    }
  }
  // Every parameter of the fixture has its gradient, and nothing else is there.
  std::size_t expected_params = 0;
  for (const auto& name : f.paths())
    if (name.rfind("grad/params/", 0) == 0) ++expected_params;
  EXPECT_EQ(param_tensors<const T>(g.params).size(), expected_params) << where;
  std::ostringstream os;
  os << worst;
  ::testing::Test::RecordProperty("worst_rel_err", os.str());
}

TEST_P(GradGolden, MatchesJaxVjp) {
  const GoldenCase c = GetParam();
  const auto f = linen_test::fixture(c.fixture);
  const auto json = linen_test::fixture_config(f);
  const std::string module = f.metadata.at("module");
  linen::GradOptions go;
  go.implementation = c.implementation;
  go.block_q = 2;  // several tiles even on these small problems
  go.block_k = 3;
  const std::string where = std::string(c.fixture) + " " + impl_name(c.implementation);
  if (linen_test::dtype_of_case(json) == "float64") {
    const auto cfg = linen_test::config_from<double, double>(json);
    const auto vars = linen::io::load_attention(f, cfg);
    const linen::SelfAttention<double> attn(cfg);
    const auto x = f.get<double, 3>("inputs/q");
    const auto mask = f.get<bool, 4>("mask");
    linen::CallOptions<double> call;
    call.mask = mask;
    auto [y, pullback] = linen::vjp(attn, vars, x, call, go);
    check_golden<double>(f, y, pullback(f.get<double, 3>("cotangent")), cfg.normalize_qk, 1e-10, where);
  } else if (module == "SelfAttention") {
    const auto cfg = linen_test::config_from<float, float>(json);
    const auto vars = linen::io::load_attention(f, cfg);
    const linen::SelfAttention<float> attn(cfg);
    const auto x = f.get<float, 3>("inputs/q");
    const auto mask = f.get<bool, 4>("mask");
    linen::CallOptions<float> call;
    call.mask = mask;
    auto [y, pullback] = linen::vjp(attn, vars, x, call, go);
    check_golden<float>(f, y, pullback(f.get<float, 3>("cotangent")), cfg.normalize_qk, 1e-5, where);
  } else {
    const auto cfg = linen_test::config_from<float, float>(json);
    const auto vars = linen::io::load_attention(f, cfg);
    const linen::MultiHeadDotProductAttention<float> attn(cfg);
    const auto q = f.get<float, 3>("inputs/q"), k = f.get<float, 3>("inputs/k");
    const auto mask = f.get<bool, 4>("mask");
    linen::CallOptions<float> call;
    call.mask = mask;
    ASSERT_FALSE(f.contains("inputs/v"));
    auto [y, pullback] = linen::vjp(attn, vars, q, k, call, go);
    check_golden<float>(f, y, pullback(f.get<float, 3>("cotangent")), cfg.normalize_qk, 1e-5, where);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Flax, GradGolden,
    ::testing::Values(GoldenCase{"self_grads_f32", linen::Implementation::Reference},
                      GoldenCase{"self_grads_f32", linen::Implementation::Fused},
                      GoldenCase{"cross_normalize_qk_grads", linen::Implementation::Reference},
                      GoldenCase{"cross_normalize_qk_grads", linen::Implementation::Fused},
                      GoldenCase{"self_f64_grads", linen::Implementation::Reference},
                      GoldenCase{"self_f64_grads", linen::Implementation::Fused}),
    [](const auto& info) {
      return std::string(info.param.fixture) + "_" + impl_name(info.param.implementation);
    });

// ---- finite differences on random modules ---------------------------------------------------

enum class Dropout { None, Broadcast, Full };

struct ModuleCase {
  const char* name;
  int batch_rank;  // 0..2
  int inputs;      // 0: SelfAttention; 1, 2, 3: MultiHeadDotProductAttention(q[, k[, v]])
  Index Lq, Lk, fq, fk, fv, heads;
  std::optional<Index> qkv_features, out_features;
  bool use_bias, normalize_qk, mask;
  Dropout dropout;
};

// A random module problem of input rank N = batch rank + 2, in double.
template <int N>
struct ModuleProblem {
  linen::AttentionConfig<double> cfg;
  linen::AttentionVariables<double> vars;
  Tensor<double, N> q, k, v, ct;
  Tensor<bool, N + 1> mask;
  linen::CallOptions<double> call;
  int inputs;

  explicit ModuleProblem(const ModuleCase& c) : inputs(c.inputs) {
    std::mt19937 gen(2024);
    cfg.num_heads = c.heads;
    cfg.qkv_features = c.qkv_features;
    cfg.out_features = c.out_features;
    cfg.use_bias = c.use_bias;
    cfg.normalize_qk = c.normalize_qk;
    std::array<Index, N> qd{}, kd{}, vd{};
    std::array<Index, N + 1> md{};
    for (int i = 0; i < N - 2; ++i) qd[i] = kd[i] = vd[i] = md[i] = 2;
    const bool self = c.inputs <= 1;
    qd[N - 2] = c.Lq, qd[N - 1] = c.fq;
    kd[N - 2] = self ? c.Lq : c.Lk, kd[N - 1] = c.inputs >= 2 ? c.fk : c.fq;
    vd[N - 2] = kd[N - 2], vd[N - 1] = c.inputs == 3 ? c.fv : kd[N - 1];
    q = random_tensor<double, N>(qd, gen);
    k = random_tensor<double, N>(kd, gen);
    v = random_tensor<double, N>(vd, gen);
    const linen::MultiHeadDotProductAttention<double> m(cfg);
    vars = m.init(linen::random::key(5), q, k, v);
    // Random values of a sensible size for every parameter, so each one matters.
    for (auto& [path, data, n] : param_tensors<double>(vars.params)) {
      std::normal_distribution<double> normal(path.find("ln/scale") != std::string::npos ? 1.0 : 0.0, 0.4);
      for (Index i = 0; i < n; ++i) data[i] = normal(gen);
    }
    std::array<Index, N> od = qd;
    od[N - 1] = m.out_features(c.fq);
    ct = random_tensor<double, N>(od, gen);
    if (c.mask) {
      md[N - 2] = 1, md[N - 1] = c.Lq, md[N] = kd[N - 2];  // [batch..., 1, Lq, Lk]
      mask.resize(md);
      std::bernoulli_distribution keep(0.7);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);
      for (Index j = 0; j < kd[N - 2]; ++j) mask.data()[j] = false;  // a fully masked query row
      call.mask = mask;
    }
    if (c.dropout != Dropout::None) {
      cfg.dropout_rate = 0.3;
      cfg.broadcast_dropout = c.dropout == Dropout::Broadcast;
      call.deterministic = false;
      call.dropout_rng = linen::random::key(9);  // the same keep mask on every call
    }
  }

  // Runs the library's forward (module.apply) or the vjp with the case's inputs.
  template <class Module, class F>
  auto with_inputs(const Module& m, F&& f) const {
    if (inputs == 2) return f(m, q, k);
    if (inputs == 3) return f(m, q, k, v);
    return f(m, q);
  }
  double loss() const {
    const auto out = [&](const auto& m) {
      if (inputs == 0) return linen::SelfAttention<double>(cfg).apply(vars, q, call);
      if (inputs == 2) return m.apply(vars, q, k, call);
      if (inputs == 3) return m.apply(vars, q, k, v, call);
      return m.apply(vars, q, call);
    }(linen::MultiHeadDotProductAttention<double>(cfg));
    return inner(ct, out);
  }
  auto vjp(const linen::GradOptions& go) const {
    const linen::MultiHeadDotProductAttention<double> m(cfg);
    if (inputs == 0) return linen::vjp(linen::SelfAttention<double>(cfg), vars, q, call, go);
    if (inputs == 2) return linen::vjp(m, vars, q, k, call, go);
    if (inputs == 3) return linen::vjp(m, vars, q, k, v, call, go);
    return linen::vjp(m, vars, q, call, go);
  }
};

class ModuleFiniteDifferences : public ::testing::TestWithParam<ModuleCase> {};

template <int N>
void run_module_fd(const ModuleCase& c) {
  for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
    const std::string which = impl_name(impl);
    ModuleProblem<N> p(c);
    linen::GradOptions go;
    go.implementation = impl;
    go.block_q = 2;
    go.block_k = 3;
    auto [y, pullback] = p.vjp(go);
    const auto g = pullback(p.ct);
    // The vjp's output is the module's (apply runs dot_product_attention's fused kernel:
    // equal to rounding).
    const auto y_apply = [&] {
      const linen::MultiHeadDotProductAttention<double> m(p.cfg);
      if (c.inputs == 2) return m.apply(p.vars, p.q, p.k, p.call);
      if (c.inputs == 3) return m.apply(p.vars, p.q, p.k, p.v, p.call);
      return m.apply(p.vars, p.q, p.call);
    }();
    EXPECT_LE(rel_err(y, y_apply), 1e-13) << which;
    auto loss = [&] { return p.loss(); };
    for (auto& [path, data, n] : param_tensors<double>(p.vars.params)) {
      const auto grads = param_tensors<const double>(g.params);
      const auto* it = find_path(grads, path);
      ASSERT_NE(it, nullptr) << which << ": no gradient for " << path;
      ASSERT_EQ(std::get<2>(*it), n) << path;
      if (path == "key/bias" && !c.normalize_qk) {
        // q.(k + b) - q.k = q.b is the same for every key: softmax cannot see key/bias,
        // whose cotangent is exactly 0 (as jax.vjp's is, to rounding).
        const std::vector<double> fd = numeric_grad(loss, data, n);
        for (Index i = 0; i < n; ++i) {
          EXPECT_NEAR(std::get<1>(*it)[i], 0.0, 1e-13) << which << " key/bias";
          EXPECT_NEAR(fd[static_cast<std::size_t>(i)], 0.0, 1e-8) << which << " key/bias (finite differences)";
        }
        continue;
      }
      expect_matches_fd(loss, data, std::get<1>(*it), n, which + " " + path);
    }
    EXPECT_EQ(param_tensors<const double>(g.params).size(), param_tensors<double>(p.vars.params).size());
    expect_matches_fd(loss, p.q.data(), g.inputs_q.data(), p.q.size(), which + " inputs_q");
    if (c.inputs >= 2) expect_matches_fd(loss, p.k.data(), g.inputs_k.data(), p.k.size(), which + " inputs_k");
    else EXPECT_EQ(g.inputs_k.size(), 0);
    if (c.inputs == 3) expect_matches_fd(loss, p.v.data(), g.inputs_v.data(), p.v.size(), which + " inputs_v");
    else EXPECT_EQ(g.inputs_v.size(), 0);
  }
}

TEST_P(ModuleFiniteDifferences, GradientsMatch) {
  const ModuleCase& c = GetParam();
  switch (c.batch_rank) {
    case 0: run_module_fd<2>(c); break;
    case 1: run_module_fd<3>(c); break;
    case 2: run_module_fd<4>(c); break;
    default: FAIL() << "batch rank " << c.batch_rank;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Options, ModuleFiniteDifferences,
    ::testing::Values(
        ModuleCase{"self", 1, 0, 5, 5, 6, 6, 6, 2, {}, {}, true, false, false, Dropout::None},
        ModuleCase{"self_nobatch", 0, 0, 4, 4, 6, 6, 6, 3, {}, {}, true, false, true, Dropout::None},
        ModuleCase{"self_two_batch_dims", 2, 0, 3, 3, 4, 4, 4, 2, {}, {}, true, false, true, Dropout::None},
        ModuleCase{"self_qkv_out_features", 1, 0, 4, 4, 5, 5, 5, 2, 6, 3, true, false, true, Dropout::None},
        ModuleCase{"self_nobias", 1, 0, 5, 5, 6, 6, 6, 2, {}, {}, false, false, true, Dropout::None},
        ModuleCase{"self_normalize_qk", 1, 0, 5, 5, 8, 8, 8, 2, {}, {}, true, true, true, Dropout::None},
        ModuleCase{"self_dropout_broadcast", 1, 0, 5, 5, 6, 6, 6, 2, {}, {}, true, false, true, Dropout::Broadcast},
        ModuleCase{"self_dropout_full_normalize_qk", 2, 0, 3, 3, 6, 6, 6, 2, {}, {}, true, true, false,
                   Dropout::Full},
        ModuleCase{"mhdpa_one_input", 1, 1, 4, 4, 6, 6, 6, 2, {}, {}, true, false, true, Dropout::None},
        ModuleCase{"cross_k", 1, 2, 3, 6, 6, 5, 5, 2, {}, {}, true, false, true, Dropout::None},
        ModuleCase{"cross_k_normalize_qk_nobias", 0, 2, 4, 5, 6, 4, 4, 2, {}, 5, false, true, true, Dropout::None},
        ModuleCase{"cross_k_v_distinct", 1, 3, 3, 5, 6, 4, 7, 2, 8, 4, true, false, true, Dropout::None},
        ModuleCase{"cross_k_v_everything", 2, 3, 3, 4, 5, 4, 6, 2, 6, 3, true, true, true, Dropout::Full}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- dropout sources ---------------------------------------------------------------------

// The keep mask is drawn exactly once per vjp, with the shape Flax draws it at (the same
// one apply() presents), so an engine works; the pullback uses that mask.
TEST(AttentionVjp, DropoutIsDrawnOnceWithFlaxsShape) {
  for (bool broadcast : {true, false}) {
    ModuleCase c{"d", 2, 0, 4, 4, 6, 6, 6, 2, {}, {}, true, false, true, Dropout::None};
    ModuleProblem<4> p(c);
    p.cfg.dropout_rate = 0.4;
    p.cfg.broadcast_dropout = broadcast;
    p.call.deterministic = false;
    std::mt19937 engine(77);
    const linen::DropoutRng from_engine(engine);
    std::vector<Shape> shapes;
    std::vector<bool> drawn;
    p.call.dropout_rng = [&](double keep_prob, const Shape& s, bool* keep) {
      EXPECT_DOUBLE_EQ(keep_prob, 0.6);
      shapes.push_back(s);
      from_engine(keep_prob, s, keep);
      drawn.assign(keep, keep + linen::num_elements(s));
    };
    linen::GradOptions go;
    go.block_q = 3;
    auto [y, pullback] = p.vjp(go);
    ASSERT_EQ(shapes.size(), 1u);
    const Shape flax = broadcast ? Shape{1, 1, 1, 4, 4} : Shape{2, 2, 2, 4, 4};
    EXPECT_EQ(shapes[0], flax);
    const auto g = pullback(p.ct);
    const auto g2 = pullback(p.ct);  // a pullback can run again: same numbers, no new draw
    EXPECT_EQ(shapes.size(), 1u);
    EXPECT_EQ(rel_err(g2.inputs_q, g.inputs_q), 0.0);
    // apply() with the engine re-seeded draws the same mask, hence the same output ...
    engine.seed(77);
    const Tensor<double, 4> y_apply = linen::SelfAttention<double>(p.cfg).apply(p.vars, p.q, p.call);
    EXPECT_EQ(shapes.size(), 2u);
    EXPECT_EQ(shapes[1], flax);
    EXPECT_LE(rel_err(y, y_apply), 1e-13);
    // ... and the gradients are those of the function with that mask fixed.
    const std::vector<bool> mask = drawn;
    p.call.dropout_rng = [mask](double, const Shape&, bool* keep) { std::copy(mask.begin(), mask.end(), keep); };
    auto loss = [&] { return p.loss(); };
    expect_matches_fd(loss, p.q.data(), g.inputs_q.data(), p.q.size(), "inputs_q under an engine's mask");
    expect_matches_fd(loss, p.vars.params.value.kernel.data(), g.params.value.kernel.data(),
                      p.vars.params.value.kernel.size(), "value/kernel under an engine's mask");
  }
}

// ---- linearity, threads, types -----------------------------------------------------------

TEST(AttentionVjp, PullbackIsLinearInTheCotangent) {
  ModuleCase c{"lin", 1, 3, 4, 5, 6, 4, 5, 2, {}, {}, true, true, true, Dropout::None};
  ModuleProblem<3> p(c);
  auto [y, pullback] = p.vjp({});
  const Tensor<double, 3> ct2 = p.ct * 2.0 + 1.0;
  const auto a = pullback(p.ct), b = pullback(ct2);
  Tensor<double, 3> ones(p.ct.dimensions());
  ones.setConstant(1.0);
  const auto o = pullback(ones);
  const Tensor<double, 3> expect_q = a.inputs_q * 2.0 + o.inputs_q;
  EXPECT_LE(rel_err(b.inputs_q, expect_q), 1e-13);
  const Tensor<double, 3> expect_k = a.params.key.kernel * 2.0 + o.params.key.kernel;
  EXPECT_LE(rel_err(b.params.key.kernel, expect_k), 1e-13);
}

TEST(AttentionVjp, ThreadPoolGivesTheSameGradients) {
  std::mt19937 gen(4);
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 3;
  cfg.normalize_qk = true;
  const linen::SelfAttention<float> attn(cfg);
  const auto x = random_tensor<float, 3>({2, 33, 12}, gen);
  const auto ct = random_tensor<float, 3>({2, 33, 12}, gen);
  const auto vars = attn.init(linen::random::key(1), x);
  Tensor<bool, 4> mask = linen::make_causal_mask(Tensor<float, 2>(2, 33));
  linen::CallOptions<float> call;
  call.mask = mask;
  Eigen::ThreadPool pool(3);
  linen::GradOptions serial, threaded;
  serial.block_q = threaded.block_q = 8;
  serial.block_k = threaded.block_k = 7;
  threaded.thread_pool = &pool;
  const auto a = linen::vjp(attn, vars, x, call, serial).pullback(ct);
  const auto b = linen::vjp(attn, vars, x, call, threaded).pullback(ct);
  EXPECT_LE(rel_err(b.inputs_q, a.inputs_q), 1e-6);
  for (const auto& [path, data, n] : param_tensors<const float>(a.params)) {
    const auto other = param_tensors<const float>(b.params);
    const auto* it = find_path(other, path);
    ASSERT_NE(it, nullptr) << path;
    EXPECT_LE(rel_err_n(std::get<1>(*it), data, n), 1e-6) << path;
  }
}

// Half types (dtype) with float or half parameters: every cotangent within the fixtures'
// tolerance of the double computation on the same values; parameter cotangents come back
// in ParamT.
template <class T, class P>
void half_vs_double(double tol) {
  std::mt19937 gen(8);
  linen::AttentionConfig<double> cfg64;
  cfg64.num_heads = 2;
  cfg64.normalize_qk = true;
  const auto x64 = random_tensor<double, 3>({2, 7, 8}, gen);
  const Tensor<T, 3> x = x64.cast<T>();
  const Tensor<double, 3> xd = x.template cast<double>();
  const Tensor<T, 3> ct = random_tensor<double, 3>({2, 7, 8}, gen).cast<T>();
  const Tensor<double, 3> ctd = ct.template cast<double>();
  auto vars64 = linen::SelfAttention<double>(cfg64).init(linen::random::key(3), x64);
  // Parameters exactly representable in P, shared by both computations.
  linen::AttentionVariables<T, P> vars;
  auto src = param_tensors<double>(vars64.params);
  auto copy = [&](auto& dst_dense, auto& src_dense) {
    dst_dense.kernel = src_dense.kernel.template cast<P>();
    dst_dense.bias = src_dense.bias.template cast<P>();
    src_dense.kernel = dst_dense.kernel.template cast<double>();
    src_dense.bias = dst_dense.bias.template cast<double>();
  };
  copy(vars.params.query, vars64.params.query);
  copy(vars.params.key, vars64.params.key);
  copy(vars.params.value, vars64.params.value);
  copy(vars.params.out, vars64.params.out);
  vars.params.query_ln.scale = vars64.params.query_ln.scale.template cast<P>();
  vars.params.key_ln.scale = vars64.params.key_ln.scale.template cast<P>();
  vars64.params.query_ln.scale = vars.params.query_ln.scale.template cast<double>();
  vars64.params.key_ln.scale = vars.params.key_ln.scale.template cast<double>();
  Tensor<bool, 4> mask = linen::make_causal_mask(Tensor<float, 2>(2, 7));
  linen::CallOptions<double> call64;
  call64.mask = mask;
  const auto e = linen::vjp(linen::SelfAttention<double>(cfg64), vars64, xd, call64).pullback(ctd);
  for (bool fp32 : {false, true}) {
    for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
      linen::AttentionConfig<T, P> cfg;
      cfg.num_heads = 2;
      cfg.normalize_qk = true;
      cfg.force_fp32_for_softmax = fp32;
      linen::CallOptions<T> call;
      call.mask = mask;
      linen::GradOptions go;
      go.implementation = impl;
      const auto g = linen::vjp(linen::SelfAttention<T, P>(cfg), vars, x, call, go).pullback(ct);
      const std::string where = std::string(linen::dtype_name<T>()) + "/" + linen::dtype_name<P>() + " " +
                                impl_name(impl) + (fp32 ? " fp32 softmax" : "");
      EXPECT_LE(rel_err_n(g.inputs_q.data(), e.inputs_q.data(), e.inputs_q.size()), tol) << where;
      static_assert(std::is_same_v<typename decltype(g.params.query.kernel)::Scalar, P>);
      const auto ge = param_tensors<const double>(e.params);
      for (const auto& [path, data, n] : param_tensors<const P>(g.params)) {
        const auto* it = find_path(ge, path);
        ASSERT_NE(it, nullptr) << path;
        EXPECT_LE(rel_err_n(data, std::get<1>(*it), n), tol) << where << " " << path;
      }
    }
  }
}

TEST(AttentionVjp, HalfTypesAgreeWithDouble) {
  half_vs_double<Eigen::bfloat16, float>(2e-2);
  half_vs_double<Eigen::half, Eigen::half>(5e-3);
  half_vs_double<float, float>(2e-6);
}

// ---- the vjp runs the module's own forward -------------------------------------------------

// vjp(module, ...) runs the module's apply with a tape (one forward, apply's code and
// kernels), so its output equals apply()'s bit for bit: in every element type, with a mask,
// dropout (a Key: the same keep mask for both calls), normalize_qk, cross attention with
// one, two and three inputs, either backward implementation, and SelfAttention.
template <class T, class P>
void expect_vjp_output_is_apply(bool masked, bool dropout, bool normalize_qk, int inputs, linen::Implementation impl) {
  std::ostringstream what;
  what << "mask=" << masked << " dropout=" << dropout << " normalize_qk=" << normalize_qk << " inputs=" << inputs
       << " impl=" << impl_name(impl);
  SCOPED_TRACE(what.str());
  std::mt19937 gen(3);
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = 2;
  cfg.normalize_qk = normalize_qk;
  if (dropout) {
    cfg.dropout_rate = 0.25;
    cfg.broadcast_dropout = false;
  }
  const Index lk = inputs >= 2 ? 6 : 5;
  const Tensor<T, 3> q = random_tensor<float, 3>({2, 5, 8}, gen).template cast<T>();
  const Tensor<T, 3> k = random_tensor<float, 3>({2, lk, inputs >= 2 ? 7 : 8}, gen).template cast<T>();
  const Tensor<T, 3> v = random_tensor<float, 3>({2, lk, inputs == 3 ? 5 : k.dimension(2)}, gen).template cast<T>();
  const linen::MultiHeadDotProductAttention<T, P> m(cfg);
  const auto vars = m.init(linen::random::key(1), q, k, v);
  Tensor<bool, 4> mask(2, 1, 5, lk);
  std::bernoulli_distribution keep(0.7);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(gen);
  linen::CallOptions<T> call;
  if (masked) call.mask = mask;
  if (dropout) {
    call.deterministic = false;
    call.dropout_rng = linen::random::key(4);
  }
  linen::GradOptions go;
  go.implementation = impl;
  Tensor<T, 3> y_vjp, y_apply;
  if (inputs == 1) {
    y_vjp = linen::vjp(m, vars, q, call, go).output;
    y_apply = m.apply(vars, q, call);
  } else if (inputs == 2) {
    y_vjp = linen::vjp(m, vars, q, k, call, go).output;
    y_apply = m.apply(vars, q, k, call);
  } else {
    y_vjp = linen::vjp(m, vars, q, k, v, call, go).output;
    y_apply = m.apply(vars, q, k, v, call);
  }
  ASSERT_EQ(linen::shape_of(y_vjp), linen::shape_of(y_apply));
  EXPECT_EQ(std::memcmp(y_vjp.data(), y_apply.data(), sizeof(T) * static_cast<std::size_t>(y_apply.size())), 0);
  if (inputs == 1) {
    const linen::SelfAttention<T, P> self(cfg);
    const Tensor<T, 3> ys = linen::vjp(self, vars, q, call, go).output;
    EXPECT_EQ(std::memcmp(ys.data(), y_apply.data(), sizeof(T) * static_cast<std::size_t>(y_apply.size())), 0);
  }
}

TEST(AttentionVjp, OutputIsApplysBitForBit) {
  for (auto impl : {linen::Implementation::Auto, linen::Implementation::Reference})
    for (int inputs : {1, 2, 3})
      for (bool masked : {false, true})
        for (bool dropout : {false, true}) {
          expect_vjp_output_is_apply<float, float>(masked, dropout, inputs == 3, inputs, impl);
          expect_vjp_output_is_apply<Eigen::bfloat16, float>(masked, dropout, inputs != 3, inputs, impl);
        }
  expect_vjp_output_is_apply<double, double>(true, true, true, 3, linen::Implementation::Fused);
  expect_vjp_output_is_apply<Eigen::half, Eigen::half>(true, false, true, 2, linen::Implementation::Fused);
}

// DenseGeneral's and LayerNorm's vjps run their module's apply: the same output, bit for bit.
TEST(LayerVjp, OutputIsApplysBitForBit) {
  std::mt19937 gen(6);
  linen::DenseGeneral<Eigen::bfloat16, float, 1, 2>::Config dc;
  dc.features = {3, 4};
  const linen::DenseGeneral<Eigen::bfloat16, float, 1, 2> dense(dc);
  const Tensor<Eigen::bfloat16, 3> x = random_tensor<float, 3>({2, 5, 6}, gen).cast<Eigen::bfloat16>();
  const auto dp = dense.init(linen::random::key(1), x);
  const Tensor<Eigen::bfloat16, 4> yd = linen::vjp(dense, dp, x).output, yd_apply = dense.apply(dp, x);
  EXPECT_EQ(std::memcmp(yd.data(), yd_apply.data(), sizeof(Eigen::bfloat16) * static_cast<std::size_t>(yd.size())), 0);
  const linen::LayerNorm<float> norm;
  const Tensor<float, 3> xf = random_tensor<float, 3>({2, 5, 6}, gen);
  const auto np = norm.init(linen::random::key(2), xf);
  const Tensor<float, 3> yn = linen::vjp(norm, np, xf).output, yn_apply = norm.apply(np, xf);
  EXPECT_EQ(std::memcmp(yn.data(), yn_apply.data(), sizeof(float) * static_cast<std::size_t>(yn.size())), 0);
}

// With sow_weights the module's forward runs the reference attention; the vjp sows the
// same weights apply sows and returns the same output.
TEST(AttentionVjp, SowingOutputIsApplysBitForBit) {
  std::mt19937 gen(5);
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  const linen::SelfAttention<float> attn(cfg);
  const auto x = random_tensor<float, 3>({2, 4, 6}, gen);
  const auto vars = attn.init(linen::random::key(2), x);
  std::vector<float> sown_apply, sown_vjp;
  std::vector<float>* sink = &sown_apply;
  linen::CallOptions<float> call;
  call.sow_weights = [&](linen::ArrayRef<float> w) { sink->assign(w.data(), w.data() + linen::num_elements(w.shape())); };
  const Tensor<float, 3> y_apply = attn.apply(vars, x, call);
  sink = &sown_vjp;
  const Tensor<float, 3> y_vjp = linen::vjp(attn, vars, x, call).output;
  EXPECT_EQ(std::memcmp(y_vjp.data(), y_apply.data(), sizeof(float) * static_cast<std::size_t>(y_apply.size())), 0);
  EXPECT_EQ(sown_vjp, sown_apply);
  EXPECT_EQ(sown_apply.size(), 2u * 2 * 4 * 4);
}

// ---- sowing and errors ---------------------------------------------------------------------

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no std::invalid_argument>";
}

TEST(AttentionVjp, SowsWeightsWithTheReferenceKernels) {
  const auto f = linen_test::fixture("self_sow_weights");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 3>("inputs/q");
  const auto mask = f.get<bool, 4>("mask");
  linen::CallOptions<float> call;
  call.mask = mask;
  Tensor<float, 4> sown;
  call.sow_weights = [&](linen::ArrayRef<float> w) {
    sown = linen::ConstTensorMap<float, 4>(w.data(), linen::to_dims<4>(w.shape()));
  };
  const linen::SelfAttention<float> attn(cfg);
  auto [y, pullback] = linen::vjp(attn, vars, x, call);  // Auto: reference when sowing
  EXPECT_LE(rel_err(sown, f.get<double, 4>("attention_weights")), 2e-6);
  EXPECT_LE(rel_err(y, f.get<double, 3>("output")), 2e-6);
  linen::GradOptions fused;
  fused.implementation = linen::Implementation::Fused;
  EXPECT_NE(error_of([&] { linen::vjp(attn, vars, x, call, fused); }).find("sow"), std::string::npos);
}

TEST(AttentionVjp, BadArgumentsThrowNamingTheFault) {
  std::mt19937 gen(1);
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  const auto x = random_tensor<float, 3>({1, 4, 6}, gen);
  const auto vars = linen::SelfAttention<float>(cfg).init(linen::random::key(0), x);

  auto decode = cfg;
  decode.decode = true;
  EXPECT_NE(error_of([&] { linen::vjp(linen::SelfAttention<float>(decode), vars, x); }).find("decode"),
            std::string::npos);
  auto custom = cfg;
  custom.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                           const linen::AttentionOptions<float>& o) { return linen::dot_product_attention(q, k, v, o); };
  EXPECT_NE(error_of([&] { linen::vjp(linen::SelfAttention<float>(custom), vars, x); }).find("attention_fn"),
            std::string::npos);

  const linen::SelfAttention<float> attn(cfg);
  auto [y, pullback] = linen::vjp(attn, vars, x);
  Tensor<float, 3> bad_ct(1, 5, 6);
  const std::string ct_error = error_of([&, &pb = pullback] { pb(bad_ct); });
  EXPECT_NE(ct_error.find("(1, 5, 6)"), std::string::npos) << ct_error;
  EXPECT_NE(ct_error.find("SelfAttention"), std::string::npos) << ct_error;

  auto wrong = vars;
  wrong.params.key.kernel = Tensor<float, 3>(6, 2, 4);
  const std::string pe = error_of([&] { linen::vjp(attn, wrong, x); });
  EXPECT_NE(pe.find("key/kernel"), std::string::npos) << pe;
  EXPECT_NE(pe.find("(6, 2, 4)"), std::string::npos) << pe;

  auto dropout = cfg;
  dropout.dropout_rate = 0.1;
  EXPECT_NE(error_of([&] { linen::vjp(linen::SelfAttention<float>(dropout), vars, x); }).find("deterministic"),
            std::string::npos);
  linen::CallOptions<float> nondet;
  nondet.deterministic = false;
  EXPECT_NE(error_of([&] { linen::vjp(linen::SelfAttention<float>(dropout), vars, x, nondet); }).find("dropout_rng"),
            std::string::npos);

  Tensor<bool, 4> mask(1, 1, 4, 3);
  mask.setConstant(true);
  linen::CallOptions<float> masked;
  masked.mask = mask;
  EXPECT_NE(error_of([&] { linen::vjp(attn, vars, x, masked); }).find("(1, 1, 4, 3)"), std::string::npos);

  const linen::MultiHeadDotProductAttention<float> mh(cfg);
  const auto k = random_tensor<float, 3>({2, 4, 6}, gen);
  EXPECT_NE(error_of([&] { linen::vjp(mh, vars, x, k); }).find("batch"), std::string::npos);

  linen::GradOptions tiles;
  tiles.block_k = -1;
  EXPECT_NE(error_of([&] { linen::vjp(attn, vars, x, {}, tiles); }).find("block_k"), std::string::npos);
}

// The pullback refers to the variables: binding it to a temporary does not compile.
template <class M, class V, class X, class = void>
struct can_vjp : std::false_type {};
template <class M, class V, class X>
struct can_vjp<M, V, X, std::void_t<decltype(linen::vjp(std::declval<const M&>(), std::declval<V>(), std::declval<const X&>()))>>
    : std::true_type {};
static_assert(can_vjp<linen::SelfAttention<float>, const linen::AttentionVariables<float>&, Tensor<float, 3>>::value);
static_assert(!can_vjp<linen::SelfAttention<float>, linen::AttentionVariables<float>&&, Tensor<float, 3>>::value);
static_assert(!can_vjp<linen::MultiHeadDotProductAttention<float>, linen::AttentionVariables<float>&&,
                       Tensor<float, 3>>::value);

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// SelfAttention / MultiHeadDotProductAttention against every Flax module fixture
// (self_*, cross_*), in the fixture's own dtype / param_dtype, every batch rank, masks,
// no bias, qkv/out features, normalize_qk, sow_weights, force_fp32_for_softmax.
#include <sstream>
#include <string>
#include <type_traits>

#include "attention_fixture.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::fixture;
using linen_test::rel_err;

template <class T, class P, int N>
void run_self(const std::string& name) {
  const auto f = fixture(name);
  const auto c = linen_test::fixture_config(f);
  const auto cfg = linen_test::config_from<T, P>(c);
  const linen::SelfAttention<T, P> attn(cfg);
  const auto vars = linen::io::load_attention(f, cfg);
  const Tensor<T, N> x = f.get<T, N>("inputs/q");
  Tensor<bool, N + 1> mask;
  linen::CallOptions<T> call;
  if (f.contains("mask")) {
    mask = f.get<bool, N + 1>("mask");
    call.mask = mask;
  }
  Tensor<T, N + 1> sown;
  if (f.contains("attention_weights")) {
    call.sow_weights = [&](linen::ArrayRef<T> w) {
      sown = linen::ConstTensorMap<T, N + 1>(w.data(), linen::to_dims<N + 1>(w.shape()));
    };
  }
  const Tensor<T, N> out = attn.apply(vars, x, call);
  const double err = rel_err(out, f.get<double, N>("output"));
  EXPECT_LE(err, linen_test::tolerance<T>()) << name;
  std::ostringstream os;
  os << err;
  ::testing::Test::RecordProperty("rel_err", os.str());
  if (f.contains("attention_weights")) {
    EXPECT_LE(rel_err(sown, f.get<double, N + 1>("attention_weights")), linen_test::tolerance<T>()) << name;
  }
}

template <class T, class P>
void run_self_any_rank(const std::string& name) {
  const auto rank = fixture(name).at("inputs/q").shape().size();
  if (rank == 2) run_self<T, P, 2>(name);
  else if (rank == 3) run_self<T, P, 3>(name);
  else if (rank == 4) run_self<T, P, 4>(name);
  else FAIL() << name << ": rank " << rank;
}

class SelfAttentionGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(SelfAttentionGolden, MatchesFlax) {
  const std::string name = GetParam();
  const auto c = linen_test::fixture_config(fixture(name));
  const std::string dt = linen_test::dtype_of_case(c), pdt = linen_test::param_dtype_of_case(c);
  if (dt == "float32" && pdt == "float32") run_self_any_rank<float, float>(name);
  else if (dt == "float64" && pdt == "float64") run_self_any_rank<double, double>(name);
  else if (dt == "bfloat16" && pdt == "float32") run_self_any_rank<Eigen::bfloat16, float>(name);
  else if (dt == "float16" && pdt == "float16") run_self_any_rank<Eigen::half, Eigen::half>(name);
  else FAIL() << name << ": dtype " << dt << " param_dtype " << pdt;
}

INSTANTIATE_TEST_SUITE_P(
    Flax, SelfAttentionGolden,
    ::testing::Values("self_basic", "self_qkv_out", "self_nobias", "self_causal", "self_padding_causal",
                      "self_fully_masked_rows", "self_mask_per_head", "self_mask_broadcast", "self_multibatch",
                      "self_nobatch", "self_normalize_qk", "self_large", "self_long", "self_sow_weights",
                      "self_grads_f32", "self_bf16", "self_bf16_fp32softmax", "self_f16", "self_f64_causal",
                      "self_f64_grads"),
    [](const auto& info) { return std::string(info.param); });

// Cross-attention: inputs_k (and inputs_v) distinct from inputs_q, other feature sizes.
class CrossAttentionGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(CrossAttentionGolden, MatchesFlax) {
  const std::string name = GetParam();
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::MultiHeadDotProductAttention<float> attn(cfg);
  const auto vars = linen::io::load_attention(f, cfg);
  const auto q = f.get<float, 3>("inputs/q"), k = f.get<float, 3>("inputs/k");
  const auto mask = f.get<bool, 4>("mask");
  linen::CallOptions<float> call;
  call.mask = mask;
  Tensor<float, 3> out;
  if (f.contains("inputs/v")) {
    const auto v = f.get<float, 3>("inputs/v");
    out = attn.apply(vars, q, k, v, call);
  } else {
    out = attn.apply(vars, q, k, call);
  }
  EXPECT_LE(rel_err(out, f.get<double, 3>("output")), linen_test::tolerance<float>()) << name;
}

INSTANTIATE_TEST_SUITE_P(Flax, CrossAttentionGolden,
                         ::testing::Values("cross_kv", "cross_k_v_distinct", "cross_normalize_qk_grads"),
                         [](const auto& info) { return std::string(info.param); });

// The same parameters through maps over caller memory, and through the four element
// types with param_dtype = float32 (Flax's promotion casts params to dtype).
TEST(SelfAttention, AcceptsMapsAndPromotesParams) {
  const auto f = fixture("self_causal");
  const auto cfg32 = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto x = f.get<float, 3>("inputs/q");
  const auto mask = f.get<bool, 4>("mask");
  const linen::ConstTensorMap<float, 3> xm(x.data(), x.dimensions());
  linen::CallOptions<float> call;
  call.mask = mask;
  const auto vars = linen::io::load_attention(f, cfg32);
  const Tensor<float, 3> out = linen::SelfAttention<float>(cfg32).apply(vars, xm, call);
  EXPECT_LE(rel_err(out, f.get<double, 3>("output")), 2e-6);

  const auto cfg64 = linen_test::config_from<double, float>(linen_test::fixture_config(f));
  linen::CallOptions<double> call64;
  call64.mask = mask;
  const Tensor<double, 3> out64 =
      linen::SelfAttention<double, float>(cfg64).apply(linen::io::load_attention(f, cfg64), x, call64);
  EXPECT_LE(rel_err(out64, f.get<double, 3>("output")), 2e-6);
}

// attention_fn: any callable with dot_product_attention's signature is called, and its
// result is what the out projection sees.
TEST(MultiHeadDotProductAttention, UserAttentionFnIsCalledAndUsed) {
  const auto f = fixture("self_basic");
  auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 3>("inputs/q");
  int calls = 0;
  Shape seen_q;
  cfg.attention_fn = [&](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                         const linen::AttentionOptions<float>& opt) {
    ++calls;
    seen_q = linen::shape_of(q);
    Tensor<float, 4> o = linen::dot_product_attention(q, k, v, opt);
    return Tensor<float, 4>(o.constant(0.0f));  // attend to nothing: the output is out/bias
  };
  const Tensor<float, 3> out = linen::SelfAttention<float>(cfg).apply(vars, x);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen_q, Shape({2, 5, 4, 4}));  // [batch, length, heads, head_dim]
  for (Index b = 0; b < out.dimension(0); ++b)
    for (Index i = 0; i < out.dimension(1); ++i)
      for (Index j = 0; j < out.dimension(2); ++j) EXPECT_FLOAT_EQ(out(b, i, j), vars.params.out.bias(j));

  // A free function works too.
  struct Free {
    static Tensor<float, 4> fn(const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                               const linen::AttentionOptions<float>& opt) {
      return linen::dot_product_attention(q, k, v, opt);
    }
  };
  cfg.attention_fn = &Free::fn;
  EXPECT_LE(rel_err(linen::SelfAttention<float>(cfg).apply(vars, x), f.get<double, 3>("output")), 2e-6);
}

// A mask whose batch dims mix 1s and full dims (neither a view of all-1 nor all-equal
// batch dims) is expanded correctly over the flattened batch.
TEST(MultiHeadDotProductAttention, MixedBatchBroadcastMask) {
  const auto f = fixture("self_multibatch");  // inputs [2, 3, 5, 8], heads 2
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 4>("inputs/q");
  Tensor<bool, 5> mixed(1, 3, 2, 5, 5);  // varies over batch dim 1 and heads only
  for (Index n = 0; n < mixed.size(); ++n) mixed.data()[n] = (n * 7919) % 5 != 0;
  for (Index i = 0; i < 5; ++i)
    for (Index b = 0; b < 3; ++b)
      for (Index h = 0; h < 2; ++h) mixed(0, b, h, i, 0) = true;
  linen::CallOptions<float> call;
  call.mask = mixed;
  const linen::SelfAttention<float> attn(cfg);
  const Tensor<float, 4> out = attn.apply(vars, x, call);
  // Reference: each batch entry on its own with its mask slice.
  for (Index a = 0; a < 2; ++a)
    for (Index b = 0; b < 3; ++b) {
      Tensor<float, 2> xi = x.chip(a, 0).chip(b, 0);
      Tensor<bool, 3> mi = mixed.chip(0, 0).chip(b, 0);
      linen::CallOptions<float> ci;
      ci.mask = mi;
      const Tensor<float, 2> oi = attn.apply(vars, xi, ci);
      const Tensor<float, 2> got = out.chip(a, 0).chip(b, 0);
      EXPECT_LE(rel_err(got, oi), 1e-6) << a << "," << b;
    }
}

TEST(MultiHeadDotProductAttention, ErrorsNameTheValues) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 3;
  cfg.qkv_features = 16;
  try {
    linen::SelfAttention<float> bad(cfg);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("SelfAttention: Memory dimension (16) must be divisible by number of heads (3)"),
              std::string::npos)
        << e.what();
  }
  cfg.qkv_features.reset();
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 4, 16);  // qkv_features defaults to 16: not divisible by 3
  x.setZero();
  EXPECT_THROW((void)attn.init(linen::random::key(0), x), std::invalid_argument);

  const auto f = fixture("self_basic");  // 16 features, 4 heads
  const auto cfg4 = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg4);
  Tensor<float, 3> x12(2, 5, 12);
  x12.setZero();
  try {
    (void)linen::SelfAttention<float>(cfg4).apply(vars, x12);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("query/kernel has shape (16, 4, 4), inputs of shape (2, 5, 12) need (12, 4, 3)"),
              std::string::npos)
        << e.what();
  }
  Tensor<bool, 4> bad_mask(2, 1, 5, 4);
  bad_mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = bad_mask;
  const auto x16 = f.get<float, 3>("inputs/q");
  try {
    (void)linen::SelfAttention<float>(cfg4).apply(vars, x16, call);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("mask of shape (2, 1, 5, 4) does not broadcast to shape (2, 4, 5, 5)"),
              std::string::npos)
        << e.what();
  }
}

TEST(LoadAttention, MissingOrMisshapenTensorsNameThePath) {
  auto f = fixture("self_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  auto missing = f;
  missing.erase("params/value/bias");
  try {
    (void)linen::io::load_attention(missing, cfg);
    FAIL();
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("params/value/bias"), std::string::npos) << e.what();
  }
  auto wrong = f;
  wrong.set("params/out/bias", Tensor<float, 1>(Tensor<float, 1>(15).setZero()));
  try {
    (void)linen::io::load_attention(wrong, cfg);
    FAIL();
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("params/out/bias"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(16,)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(15,)"), std::string::npos) << e.what();
  }
  auto heads = cfg;
  heads.num_heads = 2;
  EXPECT_THROW((void)linen::io::load_attention(f, heads), linen::io_error);
}

// A submodule of a bigger model binds by path, and store_attention writes Flax's paths
// back (a round trip through safetensors bytes).
TEST(LoadAttention, BindsUnderAModulePathAndRoundTrips) {
  const auto f = fixture("self_qkv_out");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  linen::io::Variables model;
  linen::io::store_attention(model, vars, cfg, "encoder/layers_0/attn");
  EXPECT_TRUE(model.contains("params/encoder/layers_0/attn/query/kernel"));
  EXPECT_TRUE(model.contains("params/encoder/layers_0/attn/out/bias"));
  const auto bytes = linen::io::to_safetensors(model);
  const auto back = linen::io::parse_safetensors(bytes.data(), bytes.size());
  const auto again = linen::io::load_attention(back, cfg, "encoder/layers_0/attn");
  const auto x = f.get<float, 3>("inputs/q");
  const linen::SelfAttention<float> attn(cfg);
  EXPECT_EQ(rel_err(attn.apply(again, x), attn.apply(vars, x)), 0.0);
  EXPECT_THROW((void)linen::io::load_attention(back, cfg, "encoder/layers_1/attn"), linen::io_error);
}

// The parameter-shape rule lives once (AttentionParamShapes): init makes those shapes,
// apply checks them, and load_attention reads a checkpoint by them (so a config that
// disagrees with a checkpoint fails at load, naming the path, not at the first apply).
TEST(ParamShapes, OneRuleForInitApplyAndLoad) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.qkv_features = 8;
  cfg.out_features = 6;
  cfg.normalize_qk = true;
  const linen::MultiHeadAttention<float> attn(cfg);  // Flax's alias
  static_assert(std::is_same_v<linen::MultiHeadAttention<float>, linen::MultiHeadDotProductAttention<float>>);
  const auto s = attn.param_shapes(10, 7, 5);
  EXPECT_EQ(s.head_dim, 4);
  EXPECT_EQ(s.query_kernel, Shape({10, 2, 4}));
  EXPECT_EQ(s.key_kernel, Shape({7, 2, 4}));
  EXPECT_EQ(s.value_kernel, Shape({5, 2, 4}));
  EXPECT_EQ(s.qkv_bias, Shape({2, 4}));
  EXPECT_EQ(s.out_kernel, Shape({2, 4, 6}));
  EXPECT_EQ(s.out_bias, Shape({6}));
  EXPECT_EQ(s.ln_scale, Shape({4}));
  Tensor<float, 3> q(1, 3, 10), k(1, 4, 7), v(1, 4, 5);
  q.setConstant(0.5f);
  k.setConstant(-0.25f);
  v.setConstant(1.0f);
  const auto vars = attn.init(linen::random::key(0), q, k, v);
  const auto& p = vars.params;
  EXPECT_EQ(linen::shape_of(p.query.kernel), s.query_kernel);
  EXPECT_EQ(linen::shape_of(p.key.kernel), s.key_kernel);
  EXPECT_EQ(linen::shape_of(p.value.kernel), s.value_kernel);
  EXPECT_EQ(linen::shape_of(p.out.kernel), s.out_kernel);
  EXPECT_EQ(linen::shape_of(p.key_ln.scale), s.ln_scale);
  // apply takes the variables or, as Flax's mod.apply({'params': p}, ...), the params.
  EXPECT_EQ(rel_err(attn.apply(p, q, k, v), attn.apply(vars, q, k, v)), 0.0);
  const linen::SelfAttention<float> self(cfg);
  const auto sv = self.init(linen::random::key(1), q);
  EXPECT_EQ(rel_err(self.apply(sv.params, q), self.apply(sv, q)), 0.0);
  // load_attention: the stored kernels give the input widths, the rule the rest.
  linen::io::Variables saved;
  linen::io::store_attention(saved, vars, cfg);
  EXPECT_EQ(rel_err(attn.apply(linen::io::load_attention(saved, cfg), q, k, v), attn.apply(vars, q, k, v)), 0.0);
  auto no_out = cfg;
  no_out.out_features.reset();  // out_features would be 10 (inputs_q's): the file has 6
  try {
    (void)linen::io::load_attention(saved, no_out);
    FAIL() << "no exception";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("params/out/kernel: shape (2, 4, 6) gives out_features 6, the config says none "
                                         "(out_features = in_features = 10)"),
              std::string::npos)
        << e.what();
  }
  auto no_qkv = cfg;
  no_qkv.qkv_features.reset();  // qkv_features would be 10 (inputs_q's): the file has 2 * 4
  try {
    (void)linen::io::load_attention(saved, no_qkv);
    FAIL() << "no exception";
  } catch (const linen::io_error& e) {
    EXPECT_NE(std::string(e.what()).find("params/query/kernel: shape (10, 2, 4) gives qkv_features 8, the config says "
                                         "none (qkv_features = in_features = 10)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace

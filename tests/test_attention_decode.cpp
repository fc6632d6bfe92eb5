// SPDX-License-Identifier: Apache-2.0
// The module's state and randomness: decode cache (decode_*, msgpack_*.safetensors),
// dropout (dropout_*), init (init_*, statistics of the built-in initializers).
#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "attention_fixture.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::fixture;
using linen_test::rel_err;

// ---------------------------------------------------------------------------------------
// Decode

// Feeds inputs/q one position at a time from `start`, comparing each step with
// decode/outputs, then the final cache with cache/*.
void decode_and_check(const std::string& name, linen::SelfAttention<float>::Variables vars, Index start) {
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");
  const auto expected = f.get<float, 3>("decode/outputs");
  Tensor<bool, 4> kpm;
  linen::CallOptions<float> call;
  if (f.contains("decode/key_padding_mask")) {
    kpm = f.get<bool, 4>("decode/key_padding_mask");
    call.mask = kpm;
  }
  const Index steps = std::stoi(f.metadata.at("steps"));
  ASSERT_EQ(vars.cache->cache_index, start);
  for (Index i = start; i < steps; ++i) {
    const Tensor<float, 3> out = attn.apply(vars, linen_test::position(x, i), call);
    EXPECT_LE(rel_err(out, linen_test::position(expected, i)), 2e-6) << name << " step " << i;
  }
  EXPECT_EQ(vars.cache->cache_index, steps);
  const auto want = linen::io::load_attention(f, cfg);  // the cache Flax had after the last step
  ASSERT_TRUE(want.cache.has_value());
  EXPECT_EQ(want.cache->cache_index, steps);
  EXPECT_LE(rel_err(vars.cache->cached_key, want.cache->cached_key), 2e-6) << name;
  EXPECT_LE(rel_err(vars.cache->cached_value, want.cache->cached_value), 2e-6) << name;
  EXPECT_EQ(vars.cache->batch, want.cache->batch);
}

class DecodeGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(DecodeGolden, StepsEqualFlaxAndTheFullCausalPass) {
  const std::string name = GetParam();
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  ASSERT_TRUE(cfg.decode);
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");
  // init as Flax's init does: a zero cache sized by the inputs.
  auto vars = attn.init(linen::random::key(0), x);
  ASSERT_TRUE(vars.cache.has_value());
  EXPECT_EQ(vars.cache->max_length(), x.dimension(1));
  vars.params = linen::io::load_attention(f, cfg).params;
  decode_and_check(name, vars, 0);

  // Flax's `output`: the same parameters without decode, causal (+ padding) mask, equals
  // the step outputs.
  auto full_cfg = cfg;
  full_cfg.decode = false;
  Tensor<float, 2> ones(x.dimension(0), x.dimension(1));
  ones.setConstant(1.0f);
  const auto causal = linen::make_causal_mask(ones);
  Tensor<bool, 4> kpm;
  if (f.contains("decode/key_padding_mask")) kpm = f.get<bool, 4>("decode/key_padding_mask");
  const auto m = linen::combine_masks(causal, f.contains("decode/key_padding_mask") ? &kpm : nullptr);
  linen::CallOptions<float> call;
  call.mask = *m;
  const linen::SelfAttention<float>::Variables full_vars{vars.params, std::nullopt};
  const Tensor<float, 3> full = linen::SelfAttention<float>(full_cfg).apply(full_vars, x, call);
  EXPECT_LE(rel_err(full, f.get<double, 3>("output")), 2e-6);
  EXPECT_LE(rel_err(full, f.get<double, 3>("decode/outputs")), 2e-6);
}

INSTANTIATE_TEST_SUITE_P(Flax, DecodeGolden, ::testing::Values("decode_basic", "decode_padding_mask", "decode_resume"),
                         [](const auto& info) { return std::string(info.param); });

TEST(Decode, ResumesFromACacheLoadedMidSequence) {
  const auto f = fixture("decode_resume");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const Index resume_at = std::stoi(f.metadata.at("resume_at"));
  // Bind params + the cache as it stood before step `resume_at`.
  linen::io::Variables v;
  v.merge("params", f.subtree("params"));
  v.merge("cache", f.subtree("resume_cache"));
  const auto vars = linen::io::load_attention(v, cfg);
  ASSERT_TRUE(vars.cache.has_value());
  EXPECT_EQ(vars.cache->cache_index, resume_at);
  decode_and_check("decode_resume", vars, resume_at);
}

TEST(Decode, MsgpackTwinsStepFourEqualsNextOutput) {
  {
    const auto f = fixture("msgpack_f32");
    const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
    auto vars = linen::io::load_attention(f, cfg);
    EXPECT_EQ(vars.cache->cache_index, 3);
    const auto x = f.get<float, 3>("inputs/q");
    const Tensor<float, 3> out = linen::SelfAttention<float>(cfg).apply(vars, linen_test::position(x, 3));
    EXPECT_LE(rel_err(out, f.get<double, 3>("next_output")), 2e-6);
    EXPECT_EQ(vars.cache->cache_index, 4);
  }
  {
    using bf16 = Eigen::bfloat16;
    const auto f = fixture("msgpack_bf16");
    const auto cfg = linen_test::config_from<bf16, bf16>(linen_test::fixture_config(f));
    auto vars = linen::io::load_attention(f, cfg);
    const auto x = f.get<float, 3>("inputs/q");
    const Tensor<bf16, 3> out = linen::SelfAttention<bf16>(cfg).apply(vars, linen_test::position(x, 3));
    EXPECT_LE(rel_err(out, f.get<double, 3>("next_output")), 2e-2);
  }
}

TEST(Decode, QueryLengthOtherThanOneThrowsWithTheExpectedShape) {
  const auto f = fixture("decode_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");  // [2, 8, 16], 4 heads
  auto vars = attn.init(linen::random::key(1), x);
  try {
    (void)attn.apply(vars, x);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("expected query shape (2, 1, 4, 4) instead got (2, 8, 4, 4)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(vars.cache->cache_index, 0);
  const linen::SelfAttention<float>::Variables& cvars = vars;
  EXPECT_THROW((void)attn.apply(cvars, linen_test::position(x, 0)), std::invalid_argument);  // needs mutable
}

TEST(Decode, FullCacheThrowsAndLeavesTheCacheUnchanged) {
  const auto f = fixture("decode_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");
  auto vars = linen::io::load_attention(f, cfg);  // the cache after all 8 steps: full
  ASSERT_EQ(vars.cache->cache_index, vars.cache->max_length());
  const auto before = *vars.cache;
  EXPECT_THROW((void)attn.apply(vars, linen_test::position(x, 0)), linen::cache_overflow);
  EXPECT_EQ(vars.cache->cache_index, before.cache_index);
  EXPECT_EQ(rel_err(vars.cache->cached_key, before.cached_key), 0.0);
  EXPECT_EQ(rel_err(vars.cache->cached_value, before.cached_value), 0.0);
}

TEST(Decode, SeparateCachesShareOneParameterSet) {
  const auto f = fixture("decode_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto params = linen::io::load_attention(f, cfg).params;
  const auto x = f.get<float, 3>("inputs/q");
  const auto expected = f.get<float, 3>("decode/outputs");
  auto c1 = attn.init_cache(params, {2}, 8), c2 = attn.init_cache(params, {2}, 8);
  for (Index i = 0; i < 8; ++i) {
    const auto o1 = attn.apply(params, c1, linen_test::position(x, i));
    if (i % 2 == 0) (void)attn.apply(params, c2, linen_test::position(x, i / 2));
    EXPECT_LE(rel_err(o1, linen_test::position(expected, i)), 2e-6);
  }
  EXPECT_EQ(c1.cache_index, 8);
  EXPECT_EQ(c2.cache_index, 4);
}

// ---------------------------------------------------------------------------------------
// Dropout

class DropoutGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(DropoutGolden, InjectedKeepMaskReproducesFlax) {
  const std::string name = GetParam();
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  ASSERT_GT(cfg.dropout_rate, 0.0);
  const linen::SelfAttention<float> attn(cfg);
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 3>("inputs/q");
  const auto keep = f.get<bool, 4>("dropout/keep");

  linen::CallOptions<float> det;
  det.deterministic = true;
  EXPECT_LE(rel_err(attn.apply(vars, x, det), f.get<double, 3>("output_deterministic")), 2e-6);

  linen::CallOptions<float> call;
  call.deterministic = false;
  int draws = 0;
  call.dropout_rng = [&](double keep_prob, const Shape& shape, bool* out) {
    ++draws;
    EXPECT_DOUBLE_EQ(keep_prob, 1.0 - cfg.dropout_rate);
    EXPECT_EQ(shape, linen::shape_of(keep));  // Flax's own shape: (1, 1, L, L) or (B, H, L, L)
    std::copy(keep.data(), keep.data() + keep.size(), out);
  };
  EXPECT_LE(rel_err(attn.apply(vars, x, call), f.get<double, 3>("output")), 2e-6);
  EXPECT_EQ(draws, 1);
}

// With the JAX key Flax used (dropout/key_data = key(42)), the keep mask and the output
// are Flax's, bit for bit in the mask.
TEST_P(DropoutGolden, JaxKeyReproducesFlax) {
  const std::string name = GetParam();
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 3>("inputs/q");
  const auto key_data = f.get<std::uint32_t, 1>("dropout/key_data");
  const auto key = linen::random::wrap_key_data({key_data(0), key_data(1)});
  EXPECT_EQ(key, linen::random::key(std::stoull(f.metadata.at("dropout_seed"))));
  const auto keep = f.get<bool, 4>("dropout/keep");
  std::vector<char> drawn;
  linen::CallOptions<float> call;
  call.deterministic = false;
  call.dropout_rng = [&](double p, const Shape& shape, bool* out) {
    key.bernoulli(p, shape, out);
    drawn.assign(out, out + linen::num_elements(shape));
  };
  (void)linen::SelfAttention<float>(cfg).apply(vars, x, call);
  ASSERT_EQ(drawn.size(), static_cast<std::size_t>(keep.size()));
  for (Index i = 0; i < keep.size(); ++i) EXPECT_EQ(bool(drawn[i]), keep.data()[i]) << i;
  call.dropout_rng = key;
  EXPECT_LE(rel_err(linen::SelfAttention<float>(cfg).apply(vars, x, call), f.get<double, 3>("output")), 2e-6);
}

INSTANTIATE_TEST_SUITE_P(Flax, DropoutGolden, ::testing::Values("dropout_broadcast", "dropout_full"),
                         [](const auto& info) { return std::string(info.param); });

TEST(Dropout, DeterministicMergesLikeFlax) {
  const auto f = fixture("dropout_full");
  auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto vars = linen::io::load_attention(f, cfg);
  const auto x = f.get<float, 3>("inputs/q");
  linen::CallOptions<float> call;
  EXPECT_THROW((void)linen::SelfAttention<float>(cfg).apply(vars, x, call), std::invalid_argument);  // neither
  call.deterministic = false;
  EXPECT_THROW((void)linen::SelfAttention<float>(cfg).apply(vars, x, call), std::invalid_argument);  // no rng
  cfg.deterministic = true;
  EXPECT_THROW((void)linen::SelfAttention<float>(cfg).apply(vars, x, call), std::invalid_argument);  // both
  call.deterministic.reset();
  EXPECT_LE(rel_err(linen::SelfAttention<float>(cfg).apply(vars, x, call), f.get<double, 3>("output_deterministic")),
            2e-6);
  // Without dropout deterministic is not needed at all (Flax: m_deterministic = True).
  auto no_drop = cfg;
  no_drop.dropout_rate = 0.0;
  no_drop.deterministic.reset();
  EXPECT_LE(rel_err(linen::SelfAttention<float>(no_drop).apply(vars, x), f.get<double, 3>("output_deterministic")),
            2e-6);
}

TEST(Dropout, BuiltInSourcesKeepAtTheRate) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.dropout_rate = 0.25;
  cfg.broadcast_dropout = false;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(4, 32, 8);
  x.setRandom();
  const auto vars = attn.init(linen::random::key(3), x);
  std::mt19937 engine(5);
  for (int source = 0; source < 2; ++source) {
    linen::CallOptions<float> call;
    call.deterministic = false;
    Index kept = 0, total = 0;
    if (source == 0) {
      call.dropout_rng = engine;
    } else {
      call.dropout_rng = linen::random::key(42);
    }
    call.sow_weights = [](linen::ArrayRef<float>) {};
    // Count kept entries through the weights: dropped ones are exactly 0.
    auto counting = call;
    const linen::DropoutRng inner = call.dropout_rng;
    counting.dropout_rng = [&](double p, const Shape& s, bool* keep) {
      inner(p, s, keep);
      for (Index i = 0; i < linen::num_elements(s); ++i) kept += keep[i];
      total += linen::num_elements(s);
    };
    (void)attn.apply(vars, x, counting);
    EXPECT_EQ(total, 4 * 2 * 32 * 32);
    EXPECT_NEAR(double(kept) / double(total), 0.75, 0.02) << "source " << source;  // sd 0.0048
  }
}

// ---------------------------------------------------------------------------------------
// init

// Flax's Module.init(jax.random.key(seed), inputs) reproduced bit for bit (1e-6).
class InitGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(InitGolden, ParamsEqualFlaxInitForTheSameSeed) {
  const std::string name = GetParam();
  const auto f = fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const auto seed = std::stoull(f.metadata.at("init_seed"));
  const auto x = f.get<float, 3>("inputs/q");
  const auto made = linen::SelfAttention<float>(cfg).init(linen::random::key(seed), x);
  const auto want = linen::io::load_attention(f, cfg);
  const auto& a = made.params;
  const auto& b = want.params;
  for (auto [nm, pa, pb] : {std::tuple{"query", &a.query, &b.query}, std::tuple{"key", &a.key, &b.key},
                            std::tuple{"value", &a.value, &b.value}}) {
    EXPECT_LE(rel_err(pa->kernel, pb->kernel), 1e-6) << nm;
    EXPECT_EQ(rel_err(pa->kernel, pb->kernel), 0.0) << nm << ": 0 ulp (the module's init is Flax's, bit for bit)";
    EXPECT_EQ(rel_err(pa->bias, pb->bias), 0.0) << nm;
  }
  EXPECT_LE(rel_err(a.out.kernel, b.out.kernel), 1e-6);
  EXPECT_EQ(rel_err(a.out.kernel, b.out.kernel), 0.0);
  EXPECT_EQ(rel_err(a.out.bias, b.out.bias), 0.0);
  if (cfg.normalize_qk) {
    EXPECT_EQ(rel_err(a.query_ln.scale, b.query_ln.scale), 0.0);
    EXPECT_EQ(rel_err(a.key_ln.scale, b.key_ln.scale), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Flax, InitGolden, ::testing::Values("init_default", "init_qkv_out_normqk"),
                         [](const auto& info) { return std::string(info.param); });

// A module inside a larger one draws from the scope its parent pushed for it. Flax's rule
// (flax/core/scope.py, Flax 0.12): Scope.push(name) appends `name` to every rng's suffix
// (LazyRng.create(rng, name)) and gives the child scope fresh counters; make_rng('params')
// increments the scope's counter c and returns LazyRng.create(rng, c).as_jax_rng(), i.e.
// _fold_in_static(root, path + (c,)): one SHA-1 over the path's names and the counter,
// folded into the root key. A linen Module's submodule is the scope pushed with its name,
// and self.param draws make_rng('params') in declaration order. So in
//   class Layer(nn.Module):   # at encoder/layers_0 of the model
//     def __call__(self, x): return nn.SelfAttention(..., name='attn')(x)
// Model().init(key, x) makes attn's query/kernel lecun_normal(_fold_in_static(key,
// ("encoder", "layers_0", "attn", "query", 1)), (in, heads * head_dim)), its query/bias
// from counter 2, then key, value, query_ln, key_ln, out likewise; attn draws nothing itself.
TEST(Init, NestedModuleDrawsTheKeysFlaxDerivesForItsPath) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.qkv_features = 8;
  cfg.out_features = 6;
  cfg.normalize_qk = true;
  cfg.bias_init = linen::initializers::normal{0.3};  // so that each bias key shows
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 3, 10);
  x.setZero();
  const linen::random::Key root = linen::random::key(7);
  linen::random::RngScope scope = linen::random::RngScope(root).push("encoder").push("layers_0").push("attn");
  const auto vars = attn.init(scope, x);
  EXPECT_EQ(scope.counter(), 0u);  // the attention module itself draws no parameter
  const std::vector<std::string> path = {"encoder", "layers_0", "attn"};
  const auto flax_key = [&](const std::string& sub, std::uint64_t counter) {
    std::vector<std::string> p = path;
    p.push_back(sub);
    return linen::random::flax_rng(root, p, counter);
  };
  const auto draw = [](const linen::initializers::Initializer<float>& init, linen::random::Key k, const Shape& s) {
    std::vector<float> out(static_cast<std::size_t>(linen::num_elements(s)));
    init(k, s, out.data());
    return out;
  };
  const auto same = [](const auto& t, const std::vector<float>& want) {
    return t.size() == static_cast<Index>(want.size()) &&
           std::memcmp(t.data(), want.data(), sizeof(float) * want.size()) == 0;
  };
  const auto& p = vars.params;
  for (auto [name, d] : {std::pair{"query", &p.query}, std::pair{"key", &p.key}, std::pair{"value", &p.value}}) {
    EXPECT_TRUE(same(d->kernel, draw(linen::initializers::lecun_normal(), flax_key(name, 1), {10, 8}))) << name;
    EXPECT_TRUE(same(d->bias, draw(cfg.bias_init, flax_key(name, 2), {8}))) << name;
  }
  EXPECT_TRUE(same(p.out.kernel, draw(linen::initializers::lecun_normal(), flax_key("out", 1), {8, 6})));
  EXPECT_TRUE(same(p.out.bias, draw(cfg.bias_init, flax_key("out", 2), {6})));
  EXPECT_TRUE(same(p.query_ln.scale, std::vector<float>(4, 1.0f)));
  // The same scope as a temporary, and a top-level init(key) = the root scope (empty path).
  const auto again = attn.init(linen::random::RngScope(root).push("encoder").push("layers_0").push("attn"), x);
  EXPECT_TRUE(same(again.params.value.kernel, draw(linen::initializers::lecun_normal(), flax_key("value", 1), {10, 8})));
  const auto top = attn.init(root, x);
  const auto top_scope = attn.init(linen::random::RngScope(root), x);
  EXPECT_TRUE(same(top.params.query.kernel,
                   draw(linen::initializers::lecun_normal(), linen::random::flax_rng(root, {"query"}, 1), {10, 8})));
  EXPECT_EQ(rel_err(top.params.out.kernel, top_scope.params.out.kernel), 0.0);
  EXPECT_GT(rel_err(top.params.query.kernel, vars.params.query.kernel), 0.0);  // the path matters
}

double stddev(const float* p, Index n) {
  double m = 0, m2 = 0;
  for (Index i = 0; i < n; ++i) {
    m += p[i];
    m2 += double(p[i]) * p[i];
  }
  m /= double(n);
  return std::sqrt(m2 / double(n) - m * m);
}

TEST(Init, ShapesZeroBiasesUnitScalesAndKernelScale) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 8;
  cfg.qkv_features = 256;
  cfg.out_features = 96;
  cfg.normalize_qk = true;
  const linen::MultiHeadDotProductAttention<float> attn(cfg);
  Tensor<float, 3> q(2, 3, 128), k(2, 5, 64), v(2, 5, 32);
  q.setZero();
  k.setZero();
  v.setZero();
  std::mt19937_64 engine(11);  // an ordinary engine works as the init rng too
  const auto vars = attn.init(engine, q, k, v);
  const auto& p = vars.params;
  EXPECT_EQ(linen::shape_of(p.query.kernel), Shape({128, 8, 32}));
  EXPECT_EQ(linen::shape_of(p.key.kernel), Shape({64, 8, 32}));
  EXPECT_EQ(linen::shape_of(p.value.kernel), Shape({32, 8, 32}));
  EXPECT_EQ(linen::shape_of(p.out.kernel), Shape({8, 32, 96}));
  EXPECT_EQ(linen::shape_of(p.query.bias), Shape({8, 32}));
  EXPECT_EQ(linen::shape_of(p.out.bias), Shape({96}));
  EXPECT_EQ(linen::shape_of(p.query_ln.scale), Shape({32}));
  for (Index i = 0; i < p.query.bias.size(); ++i) EXPECT_EQ(p.query.bias.data()[i], 0.0f);
  for (Index i = 0; i < p.out.bias.size(); ++i) EXPECT_EQ(p.out.bias.data()[i], 0.0f);
  for (Index i = 0; i < 32; ++i) EXPECT_EQ(p.key_ln.scale(i), 1.0f);
  EXPECT_FALSE(vars.cache.has_value());
  // lecun_normal: std = 1/sqrt(fan_in), fan_in = input features (q/k/v), heads*head_dim (out).
  // n >= 8192 draws: the sample std is within 3% of its value with overwhelming probability.
  const std::pair<const Tensor<float, 3>*, double> kernels[] = {
      {&p.query.kernel, 128}, {&p.key.kernel, 64}, {&p.value.kernel, 32}, {&p.out.kernel, 256}};
  for (const auto& [t, fan_in] : kernels)
    EXPECT_NEAR(stddev(t->data(), t->size()) * std::sqrt(fan_in), 1.0, 0.03) << linen::to_string(linen::shape_of(*t));
  // Different parameters get different keys.
  EXPECT_NE(p.query.kernel(0, 0, 0), p.key.kernel(0, 0, 0));

  // Custom initializers: out_kernel_init / out_bias_init apply to `out` only.
  auto cfg2 = cfg;
  cfg2.kernel_init = linen::initializers::glorot_uniform();
  cfg2.out_kernel_init = linen::initializers::zeros();
  cfg2.out_bias_init = linen::initializers::ones();
  cfg2.bias_init = [](linen::random::Key, const Shape& s, float* out) {
    for (Index i = 0; i < linen::num_elements(s); ++i) out[i] = 0.5f;
  };
  const auto v2 = linen::MultiHeadDotProductAttention<float>(cfg2).init(linen::random::key(0), q, k, v);
  for (Index i = 0; i < v2.params.out.kernel.size(); ++i) EXPECT_EQ(v2.params.out.kernel.data()[i], 0.0f);
  for (Index i = 0; i < v2.params.out.bias.size(); ++i) EXPECT_EQ(v2.params.out.bias.data()[i], 1.0f);
  for (Index i = 0; i < v2.params.value.bias.size(); ++i) EXPECT_EQ(v2.params.value.bias.data()[i], 0.5f);
  // glorot_uniform: bound sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (128 + 256)).
  const double bound = std::sqrt(6.0 / (128 + 256));
  float mx = 0;
  for (Index i = 0; i < v2.params.query.kernel.size(); ++i) mx = std::max(mx, std::abs(v2.params.query.kernel.data()[i]));
  EXPECT_LE(mx, bound);
  EXPECT_GT(mx, 0.95 * bound);
}

TEST(Init, DecodeMakesAZeroCacheSizedByTheInputs) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.decode = true;
  Tensor<float, 4> x(2, 3, 7, 4);  // two batch dims
  x.setZero();
  const auto vars = linen::SelfAttention<float>(cfg).init(linen::random::key(0), x);
  ASSERT_TRUE(vars.cache.has_value());
  EXPECT_EQ(vars.cache->batch, Shape({2, 3}));
  EXPECT_EQ(linen::shape_of(vars.cache->cached_key), Shape({6, 7, 2, 2}));
  EXPECT_EQ(vars.cache->cache_index, 0);
  linen::io::Variables saved;
  linen::io::store_attention(saved, vars, cfg);
  EXPECT_EQ(saved.at("cache/cached_key").shape(), Shape({2, 3, 7, 2, 2}));  // Flax's layout
  EXPECT_EQ(saved.at("cache/cache_index").shape(), Shape({}));
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// Misuse: every documented runtime error path not already covered by the per-header
// tests throws the documented type (std::invalid_argument for shapes and arguments,
// linen::io_error for files and checkpoints, linen::cache_overflow for a full decode
// cache) with a message naming the shape, path or value at fault; and a failed decode
// step leaves the cache unchanged, byte for byte.
//
// Covered elsewhere, not repeated here: dot_product_attention's q/k/v shape mismatches,
// mask and bias broadcasting, missing dropout_rng and bad dropout_rate
// (test_dot_product_attention.cpp: ShapeErrorsNameTheShapes, DropoutErrors); the fused
// path's mask error and Fused + sow_weights (test_fused_attention.cpp: FusedDispatch.*);
// SelfAttention's "Memory dimension" constructor error, query/kernel against the input
// width and the module's mask broadcast (test_attention.cpp: ErrorsNameTheValues); missing
// or misshapen checkpoint tensors and wrong module paths (test_attention.cpp: LoadAttention.*,
// test_checkpoints.cpp: MismatchesNameThePathAndBothShapes); decode query length != 1, a
// full cache loaded from Flax, const variables with decode=true
// (test_attention_decode.cpp: Decode.*); the three-way deterministic merge (types only,
// test_attention_decode.cpp: Dropout.DeterministicMergesLikeFlax); msgpack file errors
// (test_msgpack.cpp: MsgpackFiles.FileErrorsNameTheFile); malformed files
// (test_safetensors.cpp, test_msgpack.cpp); random and initializer arguments
// (test_random.cpp, test_initializers.cpp); make_attention_mask batch dims (test_mask.cpp).
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <linen/io/checkpoint.hpp>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include "attention_fixture.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::fixture;

// Runs f, which must throw an E (or a type derived from it) whose message contains every
// needle.
template <class E, class F>
::testing::AssertionResult throws(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const E& e) {
    const std::string what = e.what();
    for (const std::string& n : needles)
      if (what.find(n) == std::string::npos)
        return ::testing::AssertionFailure() << "the message lacks \"" << n << "\": " << what;
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "expected " << typeid(E).name() << ", got " << typeid(e).name() << ": "
                                         << e.what();
  }
  return ::testing::AssertionFailure() << "nothing was thrown";
}

template <class T, int N>
Tensor<T, N> filled(const Shape& shape, std::uint32_t seed) {
  Tensor<T, N> t(linen::to_dims<N>(shape));
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(nd(g));
  return t;
}

// ---------------------------------------------------------------------------------------
// dot_product_attention and ArrayRef

TEST(MisuseDotProductAttention, UnknownImplementationNamesTheValue) {
  const auto q = filled<float, 4>({1, 2, 1, 4}, 1);
  linen::AttentionOptions<float> o;
  o.implementation = static_cast<linen::Implementation>(7);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)linen::dot_product_attention(q, q, q, o); },
                                            {"dot_product_attention: unknown Implementation 7"}));
}

TEST(MisuseDotProductAttention, BiasAndMaskThatDoNotBroadcastOnEveryPath) {
  const auto q = filled<float, 4>({2, 3, 4, 8}, 1), k = filled<float, 4>({2, 5, 4, 8}, 2);
  const auto v = filled<float, 4>({2, 5, 4, 6}, 3);
  const Tensor<float, 4> bias = filled<float, 4>({2, 4, 3, 4}, 4);  // kv length 4, not 5
  for (auto impl : {linen::Implementation::Reference, linen::Implementation::Fused}) {
    linen::AttentionOptions<float> o;
    o.implementation = impl;
    o.bias = bias;
    EXPECT_TRUE(throws<std::invalid_argument>(
        [&] { (void)linen::dot_product_attention(q, k, v, o); },
        {"dot_product_attention: bias of shape (2, 4, 3, 4) does not broadcast to shape (2, 4, 3, 5)"}));
  }
  // Two batch dims: a mask whose trailing dims fit but whose batch dim does not.
  const auto q5 = filled<float, 5>({2, 3, 5, 2, 4}, 5);
  Tensor<bool, 4> mask(2, 2, 1, 1);
  mask.setConstant(true);
  linen::AttentionOptions<float> o;
  o.mask = mask;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)linen::dot_product_attention_weights(q5, q5, o); },
      {"dot_product_attention_weights: mask of shape (2, 2, 1, 1) does not broadcast to shape (2, 3, 2, 5, 5)"}));
}

TEST(MisuseDotProductAttention, WeightsFunctionNamesItselfInDropoutErrors) {
  const auto q = filled<float, 4>({1, 2, 1, 4}, 1);
  linen::AttentionOptions<float> o;
  o.dropout_rate = 1.0;
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)linen::dot_product_attention_weights(q, q, o); },
                                    {"dot_product_attention_weights: dropout_rate must be in [0, 1), got 1.0"}));
  o.dropout_rate = 0.25;
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)linen::dot_product_attention_weights(q, q, o); },
                                    {"dot_product_attention_weights: dropout_rate=0.25", "needs a dropout_rng"}));
}

// An ArrayRef over caller memory: null data under a non-empty shape is refused at once;
// a shape with a negative or huge dim (over real data) is refused where it is used, since
// it broadcasts to no weights shape.
TEST(MisuseArrayRef, NullDataAndShapesThatFitNoWeights) {
  EXPECT_TRUE(throws<std::invalid_argument>(
      [] {
        linen::ArrayRef<float> r(nullptr, {2, 3});
      },
      {"ArrayRef of shape (2, 3) over null data"}));
  EXPECT_TRUE(throws<std::invalid_argument>(
      [] {
        linen::ArrayRef<bool> r(nullptr, {2, -1});
      },
      {"negative dimension in shape (2, -1)"}));
  EXPECT_TRUE(throws<std::overflow_error>(
      [] {
        linen::ArrayRef<bool> r(nullptr, {Index{1} << 40, Index{1} << 40});
      },
      {"element count of shape (1099511627776, 1099511627776) overflows"}));
  const auto q = filled<float, 4>({1, 2, 1, 4}, 1);
  const bool m[4] = {true, true, true, true};
  for (const Shape& bad : {Shape{2, -1}, Shape{Index{1} << 40, Index{1} << 40}}) {
    linen::AttentionOptions<float> o;
    o.mask = linen::ArrayRef<bool>(m, bad);
    EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)linen::dot_product_attention(q, q, q, o); },
                                              {"mask of shape " + linen::to_string(bad) + " does not broadcast"}));
  }
  // An empty view over null data is fine (nothing is read); a default one is None.
  const linen::ArrayRef<float> empty(nullptr, {0, 3});
  EXPECT_TRUE(empty.has_value());
  EXPECT_FALSE(linen::ArrayRef<float>().has_value());
}

TEST(MisuseMasks, CombineMasksNamesBothShapes) {
  Tensor<bool, 3> a(2, 3, 4), b(2, 3, 5);
  a.setConstant(true);
  b.setConstant(true);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)linen::combine_masks(a, b); },
                                            {"combine_masks", "(2, 3, 4)", "(2, 3, 5)"}));
}

// ---------------------------------------------------------------------------------------
// Module configuration: checked in the constructor, named after the module.

TEST(MisuseModuleConfig, EveryFieldIsCheckedAndNamed) {
  using MHA = linen::MultiHeadDotProductAttention<float>;
  using Self = linen::SelfAttention<float>;
  linen::AttentionConfig<float> c;
  c.num_heads = 0;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { MHA m(c); },
                                            {"MultiHeadDotProductAttention: num_heads must be positive, got 0"}));
  c.num_heads = -2;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { Self m(c); }, {"SelfAttention: num_heads must be positive, got -2"}));
  c.num_heads = 4;
  c.qkv_features = 0;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { MHA m(c); }, {"qkv_features must be positive, got 0"}));
  c.qkv_features = 10;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { MHA m(c); },
      {"MultiHeadDotProductAttention: Memory dimension (10) must be divisible by number of heads (4)"}));
  c.qkv_features.reset();
  c.out_features = -1;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { MHA m(c); }, {"out_features must be positive, got -1"}));
  c.out_features.reset();
  for (double bad : {1.0, -0.5, 2.0}) {
    c.dropout_rate = bad;
    EXPECT_TRUE(throws<std::invalid_argument>(
        [&] { Self m(c); }, {"SelfAttention: dropout_rate must be in [0, 1), got " + std::to_string(bad)}));
  }
  c.dropout_rate = std::nan("");
  EXPECT_TRUE(throws<std::invalid_argument>([&] { MHA m(c); }, {"dropout_rate must be in [0, 1), got", "nan"}));
  c.dropout_rate = 0.0;
  c.attention_fn = nullptr;
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { MHA m(c); }, {"MultiHeadDotProductAttention: attention_fn is empty"}));
  c.attention_fn = linen::DotProductAttention{};
  c.kernel_init = nullptr;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { Self m(c); }, {"SelfAttention: kernel_init is empty"}));
  c.kernel_init = linen::initializers::lecun_normal();
  c.bias_init = nullptr;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { Self m(c); }, {"SelfAttention: bias_init is empty"}));
  c.use_bias = false;  // no bias, no bias_init needed
  EXPECT_NO_THROW(Self m(c));
}

// ---------------------------------------------------------------------------------------
// Module calls

class MisuseModuleApply : public ::testing::Test {
 protected:
  // 2 heads of 4 over 8 features; cross attention with key features 6.
  MisuseModuleApply() {
    cfg_.num_heads = 2;
    cfg_.bias_init = linen::initializers::normal{0.2};
  }
  linen::AttentionConfig<float> cfg_;
  Tensor<float, 3> q_ = filled<float, 3>({2, 5, 8}, 1);
  Tensor<float, 3> k_ = filled<float, 3>({2, 7, 6}, 2);
};

TEST_F(MisuseModuleApply, HeadsThatDoNotDivideTheInputWidth) {
  cfg_.num_heads = 3;  // qkv_features defaults to the input width 8
  const linen::MultiHeadDotProductAttention<float> m(cfg_);
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.init(linen::random::key(0), q_); },
      {"MultiHeadDotProductAttention: Memory dimension (8) must be divisible by number of heads (3)"}));
  auto ok = cfg_;
  ok.num_heads = 2;
  const auto vars = linen::MultiHeadDotProductAttention<float>(ok).init(linen::random::key(0), q_);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(vars, q_); },
                                            {"Memory dimension (8) must be divisible by number of heads (3)"}));
}

TEST_F(MisuseModuleApply, InputShapesThatDoNotFitTogether) {
  const linen::MultiHeadDotProductAttention<float> m(cfg_);
  const auto vars = m.init(linen::random::key(0), q_, k_);
  const auto k3 = filled<float, 3>({3, 7, 6}, 3);
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_, k3); },
      {"MultiHeadDotProductAttention: inputs must share their batch dims [batch..., length, features]; "
       "inputs_q (2, 5, 8), inputs_k (3, 7, 6), inputs_v (3, 7, 6)"}));
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.init(linen::random::key(0), q_, k3); },
                                            {"inputs must share their batch dims", "inputs_k (3, 7, 6)"}));
  const auto v8 = filled<float, 3>({2, 8, 6}, 4);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(vars, q_, k_, v8); },
                                            {"inputs_k and inputs_v lengths differ: (2, 7, 6) vs (2, 8, 6)"}));
  const Tensor<float, 3> empty_features(2, 5, 0), empty_values(2, 7, 0);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.init(linen::random::key(0), empty_features); },
                                            {"input features must be positive, got shape (2, 5, 0)"}));
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(vars, q_, k_, empty_values); },
                                            {"input features must be positive, got shape (2, 7, 0)"}));
}

TEST_F(MisuseModuleApply, ParametersThatDoNotFitTheInputsOrTheConfig) {
  const linen::MultiHeadDotProductAttention<float> m(cfg_);
  const auto vars = m.init(linen::random::key(0), q_, k_);
  // The key and value projections against inputs of another width.
  const auto k5 = filled<float, 3>({2, 7, 5}, 3);
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_, k5, k_); },
      {"MultiHeadDotProductAttention: key/kernel has shape (6, 2, 4), inputs of shape (2, 7, 5) need (5, 2, 4)"}));
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)m.apply(vars, q_, k_, k5); },
                                    {"value/kernel has shape (6, 2, 4), inputs of shape (2, 7, 5) need (5, 2, 4)"}));
  auto bad = vars;
  bad.params.out.kernel = filled<float, 3>({2, 4, 7}, 5);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(bad, q_, k_); },
                                            {"out/kernel has shape (2, 4, 7), expected (2, 4, 8)"}));
  bad = vars;
  bad.params.out.bias = filled<float, 1>({7}, 6);
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)m.apply(bad, q_, k_); }, {"bias of shape (7,), expected (8,)"}));
  bad = vars;
  bad.params.query.bias = filled<float, 2>({2, 3}, 7);
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)m.apply(bad, q_, k_); }, {"bias of shape (2, 3), expected (2, 4)"}));
  auto norm = cfg_;
  norm.normalize_qk = true;
  const linen::MultiHeadDotProductAttention<float> mn(norm);
  auto nvars = mn.init(linen::random::key(0), q_, k_);
  nvars.params.key_ln.scale = filled<float, 1>({3}, 8);
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)mn.apply(nvars, q_, k_); },
                                    {"MultiHeadDotProductAttention: key_ln/scale has shape (3,), expected (4,)"}));
  // init_cache itself is allowed without decode; applying the cache is not.
  auto cache = m.init_cache(vars.params, {2}, 4);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(vars.params, cache, q_); },
                                            {"MultiHeadDotProductAttention: a cache is only used with decode=true"}));
}

TEST_F(MisuseModuleApply, AttentionFnReturningAWrongShapeOrThrowing) {
  auto c = cfg_;
  c.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>&, const Tensor<float, 4>&,
                      const linen::AttentionOptions<float>&) {
    return Tensor<float, 4>(Tensor<float, 4>(q.dimension(0), q.dimension(1), q.dimension(2), 3).setZero());
  };
  const linen::SelfAttention<float> m(c);
  const auto vars = m.init(linen::random::key(0), q_);
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_); },
      {"SelfAttention: attention_fn returned shape (2, 5, 2, 3), expected (2, 5, 2, 4)"}));
  struct Boom : std::runtime_error {
    Boom() : std::runtime_error("boom") {}
  };
  c.attention_fn = [](const Tensor<float, 4>&, const Tensor<float, 4>&, const Tensor<float, 4>&,
                      const linen::AttentionOptions<float>&) -> Tensor<float, 4> { throw Boom(); };
  EXPECT_TRUE(throws<Boom>([&] { (void)linen::SelfAttention<float>(c).apply(vars, q_); }, {"boom"}));
}

TEST_F(MisuseModuleApply, DropoutNeedsDeterministicOnceAndARandomSource) {
  auto c = cfg_;
  c.dropout_rate = 0.5;
  const linen::SelfAttention<float> m(c);
  const auto vars = m.init(linen::random::key(0), q_);
  linen::CallOptions<float> call;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_, call); },
      {"SelfAttention: Parameter \"deterministic\" must be passed to the constructor or at call time."}));
  call.deterministic = false;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_, call); },
      {"SelfAttention: dropout_rate=0.500000 with deterministic=false needs a dropout_rng"}));
  c.deterministic = true;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)linen::SelfAttention<float>(c).apply(vars, q_, call); },
      {"Parameter \"deterministic\" was passed to the constructor and at call time. Should be passed just once."}));
}

TEST_F(MisuseModuleApply, MaskOfAHigherRankThanTheWeights) {
  const linen::SelfAttention<float> m(cfg_);
  const auto vars = m.init(linen::random::key(0), q_);
  Tensor<bool, 5> mask(1, 1, 1, 5, 5);
  mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = mask;
  EXPECT_TRUE(throws<std::invalid_argument>(
      [&] { (void)m.apply(vars, q_, call); },
      {"SelfAttention: mask of shape (1, 1, 1, 5, 5) does not broadcast to shape (2, 2, 5, 5)"}));
}

// ---------------------------------------------------------------------------------------
// Decoding: every failed step leaves the cache unchanged, byte for byte.

struct CacheBytes {
  Shape batch, key_shape, value_shape;
  std::vector<unsigned char> key, value;
  std::int32_t index = 0;
  bool operator==(const CacheBytes& o) const {
    return batch == o.batch && key_shape == o.key_shape && value_shape == o.value_shape && key == o.key &&
           value == o.value && index == o.index;
  }
};

CacheBytes bytes_of(const linen::AttentionCache<float>& c) {
  CacheBytes b;
  b.batch = c.batch;
  b.key_shape = linen::shape_of(c.cached_key);
  b.value_shape = linen::shape_of(c.cached_value);
  const auto* k = reinterpret_cast<const unsigned char*>(c.cached_key.data());
  const auto* v = reinterpret_cast<const unsigned char*>(c.cached_value.data());
  b.key.assign(k, k + c.cached_key.size() * static_cast<Index>(sizeof(float)));
  b.value.assign(v, v + c.cached_value.size() * static_cast<Index>(sizeof(float)));
  b.index = c.cache_index;
  return b;
}

class MisuseDecode : public ::testing::Test {
 protected:
  MisuseDecode() {
    cfg_.num_heads = 2;
    cfg_.decode = true;
    cfg_.bias_init = linen::initializers::normal{0.2};
  }
  Tensor<float, 3> step(Index i) const {
    const Eigen::array<Index, 3> off{0, i, 0}, ext{2, 1, 8};
    return x_.slice(off, ext);
  }
  linen::AttentionConfig<float> cfg_;
  Tensor<float, 3> x_ = filled<float, 3>({2, 4, 8}, 1);  // batch 2, 4 positions, 8 features
};

TEST_F(MisuseDecode, InitCacheArguments) {
  const linen::SelfAttention<float> m(cfg_);
  const auto vars = m.init(linen::random::key(0), x_);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.init_cache(vars.params, {2}, 0); },
                                            {"SelfAttention: max_length must be positive, got 0"}));
  auto other = cfg_;
  other.num_heads = 4;
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)linen::SelfAttention<float>(other).init_cache(vars.params, {2}, 4); },
                                    {"key/kernel has shape (8, 2, 4), num_heads is 4"}));
  auto no_cache = vars;
  no_cache.cache.reset();
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(no_cache, step(0)); },
                                            {"SelfAttention: decode=true needs variables.cache (make it with init)"}));
}

// Sizes past what the machine can address are refused before anything is allocated, with
// linen::overflow_error (a std::overflow_error) naming the shape, never std::bad_alloc.
TEST_F(MisuseDecode, OverflowingSizesThrowOverflowErrorNotBadAlloc) {
  const linen::SelfAttention<float> m(cfg_);
  const auto params = m.init(linen::random::key(0), x_).params;
  const Index huge = Index{1} << 40;
  EXPECT_TRUE(throws<linen::overflow_error>([&] { (void)m.init_cache(params, {huge}, huge); },
                                            {"SelfAttention: cache", "overflows"}));
  EXPECT_TRUE(throws<std::overflow_error>([&] { (void)m.init_cache(params, {huge, huge}, 4); },
                                          {"SelfAttention: cache", "(1099511627776, 1099511627776, 4, 2, 4)"}));
  // A count that fits an Index but whose bytes do not.
  EXPECT_TRUE(throws<linen::overflow_error>([&] { (void)m.init_cache(params, {Index{1} << 30}, Index{1} << 29); },
                                            {"SelfAttention: cache", "bytes"}));
  // init: a kernel [in, heads, qkv_features / heads] past the addressable.
  auto wide = cfg_;
  wide.decode = false;
  wide.qkv_features = Index{1} << 62;
  EXPECT_TRUE(throws<linen::overflow_error>([&] { (void)linen::SelfAttention<float>(wide).init(linen::random::key(0), x_); },
                                            {"DenseGeneral: kernel", "(8, 2, 2305843009213693952)"}));
  // init with decode: the cache [batch..., length, heads, head_dim] is checked first.
  const Tensor<float, 3> long_x(1, 1, 8);
  auto tall = cfg_;
  tall.qkv_features = Index{1} << 61;
  EXPECT_TRUE(throws<linen::overflow_error>([&] { (void)linen::SelfAttention<float>(tall).init(linen::random::key(0), long_x); },
                                            {"SelfAttention: cache"}));
  linen::LayerNorm<float> ln;
  EXPECT_TRUE(throws<linen::overflow_error>([&] { (void)ln.init(linen::random::key(0), Index{1} << 62); },
                                            {"LayerNorm: scale", "bytes"}));
}

// cache.batch must multiply to cached_key's first dim: the error says so (not Flax's
// query-shape message, whose two shapes would read the same).
TEST_F(MisuseDecode, CacheBatchAgainstTheCacheTensorNamesBoth) {
  const linen::SelfAttention<float> m(cfg_);
  const auto params = m.init(linen::random::key(0), x_).params;
  auto cache = m.init_cache(params, {2}, 4);
  cache.cached_key.resize(3, 4, 2, 4);
  cache.cached_value.resize(3, 4, 2, 4);
  cache.cached_key.setZero();
  cache.cached_value.setZero();
  const CacheBytes before = bytes_of(cache);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(params, cache, step(0)); },
                                            {"SelfAttention: cache.batch (2,) holds 2 sequences, but cached_key has shape "
                                             "(3, 4, 2, 4)"}));
  EXPECT_TRUE(bytes_of(cache) == before);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 1, 8);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { m.decode_step(params, cache, step(0), out, ws); },
                                            {"cache.batch (2,) holds 2 sequences", "(3, 4, 2, 4)"}));
  EXPECT_TRUE(bytes_of(cache) == before);
}

TEST_F(MisuseDecode, OverflowThrowsCacheOverflowAndLeavesTheCacheUnchanged) {
  const linen::SelfAttention<float> m(cfg_);
  const auto params = m.init(linen::random::key(0), x_).params;
  auto cache = m.init_cache(params, {2}, 3);
  const Tensor<float, 3> first = m.apply(params, cache, step(0));
  for (Index i = 1; i < 3; ++i) (void)m.apply(params, cache, step(i));
  const CacheBytes full = bytes_of(cache);
  EXPECT_TRUE(throws<linen::cache_overflow>(
      [&] { (void)m.apply(params, cache, step(3)); },
      {"SelfAttention: decode step at cache_index 3 does not fit a cache of max_length 3", "the cache is unchanged"}));
  EXPECT_TRUE(bytes_of(cache) == full);
  EXPECT_TRUE(throws<linen::cache_overflow>([&] { (void)m.apply(params, cache, step(3)); }, {"cache_index 3"}));
  EXPECT_TRUE(bytes_of(cache) == full);
  // cache_overflow is a std::out_of_range, not an invalid_argument.
  EXPECT_THROW((void)m.apply(params, cache, step(3)), std::out_of_range);
  // A negative index (a corrupted cache) is refused the same way.
  cache.cache_index = -1;
  const CacheBytes negative = bytes_of(cache);
  EXPECT_TRUE(throws<linen::cache_overflow>([&] { (void)m.apply(params, cache, step(0)); }, {"cache_index -1"}));
  EXPECT_TRUE(bytes_of(cache) == negative);
  // The cache stays usable: rewinding it replays the first step exactly.
  cache.cache_index = 0;
  const Tensor<float, 3> again = m.apply(params, cache, step(0));
  EXPECT_EQ(std::memcmp(again.data(), first.data(), sizeof(float) * static_cast<std::size_t>(first.size())), 0);
}

TEST_F(MisuseDecode, CheckedArgumentErrorsLeaveTheCacheUnchanged) {
  const linen::SelfAttention<float> m(cfg_);
  const auto params = m.init(linen::random::key(0), x_).params;
  auto cache = m.init_cache(params, {2}, 4);
  (void)m.apply(params, cache, step(0));
  const CacheBytes before = bytes_of(cache);
  // A batch other than the cache's.
  const auto x3 = filled<float, 3>({3, 1, 8}, 2);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(params, cache, x3); },
                                            {"SelfAttention: Autoregressive cache shape error, expected query shape "
                                             "(2, 1, 2, 4) instead got (3, 1, 2, 4)."}));
  EXPECT_TRUE(bytes_of(cache) == before);
  // A mask that does not broadcast to [batch, heads, 1, max_length].
  Tensor<bool, 4> mask(2, 1, 1, 3);
  mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = mask;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(params, cache, step(1), call); },
                                            {"mask of shape (2, 1, 1, 3) does not broadcast to shape (2, 2, 1, 4)"}));
  EXPECT_TRUE(bytes_of(cache) == before);
  // A cached_value that no longer matches cached_key.
  auto bad = cache;
  bad.cached_value.resize(2, 3, 2, 4);
  bad.cached_value.setZero();
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(params, bad, step(1)); },
                                            {"cached_value has shape (2, 3, 2, 4), cached_key (2, 4, 2, 4)"}));
  EXPECT_EQ(bad.cache_index, 1);
  // Dropout without a random source.
  auto drop = cfg_;
  drop.dropout_rate = 0.5;
  const linen::SelfAttention<float> md(drop);
  linen::CallOptions<float> stochastic;
  stochastic.deterministic = false;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)md.apply(params, cache, step(1), stochastic); },
                                            {"needs a dropout_rng"}));
  EXPECT_TRUE(bytes_of(cache) == before);
  // Input features that do not fit the parameters (qkv and out features fixed, so that
  // the query projection is what fails).
  auto fixed = cfg_;
  fixed.qkv_features = 8;
  fixed.out_features = 8;
  const linen::SelfAttention<float> mf(fixed);
  const auto x6 = filled<float, 3>({2, 1, 6}, 3);
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)mf.apply(params, cache, x6); },
                                    {"query/kernel has shape (8, 2, 4), inputs of shape (2, 1, 6) need (6, 2, 4)"}));
  EXPECT_TRUE(bytes_of(cache) == before);
}

// A decode step that fails after the attention inputs were checked (out projection
// parameters that do not fit, an attention_fn that returns a wrong shape or throws) must
// not leave the step half done either: the cache is as it was (strong guarantee).
TEST_F(MisuseDecode, LateErrorsLeaveTheCacheUnchanged) {
  const linen::SelfAttention<float> m(cfg_);
  const auto params = m.init(linen::random::key(0), x_).params;
  auto cache = m.init_cache(params, {2}, 4);
  (void)m.apply(params, cache, step(0));
  const auto saved = cache;  // restored before each case, so that each is judged alone
  const CacheBytes before = bytes_of(cache);
  auto bad = params;
  bad.out.kernel = filled<float, 3>({2, 4, 7}, 4);
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)m.apply(bad, cache, step(1)); },
                                            {"out/kernel has shape (2, 4, 7), expected (2, 4, 8)"}));
  EXPECT_TRUE(bytes_of(cache) == before) << "cache_index " << cache.cache_index << " after a failed step";
  cache = saved;
  auto throwing = cfg_;
  throwing.attention_fn = [](const Tensor<float, 4>&, const Tensor<float, 4>&, const Tensor<float, 4>&,
                             const linen::AttentionOptions<float>&) -> Tensor<float, 4> {
    throw std::runtime_error("attention_fn failed");
  };
  EXPECT_TRUE(throws<std::runtime_error>(
      [&] { (void)linen::SelfAttention<float>(throwing).apply(params, cache, step(1)); }, {"attention_fn failed"}));
  EXPECT_TRUE(bytes_of(cache) == before) << "cache_index " << cache.cache_index << " after a failed step";
  cache = saved;
  auto wrong = cfg_;
  wrong.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>&, const Tensor<float, 4>&,
                          const linen::AttentionOptions<float>&) {
    return Tensor<float, 4>(Tensor<float, 4>(q.dimension(0), q.dimension(1), q.dimension(2), 1).setZero());
  };
  EXPECT_TRUE(
      throws<std::invalid_argument>([&] { (void)linen::SelfAttention<float>(wrong).apply(params, cache, step(1)); },
                                    {"attention_fn returned shape (2, 1, 2, 1), expected (2, 1, 2, 4)"}));
  EXPECT_TRUE(bytes_of(cache) == before) << "cache_index " << cache.cache_index << " after a failed step";
}

// ---------------------------------------------------------------------------------------
// Loaders and checkpoint binding

class MisuseFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("linen_test_misuse_" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::filesystem::path dir_;
};

TEST_F(MisuseFiles, SafetensorsFileErrorsNameTheFile) {
  const std::string missing = (dir_ / "missing.safetensors").string();
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_safetensors(missing); },
                                      {"linen::io: " + missing + ": cannot open for reading"}));
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_safetensors(dir_.string()); },
                                      {dir_.string() + ": not a regular file"}));
  EXPECT_TRUE(
      throws<linen::io_error>([&] { (void)linen::io::load_checkpoint(dir_.string()); }, {"not a regular file"}));
  const std::string nowhere = (dir_ / "no" / "such" / "dir.safetensors").string();
  EXPECT_TRUE(throws<linen::io_error>([&] { linen::io::save_safetensors(nowhere, linen::io::Variables()); },
                                      {nowhere + ": cannot open for writing"}));
}

TEST(MisuseLoadAttention, ConfigThatDisagreesWithTheFile) {
  const auto f = fixture("self_basic");  // 16 features, 4 heads of 4
  auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  auto c = cfg;
  c.num_heads = 0;
  EXPECT_TRUE(throws<std::invalid_argument>([&] { (void)linen::io::load_attention(f, c); },
                                            {"load_attention: num_heads must be positive"}));
  c = cfg;
  c.qkv_features = 8;
  EXPECT_TRUE(
      throws<linen::io_error>([&] { (void)linen::io::load_attention(f, c); },
                              {"params/query/kernel: shape (16, 4, 4) gives qkv_features 16, the config says 8"}));
  c = cfg;
  c.out_features = 10;
  EXPECT_TRUE(
      throws<linen::io_error>([&] { (void)linen::io::load_attention(f, c); },
                              {"params/out/kernel: shape (4, 4, 16) gives out_features 16, the config says 10"}));
  c = cfg;
  c.normalize_qk = true;  // the file has no query_ln
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(f, c); },
                                      {"missing tensor 'params/query_ln/scale'"}));
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)f.subtree("params/encoder"); },
                                      {"no tensor under 'params/encoder/'", "nearest"}));
}

TEST(MisuseLoadAttention, CacheThatDoesNotFit) {
  const auto f = fixture("decode_basic");  // cache [2, 8, 4, 4], cache_index 8
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  ASSERT_NO_THROW((void)linen::io::load_attention(f, cfg));
  using linen::io::Array;
  using linen::io::DType;
  auto set_index = [&](linen::io::Variables& v, std::int32_t i, Shape shape) {
    std::vector<std::uint8_t> b(4 * static_cast<std::size_t>(linen::num_elements(shape)));
    for (std::size_t n = 0; n < b.size(); n += 4) std::memcpy(b.data() + n, &i, 4);
    v.set("cache/cache_index", Array(DType::I32, std::move(shape), std::move(b)));
  };
  auto bad = f;
  set_index(bad, 3, {1});
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); },
                                      {"cache/cache_index: shape (1,) expected a scalar ()"}));
  set_index(bad, 9, {});
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); },
                                      {"cache/cache_index: value 9 outside [0, max_length=8]"}));
  set_index(bad, -1, {});
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); },
                                      {"cache/cache_index: value -1 outside [0, max_length=8]"}));
  bad = f;
  bad.set("cache/cache_index", Array(DType::F32, {}, std::vector<std::uint8_t>(4)));
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); }, {"cache/cache_index"}));
  bad = f;
  bad.set("cache/cached_key", Array(DType::F32, {2, 8, 2, 8}, std::vector<std::uint8_t>(2 * 8 * 2 * 8 * 4)));
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); },
                                      {"cache/cached_key: shape (2, 8, 2, 8) is not [batch..., max_length, 4, 4]"}));
  bad = f;
  bad.erase("cache/cached_value");
  EXPECT_TRUE(throws<linen::io_error>([&] { (void)linen::io::load_attention(bad, cfg); },
                                      {"missing tensor 'cache/cached_value'"}));
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// decode_step: a decode step into caller-owned memory with a reusable workspace. It must
// equal apply's decode step bit for bit, validate like apply, serve any module and shape
// from one workspace, and agree with the general (combined-mask) decode path.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "test_support.hpp"

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::rel_err;

using linen_test::random_tensor;

// Position i of [batch0, batch1, len, features].
template <class T>
Tensor<T, 4> step_of(const Tensor<T, 4>& x, Index i) {
  const Eigen::array<Index, 4> off{0, 0, i, 0}, ext{x.dimension(0), x.dimension(1), 1, x.dimension(3)};
  return x.slice(off, ext);
}

template <class T, class P>
linen::AttentionConfig<T, P> decode_config(Index heads, bool normalize_qk) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = heads;
  cfg.decode = true;
  cfg.normalize_qk = normalize_qk;
  return cfg;
}

// Runs `steps` decode steps through apply and through decode_step (one workspace shared by
// every call) on two caches, expecting identical bytes: outputs and caches.
template <class T, class P>
void expect_decode_step_equals_apply(bool normalize_qk, const Shape& mask_shape) {
  std::mt19937 g(7);
  const Index B0 = 2, B1 = 3, L = 6, E = 16, H = 4;
  const linen::SelfAttention<T, P> attn(decode_config<T, P>(H, normalize_qk));
  const auto x = random_tensor<T, 4>({B0, B1, L, E}, g);
  auto vars = attn.init(linen::random::key(3), x);
  // non-trivial LayerNorm scales
  for (auto* s : {&vars.params.query_ln.scale, &vars.params.key_ln.scale})
    for (Index i = 0; i < s->size(); ++i) s->data()[i] = static_cast<P>(0.5 + 0.1 * static_cast<double>(i));
  auto c1 = attn.init_cache(vars.params, {B0, B1}, L), c2 = c1;
  Tensor<bool, 5> mask;  // [1..., mask_shape...] at rank 5
  linen::CallOptions<T> call;
  if (!mask_shape.empty()) {
    Shape m5(5 - mask_shape.size(), 1);
    m5.insert(m5.end(), mask_shape.begin(), mask_shape.end());
    mask.resize(linen::to_dims<5>(m5));
    std::bernoulli_distribution keep(0.7);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(g);
    call.mask = linen::ArrayRef<bool>(mask.data(), mask_shape);
  }
  linen::DecodeWorkspace<T> ws;
  Tensor<T, 4> out(B0, B1, 1, E);
  for (Index i = 0; i < L; ++i) {
    const Tensor<T, 4> xi = step_of(x, i);
    const Tensor<T, 4> want = attn.apply(vars.params, c1, xi, call);
    attn.decode_step(vars.params, c2, xi, out, ws, call);
    ASSERT_EQ(0, std::memcmp(want.data(), out.data(), sizeof(T) * static_cast<std::size_t>(out.size())))
        << "step " << i;
  }
  EXPECT_EQ(c1.cache_index, c2.cache_index);
  EXPECT_EQ(0, std::memcmp(c1.cached_key.data(), c2.cached_key.data(), sizeof(T) * c1.cached_key.size()));
  EXPECT_EQ(0, std::memcmp(c1.cached_value.data(), c2.cached_value.data(), sizeof(T) * c1.cached_value.size()));
}

TEST(DecodeStep, EqualsApplyBitForBitFloat) { expect_decode_step_equals_apply<float, float>(false, {}); }
TEST(DecodeStep, EqualsApplyBitForBitDoubleNormalizeQk) { expect_decode_step_equals_apply<double, double>(true, {}); }
TEST(DecodeStep, EqualsApplyBitForBitBfloat16) {
  expect_decode_step_equals_apply<Eigen::bfloat16, float>(true, {});
}
TEST(DecodeStep, EqualsApplyBitForBitHalfHalfParams) {
  expect_decode_step_equals_apply<Eigen::half, Eigen::half>(false, {});
}
// Masks over [batch0, batch1, heads, 1, max_length]: seen in place (batch dims all 1, or
// all full) or gathered per batch entry (batch dims partly broadcast).
TEST(DecodeStep, MaskPerBatchAndHead) { expect_decode_step_equals_apply<float, float>(false, {2, 3, 4, 1, 6}); }
TEST(DecodeStep, MaskSharedByTheBatch) { expect_decode_step_equals_apply<float, float>(false, {1, 4, 1, 6}); }
TEST(DecodeStep, MaskGatheredOverBatchDims) {
  expect_decode_step_equals_apply<float, float>(false, {2, 1, 1, 1, 6});
}

// The direct decode (fused row kernel over the first cache_index + 1 positions) against
// the general path (the combined mask over max_length, through attention_fn), with a mask
// that leaves some rows with nothing to see: Flax then averages all max_length slots.
TEST(DecodeStep, DirectDecodeAgreesWithTheCombinedMaskPath) {
  std::mt19937 g(11);
  const Index B0 = 1, B1 = 3, L = 40, E = 8, H = 2, steps = 12;
  auto cfg = decode_config<float, float>(H, false);
  const linen::SelfAttention<float> direct(cfg);
  cfg.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                        const linen::AttentionOptions<float>& o) {
    auto r = o;
    r.implementation = linen::Implementation::Reference;
    return linen::dot_product_attention(q, k, v, r);
  };
  const linen::SelfAttention<float> general(cfg);
  const auto x = random_tensor<float, 4>({B0, B1, steps, E}, g);
  const auto vars = direct.init(linen::random::key(1), x);
  auto c1 = direct.init_cache(vars.params, {B0, B1}, L), c2 = c1;
  // batch entry 1 sees nothing at all; entry 2 only the even positions.
  Tensor<bool, 5> mask(B0, B1, 1, 1, L);
  for (Index b = 0; b < B1; ++b)
    for (Index j = 0; j < L; ++j) mask(0, b, 0, 0, j) = b == 0 || (b == 2 && j % 2 == 0);
  linen::CallOptions<float> call;
  call.mask = mask;
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 4> out(B0, B1, 1, E);
  for (Index i = 0; i < steps; ++i) {
    const Tensor<float, 4> xi = step_of(x, i);
    direct.decode_step(vars.params, c1, xi, out, ws, call);
    const Tensor<float, 4> want = general.apply(vars.params, c2, xi, call);
    EXPECT_LE(rel_err(out, want), 2e-6) << "step " << i;
  }
  // (Entry 1's output is the out projection of the mean of all L value slots, zeros past
  // the index included, as the general path computes it over max_length.)
  EXPECT_EQ(c1.cache_index, steps);
}

// One workspace serves different modules, shapes and caches in turn.
TEST(DecodeStep, OneWorkspaceServesModulesOfDifferentShapes) {
  std::mt19937 g(5);
  linen::DecodeWorkspace<float> ws;
  const linen::SelfAttention<float> a(decode_config<float, float>(2, false)), b(decode_config<float, float>(4, true));
  const auto xa = random_tensor<float, 4>({1, 2, 5, 8}, g), xb = random_tensor<float, 4>({2, 2, 5, 16}, g);
  const auto va = a.init(linen::random::key(1), xa), vb = b.init(linen::random::key(2), xb);
  auto ca1 = a.init_cache(va.params, {1, 2}, 5), ca2 = ca1;
  auto cb1 = b.init_cache(vb.params, {2, 2}, 5), cb2 = cb1;
  Tensor<float, 4> oa(1, 2, 1, 8), ob(2, 2, 1, 16);
  for (Index i = 0; i < 5; ++i) {
    a.decode_step(va.params, ca1, step_of(xa, i), oa, ws);
    EXPECT_EQ(rel_err(oa, a.apply(va.params, ca2, step_of(xa, i))), 0.0);
    b.decode_step(vb.params, cb1, step_of(xb, i), ob, ws);
    EXPECT_EQ(rel_err(ob, b.apply(vb.params, cb2, step_of(xb, i))), 0.0);
  }
}

// Writing into the caller's memory through a TensorMap; and a thread pool (the key chunks
// then merge in another order: equal to rounding).
TEST(DecodeStep, TensorMapOutputAndThreadPool) {
  std::mt19937 g(9);
  const Index L = 700, E = 32, H = 4;
  auto cfg = decode_config<float, float>(H, false);
  const linen::SelfAttention<float> plain(cfg);
  Eigen::ThreadPool pool(2);
  cfg.thread_pool = &pool;
  const linen::SelfAttention<float> pooled(cfg);
  const auto x = random_tensor<float, 4>({1, 1, L, E}, g);
  const auto vars = plain.init(linen::random::key(4), x);
  auto c1 = plain.init_cache(vars.params, {1, 1}, L), c2 = c1;
  std::vector<float> buffer(E);
  linen::DecodeWorkspace<float> w1, w2;
  Tensor<float, 4> o1(1, 1, 1, E);
  for (Index i = 0; i < L; ++i) {
    plain.decode_step(vars.params, c1, step_of(x, i), o1, w1);
    pooled.decode_step(vars.params, c2, step_of(x, i), linen::TensorMap<float, 4>(buffer.data(), 1, 1, 1, E), w2);
    const linen::TensorMap<float, 4> o2(buffer.data(), 1, 1, 1, E);
    ASSERT_LE(rel_err(o2, o1), 2e-6) << "step " << i;
  }
}

// Dropout on: decode_step runs apply (same keep mask from the same key) and copies.
TEST(DecodeStep, DropoutFallsBackToApply) {
  std::mt19937 g(3);
  auto cfg = decode_config<float, float>(2, false);
  cfg.dropout_rate = 0.3;
  cfg.deterministic = false;
  const linen::SelfAttention<float> attn(cfg);
  const auto x = random_tensor<float, 4>({1, 2, 4, 8}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  auto c1 = attn.init_cache(vars.params, {1, 2}, 4), c2 = c1;
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 4> out(1, 2, 1, 8);
  for (Index i = 0; i < 4; ++i) {
    linen::CallOptions<float> call;
    call.dropout_rng = linen::random::fold_in(linen::random::key(5), static_cast<std::uint32_t>(i));
    attn.decode_step(vars.params, c1, step_of(x, i), out, ws, call);
    EXPECT_EQ(rel_err(out, attn.apply(vars.params, c2, step_of(x, i), call)), 0.0);
  }
}

TEST(DecodeStep, ErrorsNameTheShapeAndLeaveTheCacheUnchanged) {
  std::mt19937 g(2);
  const linen::SelfAttention<float> attn(decode_config<float, float>(2, false));
  const auto x = random_tensor<float, 4>({1, 2, 3, 8}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  auto cache = attn.init_cache(vars.params, {1, 2}, 2);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 4> bad_out(1, 2, 1, 9);
  try {
    attn.decode_step(vars.params, cache, step_of(x, 0), bad_out, ws);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(1, 2, 1, 9)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(1, 2, 1, 8)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.cache_index, 0);
  Tensor<float, 4> out(1, 2, 1, 8);
  // Two positions fill the cache; the third throws and changes nothing.
  attn.decode_step(vars.params, cache, step_of(x, 0), out, ws);
  attn.decode_step(vars.params, cache, step_of(x, 1), out, ws);
  const auto before = cache;
  EXPECT_THROW(attn.decode_step(vars.params, cache, step_of(x, 2), out, ws), linen::cache_overflow);
  EXPECT_EQ(cache.cache_index, before.cache_index);
  EXPECT_EQ(rel_err(cache.cached_key, before.cached_key), 0.0);
  EXPECT_EQ(rel_err(cache.cached_value, before.cached_value), 0.0);
  // A query of length 2 is Flax's cache shape error, also after a validated step.
  Tensor<float, 4> two(1, 2, 2, 8);
  two.setZero();
  auto fresh = attn.init_cache(vars.params, {1, 2}, 4);
  try {
    attn.decode_step(vars.params, fresh, two, out, ws);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("Autoregressive cache shape error"), std::string::npos) << e.what();
  }
  EXPECT_EQ(fresh.cache_index, 0);
  // decode=false
  auto cfg = decode_config<float, float>(2, false);
  cfg.decode = false;
  EXPECT_THROW(linen::SelfAttention<float>(cfg).decode_step(vars.params, fresh, step_of(x, 0), out, ws),
               std::invalid_argument);
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// A decode step allocates no heap memory after warm-up (issue 7): every global operator
// new is counted, and Eigen's own allocator is forbidden (EIGEN_RUNTIME_NO_MALLOC), over
// many decode_step calls that reuse one DecodeWorkspace, for each element type, with
// normalize_qk, several batch dims and a mask that must be gathered.
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>

#include "test_support.hpp"

#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen_test::NoAllocation;

using linen::Index;
using linen::Shape;
using linen::Tensor;

template <class T, class P, class Module = linen::SelfAttention<T, P>>
void expect_no_allocation_after_warm_up(Index E, Index H, bool normalize_qk, bool gathered_mask, Index L = 300,
                                        double dropout_rate = 0.0) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = H;
  cfg.decode = true;
  cfg.normalize_qk = normalize_qk;
  cfg.dropout_rate = dropout_rate;
  if (dropout_rate > 0) cfg.deterministic = true;
  const Module attn(cfg);
  std::mt19937 g(1);
  std::normal_distribution<float> d;
  const Index B0 = 2, B1 = 2;
  Tensor<T, 4> x(B0, B1, 1, E);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(d(g));
  const auto vars = attn.init(linen::random::key(0), x);
  auto cache = attn.init_cache(vars.params, {B0, B1}, L);
  Tensor<bool, 5> mask(B0, 1, 1, 1, L);  // batch dim 1 broadcast: gathered per step
  mask.setConstant(true);
  mask(1, 0, 0, 0, 3) = false;
  linen::CallOptions<T> call;
  if (gathered_mask) call.mask = mask;
  linen::DecodeWorkspace<T> ws;
  Tensor<T, 4> out(B0, B1, 1, E);
  attn.decode_step(vars.params, cache, x, out, ws, call);  // warm-up
  long news = 0;
  {
    NoAllocation guard;
    for (Index i = 1; i < L; ++i) {
      x(0, 0, 0, i % E) += static_cast<T>(0.25f);
      attn.decode_step(vars.params, cache, x, out, ws, call);
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0) << "operator new calls in " << (L - 1) << " decode steps after warm-up";
  EXPECT_EQ(cache.cache_index, L);
  // The counter works: a step through apply allocates (it returns a new tensor).
  auto fresh = attn.init_cache(vars.params, {B0, B1}, L);
  const long before = linen_test::g_news.load();
  (void)attn.apply(vars.params, fresh, x, call);
  EXPECT_GT(linen_test::g_news.load() - before, 0);
}

TEST(DecodeAllocation, FloatNoneAfterWarmUp) { expect_no_allocation_after_warm_up<float, float>(64, 4, false, false); }
TEST(DecodeAllocation, FloatNormalizeQkGatheredMask) {
  expect_no_allocation_after_warm_up<float, float>(64, 4, true, true);
}
TEST(DecodeAllocation, FloatWideModelLongCache) {
  expect_no_allocation_after_warm_up<float, float>(512, 8, false, false, 600);
}
// A module with a long name (no small-string buffer) and dropout configured but
// deterministic: nothing on the step's path builds an error message.
TEST(DecodeAllocation, MultiHeadWithDeterministicDropout) {
  expect_no_allocation_after_warm_up<float, float, linen::MultiHeadDotProductAttention<float>>(64, 4, true, true, 300,
                                                                                              0.1);
}
TEST(DecodeAllocation, Double) { expect_no_allocation_after_warm_up<double, double>(32, 2, true, true); }
TEST(DecodeAllocation, Bfloat16WithFloatParams) {
  expect_no_allocation_after_warm_up<Eigen::bfloat16, float>(64, 4, true, true);
}
TEST(DecodeAllocation, HalfWithHalfParams) {
  expect_no_allocation_after_warm_up<Eigen::half, Eigen::half>(64, 4, false, true);
}

// One workspace shared by decoders whose caches differ in max_length (and by two
// modules): once each shape has been served, alternating between them neither
// re-validates nor allocates.
TEST(DecodeAllocation, SharedWorkspaceAlternatingCachesAndModules) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  cfg.decode = true;
  const linen::SelfAttention<float> a(cfg);
  auto cfg_b = cfg;
  cfg_b.normalize_qk = true;
  const linen::MultiHeadDotProductAttention<float> b(cfg_b);
  std::mt19937 g(2);
  std::normal_distribution<float> d;
  Tensor<float, 3> x(2, 1, 32);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = d(g);
  const auto va = a.init(linen::random::key(0), x), vb = b.init(linen::random::key(1), x);
  auto c1 = a.init_cache(va.params, {2}, 100), c2 = a.init_cache(va.params, {2}, 257), c3 = b.init_cache(vb.params, {2}, 64);
  Tensor<bool, 4> mask(2, 1, 1, 100);  // masked steps on c1 only: a mask plan per shape
  mask.setConstant(true);
  mask(1, 0, 0, 2) = false;
  linen::CallOptions<float> masked;
  masked.mask = mask;
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 1, 32);
  a.decode_step(va.params, c1, x, out, ws, masked);  // warm-up: each shape once
  a.decode_step(va.params, c2, x, out, ws);
  b.decode_step(vb.params, c3, x, out, ws);
  long news = 0;
  {
    NoAllocation guard;
    for (Index i = 1; i < 60; ++i) {
      x(0, 0, i % 32) += 0.25f;
      a.decode_step(va.params, c1, x, out, ws, masked);
      a.decode_step(va.params, c2, x, out, ws);
      b.decode_step(vb.params, c3, x, out, ws);
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0) << "operator new calls in 177 alternating decode steps after warm-up";
  EXPECT_EQ(c1.cache_index, 60);
  EXPECT_EQ(c2.cache_index, 60);
  EXPECT_EQ(c3.cache_index, 60);
  // Each step through the shared workspace still equals apply's on the same cache state.
  linen::CallOptions<float> plain;
  for (auto [c, call] : {std::pair{&c1, &masked}, std::pair{&c2, &plain}}) {
    auto copy = *c;
    const Tensor<float, 3> y = a.apply(va.params, copy, x, *call);
    a.decode_step(va.params, *c, x, out, ws, *call);
    EXPECT_EQ(std::memcmp(out.data(), y.data(), sizeof(float) * static_cast<std::size_t>(y.size())), 0);
  }
}

}  // namespace

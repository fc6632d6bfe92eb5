// SPDX-License-Identifier: Apache-2.0
// The attention modules' vjp without per-call allocation (issue 13, item 2, backward):
//   vjp_into(module, variables, inputs..., out, GradWorkspace) and its pullback(cotangent,
//   grads) allocate nothing after a warm-up (every operator new counted, Eigen's allocator
//   forbidden) and equal vjp + pullback bit for bit (output and every cotangent), on every
//   path apply_into's test covers: masks (in place and gathered), a causal mask, dropout
//   (shared and per-head keep masks), no bias, normalize_qk, one or two query rows, cross
//   attention with two and three inputs, SelfAttention, every element type;
//   a thread pool gives vjp's bits (per-worker scratch); one workspace serves several
//   shapes and modules; a stale pullback, a wrong cotangent or out throw and change nothing;
//   sowing (Implementation::Reference) falls back to vjp's forward; at a layer's size Eigen's
//   GEMM packing buffers are kept too.
#define EIGEN_RUNTIME_NO_MALLOC
#include <cstring>
#include <random>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "test_support.hpp"

#include <linen/grad.hpp>

#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen_test::NoAllocation;
using linen_test::same_bits;

using linen::Index;
using linen::Tensor;

template <class P, class I, int N>
bool same_grads(const linen::AttentionGrads<P, I, N>& a, const linen::AttentionGrads<P, I, N>& b) {
  const auto& x = a.params;
  const auto& y = b.params;
  return same_bits(x.query.kernel, y.query.kernel) && same_bits(x.query.bias, y.query.bias) &&
         same_bits(x.key.kernel, y.key.kernel) && same_bits(x.key.bias, y.key.bias) &&
         same_bits(x.value.kernel, y.value.kernel) && same_bits(x.value.bias, y.value.bias) &&
         same_bits(x.out.kernel, y.out.kernel) && same_bits(x.out.bias, y.out.bias) &&
         same_bits(x.query_ln.scale, y.query_ln.scale) && same_bits(x.key_ln.scale, y.key_ln.scale) &&
         same_bits(a.inputs_q, b.inputs_q) && same_bits(a.inputs_k, b.inputs_k) && same_bits(a.inputs_v, b.inputs_v);
}

template <class T, int N>
void fill(Tensor<T, N>& t, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(d(g));
}

enum class MaskKind { None, Padding, Gathered, Causal };

struct Case {
  Index lq = 12, lk = 12;  // lk != lq: cross attention
  MaskKind mask = MaskKind::None;
  double dropout = 0.0;
  bool broadcast_dropout = true;
  bool normalize_qk = false;
  bool use_bias = true;
  int inputs = 2;  // distinct inputs passed: 2 (q, k) or 3 (q, k, v)
};

// inputs [2, 2, L, E] (two batch dims), E = 16, 2 heads; masks over [2, 2, 2, lq, lk].
template <class T, class P>
void expect_into_equals_vjp_without_allocation(const Case& c) {
  SCOPED_TRACE(::testing::Message() << "lq=" << c.lq << " lk=" << c.lk << " mask=" << static_cast<int>(c.mask)
                                    << " dropout=" << c.dropout << " broadcast=" << c.broadcast_dropout
                                    << " normalize_qk=" << c.normalize_qk << " use_bias=" << c.use_bias
                                    << " inputs=" << c.inputs);
  const Index B0 = 2, B1 = 2, E = 16;
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = 2;
  cfg.dropout_rate = c.dropout;
  cfg.broadcast_dropout = c.broadcast_dropout;
  cfg.normalize_qk = c.normalize_qk;
  cfg.use_bias = c.use_bias;
  const linen::MultiHeadDotProductAttention<T, P> attn(cfg);
  Tensor<T, 4> xq(B0, B1, c.lq, E), xk(B0, B1, c.lk, E), xv(B0, B1, c.lk, E), ct(B0, B1, c.lq, E);
  fill(xq, 1);
  fill(xk, 2);
  fill(xv, 3);
  fill(ct, 4);
  const auto vars = attn.init(linen::random::key(0), xq, xk, xv);
  Tensor<bool, 5> padding(B0, B1, 1, 1, c.lk);  // per batch entry: read in place
  padding.setConstant(true);
  padding(1, 0, 0, 0, 1) = false;
  Tensor<bool, 5> gathered(B0, 1, 1, c.lq, c.lk);  // broadcast over batch dim 1: gathered
  gathered.setConstant(true);
  gathered(1, 0, 0, 0, 0) = false;
  Tensor<bool, 4> causal(1, 1, c.lq, c.lk);
  for (Index i = 0; i < c.lq; ++i)
    for (Index j = 0; j < c.lk; ++j) causal(0, 0, i, j) = j <= i;
  linen::CallOptions<T> call;
  if (c.mask == MaskKind::Padding) call.mask = padding;
  if (c.mask == MaskKind::Gathered) call.mask = gathered;
  if (c.mask == MaskKind::Causal) call.mask = causal;
  if (c.dropout > 0) {
    call.deterministic = false;
    call.dropout_rng = linen::random::key(7);  // the same mask on every call
  }
  linen::GradOptions options;
  options.block_q = 8;  // several query and key tiles
  options.block_k = 8;
  const auto into = [&](Tensor<T, 4>& out, linen::GradWorkspace<T>& ws) {
    return c.inputs == 3 ? linen::vjp_into(attn, vars, xq, xk, xv, out, ws, call, options)
                         : linen::vjp_into(attn, vars, xq, xk, out, ws, call, options);
  };
  const auto reference = [&] {
    return c.inputs == 3 ? linen::vjp(attn, vars, xq, xk, xv, call, options)
                         : linen::vjp(attn, vars, xq, xk, call, options);
  };
  linen::GradWorkspace<T> ws;
  Tensor<T, 4> out(B0, B1, c.lq, E);
  linen::AttentionGrads<P, T, 4> grads;
  into(out, ws)(ct, grads);  // warm-up
  {
    const auto r = reference();
    EXPECT_TRUE(same_bits(out, r.output));
    EXPECT_TRUE(same_grads(grads, r.pullback(ct)));
  }
  for (int round = 0; round < 3; ++round) {
    xq(0, 1, round % c.lq, round % E) += static_cast<T>(0.5f);
    xk(1, 0, round % c.lk, (round + 3) % E) -= static_cast<T>(0.25f);
    ct(1, 1, round % c.lq, (round + 5) % E) += static_cast<T>(1.0f);
    long news = 0;
    {
      NoAllocation guard;
      const auto pullback = into(out, ws);
      pullback(ct, grads);
      news = guard.count();
    }
    EXPECT_EQ(news, 0) << "operator new calls in vjp_into + pullback after warm-up, round " << round;
    const auto r = reference();
    EXPECT_TRUE(same_bits(out, r.output)) << "round " << round;
    EXPECT_TRUE(same_grads(grads, r.pullback(ct))) << "round " << round;
  }
}

template <class T, class P>
void every_path() {
  expect_into_equals_vjp_without_allocation<T, P>({});
  expect_into_equals_vjp_without_allocation<T, P>({12, 12, MaskKind::Padding});
  expect_into_equals_vjp_without_allocation<T, P>({12, 20, MaskKind::Gathered, 0.0, true, false, true, 3});
  expect_into_equals_vjp_without_allocation<T, P>({12, 12, MaskKind::Causal, 0.0, true, true});
  expect_into_equals_vjp_without_allocation<T, P>({12, 12, MaskKind::None, 0.3, true});
  expect_into_equals_vjp_without_allocation<T, P>({12, 9, MaskKind::Padding, 0.3, false, false, false, 3});
  expect_into_equals_vjp_without_allocation<T, P>({1, 12, MaskKind::Gathered, 0.2, true, true});  // row kernel
  expect_into_equals_vjp_without_allocation<T, P>({2, 7, MaskKind::None, 0.0, true, false, false});
}

TEST(VjpWorkspace, FloatEveryPath) { every_path<float, float>(); }
TEST(VjpWorkspace, DoubleEveryPath) { every_path<double, double>(); }
TEST(VjpWorkspace, HalfEveryPath) { every_path<Eigen::half, Eigen::half>(); }
TEST(VjpWorkspace, Bfloat16WithFloatParamsEveryPath) { every_path<Eigen::bfloat16, float>(); }

// SelfAttention with a longer sequence (several default-size tiles), one workspace shared
// by two modules and two shapes: each pullback is vjp's; two modules alternating at one
// shape allocate nothing (the tape's tensors are reallocated when the shape changes). A
// pullback of an earlier vjp_into on the workspace then throws.
TEST(VjpWorkspace, SelfAttentionSharedWorkspace) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  const linen::SelfAttention<float> a(cfg);
  auto cfg_b = cfg;
  cfg_b.normalize_qk = true;
  const linen::SelfAttention<float> b(cfg_b);
  Tensor<float, 3> x1(2, 150, 32), x2(1, 77, 32), c1(2, 150, 32), c2(1, 77, 32);
  fill(x1, 3);
  fill(x2, 4);
  fill(c1, 5);
  fill(c2, 6);
  const auto va = a.init(linen::random::key(0), x1), vb = b.init(linen::random::key(1), x1);
  linen::GradWorkspace<float> ws;
  Tensor<float, 3> o1(2, 150, 32), o2(1, 77, 32), o3(2, 150, 32);
  linen::AttentionGrads<float, float, 3> g1, g2, g3;
  const auto step = [&] {
    linen::vjp_into(a, va, x1, o1, ws)(c1, g1);
    linen::vjp_into(b, vb, x1, o3, ws)(c1, g3);
  };
  step();
  long news = 0;
  {
    NoAllocation guard;
    for (int i = 0; i < 2; ++i) step();
    news = guard.count();
  }
  EXPECT_EQ(news, 0);
  linen::vjp_into(a, va, x2, o2, ws)(c2, g2);
  EXPECT_GT(ws.bytes(), 0u);
  const auto r1 = linen::vjp(a, va, x1), r2 = linen::vjp(a, va, x2), r3 = linen::vjp(b, vb, x1);
  EXPECT_TRUE(same_bits(o1, r1.output));
  EXPECT_TRUE(same_bits(o2, r2.output));
  EXPECT_TRUE(same_bits(o3, r3.output));
  EXPECT_TRUE(same_grads(g1, r1.pullback(c1)));
  EXPECT_TRUE(same_grads(g2, r2.pullback(c2)));
  EXPECT_TRUE(same_grads(g3, r3.pullback(c1)));

  const auto first = linen::vjp_into(a, va, x1, o1, ws);
  const auto second = linen::vjp_into(a, va, x2, o2, ws);
  linen::AttentionGrads<float, float, 3> kept = g1;
  EXPECT_THROW(first(c1, g1), linen::invalid_argument);
  EXPECT_TRUE(same_grads(g1, kept)) << "a stale pullback wrote";
  second(c2, g2);
  EXPECT_TRUE(same_grads(g2, r2.pullback(c2)));
  ws.release();
  EXPECT_EQ(ws.bytes(), 0u);
  EXPECT_THROW(second(c2, g2), linen::invalid_argument);
}

// At a layer's size the dense backward's products are Eigen GEMMs whose packing buffers
// exceed EIGEN_STACK_ALLOCATION_LIMIT (Eigen would take them from the heap): the
// workspace keeps them too, and the results are vjp's.
TEST(VjpWorkspace, LayerSizeProductsKeepTheirPackingBuffers) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(1, 512, 256), ct(1, 512, 256);
  fill(x, 13);
  fill(ct, 14);
  const auto vars = attn.init(linen::random::key(0), x);
  linen::GradWorkspace<float> ws;
  Tensor<float, 3> out(1, 512, 256);
  linen::AttentionGrads<float, float, 3> grads;
  linen::vjp_into(attn, vars, x, out, ws)(ct, grads);
  long news = 0;
  {
    NoAllocation guard;
    linen::vjp_into(attn, vars, x, out, ws)(ct, grads);
    news = guard.count();
  }
  EXPECT_EQ(news, 0);
  const auto r = linen::vjp(attn, vars, x);
  EXPECT_TRUE(same_bits(out, r.output));
  EXPECT_TRUE(same_grads(grads, r.pullback(ct)));
}

// With thread pools (the forward's and the backward's): vjp's bits, the fused backward's
// per-worker scratch reused across calls (heads fewer than workers: key groups).
TEST(VjpWorkspace, ThreadPoolGivesVjpsBits) {
  Eigen::ThreadPool pool(3);
  for (const Index heads : {1, 4}) {
    linen::AttentionConfig<float> cfg;
    cfg.num_heads = heads;
    cfg.thread_pool = &pool;
    cfg.dropout_rate = 0.1;
    const linen::SelfAttention<float> attn(cfg);
    Tensor<float, 3> x(2, 70, 16), ct(2, 70, 16);
    fill(x, 7);
    fill(ct, 8);
    const auto vars = attn.init(linen::random::key(0), x);
    linen::CallOptions<float> call;
    call.deterministic = false;
    call.dropout_rng = linen::random::key(2);
    linen::GradOptions options;
    options.thread_pool = &pool;
    options.block_q = 16;
    options.block_k = 16;
    linen::GradWorkspace<float> ws;
    Tensor<float, 3> out(2, 70, 16);
    linen::AttentionGrads<float, float, 3> grads;
    const auto r = linen::vjp(attn, vars, x, call, options);
    const auto want = r.pullback(ct);
    for (int i = 0; i < 3; ++i) {
      linen::vjp_into(attn, vars, x, out, ws, call, options)(ct, grads);
      EXPECT_TRUE(same_bits(out, r.output)) << "heads " << heads << " call " << i;
      EXPECT_TRUE(same_grads(grads, want)) << "heads " << heads << " call " << i;
    }
  }
}

// Bad shapes throw before anything is written (out, grads and the workspace's tape keep
// what they had); sowing takes vjp's forward (Reference backward) with the same bits.
TEST(VjpWorkspace, FailedCallsChangeNothingAndSowingFallsBack) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  const linen::MultiHeadDotProductAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 10, 16), ct(2, 10, 16);
  fill(x, 10);
  fill(ct, 11);
  const auto vars = attn.init(linen::random::key(0), x);
  linen::GradWorkspace<float> ws;
  Tensor<float, 3> out(2, 10, 16);
  linen::AttentionGrads<float, float, 3> grads;
  const auto pullback = linen::vjp_into(attn, vars, x, out, ws);
  pullback(ct, grads);
  const Tensor<float, 3> out_before = out;
  const linen::AttentionGrads<float, float, 3> grads_before = grads;

  Tensor<float, 3> wrong_out(2, 10, 15);
  EXPECT_THROW(linen::vjp_into(attn, vars, x, wrong_out, ws), linen::invalid_argument);
  Tensor<float, 3> short_x(2, 9, 16);
  fill(short_x, 12);
  EXPECT_THROW(linen::vjp_into(attn, vars, short_x, out, ws), linen::invalid_argument);
  linen::GradOptions bad;
  bad.block_q = 0;
  EXPECT_THROW(linen::vjp_into(attn, vars, x, out, ws, {}, bad), linen::invalid_argument);
  EXPECT_TRUE(same_bits(out, out_before));
  Tensor<float, 3> wrong_ct(2, 10, 15);
  EXPECT_THROW(pullback(wrong_ct, grads), linen::invalid_argument);
  EXPECT_TRUE(same_grads(grads, grads_before));
  pullback(ct, grads);  // the tape survived the failed calls
  EXPECT_TRUE(same_grads(grads, grads_before));

  linen::CallOptions<float> sow;
  Index sown = 0;
  sow.sow_weights = [&sown](linen::ArrayRef<float> w) { sown = w.shape()[1]; };
  linen::GradOptions reference;
  reference.implementation = linen::Implementation::Reference;
  linen::vjp_into(attn, vars, x, out, ws, sow, reference)(ct, grads);
  EXPECT_EQ(sown, 2);
  const auto r = linen::vjp(attn, vars, x, sow, reference);
  EXPECT_TRUE(same_bits(out, r.output));
  EXPECT_TRUE(same_grads(grads, r.pullback(ct)));
}

}  // namespace

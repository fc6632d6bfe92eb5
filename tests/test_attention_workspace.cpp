// SPDX-License-Identifier: Apache-2.0
// The attention modules' forward without per-call allocation (issue 13, item 2):
//   apply_into(params, inputs..., out, AttentionWorkspace) allocates nothing after a
//   warm-up (every operator new counted, Eigen's allocator forbidden) and equals apply bit
//   for bit (and a module whose attention_fn calls dot_product_attention), on every path: masks (in place and gathered), a causal mask, dropout (shared
//   and per-head keep masks), no bias, normalize_qk, one or two query rows (the row
//   kernel), cross attention, every element type;
//   a plain apply keeps its scratch per thread: after a warm-up it makes no operator new
//   call (its returned tensor comes from Eigen's allocator);
//   a failed apply_into changes nothing, not even `out`; nested calls on one thread and
//   calls on several threads each get their own scratch.
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "test_support.hpp"

#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen_test::NoAllocation;
using linen_test::same_bits;

using linen::Index;
using linen::Tensor;

template <class T, int N>
void fill(Tensor<T, N>& t, unsigned seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(d(g));
}

enum class MaskKind { None, Padding, Gathered, Causal };

struct Case {
  Index lq = 12, lk = 12;       // lk != lq: cross attention (MultiHeadDotProductAttention)
  MaskKind mask = MaskKind::None;
  double dropout = 0.0;
  bool broadcast_dropout = true;
  bool normalize_qk = false;
  bool use_bias = true;
};

// inputs [2, 2, L, E] (two batch dims), E = 16, 2 heads; masks over [2, 2, 2, lq, lk].
template <class T, class P>
void expect_into_equals_apply_without_allocation(const Case& c) {
  SCOPED_TRACE(::testing::Message() << "lq=" << c.lq << " lk=" << c.lk << " mask=" << static_cast<int>(c.mask)
                                    << " dropout=" << c.dropout << " broadcast=" << c.broadcast_dropout
                                    << " normalize_qk=" << c.normalize_qk << " use_bias=" << c.use_bias);
  const Index B0 = 2, B1 = 2, E = 16;
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = 2;
  cfg.dropout_rate = c.dropout;
  cfg.broadcast_dropout = c.broadcast_dropout;
  cfg.normalize_qk = c.normalize_qk;
  cfg.use_bias = c.use_bias;
  const linen::MultiHeadDotProductAttention<T, P> attn(cfg);
  Tensor<T, 4> xq(B0, B1, c.lq, E), xk(B0, B1, c.lk, E);
  fill(xq, 1);
  fill(xk, 2);
  const auto vars = attn.init(linen::random::key(0), xq, xk);
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
  linen::AttentionWorkspace<T> ws;
  Tensor<T, 4> out(B0, B1, c.lq, E);
  attn.apply_into(vars.params, xq, xk, out, ws, call);  // warm-up
  EXPECT_TRUE(same_bits(out, attn.apply(vars.params, xq, xk, call)));
  // The in-place attention is dot_product_attention's: a module whose attention_fn calls
  // linen::dot_product_attention itself (so the module takes attention_fn's path) agrees
  // bit for bit.
  auto via_fn_cfg = cfg;
  via_fn_cfg.attention_fn = [](const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v,
                               const linen::AttentionOptions<T>& o) { return linen::dot_product_attention(q, k, v, o); };
  const linen::MultiHeadDotProductAttention<T, P> via_fn(via_fn_cfg);
  EXPECT_TRUE(same_bits(out, via_fn.apply(vars.params, xq, xk, call)));
  for (int round = 0; round < 3; ++round) {
    xq(0, 1, round % c.lq, round % E) += static_cast<T>(0.5f);
    xk(1, 0, round % c.lk, (round + 3) % E) -= static_cast<T>(0.25f);
    long news = 0;
    {
      NoAllocation guard;
      attn.apply_into(vars.params, xq, xk, out, ws, call);
      news = guard.count();
    }
    EXPECT_EQ(news, 0) << "operator new calls in apply_into after warm-up";
    EXPECT_TRUE(same_bits(out, attn.apply(vars.params, xq, xk, call))) << "round " << round;
  }
}

template <class T, class P>
void every_path() {
  expect_into_equals_apply_without_allocation<T, P>({});
  expect_into_equals_apply_without_allocation<T, P>({12, 12, MaskKind::Padding});
  expect_into_equals_apply_without_allocation<T, P>({12, 20, MaskKind::Gathered});
  expect_into_equals_apply_without_allocation<T, P>({12, 12, MaskKind::Causal, 0.0, true, true});
  expect_into_equals_apply_without_allocation<T, P>({12, 12, MaskKind::None, 0.3, true});
  expect_into_equals_apply_without_allocation<T, P>({12, 9, MaskKind::Padding, 0.3, false, false, false});
  expect_into_equals_apply_without_allocation<T, P>({1, 12, MaskKind::Gathered, 0.2, true, true});  // row kernel
  expect_into_equals_apply_without_allocation<T, P>({2, 7, MaskKind::None, 0.0, true, false, false});
}

TEST(AttentionWorkspace, FloatEveryPath) { every_path<float, float>(); }
TEST(AttentionWorkspace, DoubleEveryPath) { every_path<double, double>(); }
TEST(AttentionWorkspace, HalfEveryPath) { every_path<Eigen::half, Eigen::half>(); }
TEST(AttentionWorkspace, Bfloat16WithFloatParamsEveryPath) { every_path<Eigen::bfloat16, float>(); }

// SelfAttention, a longer sequence (several key tiles and query blocks), and one
// workspace shared by two shapes and two modules: alternating neither re-validates nor
// allocates.
TEST(AttentionWorkspace, SelfAttentionSharedWorkspaceAlternatingShapes) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  const linen::SelfAttention<float> a(cfg);
  auto cfg_b = cfg;
  cfg_b.normalize_qk = true;
  const linen::SelfAttention<float> b(cfg_b);
  Tensor<float, 3> x1(2, 300, 32), x2(1, 77, 32);
  fill(x1, 3);
  fill(x2, 4);
  const auto va = a.init(linen::random::key(0), x1), vb = b.init(linen::random::key(1), x1);
  linen::AttentionWorkspace<float> ws;
  Tensor<float, 3> o1(2, 300, 32), o2(1, 77, 32), o3(2, 300, 32);
  a.apply_into(va.params, x1, o1, ws);
  a.apply_into(va.params, x2, o2, ws);
  b.apply_into(vb.params, x1, o3, ws);
  long news = 0;
  {
    NoAllocation guard;
    for (int i = 0; i < 3; ++i) {
      a.apply_into(va.params, x1, o1, ws);
      a.apply_into(va.params, x2, o2, ws);
      b.apply_into(vb.params, x1, o3, ws);
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0);
  EXPECT_GT(ws.bytes(), 0u);
  EXPECT_TRUE(same_bits(o1, a.apply(va.params, x1)));
  EXPECT_TRUE(same_bits(o2, a.apply(va.params, x2)));
  EXPECT_TRUE(same_bits(o3, b.apply(vb.params, x1)));
  ws.release();
  EXPECT_EQ(ws.bytes(), 0u);
  a.apply_into(va.params, x1, o1, ws);  // validates and allocates again
  EXPECT_TRUE(same_bits(o1, a.apply(va.params, x1)));
}

// A plain apply keeps its scratch per thread: after a warm-up no operator new (the returned
// tensor is Eigen's allocation), the same bits after release_thread_scratch().
TEST(AttentionWorkspace, PlainApplyKeepsItsScratchPerThread) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 4;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 200, 32);
  fill(x, 5);
  const auto vars = attn.init(linen::random::key(0), x);
  Tensor<bool, 4> mask(2, 1, 200, 200);
  mask.setConstant(true);
  mask(1, 0, 3, 4) = false;
  linen::CallOptions<float> call;
  call.mask = mask;
  const Tensor<float, 3> first = attn.apply(vars, x, call);
  long news = 0;
  {
    NoAllocation guard(false);
    for (int i = 0; i < 3; ++i) {
      const Tensor<float, 3> y = attn.apply(vars, x, call);
      EXPECT_TRUE(same_bits(y, first));
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0) << "operator new calls in plain apply after warm-up";
  linen::release_thread_scratch();
  EXPECT_TRUE(same_bits(attn.apply(vars, x, call), first));
  // The mutable-variables overload takes the same path.
  auto mutable_vars = vars;
  EXPECT_TRUE(same_bits(attn.apply(mutable_vars, x, call), first));
}

// Threads: each has its own scratch (concurrent plain applies of different shapes agree
// with the single-threaded results).
TEST(AttentionWorkspace, ThreadsDoNotShareScratch) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> xa(1, 150, 16), xb(3, 40, 16);
  fill(xa, 6);
  fill(xb, 7);
  const auto vars = attn.init(linen::random::key(0), xa);
  const Tensor<float, 3> ya = attn.apply(vars, xa), yb = attn.apply(vars, xb);
  std::atomic<int> bad{0};
  auto work = [&](const Tensor<float, 3>& x, const Tensor<float, 3>& want) {
    for (int i = 0; i < 20; ++i)
      if (!same_bits(attn.apply(vars, x), want)) ++bad;
  };
  std::thread t1(work, std::cref(xa), std::cref(ya)), t2(work, std::cref(xb), std::cref(yb));
  work(xa, ya);
  t1.join();
  t2.join();
  EXPECT_EQ(bad.load(), 0);
}

// A dropout_rng that itself applies the module (on the same thread, while the outer call
// holds the thread's scratch): the inner call uses scratch of its own, both are right.
TEST(AttentionWorkspace, NestedApplyOnOneThread) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.dropout_rate = 0.25;
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 30, 16), inner_x(1, 50, 16);
  fill(x, 8);
  fill(inner_x, 9);
  const auto vars = attn.init(linen::random::key(0), x);
  linen::CallOptions<float> det;
  det.deterministic = true;
  const Tensor<float, 3> inner_want = attn.apply(vars, inner_x, det);
  Tensor<float, 3> inner_got;
  const linen::random::Key key = linen::random::key(3);
  linen::CallOptions<float> call;
  call.deterministic = false;
  call.dropout_rng = [&](double p, const linen::Shape& shape, bool* keep) {
    inner_got = attn.apply(vars, inner_x, det);
    key.bernoulli(p, shape, keep);
  };
  linen::CallOptions<float> plain = call;
  plain.dropout_rng = key;
  const Tensor<float, 3> want = attn.apply(vars, x, plain);
  EXPECT_TRUE(same_bits(attn.apply(vars, x, call), want));
  EXPECT_TRUE(same_bits(inner_got, inner_want));
}

// Every bad input throws before anything is written: `out` keeps its bytes, also after a
// warm-up of good shapes (validated shapes never excuse others).
TEST(AttentionWorkspace, FailedCallChangesNothing) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  cfg.dropout_rate = 0.1;
  const linen::MultiHeadDotProductAttention<float> attn(cfg);
  Tensor<float, 3> x(2, 10, 16);
  fill(x, 10);
  const auto vars = attn.init(linen::random::key(0), x);
  linen::CallOptions<float> det;
  det.deterministic = true;
  linen::AttentionWorkspace<float> ws;
  Tensor<float, 3> out(2, 10, 16);
  attn.apply_into(vars.params, x, out, ws, det);  // warm-up
  out.setConstant(42.0f);
  const Tensor<float, 3> sentinel = out;
  auto expect_unchanged = [&](const char* what) { EXPECT_TRUE(same_bits(out, sentinel)) << what; };

  Tensor<float, 3> wrong_out(2, 10, 15);
  EXPECT_THROW(attn.apply_into(vars.params, x, wrong_out, ws, det), linen::invalid_argument);
  auto bad = vars.params;
  bad.key.kernel = Tensor<float, 3>(16, 2, 7);
  EXPECT_THROW(attn.apply_into(bad, x, out, ws, det), linen::invalid_argument);
  expect_unchanged("wrong key/kernel");
  Tensor<bool, 4> mask(2, 1, 10, 11);
  mask.setConstant(true);
  linen::CallOptions<float> masked = det;
  masked.mask = mask;
  EXPECT_THROW(attn.apply_into(vars.params, x, out, ws, masked), linen::invalid_argument);
  expect_unchanged("mask that does not broadcast");
  linen::CallOptions<float> no_rng;
  no_rng.deterministic = false;
  EXPECT_THROW(attn.apply_into(vars.params, x, out, ws, no_rng), linen::invalid_argument);
  expect_unchanged("dropout without a dropout_rng");
  linen::CallOptions<float> both = det;
  const linen::MultiHeadDotProductAttention<float> fixed([&] {
    auto c = cfg;
    c.deterministic = true;
    return c;
  }());
  EXPECT_THROW(fixed.apply_into(vars.params, x, out, ws, both), linen::invalid_argument);
  expect_unchanged("deterministic passed twice");
  linen::CallOptions<float> throwing;
  throwing.deterministic = false;
  throwing.dropout_rng = [](double, const linen::Shape&, bool*) { throw std::runtime_error("rng failed"); };
  EXPECT_THROW(attn.apply_into(vars.params, x, out, ws, throwing), std::runtime_error);
  expect_unchanged("a dropout_rng that throws");
  Tensor<float, 3> short_x(2, 9, 16);  // a new shape after the warm-up is checked in full
  fill(short_x, 11);
  EXPECT_THROW(attn.apply_into(vars.params, short_x, out, ws, det), linen::invalid_argument);
  expect_unchanged("out of the old shape for a new input");
  // decode modules take decode_step
  auto dcfg = cfg;
  dcfg.decode = true;
  const linen::MultiHeadDotProductAttention<float> dec(dcfg);
  EXPECT_THROW(dec.apply_into(vars.params, x, out, ws, det), linen::invalid_argument);
  expect_unchanged("decode=true");
}

// Another attention_fn (or sowing) is called as apply calls it, and the result copied.
TEST(AttentionWorkspace, CustomAttentionFnAndSowingFallBackToApply) {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = 2;
  int calls = 0;
  cfg.attention_fn = [&calls](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                              const linen::AttentionOptions<float>& o) {
    ++calls;
    linen::AttentionOptions<float> r = o;
    r.implementation = linen::Implementation::Reference;
    return linen::dot_product_attention(q, k, v, r);
  };
  const linen::SelfAttention<float> attn(cfg);
  Tensor<float, 3> x(1, 9, 8);
  fill(x, 12);
  const auto vars = attn.init(linen::random::key(0), x);
  linen::AttentionWorkspace<float> ws;
  Tensor<float, 3> out(1, 9, 8);
  attn.apply_into(vars.params, x, out, ws);
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(same_bits(out, attn.apply(vars.params, x)));
  Tensor<float, 3> wrong(1, 9, 7);
  EXPECT_THROW(attn.apply_into(vars.params, x, wrong, ws), linen::invalid_argument);

  const linen::SelfAttention<float> plain([] {
    linen::AttentionConfig<float> c;
    c.num_heads = 2;
    return c;
  }());
  const auto pv = plain.init(linen::random::key(1), x);
  linen::Tensor<float, 4> sown;
  linen::CallOptions<float> sow;
  sow.sow_weights = [&sown](linen::ArrayRef<float> w) {
    sown.resize(w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    std::copy(w.data(), w.data() + sown.size(), sown.data());
  };
  plain.apply_into(pv.params, x, out, ws, sow);
  EXPECT_EQ(sown.dimension(1), 2);
  EXPECT_TRUE(same_bits(out, plain.apply(pv.params, x, sow)));
}

}  // namespace

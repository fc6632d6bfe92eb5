// SPDX-License-Identifier: Apache-2.0
// Mask helpers against Flax's definitions (flax/linen/attention.py):
//   make_attention_mask: pairwise_fn(q[..., :, None], k[..., None, :]), expand_dims(-3),
//                        then extra_batch_dims leading singleton dims.
//   make_causal_mask:    make_attention_mask(arange, arange, greater_equal).
//   combine_masks:       logical_and of the non-None masks, None when all are None.
#include <functional>
#include <optional>

#include <gtest/gtest.h>

#include <linen/linen.hpp>

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;

TEST(MakeAttentionMask, PaddingMaskMatchesFlaxDefinition) {
  // Two sequences of lengths 3 and 1 (1 = token, 0 = padding), as a Flax user writes
  // make_attention_mask(x > 0, x > 0).
  Tensor<int, 2> q(2, 4), k(2, 5);
  q.setValues({{1, 1, 1, 0}, {2, 0, 0, 0}});
  k.setValues({{1, 1, 0, 0, 0}, {3, 3, 3, 3, 0}});
  const Tensor<bool, 4> m = linen::make_attention_mask(q, k);
  EXPECT_EQ(linen::shape_of(m), Shape({2, 1, 4, 5}));
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 5; ++j) EXPECT_EQ(m(b, 0, i, j), q(b, i) * k(b, j) != 0);
}

TEST(MakeAttentionMask, PairwiseFnExtraBatchDimsAndBatchBroadcast) {
  Tensor<float, 3> q(2, 1, 3), k(1, 3, 2);  // batch dims (2, 1) and (1, 3) broadcast to (2, 3)
  q.setValues({{{0.f, 1.f, 2.f}}, {{3.f, 4.f, 5.f}}});
  k.setValues({{{1.f, 4.f}, {2.f, 2.f}, {5.f, 0.f}}});
  const auto m = linen::make_attention_mask<2>(q, k, std::less<float>());
  static_assert(std::is_same_v<std::decay_t<decltype(m)>, Tensor<bool, 7>>);
  EXPECT_EQ(linen::shape_of(m), Shape({1, 1, 2, 3, 1, 3, 2}));
  for (Index a = 0; a < 2; ++a)
    for (Index b = 0; b < 3; ++b)
      for (Index i = 0; i < 3; ++i)
        for (Index j = 0; j < 2; ++j) EXPECT_EQ(m(0, 0, a, b, 0, i, j), q(a, 0, i) < k(0, b, j));
}

TEST(MakeAttentionMask, BatchDimsThatDoNotBroadcastThrowNamingBoth) {
  Tensor<int, 2> q(2, 4), k(3, 4);
  q.setZero();
  k.setZero();
  try {
    (void)linen::make_attention_mask(q, k);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(2,) and (3,)"), std::string::npos) << e.what();
  }
}

TEST(MakeCausalMask, LowerTriangleWithFlaxShape) {
  Tensor<float, 2> x(3, 6);  // [batch, len]: only the shape is read
  x.setRandom();
  const Tensor<bool, 4> m = linen::make_causal_mask(x);
  EXPECT_EQ(linen::shape_of(m), Shape({3, 1, 6, 6}));
  for (Index b = 0; b < 3; ++b)
    for (Index i = 0; i < 6; ++i)
      for (Index j = 0; j < 6; ++j) EXPECT_EQ(m(b, 0, i, j), j <= i);
  Tensor<int, 1> nobatch(4);
  nobatch.setZero();
  const auto m1 = linen::make_causal_mask<1>(nobatch);
  EXPECT_EQ(linen::shape_of(m1), Shape({1, 1, 4, 4}));
  EXPECT_TRUE(m1(0, 0, 3, 0));
  EXPECT_FALSE(m1(0, 0, 0, 3));
  Tensor<int, 3> multi(2, 3, 5);
  multi.setZero();
  EXPECT_EQ(linen::shape_of(linen::make_causal_mask(multi)), Shape({2, 3, 1, 5, 5}));
}

TEST(CombineMasks, LogicalAndSkippingNone) {
  Tensor<bool, 4> causal(1, 1, 3, 3), padding(2, 1, 1, 3);
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 3; ++j) causal(0, 0, i, j) = j <= i;
  padding.setValues({{{{true, true, false}}}, {{{true, false, false}}}});
  const std::optional<Tensor<bool, 4>> none;
  const auto m = linen::combine_masks(&causal, nullptr, padding, none, std::nullopt);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(linen::shape_of(*m), Shape({2, 1, 3, 3}));
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 3; ++i)
      for (Index j = 0; j < 3; ++j) EXPECT_EQ((*m)(b, 0, i, j), causal(0, 0, i, j) && padding(b, 0, 0, j));
  const Tensor<bool, 4>* null_mask = nullptr;
  EXPECT_FALSE(linen::combine_masks(null_mask, none).has_value());
  // A single mask comes back unchanged.
  const auto one = linen::combine_masks(causal);
  ASSERT_TRUE(one.has_value());
  for (Index n = 0; n < causal.size(); ++n) EXPECT_EQ(one->data()[n], causal.data()[n]);
}

TEST(CombineMasks, ShapesThatDoNotBroadcastThrow) {
  Tensor<bool, 2> a(2, 3), b(2, 4);
  a.setConstant(true);
  b.setConstant(true);
  EXPECT_THROW((void)linen::combine_masks(a, b), std::invalid_argument);
}

TEST(Masks, CausalMaskDrivesAttention) {
  // Position i attends to 0..i only: changing value at a later position must not change
  // earlier outputs.
  const auto mask = linen::make_causal_mask(Tensor<float, 2>(1, 5).setZero());
  Tensor<float, 4> q(1, 5, 1, 2), v(1, 5, 1, 2);
  q.setRandom();
  v.setRandom();
  linen::AttentionOptions<float> opt;
  opt.mask = mask;
  const auto out1 = linen::dot_product_attention(q, q, v, opt);
  v(0, 4, 0, 0) += 10.0f;
  const auto out2 = linen::dot_product_attention(q, q, v, opt);
  for (Index i = 0; i < 4; ++i) EXPECT_EQ(out1(0, i, 0, 0), out2(0, i, 0, 0));
  EXPECT_NE(out1(0, 4, 0, 0), out2(0, 4, 0, 0));
}

}  // namespace

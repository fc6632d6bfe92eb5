// SPDX-License-Identifier: Apache-2.0
// compile_fail control: the valid twin of every case in this directory. It must compile,
// which proves that the harness's include paths and flags work, so that the other cases
// fail for the contract they break and not for a setup problem.
#include <linen/io/variables.hpp>
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<float> config;
  config.num_heads = 2;
  const linen::SelfAttention<float> self(config);
  const linen::MultiHeadDotProductAttention<float, float> mha(config);
  linen::Tensor<float, 3> x(1, 3, 4), x2(1, 3, 4);
  x.setZero();
  x2.setZero();
  const auto vars = self.init(linen::random::key(0), x);
  (void)self.apply(vars, x);
  (void)mha.apply(mha.init(linen::random::key(0), x, x2), x, x2);

  linen::Tensor<float, 4> q(1, 3, 2, 2);
  q.setZero();
  const linen::Tensor<float, 3> tokens(1, 1, 3);
  const linen::Tensor<bool, 5> causal = linen::make_causal_mask(tokens);
  const linen::Tensor<float, 4> bias(1, 2, 3, 3);
  linen::AttentionOptions<float> opt;
  opt.bias = bias;
  (void)opt;
  linen::Tensor<bool, 4> mask(1, 1, 3, 3);
  mask.setConstant(true);
  opt.mask = mask;
  (void)linen::dot_product_attention(q, q, q, opt);
  (void)linen::dot_product_attention_weights(q, q);
  linen::CallOptions<float> call;
  call.mask = mask;
  (void)self.apply(vars, x, call);

  (void)linen::combine_masks(mask, mask);
  (void)linen::make_attention_mask(linen::Tensor<float, 2>(1, 3), linen::Tensor<float, 2>(1, 3));
  (void)causal;
  const linen::DenseGeneral<float> dense;
  const linen::LayerNorm<float> norm;
  linen::random::RngScope scope(linen::random::key(0));
  (void)dense.init(scope.push("dense"), {4});
  (void)norm.init(scope.push("norm"), 4);
  (void)self.init(scope.push("attn"), x);
  (void)linen::random::normal<float>(linen::random::key(0), {2});
  linen::io::Variables v;
  v.set("params/x", linen::Tensor<float, 1>(2));
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: inputs_q and inputs_k of a module must have the same rank.
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<float> config;
  config.num_heads = 2;
  const linen::MultiHeadDotProductAttention<float> layer(config);
  linen::Tensor<float, 3> q(1, 3, 4);
  linen::Tensor<float, 4> k(1, 1, 3, 4);
  (void)layer.init(linen::random::key(0), q, k);
  return 0;
}

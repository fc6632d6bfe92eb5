// SPDX-License-Identifier: Apache-2.0
// compile_fail: module inputs are [batch..., length, features] (rank >= 2).
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<float> config;
  config.num_heads = 2;
  const linen::SelfAttention<float> layer(config);
  linen::Tensor<float, 1> x(4);
  (void)layer.init(linen::random::key(0), x);
  return 0;
}

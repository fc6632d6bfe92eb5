// SPDX-License-Identifier: Apache-2.0
// compile_fail: module inputs must be row-major linen tensors (or maps of one).
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<float> config;
  config.num_heads = 2;
  const linen::SelfAttention<float> layer(config);
  Eigen::Tensor<float, 3> x(1, 3, 4);  // ColMajor
  (void)layer.init(linen::random::key(0), x);
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: a module's element type must be float, double, Eigen::half or Eigen::bfloat16.
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<int> config;
  config.num_heads = 2;
  const linen::SelfAttention<int> layer(config);
  (void)layer;
  return 0;
}

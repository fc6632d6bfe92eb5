// SPDX-License-Identifier: Apache-2.0
// compile_fail: a module's init draws from the RngScope it is given (its counter
// advances, as Flax's does): a const scope cannot serve.
#include <linen/linen.hpp>

int main() {
  linen::AttentionConfig<float> config;
  config.num_heads = 2;
  const linen::SelfAttention<float> layer(config);
  linen::Tensor<float, 3> x(1, 3, 4);
  const linen::random::RngScope scope(linen::random::key(0));
  (void)layer.init(scope, x);
  return 0;
}

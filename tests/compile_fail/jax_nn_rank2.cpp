// SPDX-License-Identifier: Apache-2.0
// compile_fail: jax_nn::dot_product_attention needs [B, T, N, H] or [T, N, H] (rank 3 or 4).
#include <linen/jax_nn.hpp>

int main() {
  linen::Tensor<float, 2> q(3, 4);
  q.setZero();
  (void)linen::jax_nn::dot_product_attention(q, q, q);
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: jax_nn::dot_product_attention's query, key and value share key's dtype.
#include <linen/jax_nn.hpp>

int main() {
  linen::Tensor<float, 4> q(1, 2, 1, 4);
  linen::Tensor<double, 4> k(1, 2, 1, 4);
  q.setZero();
  k.setZero();
  (void)linen::jax_nn::dot_product_attention(q, k, k);
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: query, key and value must have the same rank.
#include <linen/linen.hpp>

int main() {
  linen::Tensor<float, 4> q(1, 3, 2, 4), v(1, 3, 2, 4);
  linen::Tensor<float, 3> k(3, 2, 4);
  (void)linen::dot_product_attention(q, k, v);
  return 0;
}

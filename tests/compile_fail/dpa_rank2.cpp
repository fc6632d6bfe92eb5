// SPDX-License-Identifier: Apache-2.0
// compile_fail: dot_product_attention needs [batch..., length, num_heads, depth] (rank >= 3).
#include <linen/linen.hpp>

int main() {
  linen::Tensor<float, 2> q(3, 4);
  q.setZero();
  (void)linen::dot_product_attention(q, q, q);
  return 0;
}

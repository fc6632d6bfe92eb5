// SPDX-License-Identifier: Apache-2.0
// compile_fail: dot_product_attention computes in float, double, Eigen::half or Eigen::bfloat16.
#include <linen/linen.hpp>

int main() {
  linen::Tensor<int, 4> q(1, 3, 2, 4);
  q.setZero();
  (void)linen::dot_product_attention(q, q, q);
  return 0;
}

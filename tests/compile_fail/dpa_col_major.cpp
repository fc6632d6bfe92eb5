// SPDX-License-Identifier: Apache-2.0
// compile_fail: a column-major Eigen tensor would be read in the wrong order: refused.
#include <linen/linen.hpp>

int main() {
  Eigen::Tensor<float, 4> q(1, 3, 2, 4);  // ColMajor, Eigen's default
  q.setZero();
  (void)linen::dot_product_attention(q, q, q);
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: masks are bool tensors (a float mask must be compared first: m != 0).
#include <linen/linen.hpp>

int main() {
  linen::Tensor<float, 4> a(1, 1, 3, 3);
  (void)linen::combine_masks(a);
  return 0;
}

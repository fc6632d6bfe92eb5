// SPDX-License-Identifier: Apache-2.0
// compile_fail: combine_masks needs masks of one rank (Flax asserts the same at run time).
#include <linen/linen.hpp>

int main() {
  linen::Tensor<bool, 3> a(1, 3, 3);
  linen::Tensor<bool, 4> b(1, 1, 3, 3);
  (void)linen::combine_masks(a, b);
  return 0;
}

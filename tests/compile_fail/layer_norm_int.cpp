// SPDX-License-Identifier: Apache-2.0
// compile_fail: LayerNorm's element types must be floating element types.
#include <linen/linen.hpp>

int main() {
  const linen::LayerNorm<float, int> norm;
  (void)norm;
  return 0;
}

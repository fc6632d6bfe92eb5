// SPDX-License-Identifier: Apache-2.0
// compile_fail: init takes a key, an RngScope or a C++ engine, not a seed.
#include <linen/linen.hpp>

int main() {
  const linen::LayerNorm<float> norm;
  (void)norm.init(0, 4);
  return 0;
}

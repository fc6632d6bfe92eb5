// SPDX-License-Identifier: Apache-2.0
// compile_fail: DenseGeneral's element types must be floating element types.
#include <linen/linen.hpp>

int main() {
  const linen::DenseGeneral<int> dense;
  (void)dense;
  return 0;
}

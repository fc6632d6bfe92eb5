// SPDX-License-Identifier: Apache-2.0
// compile_fail: random floats are float, double, Eigen::half or Eigen::bfloat16.
#include <linen/linen.hpp>

int main() {
  (void)linen::random::normal<int>(linen::random::key(0), {2});
  return 0;
}

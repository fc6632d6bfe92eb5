// SPDX-License-Identifier: Apache-2.0
// compile_fail: AttentionOptions::bias is a view; binding it to a temporary would dangle.
#include <linen/linen.hpp>

int main() {
  linen::AttentionOptions<float> opt;
  opt.bias = linen::Tensor<float, 4>(1, 2, 3, 3);
  return opt.bias ? 0 : 1;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: AttentionOptions::mask is a view; binding it to a temporary would dangle.
#include <linen/linen.hpp>

int main() {
  const linen::Tensor<float, 2> tokens(1, 3);
  linen::AttentionOptions<float> opt;
  opt.mask = linen::make_causal_mask(tokens);
  return opt.mask ? 0 : 1;
}

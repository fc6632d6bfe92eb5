// SPDX-License-Identifier: Apache-2.0
// compile_fail: make_attention_mask's query_input and key_input must have the same rank.
#include <linen/linen.hpp>

int main() {
  linen::Tensor<float, 2> q(2, 3);
  linen::Tensor<float, 1> k(3);
  (void)linen::make_attention_mask(q, k);
  return 0;
}

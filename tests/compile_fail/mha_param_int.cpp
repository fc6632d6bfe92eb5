// SPDX-License-Identifier: Apache-2.0
// compile_fail: the parameter type (Flax's param_dtype) must be a floating element type.
#include <linen/linen.hpp>

int main() {
  using Layer = linen::MultiHeadDotProductAttention<float, int>;
  return sizeof(Layer) > 0 ? 0 : 1;
}

// SPDX-License-Identifier: Apache-2.0
// compile_fail: CallOptions::mask is a view; binding it to a temporary would dangle.
#include <linen/linen.hpp>

int main() {
  linen::CallOptions<float> call;
  call.mask = linen::Tensor<bool, 4>(1, 1, 3, 3);
  return call.mask ? 0 : 1;
}

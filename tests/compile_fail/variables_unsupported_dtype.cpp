// SPDX-License-Identifier: Apache-2.0
// compile_fail: a checkpoint stores only the dtypes of safetensors and Flax msgpack.
#include <linen/io/variables.hpp>

int main() {
  linen::io::Variables v;
  v.set("params/x", linen::Tensor<long double, 1>(2));
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
//
// linen's package test: one attention whose result is known in closed form (a zero query
// gives uniform weights: each output row is the mean of the value rows), and, with
// linen::io, a tensor written and read back as Flax msgpack.
#include <cmath>
#include <cstdio>

#include <linen/linen.hpp>
#if defined(LINEN_TEST_IO)
#include <linen/io/msgpack.hpp>
#endif

int main() {
  linen::Tensor<float, 4> q(1, 2, 1, 3), k(1, 4, 1, 3), v(1, 4, 1, 3);
  q.setZero();
  for (linen::Index i = 0; i < k.size(); ++i) k.data()[i] = 0.5f * static_cast<float>(i);
  for (linen::Index i = 0; i < v.size(); ++i) v.data()[i] = static_cast<float>(i);
  const linen::Tensor<float, 4> out = linen::dot_product_attention(q, k, v);
  for (linen::Index d = 0; d < 3; ++d) {
    const float want = (0.0f + 3 + 6 + 9) / 4 + static_cast<float>(d);
    if (std::fabs(out(0, 1, 0, d) - want) > 1e-5f) {
      std::fprintf(stderr, "test_package: out[0, 1, 0, %ld] = %g, want %g\n", static_cast<long>(d),
                   static_cast<double>(out(0, 1, 0, d)), static_cast<double>(want));
      return 1;
    }
  }
#if defined(LINEN_TEST_IO)
  linen::io::Variables tree;
  tree.set("params/value", v);
  linen::io::save_msgpack("test_package.msgpack", tree);
  const linen::Tensor<float, 4> back = linen::io::load_msgpack("test_package.msgpack").get<float, 4>("params/value");
  for (linen::Index i = 0; i < v.size(); ++i)
    if (back.data()[i] != v.data()[i]) {
      std::fprintf(stderr, "test_package: msgpack round trip changed element %ld\n", static_cast<long>(i));
      return 1;
    }
#endif
  std::printf("test_package: linen %d.%d.%d works\n", LINEN_VERSION_MAJOR, LINEN_VERSION_MINOR, LINEN_VERSION_PATCH);
  return 0;
}

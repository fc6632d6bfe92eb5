// SPDX-License-Identifier: Apache-2.0
//
// The pkg-config consumer's checkpoint program (tests/consumer/pkg_config.cmake), built
// with `pkg-config --cflags --libs linen-io` only: it writes a small Variables tree as
// safetensors, Flax msgpack and (where linen-io has libzstd) Orbax, reads each back and
// exits non-zero unless every value returns unchanged.
#include <cstdio>
#include <filesystem>
#include <string>

#include <linen/io/msgpack.hpp>
#include <linen/io/safetensors.hpp>
#if defined(LINEN_HAS_ZSTD)
#include <linen/io/orbax.hpp>
#endif

namespace {

int failures = 0;

void expect_same(const char* format, const linen::io::Variables& got, const linen::Tensor<float, 2>& want) {
  const linen::Tensor<float, 2> back = got.get<float, 2>("params/dense/kernel");
  for (linen::Index i = 0; i < want.size(); ++i) {
    if (back.data()[i] != want.data()[i]) {
      std::fprintf(stderr, "consumer_pkg_config: %s: element %ld is %g, want %g\n", format, static_cast<long>(i),
                   static_cast<double>(back.data()[i]), static_cast<double>(want.data()[i]));
      ++failures;
      return;
    }
  }
  std::printf("consumer_pkg_config: %s round trip passed\n", format);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <scratch directory>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  linen::Tensor<float, 2> kernel(3, 5);
  for (linen::Index i = 0; i < kernel.size(); ++i) kernel.data()[i] = 0.25f * static_cast<float>(i) - 1.0f;
  linen::io::Variables v;
  v.set("params/dense/kernel", kernel);

  linen::io::save_safetensors((dir / "v.safetensors").string(), v);
  expect_same("safetensors", linen::io::load_safetensors((dir / "v.safetensors").string()), kernel);
  linen::io::save_msgpack((dir / "v.msgpack").string(), v);
  expect_same("msgpack", linen::io::load_msgpack((dir / "v.msgpack").string()), kernel);
#if defined(LINEN_HAS_ZSTD)
  std::filesystem::remove_all(dir / "orbax");
  linen::io::save_orbax((dir / "orbax").string(), v);
  expect_same("orbax", linen::io::load_orbax((dir / "orbax").string()), kernel);
#endif
  return failures == 0 ? 0 : 1;
}

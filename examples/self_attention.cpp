// SPDX-License-Identifier: Apache-2.0
//
// Run a Flax SelfAttention layer in C++ from its checkpoint.
//
//   linen_example_self_attention FILE.safetensors NUM_HEADS
//
// FILE holds the layer's Flax variables under their Flax paths (params/query/kernel, ...),
// as a Flax user exports them, e.g. with
//   flat = flax.traverse_util.flatten_dict(variables, sep="/")
//   safetensors.numpy.save_file({k: np.asarray(v) for k, v in flat.items()}, "attn.safetensors")
// The test data's files also hold the inputs Flax saw (`inputs/q`), its `mask` and its
// `output`: this program runs the layer on them and checks it reproduces Flax.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <linen/io/attention.hpp>
#include <linen/io/safetensors.hpp>
#include <linen/linen.hpp>

int main(int argc, char** argv) {
  const std::string file = argc > 1 ? argv[1] : "tests/data/flax/self_causal.safetensors";
  const long heads = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 4;

  // nn.SelfAttention(num_heads=heads): Flax's constructor, field by field.
  linen::AttentionConfig<float> config;
  config.num_heads = heads;
  const linen::SelfAttention<float> attention(config);

  // variables = {'params': ...}, bound by Flax path; every shape is checked.
  const linen::io::Variables checkpoint = linen::io::load_safetensors(file);
  const auto variables = linen::io::load_attention(checkpoint, config);

  // x: [batch, length, features]. Here Flax's own inputs; in an application, yours.
  const linen::Tensor<float, 3> x = checkpoint.get<float, 3>("inputs/q");
  std::printf("%s: SelfAttention(num_heads=%ld) on x of shape %s\n", file.c_str(), heads,
              linen::to_string(linen::shape_of(x)).c_str());

  // mask = nn.make_causal_mask(tokens): [batch, 1, length, length] (or the mask Flax saw).
  const linen::Tensor<float, 2> tokens(x.dimension(0), x.dimension(1));  // only its shape is read
  const linen::Tensor<bool, 4> mask =
      checkpoint.contains("mask") ? checkpoint.get<bool, 4>("mask") : linen::make_causal_mask(tokens);
  linen::CallOptions<float> call;
  call.mask = mask;

  // y = layer.apply(variables, x, mask=mask)
  const linen::Tensor<float, 3> y = attention.apply(variables, x, call);
  for (linen::Index i = 0; i < y.dimension(1); ++i) {
    std::printf("y[0, %ld, :4] =", static_cast<long>(i));
    for (linen::Index j = 0; j < std::min<linen::Index>(4, y.dimension(2)); ++j) std::printf(" % .5f", y(0, i, j));
    std::printf("\n");
  }

  if (checkpoint.contains("output")) {
    const linen::Tensor<float, 3> flax = checkpoint.get<float, 3>("output");
    double err = 0, scale = 0;
    for (linen::Index n = 0; n < y.size(); ++n) {
      err = std::max(err, std::abs(double(y.data()[n]) - flax.data()[n]));
      scale = std::max(scale, std::abs(double(flax.data()[n])));
    }
    std::printf("max |linen - flax| / max |flax| = %.3g\n", err / scale);
    if (!(err / scale <= 2e-6)) {
      std::printf("FAILED: differs from Flax's output\n");
      return 1;
    }
  }
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
//
// Greedy autoregressive decoding through SelfAttention's cache (Flax's decode=True).
//
//   linen_example_decode FILE.safetensors NUM_HEADS
//
// A toy language model around a trained attention layer: token embeddings in, the
// attention layer with its decode cache, logits out through the tied embedding. Each
// step feeds one position ([batch, 1, features]); the layer writes its key and value into
// the cache and attends to every position so far. The program then checks the decoded
// outputs against one full causal pass over the generated sequence, which must agree.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <linen/io/attention.hpp>
#include <linen/io/safetensors.hpp>
#include <linen/linen.hpp>

int main(int argc, char** argv) {
  const std::string file = argc > 1 ? argv[1] : "tests/data/flax/decode_basic.safetensors";
  const long heads = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 4;
  using linen::Index;
  using linen::Tensor;

  linen::AttentionConfig<float> config;
  config.num_heads = heads;
  config.decode = true;  // nn.SelfAttention(num_heads=heads, decode=True)
  const linen::SelfAttention<float> attention(config);
  auto variables = linen::io::load_attention(linen::io::load_safetensors(file), config);
  const Index features = variables.params.query.kernel.dimension(0);

  // A fixed random embedding table for a 12-token vocabulary (the toy model's own weights).
  const Index vocab = 12, max_length = 10, batch = 1;
  Tensor<float, 2> embed(vocab, features);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index n = 0; n < embed.size(); ++n) embed.data()[n] = normal(gen);

  // cache = zeros [batch, max_length, heads, head_dim], cache_index = 0.
  variables.cache = attention.init_cache(variables.params, {batch}, max_length);

  std::vector<Index> tokens{3};  // the prompt
  Tensor<float, 3> decoded(batch, max_length, features);
  for (Index step = 0; step < max_length; ++step) {
    Tensor<float, 3> x(batch, 1, features);  // embed(tokens[step])
    for (Index f = 0; f < features; ++f) x(0, 0, f) = embed(tokens[static_cast<std::size_t>(step)], f);
    const Tensor<float, 3> y = attention.apply(variables, x);  // one position through the cache
    for (Index f = 0; f < features; ++f) decoded(0, step, f) = y(0, 0, f);
    // logits = y . embed^T; greedy choice.
    Index best = 0;
    float best_logit = -INFINITY;
    for (Index v = 0; v < vocab; ++v) {
      float logit = 0;
      for (Index f = 0; f < features; ++f) logit += y(0, 0, f) * embed(v, f);
      if (logit > best_logit) best_logit = logit, best = v;
    }
    if (step + 1 < max_length) tokens.push_back(best);
  }
  std::printf("decoded tokens:");
  for (Index t : tokens) std::printf(" %ld", static_cast<long>(t));
  std::printf("\ncache_index after decoding: %d of %ld\n", variables.cache->cache_index,
              static_cast<long>(variables.cache->max_length()));

  // The same sequence in one causal pass (decode=False) must give the same outputs.
  auto full_config = config;
  full_config.decode = false;
  Tensor<float, 3> xs(batch, max_length, features);
  for (Index t = 0; t < max_length; ++t)
    for (Index f = 0; f < features; ++f) xs(0, t, f) = embed(tokens[static_cast<std::size_t>(t)], f);
  const Tensor<bool, 4> causal = linen::make_causal_mask(Tensor<int, 2>(batch, max_length));
  linen::CallOptions<float> call;
  call.mask = causal;
  const linen::SelfAttention<float>::Variables params_only{variables.params, std::nullopt};
  const Tensor<float, 3> full = linen::SelfAttention<float>(full_config).apply(params_only, xs, call);
  double err = 0, scale = 0;
  for (Index n = 0; n < full.size(); ++n) {
    err = std::max(err, std::abs(double(full.data()[n]) - decoded.data()[n]));
    scale = std::max(scale, std::abs(double(full.data()[n])));
  }
  std::printf("max |decode - full causal pass| / max = %.3g\n", err / scale);
  if (!(err / scale <= 2e-6)) {
    std::printf("FAILED: decoding disagrees with the causal pass\n");
    return 1;
  }
  // One more step would overflow the cache: linen throws where Flax would overwrite.
  try {
    (void)attention.apply(variables, Tensor<float, 3>(batch, 1, features).setZero());
    std::printf("FAILED: a step past max_length did not throw\n");
    return 1;
  } catch (const linen::cache_overflow& e) {
    std::printf("a step past max_length throws: %s\n", e.what());
  }
  return 0;
}

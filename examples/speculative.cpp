// SPDX-License-Identifier: Apache-2.0
//
// Speculative decoding through SelfAttention's cache: a draft model proposes k tokens, the
// target verifies them in one multi-token step (decode_chunk), and both caches roll back
// to the accepted prefix (linen::rollback).
//
//   linen_example_speculative FILE.safetensors NUM_HEADS
//
// The toy language model of examples/decode.cpp (embeddings in, one trained attention
// layer, logits through the tied embedding) is the target; the draft is the same layer
// with its output kernel perturbed, so that it guesses right only part of the time. The
// program checks the speculative tokens against plain greedy decoding with the target,
// token for token, and the target's cache byte for byte against the greedy one's.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <linen/io/attention.hpp>
#include <linen/io/safetensors.hpp>
#include <linen/linen.hpp>

using linen::Index;
using linen::Tensor;
using Attention = linen::SelfAttention<float>;

namespace {

struct Model {
  const Attention& attention;
  Attention::Params params;
  linen::AttentionCache<float> cache;
  linen::DecodeWorkspace<float> workspace;
};

// x [1, n, features]: the embeddings of tokens[first, first + n).
Tensor<float, 3> embed_tokens(const Tensor<float, 2>& embed, const std::vector<Index>& tokens, std::size_t first,
                              Index n) {
  Tensor<float, 3> x(1, n, embed.dimension(1));
  for (Index t = 0; t < n; ++t)
    for (Index f = 0; f < embed.dimension(1); ++f) x(0, t, f) = embed(tokens[first + static_cast<std::size_t>(t)], f);
  return x;
}

// The greedy token after each row of y [1, n, features] (logits = y . embed^T).
std::vector<Index> greedy(const Tensor<float, 2>& embed, const Tensor<float, 3>& y) {
  std::vector<Index> best(static_cast<std::size_t>(y.dimension(1)));
  for (Index t = 0; t < y.dimension(1); ++t) {
    float best_logit = -INFINITY;
    for (Index v = 0; v < embed.dimension(0); ++v) {
      float logit = 0;
      for (Index f = 0; f < embed.dimension(1); ++f) logit += y(0, t, f) * embed(v, f);
      if (logit > best_logit) best_logit = logit, best[static_cast<std::size_t>(t)] = v;
    }
  }
  return best;
}

// Feeds tokens[first, first + n) to `m` in one step; returns the greedy next tokens.
std::vector<Index> feed(Model& m, const Tensor<float, 2>& embed, const std::vector<Index>& tokens, std::size_t first,
                        Index n) {
  const Tensor<float, 3> x = embed_tokens(embed, tokens, first, n);
  Tensor<float, 3> y(1, n, embed.dimension(1));
  m.attention.decode_chunk(m.params, m.cache, x, y, m.workspace);
  return greedy(embed, y);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string file = argc > 1 ? argv[1] : "tests/data/flax/decode_basic.safetensors";
  const long heads = argc > 2 ? std::strtol(argv[2], nullptr, 10) : 4;
  linen::AttentionConfig<float> config;
  config.num_heads = heads;
  config.decode = true;
  const Attention attention(config);
  const auto variables = linen::io::load_attention(linen::io::load_safetensors(file), config);
  const Index features = variables.params.query.kernel.dimension(0);
  const Index vocab = 12, max_length = 40, generate = 32, k = 4;
  Tensor<float, 2> embed(vocab, features);
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index n = 0; n < embed.size(); ++n) embed.data()[n] = normal(gen);
  const std::vector<Index> prompt{3, 5, 1};

  // Plain greedy decoding with the target, one position a step.
  Model plain{attention, variables.params, attention.init_cache(variables.params, {1}, max_length), {}};
  std::vector<Index> want = prompt;
  for (std::size_t i = 0; i + 1 < prompt.size(); ++i) (void)feed(plain, embed, want, i, 1);
  while (static_cast<Index>(want.size()) < generate) want.push_back(feed(plain, embed, want, want.size() - 1, 1)[0]);

  // The draft: the target's layer with its output kernel perturbed.
  Model target{attention, variables.params, attention.init_cache(variables.params, {1}, max_length), {}};
  Model draft{attention, variables.params, attention.init_cache(variables.params, {1}, max_length), {}};
  for (Index n = 0; n < draft.params.out.kernel.size(); ++n) draft.params.out.kernel.data()[n] += 0.05f * normal(gen);

  // Both caches hold every token but the last one; the last is fed with the next step.
  std::vector<Index> tokens = prompt;
  const Index p = static_cast<Index>(prompt.size()) - 1;
  (void)feed(target, embed, tokens, 0, p);
  (void)feed(draft, embed, tokens, 0, p);
  Index steps = 0, proposed = 0, accepted_total = 0;
  while (static_cast<Index>(tokens.size()) < generate) {
    const std::size_t m = tokens.size();  // the target's cache holds m - 1 positions
    // The draft proposes k tokens, one position a step.
    std::vector<Index> guess = tokens;
    for (Index i = 0; i < k; ++i) guess.push_back(feed(draft, embed, guess, m - 1 + static_cast<std::size_t>(i), 1)[0]);
    // The target verifies the last token and the k drafts in one step of k + 1 positions:
    // row i's greedy token is what follows guess[m - 1 + i].
    const std::vector<Index> check = feed(target, embed, guess, m - 1, k + 1);
    Index a = 0;
    while (a < k && guess[m + static_cast<std::size_t>(a)] == check[static_cast<std::size_t>(a)]) ++a;
    for (Index i = 0; i < a; ++i) tokens.push_back(guess[m + static_cast<std::size_t>(i)]);
    tokens.push_back(check[static_cast<std::size_t>(a)]);  // the target's own token after the accepted ones
    // Keep the positions of the accepted tokens (every token but the new last one).
    const Index keep = static_cast<Index>(m) + a;
    linen::rollback(target.cache, keep);
    if (draft.cache.cache_index > keep) linen::rollback(draft.cache, keep);
    else (void)feed(draft, embed, guess, m - 1 + static_cast<std::size_t>(k), 1);  // all k accepted: the last draft
    ++steps;
    proposed += k;
    accepted_total += a;
  }
  tokens.resize(static_cast<std::size_t>(generate));

  std::printf("greedy tokens:     ");
  for (Index t : want) std::printf(" %ld", static_cast<long>(t));
  std::printf("\nspeculative tokens:");
  for (Index t : tokens) std::printf(" %ld", static_cast<long>(t));
  std::printf("\n%ld verify steps for %ld tokens; %ld of %ld drafts accepted\n", static_cast<long>(steps),
              static_cast<long>(generate - static_cast<Index>(prompt.size())), static_cast<long>(accepted_total),
              static_cast<long>(proposed));
  if (tokens != want) {
    std::printf("FAILED: speculative decoding disagrees with greedy decoding\n");
    return 1;
  }
  // The caches: rolled back to the same length, byte for byte the same.
  const Index common = std::min(target.cache.cache_index, plain.cache.cache_index);
  linen::rollback(target.cache, common);
  linen::rollback(plain.cache, common);
  const std::size_t bytes = sizeof(float) * static_cast<std::size_t>(plain.cache.cached_key.size());
  if (std::memcmp(target.cache.cached_key.data(), plain.cache.cached_key.data(), bytes) != 0 ||
      std::memcmp(target.cache.cached_value.data(), plain.cache.cached_value.data(), bytes) != 0) {
    std::printf("FAILED: the target's cache differs from greedy decoding's\n");
    return 1;
  }
  std::printf("the target's cache equals greedy decoding's byte for byte (%ld positions)\n", static_cast<long>(common));
  return 0;
}

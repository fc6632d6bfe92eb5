// SPDX-License-Identifier: Apache-2.0
//
// Continuous batching through a BatchCache (per-sequence positions): requests with prompts
// of different lengths arrive at different steps, share one batch of cache slots, and
// leave when they have generated their tokens; a slot freed by one request is taken by a
// later one. Each engine step is one ragged decode_chunk over the active sequences: a
// newly arrived request prefills its whole prompt in it while the others advance by one
// token.
//
//   linen_example_continuous_batching
//
// The model is a toy language model (random embeddings in, one SelfAttention layer,
// logits through the tied embedding, greedy choice). The program runs every request alone
// on a Flax cache of batch 1 (decode_chunk of its prompt, then decode_step per token) and
// checks the batched tokens against it token for token, and the last outputs bit for bit
// (every step here has at most 8 rows per sequence: the row kernel, the same arithmetic).
// Exits 1 on any difference.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <linen/linen.hpp>

using linen::Index;
using linen::Tensor;
using Attention = linen::SelfAttention<float>;

namespace {

constexpr Index kVocab = 64, kFeatures = 32, kHeads = 4, kMaxLength = 64, kSlots = 3;

struct Request {
  int arrives;                  // engine step at which it joins
  std::vector<Index> prompt;    // 1..8 tokens
  int generate;                 // tokens to generate
};

// The greedy token after row `row` of y [B, n, features].
Index greedy(const Tensor<float, 2>& embed, const Tensor<float, 3>& y, Index b, Index row) {
  Index best = 0;
  float best_logit = -INFINITY;
  for (Index v = 0; v < kVocab; ++v) {
    float logit = 0;
    for (Index f = 0; f < kFeatures; ++f) logit += y(b, row, f) * embed(v, f);
    if (logit > best_logit) best_logit = logit, best = v;
  }
  return best;
}

void put_embedding(const Tensor<float, 2>& embed, Index token, Tensor<float, 3>& x, Index b, Index row) {
  for (Index f = 0; f < kFeatures; ++f) x(b, row, f) = embed(token, f);
}

struct Result {
  std::vector<Index> tokens;
  std::vector<float> last_output;  // the out row that chose the last token
};

// One request alone: a Flax cache of batch 1, the prompt in one decode_chunk, then one
// decode_step per generated token.
Result run_alone(const Attention& attn, const Attention::Params& params, const Tensor<float, 2>& embed,
                 const Request& r) {
  linen::AttentionCache<float> cache = attn.init_cache(params, {1}, kMaxLength);
  linen::DecodeWorkspace<float> ws;
  const Index n = static_cast<Index>(r.prompt.size());
  Tensor<float, 3> x(1, n, kFeatures), y(1, n, kFeatures);
  for (Index t = 0; t < n; ++t) put_embedding(embed, r.prompt[static_cast<std::size_t>(t)], x, 0, t);
  attn.decode_chunk(params, cache, x, y, ws);
  Result out;
  Index row = n - 1;
  Tensor<float, 3> x1(1, 1, kFeatures), y1(1, 1, kFeatures);
  for (int i = 0; i < r.generate; ++i) {
    const Tensor<float, 3>& from = i == 0 ? y : y1;
    out.tokens.push_back(greedy(embed, from, 0, row));
    out.last_output.assign(&from(0, row, 0), &from(0, row, 0) + kFeatures);
    if (i + 1 == r.generate) break;
    put_embedding(embed, out.tokens.back(), x1, 0, 0);
    attn.decode_step(params, cache, x1, y1, ws);
    row = 0;
  }
  return out;
}

}  // namespace

int main() {
  linen::AttentionConfig<float> cfg;
  cfg.num_heads = kHeads;
  cfg.decode = true;
  const Attention attn(cfg);
  std::mt19937 g(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor<float, 2> embed(kVocab, kFeatures);
  for (Index i = 0; i < embed.size(); ++i) embed.data()[i] = normal(g);
  Tensor<float, 3> x0(1, 1, kFeatures);
  x0.setZero();
  const auto vars = attn.init(linen::random::key(3), x0);

  // Seven requests for three slots: they queue when the slots are full.
  std::vector<Request> requests;
  std::uniform_int_distribution<int> prompt_len(1, 8), gen_len(2, 9), token(0, kVocab - 1);
  for (int i = 0; i < 7; ++i) {
    Request r;
    r.arrives = 2 * i;
    r.prompt.resize(static_cast<std::size_t>(prompt_len(g)));
    for (Index& t : r.prompt) t = token(g);
    r.generate = gen_len(g);
    requests.push_back(r);
  }

  // The engine.
  linen::BatchCache<float> cache = attn.init_batch_cache(vars.params, kSlots, kMaxLength);
  linen::DecodeWorkspace<float> ws;
  std::vector<Result> batched(requests.size());
  std::vector<int> slot_of(requests.size(), -1);  // -1: waiting or done
  std::vector<bool> done(requests.size(), false);
  std::vector<Index> next(requests.size());       // the token a running request feeds next
  std::size_t waiting = 0;                        // requests[0, waiting) have arrived or finished
  int step = 0, max_active = 0;
  for (; step < 200; ++step) {
    // arrivals, in order, while a slot is free
    std::vector<std::size_t> running;
    for (std::size_t i = 0; i < requests.size(); ++i)
      if (slot_of[i] >= 0) running.push_back(i);
    std::vector<std::size_t> joining;
    while (waiting < requests.size() && requests[waiting].arrives <= step && cache.free_slots() > 0) {
      slot_of[waiting] = static_cast<int>(cache.join());
      joining.push_back(waiting++);
    }
    std::vector<std::size_t> members(running);
    members.insert(members.end(), joining.begin(), joining.end());
    if (members.empty()) {
      if (waiting == requests.size()) break;
      continue;
    }
    max_active = std::max(max_active, static_cast<int>(members.size()));
    // one ragged chunk: a joining request's prompt, one token for the others
    std::vector<std::int32_t> slots, counts;
    Index n = 1;
    for (std::size_t i : members) {
      const bool joins = batched[i].tokens.empty();
      slots.push_back(slot_of[i]);
      counts.push_back(static_cast<std::int32_t>(joins ? requests[i].prompt.size() : 1));
      n = std::max<Index>(n, counts.back());
    }
    const Index B = static_cast<Index>(members.size());
    Tensor<float, 3> x(B, n, kFeatures), y(B, n, kFeatures);
    x.setZero();  // rows past a sequence's count are padding
    for (Index b = 0; b < B; ++b) {
      const std::size_t i = members[static_cast<std::size_t>(b)];
      if (batched[i].tokens.empty())
        for (Index t = 0; t < counts[static_cast<std::size_t>(b)]; ++t)
          put_embedding(embed, requests[i].prompt[static_cast<std::size_t>(t)], x, b, t);
      else
        put_embedding(embed, next[i], x, b, 0);
    }
    attn.decode_chunk(vars.params, cache, slots, counts, x, y, ws);
    for (Index b = 0; b < B; ++b) {
      const std::size_t i = members[static_cast<std::size_t>(b)];
      const Index row = counts[static_cast<std::size_t>(b)] - 1;
      next[i] = greedy(embed, y, b, row);
      batched[i].tokens.push_back(next[i]);
      batched[i].last_output.assign(&y(b, row, 0), &y(b, row, 0) + kFeatures);
      if (static_cast<int>(batched[i].tokens.size()) == requests[i].generate) {
        cache.leave(slot_of[i]);  // the slot is zeroed and free for the next request
        slot_of[i] = -1;
        done[i] = true;
      }
    }
  }

  int failures = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    if (!done[i]) {
      std::printf("request %zu did not finish\n", i);
      ++failures;
      continue;
    }
    const Result alone = run_alone(attn, vars.params, embed, requests[i]);
    const bool tokens_match = alone.tokens == batched[i].tokens;
    const bool bits_match =
        std::memcmp(alone.last_output.data(), batched[i].last_output.data(), sizeof(float) * kFeatures) == 0;
    std::printf("request %zu: prompt %zu tokens, arrives at step %d, %d tokens:", i, requests[i].prompt.size(),
                requests[i].arrives, requests[i].generate);
    for (Index t : batched[i].tokens) std::printf(" %ld", static_cast<long>(t));
    std::printf("  %s\n", tokens_match && bits_match ? "== alone" : "DIFFERS from alone");
    if (!tokens_match || !bits_match) ++failures;
  }
  std::printf("%d engine steps, up to %d sequences at once in %ld slots\n", step, max_active,
              static_cast<long>(kSlots));
  if (failures) {
    std::printf("FAILED: %d requests differ from running alone\n", failures);
    return 1;
  }
  std::printf("every request matches running it alone, token for token\n");
  return 0;
}

// SPDX-License-Identifier: Apache-2.0
//
// Training in C++ with linen's gradients: a tiny model learns to reverse a sequence.
//
//   tokens x [batch, length] in [0, vocab)        target y_i = x_{length-1-i}
//   h      = token_embedding[x] + position_embedding         [batch, length, features]
//   a      = SelfAttention(num_heads)(h)                     [batch, length, features]
//   logits = Dense(vocab)(a)                                 [batch, length, vocab]
//   loss   = mean softmax cross-entropy(logits, y)
//
// Every gradient comes from linen::vjp (DenseGeneral and SelfAttention) plus the two
// lines that scatter the input cotangent into the embeddings; Adam updates the
// parameters. Reversal needs attention: position i must find position length-1-i, which
// only the query/key products of the position embeddings can express.
//
// Prints the loss curve and the accuracy on fresh sequences. Exits 0 when the loss falls
// below kThreshold within kTimeLimit seconds, 1 otherwise (it runs as a ctest case).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <linen/grad.hpp>
#include <linen/linen.hpp>

namespace {

constexpr linen::Index kVocab = 32, kLength = 16, kFeatures = 32, kHeads = 4, kBatch = 32;
constexpr int kMaxSteps = 3000;
constexpr double kThreshold = 0.02;  // mean cross-entropy per token (chance: ln 32 = 3.47)
constexpr double kTimeLimit = 30.0;  // seconds

// Adam (Kingma & Ba) over any number of parameter arrays, each registered once.
class Adam {
 public:
  explicit Adam(float lr, float b1 = 0.9f, float b2 = 0.999f, float eps = 1e-8f)
      : lr_(lr), b1_(b1), b2_(b2), eps_(eps) {}

  // Registers a parameter array; returns its slot for step().
  std::size_t add(linen::Index size) {
    m_.emplace_back(static_cast<std::size_t>(size), 0.0f);
    v_.emplace_back(static_cast<std::size_t>(size), 0.0f);
    return m_.size() - 1;
  }
  void next_step() { ++t_; }
  // param -= lr * mhat / (sqrt(vhat) + eps) for the slot's `size` elements.
  void update(std::size_t slot, float* param, const float* grad, linen::Index size) {
    auto& m = m_[slot];
    auto& v = v_[slot];
    const float c1 = 1.0f - std::pow(b1_, static_cast<float>(t_));
    const float c2 = 1.0f - std::pow(b2_, static_cast<float>(t_));
    for (linen::Index i = 0; i < size; ++i) {
      const auto k = static_cast<std::size_t>(i);
      m[k] = b1_ * m[k] + (1 - b1_) * grad[i];
      v[k] = b2_ * v[k] + (1 - b2_) * grad[i] * grad[i];
      param[i] -= lr_ * (m[k] / c1) / (std::sqrt(v[k] / c2) + eps_);
    }
  }

 private:
  float lr_, b1_, b2_, eps_;
  int t_ = 0;
  std::vector<std::vector<float>> m_, v_;
};

// A batch of random sequences and their reversals.
void make_batch(std::mt19937& gen, std::vector<int>& x, std::vector<int>& y) {
  std::uniform_int_distribution<int> token(0, static_cast<int>(kVocab) - 1);
  x.resize(kBatch * kLength);
  y.resize(kBatch * kLength);
  for (linen::Index b = 0; b < kBatch; ++b)
    for (linen::Index i = 0; i < kLength; ++i) x[b * kLength + i] = token(gen);
  for (linen::Index b = 0; b < kBatch; ++b)
    for (linen::Index i = 0; i < kLength; ++i) y[b * kLength + i] = x[b * kLength + (kLength - 1 - i)];
}

}  // namespace

int main() {
  using linen::Tensor;
  const auto start = std::chrono::steady_clock::now();

  // ---- the model -----------------------------------------------------------------------
  const auto keys = linen::random::split(linen::random::key(0), 4);
  Tensor<float, 2> tok_emb(kVocab, kFeatures), pos_emb(kLength, kFeatures);
  linen::random::normal<float>(keys[0], {kVocab, kFeatures}, tok_emb.data());
  linen::random::normal<float>(keys[1], {kLength, kFeatures}, pos_emb.data());

  linen::AttentionConfig<float> attn_cfg;
  attn_cfg.num_heads = kHeads;
  const linen::SelfAttention<float> attn(attn_cfg);
  Tensor<float, 3> h(kBatch, kLength, kFeatures);
  auto attn_vars = attn.init(keys[2], h);

  linen::DenseGeneral<float, float, 1, 1>::Config dense_cfg;
  dense_cfg.features = {kVocab};
  const linen::DenseGeneral<float, float, 1, 1> dense(dense_cfg);
  auto dense_params = dense.init(keys[3], {kFeatures});  // Flax: Dense(...).init(keys[3], h)

  // ---- the optimizer: one Adam slot per parameter array --------------------------------
  Adam adam(3e-3f);
  const std::size_t s_tok = adam.add(tok_emb.size()), s_pos = adam.add(pos_emb.size());
  const std::size_t s_dk = adam.add(dense_params.kernel.size()), s_db = adam.add(dense_params.bias.size());
  struct Slot {
    std::size_t slot;
    float* param;
  };
  std::vector<std::pair<std::string, Slot>> attn_slots;
  auto& ap = attn_vars.params;
  for (auto [name, dp] : {std::pair{"query", &ap.query}, std::pair{"key", &ap.key}, std::pair{"value", &ap.value}}) {
    attn_slots.push_back({std::string(name) + "/kernel", {adam.add(dp->kernel.size()), dp->kernel.data()}});
    attn_slots.push_back({std::string(name) + "/bias", {adam.add(dp->bias.size()), dp->bias.data()}});
  }
  attn_slots.push_back({"out/kernel", {adam.add(ap.out.kernel.size()), ap.out.kernel.data()}});
  attn_slots.push_back({"out/bias", {adam.add(ap.out.bias.size()), ap.out.bias.data()}});

  std::mt19937 data(1);
  std::vector<int> x, y;
  std::printf("Reversing %ld-token sequences over a vocabulary of %ld (SelfAttention, %ld heads, %ld features)\n",
              static_cast<long>(kLength), static_cast<long>(kVocab), static_cast<long>(kHeads),
              static_cast<long>(kFeatures));
  std::printf("target: mean cross-entropy < %.3f within %.0f s\n\n  step     loss\n", kThreshold, kTimeLimit);

  double loss = INFINITY, smoothed = INFINITY, seconds = 0;
  int step = 0;
  for (; step < kMaxSteps; ++step) {
    make_batch(data, x, y);
    // forward: embeddings, attention (keeping its tape), the vocabulary projection
    for (linen::Index b = 0; b < kBatch; ++b)
      for (linen::Index i = 0; i < kLength; ++i)
        for (linen::Index f = 0; f < kFeatures; ++f)
          h(b, i, f) = tok_emb(x[b * kLength + i], f) + pos_emb(i, f);
    auto [a, attn_pullback] = linen::vjp(attn, attn_vars, h);
    auto [logits, dense_pullback] = linen::vjp(dense, dense_params, a);

    // loss and its cotangent: d(mean CE)/d logits = (softmax - onehot) / tokens
    Tensor<float, 3> dlogits(kBatch, kLength, kVocab);
    loss = 0;
    const float inv_tokens = 1.0f / static_cast<float>(kBatch * kLength);
    for (linen::Index b = 0; b < kBatch; ++b) {
      for (linen::Index i = 0; i < kLength; ++i) {
        float mx = -INFINITY, sum = 0;
        for (linen::Index v = 0; v < kVocab; ++v) mx = std::max(mx, logits(b, i, v));
        for (linen::Index v = 0; v < kVocab; ++v) sum += std::exp(logits(b, i, v) - mx);
        const int target = y[b * kLength + i];
        loss -= (logits(b, i, target) - mx - std::log(sum)) * inv_tokens;
        for (linen::Index v = 0; v < kVocab; ++v)
          dlogits(b, i, v) = (std::exp(logits(b, i, v) - mx) / sum - (v == target ? 1.0f : 0.0f)) * inv_tokens;
      }
    }

    // backward: the pullbacks, then the embeddings' share of h's cotangent
    const auto dense_grads = dense_pullback(dlogits);
    const auto attn_grads = attn_pullback(dense_grads.input);
    Tensor<float, 2> dtok(kVocab, kFeatures), dpos(kLength, kFeatures);
    dtok.setZero();
    dpos.setZero();
    for (linen::Index b = 0; b < kBatch; ++b)
      for (linen::Index i = 0; i < kLength; ++i)
        for (linen::Index f = 0; f < kFeatures; ++f) {
          dtok(x[b * kLength + i], f) += attn_grads.inputs_q(b, i, f);
          dpos(i, f) += attn_grads.inputs_q(b, i, f);
        }

    // update (after the pullbacks ran: they read the parameters)
    adam.next_step();
    adam.update(s_tok, tok_emb.data(), dtok.data(), tok_emb.size());
    adam.update(s_pos, pos_emb.data(), dpos.data(), pos_emb.size());
    adam.update(s_dk, dense_params.kernel.data(), dense_grads.params.kernel.data(), dense_params.kernel.size());
    adam.update(s_db, dense_params.bias.data(), dense_grads.params.bias.data(), dense_params.bias.size());
    const auto& g = attn_grads.params;
    const float* grads[] = {g.query.kernel.data(), g.query.bias.data(), g.key.kernel.data(), g.key.bias.data(),
                            g.value.kernel.data(), g.value.bias.data(), g.out.kernel.data(), g.out.bias.data()};
    const linen::Index sizes[] = {g.query.kernel.size(), g.query.bias.size(), g.key.kernel.size(), g.key.bias.size(),
                                  g.value.kernel.size(), g.value.bias.size(), g.out.kernel.size(), g.out.bias.size()};
    for (std::size_t k = 0; k < attn_slots.size(); ++k)
      adam.update(attn_slots[k].second.slot, attn_slots[k].second.param, grads[k], sizes[k]);

    smoothed = step == 0 ? loss : 0.9 * smoothed + 0.1 * loss;
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step % 20 == 0) std::printf("%6d   %.4f\n", step, loss);
    if (smoothed < kThreshold || seconds > kTimeLimit) break;
  }
  std::printf("%6d   %.4f   (smoothed %.4f) after %.2f s\n", step, loss, smoothed, seconds);

  // Accuracy on fresh sequences.
  std::mt19937 fresh(12345);
  make_batch(fresh, x, y);
  for (linen::Index b = 0; b < kBatch; ++b)
    for (linen::Index i = 0; i < kLength; ++i)
      for (linen::Index f = 0; f < kFeatures; ++f) h(b, i, f) = tok_emb(x[b * kLength + i], f) + pos_emb(i, f);
  const Tensor<float, 3> logits = dense.apply(dense_params, attn.apply(attn_vars, h));
  int right = 0;
  for (linen::Index b = 0; b < kBatch; ++b)
    for (linen::Index i = 0; i < kLength; ++i) {
      linen::Index best = 0;
      for (linen::Index v = 1; v < kVocab; ++v)
        if (logits(b, i, v) > logits(b, i, best)) best = v;
      right += best == y[b * kLength + i];
    }
  std::printf("token accuracy on %ld fresh sequences: %.1f%%\n", static_cast<long>(kBatch),
              100.0 * right / static_cast<double>(kBatch * kLength));

  if (smoothed < kThreshold && seconds <= kTimeLimit) {
    std::printf("PASS: the loss fell below %.3f in %.2f s (%d steps)\n", kThreshold, seconds, step + 1);
    return 0;
  }
  std::printf("FAIL: the loss is %.4f (smoothed %.4f) after %.2f s and %d steps; the target is < %.3f within %.0f s\n",
              loss, smoothed, seconds, step + 1, kThreshold, kTimeLimit);
  return 1;
}

// SPDX-License-Identifier: Apache-2.0
//
// A decoder-only transformer language model ported from Flax: initialised from a key by
// Flax's rules, run on a padded batch, saved and reloaded in every format linen writes,
// then generating 16 tokens greedily through the decode cache, each checked against a
// full causal forward of the sequence so far. Exits non-zero on any mismatch.
//
// The Flax model (flax.linen; the layers are a Python loop, so each has its own
// subtree params/layers_{i}/...):
//
//   class Block(nn.Module):
//     num_heads: int
//     mlp_dim: int
//     decode: bool = False
//
//     @nn.compact
//     def __call__(self, x, mask=None):
//       h = nn.SelfAttention(num_heads=self.num_heads, decode=self.decode, name='attn')(
//           nn.LayerNorm(name='ln_1')(x), mask=mask)
//       x = x + h
//       h = nn.Dense(self.mlp_dim, name='mlp_in')(nn.LayerNorm(name='ln_2')(x))
//       h = nn.Dense(x.shape[-1], name='mlp_out')(nn.gelu(h))
//       return x + h
//
//   class DecoderLM(nn.Module):
//     vocab_size: int
//     features: int
//     num_heads: int
//     mlp_dim: int
//     num_layers: int
//     decode: bool = False
//
//     @nn.compact
//     def __call__(self, tokens):               # [batch, length] int, 0 = padding
//       embed = nn.Embed(self.vocab_size, self.features, name='embed')
//       x = embed(tokens)
//       mask = None
//       if not self.decode:
//         mask = nn.combine_masks(nn.make_attention_mask(tokens > 0, tokens > 0),
//                                 nn.make_causal_mask(tokens))
//       for i in range(self.num_layers):
//         x = Block(self.num_heads, self.mlp_dim, self.decode, name=f'layers_{i}')(x, mask)
//       return embed.attend(nn.RMSNorm(name='final_norm')(x))   # tied logits
//
//   params = DecoderLM(...).init(jax.random.key(0), tokens)['params']
//
// (With nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
// length=num_layers) instead of the loop, every parameter is stored once under
// params/layers/... with a leading layer axis: bind layer i with
// io::ConstScope(vars).push("layers").layer(i, num_layers), see io/tree.hpp.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <linen/io/checkpoint.hpp>
#include <linen/io/modules.hpp>
#include <linen/linen.hpp>

using linen::Index;
using linen::Tensor;
namespace io = linen::io;

struct ModelConfig {
  Index vocab_size = 32, features = 16, num_heads = 2, mlp_dim = 32, num_layers = 2;
};

linen::Dense<float> dense(Index features) {
  linen::Dense<float>::Config c;
  c.features = features;
  return linen::Dense<float>(c);
}

struct Block {
  linen::LayerNorm<float> ln_1, ln_2;
  linen::SelfAttention<float> attn;
  linen::Dense<float> mlp_in, mlp_out;
  struct Params {
    linen::LayerNormParams<float> ln_1, ln_2;
    linen::AttentionVariables<float> attn;  // params, and the cache when decoding
    linen::DenseParams<float, 1, 1> mlp_in, mlp_out;
  };

  Block(const ModelConfig& c, bool decode)
      : attn([&] {
          linen::AttentionConfig<float> a;
          a.num_heads = c.num_heads;
          a.decode = decode;
          return a;
        }()),
        mlp_in(dense(c.mlp_dim)),
        mlp_out(dense(c.features)) {}

  // Flax's init: each submodule draws from its own named scope.
  Params init(linen::random::RngScope s, const Tensor<float, 3>& x) const {
    Params p;
    p.ln_1 = ln_1.init(s.push("ln_1"), x);
    p.attn = attn.init(s.push("attn"), x);
    p.ln_2 = ln_2.init(s.push("ln_2"), x);
    p.mlp_in = mlp_in.init(s.push("mlp_in"), x);
    p.mlp_out = mlp_out.init(s.push("mlp_out"), mlp_in.config().features);
    return p;
  }
  // x: [batch, length, features]; when decoding, length 1 through p.attn.cache.
  Tensor<float, 3> apply(Params& p, const Tensor<float, 3>& x, const linen::CallOptions<float>& call) const {
    const Tensor<float, 3> y = x + attn.apply(p.attn, ln_1.apply(p.ln_1, x), call);
    const Tensor<float, 3> h = mlp_out.apply(p.mlp_out, linen::gelu(mlp_in.apply(p.mlp_in, ln_2.apply(p.ln_2, y))));
    return y + h;
  }
  void store(const io::Scope& s, const Params& p) const {
    io::store(s, p.ln_1, "ln_1");
    io::store(s, p.attn, "attn");
    io::store(s, p.ln_2, "ln_2");
    io::store(s, p.mlp_in, "mlp_in");
    io::store(s, p.mlp_out, "mlp_out");
  }
  Params load(const io::ConstScope& s) const {
    return {io::load(s, ln_1, "ln_1"), io::load(s, ln_2, "ln_2"), io::load(s, attn, "attn"),
            io::load(s, mlp_in, "mlp_in"), io::load(s, mlp_out, "mlp_out")};
  }
};

struct DecoderLM {
  linen::Embed<float> embed;
  std::vector<Block> layers;
  linen::RMSNorm<float> final_norm;
  bool decode;
  struct Params {
    linen::EmbedParams<float> embed;
    std::vector<Block::Params> layers;
    linen::RMSNormParams<float> final_norm;
  };

  DecoderLM(const ModelConfig& c, bool decode_)
      : embed([&] {
          linen::Embed<float>::Config e;
          e.num_embeddings = c.vocab_size;
          e.features = c.features;
          return e;
        }()),
        layers(static_cast<std::size_t>(c.num_layers), Block(c, decode_)),
        decode(decode_) {}

  Params init(const linen::random::Key& key, const Tensor<int, 2>& tokens) const {
    const linen::random::RngScope root(key);
    Params p;
    p.embed = embed.init(root.push("embed"));
    const Tensor<float, 3> x = embed.apply(p.embed, tokens);
    for (std::size_t i = 0; i < layers.size(); ++i)
      p.layers.push_back(layers[i].init(root.push("layers_" + std::to_string(i)), x));
    p.final_norm = final_norm.init(root.push("final_norm"), x);
    return p;
  }
  // tokens: [batch, length] -> logits [batch, length, vocab_size].
  Tensor<float, 3> apply(Params& p, const Tensor<int, 2>& tokens) const {
    Tensor<float, 3> x = embed.apply(p.embed, tokens);
    std::optional<Tensor<bool, 4>> mask;
    linen::CallOptions<float> call;
    if (!decode) {
      const Tensor<bool, 2> valid = tokens > 0;
      mask = linen::combine_masks(linen::make_attention_mask(valid, valid), linen::make_causal_mask(tokens));
      call.mask = *mask;
    }
    for (std::size_t i = 0; i < layers.size(); ++i) x = layers[i].apply(p.layers[i], x, call);
    return embed.attend(p.embed, final_norm.apply(p.final_norm, x));
  }
  void store(const io::Scope& s, const Params& p) const {
    io::store(s, p.embed, "embed");
    for (std::size_t i = 0; i < layers.size(); ++i) layers[i].store(s.push("layers_" + std::to_string(i)), p.layers[i]);
    io::store(s, p.final_norm, "final_norm");
  }
  Params load(const io::ConstScope& s) const {
    Params p{io::load(s, embed, "embed"), {}, io::load(s, final_norm, "final_norm")};
    for (std::size_t i = 0; i < layers.size(); ++i) p.layers.push_back(layers[i].load(s.push("layers_" + std::to_string(i))));
    return p;
  }
};

// The most likely token at position t of row b, never the padding id 0.
int greedy(const Tensor<float, 3>& logits, Index b, Index t) {
  int best = 1;
  for (Index v = 2; v < logits.dimension(2); ++v)
    if (logits(b, t, v) > logits(b, t, best)) best = static_cast<int>(v);
  return best;
}

int main() {
  const ModelConfig cfg;
  const DecoderLM model(cfg, /*decode=*/false);
  int failures = 0;

  // A padded batch: row 1 is 5 tokens long.
  Tensor<int, 2> batch(2, 8);
  batch.setValues({{5, 9, 3, 17, 2, 30, 11, 4}, {7, 1, 22, 8, 13, 0, 0, 0}});
  DecoderLM::Params params = model.init(linen::random::key(0), batch);
  const Tensor<float, 3> logits = model.apply(params, batch);
  // Padding at the end changes nothing before it: row 1 alone, unpadded, agrees.
  Tensor<int, 2> row1(1, 5);
  row1.setValues({{7, 1, 22, 8, 13}});
  const Tensor<float, 3> alone = model.apply(params, row1);
  double pad_err = 0;
  for (Index t = 0; t < 5; ++t)
    for (Index v = 0; v < cfg.vocab_size; ++v) pad_err = std::max(pad_err, double(std::abs(alone(0, t, v) - logits(1, t, v))));
  std::printf("padded batch [2, 8] -> logits [2, 8, %ld]; padded row vs unpadded: max |diff| %.3g\n",
              static_cast<long>(cfg.vocab_size), pad_err);
  if (!(pad_err <= 1e-5)) ++failures;

  // Save the variables tree in each format, reload, and get the same logits bit for bit.
  io::Variables vars;
  model.store(vars, params);
  std::random_device rd;
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("linen_decoder_lm_" + std::to_string(rd()));
  std::filesystem::create_directories(dir);
  io::save_safetensors((dir / "model.safetensors").string(), vars);
  io::save_msgpack((dir / "model.msgpack").string(), vars);
  std::vector<const char*> files{"model.safetensors", "model.msgpack"};
#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD  // Orbax's chunks are zstd-compressed
  io::save_orbax((dir / "orbax").string(), vars);
  files.push_back("orbax");
#endif
  for (const char* name : files) {
    const io::Variables back = io::load_checkpoint((dir / name).string());
    params = model.load(back);
    const Tensor<float, 3> again = model.apply(params, batch);
    const bool same = back == vars && std::equal(again.data(), again.data() + again.size(), logits.data());
    std::printf("%-17s %zu arrays reloaded, logits %s\n", name, back.size(), same ? "identical" : "DIFFER");
    failures += !same;
  }
  std::filesystem::remove_all(dir);

  // Greedy generation through the cache: feed the prompt one position at a time, then
  // 16 tokens, each step one position ([batch, 1]) through every layer's cache.
  const DecoderLM decoder(cfg, /*decode=*/true);
  const Index prompt = 4, generate = 16, B = 2;
  DecoderLM::Params dparams = params;
  for (std::size_t i = 0; i < decoder.layers.size(); ++i)
    dparams.layers[i].attn.cache = decoder.layers[i].attn.init_cache(dparams.layers[i].attn.params, {B}, prompt + generate);
  std::vector<std::vector<int>> seq{{5, 9, 3, 17}, {7, 1, 22, 8}};
  double logit_err = 0;
  int checked = 0;
  for (Index pos = 0; pos + 1 < prompt + generate; ++pos) {
    Tensor<int, 2> x_t(B, 1);
    for (Index b = 0; b < B; ++b) x_t(b, 0) = seq[static_cast<std::size_t>(b)][static_cast<std::size_t>(pos)];
    const Tensor<float, 3> step = decoder.apply(dparams, x_t);
    if (pos + 1 < prompt) continue;
    // The full causal forward over the sequence so far must choose the same tokens.
    Tensor<int, 2> so_far(B, pos + 1);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t <= pos; ++t) so_far(b, t) = seq[static_cast<std::size_t>(b)][static_cast<std::size_t>(t)];
    const Tensor<float, 3> full = model.apply(params, so_far);
    for (Index b = 0; b < B; ++b) {
      for (Index v = 0; v < cfg.vocab_size; ++v)
        logit_err = std::max(logit_err, double(std::abs(step(b, 0, v) - full(b, pos, v))));
      const int next = greedy(step, b, 0);
      if (next != greedy(full, b, pos)) {
        std::printf("MISMATCH at row %ld position %ld: decode %d, full forward %d\n", static_cast<long>(b),
                    static_cast<long>(pos + 1), next, greedy(full, b, pos));
        ++failures;
      }
      ++checked;
      seq[static_cast<std::size_t>(b)].push_back(next);
    }
  }
  for (Index b = 0; b < B; ++b) {
    std::printf("row %ld:", static_cast<long>(b));
    for (Index t = 0; t < prompt + generate; ++t)
      std::printf(t == prompt ? " | %d" : " %d", seq[static_cast<std::size_t>(b)][static_cast<std::size_t>(t)]);
    std::printf("\n");
  }
  std::printf("%d generated tokens checked against the full causal forward, max |logit diff| %.3g\n", checked,
              logit_err);
  if (!(logit_err <= 1e-4)) ++failures;
  std::printf(failures ? "FAILED: %d mismatches\n" : "OK\n", failures);
  return failures ? 1 : 0;
}

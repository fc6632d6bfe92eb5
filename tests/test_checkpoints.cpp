// SPDX-License-Identifier: Apache-2.0
// Nested checkpoints: one file holding several differently configured attention
// modules at Flax paths, saved in both formats, loaded with load_checkpoint, each
// module bound by its path (params and cache) and run; what no module reads is
// listed by unused_paths; mismatches name the path and both shapes.
#include <linen/io/checkpoint.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "attention_fixture.hpp"

namespace {

namespace fs = std::filesystem;
using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;
using linen_test::rel_err;
using bf16 = Eigen::bfloat16;

template <class T, int N>
Tensor<T, N> random_tensor(std::array<Index, N> dims, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Tensor<T, N> t(dims);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = T(normal(rng));
  return t;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const linen::io_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected linen::io_error";
  return {};
}

// Three modules, each configured differently:
//   encoder/layers_0/attn:  SelfAttention<float>, 4 heads, normalize_qk, on [2, 5, 16];
//   decoder/cross:          MultiHeadDotProductAttention<float, bfloat16 params>, 2 heads,
//                           qkv_features 8, out_features 6, no bias, q [2, 3, 12], kv [2, 7, 10];
//   decoder/layers_0/self:  SelfAttention<float> decode=true, 2 heads, on [1, 4, 8], with
//                           its cache after 2 steps.
class NestedCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("linen_test_checkpoints_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);

    enc_cfg_.num_heads = 4;
    enc_cfg_.normalize_qk = true;
    dec_cfg_.num_heads = 2;
    dec_cfg_.qkv_features = 8;
    dec_cfg_.out_features = 6;
    dec_cfg_.use_bias = false;
    self_cfg_.num_heads = 2;
    self_cfg_.decode = true;

    const linen::SelfAttention<float> enc(enc_cfg_);
    const linen::MultiHeadDotProductAttention<float, bf16> dec(dec_cfg_);
    const linen::SelfAttention<float> self(self_cfg_);
    enc_vars_ = enc.init(linen::random::key(1), x_enc_);
    dec_vars_ = dec.init(linen::random::key(2), q_dec_, kv_dec_);
    self_vars_ = self.init(linen::random::key(3), x_self_);
    for (Index i = 0; i < 2; ++i) (void)self.apply(self_vars_, linen_test::position(x_self_, i));
    ASSERT_EQ(self_vars_.cache->cache_index, 2);

    linen::io::store_attention(all_, enc_vars_, enc_cfg_, "encoder/layers_0/attn");
    linen::io::store_attention(all_, dec_vars_, dec_cfg_, "decoder/cross");
    linen::io::store_attention(all_, self_vars_, self_cfg_, "decoder/layers_0/self");
    all_.set("params/embed/embedding", random_tensor<float, 2>({32, 16}, 9));  // read by no module here
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Binds each module from `loaded` by its path and checks that it computes exactly
  // what the original variables compute.
  void bind_and_run(const Variables& loaded) {
    {
      const auto v = linen::io::load_attention(loaded, enc_cfg_, "encoder/layers_0/attn");
      EXPECT_FALSE(v.cache.has_value());
      const linen::SelfAttention<float> enc(enc_cfg_);
      EXPECT_EQ(rel_err(enc.apply(v, x_enc_), enc.apply(enc_vars_, x_enc_)), 0.0);
    }
    {
      const auto v = linen::io::load_attention(loaded, dec_cfg_, "decoder/cross");
      const linen::MultiHeadDotProductAttention<float, bf16> dec(dec_cfg_);
      const Tensor<float, 3> out = dec.apply(v, q_dec_, kv_dec_);
      EXPECT_EQ(out.dimension(2), 6);
      EXPECT_EQ(rel_err(out, dec.apply(dec_vars_, q_dec_, kv_dec_)), 0.0);
      EXPECT_EQ(loaded.at("params/decoder/cross/query/kernel").dtype(), DType::BF16);
    }
    {
      auto v = linen::io::load_attention(loaded, self_cfg_, "decoder/layers_0/self");
      ASSERT_TRUE(v.cache.has_value());
      EXPECT_EQ(v.cache->cache_index, 2);
      EXPECT_EQ(v.cache->batch, Shape{1});
      auto original = self_vars_;
      const linen::SelfAttention<float> self(self_cfg_);
      for (Index i = 2; i < 4; ++i) {
        const Tensor<float, 3> out = self.apply(v, linen_test::position(x_self_, i));
        EXPECT_EQ(rel_err(out, self.apply(original, linen_test::position(x_self_, i))), 0.0) << "step " << i;
      }
      EXPECT_EQ(v.cache->cache_index, 4);
      EXPECT_EQ(rel_err(v.cache->cached_key, original.cache->cached_key), 0.0);
    }
  }

  fs::path dir_;
  linen::AttentionConfig<float> enc_cfg_, self_cfg_;
  linen::AttentionConfig<float, bf16> dec_cfg_;
  Tensor<float, 3> x_enc_ = random_tensor<float, 3>({2, 5, 16}, 1);
  Tensor<float, 3> q_dec_ = random_tensor<float, 3>({2, 3, 12}, 2);
  Tensor<float, 3> kv_dec_ = random_tensor<float, 3>({2, 7, 10}, 3);
  Tensor<float, 3> x_self_ = random_tensor<float, 3>({1, 4, 8}, 4);
  linen::SelfAttention<float>::Variables enc_vars_, self_vars_;
  linen::MultiHeadDotProductAttention<float, bf16>::Variables dec_vars_;
  Variables all_;
};

TEST_F(NestedCheckpoint, LayoutUsesFlaxPaths) {
  const auto paths = all_.paths();
  for (const char* p : {"params/encoder/layers_0/attn/query/kernel", "params/encoder/layers_0/attn/query_ln/scale",
                        "params/decoder/cross/out/kernel", "params/decoder/layers_0/self/value/bias",
                        "cache/decoder/layers_0/self/cached_key", "cache/decoder/layers_0/self/cache_index"})
    EXPECT_TRUE(all_.contains(p)) << p;
  EXPECT_FALSE(all_.contains("params/decoder/cross/query/bias"));  // use_bias=false
  EXPECT_EQ(all_.at("params/decoder/cross/out/kernel").shape(), (Shape{2, 4, 6}));
  EXPECT_EQ(all_.at("cache/decoder/layers_0/self/cached_key").shape(), (Shape{1, 4, 2, 4}));
  EXPECT_EQ(all_.at("cache/decoder/layers_0/self/cache_index").dtype(), DType::I32);
}

TEST_F(NestedCheckpoint, BothFormatsLoadAndBindEveryModuleByPath) {
  const std::string m = (dir_ / "model.msgpack").string(), s = (dir_ / "model.safetensors").string();
  linen::io::save_msgpack(m, all_);
  linen::io::save_safetensors(s, all_);
  for (const std::string& file : {m, s}) {
    SCOPED_TRACE(file);
    const Variables loaded = linen::io::load_checkpoint(file);
    EXPECT_EQ(loaded, all_);
    bind_and_run(loaded);
  }
  // The msgpack file is a tree: {"cache": {"decoder": ...}, "params": {"decoder": ...,
  // "embed": ..., "encoder": ...}}.
  std::ifstream in(m, std::ios::binary);
  std::vector<char> head(8);
  in.read(head.data(), 8);
  EXPECT_EQ(std::string(head.begin(), head.end()), std::string("\x82\xa5" "cache\x81", 8));
}

TEST_F(NestedCheckpoint, UnusedPathsListTheExtraTensor) {
  const std::vector<std::string> used = {"params/encoder/layers_0/attn", "params/decoder/cross",
                                         "params/decoder/layers_0/self", "cache/decoder/layers_0/self"};
  const auto bytes = linen::io::to_msgpack(all_);
  const Variables loaded = linen::io::parse_msgpack(bytes.data(), bytes.size());
  EXPECT_EQ(linen::io::unused_paths(loaded, used), std::vector<std::string>{"params/embed/embedding"});
  // Forgetting the cache collection leaves the cache listed, never silently dropped.
  const std::vector<std::string> no_cache(used.begin(), used.end() - 1);
  EXPECT_EQ(linen::io::unused_paths(loaded, no_cache),
            (std::vector<std::string>{"cache/decoder/layers_0/self/cache_index", "cache/decoder/layers_0/self/cached_key",
                                      "cache/decoder/layers_0/self/cached_value", "params/embed/embedding"}));
}

TEST_F(NestedCheckpoint, SubtreesBindAtTheRootToo) {
  // A subtree with the module path stripped binds as a root module.
  Variables sub;
  sub.merge("params", all_.subtree("params/encoder/layers_0/attn"));
  const auto v = linen::io::load_attention(sub, enc_cfg_);
  const linen::SelfAttention<float> enc(enc_cfg_);
  EXPECT_EQ(rel_err(enc.apply(v, x_enc_), enc.apply(enc_vars_, x_enc_)), 0.0);
}

TEST_F(NestedCheckpoint, MismatchesNameThePathAndBothShapes) {
  const auto bytes = linen::io::to_msgpack(all_);
  const Variables loaded = linen::io::parse_checkpoint(bytes.data(), bytes.size());
  // Bound at the wrong path: the missing tensor and its nearest stored neighbours.
  std::string msg = error_of([&] { (void)linen::io::load_attention(loaded, enc_cfg_, "encoder/layers_1/attn"); });
  EXPECT_NE(msg.find("missing tensor 'params/encoder/layers_1/attn/query/kernel'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("params/encoder/layers_0/attn/"), std::string::npos) << msg;
  // The other module's config: 4 heads where the file has 2.
  msg = error_of([&] { (void)linen::io::load_attention(loaded, enc_cfg_, "decoder/layers_0/self"); });
  EXPECT_NE(msg.find("params/decoder/layers_0/self/query/kernel: shape (8, 2, 4) is not [in_features, num_heads=4"),
            std::string::npos)
      << msg;
  // One tensor of the wrong shape: both shapes named.
  Variables bad = loaded;
  bad.set("params/decoder/cross/value/kernel", Array(DType::BF16, {10, 2, 5}, std::vector<std::uint8_t>(200)));
  msg = error_of([&] { (void)linen::io::load_attention(bad, dec_cfg_, "decoder/cross"); });
  EXPECT_NE(msg.find("params/decoder/cross/value/kernel: shape (10, 2, 4) expected, file has (10, 2, 5)"),
            std::string::npos)
      << msg;
  // A cache that does not fit the module.
  bad = loaded;
  bad.set("cache/decoder/layers_0/self/cached_value", Array(DType::F32, {1, 3, 2, 4}, std::vector<std::uint8_t>(96)));
  msg = error_of([&] { (void)linen::io::load_attention(bad, self_cfg_, "decoder/layers_0/self"); });
  EXPECT_NE(msg.find("cache/decoder/layers_0/self/cached_value: shape (1, 3, 2, 4) differs from "
                     "cache/decoder/layers_0/self/cached_key's (1, 4, 2, 4)"),
            std::string::npos)
      << msg;
}

}  // namespace

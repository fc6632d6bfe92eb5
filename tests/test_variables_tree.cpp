// SPDX-License-Identifier: Apache-2.0
//
// io/tree.hpp and io/modules.hpp: a model's variables as one tree, every module bound to
// its subtree, round trips through each format linen writes, and nn.scan's stacked
// layers read per layer in place. float only: the binding code is the same for every
// element type (Array::to's conversions are test_variables.cpp's).
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <linen/dense_layer.hpp>
#include <linen/io/checkpoint.hpp>
#include <linen/io/modules.hpp>
#include <linen/io/tree.hpp>

namespace {

using namespace linen;
namespace fs = std::filesystem;

template <class T, int N>
bool same(const Tensor<T, N>& a, const Tensor<T, N>& b) {
  if (a.dimensions() != b.dimensions()) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (!(a.data()[i] == b.data()[i])) return false;
  return true;
}

// The message of what `f` throws as E, or "" when it throws nothing.
template <class E>
std::string thrown(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

Dense<float> dense(Index features) {
  Dense<float>::Config c;
  c.features = features;
  return Dense<float>(c);
}
Embed<float> embed_of(Index n, Index features) {
  Embed<float>::Config c;
  c.num_embeddings = n;
  c.features = features;
  return Embed<float>(c);
}
template <int Axes, int Features>
DenseGeneral<float, float, Axes, Features> dense_general(std::array<Index, Features> features, bool use_bias) {
  typename DenseGeneral<float, float, Axes, Features>::Config c;
  c.features = features;
  c.use_bias = use_bias;
  return DenseGeneral<float, float, Axes, Features>(c);
}

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("linen_test_tree_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string operator/(const std::string& s) const { return (path_ / s).string(); }

 private:
  fs::path path_;
};

// A small model of every module kind: a block as a Flax user writes it.
struct Block {
  LayerNorm<float> ln{};
  SelfAttention<float> attn{[] {
    AttentionConfig<float> c;
    c.num_heads = 2;
    return c;
  }()};
  Dense<float> wi = dense(12);
  DenseGeneral<float, float, 1, 2> heads = dense_general<1, 2>({2, 3}, false);
  RMSNorm<float> rms{};

  struct Params {
    LayerNormParams<float> ln;
    AttentionVariables<float> attn;
    DenseParams<float, 1, 1> wi;
    DenseParams<float, 1, 2> heads;
    RMSNormParams<float> rms;
  };
  static constexpr Index kFeatures = 8;

  // Flax's init of a Block submodule: each child pushes its name.
  Params init(random::RngScope scope) const {
    const Tensor<float, 3> x = Tensor<float, 3>(1, 3, kFeatures).setConstant(0.5f);
    Params p;
    p.ln = ln.init(scope.push("ln"), kFeatures);
    p.attn = attn.init(scope.push("attn"), x);
    p.wi = wi.init(scope.push("wi"), kFeatures);
    p.heads = heads.init(scope.push("heads"), x);
    p.rms = rms.init(scope.push("rms"), kFeatures);
    // The init scale is ones: make it distinguishable.
    for (Index i = 0; i < p.rms.scale.size(); ++i) p.rms.scale(i) = 1.0f + 0.25f * static_cast<float>(i);
    return p;
  }
  void store(const io::Scope& s, const Params& p) const {
    io::store(s, p.ln, "ln");
    io::store(s, p.attn, "attn");
    io::store(s, p.wi, "wi");
    io::store(s, p.heads, "heads");
    io::store(s, p.rms, "rms");
  }
  Params load(const io::ConstScope& s) const {
    return {io::load(s, ln, "ln"), io::load(s, attn, "attn"), io::load(s, wi, "wi"), io::load(s, heads, "heads"),
            io::load(s, rms, "rms")};
  }
};

void expect_same(const Block::Params& a, const Block::Params& b) {
  EXPECT_TRUE(same(a.ln.scale, b.ln.scale));
  EXPECT_TRUE(same(a.ln.bias, b.ln.bias));
  const AttentionParams<float>& x = a.attn.params;
  const AttentionParams<float>& y = b.attn.params;
  EXPECT_TRUE(same(x.query.kernel, y.query.kernel) && same(x.query.bias, y.query.bias));
  EXPECT_TRUE(same(x.key.kernel, y.key.kernel) && same(x.key.bias, y.key.bias));
  EXPECT_TRUE(same(x.value.kernel, y.value.kernel) && same(x.value.bias, y.value.bias));
  EXPECT_TRUE(same(x.out.kernel, y.out.kernel) && same(x.out.bias, y.out.bias));
  EXPECT_TRUE(same(a.wi.kernel, b.wi.kernel) && same(a.wi.bias, b.wi.bias));
  EXPECT_TRUE(same(a.heads.kernel, b.heads.kernel));
  EXPECT_EQ(b.heads.bias.size(), 0);
  EXPECT_TRUE(same(a.rms.scale, b.rms.scale));
}

TEST(Scope, PathsSpanCollectionsAndCopyNothing) {
  io::Variables v;
  v.set("params/decoder/layers_0/attn/query/kernel", Tensor<float, 1>(3).setConstant(1.0f));
  v.set("cache/decoder/layers_0/attn/cache_index", Tensor<int, 1>(1).setConstant(2));
  const io::ConstScope s = io::ConstScope(v).push("decoder").push("layers_0/attn");
  EXPECT_EQ(s.path(), "decoder/layers_0/attn");
  EXPECT_EQ(s.full_path("params/query/kernel"), "params/decoder/layers_0/attn/query/kernel");
  EXPECT_TRUE(s.contains("cache/cache_index"));
  EXPECT_FALSE(s.contains("params/cache_index"));
  // The view is the stored array itself.
  EXPECT_EQ(&s.at("params/query/kernel").array(), &v.at("params/decoder/layers_0/attn/query/kernel"));
  EXPECT_NE(thrown<invalid_argument>([&] { (void)s.at("kernel"); }).find("'<collection>/<name>'"), std::string::npos);
  EXPECT_NE(thrown<invalid_argument>([&] { (void)s.push("a//b"); }).find("empty path component"), std::string::npos);
  EXPECT_EQ(io::ConstScope(v, "").path(), "");
  EXPECT_EQ(&io::ConstScope(v, "").at("params/decoder/layers_0/attn/query/kernel").array(),
            &s.at("params/query/kernel").array());
  const std::string missing = thrown<io_error>([&] { (void)s.at("params/key/kernel"); });
  EXPECT_NE(missing.find("'params/decoder/layers_0/attn/key/kernel'"), std::string::npos) << missing;
  // A Scope writes under its path, in the collection the leaf names.
  io::Scope(v, "decoder").push("embed").set("params/embedding", Tensor<float, 2>(2, 2).setZero());
  EXPECT_TRUE(v.contains("params/decoder/embed/embedding"));
}

TEST(VariablesTree, EveryModuleRoundTripsThroughEveryFormat) {
  const Block block;
  const Embed<float> embed = embed_of(11, Block::kFeatures);
  const random::RngScope root(random::key(3));
  const Block::Params p0 = block.init(root.push("decoder").push("layers_0"));
  const Block::Params p1 = block.init(root.push("decoder").push("layers_1"));
  const EmbedParams<float> pe = embed.init(root.push("embed"));

  io::Variables vars;
  io::store(vars, pe, "embed");
  block.store(io::Scope(vars, "decoder/layers_0"), p0);
  block.store(io::Scope(vars).push("decoder").push("layers_1"), p1);
  EXPECT_TRUE(vars.contains("params/embed/embedding"));
  EXPECT_TRUE(vars.contains("params/decoder/layers_1/attn/query/kernel"));
  EXPECT_TRUE(vars.contains("params/decoder/layers_0/wi/bias"));
  EXPECT_FALSE(vars.contains("params/decoder/layers_0/heads/bias"));  // use_bias = false
  EXPECT_FALSE(vars.contains("params/decoder/layers_0/rms/bias"));

  TempDir dir;
  io::save_safetensors(dir / "m.safetensors", vars);
  io::save_msgpack(dir / "m.msgpack", vars);
  std::vector<std::string> files{dir / "m.safetensors", dir / "m.msgpack"};
#if defined(LINEN_HAS_ZSTD) && LINEN_HAS_ZSTD  // Orbax's chunks are zstd-compressed
  io::save_orbax(dir / "orbax", vars);
  files.push_back(dir / "orbax");
#endif
  for (const std::string& file : files) {
    SCOPED_TRACE(file);
    const io::Variables back = io::load_checkpoint(file);
    EXPECT_EQ(back.paths(), vars.paths());
    for (const auto& [path, a] : vars) EXPECT_EQ(back.at(path), a) << path;
    const io::ConstScope decoder = io::ConstScope(back).push("decoder");
    expect_same(p0, block.load(decoder.push("layers_0")));
    expect_same(p1, block.load(decoder.push("layers_1")));
    EXPECT_TRUE(same(pe.embedding, io::load(back, embed, "embed").embedding));
    EXPECT_TRUE(io::unused_paths(back, {"params/embed", "params/decoder"}).empty());
  }
}

TEST(VariablesTree, MissingAndMisShapedTensorsNameThePath) {
  const Block block;
  const Block::Params p = block.init(random::RngScope(random::key(0)));
  io::Variables vars;
  block.store(io::Scope(vars, "enc/layers_0"), p);
  const io::ConstScope s(vars, "enc/layers_0");

  io::Variables missing = vars;
  missing.erase("params/enc/layers_0/ln/bias");
  std::string m = thrown<io_error>([&] { (void)io::load(missing, block.ln, "enc/layers_0/ln"); });
  EXPECT_NE(m.find("missing tensor 'params/enc/layers_0/ln/bias'"), std::string::npos) << m;

  // Dense: features from the config.
  const Dense<float> wide = dense(13);
  m = thrown<io_error>([&] { (void)io::load(s, wide, "wi"); });
  EXPECT_NE(m.find("params/enc/layers_0/wi/kernel: shape (8, 13) expected, file has (8, 12)"), std::string::npos) << m;
  const auto two_axes = dense_general<2, 1>({12}, true);
  m = thrown<io_error>([&] { (void)io::load(s, two_axes, "wi"); });
  EXPECT_NE(m.find("params/enc/layers_0/wi/kernel: float32 array of shape (8, 12) is not [in_features (2 dims)"),
            std::string::npos)
      << m;
  io::Variables bad = vars;
  bad.set("params/enc/layers_0/wi/bias", Tensor<float, 1>(5).setZero());
  m = thrown<io_error>([&] { (void)io::load(io::ConstScope(bad, "enc/layers_0"), block.wi, "wi"); });
  EXPECT_NE(m.find("params/enc/layers_0/wi/bias: shape (12,) expected, file has (5,)"), std::string::npos) << m;

  // LayerNorm: scale and bias must agree.
  bad = vars;
  bad.set("params/enc/layers_0/ln/bias", Tensor<float, 1>(7).setZero());
  m = thrown<io_error>([&] { (void)io::load(bad, block.ln, "enc/layers_0/ln"); });
  EXPECT_NE(m.find("params/enc/layers_0/ln/bias: shape (8,) expected, file has (7,)"), std::string::npos) << m;
  bad.set("params/enc/layers_0/rms/scale", Tensor<float, 2>(2, 4).setZero());
  m = thrown<io_error>([&] { (void)io::load(bad, block.rms, "enc/layers_0/rms"); });
  EXPECT_NE(m.find("params/enc/layers_0/rms/scale: float32 array of shape (2, 4) is not a [features] vector"),
            std::string::npos)
      << m;

  // Embed: both dims from the config.
  bad.set("params/embed/embedding", Tensor<float, 2>(10, 8).setZero());
  m = thrown<io_error>([&] { (void)io::load(bad, embed_of(11, 8), "embed"); });
  EXPECT_NE(m.find("params/embed/embedding: shape (11, 8) expected, file has (10, 8)"), std::string::npos) << m;

  // Attention: load_attention's rules, at the full path.
  bad = vars;
  bad.set("params/enc/layers_0/attn/out/kernel", Tensor<float, 3>(2, 4, 9).setZero());
  EXPECT_NO_THROW((void)io::load(s, block.attn, "attn"));
  m = thrown<io_error>([&] { (void)io::load(io::ConstScope(bad, "enc/layers_0"), block.attn, "attn"); });
  EXPECT_NE(m.find("params/enc/layers_0/attn/out/kernel: shape (2, 4, 9) gives out_features 9"), std::string::npos)
      << m;
}

// nn.scan(Block, variable_axes={'params': 0}, length=3): each parameter once, [3, ...].
TEST(VariablesTree, ScanStackedLayersMatchUnstackedOnesAndAreNotCopied) {
  constexpr Index N = 3;
  const Block block;
  const random::RngScope root(random::key(11));
  std::vector<Block::Params> layers;
  std::vector<io::Variables> per_layer(N);
  io::Variables unstacked;
  for (Index i = 0; i < N; ++i) {
    layers.push_back(block.init(root.push("layers_" + std::to_string(i))));
    block.store(per_layer[static_cast<std::size_t>(i)], layers.back());
    block.store(io::Scope(unstacked, "decoder/layers_" + std::to_string(i)), layers.back());
  }
  io::Variables stacked;
  io::store_stacked(io::Scope(stacked, "decoder/layers"), per_layer);
  EXPECT_EQ(stacked.size(), per_layer[0].size());
  EXPECT_EQ(stacked.at("params/decoder/layers/attn/query/kernel").shape(), (Shape{N, 8, 2, 4}));
  EXPECT_EQ(stacked.at("params/decoder/layers/ln/scale").shape(), (Shape{N, 8}));

  TempDir dir;
  io::save_msgpack(dir / "scan.msgpack", stacked);
  const io::Variables back = io::load_checkpoint(dir / "scan.msgpack");
  EXPECT_EQ(back, stacked);
  const io::ConstScope scan = io::ConstScope(back).push("decoder/layers");
  for (Index i = 0; i < N; ++i) {
    SCOPED_TRACE(i);
    const io::ConstScope layer = scan.layer(i, N);
    const Block::Params p = block.load(layer);
    expect_same(layers[static_cast<std::size_t>(i)], p);
    expect_same(block.load(io::ConstScope(unstacked, "decoder/layers_" + std::to_string(i))), p);

    // In place: the map points into the loaded stack, at layer i's offset.
    const ConstTensorMap<float, 3> k = layer.view<float, 3>("params/attn/query/kernel", {8, 2, 4});
    const io::Array& stack = back.at("params/decoder/layers/attn/query/kernel");
    EXPECT_EQ(static_cast<const void*>(k.data()),
              static_cast<const void*>(stack.bytes().data() + i * 8 * 2 * 4 * sizeof(float)));
    EXPECT_TRUE(same(Tensor<float, 3>(k), layers[static_cast<std::size_t>(i)].attn.params.query.kernel));
  }

  // Errors: the path, the layer and both shapes.
  std::string m = thrown<io_error>([&] { (void)io::load(scan.layer(1, N), dense(13), "wi"); });
  EXPECT_NE(m.find("params/decoder/layers/wi/kernel (layer 1 of 3): shape (8, 13) expected, file has (8, 12)"),
            std::string::npos)
      << m;
  m = thrown<io_error>([&] { (void)io::load(scan.layer(0, 4), block.ln, "ln"); });
  EXPECT_NE(m.find("params/decoder/layers/ln/scale: stacked by nn.scan of length 4 needs a leading axis of 4, file "
                   "has shape (3, 8)"),
            std::string::npos)
      << m;
  m = thrown<io_error>([&] { (void)scan.layer(0, N).view<double, 1>("params/ln/scale", {8}); });
  EXPECT_NE(m.find("a view of float64 needs float64 storage, file has layer 0 of float32 array of shape (3, 8)"),
            std::string::npos)
      << m;
  EXPECT_THROW((void)scan.layer(N, N), invalid_argument);
  EXPECT_THROW((void)scan.layer(0, N).layer(0, N), invalid_argument);
  io::Variables copy = back;
  EXPECT_THROW(io::store(io::Scope(copy, "decoder/layers").layer(0, N), layers[0].wi, "wi"), invalid_argument);
  EXPECT_EQ(copy, back);

  // store_stacked refuses layers that differ, and writes nothing then.
  per_layer[2].set("params/wi/bias", Tensor<float, 1>(5).setZero());
  m = thrown<io_error>([&] { io::store_stacked(io::Scope(copy, "decoder/layers"), per_layer); });
  EXPECT_NE(m.find("'params/wi/bias' is a float32 array of shape (12,) in layer 0, a float32 array of shape (5,) in "
                   "layer 2"),
            std::string::npos)
      << m;
  per_layer[2].erase("params/wi/bias");
  m = thrown<io_error>([&] { io::store_stacked(io::Scope(copy, "decoder/layers"), per_layer); });
  EXPECT_NE(m.find("layer 2 lacks 'params/wi/bias'"), std::string::npos) << m;
  EXPECT_EQ(copy, back);
}

// A stacked cache (nn.scan with variable_axes={'params': 0, 'cache': 0}) reads per layer
// too, through load_attention's own cache rules.
TEST(VariablesTree, ScanStackedCacheReadsPerLayer) {
  AttentionConfig<float> c;
  c.num_heads = 2;
  c.decode = true;
  const SelfAttention<float> attn(c);
  std::vector<io::Variables> per_layer(2);
  std::vector<AttentionVariables<float>> vs;
  for (int i = 0; i < 2; ++i) {
    AttentionVariables<float> v = attn.init(random::key(i), Tensor<float, 3>(1, 4, 8).setConstant(1.0f));
    v.cache->cache_index = i + 1;
    v.cache->cached_key.setConstant(static_cast<float>(i) + 0.5f);
    io::store(per_layer[static_cast<std::size_t>(i)], v, "attn");
    vs.push_back(std::move(v));
  }
  io::Variables stacked;
  io::store_stacked(io::Scope(stacked, "layers"), per_layer);
  EXPECT_EQ(stacked.at("cache/layers/attn/cache_index").shape(), (Shape{2}));
  for (int i = 0; i < 2; ++i) {
    const AttentionVariables<float> v = io::load(io::ConstScope(stacked, "layers").layer(i, 2), attn, "attn");
    ASSERT_TRUE(v.cache.has_value());
    EXPECT_EQ(v.cache->cache_index, i + 1);
    EXPECT_EQ(v.cache->batch, (Shape{1}));
    EXPECT_TRUE(same(v.cache->cached_key, vs[static_cast<std::size_t>(i)].cache->cached_key));
    EXPECT_TRUE(same(v.params.value.kernel, vs[static_cast<std::size_t>(i)].params.value.kernel));
  }
}

}  // namespace

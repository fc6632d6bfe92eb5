// SPDX-License-Identifier: Apache-2.0
// Multi-token decode steps (decode_chunk: prefill, speculative verification) and
// rollback (issue 16). A chunk of n positions must write the cache n decode steps write,
// byte for byte, and give their outputs (bit for bit for one or two rows, the row kernel's;
// to the dtype's rounding beyond, where the tiled kernel blocks the rows differently), and
// the full causal forward's; a rolled-back cache must be byte for byte the one that never
// saw the rejected tokens; every error leaves the cache unchanged; the cache stays
// Flax's (the decode fixtures, save / load mid-sequence); a warm workspace allocates
// nothing.
#define EIGEN_RUNTIME_NO_MALLOC
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_fixture.hpp"
#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen::Index;
using linen::Shape;
using linen::Tensor;
using linen_test::rel_err;

using linen_test::random_tensor;

// Positions [start, start + n) of x [..., len, features] (rank 3 or 4).
template <class T, int N>
Tensor<T, N> positions(const Tensor<T, N>& x, Index start, Index n) {
  Eigen::array<Index, N> off{}, ext{};
  for (int i = 0; i < N; ++i) ext[i] = x.dimension(i);
  off[N - 2] = start;
  ext[N - 2] = n;
  return x.slice(off, ext);
}

template <class T, class P = T>
linen::AttentionConfig<T, P> decode_config(Index heads, bool normalize_qk = false) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = heads;
  cfg.decode = true;
  cfg.normalize_qk = normalize_qk;
  return cfg;
}

template <class T>
bool same_bits(const linen::AttentionCache<T>& a, const linen::AttentionCache<T>& b) {
  return a.cache_index == b.cache_index && a.batch == b.batch &&
         linen::shape_of(a.cached_key) == linen::shape_of(b.cached_key) &&
         linen::shape_of(a.cached_value) == linen::shape_of(b.cached_value) &&
         std::memcmp(a.cached_key.data(), b.cached_key.data(), sizeof(T) * a.cached_key.size()) == 0 &&
         std::memcmp(a.cached_value.data(), b.cached_value.data(), sizeof(T) * a.cached_value.size()) == 0;
}

using linen_test::same_bits;

// ---------------------------------------------------------------------------------------
// A chunk against n single steps: chunks of 1, 2, 3, 5 and 1 positions (12) in lockstep
// with decode_step, optionally under a mask [B0, B1, 1|H, n, L] per chunk row (each single
// step then takes its row), comparing the caches byte for byte after every chunk.
template <class T, class P, class Module>
void expect_chunks_equal_single_steps(bool normalize_qk, bool masked) {
  std::mt19937 g(7);
  const Index B0 = 2, B1 = 3, L = 12, E = 16, H = 4;
  const Module attn(decode_config<T, P>(H, normalize_qk));
  const auto x = random_tensor<T, 4>({B0, B1, L, E}, g);
  auto vars = attn.init(linen::random::key(3), x);
  for (auto* s : {&vars.params.query_ln.scale, &vars.params.key_ln.scale})
    for (Index i = 0; i < s->size(); ++i) s->data()[i] = static_cast<P>(0.5 + 0.1 * static_cast<double>(i));
  auto steps = attn.init_cache(vars.params, {B0, B1}, L), chunked = steps;
  linen::DecodeWorkspace<T> w1, w2;
  Tensor<T, 4> one(B0, B1, 1, E);
  std::bernoulli_distribution keep(0.7);
  Index start = 0;
  for (const Index n : {1, 2, 3, 5, 1}) {
    Tensor<bool, 5> mask(B0, B1, 1, n, L);  // the chunk's rows; row 0 of each sees position 0
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(g);
    for (Index b0 = 0; b0 < B0; ++b0)
      for (Index b1 = 0; b1 < B1; ++b1)
        for (Index i = 0; i < n; ++i) mask(b0, b1, 0, i, 0) = true;
    linen::CallOptions<T> call;
    if (masked) call.mask = mask;
    Tensor<T, 4> out(B0, B1, n, E), want(B0, B1, n, E);
    for (Index i = 0; i < n; ++i) {
      const Eigen::array<Index, 5> moff{0, 0, 0, i, 0}, mext{B0, B1, 1, 1, L};
      const Tensor<bool, 5> row = mask.slice(moff, mext);
      linen::CallOptions<T> c1;
      if (masked) c1.mask = row;
      attn.decode_step(vars.params, steps, positions(x, start + i, 1), one, w1, c1);
      const Eigen::array<Index, 4> off{0, 0, i, 0}, ext{B0, B1, 1, E};
      want.slice(off, ext) = one;
    }
    attn.decode_chunk(vars.params, chunked, positions(x, start, n), out, w2, call);
    ASSERT_TRUE(same_bits(steps, chunked)) << "after the chunk at " << start << " of " << n;
    if (n <= 2) {
      EXPECT_TRUE(same_bits(out, want)) << "chunk at " << start << " of " << n << ": row kernel";
    }
    EXPECT_LE(rel_err(out, want), linen_test::tolerance<T>()) << "chunk at " << start << " of " << n;
    start += n;
  }
  EXPECT_EQ(chunked.cache_index, L);
}

TEST(DecodeChunk, EqualsSingleStepsFloat) {
  expect_chunks_equal_single_steps<float, float, linen::SelfAttention<float>>(false, false);
}
TEST(DecodeChunk, EqualsSingleStepsDoubleNormalizeQkMasked) {
  expect_chunks_equal_single_steps<double, double, linen::SelfAttention<double>>(true, true);
}
TEST(DecodeChunk, EqualsSingleStepsBfloat16FloatParams) {
  expect_chunks_equal_single_steps<Eigen::bfloat16, float, linen::SelfAttention<Eigen::bfloat16, float>>(true, true);
}
TEST(DecodeChunk, EqualsSingleStepsHalf) {
  expect_chunks_equal_single_steps<Eigen::half, Eigen::half, linen::SelfAttention<Eigen::half>>(false, false);
}
TEST(DecodeChunk, EqualsSingleStepsMultiHeadDotProductAttentionMasked) {
  expect_chunks_equal_single_steps<float, float, linen::MultiHeadDotProductAttention<float>>(false, true);
}

// A prefill (one chunk, or a chunk then more) equals the module without decode over the
// same tokens with the causal mask, in a cache of exactly that length or a longer one
// (whose positions past the chunk are never read).
template <class T>
void expect_prefill_equals_causal_forward() {
  std::mt19937 g(5);
  const Index B = 2, L = 37, E = 32, H = 4;
  const auto cfg = decode_config<T>(H);
  const linen::SelfAttention<T> attn(cfg);
  auto full_cfg = cfg;
  full_cfg.decode = false;
  const linen::SelfAttention<T> full(full_cfg);
  const auto x = random_tensor<T, 3>({B, L, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  Tensor<T, 2> ones(B, L);
  ones.setConstant(T(1));
  const Tensor<bool, 4> causal = linen::make_causal_mask(ones);
  linen::CallOptions<T> call;
  call.mask = causal;
  const Tensor<T, 3> want = full.apply(vars.params, x, call);
  linen::DecodeWorkspace<T> ws;
  for (const Index max_length : {L, 3 * L}) {
    auto cache = attn.init_cache(vars.params, {B}, max_length);
    Tensor<T, 3> out(B, L, E);
    attn.decode_chunk(vars.params, cache, x, out, ws);
    EXPECT_LE(rel_err(out, want), linen_test::tolerance<T>()) << max_length;
    EXPECT_EQ(cache.cache_index, L);
    // 16 positions, then the other 21
    auto split = attn.init_cache(vars.params, {B}, max_length);
    Tensor<T, 3> a(B, 16, E), b(B, L - 16, E);
    attn.decode_chunk(vars.params, split, positions(x, 0, 16), a, ws);
    attn.decode_chunk(vars.params, split, positions(x, 16, L - 16), b, ws);
    EXPECT_TRUE(same_bits(split, cache));
    EXPECT_LE(rel_err(b, Tensor<T, 3>(positions(want, 16, L - 16))), linen_test::tolerance<T>()) << max_length;
    EXPECT_LE(rel_err(a, Tensor<T, 3>(positions(want, 0, 16))), linen_test::tolerance<T>()) << max_length;
  }
}

TEST(DecodeChunk, PrefillEqualsTheCausalForwardFloat) { expect_prefill_equals_causal_forward<float>(); }
TEST(DecodeChunk, PrefillEqualsTheCausalForwardDouble) { expect_prefill_equals_causal_forward<double>(); }

// The general path (an attention_fn of one's own: the combined mask over the whole cache)
// takes chunks too, with a mask per row, and agrees with the direct one.
TEST(DecodeChunk, GeneralPathAgreesWithTheDirectOne) {
  std::mt19937 g(11);
  const Index B0 = 1, B1 = 3, L = 20, E = 8, H = 2, n = 7;
  auto cfg = decode_config<float>(H);
  const linen::SelfAttention<float> direct(cfg);
  cfg.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                        const linen::AttentionOptions<float>& o) {
    auto r = o;
    r.implementation = linen::Implementation::Reference;
    return linen::dot_product_attention(q, k, v, r);
  };
  const linen::SelfAttention<float> general(cfg);
  const auto x = random_tensor<float, 4>({B0, B1, 2 * n, E}, g);
  const auto vars = direct.init(linen::random::key(1), x);
  auto c1 = direct.init_cache(vars.params, {B0, B1}, L), c2 = c1;
  Tensor<bool, 5> mask(B0, B1, 1, n, L);  // entry 2 sees only the even positions
  for (Index b = 0; b < B1; ++b)
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < L; ++j) mask(0, b, 0, i, j) = b != 2 || j % 2 == 0;
  linen::CallOptions<float> call;
  call.mask = mask;
  linen::DecodeWorkspace<float> w1, w2;
  Tensor<float, 4> o1(B0, B1, n, E), o2(B0, B1, n, E);
  for (Index start : {Index{0}, n}) {
    direct.decode_chunk(vars.params, c1, positions(x, start, n), o1, w1, call);
    general.decode_chunk(vars.params, c2, positions(x, start, n), o2, w2, call);
    EXPECT_LE(rel_err(o1, o2), 2e-6) << start;
    EXPECT_TRUE(same_bits(c1, c2)) << start;
  }
}

// ---------------------------------------------------------------------------------------
// Errors: each leaves the cache byte for byte as it was.
TEST(DecodeChunk, ErrorsNameTheFaultAndLeaveTheCacheUnchanged) {
  std::mt19937 g(2);
  const Index B0 = 1, B1 = 2, E = 8, L = 6;
  const linen::SelfAttention<float> attn(decode_config<float>(2));
  auto general_cfg = decode_config<float>(2);
  general_cfg.attention_fn = [](const Tensor<float, 4>& q, const Tensor<float, 4>& k, const Tensor<float, 4>& v,
                                const linen::AttentionOptions<float>& o) { return linen::dot_product_attention(q, k, v, o); };
  const linen::SelfAttention<float> general(general_cfg);
  const auto x = random_tensor<float, 4>({B0, B1, L, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  auto cache = attn.init_cache(vars.params, {B0, B1}, L);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 4> out4(B0, B1, 4, E);
  attn.decode_chunk(vars.params, cache, positions(x, 0, 4), out4, ws);
  const auto before = cache;
  const auto unchanged = [&] { return same_bits(cache, before); };
  Tensor<float, 4> out3(B0, B1, 3, E);
  // 3 positions do not fit in the 2 left: direct and general paths
  for (const auto* m : {&attn, &general}) {
    try {
      m->decode_chunk(vars.params, cache, positions(x, 0, 3), out3, ws);
      FAIL() << "no exception";
    } catch (const linen::cache_overflow& e) {
      EXPECT_NE(std::string(e.what()).find("cache_index 4"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("max_length 6"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(unchanged());
  }
  // out of the wrong length
  try {
    attn.decode_chunk(vars.params, cache, positions(x, 0, 2), out3, ws);
    FAIL() << "no exception";
  } catch (const linen::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(1, 2, 3, 8)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("(1, 2, 2, 8)"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(unchanged());
  // no positions
  Tensor<float, 4> none(B0, B1, 0, E);
  EXPECT_THROW(attn.decode_chunk(vars.params, cache, none, none, ws), linen::invalid_argument);
  EXPECT_TRUE(unchanged());
  // a mask of the wrong row count
  Tensor<bool, 5> mask(B0, B1, 1, 3, L);
  mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = mask;
  Tensor<float, 4> out2(B0, B1, 2, E);
  EXPECT_THROW(attn.decode_chunk(vars.params, cache, positions(x, 0, 2), out2, ws, call), linen::invalid_argument);
  EXPECT_TRUE(unchanged());
  // batch dims that are not the cache's
  Tensor<float, 4> other(B1, B0, 2, E);
  other.setZero();
  EXPECT_THROW(attn.decode_chunk(vars.params, cache, other, out2, ws), linen::invalid_argument);
  EXPECT_TRUE(unchanged());
  // decode_step keeps Flax's shape error for two positions, also once a chunk of two has
  // been validated by the same workspace
  attn.decode_chunk(vars.params, cache, positions(x, 4, 2), out2, ws);
  linen::rollback(cache, 4);
  EXPECT_TRUE(unchanged());
  try {
    attn.decode_step(vars.params, cache, positions(x, 4, 2), out2, ws);
    FAIL() << "no exception";
  } catch (const linen::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("Autoregressive cache shape error"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(unchanged());
  // decode=false
  auto cfg = decode_config<float>(2);
  cfg.decode = false;
  EXPECT_THROW(linen::SelfAttention<float>(cfg).decode_chunk(vars.params, cache, positions(x, 4, 2), out2, ws),
               linen::invalid_argument);
  EXPECT_TRUE(unchanged());
}

// ---------------------------------------------------------------------------------------
// Speculative steps: verify k drafts in one chunk, roll back to the accepted prefix; the
// cache is then byte for byte one that only took the accepted tokens (zeros past the
// index, as init_cache makes them), and decoding on from it gives the same bits.
template <class T, class P>
void expect_rollback_equals_never_seeing_the_rejected() {
  std::mt19937 g(13);
  const Index B = 3, E = 16, H = 2, L = 24, prompt = 5, k = 4;
  const linen::SelfAttention<T, P> attn(decode_config<T, P>(H));
  const auto x = random_tensor<T, 3>({B, prompt + k + 1, E}, g);
  const auto drafts = random_tensor<T, 3>({B, k, E}, g);  // tokens other than the accepted ones
  const auto vars = attn.init(linen::random::key(2), x);
  linen::DecodeWorkspace<T> ws;
  Tensor<T, 3> p(B, prompt, E), v(B, k, E), one(B, 1, E), one_ref(B, 1, E);
  for (Index accepted = 0; accepted <= k; ++accepted) {
    auto spec = attn.init_cache(vars.params, {B}, L);
    attn.decode_chunk(vars.params, spec, positions(x, 0, prompt), p, ws);
    auto ref = spec;
    // the verified chunk: the accepted tokens of x, then rejected drafts
    Tensor<T, 3> chunk = positions(x, prompt, k);
    const Eigen::array<Index, 3> off{0, accepted, 0}, ext{B, k - accepted, E};
    chunk.slice(off, ext) = drafts.slice(off, ext);
    attn.decode_chunk(vars.params, spec, chunk, v, ws);
    linen::rollback(spec, prompt + accepted);
    if (accepted > 0) {
      Tensor<T, 3> acc(B, accepted, E);
      attn.decode_chunk(vars.params, ref, positions(x, prompt, accepted), acc, ws);
    }
    ASSERT_TRUE(same_bits(spec, ref)) << "accepted " << accepted;
    attn.decode_step(vars.params, spec, positions(x, prompt + accepted, 1), one, ws);
    attn.decode_step(vars.params, ref, positions(x, prompt + accepted, 1), one_ref, ws);
    EXPECT_TRUE(same_bits(one, one_ref)) << "accepted " << accepted;
    EXPECT_TRUE(same_bits(spec, ref)) << "accepted " << accepted;
  }
  // the slots past the index are zeros: byte for byte a fresh cache after rollback to 0
  auto c = attn.init_cache(vars.params, {B}, L);
  const auto fresh = c;
  attn.decode_chunk(vars.params, c, positions(x, 0, prompt), p, ws);
  linen::rollback(c, 0);
  EXPECT_TRUE(same_bits(c, fresh));
}

TEST(Rollback, EqualsNeverSeeingTheRejectedFloat) { expect_rollback_equals_never_seeing_the_rejected<float, float>(); }
TEST(Rollback, EqualsNeverSeeingTheRejectedBfloat16) {
  expect_rollback_equals_never_seeing_the_rejected<Eigen::bfloat16, float>();
}

TEST(Rollback, RejectsAnIndexOutsideTheCacheUnchanged) {
  std::mt19937 g(1);
  const linen::SelfAttention<float> attn(decode_config<float>(2));
  const auto x = random_tensor<float, 3>({1, 3, 8}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  auto cache = attn.init_cache(vars.params, {1}, 5);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(1, 3, 8);
  attn.decode_chunk(vars.params, cache, x, out, ws);
  const auto before = cache;
  for (const Index bad : {Index{-1}, Index{4}, Index{6}}) {
    try {
      linen::rollback(cache, bad);
      FAIL() << "no exception for " << bad;
    } catch (const linen::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("cache_index " + std::to_string(bad)), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("[0, 3]"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(same_bits(cache, before));
  }
  linen::rollback(cache, 3);  // to where it is: nothing changes
  EXPECT_TRUE(same_bits(cache, before));
}

// ---------------------------------------------------------------------------------------
// Flax interop: a prefill in one chunk equals Flax's decode steps (the fixtures' step
// outputs and final cache), also resumed from Flax's mid-sequence cache; a prefilled cache
// saved and loaded decodes on with the same bits.
TEST(DecodeChunkFlax, PrefillEqualsFlaxsDecodeSteps) {
  for (const char* name : {"decode_basic", "decode_padding_mask"}) {
    const auto f = linen_test::fixture(name);
    const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
    const linen::SelfAttention<float> attn(cfg);
    const auto x = f.get<float, 3>("inputs/q");
    const auto flax = linen::io::load_attention(f, cfg);  // the cache after all the steps
    auto cache = attn.init_cache(flax.params, {x.dimension(0)}, x.dimension(1));
    Tensor<bool, 4> kpm;  // [batch, 1, 1, max_length]: the same for every chunk row
    linen::CallOptions<float> call;
    if (f.contains("decode/key_padding_mask")) {
      kpm = f.get<bool, 4>("decode/key_padding_mask");
      call.mask = kpm;
    }
    linen::DecodeWorkspace<float> ws;
    Tensor<float, 3> out(x.dimensions());
    attn.decode_chunk(flax.params, cache, x, out, ws, call);
    EXPECT_LE(rel_err(out, f.get<double, 3>("decode/outputs")), 2e-6) << name;
    EXPECT_EQ(cache.cache_index, flax.cache->cache_index) << name;
    EXPECT_LE(rel_err(cache.cached_key, flax.cache->cached_key), 2e-6) << name;
    EXPECT_LE(rel_err(cache.cached_value, flax.cache->cached_value), 2e-6) << name;
  }
}

TEST(DecodeChunkFlax, ResumesFlaxsMidSequenceCacheWithOneChunk) {
  const auto f = linen_test::fixture("decode_resume");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const Index resume_at = std::stoi(f.metadata.at("resume_at")), steps = std::stoi(f.metadata.at("steps"));
  linen::io::Variables v;
  v.merge("params", f.subtree("params"));
  v.merge("cache", f.subtree("resume_cache"));
  auto vars = linen::io::load_attention(v, cfg);
  ASSERT_EQ(vars.cache->cache_index, resume_at);
  const auto x = f.get<float, 3>("inputs/q");
  Tensor<float, 3> out(x.dimension(0), steps - resume_at, x.dimension(2));
  linen::DecodeWorkspace<float> ws;
  linen::SelfAttention<float>(cfg).decode_chunk(vars.params, *vars.cache, positions(x, resume_at, steps - resume_at),
                                                out, ws);
  const Tensor<double, 3> want = positions(f.get<double, 3>("decode/outputs"), resume_at, steps - resume_at);
  EXPECT_LE(rel_err(out, want), 2e-6);
  const auto flax = linen::io::load_attention(f, cfg);
  EXPECT_LE(rel_err(vars.cache->cached_key, flax.cache->cached_key), 2e-6);
  EXPECT_EQ(vars.cache->cache_index, steps);
}

TEST(DecodeChunkFlax, PrefillSaveLoadContinue) {
  std::mt19937 g(4);
  const Index B0 = 2, B1 = 2, E = 16, L = 16, prompt = 9;
  const auto cfg = decode_config<float>(4);
  const linen::SelfAttention<float> attn(cfg);
  const auto x = random_tensor<float, 4>({B0, B1, L, E}, g);
  auto vars = attn.init(linen::random::key(6), x);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 4> p(B0, B1, prompt, E);
  attn.decode_chunk(vars.params, *vars.cache, positions(x, 0, prompt), p, ws);
  const std::string file = ::testing::TempDir() + "linen_decode_chunks_prefill.safetensors";
  {
    linen::io::Variables saved;
    linen::io::store_attention(saved, vars, cfg);
    EXPECT_EQ(saved.at("cache/cached_key").shape(), Shape({B0, B1, L, 4, 4}));  // Flax's layout
    linen::io::save_safetensors(file, saved);
  }
  auto loaded = linen::io::load_attention(linen::io::load_safetensors(file), cfg);
  std::remove(file.c_str());
  ASSERT_TRUE(loaded.cache.has_value());
  EXPECT_TRUE(same_bits(*loaded.cache, *vars.cache));
  // continue both: a chunk of 4 drafts, one accepted, then single steps
  Tensor<float, 4> a(B0, B1, 4, E), b(B0, B1, 4, E), s1(B0, B1, 1, E), s2(B0, B1, 1, E);
  attn.decode_chunk(vars.params, *vars.cache, positions(x, prompt, 4), a, ws);
  attn.decode_chunk(loaded.params, *loaded.cache, positions(x, prompt, 4), b, ws);
  EXPECT_TRUE(same_bits(a, b));
  linen::rollback(*vars.cache, prompt + 1);
  linen::rollback(*loaded.cache, prompt + 1);
  for (Index i = prompt + 1; i < L; ++i) {
    attn.decode_step(vars.params, *vars.cache, positions(x, i, 1), s1, ws);
    attn.decode_step(loaded.params, *loaded.cache, positions(x, i, 1), s2, ws);
    ASSERT_TRUE(same_bits(s1, s2)) << i;
  }
  EXPECT_TRUE(same_bits(*loaded.cache, *vars.cache));
}

// ---------------------------------------------------------------------------------------
// A warm workspace: chunks of the sizes it has served and rollbacks allocate nothing
// (every operator new counted, Eigen's allocator forbidden), as a speculative loop runs.
TEST(DecodeChunk, AWarmWorkspaceAllocatesNothing) {
  std::mt19937 g(8);
  const Index B = 2, E = 32, H = 4, L = 64, k = 4;
  const linen::SelfAttention<float> attn(decode_config<float>(H, true));
  const auto x = random_tensor<float, 3>({B, L, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  auto cache = attn.init_cache(vars.params, {B}, L);
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> pre(B, 8, E), verify(B, k, E), one(B, 1, E);
  const Tensor<float, 3> prompt = positions(x, 0, 8), drafts = positions(x, 8, k), next = positions(x, 8, 1);
  attn.decode_chunk(vars.params, cache, prompt, pre, ws);  // warm-up: each shape once
  attn.decode_chunk(vars.params, cache, drafts, verify, ws);
  attn.decode_step(vars.params, cache, next, one, ws);
  linen::rollback(cache, 0);
  long news[4] = {};  // prefill, verify, rollback, step
  const auto counted = [&news](int which, auto&& f) {
    const linen_test::NoAllocation guard;
    f();
    news[which] += guard.count();
  };
  counted(0, [&] { attn.decode_chunk(vars.params, cache, prompt, pre, ws); });
  for (int round = 0; round < 10; ++round) {
    counted(1, [&] { attn.decode_chunk(vars.params, cache, drafts, verify, ws); });
    counted(2, [&] { linen::rollback(cache, cache.cache_index - k + 1); });
    counted(3, [&] { attn.decode_step(vars.params, cache, next, one, ws); });
  }
  for (int i = 0; i < 4; ++i) EXPECT_EQ(news[i], 0) << "prefill, verify, rollback, step: " << i;
  EXPECT_EQ(cache.cache_index, 8 + 20);
}

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// The paged KV cache (issue 16): the kernels' paged addressing (AttentionProblem::
// block_table: K and V read in place through a block table) against the contiguous
// problem, bit for bit, on both kernels and every element type; PagedCache, the ragged
// steps on it against the same steps on a BatchCache (bit for bit: the same kernel calls
// and arithmetic) and each sequence alone on a Flax cache of batch 1; join / leave /
// block reuse, a full pool, rollback's byte identity, the errors (the cache unchanged)
// and the Flax interop (import_flax / export_flax on the decode fixtures).
#define EIGEN_RUNTIME_NO_MALLOC
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention_fixture.hpp"
#include "counting_new.hpp"  // counts every operator new in linen_test::g_news

namespace {

using linen::BatchCache;
using linen::Index;
using linen::PagedCache;
using linen::Shape;
using linen::Tensor;
using linen_test::random_tensor;
using linen_test::message_of;
using linen_test::same_bytes;
using linen_test::rel_err;

// ---------------------------------------------------------------------------------------
// The kernels: a problem over K, V [B, Lk, H, D] equals, bit for bit, the same problem
// whose K and V lie in a pool of blocks in shuffled order, found through a block table.

struct KernelCase {
  Index B, Lq, Lk, H, D, block;
  int path;          // 1 tiled, 2 row
  bool causal, windowed, masked, grouped;
};

template <class T>
void expect_paged_equals_contiguous(const KernelCase& kc, std::mt19937& g) {
  using linen::detail::AttentionProblem;
  const Index kvH = kc.grouped ? kc.H / 2 : kc.H;
  const auto q = random_tensor<T, 4>({kc.B, kc.Lq, kc.H, kc.D}, g);
  const auto k = random_tensor<T, 4>({kc.B, kc.Lk, kvH, kc.D}, g);
  const auto v = random_tensor<T, 4>({kc.B, kc.Lk, kvH, kc.D}, g);
  // the pool: every sequence's blocks, shuffled, plus spare blocks of garbage
  const Index per = (kc.Lk + kc.block - 1) / kc.block, blocks = kc.B * per + 3, F = kvH * kc.D;
  std::vector<std::int32_t> order(static_cast<std::size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), g);
  std::vector<std::int32_t> table(static_cast<std::size_t>(kc.B * per));
  const auto garbage = random_tensor<T, 4>({blocks, kc.block, kvH, kc.D}, g);
  Tensor<T, 4> kp = garbage, vp = garbage;
  for (Index b = 0; b < kc.B; ++b)
    for (Index t = 0; t < per; ++t) {
      const std::int32_t id = order[static_cast<std::size_t>(b * per + t)];
      table[static_cast<std::size_t>(b * per + t)] = id;
      for (Index p = t * kc.block; p < std::min(kc.Lk, (t + 1) * kc.block); ++p) {
        std::copy(k.data() + (b * kc.Lk + p) * F, k.data() + (b * kc.Lk + p + 1) * F,
                  kp.data() + (Index{id} * kc.block + p % kc.block) * F);
        std::copy(v.data() + (b * kc.Lk + p) * F, v.data() + (b * kc.Lk + p + 1) * F,
                  vp.data() + (Index{id} * kc.block + p % kc.block) * F);
      }
    }
  std::vector<std::int32_t> offsets, lens;
  for (Index b = 0; b < kc.B; ++b) {
    lens.push_back(static_cast<std::int32_t>(std::max<Index>(1, kc.Lk - 7 * b)));
    offsets.push_back(lens.back() - static_cast<std::int32_t>(kc.Lq));
  }
  Tensor<bool, 4> mask(kc.B, 1, kc.Lq, kc.Lk);
  std::bernoulli_distribution keep(0.8);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = keep(g);
  auto problem = [&](Tensor<T, 4>& out) {
    linen::detail::AttentionDims d;
    d.B = kc.B;
    d.Lq = kc.Lq;
    d.Lk = kc.Lk;
    d.H = kc.H;
    d.D = d.Dv = kc.D;
    AttentionProblem<T> a = linen::detail::flax_problem<T>(d, q.data(), k.data(), v.data(), out.data());
    a.k_sb = a.v_sb = kc.Lk * F;
    a.k_sl = a.v_sl = F;
    if (kc.grouped) a.kv_group = 2;
    if (kc.causal) {
      a.causal = true;
      a.causal_offsets = offsets.data();
      a.kv_len = lens.data();
      a.causal_hides_values = true;
    }
    if (kc.windowed) {
      a.windowed = true;
      a.window_left = 37;
      a.window_right = 2;
    }
    if (kc.masked) {
      a.mask.data = mask.data();
      a.mask.sb = kc.Lq * kc.Lk;
      a.mask.sq = kc.Lk;
      a.mask.sk = 1;
    }
    a.tuning.path = kc.path;
    return a;
  };
  Tensor<T, 4> want(kc.B, kc.Lq, kc.H, kc.D), got(kc.B, kc.Lq, kc.H, kc.D);
  linen::detail::fused_attention<T>(problem(want));
  AttentionProblem<T> a = problem(got);
  a.key = kp.data();
  a.value = vp.data();
  a.k_sb = a.v_sb = 0xdead;  // unused when paged
  a.block_table = table.data();
  a.table_stride = per;
  a.block_size = kc.block;
  linen::detail::fused_attention<T>(a);
  EXPECT_TRUE(same_bytes(got.data(), want.data(), got.size()))
      << "B " << kc.B << " Lq " << kc.Lq << " Lk " << kc.Lk << " H " << kc.H << " D " << kc.D << " block "
      << kc.block << " path " << kc.path << " causal " << kc.causal << " windowed " << kc.windowed << " masked "
      << kc.masked << " grouped " << kc.grouped << " (max rel err " << rel_err(got, want) << ")";
}

template <class T>
void expect_paged_kernels() {
  std::mt19937 g(3);
  const std::vector<Index> sizes{1, 2, 3, 16, 37, 40, 64, 512};
  for (const Index block : sizes)
    for (const int path : {2, 1})
      for (const Index lq : path == 2 ? std::vector<Index>{1, 2, 5} : std::vector<Index>{9, 37})
        for (const int rules : {0, 1, 2, 3}) {
          KernelCase kc{3, lq, 300, 4, 16, block, path, rules >= 1, rules == 2, rules == 3, rules == 3};
          expect_paged_equals_contiguous<T>(kc, g);
          kc.H = 1;  // head by head (the row kernel's other loop)
          kc.grouped = false;
          expect_paged_equals_contiguous<T>(kc, g);
        }
}

TEST(PagedKernels, FloatReadsBlocksInPlaceBitForBit) { expect_paged_kernels<float>(); }
TEST(PagedKernels, DoubleReadsBlocksInPlaceBitForBit) { expect_paged_kernels<double>(); }
TEST(PagedKernels, HalfReadsBlocksInPlaceBitForBit) { expect_paged_kernels<Eigen::half>(); }
// bfloat16's pair products (avx512_bf16) take two keys at a time: odd block sizes split
// pairs at block ends, and the key left alone takes the single-key fmadd (the same bits).
TEST(PagedKernels, Bfloat16ReadsBlocksInPlaceBitForBit) { expect_paged_kernels<Eigen::bfloat16>(); }

// ---------------------------------------------------------------------------------------
// PagedCache steps against the same steps on a BatchCache and against each sequence alone

template <class T, class P = T>
linen::AttentionConfig<T, P> decode_config(Index heads, bool normalize_qk = false) {
  linen::AttentionConfig<T, P> cfg;
  cfg.num_heads = heads;
  cfg.decode = true;
  cfg.normalize_qk = normalize_qk;
  return cfg;
}

// The paged cache's sequences, gathered, are the BatchCache's byte for byte.
template <class T>
bool same_sequences(const PagedCache<T>& p, const BatchCache<T>& b) {
  const BatchCache<T> g = linen::to_batch_cache(p);
  if (g.active_slots() != b.active_slots()) return false;
  for (Index s = 0; s < b.slots(); ++s)
    if (g.cache_index(s) != b.cache_index(s)) return false;
  return same_bytes(g.cached_key().data(), b.cached_key().data(), b.cached_key().size()) &&
         same_bytes(g.cached_value().data(), b.cached_value().data(), b.cached_value().size());
}

// Every free block and the zero block are zeros, every held block past its sequence's
// index is zeros, and each sequence holds ceil(index / block_size) blocks, distinct.
template <class T>
void expect_pool_invariants(const PagedCache<T>& c) {
  const Index bs = c.block_size(), F = c.num_heads() * c.head_dim(), NB = c.num_blocks();
  std::vector<int> owner(static_cast<std::size_t>(NB + 1), -1);
  Index held = 0;
  for (Index s = 0; s < c.slots(); ++s) {
    const std::int32_t* t = c.block_table(s);
    const Index nb = c.blocks_held(s);
    held += nb;
    for (Index i = 0; i < c.table_length(); ++i) {
      if (i >= nb) {
        ASSERT_EQ(t[i], NB) << "slot " << s << " table entry " << i << " past its blocks";
        continue;
      }
      ASSERT_TRUE(t[i] >= 0 && t[i] < NB);
      ASSERT_EQ(owner[static_cast<std::size_t>(t[i])], -1) << "block " << t[i] << " held twice";
      owner[static_cast<std::size_t>(t[i])] = static_cast<int>(s);
      for (Index p = std::max<Index>(c.cache_index(s) - i * bs, 0); p < bs; ++p)
        for (const Tensor<T, 4>* pool : {&c.key_pool(), &c.value_pool()})
          for (Index e = 0; e < F; ++e)
            ASSERT_TRUE(pool->data()[(Index{t[i]} * bs + p) * F + e] == T(0)) << "slot " << s << " position " << i * bs + p;
    }
  }
  ASSERT_EQ(held + c.free_blocks(), NB);
  for (const std::int32_t id : c.free_list()) {
    ASSERT_EQ(owner[static_cast<std::size_t>(id)], -1);
    for (const Tensor<T, 4>* pool : {&c.key_pool(), &c.value_pool()})
      for (Index e = 0; e < bs * F; ++e) ASSERT_TRUE(pool->data()[Index{id} * bs * F + e] == T(0)) << "free block " << id;
  }
  for (const Tensor<T, 4>* pool : {&c.key_pool(), &c.value_pool()})
    for (Index e = 0; e < bs * F; ++e) ASSERT_TRUE(pool->data()[NB * bs * F + e] == T(0)) << "the zero block";
  const std::vector<std::int32_t> free = c.free_list();
  ASSERT_TRUE(std::is_sorted(free.rbegin(), free.rend()));
}

// Five slots, a pool of fewer blocks than five full sequences need; sequences join, take
// ragged chunks (counts in [0, n]) and single steps, leave, and their blocks are taken
// again. Each step runs on the PagedCache, on a BatchCache and (n <= 8, bit for bit as
// well) on each sequence alone on a Flax cache of batch 1.
template <class T, class Module>
void expect_paged_equals_batch(Index n_max, Index block, bool masked, bool alone_bitwise) {
  std::mt19937 g(17);
  const Index S = 5, L = 96, E = 16, H = 4, NB = 3 * L / block;
  const Module attn(decode_config<T>(H, /*normalize_qk=*/true));
  const auto vars = attn.init(linen::random::key(5), random_tensor<T, 3>({1, 1, E}, g));
  PagedCache<T> paged = attn.init_paged_cache(vars.params, S, L, block, NB);
  BatchCache<T> batch = attn.init_batch_cache(vars.params, S, L);
  std::vector<linen::AttentionCache<T>> alone(static_cast<std::size_t>(S));
  linen::DecodeWorkspace<T> wp, wb, wa;
  std::uniform_int_distribution<int> coin(0, 9);
  Index reused = 0;
  for (int step = 0; step < 30; ++step) {
    if (paged.free_slots() > 0 && (step < 3 || coin(g) < 3)) {
      const Index s = paged.join();
      ASSERT_EQ(batch.join(), s);
      alone[static_cast<std::size_t>(s)] = attn.init_cache(vars.params, {1}, L);
    }
    if (paged.active_slots().size() > 2 && coin(g) < 2) {
      const Index s = paged.active_slots()[static_cast<std::size_t>(coin(g)) % paged.active_slots().size()];
      const Index before = paged.free_blocks(), held = paged.blocks_held(s);
      paged.leave(s);
      batch.leave(s);
      EXPECT_EQ(paged.free_blocks(), before + held) << "slot " << s << "'s blocks back in the pool";
      reused += held;
    }
    const bool single = step % 5 == 4;
    std::vector<std::int32_t> slots(paged.active_slots()), counts;
    if (!single) {
      std::shuffle(slots.begin(), slots.end(), g);
      if (slots.size() > 1 && coin(g) < 3) slots.pop_back();
    }
    const Index n = single ? 1 : 1 + static_cast<Index>(g() % static_cast<unsigned>(n_max));
    const Index B = static_cast<Index>(slots.size());
    // counts that fit the pool (the overflow is tested below)
    Index free = paged.free_blocks();
    for (Index i = 0; i < B; ++i) {
      const Index s = slots[static_cast<std::size_t>(i)], cur = paged.cache_index(s);
      Index c = single ? 1 : static_cast<Index>(g() % static_cast<unsigned>(n + 1));
      if (i == 0 && !single) c = n;
      c = std::min(c, L - cur);
      while (c > 0 && (cur + c + block - 1) / block - (cur + block - 1) / block > free) --c;
      free -= (cur + c + block - 1) / block - (cur + block - 1) / block;
      counts.push_back(static_cast<std::int32_t>(c));
    }
    if (single) {
      bool fits = true;
      for (Index i = 0; i < B; ++i) fits = fits && counts[static_cast<std::size_t>(i)] == 1;
      if (!fits) continue;
    }
    auto x = random_tensor<T, 3>({B, n, E}, g);
    Tensor<bool, 4> mask(B, 1, n, L);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = coin(g) != 0;
    linen::CallOptions<T> call;
    if (masked) call.mask = mask;
    Tensor<T, 3> out_p(B, n, E), out_b(B, n, E);
    if (single) {
      attn.decode_step(vars.params, paged, x, out_p, wp, call);
      attn.decode_step(vars.params, batch, x, out_b, wb, call);
    } else {
      attn.decode_chunk(vars.params, paged, slots, counts, x, out_p, wp, call);
      attn.decode_chunk(vars.params, batch, slots, counts, x, out_b, wb, call);
    }
    ASSERT_TRUE(same_bytes(out_p.data(), out_b.data(), out_p.size())) << "step " << step << " n " << n;
    ASSERT_TRUE(same_sequences(paged, batch)) << "step " << step;
    expect_pool_invariants(paged);
    for (Index i = 0; i < B; ++i) {  // each sequence alone
      const Index s = slots[static_cast<std::size_t>(i)], c = counts[static_cast<std::size_t>(i)];
      if (c == 0) continue;
      Eigen::array<Index, 3> off{i, 0, 0}, ext{1, c, E};
      const Tensor<T, 3> xi = x.slice(off, ext);
      Tensor<T, 3> oi(1, c, E);
      Tensor<bool, 4> mi(1, 1, c, L);
      for (Index r = 0; r < c; ++r)
        for (Index j = 0; j < L; ++j) mi(0, 0, r, j) = mask(i, 0, r, j);
      linen::CallOptions<T> ci;
      if (masked) ci.mask = mi;
      attn.decode_chunk(vars.params, alone[static_cast<std::size_t>(s)], xi, oi, wa, ci);
      const Tensor<T, 3> got = out_p.slice(off, ext);
      if (alone_bitwise && n <= 8)
        EXPECT_TRUE(same_bytes(got.data(), oi.data(), got.size())) << "step " << step << " slot " << s;
      else
        EXPECT_LE(rel_err(got, oi), linen_test::tolerance<T>() * 4) << "step " << step << " slot " << s;
    }
  }
  EXPECT_GT(reused, 0) << "no sequence left holding blocks: the test did not reuse blocks";
}

TEST(PagedCache, RaggedStepsEqualBatchCacheAndEachAloneFloat) {
  expect_paged_equals_batch<float, linen::SelfAttention<float>>(8, 5, false, true);
}
TEST(PagedCache, RaggedMaskedStepsEqualBatchCacheDouble) {
  expect_paged_equals_batch<double, linen::MultiHeadDotProductAttention<double>>(6, 16, true, true);
}
TEST(PagedCache, RaggedStepsEqualBatchCacheBfloat16) {
  expect_paged_equals_batch<Eigen::bfloat16, linen::SelfAttention<Eigen::bfloat16>>(4, 8, true, true);
}
TEST(PagedCache, TiledChunksEqualBatchCacheBitForBit) {  // n > 8: the tiled kernel
  expect_paged_equals_batch<float, linen::SelfAttention<float>>(20, 7, true, false);
}

// ---------------------------------------------------------------------------------------
// join / leave / block accounting, a full pool, rollback

template <class T>
struct Snapshot {
  Tensor<T, 4> key, value;
  std::vector<std::int32_t> tables, free, index, active;
  explicit Snapshot(const PagedCache<T>& c) : key(c.key_pool()), value(c.value_pool()), free(c.free_list()) {
    for (Index s = 0; s < c.slots(); ++s) {
      tables.insert(tables.end(), c.block_table(s), c.block_table(s) + c.table_length());
      index.push_back(c.cache_index(s));
      active.push_back(c.active(s));
    }
  }
  bool operator==(const Snapshot& o) const {
    return tables == o.tables && free == o.free && index == o.index && active == o.active &&
           same_bytes(key.data(), o.key.data(), key.size()) && same_bytes(value.data(), o.value.data(), value.size());
  }
};

TEST(PagedCache, MemoryGrowsWithTheTokensHeld) {
  std::mt19937 g(2);
  const Index E = 8, H = 2, bs = 4;
  const linen::SelfAttention<float> attn(decode_config<float>(H));
  const auto vars = attn.init(linen::random::key(1), random_tensor<float, 3>({1, 1, E}, g));
  PagedCache<float> c = attn.init_paged_cache(vars.params, 3, 64, bs, 10);
  EXPECT_EQ(c.table_length(), 16);
  EXPECT_EQ(c.free_blocks(), 10);
  const std::int32_t a = static_cast<std::int32_t>(c.join()), b = static_cast<std::int32_t>(c.join());
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 6, E);
  attn.decode_chunk(vars.params, c, {a, b}, {1, 6}, random_tensor<float, 3>({2, 6, E}, g), out, ws);
  EXPECT_EQ(c.blocks_held(a), 1);
  EXPECT_EQ(c.blocks_held(b), 2);
  EXPECT_EQ(c.free_blocks(), 7);
  // blocks are taken lowest first: a took 0, b 1 and 2
  EXPECT_EQ(c.block_table(a)[0], 0);
  EXPECT_EQ(c.block_table(b)[0], 1);
  EXPECT_EQ(c.block_table(b)[1], 2);
  EXPECT_EQ(c.block_table(b)[2], 10);  // the zero block
  for (int i = 0; i < 3; ++i) {  // a grows to 4 positions: still its one block
    Tensor<float, 3> o1(2, 1, E);
    attn.decode_step(vars.params, c, random_tensor<float, 3>({2, 1, E}, g), o1, ws);
  }
  EXPECT_EQ(c.cache_index(a), 4);
  EXPECT_EQ(c.blocks_held(a), 1);
  EXPECT_EQ(c.blocks_held(b), 3);  // 9 positions
  c.leave(a);                      // block 0 back, zeroed
  EXPECT_EQ(c.free_list().back(), 0);
  expect_pool_invariants(c);
  const auto a2 = static_cast<std::int32_t>(c.join());
  EXPECT_EQ(a2, a);
  Tensor<float, 3> o2(1, 1, E);
  attn.decode_chunk(vars.params, c, {a2}, {}, random_tensor<float, 3>({1, 1, E}, g), o2, ws);
  EXPECT_EQ(c.block_table(a2)[0], 0) << "the freed block taken again";
  expect_pool_invariants(c);
}

// no heap allocation after warm-up: joins, leaves, rollbacks (blocks back to the pool and
// taken again) and ragged steps of varying counts and slots, with a mask, on a copy of a
// cache (whose containers the copy sized)
TEST(PagedCache, NoAllocationAfterWarmUp) {
  std::mt19937 g(9);
  const Index S = 4, L = 64, E = 32, H = 4, n = 4;
  const linen::SelfAttention<float> attn(decode_config<float>(H, true));
  auto x = random_tensor<float, 3>({S, n, E}, g);
  const auto vars = attn.init(linen::random::key(1), x);
  PagedCache<float> made = attn.init_paged_cache(vars.params, S, L, 3, 80);
  for (Index i = 0; i < S; ++i) made.join();
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(S, n, E);
  Tensor<bool, 4> mask(S, 1, 1, L);
  mask.setConstant(true);
  linen::CallOptions<float> call;
  call.mask = mask;
  std::vector<std::int32_t> slots{0, 1, 2, 3}, counts{4, 4, 4, 4};
  Tensor<float, 3> x1 = random_tensor<float, 3>({S, 1, E}, g), o1(S, 1, E);
  attn.decode_chunk(vars.params, made, slots, counts, x, out, ws, call);  // warm-up
  attn.decode_step(vars.params, made, x1, o1, ws, call);
  PagedCache<float> cache = made;
  long news = 0;
  {
    linen_test::NoAllocation guard;
    for (int step = 0; step < 10; ++step) {
      std::swap(slots[static_cast<std::size_t>(step % 4)], slots[static_cast<std::size_t>((step + 1) % 4)]);
      for (auto& c : counts) c = static_cast<std::int32_t>((c + step) % (n + 1));
      if (step == 5) {
        cache.leave(2);
        (void)cache.join();
        linen::rollback(cache, 1, 1);
      }
      attn.decode_chunk(vars.params, cache, slots, counts, x, out, ws, call);
      attn.decode_step(vars.params, cache, x1, o1, ws, call);
    }
    news = guard.count();
  }
  EXPECT_EQ(news, 0);
}

TEST(PagedCache, AFullPoolThrowsCacheOverflowAndChangesNothing) {
  std::mt19937 g(6);
  const Index E = 8, H = 2, bs = 4;
  const linen::SelfAttention<float> attn(decode_config<float>(H));
  const auto vars = attn.init(linen::random::key(1), random_tensor<float, 3>({1, 1, E}, g));
  PagedCache<float> c = attn.init_paged_cache(vars.params, 3, 32, bs, 2);
  const std::int32_t a = static_cast<std::int32_t>(c.join()), b = static_cast<std::int32_t>(c.join());
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 5, E);
  attn.decode_chunk(vars.params, c, {a, b}, {4, 3}, random_tensor<float, 3>({2, 5, E}, g), out, ws);
  EXPECT_EQ(c.free_blocks(), 0);
  const Snapshot<float> before(c);
  // b has room in its block (3 of 4), a's block is full: the whole step refused
  const std::string what = message_of(
      [&] { attn.decode_chunk(vars.params, c, {b, a}, {1, 1}, random_tensor<float, 3>({2, 5, E}, g), out, ws); });
  EXPECT_NE(what.find("need 1 new blocks"), std::string::npos) << what;
  EXPECT_NE(what.find("0 free (of 2)"), std::string::npos) << what;
  EXPECT_THROW(attn.decode_chunk(vars.params, c, {b, a}, {1, 1}, random_tensor<float, 3>({2, 5, E}, g), out, ws),
               linen::cache_overflow);
  Tensor<float, 3> o1(2, 1, E);
  EXPECT_THROW(attn.decode_step(vars.params, c, random_tensor<float, 3>({2, 1, E}, g), o1, ws), linen::cache_overflow);
  EXPECT_TRUE(Snapshot<float>(c) == before);
  // b alone fits its block
  Tensor<float, 3> ob(1, 1, E);
  attn.decode_chunk(vars.params, c, {b}, {}, random_tensor<float, 3>({1, 1, E}, g), ob, ws);
  EXPECT_EQ(c.cache_index(b), 4);
  // max_length is the other limit
  PagedCache<float> small = attn.init_paged_cache(vars.params, 1, 5, bs, 8);
  small.join();
  Tensor<float, 3> o6(1, 6, E);
  const Snapshot<float> empty(small);
  EXPECT_NE(message_of([&] {
              attn.decode_chunk(vars.params, small, {0}, {}, random_tensor<float, 3>({1, 6, E}, g), o6, ws);
            }).find("max_length 5"),
            std::string::npos);
  EXPECT_TRUE(Snapshot<float>(small) == empty);
  EXPECT_THROW(small.join(), linen::cache_overflow);
}

// A verify step of k drafts on one sequence, then a rollback to the accepted prefix,
// leaves the whole cache byte for byte as a step of only the accepted tokens would (the
// same inputs: their keys and values are the same rows of the same projections).
TEST(PagedCache, RollbackIsByteIdenticalToNeverSeeingTheRejectedTokens) {
  std::mt19937 g(9);
  const Index E = 16, H = 4, bs = 3, L = 40;
  const linen::SelfAttention<float> attn(decode_config<float>(H));
  const auto vars = attn.init(linen::random::key(2), random_tensor<float, 3>({1, 1, E}, g));
  auto history = [&](PagedCache<float>& c, linen::DecodeWorkspace<float>& ws) {
    std::mt19937 h(1);
    for (int i = 0; i < 3; ++i) c.join();
    Tensor<float, 3> out3(3, 4, E), out2(2, 4, E);
    attn.decode_chunk(vars.params, c, {0, 1, 2}, {4, 2, 3}, random_tensor<float, 3>({3, 4, E}, h), out3, ws);
    c.leave(1);  // a hole in the pool below the others' blocks
    attn.decode_chunk(vars.params, c, {2, 0}, {1, 4}, random_tensor<float, 3>({2, 4, E}, h), out2, ws);
  };
  const auto drafts = random_tensor<float, 3>({1, 7, E}, g);
  for (const Index accept : {0, 1, 2, 5, 7}) {
    PagedCache<float> a = attn.init_paged_cache(vars.params, 3, L, bs, 12), b = a;
    linen::DecodeWorkspace<float> wa, wb;
    history(a, wa);
    history(b, wb);
    const Index before = a.cache_index(2);
    Tensor<float, 3> out(1, 7, E);
    attn.decode_chunk(vars.params, a, {2}, {7}, drafts, out, wa);
    linen::rollback(a, 2, before + accept);
    if (accept > 0) attn.decode_chunk(vars.params, b, {2}, {static_cast<std::int32_t>(accept)}, drafts, out, wb);
    EXPECT_TRUE(Snapshot<float>(a) == Snapshot<float>(b)) << "accepted " << accept;
    expect_pool_invariants(a);
  }
  // bad rollbacks: nothing changed, the value named
  PagedCache<float> c = attn.init_paged_cache(vars.params, 3, L, bs, 12);
  linen::DecodeWorkspace<float> ws;
  history(c, ws);
  const Snapshot<float> s(c);
  EXPECT_NE(message_of([&] { linen::rollback(c, 0, 9); }).find("cache_index 9: it must lie in [0, 8]"),
            std::string::npos);
  EXPECT_NE(message_of([&] { linen::rollback(c, 0, -1); }).find("[0, 8]"), std::string::npos);
  EXPECT_NE(message_of([&] { linen::rollback(c, 1, 0); }).find("slot 1, which holds no sequence"), std::string::npos);
  EXPECT_NE(message_of([&] { linen::rollback(c, 3, 0); }).find("slot 3 outside [0, 3)"), std::string::npos);
  EXPECT_TRUE(Snapshot<float>(c) == s);
}

TEST(PagedCache, BadInputsNameWhatIsAtFaultAndChangeNothing) {
  std::mt19937 g(4);
  const Index L = 12, E = 8, H = 2;
  const linen::MultiHeadDotProductAttention<float> attn(decode_config<float>(H));
  const auto vars = attn.init(linen::random::key(1), random_tensor<float, 3>({1, 1, E}, g));
  PagedCache<float> cache = attn.init_paged_cache(vars.params, 3, L, 4, 6);
  cache.join();
  cache.join();
  linen::DecodeWorkspace<float> ws;
  Tensor<float, 3> out(2, 3, E);
  attn.decode_chunk(vars.params, cache, {0, 1}, {2, 3}, random_tensor<float, 3>({2, 3, E}, g), out, ws);
  const Snapshot<float> before(cache);
  struct Bad {
    std::vector<std::int32_t> slots, counts;
    const char* names;
  };
  for (const Bad& c : std::vector<Bad>{{{0, 3}, {}, "slots[1] = 3 outside [0, 3) (the PagedCache's slots)"},
                                       {{0, 2}, {}, "slots[1] = 2 holds no sequence"},
                                       {{1, 1}, {}, "slot 1 appears twice"},
                                       {{0, 1}, {1, 4}, "counts[1] = 4 outside [0, 3]"},
                                       {{0, 1}, {1, -1}, "counts[1] = -1"},
                                       {{0, 1}, {1}, "1 counts for 2 slots"}}) {
    const auto x = random_tensor<float, 3>({2, 3, E}, g);
    const std::string what = message_of([&] { attn.decode_chunk(vars.params, cache, c.slots, c.counts, x, out, ws); });
    EXPECT_NE(what.find(c.names), std::string::npos) << what;
    EXPECT_TRUE(Snapshot<float>(cache) == before) << c.names;
  }
  Tensor<float, 3> one(1, 1, E), o1(1, 1, E);
  EXPECT_NE(message_of([&] { attn.decode_step(vars.params, cache, one, o1, ws); }).find("a PagedCache step of 2"),
            std::string::npos);
  Tensor<float, 3> wide(2, 1, E + 1), ow(2, 1, E);
  EXPECT_THROW(attn.decode_step(vars.params, cache, wide, ow, ws), linen::invalid_argument);
  EXPECT_TRUE(Snapshot<float>(cache) == before);
  // a cache of other heads than the module's
  PagedCache<float> other(2, L, 4, 1, 4, 4);
  other.join();
  Tensor<float, 3> x1(1, 1, E), y1(1, 1, E);
  x1.setZero();
  EXPECT_NE(message_of([&] { attn.decode_step(vars.params, other, x1, y1, ws); }).find("PagedCache step of 1"),
            std::string::npos);
  // the fallback (dropout) is refused on this layout
  auto cfg = decode_config<float>(H);
  cfg.dropout_rate = 0.5;
  cfg.deterministic = false;
  const linen::MultiHeadDotProductAttention<float> dropping(cfg);
  EXPECT_THROW(dropping.decode_chunk(vars.params, cache, {0}, {1}, Tensor<float, 3>(1, 1, E).setZero(), o1, ws),
               linen::invalid_argument);
  // constructor, slots, leave
  EXPECT_NE(message_of([] { (void)PagedCache<float>(2, 8, 2, 4, 0, 4); }).find("block_size 0"), std::string::npos);
  EXPECT_NE(message_of([] { (void)PagedCache<float>(2, 0, 2, 4, 4, 4); }).find("max_length 0"), std::string::npos);
  EXPECT_NE(message_of([] { (void)PagedCache<float>(2, 8, 2, 4, 4, -1); }).find("num_blocks -1"), std::string::npos);
  EXPECT_NE(message_of([&] { (void)cache.block_table(7); }).find("block_table: slot 7 outside [0, 3)"),
            std::string::npos);
  EXPECT_NE(message_of([&] { cache.leave(2); }).find("slot 2 holds no sequence"), std::string::npos);
  EXPECT_TRUE(Snapshot<float>(cache) == before);
  EXPECT_THROW((void)cache.active(-1), linen::invalid_argument);
}

// ---------------------------------------------------------------------------------------
// Flax interop: import a Flax cache into pages, continue there, export back

void decode_fixture_through_paged_cache(const std::string& name, Index block) {
  const auto f = linen_test::fixture(name);
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  const linen::SelfAttention<float> attn(cfg);
  const auto x = f.get<float, 3>("inputs/q");  // [B, steps, E]
  const auto expected = f.get<float, 3>("decode/outputs");
  const Index steps = std::stoi(f.metadata.at("steps")), B = x.dimension(0), E = x.dimension(2);
  const auto params = linen::io::load_attention(f, cfg).params;
  Index start = 0;
  linen::AttentionCache<float> flax = attn.init_cache(params, {B}, x.dimension(1));
  if (f.metadata.count("resume_at")) {
    linen::io::Variables v;
    v.merge("params", f.subtree("params"));
    v.merge("cache", f.subtree("resume_cache"));
    flax = *linen::io::load_attention(v, cfg).cache;
    start = std::stoi(f.metadata.at("resume_at"));
  }
  PagedCache<float> cache = linen::import_flax(flax, linen::PagedLayout{block, 0}, B + 1);
  ASSERT_EQ(cache.active_slots().size(), static_cast<std::size_t>(B));
  EXPECT_EQ(cache.cache_index(0), start);
  EXPECT_EQ(cache.blocks_held(0), (start + block - 1) / block);
  {
    const auto back = linen::export_flax(cache, flax.batch);
    EXPECT_EQ(back.cache_index, flax.cache_index);
    EXPECT_TRUE(linen_test::same_bits(back.cached_key, flax.cached_key));
    EXPECT_TRUE(linen_test::same_bits(back.cached_value, flax.cached_value));
  }
  Tensor<bool, 4> kpm;
  linen::CallOptions<float> call;
  if (f.contains("decode/key_padding_mask")) {
    kpm = f.get<bool, 4>("decode/key_padding_mask");
    call.mask = kpm;
  }
  linen::DecodeWorkspace<float> ws, wf;
  Tensor<float, 3> out(B, 1, E), out_f(B, 1, E);
  for (Index i = start; i < steps; ++i) {
    attn.decode_step(params, cache, linen_test::position(x, i), out, ws, call);
    attn.decode_step(params, flax, linen_test::position(x, i), out_f, wf, call);
    EXPECT_LE(rel_err(out, linen_test::position(expected, i)), 2e-6) << name << " step " << i;
    EXPECT_TRUE(linen_test::same_bits(out, out_f)) << name << " step " << i << ": the Flax cache's step";
  }
  const auto want = *linen::io::load_attention(f, cfg).cache;
  const auto got = linen::export_flax(cache, want.batch);
  EXPECT_EQ(got.cache_index, want.cache_index);
  EXPECT_EQ(got.batch, want.batch);
  EXPECT_LE(rel_err(got.cached_key, want.cached_key), 2e-6) << name;
  EXPECT_LE(rel_err(got.cached_value, want.cached_value), 2e-6) << name;
  EXPECT_TRUE(linen_test::same_bits(got.cached_key, flax.cached_key));
  EXPECT_TRUE(linen_test::same_bits(got.cached_value, flax.cached_value));
}

TEST(PagedCacheFlax, DecodeBasicRoundTrip) { decode_fixture_through_paged_cache("decode_basic", 2); }
TEST(PagedCacheFlax, DecodeResumeRoundTrip) { decode_fixture_through_paged_cache("decode_resume", 3); }
TEST(PagedCacheFlax, DecodePaddingMaskRoundTrip) { decode_fixture_through_paged_cache("decode_padding_mask", 1); }

TEST(PagedCacheFlax, ImportAndExportErrorsNameTheFault) {
  const auto f = linen_test::fixture("decode_basic");
  const auto cfg = linen_test::config_from<float, float>(linen_test::fixture_config(f));
  linen::AttentionCache<float> flax = *linen::io::load_attention(f, cfg).cache;
  EXPECT_NE(message_of([&] { (void)linen::import_flax(flax, linen::PagedLayout{0, 0}); }).find("block_size 0"),
            std::string::npos);
  const std::string few = message_of([&] { (void)linen::import_flax(flax, linen::PagedLayout{2, 1}); });
  EXPECT_NE(few.find("num_blocks is 1"), std::string::npos) << few;
  EXPECT_THROW((void)linen::import_flax(flax, linen::PagedLayout{2, 1}), linen::cache_overflow);
  linen::AttentionCache<float> dirty = flax;
  linen::rollback(dirty, flax.cache_index - 1);
  dirty.cached_value.data()[dirty.cached_value.size() - 1] = 1.0f;  // past the index
  EXPECT_NE(message_of([&] { (void)linen::import_flax(dirty, linen::PagedLayout{}); }).find("past cache_index"),
            std::string::npos);
  PagedCache<float> c = linen::import_flax(flax, linen::PagedLayout{4, 0}, flax.batch[0] + 1);
  ASSERT_GT(flax.batch[0], 1);
  {
    linen::rollback(c, 1, flax.cache_index - 1);
    EXPECT_NE(message_of([&] { (void)linen::export_flax(c); }).find("one cache_index for the batch"),
              std::string::npos);
  }
  EXPECT_NE(message_of([] { (void)linen::export_flax(PagedCache<float>(2, 4, 1, 1, 2, 2)); }).find("no active sequence"),
            std::string::npos);
}

}  // namespace

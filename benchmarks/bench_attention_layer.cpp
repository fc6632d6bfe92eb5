// SPDX-License-Identifier: Apache-2.0
//
// The whole layer: linen::SelfAttention<float> forward (module apply: the q, k, v
// projections, attention, the output projection), inputs [B, L, E], H heads of E/H:
//   BM_self_attention/B/L/E/H            the default attention_fn (the fused kernel)
//   BM_self_attention_reference/B/L/E/H  attention_fn forced to Implementation::Reference
//   BM_self_attention_bf16/B/L/E/H       bfloat16 activations, float32 params
//   BM_self_attention_causal/.../flag:0  make_causal_mask passed as the call's mask
//   BM_self_attention_causal/.../flag:1  attention_fn setting is_causal (no mask tensor)
//   BM_self_attention_threads/.../threads:1|2  an Eigen::ThreadPool of 1 or 2 threads as
//       AttentionConfig::thread_pool: the projections split by rows, the fused kernel's
//       work items, on the pool.
//   BM_self_attention_heap/B/L/E/H/kept:0|1/workspace:0|1  the layer with glibc's default
//       malloc ("[default malloc]", kept:0) or a heap that keeps freed memory (kept:1),
//       plain apply (workspace:0) or apply_into with an AttentionWorkspace (workspace:1);
//       see the rows' comment below.
//   BM_self_attention_decode_step/L/E/H/dtype:32|16  one decode step of the module at the
//       end of an L-position cache (decode_step with a DecodeWorkspace: projections,
//       cache write, attention over L positions, output projection), cycling through
//       >= 128 MiB of caches so the cache is read from DRAM. GB/s counts the cache bytes
//       read; compare with BM_fused_decode_step (the attention alone) and
//       BM_memory_read_bandwidth. dtype 16: bfloat16 activations and cache, float params.
//       L:256 rows: a short cache, where the four projections (the GEMV, bench_gemm.cpp's
//       BM_gemv rows) take most of the step.
//   BM_self_attention_prefill/L/n/E/H/chunk:1|0  n tokens into an empty L-position cache
//       in one decode_chunk (chunk:1), against the module without decode over the same n
//       tokens with is_causal (chunk:0, apply_into with an AttentionWorkspace); GFLOP/s
//       counts the same dense flops for both (issue 16: prefill >= 0.9x the forward).
//   BM_self_attention_batch_decode/B/L/E/H/layout:0|1|2/block  one decode_step over B
//       sequences at the end of L-position contexts on a BatchCache (layout:0) or a
//       PagedCache of `block`-position blocks, interleaved (layout:1) or each sequence's
//       in order (layout:2), the same sequences (issue 16: paged within 10%).
//   BM_self_attention_ragged_decode/B/L/E/H  one decode_step on a BatchCache of B
//       sequences of ragged lengths (2048..4095 positions) at E=512: bytes of cache and
//       weights read per step / time (issue 16: at least 0.8x BM_memory_read_bandwidth).
//   BM_self_attention_verify/L/E/H/k  a k-position decode_chunk at the end of an
//       L-position cache (speculative verification of k drafts; k:1 is one step), cycling
//       through >= 128 MiB of caches like the decode_step rows: compare k:4's time with
//       k:1's (issue 16: under 1.5x).
// GFLOP/s counts the dense 8*B*L*E^2 (four projections) + 4*B*L^2*E (attention) for every
// row, causal ones included. Compare with the same run's BM_eigen_sgemm/n:1024 (one
// thread, like every row here but threads:2).
#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstddef>
#include <ctime>
#include <cstdint>
#include <random>
#include <vector>

#if defined(__GLIBC__) && defined(__linux__)
#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include <benchmark/benchmark.h>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/linen.hpp>

namespace {

using linen::Index;

linen::Tensor<float, 3> random_inputs(Index b, Index l, Index e, unsigned seed) {
  linen::Tensor<float, 3> t(b, l, e);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

double layer_flops(Index b, Index l, Index e) {
  return 8.0 * double(b) * double(l) * double(e) * double(e) + 4.0 * double(b) * double(l) * double(l) * double(e);
}

// Builds the module (its parameters from linen's initializers, seed 0), then times apply.
void run_layer(benchmark::State& state, linen::AttentionConfig<float> config, const linen::CallOptions<float>& call) {
  const Index b = state.range(0), l = state.range(1), e = state.range(2);
  config.num_heads = state.range(3);
  const linen::SelfAttention<float> layer(config);
  const linen::Tensor<float, 3> x = random_inputs(b, l, e, 1);
  const auto variables = layer.init(linen::random::key(0), x);
  for (auto _ : state) {
    linen::Tensor<float, 3> y = layer.apply(variables, x, call);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(layer_flops(b, l, e) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// attention_fn: linen::dot_product_attention with some options changed.
template <class F>
linen::AttentionFn<float> with_options(F change) {
  return [change](const linen::Tensor<float, 4>& q, const linen::Tensor<float, 4>& k, const linen::Tensor<float, 4>& v,
                  const linen::AttentionOptions<float>& options) {
    linen::AttentionOptions<float> o = options;
    change(o);
    return linen::dot_product_attention(q, k, v, o);
  };
}

void BM_self_attention(benchmark::State& state) { run_layer(state, {}, {}); }
void BM_self_attention_reference(benchmark::State& state) {
  linen::AttentionConfig<float> config;
  config.attention_fn = with_options([](linen::AttentionOptions<float>& o) { o.implementation = linen::Implementation::Reference; });
  run_layer(state, config, {});
}
// The shapes (B, L, E, H).
void layer_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"B", "L", "E", "H"})
      ->Args({1, 512, 512, 8})
      ->Args({1, 2048, 512, 8})
      ->Args({8, 128, 512, 8})
      ->Args({1, 4096, 256, 4})
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}
BENCHMARK(BM_self_attention)->Apply(layer_shapes);

// The same layer with bfloat16 activations and float32 params (Flax's dtype=bfloat16,
// param_dtype=float32); compare its time with BM_self_attention's row.
void BM_self_attention_bf16(benchmark::State& state) {
  using Bf = Eigen::bfloat16;
  const Index b = state.range(0), l = state.range(1), e = state.range(2);
  linen::AttentionConfig<Bf, float> config;
  config.num_heads = state.range(3);
  const linen::SelfAttention<Bf, float> layer(config);
  const linen::Tensor<Bf, 3> x = random_inputs(b, l, e, 1).cast<Bf>();
  const auto variables = layer.init(linen::random::key(0), x);
  for (auto _ : state) {
    linen::Tensor<Bf, 3> y = layer.apply(variables, x);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(layer_flops(b, l, e) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_self_attention_bf16)->Apply(layer_shapes);
BENCHMARK(BM_self_attention_reference)->Apply(layer_shapes);

void BM_self_attention_causal(benchmark::State& state) {
  linen::AttentionConfig<float> config;
  linen::CallOptions<float> call;
  linen::Tensor<bool, 4> mask;  // outlives `call`
  if (state.range(4) == 0) {
    linen::Tensor<float, 2> tokens(state.range(0), state.range(1));
    tokens.setZero();
    mask = linen::make_causal_mask(tokens);  // [B, 1, L, L]
    call.mask = mask;
  } else {
    config.attention_fn = with_options([](linen::AttentionOptions<float>& o) { o.is_causal = true; });
  }
  run_layer(state, config, call);
}
BENCHMARK(BM_self_attention_causal)
    ->ArgNames({"B", "L", "E", "H", "flag"})
    ->Args({1, 2048, 512, 8, 0})
    ->Args({1, 2048, 512, 8, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_self_attention_threads(benchmark::State& state) {
  Eigen::ThreadPool pool(static_cast<int>(state.range(4)));
  linen::AttentionConfig<float> config;
  config.thread_pool = &pool;
  run_layer(state, config, {});
}
BENCHMARK(BM_self_attention_threads)
    ->ArgNames({"B", "L", "E", "H", "threads"})
    ->Args({1, 2048, 512, 8, 1})
    ->Args({1, 2048, 512, 8, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

template <class T>
void decode_layer(benchmark::State& state) {
  const Index l = state.range(0), e = state.range(1), h = state.range(2);
  linen::AttentionConfig<T, float> config;
  config.num_heads = h;
  config.decode = true;
  const linen::SelfAttention<T, float> layer(config);
  linen::Tensor<T, 3> x(1, 1, e);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(normal(gen));
  const auto params = layer.init(linen::random::key(0), x).params;
  const Index cache_bytes = 2 * l * e * Index(sizeof(T));
  const Index count = std::max<Index>(2, (Index{128} << 20) / cache_bytes);
  std::vector<typename linen::SelfAttention<T, float>::Cache> caches;
  std::uint32_t r = 12345;
  for (Index c = 0; c < count; ++c) {
    caches.push_back(layer.init_cache(params, {1}, l));
    for (auto* t : {&caches.back().cached_key, &caches.back().cached_value})
      for (Index i = 0; i < t->size(); ++i) {  // a cheap generator: std::normal over 128 MiB takes seconds
        r = r * 1664525u + 1013904223u;
        t->data()[i] = T(float(r >> 8) * 0x1p-24f * 2.0f - 1.0f);
      }
  }
  linen::DecodeWorkspace<T> workspace;
  linen::Tensor<T, 3> y(1, 1, e);
  Index c = 0;
  for (auto _ : state) {
    auto& cache = caches[static_cast<std::size_t>(c)];
    cache.cache_index = static_cast<std::int32_t>(l - 1);  // the step attends to all L positions
    layer.decode_step(params, cache, x, y, workspace);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % count;
  }
  state.counters["GB/s"] = benchmark::Counter(double(cache_bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
void BM_self_attention_decode_step(benchmark::State& state) {
  if (state.range(3) == 16) decode_layer<Eigen::bfloat16>(state);
  else decode_layer<float>(state);
}
BENCHMARK(BM_self_attention_decode_step)
    ->ArgNames({"L", "E", "H", "dtype"})
    ->Args({4096, 512, 8, 32})
    ->Args({4096, 512, 8, 16})
    ->Args({256, 512, 8, 32})
    ->Args({256, 512, 8, 16})
    ->Args({256, 2048, 16, 32})
    ->Args({256, 2048, 16, 16})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Batched decode over per-sequence caches: B sequences each at the end of an L-position
// context, one decode_step of the module over all of them, on a BatchCache (layout:0,
// contiguous slots) or a PagedCache of `block`-position blocks from one pool (layout:1:
// the sequences' blocks interleaved as a ragged prefill leaves them; layout:2: each
// sequence's blocks in order, as import_flax lays them out). The same work: the same
// sequences (the BatchCache is the PagedCache gathered), the same kernel calls; each
// iteration rolls every sequence back one position (zeroing a row) before its step.
// Several caches are cycled (>= 128 MiB) so that the cache is read from DRAM; GB/s counts
// the cache bytes read. Issue 16: paged within 10% of contiguous.
void BM_self_attention_batch_decode(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), e = state.range(2), h = state.range(3);
  const Index layout = state.range(4), block = state.range(5), chunk = 4 * block;
  linen::AttentionConfig<float> config;
  config.num_heads = h;
  config.decode = true;
  const linen::SelfAttention<float> layer(config);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  linen::Tensor<float, 3> x(b, 1, e), y(b, 1, e), xc(b, chunk, e), yc(b, chunk, e);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  for (Index i = 0; i < xc.size(); ++i) xc.data()[i] = normal(gen);
  const auto params = layer.init(linen::random::key(0), x).params;
  const Index cache_bytes = 2 * b * l * e * Index(sizeof(float));
  const Index count = std::max<Index>(2, (Index{128} << 20) / cache_bytes);
  // built once per shape (a prefill of b * l tokens in ragged chunks, so that the
  // sequences' blocks interleave in the pool)
  static std::vector<linen::PagedCache<float>> interleaved, in_order;
  static std::vector<linen::BatchCache<float>> contiguous;
  static std::vector<Index> built;
  const std::vector<Index> shape{b, l, e, h, block};
  if (built != shape) {
    interleaved.clear();
    in_order.clear();
    contiguous.clear();
    linen::DecodeWorkspace<float> ws;
    std::vector<std::int32_t> slots;
    for (Index s = 0; s < b; ++s) slots.push_back(static_cast<std::int32_t>(s));
    for (Index c = 0; c < count; ++c) {
      linen::PagedCache<float> pc = layer.init_paged_cache(params, b, l, block, b * ((l + block - 1) / block));
      for (Index s = 0; s < b; ++s) pc.join();
      for (Index done = 0; done < l;) {
        std::vector<std::int32_t> counts;
        for (Index s = 0; s < b; ++s)  // ragged: sequence s takes chunk - block * (s % 4) tokens a step
          counts.push_back(static_cast<std::int32_t>(std::min(chunk - block * (s % 4), l - pc.cache_index(s))));
        layer.decode_chunk(params, pc, slots, counts, xc, yc, ws);
        done = l;
        for (Index s = 0; s < b; ++s) done = std::min<Index>(done, pc.cache_index(s));
      }
      contiguous.push_back(linen::to_batch_cache(pc));
      in_order.push_back(linen::import_flax(linen::export_flax(pc), linen::PagedLayout{block, 0}));
      interleaved.push_back(std::move(pc));
    }
    built = shape;
  }
  linen::DecodeWorkspace<float> workspace;
  Index c = 0;
  for (auto _ : state) {
    if (layout != 0) {
      auto& cache = (layout == 1 ? interleaved : in_order)[static_cast<std::size_t>(c)];
      for (Index s = 0; s < b; ++s) linen::rollback(cache, s, l - 1);  // the step attends to all L positions
      layer.decode_step(params, cache, x, y, workspace);
    } else {
      auto& cache = contiguous[static_cast<std::size_t>(c)];
      for (Index s = 0; s < b; ++s) linen::rollback(cache, s, l - 1);
      layer.decode_step(params, cache, x, y, workspace);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % count;
  }
  state.counters["GB/s"] = benchmark::Counter(double(cache_bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_self_attention_batch_decode)
    ->ArgNames({"B", "L", "E", "H", "layout", "block"})
    ->Args({4, 4096, 512, 8, 0, 16})
    ->Args({4, 4096, 512, 8, 1, 16})
    ->Args({4, 4096, 512, 8, 2, 16})
    ->Args({4, 4096, 512, 8, 1, 64})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Batched decode on a BatchCache (per-sequence positions): B sequences of ragged lengths
// (sequence i holds 4096 - 1 - i * 2048 / B positions, so the batch spans 2048..4095), one
// decode_step advancing every sequence by one token, then each rolled back by that token
// (linen::rollback: zeroes one position per sequence) so every iteration does the same
// work; caches cycled so that >= 128 MiB are read from DRAM. GB/s counts the bytes a step
// must read: every sequence's keys and values up to its position, and the four float32
// projection kernels (4 * E * E * 4 bytes, read once for the batch). Compare with the same
// run's BM_memory_read_bandwidth (issue 16: at least 0.8x).
void BM_self_attention_ragged_decode(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), e = state.range(2), h = state.range(3);
  linen::AttentionConfig<float> config;
  config.num_heads = h;
  config.decode = true;
  const linen::SelfAttention<float> layer(config);
  linen::Tensor<float, 3> x(b, 1, e), y(b, 1, e);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  const auto params = layer.init(linen::random::key(0), x).params;
  std::vector<std::int32_t> lengths;
  double cache_bytes = 0;
  for (Index i = 0; i < b; ++i) {
    lengths.push_back(static_cast<std::int32_t>(l - 1 - i * (l / 2) / b));
    cache_bytes += 2.0 * double(lengths.back() + 1) * double(e) * sizeof(float);
  }
  const Index count = std::max<Index>(2, (Index{128} << 20) / Index(cache_bytes));
  std::vector<linen::BatchCache<float>> caches;
  std::uint32_t r = 12345;
  for (Index c = 0; c < count; ++c) {
    auto flax = layer.init_cache(params, {b}, l);
    for (auto* t : {&flax.cached_key, &flax.cached_value})
      for (Index i = 0; i < t->size(); ++i) {
        r = r * 1664525u + 1013904223u;
        t->data()[i] = float(r >> 8) * 0x1p-24f * 2.0f - 1.0f;
      }
    flax.cache_index = static_cast<std::int32_t>(l);  // full, then each sequence rolled back to its length
    caches.push_back(linen::import_flax(flax));
    for (Index i = 0; i < b; ++i) linen::rollback(caches.back(), i, lengths[static_cast<std::size_t>(i)]);
  }
  linen::DecodeWorkspace<float> workspace;
  Index c = 0;
  for (auto _ : state) {
    auto& cache = caches[static_cast<std::size_t>(c)];
    layer.decode_step(params, cache, x, y, workspace);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    for (Index i = 0; i < b; ++i) linen::rollback(cache, i, lengths[static_cast<std::size_t>(i)]);
    c = (c + 1) % count;
  }
  const double bytes = cache_bytes + 4.0 * double(e) * double(e) * sizeof(float);
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_self_attention_ragged_decode)
    ->ArgNames({"B", "L", "E", "H"})
    ->Args({1, 4096, 512, 8})
    ->Args({4, 4096, 512, 8})
    ->Args({16, 4096, 512, 8})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_self_attention_prefill(benchmark::State& state) {
  const Index l = state.range(0), n = state.range(1), e = state.range(2), h = state.range(3);
  const bool chunk = state.range(4) != 0;
  linen::AttentionConfig<float> config;
  config.num_heads = h;
  linen::Tensor<float, 3> x(1, n, e), y(1, n, e);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  const auto params = linen::SelfAttention<float>(config).init(linen::random::key(0), x).params;
  if (chunk) {
    config.decode = true;
    const linen::SelfAttention<float> layer(config);
    auto cache = layer.init_cache(params, {1}, l);
    linen::DecodeWorkspace<float> workspace;
    for (auto _ : state) {
      cache.cache_index = 0;
      layer.decode_chunk(params, cache, x, y, workspace);
      benchmark::DoNotOptimize(y.data());
    }
  } else {
    config.attention_fn = with_options([](linen::AttentionOptions<float>& o) { o.is_causal = true; });
    const linen::SelfAttention<float> layer(config);
    linen::AttentionWorkspace<float> workspace;
    for (auto _ : state) {
      layer.apply_into(params, x, y, workspace);
      benchmark::DoNotOptimize(y.data());
    }
  }
  const double flops = 8.0 * double(n) * double(e) * double(e) + 4.0 * double(n) * double(n) * double(e);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_self_attention_prefill)
    ->ArgNames({"L", "n", "E", "H", "chunk"})
    ->Args({4096, 512, 512, 8, 1})
    ->Args({4096, 512, 512, 8, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_self_attention_verify(benchmark::State& state) {
  const Index l = state.range(0), e = state.range(1), h = state.range(2), k = state.range(3);
  linen::AttentionConfig<float> config;
  config.num_heads = h;
  config.decode = true;
  const linen::SelfAttention<float> layer(config);
  linen::Tensor<float, 3> x(1, k, e), y(1, k, e);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  const auto params = layer.init(linen::random::key(0), x).params;
  const Index cache_bytes = 2 * l * e * Index(sizeof(float));
  const Index count = std::max<Index>(2, (Index{128} << 20) / cache_bytes);
  std::vector<linen::SelfAttention<float>::Cache> caches;
  std::uint32_t r = 12345;
  for (Index c = 0; c < count; ++c) {
    caches.push_back(layer.init_cache(params, {1}, l));
    for (auto* t : {&caches.back().cached_key, &caches.back().cached_value})
      for (Index i = 0; i < t->size(); ++i) {
        r = r * 1664525u + 1013904223u;
        t->data()[i] = float(r >> 8) * 0x1p-24f * 2.0f - 1.0f;
      }
  }
  linen::DecodeWorkspace<float> workspace;
  Index c = 0;
  for (auto _ : state) {
    auto& cache = caches[static_cast<std::size_t>(c)];
    cache.cache_index = static_cast<std::int32_t>(l - k);  // the last row attends to all L positions
    layer.decode_chunk(params, cache, x, y, workspace);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % count;
  }
  state.counters["GB/s"] = benchmark::Counter(double(cache_bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_self_attention_verify)
    ->ArgNames({"L", "E", "H", "k"})
    ->Args({4096, 512, 8, 1})
    ->Args({4096, 512, 8, 4})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// ---- What a loop of apply() costs with the allocator users have -----------------------
//   BM_self_attention_heap/B/L/E/H/kept:0|1/workspace:0|1
// kept:0 "[default malloc]": glibc's malloc as a process has it (it returns large freed
// blocks to the system, so memory allocated per call faults its pages in again); kept:1
// glibc told to keep freed memory (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = INT_MAX:
// what the GLIBC_TUNABLES do), i.e. a warm heap. workspace:0 plain layer.apply (the
// library's per-thread scratch; the returned tensor is allocated each call), workspace:1
// apply_into a caller's tensor with an AttentionWorkspace (no allocation after the first
// call). Each run of a row happens in a forked child (both kinds alike), so that the
// mallopt of a kept row never reaches another row (mallopt also turns off glibc's
// dynamic mmap threshold for good); the child times one warm-up call (first_call_ms) and
// then each iteration, the parent reports those times (manual time) and the child's CPU
// time per call (cpu_ms: user + system, so page faults count; the fairer comparison on a
// loaded machine, where wall time includes waiting for a core).
#if defined(__GLIBC__) && defined(__linux__)
// Returns the warm-up call's seconds (-1: the child failed); `seconds` and `cpu` get each
// timed call's wall and process CPU seconds (user + system: page faults included).
double run_heap_child(Index b, Index l, Index e, Index h, bool kept, bool workspace, benchmark::IterationCount n,
                      std::vector<double>& seconds, std::vector<double>& cpu) {
  int fd[2];
  if (pipe(fd) != 0) return -1;
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    close(fd[0]);
    if (kept) {
      mallopt(M_MMAP_MAX, 0);
      mallopt(M_TRIM_THRESHOLD, INT_MAX);
    }
    linen::AttentionConfig<float> config;
    config.num_heads = h;
    const linen::SelfAttention<float> layer(config);
    const linen::Tensor<float, 3> x = random_inputs(b, l, e, 1);
    const auto variables = layer.init(linen::random::key(0), x);
    linen::AttentionWorkspace<float> ws;
    linen::Tensor<float, 3> out(b, l, e);
    const std::size_t calls = static_cast<std::size_t>(n) + 1;
    std::vector<double> t(2 * calls);  // wall seconds, then CPU seconds; [0]: the warm-up
    const auto cpu_now = [] {
      timespec ts{};
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
      return double(ts.tv_sec) + double(ts.tv_nsec) * 1e-9;
    };
    for (std::size_t i = 0; i < calls; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      const double c0 = cpu_now();
      if (workspace) {
        layer.apply_into(variables.params, x, out, ws);
        benchmark::DoNotOptimize(out.data());
      } else {
        linen::Tensor<float, 3> y = layer.apply(variables, x);
        benchmark::DoNotOptimize(y.data());
      }
      benchmark::ClobberMemory();
      t[calls + i] = cpu_now() - c0;
      t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const char* p = reinterpret_cast<const char*>(t.data());
    std::size_t left = t.size() * sizeof(double);
    while (left > 0) {
      const ssize_t w = write(fd[1], p, left);
      if (w <= 0) _exit(1);
      p += w;
      left -= static_cast<std::size_t>(w);
    }
    _exit(0);
  }
  close(fd[1]);
  const std::size_t calls = static_cast<std::size_t>(n) + 1;
  std::vector<double> t(2 * calls);
  char* p = reinterpret_cast<char*>(t.data());
  std::size_t left = t.size() * sizeof(double);
  while (left > 0) {
    const ssize_t r = read(fd[0], p, left);
    if (r <= 0) break;
    p += r;
    left -= static_cast<std::size_t>(r);
  }
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (left != 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return -1;
  seconds.assign(t.begin() + 1, t.begin() + static_cast<std::ptrdiff_t>(calls));
  cpu.assign(t.begin() + static_cast<std::ptrdiff_t>(calls) + 1, t.end());
  return t[0];
}

void BM_self_attention_heap(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), e = state.range(2), h = state.range(3);
  std::vector<double> seconds, cpu;
  const double warm_up = run_heap_child(b, l, e, h, state.range(4) != 0, state.range(5) != 0, state.max_iterations,
                                        seconds, cpu);
  if (warm_up < 0) {
    state.SkipWithError("the measuring child process failed");
    return;
  }
  std::size_t i = 0;
  for (auto _ : state) state.SetIterationTime(seconds[i++]);
  state.counters["first_call_ms"] = warm_up * 1e3;
  double cpu_sum = 0;
  for (double c : cpu) cpu_sum += c;
  // CPU per call: on a loaded machine the fairer comparison (wall time includes waiting)
  state.counters["cpu_ms"] = cpu.empty() ? 0.0 : cpu_sum / double(cpu.size()) * 1e3;
  state.counters["GFLOP/s"] = benchmark::Counter(layer_flops(b, l, e) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
void heap_shapes(benchmark::internal::Benchmark* bm) {
  bm->ArgNames({"B", "L", "E", "H", "kept", "workspace"});
  for (const auto& s : {std::array<Index, 4>{1, 2048, 512, 8}, std::array<Index, 4>{8, 128, 512, 8}})
    for (Index kept : {0, 1})
      for (Index ws : {0, 1}) bm->Args({s[0], s[1], s[2], s[3], kept, ws});
  bm->Unit(benchmark::kMillisecond)->UseManualTime();
}
BENCHMARK(BM_self_attention_heap)->Apply(heap_shapes);
#endif

}  // namespace

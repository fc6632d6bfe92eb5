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
//   BM_self_attention_decode_step/L/E/H/dtype:32|16  one decode step of the module at the
//       end of an L-position cache (decode_step with a DecodeWorkspace: projections,
//       cache write, attention over L positions, output projection), cycling through
//       >= 128 MiB of caches so the cache is read from DRAM. GB/s counts the cache bytes
//       read; compare with BM_fused_decode_step (the attention alone) and
//       BM_memory_read_bandwidth. dtype 16: bfloat16 activations and cache, float params.
// GFLOP/s counts the dense 8*B*L*E^2 (four projections) + 4*B*L^2*E (attention) for every
// row, causal ones included. Compare with the same run's BM_eigen_sgemm/n:1024 (one
// thread, like every row here but threads:2).
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

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
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

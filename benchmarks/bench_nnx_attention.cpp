// SPDX-License-Identifier: Apache-2.0
// nnx.MultiHeadAttention (include/linen/nnx/attention.hpp):
//   BM_nnx_mha_decode_step/L/E/N/K  one decode step of the nnx module (decode_step with a
//       DecodeWorkspace: the q, k, v projections, the cache write, the row kernel over the
//       L cached positions with jax.nn's numerics, the out projection) at the end of an
//       L-position cache of K kv heads, for a query of N heads (head_dim E / N, float32),
//       cycling through >= 128 MiB of caches so that the cache is read from DRAM, as
//       BM_self_attention_decode_step does (bench_attention_layer.cpp). K:2 against K:8 at
//       N:8 with the same query: grouped-query attention reads each of the K kv heads once
//       for its group of N / K query heads, 4x less cache (issue 14: >= 3x faster). GB/s
//       counts the cache bytes a step reads (2 * L * K * head_dim * 4).
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include <benchmark/benchmark.h>

#include <linen/nnx.hpp>

namespace {

using linen::Index;

void BM_nnx_mha_decode_step(benchmark::State& state) {
  const Index l = state.range(0), e = state.range(1), n = state.range(2), k = state.range(3);
  linen::nnx::MultiHeadAttention<float>::Config config;
  config.num_heads = n;
  config.in_features = e;
  config.num_kv_heads = k;
  const linen::nnx::MultiHeadAttention<float> mha(config);
  linen::nnx::Rngs rngs(0);
  const auto params = mha.init(rngs).params;
  linen::Tensor<float, 3> x(1, 1, e), y(1, 1, e);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  const Index cache_bytes = 2 * l * k * mha.head_dim() * Index(sizeof(float));
  const Index count = std::max<Index>(2, (Index{128} << 20) / cache_bytes);
  std::vector<linen::nnx::MultiHeadAttention<float>::Cache> caches;
  std::uint32_t r = 12345;
  for (Index c = 0; c < count; ++c) {
    caches.push_back(mha.init_cache({1, l, e}));
    for (auto* t : {&caches.back().cached_key, &caches.back().cached_value})
      for (Index i = 0; i < t->size(); ++i) {  // a cheap generator: std::normal over 128 MiB takes seconds
        r = r * 1664525u + 1013904223u;
        t->data()[i] = float(r >> 8) * 0x1p-24f * 2.0f - 1.0f;
      }
  }
  linen::DecodeWorkspace<float> workspace;
  Index c = 0;
  for (auto _ : state) {
    auto& cache = caches[static_cast<std::size_t>(c)];
    cache.cache_index = static_cast<std::int32_t>(l - 1);  // the step attends to all L positions
    mha.decode_step(params, cache, x, y, workspace);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    c = (c + 1) % count;
  }
  state.counters["GB/s"] = benchmark::Counter(double(cache_bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_nnx_mha_decode_step)
    ->ArgNames({"L", "E", "N", "K"})
    ->Args({4096, 512, 8, 2})
    ->Args({4096, 512, 8, 8})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

// SPDX-License-Identifier: Apache-2.0
//
// linen::dot_product_attention's two implementations in float32, q_len = kv_len = L,
// inputs [B, L, H, D]:
//   BM_fused_attention/B/L/H/D            Implementation::Fused (the default), 1 thread
//   BM_reference_attention/B/L/H/D        Implementation::Reference, 1 thread
//   BM_fused_attention_causal/.../mask:0  is_causal = true (tiles above the diagonal skipped)
//   BM_fused_attention_causal/.../mask:1  make_causal_mask's mask (all-false tiles skipped)
//   BM_fused_attention_threads/.../threads:1|2   an Eigen::ThreadPool of 1 or 2 threads
//   BM_fused_attention_bf16/B/L/H/D       the same in bfloat16 (vdpbf16ps pair products where
//       the target has avx512_bf16); compare its time with BM_fused_attention's row
//   BM_fused_decode_step/L:4096/H:8/D:64/dtype:32|16  one query against a cold cache
//   BM_fused_decode_step_threads/.../threads:1|2  the float32 step on a pool of 1 or 2
//       threads; compare its GB/s with BM_memory_read_streams of the same thread count
//   BM_memory_read_streams/threads:1|2    a plain streaming read of 256 MiB (4 interleaved
//       streams a thread, as ../shared/peers/peak.cpp reads): the same run's bandwidth
//   BM_fused_attention_peak_memory/L:32768/H:8/D:64  the high-water mark of one forward
// GFLOP/s counts the dense 4*B*L^2*H*D for every row, causal ones included (so a causal
// row's rate over the non-causal one is its speedup). Quote ratios to the same run's
// BM_eigen_sgemm rows (bench_reference.cpp), which are single-threaded like the rows
// here unless they say threads:2.
#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <unsupported/Eigen/CXX11/ThreadPool>

#include <linen/linen.hpp>

namespace {

using linen::Index;

// A tensor of the given dims filled with standard-normal floats from `seed`.
linen::Tensor<float, 4> random_normal(const std::array<Index, 4>& dims, unsigned seed) {
  linen::Tensor<float, 4> t(dims);
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

double dense_flops(Index b, Index l, Index h, Index d) { return 4.0 * double(b) * double(l) * double(l) * double(h) * double(d); }

template <class T = float>
struct InputsOf {
  linen::Tensor<T, 4> q, k, v;
  InputsOf(Index b, Index l, Index h, Index d)
      : q(random_normal({b, l, h, d}, 1).cast<T>()), k(random_normal({b, l, h, d}, 2).cast<T>()),
        v(random_normal({b, l, h, d}, 3).cast<T>()) {}
};
using Inputs = InputsOf<float>;

// One forward per iteration; the output is the library's own allocation, timed.
template <class T>
void run(benchmark::State& state, const InputsOf<T>& in, const linen::AttentionOptions<T>& options, double flops) {
  for (auto _ : state) {
    linen::Tensor<T, 4> out = linen::dot_product_attention(in.q, in.k, in.v, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_fused_attention(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), h = state.range(2), d = state.range(3);
  const Inputs in(b, l, h, d);
  linen::AttentionOptions<float> options;
  options.implementation = linen::Implementation::Fused;
  run(state, in, options, dense_flops(b, l, h, d));
}

void BM_fused_attention_bf16(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), h = state.range(2), d = state.range(3);
  const InputsOf<Eigen::bfloat16> in(b, l, h, d);
  linen::AttentionOptions<Eigen::bfloat16> options;
  options.implementation = linen::Implementation::Fused;
  run(state, in, options, dense_flops(b, l, h, d));
}

void BM_reference_attention(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), h = state.range(2), d = state.range(3);
  const Inputs in(b, l, h, d);
  linen::AttentionOptions<float> options;
  options.implementation = linen::Implementation::Reference;
  run(state, in, options, dense_flops(b, l, h, d));
}

// The L sweep of the chart (plot_bench.py) and the rows (1,512), (1,2048), (8,128).
BENCHMARK(BM_fused_attention)
    ->ArgNames({"B", "L", "H", "D"})
    ->Args({1, 128, 8, 64})
    ->Args({1, 256, 8, 64})
    ->Args({1, 512, 8, 64})
    ->Args({1, 1024, 8, 64})
    ->Args({1, 2048, 8, 64})
    ->Args({1, 4096, 8, 64})
    ->Args({8, 128, 8, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_fused_attention_bf16)
    ->ArgNames({"B", "L", "H", "D"})
    ->Args({1, 512, 8, 64})
    ->Args({1, 2048, 8, 64})
    ->Args({8, 128, 8, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_reference_attention)
    ->ArgNames({"B", "L", "H", "D"})
    ->Args({1, 128, 8, 64})
    ->Args({1, 256, 8, 64})
    ->Args({1, 512, 8, 64})
    ->Args({1, 1024, 8, 64})
    ->Args({1, 2048, 8, 64})
    ->Args({8, 128, 8, 64})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_fused_attention_causal(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), h = state.range(2), d = state.range(3);
  const Inputs in(b, l, h, d);
  linen::AttentionOptions<float> options;
  linen::Tensor<bool, 4> mask;  // outlives `options`
  if (state.range(4) == 0) {
    options.is_causal = true;
  } else {
    linen::Tensor<float, 2> tokens(b, l);
    tokens.setZero();
    mask = linen::make_causal_mask(tokens);  // [B, 1, L, L]
    options.mask = mask;
  }
  run(state, in, options, dense_flops(b, l, h, d));
}
BENCHMARK(BM_fused_attention_causal)
    ->ArgNames({"B", "L", "H", "D", "mask"})
    ->Args({1, 2048, 8, 64, 0})
    ->Args({1, 2048, 8, 64, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_fused_attention_threads(benchmark::State& state) {
  const Index b = state.range(0), l = state.range(1), h = state.range(2), d = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  const Inputs in(b, l, h, d);
  Eigen::ThreadPool pool(threads);
  linen::AttentionOptions<float> options;
  options.thread_pool = &pool;
  run(state, in, options, dense_flops(b, l, h, d));
}
BENCHMARK(BM_fused_attention_threads)
    ->ArgNames({"B", "L", "H", "D", "threads"})
    ->Args({1, 2048, 8, 64, 1})
    ->Args({1, 2048, 8, 64, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// One decode step, as a decoder runs it: a query [1, 1, H, D] against a cache of L
// positions ([1, L, H, D] keys and values), read cold: the step cycles through enough
// caches (>= 128 MiB in all) that none is still in the last-level cache. GB/s counts the
// cache bytes read (K and V); compare with the same run's BM_memory_read_bandwidth, and
// the bfloat16 row's time with the float32 one. dtype: 32 = float32, 16 = bfloat16.
template <class T>
void decode_step(benchmark::State& state, Eigen::ThreadPool* pool = nullptr) {
  const Index l = state.range(0), h = state.range(1), d = state.range(2);
  const Index cache_bytes = 2 * l * h * d * Index(sizeof(T));
  const Index caches = std::max<Index>(2, (Index{128} << 20) / cache_bytes);
  std::vector<linen::Tensor<T, 4>> keys, values;
  std::uint32_t x = 12345;
  auto next = [&x] {  // a cheap generator: filling 128 MiB with std::normal would take seconds
    x = x * 1664525u + 1013904223u;
    return T(float(x >> 8) * 0x1p-24f * 2.0f - 1.0f);
  };
  for (Index c = 0; c < caches; ++c) {
    keys.emplace_back(1, l, h, d);
    values.emplace_back(1, l, h, d);
    for (Index i = 0; i < keys.back().size(); ++i) {
      keys.back().data()[i] = next();
      values.back().data()[i] = next();
    }
  }
  linen::Tensor<T, 4> q(1, 1, h, d);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = next();
  linen::AttentionOptions<T> options;
  options.thread_pool = pool;
  Index c = 0;
  for (auto _ : state) {
    linen::Tensor<T, 4> out = linen::dot_product_attention(q, keys[static_cast<std::size_t>(c)],
                                                           values[static_cast<std::size_t>(c)], options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    c = (c + 1) % caches;
  }
  state.counters["GB/s"] = benchmark::Counter(double(cache_bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
void BM_fused_decode_step(benchmark::State& state) {
  if (state.range(3) == 16) decode_step<Eigen::bfloat16>(state);
  else decode_step<float>(state);
}
BENCHMARK(BM_fused_decode_step)
    ->ArgNames({"L", "H", "D", "dtype"})
    ->Args({4096, 8, 64, 32})
    ->Args({4096, 8, 64, 16})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_fused_decode_step_threads(benchmark::State& state) {
  Eigen::ThreadPool pool(static_cast<int>(state.range(3)));
  decode_step<float>(state, &pool);
}
BENCHMARK(BM_fused_decode_step_threads)
    ->ArgNames({"L", "H", "D", "threads"})
    ->Args({4096, 8, 64, 1})
    ->Args({4096, 8, 64, 2})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Sums p[0, n) as four interleaved streams of 64-float blocks (the read of
// ../shared/peers/peak.cpp; 16 independent accumulators, so memory is the limit).
float sum_streams(const float* p, std::size_t n) {
  constexpr std::size_t kBlock = 64;
  const std::size_t seg = n / 4 / kBlock * kBlock;
  float acc[4][16] = {};
  for (std::size_t i = 0; i < seg; i += kBlock)
    for (int st = 0; st < 4; ++st) {
      const float* q = p + st * seg + i;
      for (std::size_t j = 0; j < kBlock; j += 16)
        for (int l = 0; l < 16; ++l) acc[j / 16][l] += q[j + l];
    }
  float s = 0;
  for (std::size_t i = 4 * seg; i < n; ++i) s += p[i];
  for (auto& a : acc)
    for (float x : a) s += x;
  return s;
}

// Read bandwidth of 1 or 2 threads, each summing its half of a 256 MiB buffer (written
// once, outside the timing) as four streams; the same run's anchor for the decode rows.
void BM_memory_read_streams(benchmark::State& state) {
  constexpr std::size_t kCount = (std::size_t{256} << 20) / sizeof(float);
  static const std::vector<float> buffer = [] {
    std::vector<float> v(kCount);
    for (std::size_t i = 0; i < kCount; ++i) v[i] = float(i % 7) * 0.125f;
    return v;
  }();
  const int threads = static_cast<int>(state.range(0));
  Eigen::ThreadPool pool(threads);
  std::vector<float> sums(static_cast<std::size_t>(threads));
  const std::size_t part = kCount / static_cast<std::size_t>(threads);
  for (auto _ : state) {
    benchmark::ClobberMemory();
    Eigen::Barrier done(static_cast<unsigned>(threads));
    for (int t = 0; t < threads; ++t)
      pool.Schedule([&, t] {
        sums[static_cast<std::size_t>(t)] = sum_streams(buffer.data() + part * static_cast<std::size_t>(t), part);
        done.Notify();
      });
    done.Wait();
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["GB/s"] = benchmark::Counter(double(kCount * sizeof(float)) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_memory_read_streams)->ArgName("threads")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

// kB from a "VmRSS:" / "VmHWM:" line of /proc/self/status (Linux), -1 elsewhere.
long long proc_status_kb(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(key.size()));
  return -1;
}

// The peak resident memory one forward adds: the peak RSS (VmHWM) is reset through
// /proc/self/clear_refs after the inputs exist (and, with glibc, malloc_trim has returned
// freed heap pages, which a new allocation would otherwise reuse unseen), so the
// high-water mark minus the resident size before the call is everything the call touched:
// the output (B*L*H*D floats, allocated inside the call) plus the kernel's own memory. The
// counters: peak_MiB (all of it) and beyond_io_MiB (minus the output), in MiB. Causal
// (is_causal), to halve the ~2 TFLOP of a dense forward at this length: the memory is the
// same either way. Two threads: two sets of per-thread scratch. Linux only (elsewhere
// the counters are -1).
void BM_fused_attention_peak_memory(benchmark::State& state) {
  const Index b = 1, l = state.range(0), h = state.range(1), d = state.range(2);
  const Inputs in(b, l, h, d);
  Eigen::ThreadPool pool(2);
  linen::AttentionOptions<float> options;
  options.is_causal = true;
  options.thread_pool = &pool;
  const double output_mib = double(b * l * h * d) * sizeof(float) / (1 << 20);
  double peak_mib = -1;
  for (auto _ : state) {
    long long before = -1;
#if defined(__GLIBC__)
    malloc_trim(0);  // freed heap pages leave the resident set, so reusing them counts
#endif
    {
      std::ofstream reset("/proc/self/clear_refs");
      if (reset << "5") before = proc_status_kb("VmRSS");
    }
    linen::Tensor<float, 4> out = linen::dot_product_attention(in.q, in.k, in.v, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const long long hwm = proc_status_kb("VmHWM");
    if (before >= 0 && hwm >= 0) peak_mib = std::max(peak_mib, double(hwm - before) / 1024.0);
  }
  state.counters["peak_MiB"] = peak_mib;
  state.counters["beyond_io_MiB"] = peak_mib >= 0 ? peak_mib - output_mib : -1;
  state.counters["GFLOP/s"] = benchmark::Counter(dense_flops(b, l, h, d) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_fused_attention_peak_memory)
    ->ArgNames({"L", "H", "D"})
    ->Args({32768, 8, 64})
    ->Iterations(1)
    ->Repetitions(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

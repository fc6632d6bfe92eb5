// SPDX-License-Identifier: Apache-2.0
//
// Reference rows measured in the same run as the linen benchmarks, so that
// linen's figures can be quoted as ratios to what this machine can do right
// now (the machine is shared and its absolute speed varies from run to run):
//   BM_eigen_sgemm            Eigen's float matrix product (compute bound)
//   BM_memory_read_bandwidth  summing a 256 MiB buffer (memory bound)
// Take ratios only between rows of one run.
#include <cstddef>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

namespace {

// A [rows, cols] matrix of standard-normal floats from a fixed seed.
Eigen::MatrixXf random_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Eigen::MatrixXf m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

// C[m, n] = A[m, k] * B[k, n]; counts 2*m*n*k flops per product.
void run_sgemm(benchmark::State& state, Eigen::Index m, Eigen::Index k, Eigen::Index n) {
  // Inputs and output allocated (and touched) once, outside the timed loop.
  const Eigen::MatrixXf a = random_matrix(m, k, 1);
  const Eigen::MatrixXf b = random_matrix(k, n, 2);
  Eigen::MatrixXf c = Eigen::MatrixXf::Zero(m, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  // kIsIterationInvariantRate: value * iterations / seconds, so GFLOP/s.
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(m) * double(n) * double(k) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// Square n x n sgemm: the machine's practical single-thread compute peak.
void BM_eigen_sgemm(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  run_sgemm(state, n, n, n);
}
BENCHMARK(BM_eigen_sgemm)->ArgNames({"n"})->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond);

// The product shaped like attention's logits Q K^T for one head at
// L = 2048, D = 64: [L, D] x [D, L]. Its inner dimension is short, so it
// runs below the square peak; it bounds what a dense attention can reach.
void BM_eigen_sgemm_qkT(benchmark::State& state) {
  run_sgemm(state, state.range(0), state.range(1), state.range(2));
}
BENCHMARK(BM_eigen_sgemm_qkT)
    ->ArgNames({"m", "k", "n"})
    ->Args({2048, 64, 2048})
    ->Unit(benchmark::kMillisecond);

// Sum of p[0, n): 32 independent accumulators, a loop the compiler turns into
// several vector adds in flight, so the sum is limited by memory, not by the
// latency of one add chain (a plain `s += p[i]` cannot be vectorized without
// -ffast-math, since float addition is not associative).
float sum_floats(const float* p, std::size_t n) {
  constexpr std::size_t kLanes = 32;
  float acc[kLanes] = {};
  std::size_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (std::size_t j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += p[i];
  for (float a : acc) s += a;
  return s;
}

// Read bandwidth from main memory: 256 MiB is far larger than any cache.
void BM_memory_read_bandwidth(benchmark::State& state) {
  constexpr std::size_t kBytes = std::size_t{256} << 20;
  constexpr std::size_t kCount = kBytes / sizeof(float);
  // Allocated and written once per process (fresh pages are slow to fault in),
  // then reused by every call of this function.
  static const std::vector<float> buffer = [] {
    std::vector<float> v(kCount);
    for (std::size_t i = 0; i < kCount; ++i) v[i] = float(i % 7) * 0.125f;
    return v;
  }();
  for (auto _ : state) {
    benchmark::ClobberMemory();  // the buffer "may have changed": sum it again
    float s = sum_floats(buffer.data(), buffer.size());
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(kBytes));
  state.counters["GB/s"] =
      benchmark::Counter(double(kBytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_memory_read_bandwidth)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

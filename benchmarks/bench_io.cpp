// SPDX-License-Identifier: Apache-2.0
//
// Loading a 256 MiB checkpoint (16 float32 kernels of 16 MiB), one row per format:
//   BM_load_checkpoint/safetensors   load_safetensors
//   BM_load_checkpoint/msgpack       load_msgpack (flax.serialization.to_bytes)
//   BM_load_checkpoint/orbax         load_orbax (StandardCheckpointer: OCDBT + zarr v2 + zstd;
//                                    without libzstd the row reports the error and skips)
// The file is written once into a temporary directory, outside the timed loop, and
// read from the page cache (warm), so the rate is the loader's, not the disk's.
// Counters: bytes_per_second (tensor bytes loaded), and, measured around one load
// before the timed loop, peak_MiB, the growth of the peak resident set (VmHWM, reset
// through /proc/self/clear_refs; Linux only) over what was resident before, and
// peak_ratio = peak / tensor bytes (1.0 = the tensors and nothing else; the loaders
// read each tensor once, into its array).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <linen/io/msgpack.hpp>
#include <linen/io/orbax.hpp>
#include <linen/io/safetensors.hpp>

namespace {

namespace fs = std::filesystem;
constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr int kTensors = 16;

// The checkpoint files, written on first use and removed at exit.
struct BenchFiles {
  fs::path dir;
  std::size_t tensor_bytes = 0;

  BenchFiles() {
    dir = fs::temp_directory_path() / ("linen_bench_io_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    linen::io::Variables v;
    std::uint32_t x = 12345;
    for (int t = 0; t < kTensors; ++t) {
      std::vector<std::uint8_t> bytes(16 * kMiB);
      for (std::size_t i = 0; i < bytes.size(); i += 4) {  // float32 in [1, 2): finite
        x = x * 1664525u + 1013904223u;
        const std::uint32_t bits = 0x3f800000u | (x >> 9);
        for (int k = 0; k < 4; ++k) bytes[i + k] = static_cast<std::uint8_t>(bits >> (8 * k));
      }
      tensor_bytes += bytes.size();
      v.set("params/layer_" + std::to_string(t) + "/kernel",
            linen::io::Array(linen::io::DType::F32, {2048, 2048}, std::move(bytes)));
    }
    linen::io::save_safetensors((dir / "c.safetensors").string(), v);
    linen::io::save_msgpack((dir / "c.msgpack").string(), v);
    try {
      linen::io::save_orbax((dir / "c.orbax").string(), v);
    } catch (const linen::io_error& e) {
      orbax_error = e.what();  // built without libzstd
    }
  }
  std::string orbax_error;
  ~BenchFiles() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

BenchFiles& files() {
  static BenchFiles f;
  return f;
}

// A line "<key>: <n> kB" of /proc/self/status, in bytes; -1 where there is none.
double status_bytes(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string k = std::string(key) + ":";
  while (std::getline(in, line))
    if (line.compare(0, k.size(), k) == 0) return 1024.0 * std::stod(line.substr(k.size()));
  return -1;
}

// Peak resident growth of one call of f, in bytes (-1 where it cannot be measured).
template <class F>
double peak_rss_growth(F&& f) {
#if defined(__GLIBC__)
  malloc_trim(0);  // what earlier rows freed is not resident before the load
#endif
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";  // resets VmHWM to the current resident set
    if (!clear) return -1;
  }
  const double before = status_bytes("VmRSS");
  f();
  const double peak = status_bytes("VmHWM");
  return before < 0 || peak < 0 ? -1 : peak - before;
}

template <class Load>
void run_load(benchmark::State& state, const char* file, Load load) {
  BenchFiles& f = files();
  const std::string path = (f.dir / file).string();
  const double peak = peak_rss_growth([&] {
    const linen::io::Variables v = load(path);
    benchmark::DoNotOptimize(v.size());
  });
  for (auto _ : state) {
    linen::io::Variables v = load(path);
    benchmark::DoNotOptimize(v.size());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(f.tensor_bytes));
  if (peak >= 0) {
    state.counters["peak_MiB"] = peak / double(kMiB);
    state.counters["peak_ratio"] = peak / double(f.tensor_bytes);
  }
}

void BM_load_checkpoint_safetensors(benchmark::State& state) {
  run_load(state, "c.safetensors", [](const std::string& p) { return linen::io::load_safetensors(p); });
}
void BM_load_checkpoint_msgpack(benchmark::State& state) {
  run_load(state, "c.msgpack", [](const std::string& p) { return linen::io::load_msgpack(p); });
}

void BM_load_checkpoint_orbax(benchmark::State& state) {
  if (!files().orbax_error.empty()) {
    state.SkipWithError(files().orbax_error.c_str());
    return;
  }
  run_load(state, "c.orbax", [](const std::string& p) { return linen::io::load_orbax(p); });
}

BENCHMARK(BM_load_checkpoint_safetensors)->Name("BM_load_checkpoint/safetensors")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_load_checkpoint_msgpack)->Name("BM_load_checkpoint/msgpack")->Unit(benchmark::kMillisecond);
BENCHMARK(BM_load_checkpoint_orbax)->Name("BM_load_checkpoint/orbax")->Unit(benchmark::kMillisecond);

}  // namespace

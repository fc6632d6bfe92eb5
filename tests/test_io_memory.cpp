// SPDX-License-Identifier: Apache-2.0
// The loaders' peak memory: loading a checkpoint file needs its tensors' bytes and
// little more (each tensor is read once, from the file straight into its Array), not a
// copy of the file besides. Every byte allocated through operator new is counted here
// (this binary replaces it), and the peak while loading a 64 MiB checkpoint, in each
// format, must stay under 1.1x the tensors' bytes.
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <new>
#include <random>
#include <string>
#include <vector>

#include <linen/io/checkpoint.hpp>

// Live and peak bytes allocated through operator new. Each block carries its size in a
// 16-byte header, so that every delete knows what it frees. malloc and free go through
// volatile pointers so that g++ cannot pair an inlined operator new with free.
namespace {
std::atomic<std::size_t> g_live{0};
std::atomic<std::size_t> g_peak{0};
void* (*volatile g_malloc)(std::size_t) = std::malloc;
void (*volatile g_free)(void*) = std::free;
constexpr std::size_t kHeader = 16;

void* counted_new(std::size_t n) {
  auto* p = static_cast<unsigned char*>(g_malloc(n + kHeader));
  if (!p) throw std::bad_alloc();
  *reinterpret_cast<std::size_t*>(p) = n;
  const std::size_t live = g_live.fetch_add(n, std::memory_order_relaxed) + n;
  std::size_t peak = g_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
  return p + kHeader;
}
void counted_delete(void* q) noexcept {
  if (!q) return;
  auto* p = static_cast<unsigned char*>(q) - kHeader;
  g_live.fetch_sub(*reinterpret_cast<std::size_t*>(p), std::memory_order_relaxed);
  g_free(p);
}
}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void operator delete(void* p) noexcept { counted_delete(p); }
void operator delete[](void* p) noexcept { counted_delete(p); }
void operator delete(void* p, std::size_t) noexcept { counted_delete(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_delete(p); }

namespace {

namespace fs = std::filesystem;
using linen::io::Array;
using linen::io::DType;
using linen::io::Variables;

constexpr std::size_t kMiB = std::size_t{1} << 20;

// 64 MiB of tensors: three float32 kernels and a bfloat16 one, random bytes.
Variables checkpoint_64mib() {
  Variables v;
  std::mt19937 rng(7);
  auto fill = [&](DType d, linen::Shape s, std::size_t bytes) {
    std::vector<std::uint8_t> b(bytes);
    for (auto& x : b) x = static_cast<std::uint8_t>(rng() & 0x3f);  // finite floats
    return Array(d, std::move(s), std::move(b));
  };
  v.set("params/a/kernel", fill(DType::F32, {1024, 4096}, 16 * kMiB));
  v.set("params/b/kernel", fill(DType::F32, {2048, 2048}, 16 * kMiB));
  v.set("params/c/kernel", fill(DType::F32, {16, 64, 4096}, 16 * kMiB));
  v.set("params/d/kernel", fill(DType::BF16, {4096, 2048}, 16 * kMiB));
  v.set("params/d/bias", fill(DType::F32, {4096}, 16 * 1024));
  return v;
}

std::size_t tensor_bytes(const Variables& v) {
  std::size_t n = 0;
  for (const auto& kv : v) n += kv.second.bytes().size();
  return n;
}

class IoMemory : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() / ("linen_test_io_memory_" + std::to_string(std::random_device{}())));
    fs::create_directories(*dir_);
    vars_ = new Variables(checkpoint_64mib());
    linen::io::save_safetensors((*dir_ / "c.safetensors").string(), *vars_);
    linen::io::save_msgpack((*dir_ / "c.msgpack").string(), *vars_);
    // Flax's chunked arrays, with 1 MiB chunks: joined in place, not concatenated.
    const std::vector<std::uint8_t> chunked = linen::io::to_msgpack(*vars_, kMiB);
    std::ofstream out(*dir_ / "chunked.msgpack", std::ios::binary);
    out.write(reinterpret_cast<const char*>(chunked.data()), static_cast<std::streamsize>(chunked.size()));
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*dir_, ec);
    delete vars_;
    delete dir_;
  }

  // Loads `file` with `load` and checks the result and the peak of live bytes above
  // what was live before (the result included).
  template <class Load>
  void expect_peak(const std::string& name, Load load) {
    const std::string file = (*dir_ / name).string();
    const std::size_t total = tensor_bytes(*vars_);
    const std::size_t before = g_live.load();
    g_peak.store(before);
    const Variables got = load(file);
    const std::size_t peak = g_peak.load() - before;
    EXPECT_TRUE(got == *vars_) << name;
    EXPECT_LE(static_cast<double>(peak), 1.1 * static_cast<double>(total))
        << name << ": loading " << total << " bytes of tensors peaked at " << peak << " bytes allocated";
    EXPECT_GE(peak, total) << name << ": the counter missed the tensors";
  }

  static fs::path* dir_;
  static Variables* vars_;
};
fs::path* IoMemory::dir_ = nullptr;
Variables* IoMemory::vars_ = nullptr;

TEST_F(IoMemory, SafetensorsPeakIsTheTensors) {
  expect_peak("c.safetensors", [](const std::string& f) { return linen::io::load_safetensors(f); });
  expect_peak("c.safetensors", [](const std::string& f) { return linen::io::load_checkpoint(f); });
}

TEST_F(IoMemory, MsgpackPeakIsTheTensors) {
  expect_peak("c.msgpack", [](const std::string& f) { return linen::io::load_msgpack(f); });
  expect_peak("c.msgpack", [](const std::string& f) { return linen::io::load_checkpoint(f); });
  expect_peak("chunked.msgpack", [](const std::string& f) { return linen::io::load_msgpack(f); });
}

}  // namespace

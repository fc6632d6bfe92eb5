// SPDX-License-Identifier: Apache-2.0
// Replays the fuzzers' seed corpora (fuzz/corpus/<target>/) and every saved crash or
// hostile input (tests/data/fuzz_regressions/<target>/) through both parsers, format
// detection and the round-trip properties of fuzz/fuzz_checks.hpp, in the normal build
// (no libFuzzer needed). Every input must parse or throw linen::io_error; nothing
// else is allowed (another exception type, a broken round trip; crashes and sanitizer
// reports show up when this runs under the asan preset).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../fuzz/fuzz_checks.hpp"
#include "../fuzz/fuzz_orbax_checks.hpp"

#ifndef LINEN_TEST_DATA_DIR
#define LINEN_TEST_DATA_DIR "/work/main/tests/data"
#endif

namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

const fs::path kCorpus = fs::path(LINEN_TEST_DATA_DIR) / ".." / ".." / "fuzz" / "corpus";
const fs::path kRegressions = fs::path(LINEN_TEST_DATA_DIR) / "fuzz_regressions";

// The regular files directly inside `dir`, sorted.
std::vector<fs::path> files_in(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

Bytes read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct Outcome {
  int msgpack = 0, safetensors = 0, checkpoint = 0;  // inputs that parsed
};

// Every input through every checker: anything but success or io_error fails the test.
Outcome replay(const std::vector<fs::path>& files) {
  Outcome o;
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    const Bytes b = read_file(f);
    try {
      o.msgpack += linen_fuzz::check_msgpack(b.data(), b.size());
      o.safetensors += linen_fuzz::check_safetensors(b.data(), b.size());
      o.checkpoint += linen_fuzz::check_checkpoint(b.data(), b.size());
    } catch (const std::exception& e) {
      ADD_FAILURE() << f << ": " << e.what();
    } catch (...) {
      ADD_FAILURE() << f << ": a non-std exception";
    }
  }
  return o;
}

TEST(FuzzRegressions, MsgpackSeedCorpusParses) {
  const auto files = files_in(kCorpus / "msgpack");
  ASSERT_GE(files.size(), 8u) << "seed corpus missing from " << kCorpus / "msgpack";
  const Outcome o = replay(files);
  EXPECT_EQ(o.msgpack, static_cast<int>(files.size()));  // the seeds are valid files
  EXPECT_EQ(o.checkpoint, static_cast<int>(files.size()));
}

TEST(FuzzRegressions, SafetensorsSeedCorpusParses) {
  const auto files = files_in(kCorpus / "safetensors");
  ASSERT_GE(files.size(), 5u) << "seed corpus missing from " << kCorpus / "safetensors";
  const Outcome o = replay(files);
  EXPECT_EQ(o.safetensors, static_cast<int>(files.size()));
  EXPECT_EQ(o.checkpoint, static_cast<int>(files.size()));
}

// Saved crash reproducers (crash-*, which may be valid files) and hand-made hostile
// inputs (*.bin, from make_hostile_inputs.py, which every parser must refuse).
TEST(FuzzRegressions, SavedInputsParseOrThrowIoError) {
  std::size_t hostile = 0;
  for (const char* target : {"msgpack", "safetensors"}) {
    for (const auto& f : files_in(kRegressions / target)) {
      const Outcome o = replay({f});
      if (f.extension() == ".bin") {
        ++hostile;
        EXPECT_EQ(o.msgpack + o.safetensors + o.checkpoint, 0) << f << " parsed";
      }
    }
  }
  EXPECT_GE(hostile, 10u) << "hostile inputs missing from " << kRegressions;
}

// The Orbax parsers' seeds (OCDBT manifests and nodes, zarr metadata): each is
// accepted by one of them, and survives the re-encoding properties. Saved inputs of
// tests/data/fuzz_regressions/orbax/ must parse or throw io_error.
TEST(FuzzRegressions, OrbaxSeedCorpusParses) {
  if (!linen::io::detail::kHasZstd) GTEST_SKIP() << "linen::io built without libzstd";
  const auto files = files_in(kCorpus / "orbax");
  ASSERT_GE(files.size(), 10u) << "seed corpus missing from " << kCorpus / "orbax";
  for (const auto& f : files) {
    const Bytes b = read_file(f);
    EXPECT_GE(linen_fuzz::check_orbax(b.data(), b.size()), 1) << f;
  }
  for (const auto& f : files_in(kRegressions / "orbax")) {
    SCOPED_TRACE(f.string());
    const Bytes b = read_file(f);
    (void)linen_fuzz::check_orbax(b.data(), b.size());
  }
}

}  // namespace

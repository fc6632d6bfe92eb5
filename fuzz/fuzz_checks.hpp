// SPDX-License-Identifier: Apache-2.0
//
// The properties every input must keep, shared by the libFuzzer targets
// (fuzz_msgpack.cpp, fuzz_safetensors.cpp) and by the regression test that replays
// the corpus in the normal build (tests/test_fuzz_regressions.cpp):
//
//   - a parser either returns or throws linen::io_error, nothing else (a crash, a
//     sanitizer report, another exception type, or a hang is a bug);
//   - what it returns survives the writer: parse(write(v)) == v, and writing again
//     gives the same bytes;
//   - it survives the other format too (safetensors <-> msgpack), where that format
//     can hold it;
//   - reading every array as float and as int64 either works or throws io_error;
//   - parse_checkpoint accepts whatever parse_safetensors or parse_msgpack accepts,
//     and returns what the loader of the format it reports returns.
//
// A broken property throws linen_fuzz::property_failure, which is not an io_error:
// libFuzzer reports it as a crash (uncaught exception), the test as a failure.
#ifndef LINEN_FUZZ_FUZZ_CHECKS_HPP
#define LINEN_FUZZ_FUZZ_CHECKS_HPP

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <linen/io/checkpoint.hpp>
#include <linen/io/msgpack.hpp>
#include <linen/io/safetensors.hpp>

namespace linen_fuzz {

struct property_failure : std::logic_error {
  explicit property_failure(const std::string& what) : std::logic_error("linen fuzz property broken: " + what) {}
};

inline void require(bool ok, const std::string& what) {
  if (!ok) throw property_failure(what);
}

// Reads every array as float and as int64: io_error (a refused conversion) is fine.
inline void convert_all(const linen::io::Variables& v) {
  for (const auto& [path, a] : v) {
    try {
      (void)a.to_vector<float>(path);
    } catch (const linen::io_error&) {
    }
    try {
      (void)a.to_vector<std::int64_t>(path);
    } catch (const linen::io_error&) {
    }
  }
}

// Deepest path, in components.
inline std::size_t max_components(const linen::io::Variables& v) {
  std::size_t m = 0;
  for (const auto& kv : v) {
    std::size_t n = 1;
    for (char c : kv.first) n += c == '/';
    if (n > m) m = n;
  }
  return m;
}

// `v` without its metadata (which msgpack cannot hold).
inline linen::io::Variables without_metadata(linen::io::Variables v) {
  v.metadata.clear();
  return v;
}

// msgpack writer round trips of `v` (which parse_msgpack or parse_safetensors made).
inline void msgpack_round_trip(const linen::io::Variables& v) {
  const std::vector<std::uint8_t> b = linen::io::to_msgpack(v);
  const linen::io::Variables w = linen::io::parse_msgpack(b.data(), b.size(), "to_msgpack output");
  require(w == without_metadata(v), "parse_msgpack(to_msgpack(v)) != v");
  require(linen::io::to_msgpack(w) == b, "to_msgpack is not deterministic");
  // Flax's chunking, with a tiny chunk size so that fuzz-sized arrays are chunked
  // (chunk maps add two levels: only where the depth limit leaves room for them).
  if (max_components(v) + 2 <= static_cast<std::size_t>(linen::io::kMsgpackMaxDepth)) {
    const std::vector<std::uint8_t> c = linen::io::to_msgpack(v, 3);
    const linen::io::Variables u = linen::io::parse_msgpack(c.data(), c.size(), "chunked to_msgpack output");
    require(u == w, "parse_msgpack(to_msgpack(v, 3)) != v");
  }
}

// One input through parse_msgpack; true if it parsed.
inline bool check_msgpack(const std::uint8_t* data, std::size_t size) {
  linen::io::Variables v;
  try {
    v = linen::io::parse_msgpack(data, size, "fuzz input");
  } catch (const linen::io_error&) {
    return false;
  }
  msgpack_round_trip(v);
  // Everything msgpack gives, safetensors holds (keys are valid UTF-8, paths valid).
  const std::vector<std::uint8_t> s = linen::io::to_safetensors(v);
  require(linen::io::parse_safetensors(s.data(), s.size(), "to_safetensors output") == v,
          "parse_safetensors(to_safetensors(msgpack variables)) != v");
  convert_all(v);
  return true;
}

// One input through parse_safetensors; true if it parsed.
inline bool check_safetensors(const std::uint8_t* data, std::size_t size) {
  linen::io::Variables v;
  try {
    v = linen::io::parse_safetensors(data, size, "fuzz input");
  } catch (const linen::io_error&) {
    return false;
  }
  const std::vector<std::uint8_t> b = linen::io::to_safetensors(v);
  const linen::io::Variables w = linen::io::parse_safetensors(b.data(), b.size(), "to_safetensors output");
  require(w == v, "parse_safetensors(to_safetensors(v)) != v");
  require(linen::io::to_safetensors(w) == b, "to_safetensors is not deterministic");
  // msgpack refuses some flat layouts by design ("a" beside "a/b", paths over the
  // length or depth limit): to_msgpack throws io_error for those, and only those.
  bool writable = true;
  try {
    (void)linen::io::to_msgpack(v);
  } catch (const linen::io_error&) {
    writable = false;
  }
  if (writable) msgpack_round_trip(v);
  convert_all(v);
  return true;
}

// One input through parse_checkpoint, which must agree with the loaders: it accepts
// whatever parse_safetensors or parse_msgpack accepts, and returns what the loader of
// the format it reports returns; true if it parsed.
inline bool check_checkpoint(const std::uint8_t* data, std::size_t size) {
  std::optional<linen::io::Variables> st, mp;
  try {
    st = linen::io::parse_safetensors(data, size, "fuzz input");
  } catch (const linen::io_error&) {
  }
  try {
    mp = linen::io::parse_msgpack(data, size, "fuzz input");
  } catch (const linen::io_error&) {
  }
  try {
    const linen::io::Checkpoint c = linen::io::read_checkpoint(data, size, "fuzz input");
    const auto& want = c.format == linen::io::CheckpointFormat::safetensors ? st : mp;
    require(want && *want == c.variables, "read_checkpoint disagrees with the loader of the format it reports");
    return true;
  } catch (const linen::io_error&) {
    require(!st && !mp, "parse_checkpoint refused an image that parse_safetensors or parse_msgpack accepts");
    return false;
  }
}

}  // namespace linen_fuzz

#endif  // LINEN_FUZZ_FUZZ_CHECKS_HPP

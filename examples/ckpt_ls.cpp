// SPDX-License-Identifier: Apache-2.0
//
// ckpt_ls: lists the arrays of Flax checkpoints, like h5ls does for HDF5 files.
//
//   ckpt_ls FILE...
//
// Each FILE may be safetensors or a Flax msgpack file (flax.serialization.to_bytes),
// told apart by content. For each file it prints the format, then one line per
// array, in path order: its Flax path ('/'-joined, e.g. params/query/kernel), numpy
// dtype, shape and size in bytes, then safetensors metadata keys, if any. A file
// that cannot be read is reported on stderr (naming the file, byte offset and path at
// fault) and makes the exit status 1; the other files are still listed.
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <linen/io/msgpack.hpp>

namespace {

// Lists one file; returns false (after printing why) if it cannot be read.
bool list(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "ckpt_ls: %s: cannot open\n", file.c_str());
    return false;
  }
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    const auto format = linen::io::detect_checkpoint_format(bytes.data(), bytes.size(), file);
    const linen::io::Variables vars = linen::io::parse_checkpoint(bytes.data(), bytes.size(), file);
    std::printf("%s: %s, %zu bytes\n", file.c_str(), linen::io::format_name(format), bytes.size());
    std::fputs(linen::io::list_tensors(vars).c_str(), stdout);
    for (const auto& [key, value] : vars.metadata) {
      const std::string shown = value.size() > 60 ? value.substr(0, 57) + "..." : value;
      std::printf("metadata %s = %s\n", key.c_str(), shown.c_str());
    }
    return true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckpt_ls: %s\n", e.what());
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: ckpt_ls FILE...  (safetensors or Flax msgpack checkpoints)\n");
    return 2;
  }
  bool ok = true;
  for (int i = 1; i < argc; ++i) {
    if (i > 1) std::printf("\n");
    ok = list(argv[i]) && ok;
  }
  return ok ? 0 : 1;
}

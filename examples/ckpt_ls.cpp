// SPDX-License-Identifier: Apache-2.0
//
// ckpt_ls: lists the arrays of Flax checkpoints, like h5ls does for HDF5 files.
//
//   ckpt_ls FILE...
//
// Each FILE may be safetensors or a Flax msgpack file (flax.serialization.to_bytes),
// told apart by content, or an Orbax checkpoint directory (its arrays are read and
// checked, then listed with their zarr chunking and codecs). For each file it prints the format, then one line per
// array, in path order: its Flax path ('/'-joined, e.g. params/query/kernel; bytes
// other than printable ASCII shown as \xNN, so a NUL in a name is seen, not a cut),
// numpy dtype, shape and size in bytes, then safetensors metadata, if any (list_tensors).
// It never dies on what it is given: a directory, a FIFO (never waited on), a device
// (a symlink to /dev/zero) are refused; a file whose tensors do not fit in memory is
// reported, not an abort. Each file that cannot be read gets one line on stderr
// (naming the file, byte offset and path at fault), the other files are still
// listed, and the exit status is 1 if any failed.
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include <linen/io/checkpoint.hpp>

namespace {

// Lists one file; returns false (after printing one line why) if it cannot be read.
bool list(const std::string& file) {
  try {
    const linen::io::Checkpoint ckpt = linen::io::read_checkpoint(file);
    std::printf("%s: %s\n", file.c_str(), linen::io::format_name(ckpt.format));
    std::fputs(linen::io::list_tensors(ckpt.variables).c_str(), stdout);
    if (ckpt.format == linen::io::CheckpointFormat::orbax)
      std::fputs(linen::io::list_orbax_storage(linen::io::list_orbax(file)).c_str(), stdout);
    return true;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ckpt_ls: %s: out of memory while loading its tensors\n", file.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ckpt_ls: %s\n", e.what());  // names from the file come quoted, escaped
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: ckpt_ls PATH...  (safetensors or Flax msgpack files, Orbax checkpoint directories)\n");
    return 2;
  }
  bool ok = true;
  for (int i = 1; i < argc; ++i) {
    if (i > 1) std::printf("\n");
    ok = list(argv[i]) && ok;
  }
  return ok ? 0 : 1;
}

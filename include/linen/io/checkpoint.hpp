// SPDX-License-Identifier: Apache-2.0
//
// Checkpoints of any format linen reads, told apart by content: safetensors and Flax
// msgpack files, and Orbax checkpoint directories. load_checkpoint(file) reads what
// load_safetensors or load_msgpack would: the first bytes choose which loader runs
// first, and when it refuses the file the other one runs too, so a file either loader
// accepts is accepted here, and a file neither accepts gets an io_error giving both
// reasons. A directory that is_orbax_checkpoint recognises is read by load_orbax.
//
// This header depends on each format's header, not the other way round: a program that
// reads only msgpack includes io/msgpack.hpp and needs no JSON library.
#ifndef LINEN_IO_CHECKPOINT_HPP
#define LINEN_IO_CHECKPOINT_HPP

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "../errors.hpp"
#include "detail/byte_source.hpp"
#include "detail/file.hpp"
#include "msgpack.hpp"
#include "orbax.hpp"
#include "safetensors.hpp"
#include "variables.hpp"

namespace linen::io {

// The checkpoint formats linen reads: two file formats, and Orbax's directories.
enum class CheckpointFormat { safetensors, msgpack, orbax };

inline const char* format_name(CheckpointFormat f) {
  switch (f) {
    case CheckpointFormat::safetensors:
      return "safetensors";
    case CheckpointFormat::msgpack:
      return "msgpack";
    case CheckpointFormat::orbax:
      return "orbax";
  }
  return "unknown";
}

namespace detail {

// What the first bytes of an image suggest (which loader runs first). safetensors: an 8-byte little-endian header
// length whose top four bytes are zero (headers are capped at 100 MB), then the JSON
// header, whose first byte other than JSON whitespace is '{'. Flax msgpack: a map
// (bytes 0x80-0x8f, 0xde, 0xdf). A header length can begin with a map byte (a 133-byte
// header starts 0x85): the '{' decides then, and when the prefix is too short to show
// it, safetensors is tried first and msgpack second.
struct format_guess {
  bool safetensors = false;
  bool msgpack = false;
  CheckpointFormat first = CheckpointFormat::safetensors;
};

inline format_guess guess_format(const std::uint8_t* data, std::size_t size) {
  format_guess g;
  g.msgpack = size >= 1 && ((data[0] & 0xf0) == 0x80 || data[0] == 0xde || data[0] == 0xdf);
  const bool st_length = size >= 8 && data[4] == 0 && data[5] == 0 && data[6] == 0 && data[7] == 0;
  bool st_brace = false;  // the first header byte other than JSON whitespace is '{'
  for (std::size_t i = 8; st_length && i < size; ++i) {
    const std::uint8_t c = data[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
    st_brace = c == '{';
    break;
  }
  g.safetensors = st_length;
  g.first = st_length && (st_brace || !g.msgpack) ? CheckpointFormat::safetensors
            : g.msgpack                          ? CheckpointFormat::msgpack
                                                 : CheckpointFormat::safetensors;
  return g;
}

// `e`'s message without the "linen::io: " it starts with (it still names the file).
inline std::string reason(const io_error& e) {
  std::string m = e.what();
  const std::string prefix = "linen::io: ";
  if (m.compare(0, prefix.size(), prefix) == 0) m.erase(0, prefix.size());
  return m;
}

// "47 49 46 38 ..." of the first (at most 9) bytes.
inline std::string first_bytes(const std::uint8_t* data, std::size_t size) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < size && i < 9; ++i) {
    s += i ? " " : "";
    s += hex[data[i] >> 4];
    s += hex[data[i] & 15];
  }
  return s;
}

// "<name>: neither safetensors (...) nor Flax msgpack (a map) (<size> bytes, starting ...)".
inline std::string neither_format(const std::string& name, const std::uint8_t* prefix, std::size_t prefix_size,
                                  std::size_t size) {
  return name + ": neither safetensors (an 8-byte little-endian header length, then '{') nor Flax msgpack (a map) (" +
         std::to_string(size) + " bytes" + (size ? ", starting " + first_bytes(prefix, prefix_size) : "") + ")";
}

inline constexpr std::size_t kSniffBytes = 64;

// The loader of `f` run on `src`.
template <class Source>
Variables read_as(CheckpointFormat f, Source& src, const std::string& name) {
  if (f == CheckpointFormat::safetensors) return read_safetensors(src, name);
  return msgpack_reader<Source>(src, name).read_root();
}

}  // namespace detail

// A checkpoint and the format it was read as.
struct Checkpoint {
  CheckpointFormat format = CheckpointFormat::safetensors;
  Variables variables;
};

namespace detail {

// Runs the loader the first bytes suggest, then the other one if the first refuses.
// `prefix` holds the first min(size, kSniffBytes) bytes of `src`.
template <class Source>
Checkpoint read_checkpoint_from(Source& src, const std::uint8_t* prefix, std::size_t prefix_size,
                                const std::string& name) {
  const format_guess g = guess_format(prefix, prefix_size);
  const CheckpointFormat first = g.first;
  const CheckpointFormat second =
      first == CheckpointFormat::safetensors ? CheckpointFormat::msgpack : CheckpointFormat::safetensors;
  std::string why_first;
  try {
    return {first, read_as(first, src, name)};
  } catch (const io_error& e) {
    why_first = reason(e);
  }
  std::string why_second;
  try {
    return {second, read_as(second, src, name)};
  } catch (const io_error& e) {
    why_second = reason(e);
  }
  const std::size_t size = src.size();
  const std::string what =
      g.safetensors || g.msgpack
          ? name + ": not a checkpoint linen can read (" + std::to_string(size) + " bytes, starting " +
                first_bytes(prefix, prefix_size) + ", which looks like " + format_name(first) + ")"
          : neither_format(name, prefix, prefix_size, size);
  const auto label = [](CheckpointFormat f) {
    return f == CheckpointFormat::safetensors ? "safetensors" : "Flax msgpack";
  };
  throw io_error(what + ": as " + label(first) + ": " + why_first + "; as " + label(second) + ": " + why_second);
}

}  // namespace detail

// The format a checkpoint image of `size` bytes at `data` most likely has, by its first
// bytes (see load_checkpoint); throws io_error (naming `name` and the first bytes) if
// it looks like neither. parse_checkpoint does not depend on this guess being right.
inline CheckpointFormat detect_checkpoint_format(const std::uint8_t* data, std::size_t size,
                                                 const std::string& name = "<memory>") {
  if (data == nullptr && size != 0) throw io_error(name + ": null data of size " + std::to_string(size));
  const detail::format_guess g = detail::guess_format(data, size);
  if (g.safetensors || g.msgpack) return g.first;
  throw io_error(detail::neither_format(name, data, size, size));
}

// Reads a checkpoint image of either format as parse_safetensors or parse_msgpack
// would: whatever either accepts is accepted; when both refuse, the io_error gives
// both reasons.
inline Checkpoint read_checkpoint(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>") {
  if (data == nullptr && size != 0) throw io_error(name + ": null data of size " + std::to_string(size));
  static const std::uint8_t empty = 0;
  detail::memory_source src(data ? data : &empty, size);
  return detail::read_checkpoint_from(src, data ? data : &empty, std::min(size, detail::kSniffBytes), name);
}

inline Variables parse_checkpoint(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>") {
  return read_checkpoint(data, size, name).variables;
}

// Reads the checkpoint `file`: an Orbax checkpoint directory (a StandardCheckpointer
// item, a composite checkpoint, a CheckpointManager root: see load_orbax; `orbax`
// chooses the step and item), else a file of either format (see
// read_checkpoint(data, ...)), each tensor's bytes once, from the file into its Array.
// Anything else (another directory, a FIFO, a device) is refused with an io_error,
// without blocking.
inline Checkpoint read_checkpoint(const std::string& file, const OrbaxOptions& orbax = {}) {
  // Orbax checkpoints are directories: their loader runs before a directory is
  // refused as not a regular file.
  if (is_orbax_checkpoint(file)) return {CheckpointFormat::orbax, load_orbax(file, orbax)};
  detail::input_file in(file);
  detail::file_source src(in);
  std::uint8_t prefix[detail::kSniffBytes];
  const std::size_t n = std::min(in.size(), detail::kSniffBytes);
  src.read(0, n, prefix);
  return detail::read_checkpoint_from(src, prefix, n, file);
}

inline Variables load_checkpoint(const std::string& file) { return read_checkpoint(file).variables; }

// The same, with the step and item of an Orbax checkpoint chosen (see load_orbax).
inline Variables load_checkpoint(const std::string& file, const OrbaxOptions& orbax) {
  return read_checkpoint(file, orbax).variables;
}

}  // namespace linen::io

#endif  // LINEN_IO_CHECKPOINT_HPP

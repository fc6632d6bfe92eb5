// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_ERRORS_HPP
#define LINEN_ERRORS_HPP

#include <stdexcept>
#include <string>

namespace linen {

// Shape, rank, configuration and argument problems throw std::invalid_argument
// (what Flax raises as ValueError / assertion), with a message naming the shapes
// or values at fault.
//
// Malformed or mismatched files (safetensors, msgpack) throw linen::io_error,
// one type for every loader fault, whose message names the file, path or byte
// offset at fault.
class io_error : public std::runtime_error {
 public:
  explicit io_error(const std::string& what) : std::runtime_error("linen::io: " + what) {}
};

// A decode step on a full cache (Flax silently overwrites the last slot).
class cache_overflow : public std::out_of_range {
 public:
  explicit cache_overflow(const std::string& what) : std::out_of_range(what) {}
};

}  // namespace linen

#endif  // LINEN_ERRORS_HPP

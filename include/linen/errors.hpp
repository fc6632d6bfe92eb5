// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_ERRORS_HPP
#define LINEN_ERRORS_HPP

#include <stdexcept>
#include <string>

namespace linen {

// Every exception linen itself throws derives from linen::error, and also keeps
// the standard base it always had, so both of these work:
//
//   catch (const linen::error& e)          // anything linen threw (not an
//                                          // exception from the caller's own
//                                          // attention_fn, initializer, ...)
//   catch (const std::invalid_argument& e) // the standard category
//
// linen::error does not derive from std::exception (that would give each error
// two std::exception bases and make `catch (const std::exception&)` ambiguous);
// it only promises what().
//
// One message style: every message starts with "linen", then either ": " or the
// namespace it comes from ("linen::io: ", "linen::random::uniform: "), then the
// module or function at fault and what is wrong, naming the shapes or values:
//   linen: SelfAttention: Memory dimension (16) must be divisible by number of heads (3)
//   linen::io: model.safetensors: params/query/kernel has shape (4, 2, 2), expected (4, 2, 3)
class error {
 public:
  virtual ~error() = default;
  virtual const char* what() const noexcept = 0;

 protected:
  error() = default;
  error(const error&) = default;
  error& operator=(const error&) = default;
};

namespace detail {
// The one prefix rule: messages that already name their linen origin keep it.
inline std::string error_message(const std::string& what, const char* prefix = "linen: ") {
  return what.compare(0, 5, "linen") == 0 ? what : prefix + what;
}
}  // namespace detail

// Shape, rank, configuration and argument problems (what Flax raises as
// ValueError / assertion), naming the shapes or values at fault.
class invalid_argument : public std::invalid_argument, public error {
 public:
  explicit invalid_argument(const std::string& what) : std::invalid_argument(detail::error_message(what)) {}
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

// A size whose element or byte count does not fit in the index type.
class overflow_error : public std::overflow_error, public error {
 public:
  explicit overflow_error(const std::string& what) : std::overflow_error(detail::error_message(what)) {}
  const char* what() const noexcept override { return std::overflow_error::what(); }
};

// Malformed or mismatched files (safetensors, msgpack): one type for every
// loader fault, whose message names the file, path or byte offset at fault.
class io_error : public std::runtime_error, public error {
 public:
  explicit io_error(const std::string& what) : std::runtime_error(detail::error_message(what, "linen::io: ")) {}
  const char* what() const noexcept override { return std::runtime_error::what(); }
};

// A decode step on a full cache (Flax silently overwrites the last slot).
class cache_overflow : public std::out_of_range, public error {
 public:
  explicit cache_overflow(const std::string& what) : std::out_of_range(detail::error_message(what)) {}
  const char* what() const noexcept override { return std::out_of_range::what(); }
};

}  // namespace linen

#endif  // LINEN_ERRORS_HPP

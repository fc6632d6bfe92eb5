// SPDX-License-Identifier: Apache-2.0
//
// What every linen module shares (DenseGeneral, LayerNorm, MultiHeadDotProductAttention,
// SelfAttention and the modules to come), so that a user who has met one knows all:
//
//   Module::Config                  an aggregate with Flax's fields and defaults;
//   module.init(rng, inputs...)     the parameters Flax's Module.init makes. `rng` is
//                                   - a linen::random::Key: a top-level module,
//                                     Module.init(key, ...) (a C++ engine also works: its
//                                     first two 32-bit draws make the key);
//                                   - a linen::random::RngScope: a submodule, drawing from
//                                     the scope the caller pushed for it, e.g.
//                                     RngScope(key).push("encoder").push("attn");
//                                   sub-keys follow Flax's rng streams (flax/core/scope.py)
//                                   inside that scope: each parameter draws the scope's next
//                                   counter in declaration order, each submodule pushes
//                                   its name;
//   module.apply(params, inputs..., call)   the forward pass.
//
// The deterministic merge (Flax's merge_param) and the checked sizes of init live here
// too.
#ifndef LINEN_MODULE_HPP
#define LINEN_MODULE_HPP

#include <cstddef>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "dropout_rng.hpp"  // detail::is_urbg
#include "errors.hpp"
#include "random.hpp"
#include "tensor.hpp"

namespace linen {
namespace detail {

template <class Rng>
inline constexpr bool is_rng_scope_v = std::is_same_v<std::decay_t<Rng>, random::RngScope>;

// The scope a module's init draws from: the caller's own RngScope (a submodule: its
// counter advances with each parameter drawn, as Flax's does), or a root scope made from a
// Key or a C++ engine (a top-level module's Module.init(key)). Neither copyable nor
// movable: it may point into itself.
class InitScope {
 public:
  template <class Rng>
  explicit InitScope(Rng& rng) {
    using R = std::remove_cv_t<Rng>;
    if constexpr (std::is_same_v<R, random::RngScope>) {
      static_assert(!std::is_const_v<Rng>,
                    "linen: init draws from the RngScope (its counter advances): pass it non-const");
      scope_ = &rng;
    } else if constexpr (std::is_same_v<R, random::Key>) {
      own_.emplace(rng);
      scope_ = &*own_;
    } else {
      static_assert(is_urbg<R>::value,
                    "linen: init takes a linen::random::Key, a linen::random::RngScope or a C++ random engine");
      own_.emplace(random::key_from_engine(rng));
      scope_ = &*own_;
    }
  }
  InitScope(const InitScope&) = delete;
  InitScope& operator=(const InitScope&) = delete;

  random::RngScope& get() { return *scope_; }

 private:
  std::optional<random::RngScope> own_;
  random::RngScope* scope_ = nullptr;
};

// Flax's merge_param for `deterministic`, as a module with dropout reads it: it matters
// (and must be given exactly once, to the module or to the call) only when rate > 0, and
// deterministic=false then needs a dropout source. `name` prefixes the errors (a C string,
// so that a call that throws nothing allocates nothing).
inline bool merge_deterministic(const std::optional<bool>& module_value, const std::optional<bool>& call_value,
                                double rate, bool has_rng, const char* module_name) {
  if (!(rate > 0.0)) return true;
  if (module_value && call_value)
    throw linen::invalid_argument(std::string(module_name) + ": Parameter \"deterministic\" was passed to the constructor and at call "
                                         "time. Should be passed just once.");
  if (!module_value && !call_value)
    throw linen::invalid_argument(std::string(module_name) + ": Parameter \"deterministic\" must be passed to the constructor or at call "
                                         "time.");
  const bool deterministic = module_value ? *module_value : *call_value;
  if (!deterministic && !has_rng)
    throw linen::invalid_argument(std::string(module_name) + ": dropout_rate=" + std::to_string(rate) +
                                  " with deterministic=false needs a dropout_rng");
  return deterministic;
}

// The element count of a tensor of `shape` of T's about to be allocated, checked first:
// an element count or byte size past what the machine can address throws
// linen::overflow_error naming `what` and the shape (never std::bad_alloc from a wrapped
// size). Sizes that merely exceed the memory still throw std::bad_alloc from the
// allocation itself.
template <class T>
Index checked_allocation(const Shape& shape, const std::string& what) {
  // One size rule (tensor.hpp's checked_element_count / checked_byte_count), worded
  // for the module and the tensor at fault.
  const size_check n = checked_element_count(shape);
  if (n.fault == size_fault::negative_dimension)
    throw linen::invalid_argument(what + ": negative dimension in shape " + to_string(shape));
  if (!n) throw linen::overflow_error(what + ": element count of shape " + to_string(shape) + " overflows");
  if (!checked_byte_count(n.value, static_cast<Index>(sizeof(T))))
    throw linen::overflow_error(what + ": shape " + to_string(shape) + " needs more than " +
                                std::to_string(std::numeric_limits<Index>::max()) + " bytes");
  return n.value;
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_MODULE_HPP

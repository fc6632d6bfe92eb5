// SPDX-License-Identifier: Apache-2.0
//
// A model's variables as one tree, and a module's place in it: Flax's Scope over the
// flat io::Variables store.
//
//   Scope / ConstScope   a module path ("decoder/layers_0/attn") over a Variables,
//                        spanning every collection, as a bound Flax submodule sees
//                        {'params': {...its subtree...}, 'cache': {...}}: scope paths
//                        are "<collection>/<path inside the module>", e.g.
//                        scope.at("params/query/kernel") reads
//                        "params/decoder/layers_0/attn/query/kernel". A scope is a
//                        pointer and a string: it copies no array. push(name) descends
//                        (as RngScope::push does for init);
//   scope.layer(i, N)    nn.scan(..., variable_axes={'params': 0}, length=N): every
//                        array read through it has a leading layer axis of N, and
//                        reads give layer i's slice (at / get convert only that slice's
//                        bytes; view maps them in place, no copy);
//   store_stacked        the inverse: N layers' variables written once each, stacked.
//
// Binding modules to a scope (io::load / io::store for every module) is io/modules.hpp.
//
// Lifetime: a scope, an ArrayView and a view<T, N>() map point into the Variables they
// came from; they are valid while that Variables lives and the array at that path is
// neither replaced (set, merge) nor erased.
#ifndef LINEN_IO_TREE_HPP
#define LINEN_IO_TREE_HPP

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"
#include "dtype.hpp"
#include "variables.hpp"

namespace linen::io {

// One array as a scope reads it: a stored Array, or layer i of a stacked one (its shape
// then lacks the leading layer axis). Non-owning (see the lifetime rule above).
class ArrayView {
 public:
  ArrayView(const Array& array, std::optional<Index> layer) : array_(&array), layer_(layer) {}

  DType dtype() const { return array_->dtype(); }
  Shape shape() const {
    if (!layer_) return array_->shape();
    return Shape(array_->shape().begin() + 1, array_->shape().end());
  }
  int rank() const { return array_->rank() - (layer_ ? 1 : 0); }
  // The stored array (the whole stack for a layer).
  const Array& array() const { return *array_; }
  std::optional<Index> layer() const { return layer_; }

  // As Array::to / to_vector, of the slice for a layer (only its bytes are read).
  template <class T, int N>
  Tensor<T, N> to(const std::string& what = "array") const {
    return layer_ ? array_->template slice_to<T, N>(*layer_, what) : array_->template to<T, N>(what);
  }
  template <class T>
  std::vector<T> to_vector(const std::string& what = "array") const {
    return layer_ ? array_->template slice_to_vector<T>(*layer_, what) : array_->template to_vector<T>(what);
  }

  // "float32 array of shape (8, 2, 4)" (a layer: "layer 1 of float32 array of shape (4, 8, 2, 4)").
  std::string describe() const {
    return layer_ ? "layer " + std::to_string(*layer_) + " of " + array_->describe() : array_->describe();
  }

 private:
  const Array* array_;
  std::optional<Index> layer_;
};

// A module path over a Variables: V is Variables (a Scope, which can also store) or const
// Variables (a ConstScope, reads only). Made implicitly from a Variables (the root, "").
template <class V>
class basic_scope {
  static_assert(std::is_same_v<std::remove_const_t<V>, Variables>, "linen::io: a scope is over io::Variables");

 public:
  // The root scope of `vars` (or `module_path` in it, e.g. "decoder/layers_0"; "" = the root).
  basic_scope(V& vars) : vars_(&vars) {}  // NOLINT: implicit, so that a Variables binds where a scope is taken
  basic_scope(V& vars, const std::string& module_path) : vars_(&vars) {
    if (!module_path.empty()) path_ = checked_join(module_path);
  }
  // A Scope is also a ConstScope.
  template <class U, std::enable_if_t<std::is_same_v<V, const U>, int> = 0>
  basic_scope(const basic_scope<U>& s)  // NOLINT: implicit, as Variables& -> const Variables&
      : vars_(&s.variables()), path_(s.path()), layer_(s.layer_index()), length_(s.layer_length()) {}

  // The child module `name` (Flax's scope.push(name)); `name` may hold '/' ("encoder/attn").
  basic_scope push(const std::string& name) const {
    basic_scope child = *this;
    child.path_ = checked_join(name);
    return child;
  }

  // nn.scan's stacked layers: this scope's arrays all have a leading axis of `length` (the
  // scan's length); the returned scope reads layer `i` of each. Throws
  // linen::invalid_argument for i outside [0, length) or a scope already sliced.
  basic_scope layer(Index i, Index length) const {
    if (length <= 0 || i < 0 || i >= length)
      throw linen::invalid_argument("linen::io: layer " + std::to_string(i) + " of a scan of length " +
                                    std::to_string(length) + " at '" + path_ + "'");
    if (layer_)
      throw linen::invalid_argument("linen::io: scope '" + path_ + "' is already layer " + std::to_string(*layer_) +
                                    " of a scan (nested scans are not supported)");
    basic_scope s = *this;
    s.layer_ = i;
    s.length_ = length;
    return s;
  }
  // The same scope (same layer slicing) at the root path "": for binders that take the
  // module path as an argument (load_attention).
  basic_scope root() const {
    basic_scope s = *this;
    s.path_.clear();
    return s;
  }

  const std::string& path() const { return path_; }  // "" at the root
  V& variables() const { return *vars_; }
  std::optional<Index> layer_index() const { return layer_; }
  Index layer_length() const { return length_; }

  // "<collection>/<rest>" -> "<collection>/<path>/<rest>". Throws linen::invalid_argument
  // when `p` has no collection component.
  std::string full_path(const std::string& p) const {
    const auto slash = p.find('/');
    if (slash == std::string::npos || slash == 0 || slash + 1 == p.size())
      throw linen::invalid_argument("linen::io: scope path '" + p +
                                    "' is not '<collection>/<name>' (e.g. 'params/kernel')");
    if (path_.empty()) return p;
    return p.substr(0, slash) + "/" + path_ + p.substr(slash);
  }

  bool contains(const std::string& p) const { return vars_->contains(full_path(p)); }

  // The array at `p` (layer i's slice in a layer scope: io_error naming the path unless
  // the stored array's leading axis is the scan's length).
  ArrayView at(const std::string& p) const {
    const std::string full = full_path(p);
    const Array& a = vars_->at(full);
    if (layer_ && (a.rank() == 0 || a.shape()[0] != length_))
      throw io_error(full + ": stacked by nn.scan of length " + std::to_string(length_) +
                     " needs a leading axis of " + std::to_string(length_) + ", file has shape " +
                     to_string(a.shape()));
    return ArrayView(a, layer_);
  }

  // The array at `p` as a rank-N tensor of T (conversions as Array::to).
  template <class T, int N>
  Tensor<T, N> get(const std::string& p) const {
    return at(p).template to<T, N>(full_path(p));
  }
  // Same, and its shape (a layer's, in a layer scope) must equal `expected`, else io_error
  // naming the path and both shapes.
  template <class T, int N>
  Tensor<T, N> get(const std::string& p, const Shape& expected) const {
    if (!layer_) return vars_->template get<T, N>(full_path(p), expected);  // Variables::get's checks and words
    check_shape(p, expected, N);
    return at(p).template to<T, N>(what(p));
  }

  // The array at `p` in place, no copy: a map of the stored bytes (a layer's slice in a
  // layer scope). The stored dtype must be T's (io_error otherwise: no conversion happens
  // in place) and the shape `expected`. Valid as the lifetime rule above says. The bytes
  // are little-endian, as every reader assumes of the host.
  template <class T, int N>
  ConstTensorMap<T, N> view(const std::string& p, const Shape& expected) const {
    check_shape(p, expected, N);
    const ArrayView a = at(p);
    if (a.dtype() != dtype_of<T>())
      throw io_error(what(p) + ": a view of " + dtype_name<T>() + " needs " + numpy_name(dtype_of<T>()) +
                     " storage, file has " + a.describe() + " (get<T, N> converts)");
    const Index stride = layer_ ? a.array().slice_stride(*layer_, what(p)) : a.array().size();
    const std::uint8_t* base = a.array().bytes().data() + (layer_ ? *layer_ * stride : 0) * static_cast<Index>(sizeof(T));
    if (reinterpret_cast<std::uintptr_t>(base) % alignof(T) != 0)
      throw io_error(what(p) + ": stored bytes are not aligned for " + dtype_name<T>());
    std::array<Index, N> dims{};
    for (int d = 0; d < N; ++d) dims[static_cast<std::size_t>(d)] = expected[static_cast<std::size_t>(d)];
    return ConstTensorMap<T, N>(reinterpret_cast<const T*>(base), dims);
  }

  // Stores at "<collection>/<path>/<rest>" (a Scope only; a layer scope refuses: write
  // stacked layers with store_stacked).
  void set(const std::string& p, Array a) const {
    static_assert(!std::is_const_v<V>, "linen::io: a ConstScope reads only; store through a Scope");
    if (layer_)
      throw linen::invalid_argument("linen::io: cannot store '" + full_path(p) + "' through layer " +
                                    std::to_string(*layer_) + " of a scan: use store_stacked");
    vars_->set(full_path(p), std::move(a));
  }
  template <class T, int N>
  void set(const std::string& p, const Tensor<T, N>& t) const {
    set(p, Array::from(t));
  }

 private:
  template <class U>
  friend class basic_scope;

  std::string what(const std::string& p) const {
    return full_path(p) + (layer_ ? " (layer " + std::to_string(*layer_) + " of " + std::to_string(length_) + ")" : "");
  }
  void check_shape(const std::string& p, const Shape& expected, int n) const {
    if (expected.size() != static_cast<std::size_t>(n))
      throw linen::invalid_argument("linen::io: reading '" + full_path(p) + "' as rank " + std::to_string(n) +
                                    " with an expected shape of rank " + std::to_string(expected.size()) + ": " +
                                    to_string(expected));
    const Shape s = at(p).shape();
    if (s != expected)
      throw io_error(what(p) + ": shape " + to_string(expected) + " expected, file has " + to_string(s));
  }
  std::string checked_join(const std::string& name) const {
    if (auto why = Variables::path_error(name))
      throw linen::invalid_argument("linen::io: invalid module path '" + name + "': " + *why);
    return path_.empty() ? name : path_ + "/" + name;
  }

  V* vars_;
  std::string path_;
  std::optional<Index> layer_;
  Index length_ = 0;
};

using Scope = basic_scope<Variables>;
using ConstScope = basic_scope<const Variables>;

// nn.scan's stacked layout, written: layers[i] holds layer i's variables with paths
// relative to the scanned module ("params/attn/query/kernel", as io::store into a fresh
// Variables writes them); each path is written once, at
// "<collection>/<scope path>/<rest>", of shape [N, layer's shape...] (N = layers.size()).
// Every layer must hold the same paths with the same dtype and shape: io_error naming
// the path, the layer and both otherwise (nothing is written then).
inline void store_stacked(const Scope& scope, const std::vector<Variables>& layers) {
  if (layers.empty()) throw linen::invalid_argument("linen::io: store_stacked of no layers at '" + scope.path() + "'");
  const Variables& first = layers.front();
  for (std::size_t l = 1; l < layers.size(); ++l) {
    for (const auto& [p, a] : layers[l])
      if (!first.contains(p))
        throw io_error("store_stacked: layer " + std::to_string(l) + " has '" + p + "', layer 0 has not");
    for (const auto& [p, a] : first) {
      if (!layers[l].contains(p))
        throw io_error("store_stacked: layer " + std::to_string(l) + " lacks '" + p + "' (layer 0 has " +
                       a.describe() + ")");
      const Array& b = layers[l].at(p);
      if (b.dtype() != a.dtype() || b.shape() != a.shape())
        throw io_error("store_stacked: '" + p + "' is a " + a.describe() + " in layer 0, a " + b.describe() +
                       " in layer " + std::to_string(l));
    }
  }
  std::vector<std::pair<std::string, Array>> out;
  out.reserve(first.size());
  for (const auto& [p, a] : first) {
    std::vector<std::uint8_t> bytes;
    bytes.reserve(a.bytes().size() * layers.size());
    for (const Variables& layer : layers) {
      const auto& b = layer.at(p).bytes();
      bytes.insert(bytes.end(), b.begin(), b.end());
    }
    Shape s{static_cast<Index>(layers.size())};
    s.insert(s.end(), a.shape().begin(), a.shape().end());
    out.emplace_back(scope.full_path(p), Array(a.dtype(), std::move(s), std::move(bytes)));
  }
  for (auto& [p, a] : out) scope.variables().set(p, std::move(a));
}

}  // namespace linen::io

#endif  // LINEN_IO_TREE_HPP

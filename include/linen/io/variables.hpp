// SPDX-License-Identifier: Apache-2.0
//
// Flax variables as a flat, ordered store: the `{'params': {...}, 'cache': {...}}`
// tree of a Flax module, flattened to paths joined with '/' ("params/query/kernel",
// "cache/cache_index"), each holding one typed array. The loaders
// (io/safetensors.hpp, io/msgpack.hpp, io/checkpoint.hpp) read into it and write from
// it; modules take their parameters out of it with get<T, N>(path, expected_shape);
// unused_paths and list_tensors report on it.
#ifndef LINEN_IO_VARIABLES_HPP
#define LINEN_IO_VARIABLES_HPP

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"
#include "detail/bytes.hpp"
#include "detail/text.hpp"
#include "dtype.hpp"

namespace linen::io {

namespace detail {

template <class T>
inline constexpr bool is_float_v = std::is_floating_point_v<T> || is_half_type_v<T>;

// Element count of `shape` (linen::detail::checked_element_count), or io_error naming
// `what` on a negative dim or overflow.
inline Index checked_count(const Shape& shape, const std::string& what) {
  const linen::detail::size_check n = linen::detail::checked_element_count(shape);
  if (n.fault == linen::detail::size_fault::negative_dimension)
    throw io_error(what + ": negative dimension in shape " + to_string(shape));
  if (n.fault == linen::detail::size_fault::overflow)
    throw io_error(what + ": element count of shape " + to_string(shape) + " overflows");
  return n.value;
}

// A float value for an error message, with the digits that identify it.
template <class S>
std::string float_string(S v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.*g", std::is_same_v<S, double> ? 17 : 9, static_cast<double>(v));
  return buf;
}

// Does integer v fit in integer type To?
template <class To, class From>
bool int_fits(From v) {
  static_assert(std::is_integral_v<To> && std::is_integral_v<From>);
  if constexpr (std::is_signed_v<From>) {
    const auto w = static_cast<std::intmax_t>(v);
    if constexpr (std::is_signed_v<To>) {
      return w >= static_cast<std::intmax_t>(std::numeric_limits<To>::min()) &&
             w <= static_cast<std::intmax_t>(std::numeric_limits<To>::max());
    } else {
      return w >= 0 && static_cast<std::uintmax_t>(w) <= static_cast<std::uintmax_t>(std::numeric_limits<To>::max());
    }
  } else {
    return static_cast<std::uintmax_t>(v) <= static_cast<std::uintmax_t>(std::numeric_limits<To>::max());
  }
}

template <class V>
std::string int_string(V v) {
  if constexpr (std::is_signed_v<V>)
    return std::to_string(static_cast<std::intmax_t>(v));
  else
    return std::to_string(static_cast<std::uintmax_t>(v));
}

// double -> half / bfloat16 rounded once, to nearest even (a plain detour through
// float rounds twice and can miss a tie by one ulp). Rounding to float with
// round-to-odd first keeps enough sticky information for the final rounding.
template <class T>
T double_to_half_type(double d) {
  float f = static_cast<float>(d);
  if (std::isfinite(f) && static_cast<double>(f) != d) {
    const auto bits = Eigen::numext::bit_cast<std::uint32_t>(f);
    if ((bits & 1u) == 0) f = std::nextafter(f, d > static_cast<double>(f) ? HUGE_VALF : -HUGE_VALF);
  }
  return T(f);
}

// One floating-point value S -> floating-point T, rounding to nearest even.
template <class T, class S>
T float_cast(S s) {
  if constexpr (std::is_same_v<T, S>)
    return s;
  else if constexpr (std::is_same_v<S, double> && is_half_type_v<T>)
    return double_to_half_type<T>(s);
  else if constexpr (is_half_type_v<S>)
    return static_cast<T>(static_cast<float>(s));
  else
    return static_cast<T>(s);
}

}  // namespace detail

// One stored tensor: its dtype, its shape and its little-endian C-order (row-major)
// bytes. Owning and immutable. A scalar has shape () and one element.
class Array {
 public:
  // bytes: prod(shape) * itemsize(dtype) bytes, little-endian, row-major.
  // Throws io_error if the byte count does not match, or the shape has a negative dim.
  Array(DType dtype, Shape shape, std::vector<std::uint8_t> bytes)
      : dtype_(dtype), shape_(std::move(shape)), bytes_(std::move(bytes)) {
    size_ = detail::checked_count(shape_, std::string("array of dtype ") + numpy_name(dtype_));
    const linen::detail::size_check nbytes =
        linen::detail::checked_byte_count(size_, static_cast<Index>(itemsize(dtype_)));
    if (!nbytes)
      throw io_error("array of shape " + to_string(shape_) + " and dtype " + numpy_name(dtype_) +
                     ": byte count overflows");
    if (static_cast<Index>(bytes_.size()) != nbytes.value)
      throw io_error("array of shape " + to_string(shape_) + " and dtype " + numpy_name(dtype_) + " needs " +
                     std::to_string(nbytes.value) + " bytes, got " + std::to_string(bytes_.size()));
  }

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }
  // Number of elements: prod(shape), 1 for a scalar.
  Index size() const { return size_; }
  int rank() const { return static_cast<int>(shape_.size()); }

  // The array holding a copy of `t` (dtype = dtype_of<T>(), shape = t's dims).
  template <class T, int N>
  static Array from(const Tensor<T, N>& t) {
    return from_data(t.data(), shape_of(t));
  }
  template <class T, int N>
  static Array from(const ConstTensorMap<T, N>& t) {
    return from_data(t.data(), shape_of(t));
  }
  template <class T, int N>
  static Array from(const TensorMap<T, N>& t) {
    return from_data(t.data(), shape_of(t));
  }
  // The array holding a copy of the prod(shape) row-major elements at `data`.
  template <class T>
  static Array from_data(const T* data, Shape shape) {
    constexpr DType d = dtype_of<T>();
    const Index n = detail::checked_count(shape, std::string("array of dtype ") + numpy_name(d));
    if (n > 0 && data == nullptr)
      throw linen::invalid_argument("linen::io: Array::from_data of shape " + to_string(shape) + " over null data");
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n) * sizeof(T));
    for (Index i = 0; i < n; ++i) detail::store_element<T>(bytes.data() + i * static_cast<Index>(sizeof(T)), data[i]);
    return Array(d, std::move(shape), std::move(bytes));
  }

  // The array as a rank-N tensor of T. Conversions compute what Flax's promote_dtype
  // (jnp.asarray(x, dtype)) computes, and throw where that would be inf from a finite value:
  //   float <-> float in any direction (F64/F32/F16/BF16), rounding to nearest even; a
  //   finite value that rounds to +-inf in T (float64 1e300 -> float32, float32 1e30 ->
  //   float16) throws naming the value and its flat index; stored inf and NaN stay so;
  //   integer or bool -> float, rounding to nearest even (bool as 0/1); a value that
  //   overflows T (float16 above 65504) throws likewise;
  //   integer -> integer with a range check (throws naming the first value that
  //   does not fit); bool -> integer as 0/1;
  //   bool <- BOOL or U8 holding only 0/1.
  // float -> integer and integer -> bool are refused. A BOOL byte other than 0/1 throws.
  // Rank must equal N. Errors (io_error) start with `what` (pass the path).
  template <class T, int N>
  Tensor<T, N> to(const std::string& what = "array") const {
    static_assert(N >= 0, "rank must be non-negative");
    if (rank() != N)
      throw io_error(what + ": " + describe() + " cannot be read as a rank-" + std::to_string(N) + " " +
                     dtype_name<T>() + " tensor (ranks differ)");
    std::array<Index, N> dims{};
    for (int i = 0; i < N; ++i) dims[static_cast<std::size_t>(i)] = shape_[static_cast<std::size_t>(i)];
    Tensor<T, N> out;
    out.resize(dims);
    convert_into(out.data(), what);
    return out;
  }

  // The elements flattened in row-major order, converted to T as in to().
  template <class T>
  std::vector<T> to_vector(const std::string& what = "array") const {
    if constexpr (std::is_same_v<T, bool>) {  // std::vector<bool> has no data()
      const Tensor<bool, 1> flat = Array(dtype_, {size_}, bytes_).to<bool, 1>(what);
      return std::vector<bool>(flat.data(), flat.data() + flat.size());
    } else {
      std::vector<T> out(static_cast<std::size_t>(size_));
      convert_into(out.data(), what);
      return out;
    }
  }

  // nn.scan's stacked layout: the sub-array at index `i` of the leading axis, shape()
  // without its first dim, as a rank-N tensor of T (conversions and errors as to(),
  // flat indices counted in the whole array). Reads only that slice's bytes. Throws
  // io_error naming `what` for a scalar, or i outside [0, shape[0]).
  template <class T, int N>
  Tensor<T, N> slice_to(Index i, const std::string& what = "array") const {
    static_assert(N >= 0, "rank must be non-negative");
    const Index stride = slice_stride(i, what);
    if (rank() != N + 1)
      throw io_error(what + ": " + describe() + " cannot be sliced into rank-" + std::to_string(N) + " " +
                     dtype_name<T>() + " tensors (ranks differ)");
    std::array<Index, N> dims{};
    for (int d = 0; d < N; ++d) dims[static_cast<std::size_t>(d)] = shape_[static_cast<std::size_t>(d) + 1];
    Tensor<T, N> out;
    out.resize(dims);
    convert_into(out.data(), what, i * stride, (i + 1) * stride);
    return out;
  }

  // The same slice flattened in row-major order (as to_vector).
  template <class T>
  std::vector<T> slice_to_vector(Index i, const std::string& what = "array") const {
    static_assert(!std::is_same_v<T, bool>, "linen::io: slice_to_vector<bool> (std::vector<bool> has no data())");
    const Index stride = slice_stride(i, what);
    std::vector<T> out(static_cast<std::size_t>(stride));
    convert_into(out.data(), what, i * stride, (i + 1) * stride);
    return out;
  }

  // Elements per index of the leading axis (prod(shape[1:])), after checking that
  // index `i` exists; io_error naming `what` otherwise.
  Index slice_stride(Index i, const std::string& what = "array") const {
    if (shape_.empty()) throw io_error(what + ": " + describe() + " is a scalar, it has no leading axis to slice");
    if (i < 0 || i >= shape_[0])
      throw io_error(what + ": index " + std::to_string(i) + " outside the leading axis of " + describe());
    return shape_[0] ? size_ / shape_[0] : 0;
  }

  // "float32 array of shape (2, 5, 3)".
  std::string describe() const { return std::string(numpy_name(dtype_)) + " array of shape " + to_string(shape_); }

  // Same dtype, same shape, same bytes.
  friend bool operator==(const Array& a, const Array& b) {
    return a.dtype_ == b.dtype_ && a.shape_ == b.shape_ && a.bytes_ == b.bytes_;
  }
  friend bool operator!=(const Array& a, const Array& b) { return !(a == b); }

 private:
  // Converts the elements [first, end) (flat indices) into dst[0, end - first).
  template <class T>
  void convert_into(T* dst, const std::string& what, Index first = 0, Index end = -1) const {
    (void)dtype_of<T>();  // rejects unsupported T at compile time
    if (end < 0) end = size_;
    const std::uint8_t* src = bytes_.data();
    detail::visit_dtype(dtype_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      convert_from<T, S>(src, dst, what, first, end);
    });
  }

  std::string refuse(const char* to, const std::string& what, const char* why) const {
    return what + ": cannot read " + describe() + " as " + to + " (" + why + ")";
  }

  // Reads a BOOL byte, which must be 0 or 1 (also used for U8 -> bool).
  std::uint8_t checked_bit(const std::uint8_t* p, Index i, const std::string& what) const {
    if (*p > 1)
      throw io_error(what + ": " + describe() + " holds byte " + std::to_string(*p) + " at flat index " +
                     std::to_string(i) + ", not a bool (0 or 1)");
    return *p;
  }

  template <class T, class S>
  void convert_from(const std::uint8_t* src, T* dst, const std::string& what, Index first, Index end) const {
    constexpr Index w = static_cast<Index>(sizeof(S));
    if constexpr (std::is_same_v<T, bool>) {
      if constexpr (std::is_same_v<S, bool> || std::is_same_v<S, std::uint8_t>) {
        for (Index i = first; i < end; ++i) dst[i - first] = checked_bit(src + i, i, what) != 0;
      } else {
        throw io_error(refuse("bool", what, "only BOOL or uint8 0/1 arrays convert to bool"));
      }
    } else if constexpr (detail::is_float_v<T>) {
      for (Index i = first; i < end; ++i) {
        const std::uint8_t* p = src + i * w;
        if constexpr (std::is_same_v<S, bool>) {
          dst[i - first] = T(checked_bit(p, i, what) ? 1.0f : 0.0f);
        } else if constexpr (std::is_integral_v<S>) {
          const S v = detail::load_element<S>(p);
          dst[i - first] = static_cast<T>(v);
          if constexpr (is_half_type_v<T>) {
            if (!Eigen::numext::isfinite(dst[i - first]))
              throw io_error(what + ": " + describe() + " holds " + detail::int_string(v) + " at flat index " +
                             std::to_string(i) + ", which overflows " + dtype_name<T>());
          }
        } else {
          const S v = detail::load_element<S>(p);
          dst[i - first] = detail::float_cast<T>(v);
          if (!std::is_same_v<S, T> && !Eigen::numext::isfinite(dst[i - first]) && Eigen::numext::isfinite(v))
            throw io_error(what + ": " + describe() + " holds " + detail::float_string(v) + " at flat index " +
                           std::to_string(i) + ", which overflows " + dtype_name<T>());
        }
      }
    } else {
      static_assert(std::is_integral_v<T>);
      if constexpr (detail::is_float_v<S>) {
        throw io_error(refuse(dtype_name<T>(), what, "float -> integer conversion is refused"));
      } else if constexpr (std::is_same_v<S, bool>) {
        for (Index i = first; i < end; ++i) dst[i - first] = static_cast<T>(checked_bit(src + i, i, what));
      } else {
        for (Index i = first; i < end; ++i) {
          const S v = detail::load_element<S>(src + i * w);
          if constexpr (!std::is_same_v<S, T>) {
            if (!detail::int_fits<T>(v))
              throw io_error(what + ": " + describe() + " holds " + detail::int_string(v) + " at flat index " +
                             std::to_string(i) + ", which does not fit in " + dtype_name<T>());
          }
          dst[i - first] = static_cast<T>(v);
        }
      }
    }
  }

  DType dtype_;
  Shape shape_;
  Index size_ = 0;
  std::vector<std::uint8_t> bytes_;
};

// A flat tree of variables keyed by Flax path joined with '/': "params/query/kernel",
// "cache/cache_index". Ordered (std::map), so iteration and saving are deterministic.
// A path is non-empty, has no empty component (no leading, trailing or doubled '/'),
// and is not "__metadata__" (reserved by safetensors).
class Variables {
 public:
  using map_type = std::map<std::string, Array>;
  using const_iterator = map_type::const_iterator;

  // Free-form string metadata (safetensors `__metadata__`).
  std::map<std::string, std::string> metadata;

  bool contains(const std::string& path) const { return tensors_.count(path) != 0; }

  // The array at `path`; io_error "missing tensor 'params/query/kernel'" (with the
  // nearest stored paths) if there is none.
  const Array& at(const std::string& path) const {
    auto it = tensors_.find(path);
    if (it == tensors_.end()) throw io_error("missing tensor '" + path + "'" + nearest_hint(path));
    return it->second;
  }

  // The array at `path` as a rank-N tensor of T (conversions as Array::to).
  template <class T, int N>
  Tensor<T, N> get(const std::string& path) const {
    return at(path).template to<T, N>(path);
  }

  // Same, and its shape must equal `expected` (rank N), else io_error
  // "params/query/kernel: shape (16, 4, 4) expected, file has (16, 4, 2)".
  template <class T, int N>
  Tensor<T, N> get(const std::string& path, const Shape& expected) const {
    if (expected.size() != static_cast<std::size_t>(N))
      throw linen::invalid_argument("linen::io: get<T, " + std::to_string(N) + ">('" + path +
                                  "') called with an expected shape of rank " + std::to_string(expected.size()) + ": " +
                                  to_string(expected));
    const Array& a = at(path);
    if (a.shape() != expected)
      throw io_error(path + ": shape " + to_string(expected) + " expected, file has " + to_string(a.shape()));
    return a.template to<T, N>(path);
  }

  // Stores `a` at `path`, replacing any array there. Throws std::invalid_argument on
  // an invalid path.
  void set(const std::string& path, Array a) {
    if (auto why = path_error(path))
      throw linen::invalid_argument("linen::io: invalid variable path '" + path + "': " + *why);
    tensors_.insert_or_assign(path, std::move(a));
  }

  // Stores a copy of tensor `t` (dtype dtype_of<T>()) at `path`.
  template <class T, int N>
  void set(const std::string& path, const Tensor<T, N>& t) {
    set(path, Array::from(t));
  }

  // Removes `path`; false if it was absent.
  bool erase(const std::string& path) { return tensors_.erase(path) != 0; }

  // Everything under "prefix/", with the prefix stripped ("" = everything; a trailing
  // '/' on prefix is ignored). Metadata is copied. Throws io_error naming the prefix
  // if nothing is under it.
  Variables subtree(const std::string& prefix) const {
    if (prefix.empty()) return *this;
    std::string p = prefix;
    if (p.back() != '/') p += '/';
    Variables out;
    out.metadata = metadata;
    for (auto it = tensors_.lower_bound(p); it != tensors_.end() && it->first.compare(0, p.size(), p) == 0; ++it)
      out.tensors_.emplace(it->first.substr(p.size()), it->second);
    if (out.tensors_.empty()) throw io_error("no tensor under '" + p + "'" + nearest_hint(p));
    return out;
  }

  // Inserts every array of `v` at "prefix/<its path>" ("" = at its own path),
  // replacing arrays already there. Metadata is not merged.
  void merge(const std::string& prefix, const Variables& v) {
    if (prefix.empty()) {
      for (const auto& [k, a] : v.tensors_) tensors_.insert_or_assign(k, a);
      return;
    }
    std::string p = prefix;
    if (p.back() == '/') p.pop_back();
    if (auto why = path_error(p))
      throw linen::invalid_argument("linen::io: invalid merge prefix '" + prefix + "': " + *why);
    for (const auto& [k, a] : v.tensors_) tensors_.insert_or_assign(p + "/" + k, a);
  }

  // All paths, sorted.
  std::vector<std::string> paths() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }
  std::size_t size() const { return tensors_.size(); }
  bool empty() const { return tensors_.empty(); }

  // (path, Array) pairs in path order.
  const_iterator begin() const { return tensors_.begin(); }
  const_iterator end() const { return tensors_.end(); }

  // Same arrays at the same paths and same metadata.
  friend bool operator==(const Variables& a, const Variables& b) {
    return a.tensors_ == b.tensors_ && a.metadata == b.metadata;
  }
  friend bool operator!=(const Variables& a, const Variables& b) { return !(a == b); }

  // Why `path` is not a valid variable path, or nullopt if it is.
  static std::optional<std::string> path_error(const std::string& path) {
    if (path.empty()) return "empty path";
    if (path == "__metadata__") return "'__metadata__' is reserved by safetensors";
    if (path.front() == '/' || path.back() == '/' || path.find("//") != std::string::npos)
      return "empty path component";
    return std::nullopt;
  }

 private:
  // " (nearest: 'a', 'b')": up to 4 stored paths sharing the longest prefix with `path`.
  std::string nearest_hint(const std::string& path) const {
    if (tensors_.empty()) return " (no tensors stored)";
    std::vector<std::pair<std::size_t, const std::string*>> scored;
    scored.reserve(tensors_.size());
    for (const auto& kv : tensors_) {
      const std::string& k = kv.first;
      const auto m = std::mismatch(
          path.begin(), path.begin() + static_cast<std::ptrdiff_t>(std::min(path.size(), k.size())), k.begin());
      scored.emplace_back(static_cast<std::size_t>(m.first - path.begin()), &k);
    }
    std::stable_sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    std::string s = " (" + std::to_string(tensors_.size()) + " stored; nearest: ";
    for (std::size_t i = 0; i < scored.size() && i < 4; ++i) s += (i ? ", '" : "'") + *scored[i].second + "'";
    return s + ")";
  }

  map_type tensors_;
};

// ---- utilities over Variables ------------------------------------------------

// The paths of `all` that lie under none of `used_prefixes` (a path is under p when
// it equals p or starts with p + "/"; a trailing '/' on p is ignored; "" covers
// everything), in path order: what binding modules by path left unread, e.g.
//   unused_paths(vars, {"params/encoder", "cache/encoder"}).
inline std::vector<std::string> unused_paths(const Variables& all, const std::vector<std::string>& used_prefixes) {
  std::vector<std::string> prefixes;
  prefixes.reserve(used_prefixes.size());
  for (std::string p : used_prefixes) {
    while (!p.empty() && p.back() == '/') p.pop_back();
    prefixes.push_back(std::move(p));
  }
  std::vector<std::string> out;
  for (const auto& kv : all) {
    const std::string& path = kv.first;
    const bool used = std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) {
      return p.empty() || (path.compare(0, p.size(), p) == 0 && (path.size() == p.size() || path[p.size()] == '/'));
    });
    if (!used) out.push_back(path);
  }
  return out;
}

// An h5ls-style listing of `v`: a header line, then one line per array in path
// order with its path (bytes other than printable ASCII shown as \xNN, so a NUL or a
// control byte in a name from a file is seen, not acted on), numpy dtype name, shape
// and byte count in aligned columns, then "<n> arrays, <total> bytes", then one line
// "metadata <key> = <value>" per metadata entry (values cut after 57 bytes), escaped
// alike. E.g.
//   path               dtype    shape           bytes
//   cache/cache_index  int32    ()                  4
//   params/out/bias    float32  (16,)              64
//   2 arrays, 68 bytes
inline std::string list_tensors(const Variables& v) {
  std::size_t wp = 4, wd = 5, ws = 5, wb = 5;
  std::uint64_t total = 0;
  for (const auto& [path, a] : v) {
    wp = std::max(wp, detail::escape_bytes(path).size());
    wd = std::max(wd, std::strlen(numpy_name(a.dtype())));
    ws = std::max(ws, to_string(a.shape()).size());
    wb = std::max(wb, std::to_string(a.bytes().size()).size());
    total += a.bytes().size();
  }
  auto row = [&](const std::string& p, const std::string& d, const std::string& s, const std::string& b) {
    std::string line = p + std::string(wp - p.size() + 2, ' ') + d + std::string(wd - d.size() + 2, ' ') + s +
                       std::string(ws - s.size() + 2, ' ') + std::string(wb - b.size(), ' ') + b;
    return line + "\n";
  };
  std::string out = row("path", "dtype", "shape", "bytes");
  for (const auto& [path, a] : v)
    out += row(detail::escape_bytes(path), numpy_name(a.dtype()), to_string(a.shape()), std::to_string(a.bytes().size()));
  out += std::to_string(v.size()) + (v.size() == 1 ? " array, " : " arrays, ") + std::to_string(total) + " bytes\n";
  for (const auto& [key, value] : v.metadata) {
    const std::string shown = value.size() > 60 ? value.substr(0, 57) + "..." : value;
    out += "metadata " + detail::escape_bytes(key) + " = " + detail::escape_bytes(shown) + "\n";
  }
  return out;
}

}  // namespace linen::io

#endif  // LINEN_IO_VARIABLES_HPP

// SPDX-License-Identifier: Apache-2.0
//
// Row-major tensors, so that shapes, names and bytes read exactly like numpy
// and Flax: `[batch..., length, features]`, last index fastest.
#ifndef LINEN_TENSOR_HPP
#define LINEN_TENSOR_HPP

#include <array>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unsupported/Eigen/CXX11/Tensor>

#include "errors.hpp"

namespace linen {

using Index = Eigen::Index;

// linen::Tensor<T, N>: an owning row-major Eigen tensor.
template <class T, int N>
using Tensor = Eigen::Tensor<T, N, Eigen::RowMajor, Index>;

// Views over caller memory, no copy: TensorMap<float, 3>(ptr, b, l, f).
template <class T, int N>
using TensorMap = Eigen::TensorMap<Tensor<T, N>>;
template <class T, int N>
using ConstTensorMap = Eigen::TensorMap<const Tensor<T, N>>;

// A runtime shape, numpy style.
using Shape = std::vector<Index>;

// The element types linen computes in (Flax's float32, float64, float16, bfloat16).
template <class T>
inline constexpr bool is_element_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> ||
    std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>;

// Half types are computed (accumulated) in float, like XLA on CPU.
template <class T>
inline constexpr bool is_half_type_v =
    std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>;

// The type a product or a reduction accumulates in.
template <class T>
using accum_t = std::conditional_t<is_half_type_v<T>, float, T>;

// numpy's name for an element type ("float32", "bfloat16", ...).
template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, Eigen::half>) return "float16";
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>) return "bfloat16";
  else if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "int8";
  else if constexpr (std::is_same_v<T, std::int16_t>) return "int16";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "int32";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "int64";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "uint8";
  else if constexpr (std::is_same_v<T, std::uint16_t>) return "uint16";
  else if constexpr (std::is_same_v<T, std::uint32_t>) return "uint32";
  else if constexpr (std::is_same_v<T, std::uint64_t>) return "uint64";
  else return "unknown";
}

// "(2, 5, 3)", numpy's spelling of a shape; "()" for a scalar, "(4,)" for rank 1.
inline std::string to_string(const Shape& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

// The shape of any Eigen tensor or map, as a runtime Shape.
template <class Derived>
Shape shape_of(const Derived& t) {
  const auto& d = t.dimensions();
  return Shape(d.begin(), d.end());
}

namespace detail {

// Why a size could not be computed.
enum class size_fault { none, negative_dimension, overflow };

// A size computed without wrapping: `value` when `fault` is none.
struct size_check {
  Index value = 0;
  size_fault fault = size_fault::none;
  explicit operator bool() const noexcept { return fault == size_fault::none; }
};

// prod(shape), or why there is none (a negative dim, or a product past Index's max).
// The one element-count check: num_elements throws on its fault, linen::io's loaders
// wrap it into an io_error naming the file and path.
inline size_check checked_element_count(const Shape& shape) noexcept {
  Index n = 1;
  for (Index d : shape) {
    if (d < 0) return {0, size_fault::negative_dimension};
    if (d != 0 && n > std::numeric_limits<Index>::max() / d) return {0, size_fault::overflow};
    n *= d;
  }
  return {n, size_fault::none};
}

// count * item_bytes (count >= 0, item_bytes > 0), or overflow.
inline size_check checked_byte_count(Index count, Index item_bytes) noexcept {
  if (count > std::numeric_limits<Index>::max() / item_bytes) return {0, size_fault::overflow};
  return {count * item_bytes, size_fault::none};
}

}  // namespace detail

// Product of the dims; throws std::overflow_error rather than wrap.
inline Index num_elements(const Shape& shape) {
  const detail::size_check n = detail::checked_element_count(shape);
  if (n.fault == detail::size_fault::negative_dimension)
    throw linen::invalid_argument("linen: negative dimension in shape " + to_string(shape));
  if (n.fault == detail::size_fault::overflow)
    throw linen::overflow_error("linen: element count of shape " + to_string(shape) + " overflows");
  return n.value;
}

// Shape -> Eigen dimensions of a fixed rank; throws on a rank mismatch.
template <int N>
std::array<Index, N> to_dims(const Shape& shape) {
  if (shape.size() != static_cast<std::size_t>(N))
    throw linen::invalid_argument("linen: expected a rank-" + std::to_string(N) + " shape, got " +
                                to_string(shape));
  std::array<Index, N> d{};
  for (int i = 0; i < N; ++i) d[i] = shape[i];
  return d;
}

// ArrayRef<T>: a non-owning, read-only view of a row-major array of any rank,
// used for the broadcastable `mask` and `bias` arguments (numpy broadcasting:
// shapes align at the right, a dim of 1 repeats). Default-constructed it is
// Flax's `None`. It never owns memory: binding it to a temporary tensor is a
// compile error, so a mask cannot dangle.
template <class T>
class ArrayRef {
 public:
  ArrayRef() = default;
  ArrayRef(const T* data, Shape shape) : data_(data), shape_(std::move(shape)) {
    if (data_ == nullptr && num_elements(shape_) != 0)
      throw linen::invalid_argument("linen: ArrayRef of shape " + to_string(shape_) + " over null data");
  }
  template <int N>
  ArrayRef(const Tensor<T, N>& t) : data_(t.data()), shape_(shape_of(t)) {}  // NOLINT: implicit
  template <int N>
  ArrayRef(Tensor<T, N>&&) = delete;  // would dangle
  template <int N>
  ArrayRef(const TensorMap<T, N>& t) : data_(t.data()), shape_(shape_of(t)) {}  // NOLINT
  template <int N>
  ArrayRef(const ConstTensorMap<T, N>& t) : data_(t.data()), shape_(shape_of(t)) {}  // NOLINT

  bool has_value() const { return data_ != nullptr || !shape_.empty(); }
  explicit operator bool() const { return has_value(); }
  const T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }

 private:
  const T* data_ = nullptr;
  Shape shape_;
};

// ---- what counts as a tensor ----------------------------------------------

namespace detail {

// Traits of the tensor types linen's functions accept: a row-major linen::Tensor, or a
// TensorMap of one (const or not).
template <class X>
struct tensor_traits {
  static constexpr bool value = false;
};
template <class T, int N>
struct tensor_traits<Eigen::Tensor<T, N, Eigen::RowMajor, Index>> {
  static constexpr bool value = true;
  using scalar = T;
  static constexpr int rank = N;
};
template <class T, int N, int Opt>
struct tensor_traits<Eigen::TensorMap<Eigen::Tensor<T, N, Eigen::RowMajor, Index>, Opt>>
    : tensor_traits<Eigen::Tensor<T, N, Eigen::RowMajor, Index>> {};
template <class T, int N, int Opt>
struct tensor_traits<Eigen::TensorMap<const Eigen::Tensor<T, N, Eigen::RowMajor, Index>, Opt>>
    : tensor_traits<Eigen::Tensor<T, N, Eigen::RowMajor, Index>> {};

template <class X>
inline constexpr bool is_tensor_v = tensor_traits<X>::value;

// tensor_traits for function signatures: a non-tensor argument gets placeholder traits
// (float, rank 3), so that the function is still chosen and its static_assert says what
// is wrong, rather than the compiler reporting that no function matches.
struct placeholder_tensor_traits {
  static constexpr bool value = false;
  using scalar = float;
  static constexpr int rank = 3;
};
template <class X>
using signature_traits = std::conditional_t<is_tensor_v<X>, tensor_traits<X>, placeholder_tensor_traits>;

}  // namespace detail

}  // namespace linen

#endif  // LINEN_TENSOR_HPP

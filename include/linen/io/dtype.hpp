// SPDX-License-Identifier: Apache-2.0
//
// The element types a stored array can have (safetensors' set, also numpy's): their
// names in both formats, their sizes, and the C++ type of each.
#ifndef LINEN_IO_DTYPE_HPP
#define LINEN_IO_DTYPE_HPP

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include <Eigen/Core>

#include "../errors.hpp"

namespace linen::io {

// The element types a stored array can have: safetensors' set, also numpy's.
enum class DType { F16, BF16, F32, F64, I8, I16, I32, I64, U8, U16, U32, U64, BOOL };

// Bytes per element (BOOL: one byte holding 0 or 1).
inline std::size_t itemsize(DType d) {
  switch (d) {
    case DType::BOOL:
    case DType::I8:
    case DType::U8:
      return 1;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
    case DType::U16:
      return 2;
    case DType::F32:
    case DType::I32:
    case DType::U32:
      return 4;
    case DType::F64:
    case DType::I64:
    case DType::U64:
      return 8;
  }
  throw linen::invalid_argument("linen::io: invalid DType value " + std::to_string(static_cast<int>(d)));
}

// safetensors' name of a dtype: "F32", "BF16", "BOOL", ...
inline const char* safetensors_name(DType d) {
  switch (d) {
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::F32:
      return "F32";
    case DType::F64:
      return "F64";
    case DType::I8:
      return "I8";
    case DType::I16:
      return "I16";
    case DType::I32:
      return "I32";
    case DType::I64:
      return "I64";
    case DType::U8:
      return "U8";
    case DType::U16:
      return "U16";
    case DType::U32:
      return "U32";
    case DType::U64:
      return "U64";
    case DType::BOOL:
      return "BOOL";
  }
  throw linen::invalid_argument("linen::io: invalid DType value " + std::to_string(static_cast<int>(d)));
}

// numpy's name of a dtype: "float32", "bfloat16", "bool", ... (what Flax msgpack stores).
inline const char* numpy_name(DType d) {
  switch (d) {
    case DType::F16:
      return "float16";
    case DType::BF16:
      return "bfloat16";
    case DType::F32:
      return "float32";
    case DType::F64:
      return "float64";
    case DType::I8:
      return "int8";
    case DType::I16:
      return "int16";
    case DType::I32:
      return "int32";
    case DType::I64:
      return "int64";
    case DType::U8:
      return "uint8";
    case DType::U16:
      return "uint16";
    case DType::U32:
      return "uint32";
    case DType::U64:
      return "uint64";
    case DType::BOOL:
      return "bool";
  }
  throw linen::invalid_argument("linen::io: invalid DType value " + std::to_string(static_cast<int>(d)));
}

inline constexpr DType kAllDTypes[] = {DType::F16, DType::BF16, DType::F32, DType::F64, DType::I8,
                                       DType::I16, DType::I32,  DType::I64, DType::U8,  DType::U16,
                                       DType::U32, DType::U64,  DType::BOOL};

// The dtype whose safetensors name is `name` ("F32" -> F32); nullopt if none is.
inline std::optional<DType> dtype_from_safetensors_name(std::string_view name) {
  for (DType d : kAllDTypes)
    if (name == safetensors_name(d)) return d;
  return std::nullopt;
}

// The dtype whose numpy name is `name` ("float32" -> F32); nullopt if none is.
inline std::optional<DType> dtype_from_numpy_name(std::string_view name) {
  for (DType d : kAllDTypes)
    if (name == numpy_name(d)) return d;
  return std::nullopt;
}

namespace detail {
template <class>
inline constexpr bool always_false_v = false;
}  // namespace detail

// The dtype of a C++ element type: float -> F32, Eigen::bfloat16 -> BF16, bool -> BOOL,
// std::int32_t -> I32, ... Any other type is a compile error.
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, Eigen::half>)
    return DType::F16;
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return DType::BF16;
  else if constexpr (std::is_same_v<T, float>)
    return DType::F32;
  else if constexpr (std::is_same_v<T, double>)
    return DType::F64;
  else if constexpr (std::is_same_v<T, bool>)
    return DType::BOOL;
  else if constexpr (std::is_same_v<T, std::int8_t>)
    return DType::I8;
  else if constexpr (std::is_same_v<T, std::int16_t>)
    return DType::I16;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return DType::I32;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return DType::I64;
  else if constexpr (std::is_same_v<T, std::uint8_t>)
    return DType::U8;
  else if constexpr (std::is_same_v<T, std::uint16_t>)
    return DType::U16;
  else if constexpr (std::is_same_v<T, std::uint32_t>)
    return DType::U32;
  else if constexpr (std::is_same_v<T, std::uint64_t>)
    return DType::U64;
  else
    static_assert(detail::always_false_v<T>, "linen::io: no stored dtype for this element type");
}

namespace detail {

template <class T>
struct type_tag {
  using type = T;
};

// Calls f(type_tag<C++ type of d>{}).
template <class F>
decltype(auto) visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::F16:
      return f(type_tag<Eigen::half>{});
    case DType::BF16:
      return f(type_tag<Eigen::bfloat16>{});
    case DType::F32:
      return f(type_tag<float>{});
    case DType::F64:
      return f(type_tag<double>{});
    case DType::I8:
      return f(type_tag<std::int8_t>{});
    case DType::I16:
      return f(type_tag<std::int16_t>{});
    case DType::I32:
      return f(type_tag<std::int32_t>{});
    case DType::I64:
      return f(type_tag<std::int64_t>{});
    case DType::U8:
      return f(type_tag<std::uint8_t>{});
    case DType::U16:
      return f(type_tag<std::uint16_t>{});
    case DType::U32:
      return f(type_tag<std::uint32_t>{});
    case DType::U64:
      return f(type_tag<std::uint64_t>{});
    case DType::BOOL:
      return f(type_tag<bool>{});
  }
  throw linen::invalid_argument("linen::io: invalid DType value " + std::to_string(static_cast<int>(d)));
}

}  // namespace detail

}  // namespace linen::io

#endif  // LINEN_IO_DTYPE_HPP

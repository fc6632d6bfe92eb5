// SPDX-License-Identifier: Apache-2.0
//
// Little-endian element encoding for linen::io (not part of the public API).
// Files store elements little-endian whatever the host's byte order, so every
// element goes through load_le / store_le, which compile to plain moves on a
// little-endian host.
#ifndef LINEN_IO_DETAIL_BYTES_HPP
#define LINEN_IO_DETAIL_BYTES_HPP

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace linen::io::detail {

// An unsigned integer of `Bytes` bytes.
template <std::size_t Bytes>
struct uint_of_size;
template <>
struct uint_of_size<1> {
  using type = std::uint8_t;
};
template <>
struct uint_of_size<2> {
  using type = std::uint16_t;
};
template <>
struct uint_of_size<4> {
  using type = std::uint32_t;
};
template <>
struct uint_of_size<8> {
  using type = std::uint64_t;
};
template <class T>
using bits_t = typename uint_of_size<sizeof(T)>::type;

// Reads an unsigned integer stored little-endian at p (p need not be aligned).
template <class U>
U load_le(const std::uint8_t* p) {
  static_assert(std::is_unsigned_v<U>, "load_le reads unsigned integers");
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v = static_cast<U>(v | (static_cast<U>(p[i]) << (8 * i)));
  return v;
}

// Writes an unsigned integer little-endian at p (p need not be aligned).
template <class U>
void store_le(std::uint8_t* p, U v) {
  static_assert(std::is_unsigned_v<U>, "store_le writes unsigned integers");
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// Decodes one element of type T (not bool: a BOOL byte is validated by the caller).
template <class T>
T load_element(const std::uint8_t* p) {
  static_assert(!std::is_same_v<T, bool>, "bool bytes are read raw and checked for 0/1");
  const auto bits = load_le<bits_t<T>>(p);
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(bits);  // two's complement reinterpretation
  } else {
    return Eigen::numext::bit_cast<T>(bits);
  }
}

// Encodes one element of type T; bool is stored as one byte 0 or 1.
template <class T>
void store_element(std::uint8_t* p, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    *p = v ? 1 : 0;
  } else if constexpr (std::is_integral_v<T>) {
    store_le<bits_t<T>>(p, static_cast<bits_t<T>>(v));
  } else {
    store_le<bits_t<T>>(p, Eigen::numext::bit_cast<bits_t<T>>(v));
  }
}

}  // namespace linen::io::detail

#endif  // LINEN_IO_DETAIL_BYTES_HPP

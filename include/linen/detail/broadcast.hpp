// SPDX-License-Identifier: Apache-2.0
// Internal: numpy broadcasting of a view (mask, bias) against a target shape.
#ifndef LINEN_DETAIL_BROADCAST_HPP
#define LINEN_DETAIL_BROADCAST_HPP

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"

namespace linen {
namespace detail {

// Element strides of `source` read as if it had `target`'s shape (numpy rules: align at the
// right, a dim of 1 repeats with stride 0, missing leading dims repeat). Throws
// std::invalid_argument naming both shapes when `source` does not broadcast to `target`.
inline std::vector<Index> broadcast_strides(const Shape& source, const Shape& target,
                                            const std::string& what) {
  const std::size_t r = target.size(), m = source.size();
  auto fail = [&] {
    return linen::invalid_argument(what + " of shape " + to_string(source) +
                                 " does not broadcast to shape " + to_string(target));
  };
  if (m > r) throw fail();
  std::vector<Index> strides(r, 0);
  Index stride = 1;
  for (std::size_t j = m; j-- > 0;) {
    const std::size_t i = j + (r - m);
    if (source[j] == target[i]) {
      strides[i] = target[i] == 1 ? 0 : stride;
    } else if (source[j] == 1) {
      strides[i] = 0;
    } else {
      throw fail();
    }
    stride *= source[j];
  }
  return strides;
}

// numpy's broadcast of two shapes; throws std::invalid_argument naming both.
inline Shape broadcast_shapes(const Shape& a, const Shape& b, const std::string& what) {
  const std::size_t r = std::max(a.size(), b.size());
  Shape out(r, 1);
  for (std::size_t i = 0; i < r; ++i) {
    const Index da = i + a.size() >= r ? a[i + a.size() - r] : 1;
    const Index db = i + b.size() >= r ? b[i + b.size() - r] : 1;
    if (da != db && da != 1 && db != 1)
      throw linen::invalid_argument(what + ": shapes " + to_string(a) + " and " + to_string(b) +
                                  " do not broadcast together");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Offset of every multi-index over the leading `lead` dims of `shape` (row-major order of
// those dims), given per-dim strides. Used to map a flat batch index to a broadcast source.
inline std::vector<Index> leading_offsets(const Shape& shape, const std::vector<Index>& strides,
                                          std::size_t lead) {
  Index count = 1;
  for (std::size_t i = 0; i < lead; ++i) count *= shape[i];
  std::vector<Index> out(static_cast<std::size_t>(count), 0);
  std::vector<Index> idx(lead, 0);
  for (Index n = 0; n < count; ++n) {
    Index off = 0;
    for (std::size_t i = 0; i < lead; ++i) off += idx[i] * strides[i];
    out[static_cast<std::size_t>(n)] = off;
    for (std::size_t i = lead; i-- > 0;) {  // odometer increment
      if (++idx[i] < shape[i]) break;
      idx[i] = 0;
    }
  }
  return out;
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_BROADCAST_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: axis arguments as JAX and Flax read them (negative axes count from the end;
// a set of axes is deduplicated and sorted, Flax's _canonicalize_axes), and the groups of
// elements a reduction over some axes sees (jax.nn.softmax's axis, RMSNorm's
// reduction_axes), over row-major memory.
#ifndef LINEN_DETAIL_AXES_HPP
#define LINEN_DETAIL_AXES_HPP

#include <algorithm>
#include <string>
#include <vector>

#include "../errors.hpp"
#include "../tensor.hpp"

namespace linen {
namespace detail {

inline std::string axes_string(const std::vector<int>& axes) {
  std::string s = "(";
  for (std::size_t i = 0; i < axes.size(); ++i) s += (i ? ", " : "") + std::to_string(axes[i]);
  return s + (axes.size() == 1 ? ",)" : ")");
}

// The axes made non-negative, deduplicated and sorted. Throws naming `what`, the axis and
// the shape when an axis lies outside [-rank, rank).
inline std::vector<int> canonicalize_axes(const std::vector<int>& axes, const Shape& shape, const std::string& what) {
  const int rank = static_cast<int>(shape.size());
  std::vector<int> out;
  out.reserve(axes.size());
  for (int a : axes) {
    if (a < -rank || a >= rank)
      throw linen::invalid_argument(what + ": axis " + std::to_string(a) + " is out of range for an input of shape " +
                                    to_string(shape) + " (rank " + std::to_string(rank) + ")");
    out.push_back(a < 0 ? a + rank : a);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// The elements of a row-major tensor of `shape` grouped for a reduction over `axes`
// (canonical: see canonicalize_axes): group g (g in [0, groups), row-major over the kept
// axes) holds the `size` elements at offsets base(g) + inner[k], k in row-major order over
// the reduced axes. When the reduced axes are the trailing ones, groups are contiguous
// rows: base(g) = g * size and inner[k] = k.
class AxisGroups {
 public:
  AxisGroups(const Shape& shape, const std::vector<int>& axes) {
    const int rank = static_cast<int>(shape.size());
    std::vector<Index> strides(static_cast<std::size_t>(rank), 1);
    for (int i = rank - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
    std::vector<bool> reduced(static_cast<std::size_t>(rank), false);
    for (int a : axes) reduced[static_cast<std::size_t>(a)] = true;
    std::vector<Index> rdims, rstrides;
    for (int i = 0; i < rank; ++i) {
      if (reduced[i]) {
        rdims.push_back(shape[i]);
        rstrides.push_back(strides[i]);
        size_ *= shape[i];
      } else {
        outer_dims_.push_back(shape[i]);
        outer_strides_.push_back(strides[i]);
        groups_ *= shape[i];
      }
    }
    contiguous_ = true;
    for (int i = 0; i < rank; ++i)
      if (reduced[i] && i + static_cast<int>(rdims.size()) < rank) contiguous_ = false;
    for (int i = rank - static_cast<int>(rdims.size()); i < rank; ++i)
      if (!reduced[i]) contiguous_ = false;
    inner_.resize(static_cast<std::size_t>(size_));
    std::vector<Index> idx(rdims.size(), 0);
    for (Index k = 0; k < size_; ++k) {
      Index off = 0;
      for (std::size_t d = 0; d < rdims.size(); ++d) off += idx[d] * rstrides[d];
      inner_[static_cast<std::size_t>(k)] = off;
      for (std::size_t d = rdims.size(); d-- > 0;) {
        if (++idx[d] < rdims[d]) break;
        idx[d] = 0;
      }
    }
  }

  Index groups() const { return size_ ? groups_ : 0; }
  Index size() const { return size_; }
  const std::vector<Index>& inner() const { return inner_; }
  Index base(Index g) const {
    if (contiguous_) return g * size_;
    Index off = 0;
    for (std::size_t i = outer_dims_.size(); i-- > 0;) {
      off += (g % outer_dims_[i]) * outer_strides_[i];
      g /= outer_dims_[i];
    }
    return off;
  }

 private:
  Index groups_ = 1, size_ = 1;
  bool contiguous_ = true;
  std::vector<Index> inner_, outer_dims_, outer_strides_;
};

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_AXES_HPP

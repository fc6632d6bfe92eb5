// SPDX-License-Identifier: Apache-2.0
// linen::compiled for Eigen::half, with Eigen::half and with float parameters: see
// instantiate.hpp.
#include "instantiate.hpp"

namespace linen {
LINEN_COMPILED_FOR_TYPE(Eigen::half)
LINEN_COMPILED_FOR_HALF_PAIR(Eigen::half, Eigen::half)
LINEN_COMPILED_FOR_HALF_PAIR(Eigen::half, float)
}  // namespace linen

// SPDX-License-Identifier: Apache-2.0
// linen::compiled for Eigen::bfloat16, with Eigen::bfloat16 and with float parameters: see
// instantiate.hpp.
#include "instantiate.hpp"

namespace linen {
LINEN_COMPILED_FOR_TYPE(Eigen::bfloat16)
LINEN_COMPILED_FOR_HALF_PAIR(Eigen::bfloat16, Eigen::bfloat16)
LINEN_COMPILED_FOR_HALF_PAIR(Eigen::bfloat16, float)
}  // namespace linen

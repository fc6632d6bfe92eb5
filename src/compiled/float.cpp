// SPDX-License-Identifier: Apache-2.0
// linen::compiled for float: see instantiate.hpp.
#include "instantiate.hpp"

namespace linen {
LINEN_COMPILED_FOR_TYPE(float)
LINEN_COMPILED_FOR_PAIR(float, float)
}  // namespace linen

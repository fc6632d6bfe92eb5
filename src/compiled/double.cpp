// SPDX-License-Identifier: Apache-2.0
// linen::compiled for double: see instantiate.hpp.
#include "instantiate.hpp"

namespace linen {
LINEN_COMPILED_FOR_TYPE(double)
LINEN_COMPILED_FOR_PAIR(double, double)
}  // namespace linen

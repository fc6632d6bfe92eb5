// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_PRECISION_HPP
#define LINEN_PRECISION_HPP

namespace linen {

// jax.lax.Precision. On CPU, XLA computes float32 dot products in float32 for every
// precision setting, and so does linen; half types always accumulate in float32. The field
// is kept so that a Flax configuration ports unchanged.
enum class Precision { Default, High, Highest };

}  // namespace linen

#endif  // LINEN_PRECISION_HPP

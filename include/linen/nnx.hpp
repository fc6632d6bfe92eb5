// SPDX-License-Identifier: Apache-2.0
//
// Flax NNX's modules and randomness (namespace linen::nnx): the headers under nnx/ in
// dependency order. Not included by linen.hpp (nnx is a second API next to flax.linen's);
// nnx state names on disk are io/nnx.hpp's.
#ifndef LINEN_NNX_HPP
#define LINEN_NNX_HPP

#include "nnx/rnglib.hpp"
#include "nnx/linear.hpp"
#include "nnx/normalization.hpp"
#include "nnx/stochastic.hpp"
#include "nnx/attention.hpp"
#include "nnx/grad.hpp"

#endif  // LINEN_NNX_HPP

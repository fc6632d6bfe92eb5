// SPDX-License-Identifier: Apache-2.0
//
// linen: Flax's attention layers for C++, on Eigen tensors.
// The umbrella header: includes the public headers in dependency order, nothing else.
// The file loaders (linen/io/...) are included separately: safetensors needs nlohmann_json,
// Orbax libzstd, Flax msgpack nothing more (the linen::io target links what was found).
#ifndef LINEN_LINEN_HPP
#define LINEN_LINEN_HPP

#include "version.hpp"
#include "config.hpp"
#include "errors.hpp"
#include "tensor.hpp"
#include "precision.hpp"
#include "dropout_rng.hpp"
#include "random.hpp"
#include "initializers.hpp"
#include "module.hpp"
#include "mask.hpp"
#include "dot_product_attention.hpp"
#include "jax_nn.hpp"
#include "dense.hpp"
#include "dense_layer.hpp"
#include "layer_norm.hpp"
#include "rms_norm.hpp"
#include "embed.hpp"
#include "dropout.hpp"
#include "activations.hpp"
#include "decode.hpp"
#include "attention.hpp"
#include "grad.hpp"
#include "jax_nn_grad.hpp"

#endif  // LINEN_LINEN_HPP

// linen: Flax's attention layers for C++ on Eigen tensors.
// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_VERSION_HPP
#define LINEN_VERSION_HPP

// The single source of the version: CMakeLists.txt reads these three lines.
#define LINEN_VERSION_MAJOR 0
#define LINEN_VERSION_MINOR 1
#define LINEN_VERSION_PATCH 0

#define LINEN_VERSION \
  (LINEN_VERSION_MAJOR * 10000 + LINEN_VERSION_MINOR * 100 + LINEN_VERSION_PATCH)

#endif  // LINEN_VERSION_HPP

// SPDX-License-Identifier: Apache-2.0
#ifndef LINEN_CONFIG_HPP
#define LINEN_CONFIG_HPP

#include <cstdlib>
#include <cstdio>

// LINEN_ASSERT checks internal invariants (never user input: that throws).
// Tests, or users, may define LINEN_ASSERT before including linen to throw
// instead of aborting.
#ifndef LINEN_ASSERT
#define LINEN_ASSERT(cond)                                                        \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "linen: internal invariant failed at %s:%d: %s\n",     \
                   __FILE__, __LINE__, #cond);                                    \
      std::abort();                                                               \
    }                                                                             \
  } while (false)
#endif

#endif  // LINEN_CONFIG_HPP

// SPDX-License-Identifier: Apache-2.0
//
// The autoregressive decode state of the attention modules (Flax's `cache` collection)
// and the reusable buffers of an allocation-free decode step:
//   AttentionCache<T>    cached_key, cached_value, cache_index: Flax's variables;
//   DecodeWorkspace<T>   buffers and validated shapes for decode_step, one per decoding
//                        thread;
//   rollback             the cache truncated back to an earlier cache_index (rejected
//                        speculative tokens).
// The modules' decode steps (MultiHeadDotProductAttention::apply with decode=true,
// ::decode_step, ::init_cache) are in attention.hpp; the step's machinery (writing the
// cache, undoing a failed step, the cache mask, the validated shapes) in detail/decode/.
#ifndef LINEN_DECODE_HPP
#define LINEN_DECODE_HPP

#include <algorithm>
#include <cstdint>
#include <string>

#include "detail/decode/workspace.hpp"
#include "errors.hpp"
#include "tensor.hpp"

namespace linen {

// cache: the autoregressive decode state. Flax's cached_key is [batch..., max_length,
// num_heads, head_dim]; linen keeps the same bytes with the batch dims flattened into one
// (`batch` remembers them, and prod(batch) must equal cached_key's first dim), so saving
// gives Flax's layout back.
template <class T>
struct AttentionCache {
  Shape batch;               // [batch...]
  Tensor<T, 4> cached_key;   // [prod(batch), max_length, num_heads, head_dim]
  Tensor<T, 4> cached_value; // [prod(batch), max_length, num_heads, head_dim]
  std::int32_t cache_index = 0;
  Index max_length() const { return cached_key.dimension(1); }
};

// Reusable buffers for MultiHeadDotProductAttention::decode_step (and SelfAttention's):
// the projections, the attention kernel's scratch and the shapes already validated. Keep
// one per decoding thread (a workspace is not thread-safe) and pass it to every step. Any
// modules and caches may share it: it remembers the last few (module, cache, parameter,
// mask) shapes it validated, so that steps alternating between caches of different
// max_length (or between modules) neither re-validate nor allocate; it grows to the
// largest step it has served.
// Where the parameters need promotion to T (param_dtype other than T, or half types: Flax
// casts the kernels to dtype, linen multiplies them in float), the workspace keeps each
// projection kernel promoted (4 x in x out values in accum_t<T>: 4 MiB at features 512),
// so a step reads the kernels once instead of converting them. A kept kernel is remade
// when its parameter tensor changes address or size, or when any of 64 values sampled
// across it changes. Contract: after changing parameter values in place in any other way
// (editing a few entries), call forget_parameters() before the next step. One set is
// kept: a workspace alternating between modules promotes again at each change.
template <class T>
class DecodeWorkspace {
 public:
  DecodeWorkspace() = default;

  // Drops the kept (promoted) kernels: the next step promotes the parameters again.
  void forget_parameters() {
    for (auto& k : state_.kept) k.forget();
  }

 private:
  friend struct detail::decode::Access;
  detail::decode::WorkspaceState<T> state_;
};

// Truncates `cache` to its first `cache_index` positions: the index set back and the
// slots [cache_index, old index) of every sequence zeroed, as init_cache made them. After
// a multi-token step (decode_chunk) whose tokens past the first `cache_index` were
// rejected, the cache is then byte for byte the one that took only the accepted tokens
// (cached_key, cached_value and cache_index), provided its slots past the index were
// zeros, as every cache init / init_cache makes and every step and rollback keeps. Throws
// linen::invalid_argument, the cache unchanged, unless 0 <= cache_index <= the current
// index (a rollback never moves forward). Allocates nothing unless it throws.
template <class T>
void rollback(AttentionCache<T>& cache, Index cache_index) {
  const Index cur = cache.cache_index, L = cache.max_length();
  if (cache_index < 0 || cache_index > cur || cur > L)
    throw linen::invalid_argument("linen: rollback to cache_index " + std::to_string(cache_index) +
                                  " of a cache at cache_index " + std::to_string(cur) + " (max_length " +
                                  std::to_string(L) + "): it must lie in [0, " + std::to_string(cur) +
                                  "]; the cache is unchanged");
  const Index B = cache.cached_key.dimension(0),
              F = cache.cached_key.dimension(2) * cache.cached_key.dimension(3);
  if (cache.cached_value.dimensions() != cache.cached_key.dimensions())  // (no allocation unless it throws)
    throw linen::invalid_argument("linen: rollback: cached_value has shape " + to_string(shape_of(cache.cached_value)) +
                                  ", cached_key " + to_string(shape_of(cache.cached_key)) + "; the cache is unchanged");
  for (Tensor<T, 4>* t : {&cache.cached_key, &cache.cached_value})
    for (Index b = 0; b < B; ++b) std::fill(t->data() + (b * L + cache_index) * F, t->data() + (b * L + cur) * F, T(0));
  cache.cache_index = static_cast<std::int32_t>(cache_index);
}

namespace detail {
namespace decode {
struct Access {
  template <class T>
  static WorkspaceState<T>& state(DecodeWorkspace<T>& w) {
    return w.state_;
  }
};
}  // namespace decode
}  // namespace detail

}  // namespace linen

#endif  // LINEN_DECODE_HPP

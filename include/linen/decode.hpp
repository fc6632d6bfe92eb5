// SPDX-License-Identifier: Apache-2.0
//
// The autoregressive decode state of the attention modules (Flax's `cache` collection)
// and the reusable buffers of an allocation-free decode step:
//   AttentionCache<T>    cached_key, cached_value, cache_index: Flax's variables;
//   DecodeWorkspace<T>   buffers and validated shapes for decode_step, one per decoding
//                        thread.
// The modules' decode steps (MultiHeadDotProductAttention::apply with decode=true,
// ::decode_step, ::init_cache) are in attention.hpp; the step's machinery (writing the
// cache, undoing a failed step, the cache mask, the validated shapes) in detail/decode/.
#ifndef LINEN_DECODE_HPP
#define LINEN_DECODE_HPP

#include <cstdint>

#include "detail/decode/workspace.hpp"
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

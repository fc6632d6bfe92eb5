// SPDX-License-Identifier: Apache-2.0
// Internal: what an attention module's forward records for its vjp (grad.hpp), when the
// caller hands it a tape. The forward is the module's own (apply's code, its checks and
// its kernels), so the output it returns alongside the tape is apply's, bit for bit.
// The tape keeps what is O(batch x length x features): the inputs as the projections read
// them, the projected q, k, v (and q, k before normalize_qk's LayerNorm), the attention
// output, the mask as the attention saw it and the dropout keep mask it drew. Never the
// batch x heads x q_length x kv_length weights: the backward recomputes them.
#ifndef LINEN_DETAIL_ATTENTION_TAPE_HPP
#define LINEN_DETAIL_ATTENTION_TAPE_HPP

#include "../tensor.hpp"

namespace linen {
namespace detail {

template <class T>
struct AttentionTape {
  // Set by the caller before the forward: how many distinct inputs to keep (1: k = v = q;
  // 2: v = k; 3: q, k, v distinct).
  int inputs = 1;

  // Filled by the forward.
  Index B = 0, Lq = 0, Lk = 0, H = 0, head_dim = 0;  // batch flattened into B
  Index fq = 0, fk = 0, fv = 0, fo = 0;              // feature sizes
  Shape xs_q, xs_k, xs_v, ys;                        // the caller's input and output shapes
  Tensor<T, 2> xq, xk, xv;      // inputs cast to T, [B * L, F] (xk, xv only when distinct)
  Tensor<T, 4> q_pre, k_pre;    // the projections before normalize_qk's LayerNorm
  Tensor<T, 4> q, k, v;         // what the attention saw, [B, L, heads, head_dim]
  Tensor<T, 4> x;               // the attention output [B, Lq, heads, head_dim]
  Tensor<bool, 4> mask;         // [B|1, H|1, Lq|1, Lk|1] (size 0: no mask)
  Tensor<bool, 1> keep;         // the dropout keep mask drawn (size 0: no dropout)
  bool use_bias = true, normalize_qk = false, broadcast_dropout = true, fp32_softmax = false;
  double dropout_rate = 0.0;
};

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_TAPE_HPP

// SPDX-License-Identifier: Apache-2.0
// Internal: what an attention module's forward records for its vjp (grad.hpp), when the
// caller hands it a tape. The forward is the module's own (apply's code, its checks and
// its kernels), so the output it returns alongside the tape is apply's, bit for bit.
// The tape keeps what is O(batch x length x features): the inputs as the projections read
// them, the projected q, k, v (and q, k before normalize_qk's LayerNorm), the attention
// output, the mask as the attention saw it and the dropout keep mask it drew, and (for the
// fused backward) the softmax row statistics the forward kernel wrote while making the
// output. Never the batch x heads x q_length x kv_length weights: the backward recomputes
// them. problem() is the attention problem the tape describes, for the gradient kernels.
// A tape may be recorded again (vjp_into's, in a GradWorkspace): clear() forgets what the
// last forward recorded and keeps the memory, so a forward of the same shapes reuses it.
#ifndef LINEN_DETAIL_ATTENTION_TAPE_HPP
#define LINEN_DETAIL_ATTENTION_TAPE_HPP

#include <array>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"
#include "attention/policy.hpp"
#include "attention/problem.hpp"
#include "mask_plan.hpp"

namespace linen {
namespace detail {

template <class T>
struct AttentionTape {
  using C = accum_t<T>;
  // Set by the caller before the forward: how many distinct inputs to keep (1: k = v = q;
  // 2: v = k; 3: q, k, v distinct), and whether to keep the row statistics (the fused
  // backward's; the forward is then the fused kernel, as apply's is without sowing).
  int inputs = 1;
  bool stats = false;

  // Filled by the forward.
  Index B = 0, Lq = 0, Lk = 0, H = 0, head_dim = 0;  // batch flattened into B
  Index fq = 0, fk = 0, fv = 0, fo = 0;              // feature sizes
  Shape xs_q, xs_k, xs_v, ys;                        // the caller's input and output shapes
  Tensor<T, 2> xq, xk, xv;      // inputs cast to T, [B * L, F] (xk, xv only when distinct)
  Tensor<T, 4> q_pre, k_pre;    // the projections before normalize_qk's LayerNorm
  Tensor<T, 4> q, k, v;         // what the attention saw, [B, L, heads, head_dim]
  Tensor<T, 4> x;               // the attention output [B, Lq, heads, head_dim]
  Tensor<bool, 4> mask;         // [B|1, H|1, Lq|1, Lk|1], when `masked`
  Tensor<bool, 1> keep;         // the dropout keep mask drawn, when `dropped`
  bool masked = false, dropped = false;  // set by the forward that records them
  // With `stats`: the softmax's row max and denominator [B, H, Lq] (AttentionProblem's
  // row_max, row_sum) and, for half types, x before its rounding to T (size 0 otherwise).
  Tensor<C, 1> row_max, row_sum;
  Tensor<C, 4> x_acc;
  bool use_bias = true, normalize_qk = false, broadcast_dropout = true, fp32_softmax = false;
  double dropout_rate = 0.0;

  // Before recording another forward: what only some forwards record is marked absent
  // (the buffers stay, to be reused).
  void clear() {
    masked = false;
    dropped = false;
  }

  // The attention problem the tape records (batch flattened into B; the mask as the
  // forward attended with it, its keep mask), for the gradient kernels on `pool`.
  // (batch left empty: the kernels read B; filling it would allocate on every pullback)
  AttentionDims dims() const {
    AttentionDims d;
    d.B = B;
    d.Lq = Lq;
    d.Lk = Lk;
    d.H = H;
    d.D = d.Dv = head_dim;
    return d;
  }
  AttentionProblem<T> problem(Eigen::ThreadPoolInterface* pool) const {
    const AttentionDims d = dims();
    AttentionProblem<T> a = flax_problem<T>(d, q.data(), k.data(), v.data(), nullptr);
    if (masked) {
      const auto& md = mask.dimensions();
      a.mask = mask_view(mask.data(), std::array<Index, 4>{md[0], md[1], md[2], md[3]});
    }
    if (dropped) {
      a.keep = keep_view(keep.data(), d, broadcast_dropout);
      a.keep_scale = flax_keep_scale<T>(dropout_rate);
    }
    a.fp32_softmax = fp32_softmax;
    a.pool = pool;
    return a;
  }
};

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_TAPE_HPP

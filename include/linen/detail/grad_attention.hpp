// SPDX-License-Identifier: Apache-2.0
// Internal: the attention core's gradient kernels as grad.hpp calls them. The kernels
// themselves live in attention/backward.hpp (on AttentionProblem, with the logit policy);
// the forward the fused backward needs is fused_attention with its row statistics. This
// header adds AttentionCore, the Flax-layout form of a problem (mask and bias as
// ArrayRef, the keep mask as drawn) that the module vjp builds, and the overloads that
// take it.
#ifndef LINEN_DETAIL_GRAD_ATTENTION_HPP
#define LINEN_DETAIL_GRAD_ATTENTION_HPP

#include <string>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"
#include "attention/backward.hpp"
#include "attention/policy.hpp"
#include "attention/problem.hpp"
#include "fused_attention.hpp"
#include "parallel.hpp"

namespace linen {
namespace detail {

// One attention problem in Flax's layouts (batch dims flattened into d.B), as the module
// vjp's tape holds it. attention_problem() turns it into the kernels' AttentionProblem.
template <class T>
struct AttentionCore {
  AttentionDims d;             // d.batch: the caller's batch dims (masks and biases broadcast over them)
  const T* query = nullptr;    // [B, Lq, H, D]
  const T* key = nullptr;      // [B, Lk, H, D]
  const T* value = nullptr;    // [B, Lk, H, Dv]
  ArrayRef<T> bias{};          // broadcastable to [batch..., H, Lq, Lk]
  ArrayRef<bool> mask{};       // broadcastable to [batch..., H, Lq, Lk]
  const bool* keep = nullptr;  // the dropout keep mask drawn by the forward; null: no dropout
  bool broadcast_dropout = true;  // keep is [Lq, Lk] (else [B, H, Lq, Lk])
  double dropout_rate = 0.0;
  bool fp32_softmax = false;   // half types: weights kept in float (force_fp32_for_softmax)
  bool causal = false;         // AttentionOptions::is_causal: key j is visible to query i iff j <= i
};

// An AttentionProblem (Flax's layout and numbers) with the broadcast tables its mask and
// bias views point into: keep it alive while the problem is used.
template <class T>
struct FlaxAttentionProblem {
  Broadcast<T> bias;
  Broadcast<bool> mask;
  AttentionProblem<T> problem;

  // `out`: the forward's output (null for a backward). Throws naming `fn` when the mask or
  // bias does not broadcast.
  FlaxAttentionProblem(const AttentionDims& d, const T* query, const T* key, const T* value, T* out,
                       const ArrayRef<T>& bias_ref, const ArrayRef<bool>& mask_ref, const std::string& fn)
      : bias(bias_ref, d, (fn + ": bias").c_str()),
        mask(mask_ref, d, (fn + ": mask").c_str()),
        problem(flax_problem(d, query, key, value, out)) {
    problem.bias = bias.view();
    problem.mask = mask.view();
  }
  FlaxAttentionProblem(const FlaxAttentionProblem&) = delete;
  FlaxAttentionProblem& operator=(const FlaxAttentionProblem&) = delete;
  // Flax's dropout: the keep mask as drawn (bytes 0/1), keep / keep_prob.
  void set_dropout(const bool* keep, const AttentionDims& d, bool broadcast_dropout, double dropout_rate) {
    if (!keep) return;
    problem.keep = keep_view(keep, d, broadcast_dropout);
    problem.keep_scale = flax_keep_scale<T>(dropout_rate);
  }
};

// The kernels' problem for `core` (pool: the fused kernels' threads).
template <class T>
struct CoreProblem : FlaxAttentionProblem<T> {
  CoreProblem(const AttentionCore<T>& c, T* out, Eigen::ThreadPoolInterface* pool, const std::string& fn)
      : FlaxAttentionProblem<T>(c.d, c.query, c.key, c.value, out, c.bias, c.mask, fn) {
    this->set_dropout(c.keep, c.d, c.broadcast_dropout, c.dropout_rate);
    this->problem.fp32_softmax = c.fp32_softmax;
    this->problem.causal = c.causal;
    this->problem.pool = pool;
  }
};

// attention_backward_reference (backward.hpp) on `core`.
template <class T>
void attention_backward_reference(const AttentionCore<T>& core, const T* dout, T* dq, T* dk, T* dv,
                                  accum_t<T>* dbias, const std::string& fn) {
  const CoreProblem<T> p(core, nullptr, nullptr, fn);
  attention_backward_reference<FlaxLogits<T>>(p.problem, dout, dq, dk, dv, dbias);
}

// The forward of the fused backward: fused_attention on `core`, writing out [B, Lq, H, Dv]
// (T), the unrounded output in C when `out_acc` is set (for the backward's rowsum(dO * O)
// when T is a half type), and the row statistics m, l [B, H, Lq]. A fully masked row keeps
// m = finfo.min, l = Lk: its weights exp(s - m) / l = 1 / Lk are Flax's uniform average (m
// + log l would round back to finfo.min and lose them, which is why the two parts are kept
// apart). It is dot_product_attention's fused forward, so its output has that path's bits;
// block_q and block_k tile only the backward.
template <class T>
void attention_forward_fused(const AttentionCore<T>& core, T* out, accum_t<T>* out_acc, accum_t<T>* row_max,
                             accum_t<T>* row_sum, Index block_q, Index block_k, Eigen::ThreadPoolInterface* pool,
                             const std::string& fn) {
  (void)block_q;
  (void)block_k;
  CoreProblem<T> p(core, out, pool, fn);
  p.problem.out_acc = out_acc;
  p.problem.row_max = row_max;
  p.problem.row_sum = row_sum;
  fused_attention<T>(p.problem);
}

// attention_backward_fused (backward.hpp) on `core`.
template <class T>
void attention_backward_fused(const AttentionCore<T>& core, const accum_t<T>* out, const accum_t<T>* row_max,
                              const accum_t<T>* row_sum, const T* dout, T* dq, T* dk, T* dv, accum_t<T>* dbias,
                              Index block_q, Index block_k, Eigen::ThreadPoolInterface* pool, const std::string& fn) {
  const CoreProblem<T> p(core, nullptr, pool, fn);
  attention_backward_fused<FlaxLogits<T>>(p.problem, out, row_max, row_sum, dout, dq, dk, dv, dbias, block_q, block_k);
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GRAD_ATTENTION_HPP

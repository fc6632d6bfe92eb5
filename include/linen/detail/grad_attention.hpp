// SPDX-License-Identifier: Apache-2.0
// Internal: the attention core's gradient kernels as grad.hpp calls them. The kernels
// themselves live in attention/backward.hpp (on AttentionProblem, with the logit policy);
// the forward the fused backward needs is fused_attention with its row statistics. This
// header adds FlaxAttentionProblem: dot_product_attention_vjp's problem with the
// broadcast tables of its ArrayRef mask and bias (a module's vjp reads its problem off
// its tape, attention_tape.hpp).
#ifndef LINEN_DETAIL_GRAD_ATTENTION_HPP
#define LINEN_DETAIL_GRAD_ATTENTION_HPP

#include <string>

#include "../tensor.hpp"
#include "attention/backward.hpp"
#include "attention/policy.hpp"
#include "attention/problem.hpp"
#include "parallel.hpp"

namespace linen {
namespace detail {

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

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_GRAD_ATTENTION_HPP

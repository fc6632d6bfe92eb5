// SPDX-License-Identifier: Apache-2.0
//
// Internal: one attention problem as every attention kernel reads it (the tiled and row
// forward kernels, the reference and fused backward): AttentionProblem<T>, the one
// descriptor. Tensors are addressed through element strides over (batch, position, head)
// with a contiguous depth axis; masks, biases and dropout keep masks through
// AttentionView (numpy broadcasting resolved to strides). flax_layout fills the strides of
// Flax's [batch..., L, heads, depth] layout, the one every public entry point uses.
#ifndef LINEN_DETAIL_ATTENTION_PROBLEM_HPP
#define LINEN_DETAIL_ATTENTION_PROBLEM_HPP

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../../tensor.hpp"
#include "../broadcast.hpp"
#include "policy.hpp"

namespace linen {
namespace detail {

// Validated dimensions of one attention problem, batch dims flattened.
struct AttentionDims {
  Shape batch;              // batch dims [batch...]
  Index B = 1;              // prod(batch)
  Index Lq = 0, Lk = 0, H = 0, D = 0, Dv = 0;
  Shape weights_shape() const {
    Shape s = batch;
    s.insert(s.end(), {H, Lq, Lk});
    return s;
  }
  Shape output_shape() const {
    Shape s = batch;
    s.insert(s.end(), {Lq, H, Dv});
    return s;
  }
};

// A mask, bias or dropout keep mask read as if it had shape [B, H, Lq, Lk]. Element
// (b, h, i, j) is at data[offset(b) + h*sh + i*sq + j*sk], offset(b) = batch_offset[b]
// when batch_offset is set (numpy broadcasting over several batch dims), else b*sb.
// `size`: the elements of the array viewed (the shape of a gradient accumulator for it;
// 0 when not known, as for masks).
template <class X>
struct AttentionView {
  const X* data = nullptr;
  const Index* batch_offset = nullptr;
  Index sb = 0, sh = 0, sq = 0, sk = 0;
  Index size = 0;
  explicit operator bool() const { return data != nullptr; }
  const X* row(Index b, Index h, Index i) const {
    return data + (batch_offset ? batch_offset[b] : b * sb) + h * sh + i * sq;
  }
  // Offset of row (b, h, i) in the viewed array.
  Index offset(Index b, Index h, Index i) const { return row(b, h, i) - data; }
};

// A mask or bias (ArrayRef) broadcast to the weights' shape [batch..., H, Lq, Lk]: owns
// the per-batch offsets its view points into (so it must outlive the view). Throws
// linen::invalid_argument naming both shapes when the array does not broadcast.
template <class X>
struct Broadcast {
  const X* data = nullptr;
  std::vector<Index> batch_offset;  // per flat batch index
  Index sh = 0, sq = 0, sk = 0;     // strides over heads, queries, keys
  Index size = 0;

  Broadcast(const ArrayRef<X>& ref, const AttentionDims& d, const char* what) {
    if (!ref) return;
    const Shape w = d.weights_shape();
    const std::vector<Index> s = broadcast_strides(ref.shape(), w, what);
    const std::size_t nb = d.batch.size();
    data = ref.data();
    batch_offset = leading_offsets(w, s, nb);
    sh = s[nb];
    sq = s[nb + 1];
    sk = s[nb + 2];
    size = num_elements(ref.shape());
  }
  explicit operator bool() const { return data != nullptr; }
  // Pointer to row (b, h, i); element j is at [j * sk].
  const X* row(Index b, Index h, Index i) const {
    return data + batch_offset[static_cast<std::size_t>(b)] + h * sh + i * sq;
  }
  AttentionView<X> view() const {
    AttentionView<X> v;
    if (!data) return v;
    v.data = data;
    v.batch_offset = batch_offset.data();
    v.sh = sh;
    v.sq = sq;
    v.sk = sk;
    v.size = size;
    return v;
  }
};

// Tuning of the forward kernels, 0 = automatic (from the cache sizes and the thread count).
struct AttentionTuning {
  Index tile_keys = 0;     // keys per tile
  Index tile_queries = 0;  // query rows per work item (tiled path)
  Index chunk_keys = 0;    // keys per work item (row path)
  int path = 0;            // 1: tiled path, 2: row path (default: rows for 1 or 2 queries)
};

template <class C>
struct RowScratch;
template <class C>
struct TiledScratch;
template <class C>
struct BackwardScratch;

// One attention problem. Every tensor is addressed through element strides over (batch,
// position, head) with a contiguous depth axis, so Flax's [batch, L, heads, depth]
// (strides L*H*D, H*D, D) and head-major [batch, heads, L, depth] (strides H*L*D, D, L*D)
// layouts are both read in place. A gradient tensor (the output's cotangent, dq, dk, dv)
// has its primal's strides. The numbers (query_scale, keep_scale, fp32_softmax) are the
// logit policy's parameters (attention/policy.hpp), whose rules every kernel applies.
template <class T>
struct AttentionProblem {
  Index B = 1, H = 1, Lq = 0, Lk = 0, D = 0, Dv = 0;
  const T* query = nullptr;  // [B, Lq, H, D] through q_sb, q_sl, q_sh
  Index q_sb = 0, q_sl = 0, q_sh = 0;
  const T* key = nullptr;    // [B, Lk, H, D]
  Index k_sb = 0, k_sl = 0, k_sh = 0;
  const T* value = nullptr;  // [B, Lk, H, Dv]
  Index v_sb = 0, v_sl = 0, v_sh = 0;
  T* out = nullptr;          // [B, Lq, H, Dv], written by the forward
  Index o_sb = 0, o_sl = 0, o_sh = 0;
  T query_scale = T(1);      // the policy's scale (Flax: the query is divided by sqrt(depth) in dtype)
  AttentionView<T> bias;     // added to the logits
  AttentionView<bool> mask;  // false = masked out
  AttentionView<bool> keep;  // dropout keep mask (weights of dropped entries become 0)
  accum_t<T> keep_scale = 1; // kept weights are multiplied by it when `keep` is set (1/keep_prob)
  // Half types: the reference and the backward keep the softmax weights in float
  // (force_fp32_for_softmax) instead of rounding them to T; the fused forward always does.
  bool fp32_softmax = false;
  bool causal = false;       // key j is visible to query i only if j <= i + causal_offset_of(b)
  Index causal_offset = 0;
  // Per-sequence offsets, [B] (null: causal_offset for every b): sequences at their own
  // positions (a ragged decode step: row i of sequence b is position causal_offsets[b] + i).
  const std::int32_t* causal_offsets = nullptr;
  // false: keys past the diagonal are masked keys as Flax's causal mask makes them (their
  // zero weights still meet their values, so an inf or NaN value there makes the row
  // NaN); true: they are not part of the problem and are never read (a decode step's
  // positions past the cache index).
  bool causal_hides_values = false;
  // The logits are multiplied by it after the product, in the accumulation type (the
  // policy's scale: jax.nn's `logits *= jnp.array(scale, logits.dtype)`; Flax: unused).
  accum_t<T> logit_scale = 1;
  // Index rules beyond Flax's (jax.nn.dot_product_attention's), read by the forward kernels
  // and the fused backward under any policy; every one off by default (the reference
  // backward does not take them).
  //   kv_group: grouped-query attention. K and V have H / kv_group heads (their strides
  //     address kv heads); query head h reads kv head h / kv_group. No copy is made.
  //   windowed: a key band, key j visible to query i only if
  //     i - window_left <= j <= i + window_right (with `causal` too: both hold).
  //   kv_len: [B] (null: none); keys j >= kv_len[b] are masked (as a mask makes them).
  //   q_len: [B] (null: none); query rows i >= q_len[b] are masked everywhere and their
  //     output is 0 times that row: 0, or NaN in a column where a value of the row's kv
  //     head is inf or NaN (0 * the average of the values); row_max, row_sum those of a
  //     fully masked row (mask_value(), Lk). The tiled kernel never computes them; the
  //     row kernel (one or two rows) computes and then overwrites them.
  // Lengths are within [0, Lq] and [0, Lk] (the caller validates them).
  Index kv_group = 1;
  bool windowed = false;
  Index window_left = 0, window_right = 0;
  const std::int32_t* q_len = nullptr;
  const std::int32_t* kv_len = nullptr;
  // Paged K and V (a block pool, linen::PagedCache): null block_table = the strides
  // above (k_sb, v_sb). Else key position j of batch b lies in block
  // block_table[b * table_stride + j / block_size] of the pool `key` / `value`, row
  // j % block_size: its row is key + (block * block_size + j % block_size) * k_sl (k_sb,
  // v_sb unused), read in place. The table covers keys [0, Lk) with valid blocks. The
  // kernels walk a tile's keys in runs within one block (kv_run) with the arithmetic of
  // the contiguous path, so a paged problem's result is the contiguous one's bit for bit.
  const std::int32_t* block_table = nullptr;
  Index table_stride = 0, block_size = 0;
  // The fused backward splits its work by the problem alone (attention/backward.hpp:
  // results equal for every thread count; jax_nn's vjp); false: one part per thread of
  // `pool` (the Flax path's split, kept as its gradients were made).
  bool backward_fixed_split = false;
  // Runs the work items on pool->NumThreads() threads, the calling thread being one of
  // them; null: the calling thread only.
  Eigen::ThreadPoolInterface* pool = nullptr;
  AttentionTuning tuning{};
  // Buffers for the row (decode) kernel, kept by the caller between calls: once grown to
  // the problem's size, a call without a pool allocates nothing. null: local buffers.
  RowScratch<accum_t<T>>* row_scratch = nullptr;
  // The same for the tiled kernel (its per-worker state and its mask and value tables).
  TiledScratch<accum_t<T>>* tiled_scratch = nullptr;
  // The same for the fused backward (attention/backward.hpp: its per-worker tiles).
  BackwardScratch<accum_t<T>>* backward_scratch = nullptr;
  // What the backward needs from the forward, written when set (null: not wanted):
  // the softmax's row max m and denominator l = sum_j exp(s_j - m) (before dropout),
  // [B, H, Lq] row-major, so that the weights are exp(s - m) / l; and the output before its
  // rounding to T (out's strides), for the backward's rowsum(dO * O).
  accum_t<T>* row_max = nullptr;
  accum_t<T>* row_sum = nullptr;
  accum_t<T>* out_acc = nullptr;

  // --- the index rules, stated once for every kernel ---
  bool has_index_rules() const {
    return kv_group != 1 || windowed || q_len || kv_len || causal_offsets || block_table;
  }
  // The causal flag, the window or the key lengths cut rows' keys (a band per row).
  bool banded() const { return causal || windowed || kv_len; }
  Index kv_head(Index h) const { return h / kv_group; }
  Index causal_offset_of(Index b) const { return causal_offsets ? Index{causal_offsets[b]} : causal_offset; }
  // The pool row (first head) of key position j of batch b: the block table's, or b's stride.
  Index kv_position(Index b, Index j) const {
    return block_table ? Index{block_table[b * table_stride + j / block_size]} * block_size + j % block_size : j;
  }
  const T* key_at(Index b, Index j) const {
    return block_table ? key + kv_position(b, j) * k_sl : key + b * k_sb + j * k_sl;
  }
  const T* value_at(Index b, Index j) const {
    return block_table ? value + kv_position(b, j) * v_sl : value + b * v_sb + j * v_sl;
  }
  const T* key_row(Index b, Index j, Index h) const { return key_at(b, j) + kv_head(h) * k_sh; }
  const T* value_row(Index b, Index j, Index h) const { return value_at(b, j) + kv_head(h) * v_sh; }
  // How many keys from j on lie at the row stride (k_sl, v_sl) from key j: the rest of
  // j's block when paged, all of them else.
  Index kv_run(Index j) const { return block_table ? block_size - j % block_size : Lk - j; }
  // A cursor over the rows of batch b's positions visited in increasing order (a key by
  // key loop): walk(w, j) is the element offset of j's row from key (key_walk) or value
  // (value_walk), found with one block-table lookup per block and a stride add per
  // position (no division per key).
  struct Walk {
    Index b = 0, sb = 0, sl = 0;
    Index pos = -2, end = 0, off = 0;
  };
  Walk key_walk(Index b) const { return Walk{b, k_sb, k_sl}; }
  Walk value_walk(Index b) const { return Walk{b, v_sb, v_sl}; }
  Index walk(Walk& w, Index j) const {
    if (j == w.pos + 1 && j < w.end) {
      w.off += w.sl;
    } else {
      w.off = block_table ? kv_position(w.b, j) * w.sl : w.b * w.sb + j * w.sl;
      w.end = j + kv_run(j);
    }
    w.pos = j;
    return w.off;
  }
  // Query rows of batch b that are computed (the others: q_len).
  Index q_rows(Index b) const { return q_len ? std::min<Index>(Lq, q_len[b]) : Lq; }
  Index kv_keys(Index b) const { return kv_len ? std::min<Index>(Lk, kv_len[b]) : Lk; }
  // Row i of batch b sees keys [band_begin(i), band_end(b, i)) (before the mask): both
  // ends non-decreasing in i, so the keys a block of rows sees lie in
  // [band_begin(first row), band_end(last row)).
  Index band_begin(Index i) const { return windowed ? std::max<Index>(0, i - window_left) : 0; }
  Index band_end(Index b, Index i) const {
    Index e = kv_keys(b);
    if (causal) e = std::min(e, std::max<Index>(0, i + causal_offset_of(b) + 1));
    if (windowed) e = std::min(e, std::max<Index>(0, i + window_right + 1));
    return e;
  }
  bool in_band(Index b, Index i, Index j) const { return j >= band_begin(i) && j < band_end(b, i); }
};

// The strides of Flax's layouts for dims d: q [B, Lq, H, D], k [B, Lk, H, D],
// v [B, Lk, H, Dv], out [B, Lq, H, Dv], all contiguous; the dims of `d` (batch dims
// flattened). The one place that states Flax's layout for the kernels.
template <class T>
void flax_layout(AttentionProblem<T>& a, const AttentionDims& d, const T* query, const T* key, const T* value,
                 T* out) {
  a.B = d.B;
  a.H = d.H;
  a.Lq = d.Lq;
  a.Lk = d.Lk;
  a.D = d.D;
  a.Dv = d.Dv;
  a.query = query;
  a.q_sb = d.Lq * d.H * d.D;
  a.q_sl = d.H * d.D;
  a.q_sh = d.D;
  a.key = key;
  a.k_sb = d.Lk * d.H * d.D;
  a.k_sl = d.H * d.D;
  a.k_sh = d.D;
  a.value = value;
  a.v_sb = d.Lk * d.H * d.Dv;
  a.v_sl = d.H * d.Dv;
  a.v_sh = d.Dv;
  a.out = out;
  a.o_sb = d.Lq * d.H * d.Dv;
  a.o_sl = d.H * d.Dv;
  a.o_sh = d.Dv;
}

// A problem over Flax's layouts (flax_layout) with Flax's query scale, sqrt(depth) in
// dtype: what every public entry point starts from (then sets the mask, bias, dropout,
// causal flag, pool).
template <class T>
AttentionProblem<T> flax_problem(const AttentionDims& d, const T* query, const T* key, const T* value, T* out) {
  AttentionProblem<T> a;
  flax_layout(a, d, query, key, value, out);
  a.query_scale = depth_scale<T>(d.D);
  return a;
}

// The view of Flax's dropout keep mask as drawn (bytes 0/1): [Lq, Lk] with
// broadcast_dropout (shared by the batch and the heads), else [B, H, Lq, Lk].
inline AttentionView<bool> keep_view(const bool* keep, const AttentionDims& d, bool broadcast_dropout) {
  const Index plane = d.Lq * d.Lk;
  AttentionView<bool> v;
  v.data = keep;
  v.sb = broadcast_dropout ? 0 : d.H * plane;
  v.sh = broadcast_dropout ? 0 : plane;
  v.sq = d.Lk;
  v.sk = 1;
  v.size = broadcast_dropout ? plane : d.B * d.H * plane;
  return v;
}

// Whether heads (b, h), and key groups when `key_groups`, can add into one gradient of
// the viewed array (a bias) without two workers touching the same element: true when it
// has its own batch and head dims (no broadcasting over them) and, with key groups, its
// own key dim.
template <class X>
bool view_rows_disjoint(const AttentionView<X>& v, Index B, Index H, Index Lk, bool key_groups) {
  if (B > 1) {
    if (v.batch_offset) {
      std::vector<Index> offsets(v.batch_offset, v.batch_offset + B);
      std::sort(offsets.begin(), offsets.end());
      if (std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end()) return false;
    } else if (v.sb == 0) {
      return false;
    }
  }
  if (H > 1 && v.sh == 0) return false;
  if (key_groups && Lk > 1 && v.sk == 0) return false;
  return true;
}

// The names the modules used before the descriptor was one type (kept for them).
template <class X>
using FusedView = AttentionView<X>;
using FusedTuning = AttentionTuning;
template <class T>
using FusedAttentionArgs = AttentionProblem<T>;

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_ATTENTION_PROBLEM_HPP

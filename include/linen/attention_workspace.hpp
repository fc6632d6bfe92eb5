// SPDX-License-Identifier: Apache-2.0
//
// Reusable memory for the attention modules' forward (attention.hpp):
//   AttentionWorkspace<T>     the buffers of MultiHeadDotProductAttention::apply_into (and
//                             SelfAttention's): the projections, the attention output, a
//                             gathered mask, the dropout keep mask, the kernels' scratch,
//                             and the shapes already validated. One per thread (a
//                             workspace is not thread-safe), as DecodeWorkspace.
//   release_thread_scratch()  frees the calling thread's kept scratch (below).
//
// A plain apply() (no workspace passed) uses a workspace the library keeps per thread
// (thread_local, one per element type), so a loop of apply() calls allocates only the
// tensor it returns: fresh pages cost more than the attention itself on many machines
// (glibc returns large freed blocks to the system). That memory is never shared between
// threads; a nested call on the same thread (from a dropout_rng callback, say) uses a
// workspace of its own for the call. It is released when the thread exits, by
// release_thread_scratch(), and after any call that leaves it holding more than
// LINEN_THREAD_SCRATCH_MAX_BYTES (default 64 MiB per element type and thread; define the
// macro before including linen to change it, 0 keeps nothing between calls).
#ifndef LINEN_ATTENTION_WORKSPACE_HPP
#define LINEN_ATTENTION_WORKSPACE_HPP

#include <array>
#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "dense.hpp"  // DenseScratch
#include "detail/fused_attention.hpp"  // RowScratch, TiledScratch
#include "detail/mask_plan.hpp"
#include "tensor.hpp"

#ifndef LINEN_THREAD_SCRATCH_MAX_BYTES
#define LINEN_THREAD_SCRATCH_MAX_BYTES (std::size_t{64} << 20)
#endif

namespace linen {
namespace detail {

template <class V>
std::size_t capacity_bytes(const V& v) {
  return v.capacity() * sizeof(typename V::value_type);
}

// The buffers of one module forward that attends in place (the default attention_fn,
// not sowing): each grows to the largest call it has served and is reused after.
template <class T>
struct ForwardScratch {
  using C = accum_t<T>;
  std::vector<T> q, k, v;          // projections [B, L, heads, head_dim]
  std::vector<T> x;                // the attention output [B, q_length, heads, head_dim]
  std::vector<unsigned char> mask; // a gathered mask (MaskPlan with offsets)
  std::vector<unsigned char> keep; // the dropout keep mask, bytes 0/1
  Shape keep_shape;                // the shape Flax draws it at
  DenseScratch<C> dense;           // half types' promoted copies
  TiledScratch<C> tiled;           // the tiled kernel's
  RowScratch<C> row;               // the row kernel's (one or two query rows)

  std::size_t bytes() const {
    return capacity_bytes(q) + capacity_bytes(k) + capacity_bytes(v) + capacity_bytes(x) + capacity_bytes(mask) +
           capacity_bytes(keep) + capacity_bytes(keep_shape) + capacity_bytes(dense.x) + capacity_bytes(dense.kernel) +
           capacity_bytes(dense.acc) + tiled.bytes() + capacity_bytes(row.storage) + capacity_bytes(row.skipped) +
           capacity_bytes(row.uses);
  }
};

// One validated forward: every shape and configuration field the forward's checks read
// (the signature), and what they found.
struct ForwardShapes {
  std::vector<Index> signature;
  MaskPlan mask;                    // the mask at rank 4 (dims), gathered when offsets is set
  Shape batch, ys;                  // the caller's batch dims; the output's shape
  Index B = 0, lq = 0, lk = 0, H = 0, head_dim = 0;
  Index fq = 0, fk = 0, fv = 0, fo = 0;  // feature sizes of inputs_q, _k, _v and the output
};

// A fixed number of validated signatures, replaced oldest first.
inline constexpr std::size_t kForwardSignatures = 8;

template <class T>
struct AttentionWorkspaceState {
  ForwardScratch<T> scratch;
  std::vector<Index> now;  // this call's signature (no allocation once grown)
  std::array<ForwardShapes, kForwardSignatures> validated{};
  std::size_t count = 0, next = 0;

  // The entry validated for `now`, or null.
  const ForwardShapes* find() const {
    for (std::size_t i = 0; i < count; ++i)
      if (validated[i].signature == now) return &validated[i];
    return nullptr;
  }
  // Records `now` as validated with `shapes` (replacing the oldest entry when full).
  const ForwardShapes& remember(ForwardShapes shapes) {
    ForwardShapes& v = validated[next];
    next = (next + 1) % kForwardSignatures;
    if (count < kForwardSignatures) ++count;
    v = std::move(shapes);
    v.signature = now;
    return v;
  }
  std::size_t bytes() const {
    std::size_t n = scratch.bytes() + capacity_bytes(now);
    for (std::size_t i = 0; i < count; ++i)
      n += capacity_bytes(validated[i].signature) + capacity_bytes(validated[i].mask.offsets);
    return n;
  }
};

struct WorkspaceAccess;

}  // namespace detail

// Reusable buffers for MultiHeadDotProductAttention::apply_into (and SelfAttention's):
// keep one per thread and pass it to every call. Any modules and shapes may share it: it
// grows to the largest call it has served and remembers the last few shapes it validated,
// so that repeated calls neither re-validate nor allocate.
template <class T>
class AttentionWorkspace {
 public:
  AttentionWorkspace() = default;
  // Heap bytes the workspace holds.
  std::size_t bytes() const { return state_.bytes(); }
  // Frees every buffer (the next call validates and allocates again).
  void release() { state_ = detail::AttentionWorkspaceState<T>(); }

 private:
  friend struct detail::WorkspaceAccess;
  detail::AttentionWorkspaceState<T> state_;
};

namespace detail {

struct WorkspaceAccess {
  template <class T>
  static AttentionWorkspaceState<T>& state(AttentionWorkspace<T>& w) {
    return w.state_;
  }
};

// The calling thread's workspace for a plain apply (see the top of this file), leased
// for one call: a nested call on the same thread gets a workspace of its own. On return
// the kept workspace is released if it holds more than LINEN_THREAD_SCRATCH_MAX_BYTES.
template <class T>
class ThreadScratchLease {
 public:
  ThreadScratchLease() {
    Slot& s = slot();
    if (!s.busy) {
      s.busy = true;
      ws_ = &s.workspace;
    } else {
      local_ = std::make_unique<AttentionWorkspace<T>>();
      ws_ = local_.get();
    }
  }
  ~ThreadScratchLease() {
    if (local_) return;
    Slot& s = slot();
    if (s.workspace.bytes() > static_cast<std::size_t>(LINEN_THREAD_SCRATCH_MAX_BYTES)) s.workspace.release();
    s.busy = false;
  }
  ThreadScratchLease(const ThreadScratchLease&) = delete;
  ThreadScratchLease& operator=(const ThreadScratchLease&) = delete;
  AttentionWorkspace<T>& get() { return *ws_; }

  // Frees the calling thread's kept workspace unless a call on this thread is using it.
  static void release() {
    Slot& s = slot();
    if (!s.busy) s.workspace.release();
  }

 private:
  struct Slot {
    AttentionWorkspace<T> workspace;
    bool busy = false;
  };
  static Slot& slot() {
    thread_local Slot s;
    return s;
  }
  AttentionWorkspace<T>* ws_ = nullptr;
  std::unique_ptr<AttentionWorkspace<T>> local_;
};

}  // namespace detail

// Frees the scratch memory the calling thread keeps for plain apply() calls (every element
// type); the next call allocates it again. Other threads' scratch is theirs to release.
inline void release_thread_scratch() {
  detail::ThreadScratchLease<float>::release();
  detail::ThreadScratchLease<double>::release();
  detail::ThreadScratchLease<Eigen::half>::release();
  detail::ThreadScratchLease<Eigen::bfloat16>::release();
}

}  // namespace linen

#endif  // LINEN_ATTENTION_WORKSPACE_HPP

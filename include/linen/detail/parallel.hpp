// SPDX-License-Identifier: Apache-2.0
//
// Internal: linen's one thread loop. Every parallel part of linen (the fused attention
// kernels forward and backward, the modules' projections, the layers' backward) runs its
// work items through parallel_for on the caller's Eigen pool; linen never starts threads.
//   parallel_for(pool, workers, items, work)  work(worker, item) for item in [0, items),
//                                            items taken from an atomic counter
//   run_workers(pool, workers, fn)           fn(w) once for every w in [0, workers): a
//                                            static split, each share computed by `share`
#ifndef LINEN_DETAIL_PARALLEL_HPP
#define LINEN_DETAIL_PARALLEL_HPP

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <utility>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "../tensor.hpp"

namespace linen {
namespace detail {

// How many workers a pool offers (1 without one).
inline int pool_workers(Eigen::ThreadPoolInterface* pool) { return pool ? std::max(1, pool->NumThreads()) : 1; }

// [begin, end) of the w-th of `workers` contiguous shares of n items.
inline std::pair<Index, Index> share(Index n, int workers, int w) {
  return {n * w / workers, n * (w + 1) / workers};
}

// Runs `work(worker, item)` for item in [0, items) on up to `workers` threads with dynamic
// scheduling (an atomic counter): the caller is worker 0 and workers - 1 tasks go to
// `pool`. The caller returns once every item is done. A task that starts only after the
// caller has finished all items returns at once without touching the caller's frame, so
// a busy or single-threaded pool (even the caller's own) never deadlocks: the caller then
// runs every item itself. `worker` numbers the threads taking part (< workers, each used by
// one thread at a time: per-worker scratch may be indexed by it); which items a worker
// gets depends on scheduling, so results must depend on the item only.
// Exceptions: the first one a `work` throws is rethrown here, after every running item has
// finished; items not yet started then are not run. (Without a pool, the exception
// propagates at once.)
template <class F>
void parallel_for(Eigen::ThreadPoolInterface* pool, int workers, Index items, F&& work) {
  if (items <= 0) return;
  if (pool == nullptr || workers <= 1 || items == 1) {
    for (Index it = 0; it < items; ++it) work(0, it);
    return;
  }
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    int active = 0, next_slot = 1;
    bool closed = false;
    std::atomic<Index> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // the first exception, under mu
  };
  auto st = std::make_shared<State>();
  auto body = [&](int slot) {
    for (;;) {
      if (st->failed.load(std::memory_order_relaxed)) break;
      const Index it = st->next.fetch_add(1, std::memory_order_relaxed);
      if (it >= items) break;
      try {
        work(slot, it);
      } catch (...) {
        std::lock_guard<std::mutex> lock(st->mu);
        if (!st->error) st->error = std::current_exception();
        st->failed.store(true, std::memory_order_relaxed);
      }
    }
  };
  auto close_and_wait = [&st] {
    std::unique_lock<std::mutex> lock(st->mu);
    st->closed = true;
    st->cv.wait(lock, [&] { return st->active == 0; });
  };
  try {
    for (int t = 1; t < workers; ++t) {
      pool->Schedule([st, &body] {
        int slot;
        {
          std::lock_guard<std::mutex> lock(st->mu);
          if (st->closed) return;  // the caller may be gone: touch nothing of its
          slot = st->next_slot++;
          ++st->active;
        }
        body(slot);
        {
          std::lock_guard<std::mutex> lock(st->mu);
          --st->active;
        }
        st->cv.notify_all();
      });
    }
  } catch (...) {  // Schedule failed (std::bad_alloc): no task may touch this frame later
    close_and_wait();
    throw;
  }
  body(0);
  close_and_wait();
  if (st->error) std::rethrow_exception(st->error);
}

// The name the fused kernels and the modules' projections have called it by.
template <class F>
void parallel_for_dynamic(Eigen::ThreadPoolInterface* pool, int workers, Index items, F&& work) {
  parallel_for(pool, workers, items, std::forward<F>(work));
}

// Runs fn(w) once for every w in [0, workers) (see parallel_for: the caller takes part, a
// busy pool never deadlocks, the first exception is rethrown after the others finished).
// For static splits: fn(w) works on share(n, workers, w).
template <class F>
void run_workers(Eigen::ThreadPoolInterface* pool, int workers, const F& fn) {
  parallel_for(pool, workers, static_cast<Index>(workers), [&fn](int, Index w) { fn(static_cast<int>(w)); });
}

}  // namespace detail
}  // namespace linen

#endif  // LINEN_DETAIL_PARALLEL_HPP

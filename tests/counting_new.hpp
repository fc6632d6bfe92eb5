// SPDX-License-Identifier: Apache-2.0
//
// The replaceable global allocation functions, counting every operator new call in
// linen_test::g_news, and NoAllocation, the guard the allocation tests count with
// (test_decode_alloc, test_attention_workspace, test_vjp_workspace, test_decode_chunks).
// It defines the program's operator new, so include it from one source file of a test
// binary only (each test binary is one source file). Not usable under TSan, whose runtime
// defines them too.
#ifndef LINEN_TESTS_COUNTING_NEW_HPP
#define LINEN_TESTS_COUNTING_NEW_HPP

#include <atomic>
#include <cstdlib>
#include <new>

namespace linen_test {
inline std::atomic<long> g_news{0};
}  // namespace linen_test

// (GCC's -Wmismatched-new-delete cannot see that these news and deletes pair up.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  linen_test::g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  linen_test::g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  linen_test::g_news.fetch_add(1, std::memory_order_relaxed);
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace linen_test {
// Counts operator new calls, and (eigen = true) forbids Eigen's allocator, while alive.
// The forbidding needs EIGEN_RUNTIME_NO_MALLOC defined before Eigen is included.
class NoAllocation {
 public:
  explicit NoAllocation(bool eigen = true) : start_(g_news.load()), eigen_(eigen) {
#if defined(EIGEN_RUNTIME_NO_MALLOC)
    if (eigen_) Eigen::internal::set_is_malloc_allowed(false);
#endif
  }
  ~NoAllocation() {
#if defined(EIGEN_RUNTIME_NO_MALLOC)
    if (eigen_) Eigen::internal::set_is_malloc_allowed(true);
#endif
  }
  NoAllocation(const NoAllocation&) = delete;
  NoAllocation& operator=(const NoAllocation&) = delete;
  long count() const { return g_news.load() - start_; }

 private:
  long start_;
  bool eigen_;
};
}  // namespace linen_test

#endif  // LINEN_TESTS_COUNTING_NEW_HPP

// SPDX-License-Identifier: Apache-2.0
//
// linen::dispatch as an application uses it, built without -march: dot_product_attention
// (the fused kernels) against the reference implementation at every level this CPU has.
//   linen_consumer_dispatch          every supported level, via linen::set_isa
//   linen_consumer_dispatch <level>  LINEN_ISA=<level> is set: the active level must be it
//   linen_consumer_dispatch bad      LINEN_ISA names no level: the kernel call must throw
//                                    linen::invalid_argument naming it
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <linen/isa.hpp>
#include <linen/linen.hpp>

#ifndef LINEN_DISPATCH
#error "linking linen::dispatch defines LINEN_DISPATCH"
#endif

namespace {

linen::Tensor<float, 4> filled(linen::Index l, linen::Index d, float seed) {
  linen::Tensor<float, 4> t(2, l, 4, d);
  for (linen::Index i = 0; i < t.size(); ++i) t.data()[i] = std::sin(seed + 0.37f * static_cast<float>(i));
  return t;
}

// max |fused - reference| / max |reference| at the active level.
double fused_vs_reference(linen::Index lq) {
  const auto q = filled(lq, 32, 0.1f), k = filled(77, 32, 0.7f), v = filled(77, 16, 1.3f);
  linen::AttentionOptions<float> fused, ref;
  fused.implementation = linen::Implementation::Fused;
  ref.implementation = linen::Implementation::Reference;
  const auto a = linen::dot_product_attention(q, k, v, fused);
  const auto b = linen::dot_product_attention(q, k, v, ref);
  double err = 0, scale = 0;
  for (linen::Index i = 0; i < b.size(); ++i) {
    err = std::fmax(err, std::fabs(static_cast<double>(a.data()[i]) - b.data()[i]));
    scale = std::fmax(scale, std::fabs(static_cast<double>(b.data()[i])));
  }
  return err / scale;
}

int check_active(const char* what) {
  int failures = 0;
  for (linen::Index lq : {1, 45}) {  // the decode (row) kernel and the tiled kernel
    const double e = fused_vs_reference(lq);
    std::printf("%s: %s, Lq %ld: fused vs reference %.3g\n", what, linen::isa_name(linen::active_isa()),
                static_cast<long>(lq), e);
    if (!(e <= 2e-5)) {  // float rounding over 77 keys; a wrong kernel is off by O(1)
      std::fprintf(stderr, "%s: error %.3g beyond 2e-5\n", what, e);
      ++failures;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "bad") {
    try {
      fused_vs_reference(3);
    } catch (const linen::invalid_argument& e) {
      const std::string msg = e.what();
      std::printf("refused: %s\n", msg.c_str());
      return msg.find("avx9000") != std::string::npos && msg.find("sse2") != std::string::npos ? 0 : 1;
    }
    std::fprintf(stderr, "LINEN_ISA=avx9000 was not refused\n");
    return 1;
  }
  if (!mode.empty()) {
    if (linen::active_isa() != linen::parse_isa(mode)) {
      std::fprintf(stderr, "LINEN_ISA=%s, yet the active level is %s\n", mode.c_str(),
                   linen::isa_name(linen::active_isa()));
      return 1;
    }
    return check_active(("LINEN_ISA=" + mode).c_str()) == 0 ? 0 : 1;
  }
  std::printf("detected: %s\n", linen::isa_name(linen::detected_isa()));
  int failures = 0;
  for (linen::Isa level : linen::supported_isas()) {
    linen::set_isa(level);
    failures += check_active("set_isa");
  }
  return failures == 0 ? 0 : 1;
}

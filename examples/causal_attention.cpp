// SPDX-License-Identifier: Apache-2.0
//
// Causal self-attention with linen, the C++ spelling of this Flax code:
//
//   mask = flax.linen.make_causal_mask(tokens)            # [batch, 1, len, len]
//   out = flax.linen.dot_product_attention(q, k, v, mask=mask)
//
// A causal mask lets query position i attend only to key positions 0..i, so
// each output row is a weighted average of value rows 0..i. The program prints
// the output and checks the one thing that must hold exactly: position 0 sees
// only key 0, so its output row is value row 0. It exits non-zero otherwise.
#include <cmath>
#include <cstdio>

#include <linen/linen.hpp>

int main() {
  constexpr linen::Index batch = 1, length = 6, heads = 2, depth = 4;

  // query, key, value: [batch, length, heads, depth], filled from formulas so
  // the run is reproducible. Value row l of head h is 10*h + l + 0.1*d, so an
  // output row's integer part shows which value rows it averaged.
  linen::Tensor<float, 4> query(batch, length, heads, depth);
  linen::Tensor<float, 4> key(batch, length, heads, depth);
  linen::Tensor<float, 4> value(batch, length, heads, depth);
  for (linen::Index l = 0; l < length; ++l)
    for (linen::Index h = 0; h < heads; ++h)
      for (linen::Index d = 0; d < depth; ++d) {
        query(0, l, h, d) = std::sin(0.7f * float(l) + 0.3f * float(d) + float(h));
        key(0, l, h, d) = std::cos(0.5f * float(l) - 0.4f * float(d) + float(h));
        value(0, l, h, d) = 10.0f * float(h) + float(l) + 0.1f * float(d);
      }

  // make_causal_mask reads only the shape of its [batch, length] argument (in
  // Flax, usually the token ids) and returns a bool mask [batch, 1, length,
  // length]; the 1 broadcasts over the heads.
  linen::Tensor<int, 2> tokens(batch, length);
  tokens.setZero();
  const linen::Tensor<bool, 4> mask = linen::make_causal_mask(tokens);

  // Options are Flax's keyword arguments, with Flax's defaults. The mask is a
  // view: `mask` must outlive the call.
  linen::AttentionOptions<float> options;
  options.mask = mask;

  // out: [batch, length, heads, depth]
  const linen::Tensor<float, 4> out = linen::dot_product_attention(query, key, value, options);

  for (linen::Index h = 0; h < heads; ++h) {
    std::printf("head %d\n", int(h));
    for (linen::Index l = 0; l < length; ++l) {
      std::printf("  query %d sees keys 0..%d -> [", int(l), int(l));
      for (linen::Index d = 0; d < depth; ++d) std::printf(" %8.4f", double(out(0, l, h, d)));
      std::printf(" ]\n");
    }
  }

  // The check: query 0 attends to key 0 alone (weight exactly softmax([x]) = 1),
  // so out[0, 0, h, :] == value[0, 0, h, :] for every head.
  for (linen::Index h = 0; h < heads; ++h)
    for (linen::Index d = 0; d < depth; ++d)
      if (std::abs(out(0, 0, h, d) - value(0, 0, h, d)) > 1e-6f) {
        std::fprintf(stderr, "FAIL: out[0, 0, %d, %d] = %.8g but value[0, 0, %d, %d] = %.8g\n",
                     int(h), int(d), double(out(0, 0, h, d)), int(h), int(d),
                     double(value(0, 0, h, d)));
        return 1;
      }
  std::printf("ok: the first position's output equals the first value row\n");
  return 0;
}

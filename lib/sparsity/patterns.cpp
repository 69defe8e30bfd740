#include "sparsity/patterns.h"

#include "core/error.h"

namespace patch::sparsity {

int pattern_index(uint8_t keep_bits) {
  for (int k = 0; k < kNumPatterns; ++k)
    if (pattern_bits(k) == keep_bits) return k;
  return -1;
}

int pattern_overlap(int a, int b) {
  return __builtin_popcount(static_cast<unsigned>(pattern_bits(a) & pattern_bits(b)));
}

at::Tensor pattern_table(const at::TensorOptions& opts) {
  auto t = at::zeros({kNumPatterns, kGroupSize}, at::kFloat);
  auto a = t.accessor<float, 2>();
  for (int k = 0; k < kNumPatterns; ++k)
    for (int j : kPatternKept[k]) a[k][j] = 1.0f;
  return t.to(opts);
}

at::Tensor expand_patterns(const at::Tensor& pattern, at::ScalarType dtype) {
  auto table = pattern_table(at::TensorOptions().dtype(dtype).device(pattern.device()));
  auto sizes = pattern.sizes().vec();
  sizes.back() *= kGroupSize;
  return table.index_select(0, pattern.reshape(-1).to(at::kLong)).view(sizes);
}

at::Tensor patterns_of(const at::Tensor& mask) {
  core::check(mask.dim() >= 1 && mask.size(-1) % kGroupSize == 0, "patterns_of",
              core::str("last dimension ", mask.dim() ? mask.size(-1) : 0, " is not a multiple of 4"));
  auto sizes = mask.sizes().vec();
  sizes.back() /= kGroupSize;
  sizes.push_back(kGroupSize);
  auto weights = at::tensor({1, 2, 4, 8}, at::TensorOptions().dtype(at::kLong).device(mask.device()));
  auto bits = (mask.ne(0).view(sizes).to(at::kLong) * weights).sum(-1);
  // keep bitmask (0-15) -> pattern index, 255 where not exactly two kept
  auto lut = at::full({16}, 255, at::kLong);
  for (int k = 0; k < kNumPatterns; ++k) lut[pattern_bits(k)] = k;
  auto idx = lut.to(mask.device()).index_select(0, bits.reshape(-1)).view(bits.sizes());
  core::check(idx.ne(255).all().item<bool>(), "patterns_of", "mask is not 2:4 (a group keeps other than 2 of 4)");
  return idx.to(at::kByte);
}

}  // namespace patch::sparsity

#pragma once
// The six 2:4 patterns in the fixed order shared with the public PATCH and
// MaskLLM code (so their masks convert 1:1): pattern k keeps positions
// kPatternKept[k] of a group of four consecutive input weights.
#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace patch::sparsity {

inline constexpr int64_t kGroupSize = 4;
inline constexpr int64_t kNumPatterns = 6;
inline constexpr std::array<std::array<int, 2>, kNumPatterns> kPatternKept = {
    {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}}};

// Pattern k as a keep bitmask (bit j set = position j kept).
constexpr uint8_t pattern_bits(int k) {
  return static_cast<uint8_t>((1u << kPatternKept[k][0]) | (1u << kPatternKept[k][1]));
}
// The pattern of a group's keep bitmask, or -1 when it does not keep exactly two of four.
int pattern_index(uint8_t keep_bits);
// Kept positions patterns a and b share: 2 (same), 1, or 0 (complements).
int pattern_overlap(int a, int b);

// The [6, 4] 0/1 table: row k is pattern k over positions 0..3.
at::Tensor pattern_table(const at::TensorOptions& opts = at::kFloat);
// Pattern indices [..., G] (integer, 0-5) -> 0/1 mask [..., 4G] of `dtype`.
at::Tensor expand_patterns(const at::Tensor& pattern, at::ScalarType dtype = at::kFloat);
// A 2:4 mask [..., 4G] (nonzero = kept) -> pattern indices [..., G] uint8; throws
// core::Error when some group does not keep exactly two of its four weights.
at::Tensor patterns_of(const at::Tensor& mask);

}  // namespace patch::sparsity

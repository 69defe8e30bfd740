#pragma once
// Dequantization of ggml's block formats, as ggml's reference
// dequantize_row_* computes them: the legacy 32-element blocks (Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0) and the 256-element K-quants (Q2_K .. Q6_K) that
// Q4_K_M / Q5_K_M files hold. Every value is formed in float32 with the same
// operations in the same order, so results equal gguf-py's to the bit.
#include <cstdint>

namespace patch::io {

// ggml type ids (ggml.h enum ggml_type).
enum GgmlTypeId : uint32_t {
  kGgmlF32 = 0,
  kGgmlF16 = 1,
  kGgmlQ4_0 = 2,
  kGgmlQ4_1 = 3,
  kGgmlQ5_0 = 6,
  kGgmlQ5_1 = 7,
  kGgmlQ8_0 = 8,
  kGgmlQ2_K = 10,
  kGgmlQ3_K = 11,
  kGgmlQ4_K = 12,
  kGgmlQ5_K = 13,
  kGgmlQ6_K = 14,
  kGgmlBF16 = 30,
};

// True for the block formats dequantize_blocks handles.
bool is_dequantizable(uint32_t type);

// Dequantizes n_blocks consecutive blocks of `type` from src into dst
// (n_blocks * block size floats). `type` must be dequantizable.
void dequantize_blocks(uint32_t type, const uint8_t* src, float* dst, int64_t n_blocks);

}  // namespace patch::io

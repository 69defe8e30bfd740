#pragma once
// The values of a mask-learning step that change from step to step (noise
// keys, temperatures and scales, the AdamW step), laid out for device memory.
// A step replayed as a CUDA graph keeps the kernel arguments of its capture,
// so there the kernels read these instead (MaskSet::use_device_scalars);
// eager steps pass the same values as arguments. Host and device share the
// key derivation below, so both draw the same noise.
#include <cstddef>
#include <cstdint>

#include "sparsity/philox.h"

namespace patch::sparsity {

// Streams of random numbers a layer draws; each gets its own key.
enum Stream : uint64_t {
  kTileNoise = 0,
  kPatternNoise = 1,
  kTileInit = 2,
  kPatternInit = 3,
  kRounding = 4
};
constexpr uint64_t kNoiseTag = 0x6e6f697365ULL, kInitTag = 0x696e6974ULL;

PATCH_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

PATCH_HD uint64_t combine(uint64_t h, uint64_t v) {
  return splitmix64(h ^ splitmix64(v));
}

// The noise of a step is keyed by (seed, step), then by layer and stream.
PATCH_HD uint64_t step_key(uint64_t seed, int64_t step) {
  return combine(combine(seed, kNoiseTag), static_cast<uint64_t>(step));
}
PATCH_HD uint64_t layer_key(uint64_t step_key, uint64_t layer_hash, uint64_t stream) {
  return combine(combine(step_key, layer_hash), stream);
}

struct StepScalars {
  uint64_t step_key;
  float scale_24, inv_tau_24;              // 2:4 sampling
  float scale_tile, inv_tau_tile, k_tile;  // tile gates; k = scale / tau
  int32_t hard_24, hard_tile;              // straight-through flags
  float inv_bias1, inv_bias2;              // compact state's in-backward AdamW
  // train's AdamW reads these four as one array (AdamWStep::device).
  float lr, step_size, inv_bias2_sqrt;
  float grad_scale;  // the clip factor, written on the device: never uploaded
};
// The host uploads everything before grad_scale.
constexpr size_t kUploadedScalarBytes = offsetof(StepScalars, grad_scale);
static_assert(sizeof(StepScalars) % 8 == 0 && kUploadedScalarBytes % 4 == 0,
              "StepScalars lives in a float32 tensor");

}  // namespace patch::sparsity

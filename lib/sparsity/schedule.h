#pragma once
// Temperature/scale annealing and the sampler state every LinearMask reads.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace patch::sparsity {

enum class Anneal { kLinear, kCosine, kExp };
// "linear" | "cosine" | "exp"; throws core::ConfigError otherwise.
Anneal parse_anneal(const std::string& name);
// Value at `progress` (clamped to [0, 1]) between start (0) and end (1):
// linear interpolation, half-cosine, or geometric (exp; start and end > 0).
double anneal(double start, double end, double progress, Anneal kind);

// Shared by all LinearMasks of a run; the trainer updates it before each step.
struct SamplerState {
  double tau_24 = 4.0, scale_24 = 2.0;
  double tau_tile = 4.0, scale_tile = 0.5;
  bool hard_24 = false, hard_tile = false;  // straight-through hard samples
  int64_t step = 0;   // with seed and the layer, fixes the Gumbel noise
  uint64_t seed = 0;
  // Compact state: the AdamW step the fused backward applies to the 2:4 logits
  // (steps counts updates including this one; grad_scale is the clip factor).
  struct PatternUpdate {
    double lr = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0, grad_scale = 1.0;
    int64_t steps = 1;
  } update;
  // AdamW's bias correction 1 - beta^t, as both ways of passing the compact
  // update form it (InlineAdam in eager steps, StepScalars under a graph).
  static double bias_correction(double beta, int64_t t) {
    return 1.0 - std::pow(beta, static_cast<double>(t));
  }
  // While a CUDA graph drives the steps: this step's values as StepScalars
  // (step_scalars.h) in device memory, float32 words, which the kernels read
  // instead of their arguments (MaskSet::use_device_scalars). Else undefined.
  at::Tensor device;
};

// Start/end values of tau and scale (the defaults of mask.tau_24 etc.).
struct SamplerSchedule {
  double tau_24_start = 4.0, tau_24_end = 0.05;
  double scale_24_start = 2.0, scale_24_end = 10.0;
  double tau_tile_start = 4.0, tau_tile_end = 0.05;
  double scale_tile_start = 0.5, scale_tile_end = 7.0;
  Anneal kind = Anneal::kLinear;

  // Sets the four annealed values of `state` for `progress` in [0, 1].
  void apply(SamplerState& state, double progress) const;
};

}  // namespace patch::sparsity

#pragma once
// The learnable mask of one linear layer (PATCH): one logit per tile (dense vs
// 2:4) and six logits per group of four input weights (one per 2:4 pattern),
// sampled with Gumbel-softmax:
//   M24 = sum_k softmax((scale_24 * l + g) / tau_24)_k * pattern_k      [out, in]
//   T   = sigmoid((scale_tile * l_tile + g1 - g2) / tau_tile)           [rows, cols]
//   M   = T + (1 - T) * M24   (T broadcast over its tile's weights)
// The noise is a deterministic function of (seed, step, layer name) drawn from
// Philox (mask_kernels.h), so the activation-checkpointing recompute and the
// fused backward regenerate the identical mask instead of storing it.
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/weight_provider.h"
#include "sparsity/schedule.h"
#include "sparsity/step_scalars.h"
#include "sparsity/tile_grid.h"

namespace patch::sparsity {

// joint: tiles and 2:4 learned; tile: 2:4 fixed (from the prior), only tiles
// learned; maskllm: no dense tiles (T = 0), 2:4 learned.
enum class MaskMode { kJoint, kTile, kMaskLLM };
MaskMode parse_mask_mode(const std::string& name);  // throws core::ConfigError
std::string mask_mode_name(MaskMode mode);

// Decoder block of a Hugging Face name ("model.layers.7.mlp.up_proj" -> 7), -1 if none.
int64_t block_index(const std::string& hf_name);

struct LinearMaskOptions {
  MaskMode mode = MaskMode::kJoint;
  double init_std = 1.0;  // logits start as N(0, init_std)
  uint64_t seed = 0;      // seeds the initialisation (with the layer name)
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;  // logits and mask arithmetic (kDouble for gradient checks)
  // effective_weight and weight_term through the fused kernels (mask_kernels.h)
  // instead of ATen ops on a materialised mask (the reference path).
  bool fused = true;
  // Compact state (needs fused): bf16 2:4 logits with bf16 AdamW moments, the
  // update applied inside the backward so no 2:4 gradient is ever stored.
  bool compact = false;
};

// CUDA graphs (SamplerState::device): the step's values on the device, or
// nullptr in eager steps.
const StepScalars* device_scalars(const SamplerState& st);
// k = scale_tile / tau_tile of the step, the factor of the tile gates'
// gradient: a double in eager steps, a 0-dim float32 device tensor that a
// replayed graph reads when the state has device values; and x * k.
at::IValue tile_k_value(const SamplerState& st);
at::Tensor times_tile_k(const at::Tensor& x, const at::IValue& k);

class LinearMask : public model::WeightProvider {
 public:
  // `state` is shared by all layers and updated by the trainer between steps.
  LinearMask(std::string name, TileGrid grid, std::shared_ptr<const SamplerState> state,
             const LinearMaskOptions& opts = {});

  // W * mask, the mask sampled as in training (noise on, the state's hard flags)
  // and cast to W's dtype. W must be [out, in] on the logits' device.
  at::Tensor effective_weight(const at::Tensor& weight) override;

  const std::string& name() const { return name_; }
  int64_t block() const { return block_; }
  const TileGrid& grid() const { return grid_; }
  MaskMode mode() const { return opts_.mode; }
  const LinearMaskOptions& options() const { return opts_; }
  const SamplerState& state() const { return *state_; }

  // Leaf tensors. tile_logits [rows, cols] always exists (frozen in maskllm);
  // pattern_logits [out, in/4, 6] is undefined in tile mode, where
  // fixed_pattern [out, in/4] uint8 holds the 2:4 choice instead.
  const at::Tensor& tile_logits() const { return tile_logits_; }
  const at::Tensor& pattern_logits() const { return pattern_logits_; }
  const at::Tensor& fixed_pattern() const { return fixed_pattern_; }
  void set_fixed_pattern(const at::Tensor& pattern);  // tile mode only
  // The leaves the optimizer updates from .grad (compact state: the tile
  // logits only; the 2:4 logits update themselves in the backward).
  std::vector<at::Tensor> parameters() const;
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() const;
  // Everything a checkpoint needs: "<name>.tile_logits", "<name>.pattern_logits"
  // or "<name>.fixed_pattern", and in compact state "<name>.pattern_exp_avg" and
  // "<name>.pattern_exp_avg_sq" (the live tensors).
  std::vector<std::pair<std::string, at::Tensor>> named_state() const;
  // Sum of squared 2:4 logit gradients over the backward passes since the last
  // call (compact state clips with it), then reset; undefined if none ran.
  at::Tensor take_pattern_sq_norm();

  // Tile gates T [rows, cols] for this step (noise as in the forward when
  // `noise`, straight-through hard when state().hard_tile). Zeros in maskllm mode.
  at::Tensor tile_gates(bool noise = true) const;
  // The mask effective_weight multiplies by, [out, in] in the logits' dtype.
  at::Tensor sampled_mask() const;
  // The relaxed mask without straight-through hardening (convex mixtures).
  at::Tensor soft_mask(bool noise) const;
  // The noise of this step's sample (state().seed, state().step and the
  // layer) exactly as the kernels regenerate it, float32 on the logits'
  // device: Gumbel(0, 1) [out, in/4, 6] of the 2:4 choice, and Logistic(0, 1)
  // [rows, cols] of the tile gates (the difference of the dense and the sparse
  // choice's Gumbels). Training never reads these (the kernels draw their own
  // where they need them); they let a test replay a step outside the library
  // with the same randomness (tests/train/test_golden.cpp).
  at::Tensor pattern_noise() const;
  at::Tensor tile_noise() const;
  // Deterministic decisions: tiles dense where the logit is > 0 (sigmoid > 0.5;
  // never in maskllm), 2:4 pattern by argmax (fixed in tile mode).
  at::Tensor hard_tiles() const;    // uint8 [rows, cols]
  at::Tensor hard_pattern() const;  // uint8 [out, in/4]
  at::Tensor hard_mask() const;     // 0/1 [out, in] in the logits' dtype

  // Differentiable density of the sampled mask (scalar): M24 keeps exactly half
  // of every group, so density = sum_t count_t * (T_t + (1 - T_t) / 2) / numel
  // with the same gates as this step's forward.
  at::Tensor soft_density() const;
  // This step's gates [2, rows, cols] (forward value, soft; noise on, the
  // state's hard flag), computed once per (step, schedule, logits version) and
  // shared by the forward, its checkpointed recompute and the density terms.
  // Not differentiable; tile_gates() is. Joint and tile modes only.
  const at::Tensor& step_gates() const;
  // Weights per tile [rows, cols], in the logits' dtype and device.
  const at::Tensor& tile_counts() const { return counts_; }
  // Density expected under the sampler (no gradient): a tile is dense with
  // probability sigmoid(scale_tile * logit).
  double expected_density() const;
  // ||M * W||_F^2 with this step's sampled mask (MaskLLM's sparse-weight
  // regularizer, subtracted from the loss), as a differentiable fp32 scalar.
  at::Tensor weight_term(const at::Tensor& weight) const;

 private:
  at::Tensor gates(bool noise, bool hard) const;
  at::Tensor mask_24(bool noise, bool hard) const;
  at::Tensor mask(bool noise, bool hard_24, bool hard_tile) const;
  uint64_t noise_seed(uint64_t stream) const;
  friend struct FusedMask;

  std::string name_;
  int64_t block_ = -1;
  uint64_t name_hash_ = 0;
  TileGrid grid_;
  std::shared_ptr<const SamplerState> state_;
  LinearMaskOptions opts_;
  at::Tensor tile_logits_, pattern_logits_, fixed_pattern_;
  at::Tensor counts_;  // weights per tile, in the logits' dtype and device
  struct GateCache {
    int64_t step = -1;
    uint64_t seed = 0;
    double scale = 0, tau = 0;
    bool hard = false;
    uint32_t version = 0;
    at::Tensor gates;
  };
  mutable GateCache gate_cache_;
  at::Tensor exp_avg_, exp_avg_sq_, pattern_sq_norm_;  // compact state
};

// A provider with a precomputed mask (hard masks for evaluation and export):
// returns W * mask, the mask cast to W's dtype/device once and cached.
class FixedMask : public model::WeightProvider {
 public:
  explicit FixedMask(at::Tensor mask) : mask_(std::move(mask)) {}
  at::Tensor effective_weight(const at::Tensor& weight) override;
  const at::Tensor& mask() const { return mask_; }

 private:
  at::Tensor mask_, cast_;
};

}  // namespace patch::sparsity

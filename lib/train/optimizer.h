#pragma once
// AdamW over the mask logits (the model's weights are frozen), with its state
// exposed as named tensors so that checkpoints can save and restore it exactly.
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "sparsity/mask_set.h"
#include "train/adamw.h"

namespace patch::train {

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions opts);

  // One update at learning rate `lr` from the params' .grad times grad_scale
  // (params without a gradient are skipped), through adamw_update. With
  // `device` (CUDA graphs, AdamWStep::device) the step's values are read
  // there, and the step count is the caller's (set_steps).
  void step(double lr, double grad_scale = 1.0, const float* device = nullptr);
  void zero_grad();
  // The global L2 norm of the gradients, a float64 scalar on the device (no
  // sync). `extra_sq` (float64 scalar, same device) adds the squared norm of
  // gradients applied elsewhere (compact state's 2:4 logits) to the total.
  at::Tensor grad_norm(const at::Tensor& extra_sq) const;

  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  // "<param>.exp_avg" / "<param>.exp_avg_sq" tensors and the step count.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::map<std::string, at::Tensor>& tensors, int64_t steps);

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  AdamWOptions opts_;
  int64_t steps_ = 0;
};

// The optimizer of a mask-learning step. Full state: AdamW on every logit's
// .grad with global-norm clipping. Compact state: AdamW on the tile logits
// here, while the fused backward updates the 2:4 logits in place; as their
// gradients are gone by the time the global norm is known, they are clipped
// with the factor of the previous step's norm.
class MaskOptimizer {
 public:
  MaskOptimizer(sparsity::MaskSet& masks, AdamWOptions opts, bool compact);
  // Before the step's backward passes: the in-backward update's settings
  // (with device scalars, also the upload of the step's values).
  void begin_step(double lr);
  // After them: clip, update, clear the gradients; returns the gradient norm.
  double finish_step(double lr, double clip);

  // CUDA graphs. After use_device_scalars (MaskSet::use_device_scalars), the
  // kernels read lr, bias corrections and clip factor from device memory, and
  // a step is begin_step (host work: counts the step, uploads its values) and
  // then finish_step_on_device, which issues the clipping and update without
  // a sync and returns the gradient norm as a float64 device scalar: what a
  // graph captures and replays.
  void use_device_scalars();
  at::Tensor finish_step_on_device(double clip);
  // The trained logits in the order the backward reaches them (the last layer
  // first): what data-parallel ranks sum the gradients of (dist::GradReducer).
  std::vector<at::Tensor> params_in_backward_order() const;

  AdamW& adam() { return adam_; }
  bool compact() const { return compact_; }
  double clip_scale() const;  // checkpoint state (compact); a sync with device scalars
  void set_clip_scale(double s);

 private:
  sparsity::MaskSet& masks_;
  AdamWOptions opts_;
  AdamW adam_;
  bool compact_;
  double clip_scale_ = 1.0;
  bool device_scalars_ = false;
};

// Linear warm-up to `peak` over `warmup` steps, then cosine decay to
// peak * min_ratio at `total` steps.
double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio);

}  // namespace patch::train

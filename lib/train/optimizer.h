#pragma once
// AdamW over the mask logits (the model's weights are frozen), with its state
// exposed as named tensors so that checkpoints can save and restore it exactly.
#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

namespace patch::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions opts);

  // One update at learning rate `lr` from the params' .grad (params without a
  // gradient are skipped).
  void step(double lr);
  void zero_grad();
  // Scales gradients so their global L2 norm is at most max_norm (0: no clip);
  // returns the norm before clipping.
  double clip_grad_norm(double max_norm);

  int64_t steps() const { return steps_; }
  // "<param>.exp_avg" / "<param>.exp_avg_sq" tensors and the step count.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::map<std::string, at::Tensor>& tensors, int64_t steps);

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  AdamWOptions opts_;
  int64_t steps_ = 0;
};

// Linear warm-up to `peak` over `warmup` steps, then cosine decay to
// peak * min_ratio at `total` steps.
double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio);

}  // namespace patch::train

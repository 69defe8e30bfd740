#pragma once
// The AdamW update of the mask logits: a memory-bound pass over parameter,
// gradient and both moments. CUDA float32 tensors take a vectorized kernel
// (adamw_cuda.cu) that reads each value once and applies the clipping factor
// on the fly; everything else, and the kernel's test oracle, is ATen's fused
// AdamW (at::_fused_adamw_).
#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace patch::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

// One update: the optimizer's constants and this step's values.
struct AdamWStep {
  AdamWOptions opts;
  double lr = 1e-3;
  double grad_scale = 1.0;  // gradients are multiplied by this first (norm clipping)
  int64_t step = 1;         // 1-based, for the bias corrections
  // CUDA graphs: {lr, lr / bias1, 1 / sqrt(bias2), grad_scale} in device memory
  // (sparsity::StepScalars::lr onwards), read by the kernel in place of lr,
  // step and grad_scale. Only the CUDA float32 kernel takes it.
  const float* device = nullptr;
};

// lr / bias1 and 1 / sqrt(bias2) in float32, as ATen's fused AdamW forms them.
std::pair<float, float> adamw_step_factors(const AdamWStep& s);

// Decoupled AdamW (PyTorch's formula) on every (param, grad, exp_avg,
// exp_avg_sq) quadruple, in place. The gradients may be scaled in place.
void adamw_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs,
                  const std::vector<at::Tensor>& exp_avg_sqs, const AdamWStep& s);

namespace cuda {
// One float32 CUDA tensor set, contiguous and of equal sizes.
void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const AdamWStep& s);
}  // namespace cuda

}  // namespace patch::train

#pragma once
// The AdamW update of the mask logits: a memory-bound pass over parameter,
// gradient and both moments. CUDA float32 tensors take a vectorized kernel
// (adamw_cuda.cu) that reads each value once and applies the clipping factor
// on the fly; everything else, and the kernel's test oracle, is ATen's fused
// AdamW (at::_fused_adamw_).
#include <ATen/ATen.h>

#include <cstdint>
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
};

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

#pragma once
// Fused kernels of a LinearMask: the mask is never materialised as a tensor.
// The forward rebuilds each 2:4 group's sample from its six logits and
// regenerated Philox noise and writes W * M directly; the backward turns
// dL/d(W * M) into the logit gradients group by group (or applies AdamW to the
// 2:4 logits on the spot, so their gradient is never stored). The CPU loops
// here are the reference the CUDA kernels (mask_kernels_cuda.cu) are tested
// against; both share the per-group math of mask_group.h.
#include <ATen/ATen.h>

#include <cstdint>

#include "sparsity/step_scalars.h"

namespace patch::sparsity {

// How a layer's 2:4 part is sampled in one step (MaskMode as kTile/kMaskLLM flags).
struct GroupSampling {
  bool fixed = false;     // tile mode: the pattern is given, nothing sampled
  bool has_tiles = true;  // false in maskllm mode: T = 0, no tile gradient
  double scale = 1.0, tau = 1.0;
  bool hard = false;  // straight-through one-hot forward value
  bool noise = true;
  uint64_t key = 0;  // Philox key of the Gumbel noise
  int64_t tile_rows = 1, tile_cols = 4;
  // CUDA graphs: scale, tau, hard and the key (of layer_hash) come from here,
  // and an in-backward AdamW's lr, bias corrections and clip factor too.
  const StepScalars* device = nullptr;
  uint64_t layer_hash = 0;
};

// AdamW on the 2:4 logits inside the backward (compact state): with g the
// gradient times grad_scale, m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
// l = l (1 - lr wd) - lr / bias1 * m / (sqrt(v / bias2) + eps). bf16 logits are
// written with stochastic rounding (Philox key round_key) so small updates
// survive in expectation; m and v round to nearest.
struct InlineAdam {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double bias1 = 1.0, bias2 = 1.0;  // 1 - beta^t
  double grad_scale = 1.0;          // gradient clipping factor
  uint64_t round_key = 0;
  at::Tensor exp_avg, exp_avg_sq;  // like the logits
};

// InlineAdam as the per-group update of mask_group.h takes it (float, inverse
// bias corrections); used by the CPU loops and the CUDA kernels alike.
namespace group {
struct AdamArgs;
}
group::AdamArgs adam_args(const InlineAdam& a);

// Gumbel(0, 1) noise [out, groups, 6] and Logistic(0, 1) noise [rows, cols] as
// the kernels draw it (float32, then cast to opts' dtype): the unfused path
// and the tests use these.
at::Tensor gumbel_noise(int64_t out, int64_t groups, uint64_t key, const at::TensorOptions& opts);
at::Tensor logistic_noise(int64_t rows, int64_t cols, uint64_t key, const at::TensorOptions& opts);

// The tile gates of one step, T = sigmoid((scale l + n) / tau) with n the
// Logistic noise of `key` (when `noise`): [2, rows, cols] in the logits' dtype
// (float32 on CUDA); [0] is the forward value (0/1 by T > 0.5 when hard), [1]
// the soft T that carries the gradient. With `device` (CUDA graphs), scale,
// tau, hard and the key (of layer_hash) are read from there instead.
at::Tensor tile_gates(const at::Tensor& logits, double scale, double tau, bool hard, bool noise,
                      uint64_t key, const StepScalars* device = nullptr, uint64_t layer_hash = 0);
// dL/d(tile logits) [rows, cols] from a backward's per-row partial sums [out,
// cols] of dL/dT: each tile's rows summed, times dT/dl = soft (1 - soft) k
// with k = scale / tau (read from `device` when given).
at::Tensor tile_logit_grad(const at::Tensor& partial, const at::Tensor& soft, int64_t tile_rows,
                           double k, const StepScalars* device = nullptr);

// W * M in `out_dtype`, M = T + (1 - T) * M24. weight [out, in]; gates [rows,
// cols] the forward values of T (ignored without tiles); pattern the logits
// [out, in/4, 6] or, when fixed, the pattern indices [out, in/4] uint8.
at::Tensor masked_weight_forward(const at::Tensor& weight, const at::Tensor& gates,
                                 const at::Tensor& pattern, const GroupSampling& s,
                                 at::ScalarType out_dtype);

struct MaskedWeightGrads {
  at::Tensor pattern;    // dL/d(2:4 logits) [out, in/4, 6]; undefined when fixed or applied inline
  at::Tensor tile_rows;  // dL/dT summed over each row's part of each tile [out, cols]
  at::Tensor sq_norm;    // sum of squared 2:4 logit gradients (scalar); only with `adam`
};
// The backward of masked_weight_forward for grad = dL/d(W * M) [out, in].
// With `adam`, the 2:4 logits (pattern) are updated in place instead.
MaskedWeightGrads masked_weight_backward(const at::Tensor& grad, const at::Tensor& weight,
                                         const at::Tensor& gates, const at::Tensor& pattern,
                                         const GroupSampling& s, InlineAdam* adam);

// The CUDA kernels (mask_kernels_cuda.cu), declared in every build: without
// PATCH_WITH_CUDA core::dispatch never calls them.
namespace cuda {
void gumbel_noise(at::Tensor& out, uint64_t key);
void logistic_noise(at::Tensor& out, uint64_t key);
void tile_gates(const at::Tensor& logits, double scale, double tau, bool hard, bool noise,
                uint64_t key, const StepScalars* device, uint64_t layer_hash, at::Tensor& out);
void tile_logit_grad(const at::Tensor& partial, const at::Tensor& soft, int64_t tile_rows, double k,
                     const StepScalars* device, at::Tensor& out);
void masked_weight_forward(const at::Tensor& weight, const at::Tensor& gates,
                           const at::Tensor& pattern, const GroupSampling& s, at::Tensor& out);
void masked_weight_backward(const at::Tensor& grad, const at::Tensor& weight,
                            const at::Tensor& gates, const at::Tensor& pattern,
                            const GroupSampling& s, InlineAdam* adam,
                            const at::Tensor& pattern_grad, const at::Tensor& tile_rows,
                            const at::Tensor& sq_rows);
}  // namespace cuda

}  // namespace patch::sparsity

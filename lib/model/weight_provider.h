#pragma once
// The seam between the model and the masks: a linear layer asks its provider
// for the weight it multiplies with. Header-only so that sparsity can implement
// it without linking the model.
#include <ATen/ATen.h>

namespace patch::model {

// Supplies the weight a linear layer multiplies with on this call. It must be
// deterministic within a training step: activation checkpointing calls it again
// during the backward recompute and expects the same result.
class WeightProvider {
 public:
  virtual ~WeightProvider() = default;
  // `weight` is the frozen dense weight [out, in] in the compute dtype.
  virtual at::Tensor effective_weight(const at::Tensor& weight) = 0;
};

}  // namespace patch::model

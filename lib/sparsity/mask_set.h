#pragma once
// All LinearMasks of a model, keyed by Hugging Face module name, selected by
// include/exclude globs, plus the aggregates the trainer needs.
#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "sparsity/linear_mask.h"

namespace patch::sparsity {

// fnmatch-style match: '*' matches any run of characters (dots included), '?' one.
bool glob_match(const std::string& pattern, const std::string& name);

struct MaskSetOptions {
  LinearMaskOptions mask;  // mode, init_std, seed, device, logits dtype
  int64_t tile_rows = 128, tile_cols = 128;
  std::vector<std::string> include = {"*"};
  std::vector<std::string> exclude;
};

class MaskSet {
 public:
  // Called for each masked layer so the caller can install the mask as that
  // linear's weight provider (sparsity does not know the model).
  using Attach = std::function<void(const std::string& name, const std::shared_ptr<LinearMask>& mask)>;

  MaskSet(MaskSetOptions opts, std::shared_ptr<SamplerState> state);

  // Creates a mask for every (name, weight [out, in]) the globs select, in the
  // given order; keeps a reference to each weight (for priors and the weight
  // term). Throws core::Error on a duplicate name or a weight that is not 2-D
  // with in % 4 == 0.
  void add_layers(const std::vector<std::pair<std::string, at::Tensor>>& weights,
                  const Attach& attach = {});
  // True when `name` matches an include glob and no exclude glob.
  bool selects(const std::string& name) const;

  const std::vector<std::shared_ptr<LinearMask>>& masks() const { return masks_; }
  size_t size() const { return masks_.size(); }
  std::shared_ptr<LinearMask> find(const std::string& name) const;  // nullptr if absent
  const at::Tensor& weight(size_t i) const { return weights_.at(i); }
  SamplerState& state() { return *state_; }
  const SamplerState& state() const { return *state_; }
  std::shared_ptr<SamplerState> shared_state() const { return state_; }
  const MaskSetOptions& options() const { return opts_; }

  int64_t total_weights() const;
  std::vector<int64_t> blocks() const;  // distinct block indices, ascending (-1 = outside blocks)

  // Differentiable densities of this step's sampled masks, weighted by weights
  // (LinearMask::soft_density of every layer, combined). One autograd node and
  // a few kernels for all layers, however many there are.
  at::Tensor soft_density() const;                              // global scalar
  std::map<int64_t, at::Tensor> block_soft_density() const;     // per decoder block
  // Sum over layers of ||M * W||_F^2 with the stored weights (fp32 scalar).
  at::Tensor weight_term() const;
  std::vector<at::Tensor> parameters() const;
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() const;
  // Compact state: the squared norm of the 2:4 logit gradients the last
  // backward passes applied (summed over layers), then reset; 0 if none. A
  // float64 scalar on the logits' device (no sync).
  at::Tensor take_pattern_sq_norm();

  // CUDA graphs. use_device_scalars gives the state a StepScalars in device
  // memory (SamplerState::device), its clip factor starting at grad_scale; the
  // kernels read the step's values from there from then on, and each step
  // must upload them first: step_scalars() fills the sampler's part from
  // state(), the optimizer the AdamW part, upload_step_scalars copies all but
  // grad_scale on the current stream.
  void use_device_scalars(double grad_scale);
  StepScalars step_scalars() const;
  void upload_step_scalars(const StepScalars& s);

  // Checkpoint support: every layer's named_state(), and loading it back
  // (shapes checked; errors name `source` and the tensor).
  std::vector<std::pair<std::string, at::Tensor>> named_state() const;
  void load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& source);

 private:
  MaskSetOptions opts_;
  std::shared_ptr<SamplerState> state_;
  std::vector<std::shared_ptr<LinearMask>> masks_;
  std::vector<at::Tensor> weights_;
  std::map<std::string, size_t> index_;

  // sum_t count_t * T_t of every layer [layers] (differentiable; zeros in
  // maskllm mode, where no tile is learned).
  at::Tensor tile_sums() const;
  // Constants of tile_sums over the layers' flattened tiles, built on first use.
  struct Flat {
    at::Tensor counts;        // weights per tile, float64
    at::Tensor counts_logit;  // the same in the logits' dtype
    at::Tensor layer;         // layer of each tile, int64
    at::Tensor bounds;        // 0, then one past each layer's last tile, int64
    at::Tensor blocks;  // [blocks, layers]: 0.5 / block weights where a layer is in the block
    std::vector<int64_t> block_ids;
  };
  mutable Flat flat_;
  friend struct TileSumsFn;
};

}  // namespace patch::sparsity

#pragma once
// One mask-learning step, the same object for train, bench, sweep and the
// tests: the masks attached to a model, the sampler state and its schedules,
// the density budget, the loss and regularizers, the optimizer, the gradient
// sum over data-parallel ranks and the CUDA graph that replays the step.
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "core/cuda_graph.h"
#include "dist/dist.h"
#include "model/decoder.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "train/optimizer.h"
#include "train/train_options.h"

namespace patch::train {

// What a step computed (the loss terms are this step's, summed over ranks).
struct StepStats {
  double lr = 0.0;
  double ce = 0.0;           // the LM term (cross-entropy, or the divergence with distill)
  double reg = 0.0;          // the density penalty before lambda_sparsity
  double density = 0.0;      // the soft density
  double weight_term = 0.0;  // before its decaying factor
  double loss = 0.0;         // ce + lambda_sparsity * reg - factor * weight_term
  double grad_norm = 0.0;    // before clipping
  bool updated = false;      // false: a non-finite loss (eager) left the logits as they were
};

class MaskLearner {
 public:
  // Attaches a learnable mask to every linear of `model` that options.masks
  // selects (logits N(0, init_std), the schedules at their start) and builds
  // the optimizer. Priors go into masks() before the first step. `group`:
  // the data-parallel ranks (nullptr or one rank: this process alone). The
  // options must have passed check_step_options.
  MaskLearner(model::Decoder& model, const StepOptions& options, dist::Group* group = nullptr);
  ~MaskLearner();
  MaskLearner(const MaskLearner&) = delete;
  MaskLearner& operator=(const MaskLearner&) = delete;

  // Called between the step's backward passes (gradients summed over ranks)
  // and clipping and the update: what a test compares. Eager steps only.
  using Inspect = std::function<void()>;

  // Step `step` (0-based) of options.steps: the schedules and learning rate
  // at that step, this rank's micro-batches (token ids [micro_batch, seq],
  // any device; micro_batches_per_rank() of them) forward and backward, the
  // sum over ranks, the regularizers, clipping and AdamW. With cuda_graph the
  // first step runs eagerly and every later one is one replay.
  StepStats step(int64_t step, const std::vector<at::Tensor>& micro_batches, const Inspect& before_update = {});

  // The share of a step's micro-batches this rank runs, and the first of them.
  int64_t micro_batches_per_rank() const;
  int64_t first_micro_batch() const;

  // Providers: the learnable masks on their linears again (after an
  // evaluation with other providers), or none (the dense model).
  void attach();
  void detach();

  sparsity::Hardened harden() const { return options_.budget.harden(*masks_); }
  // The kept fraction of the hardened tile choice counting a 2:4 tile as half.
  double hard_density() const;

  // Of the last step's gradient sum over ranks (zeros with one rank).
  dist::GradReducer::Stats reduce_stats() const { return reducer_ ? reducer_->stats() : dist::GradReducer::Stats{}; }

  sparsity::MaskSet& masks() { return *masks_; }
  const sparsity::MaskSet& masks() const { return *masks_; }
  MaskOptimizer& optimizer() { return *opt_; }
  const sparsity::SamplerState& state() const { return *state_; }
  const StepOptions& options() const { return options_; }

 private:
  at::Tensor lm_loss(const at::Tensor& ids);
  // This rank's micro-batches' forward and backward; returns the step's LM
  // term (float64 device scalar, detached). `reduce`: sum over ranks during
  // the last backward.
  at::Tensor backward_micro_batches(const std::vector<at::Tensor>& ids, bool reduce);
  StepStats eager_step(int64_t step, double lr, const std::vector<at::Tensor>& micro_batches,
                       const Inspect& before_update);
  StepStats graph_step(double lr, const std::vector<at::Tensor>& micro_batches);
  at::Tensor weight_term() const;

  model::Decoder& model_;
  StepOptions options_;
  dist::Group* group_;
  std::shared_ptr<sparsity::SamplerState> state_;
  std::unique_ptr<sparsity::MaskSet> masks_;
  std::unique_ptr<MaskOptimizer> opt_;
  double weight_norm_total_ = 0.0;  // sum over layers of ||W||, for the weight term
  // Built at the first step, after a resume has loaded the logits: the reducer
  // hooks the tensors themselves, the graph captures them.
  std::optional<dist::GradReducer> reducer_;
  std::optional<core::CudaGraph> graph_;
  at::Tensor graph_ids_;  // [micro-batches of this rank, micro, seq] on the device
  struct {
    at::Tensor ce, reg, density, norm;
  } graph_out_;
};

}  // namespace patch::train

#pragma once
// The options of mask learning, read from the configuration once into a typed
// struct and checked once: what the step does (MaskLearner) and what the loop
// around it does (run_training). Everything else reads these fields, not keys.
#include <ATen/ATen.h>

#include <cstdint>

#include "config/config.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/schedule.h"
#include "train/adamw.h"

namespace patch::train {

// One mask-learning step: the masks, their schedules and budget, the loss and
// regularizers, the optimizer and how the step is executed.
struct StepOptions {
  sparsity::MaskSetOptions masks;     // mask.mode/tile/include/exclude/init_std/kernel, train.state/seed
  sparsity::SamplerSchedule schedule;  // mask.tau_* / scale_* / anneal
  bool hard_24 = false, hard_tile = false;
  sparsity::Budget budget;  // mask.target_sparsity, mask.budget
  int64_t steps = 1000;     // the schedules' and the learning rate's length
  int64_t micro_batch = 4, global_batch = 8;
  double lr = 0.05, min_lr_ratio = 0.1;
  int64_t warmup_steps = 0;
  double grad_clip = 1.0;
  double lambda_sparsity = 10.0;
  double lambda_weight = 0.0;  // the kept-weight term, decaying linearly to 0
  bool distill = false;        // train.loss=kd: divergence from the unmasked model
  AdamWOptions adamw;
  bool cuda_graph = false;  // each step one graph replay
  int64_t nproc = 1;        // dist.nproc: ranks the launcher starts

  int64_t micro_batches() const { return global_batch / micro_batch; }
  bool compact() const { return masks.mask.compact; }
};

// The loop around the steps.
struct TrainOptions {
  StepOptions step;
  uint64_t seed = 0;  // train.seed: logits, noise and the data order
  int64_t eval_every = 0, eval_blocks = 0, checkpoint_every = 0, log_every = 1;
};

// Reads every train.* and mask.* key the step and the loop use; `device` is
// where the masks live (the rank's device).
TrainOptions train_options(const config::Config& cfg, at::Device device);

// Throws core::ConfigError unless the step can run as configured over `world`
// ranks: a step's micro-batches (global_batch / micro_batch) a multiple of
// `world` and full optimizer state (compact state updates inside each
// backward); with cuda_graph one process, a CUDA device, fused masks and
// lambda_weight 0; compact state needs the fused kernel, one micro-batch per
// step and lambda_weight 0. The only place these rules live.
void check_step_options(const StepOptions& o, int world);

}  // namespace patch::train

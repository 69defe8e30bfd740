#pragma once
// Benchmark of one mask-learning step (not a test): a random-weight model of a
// real model's shape and the step train runs (MaskLearner, with the run's
// options), timed beside nothing else.
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "io/model_config.h"
#include "train/train_options.h"

namespace patch::dist {
class Group;
}

namespace patch::train {

struct MaskBenchOptions {
  StepOptions step;  // the mode, kernel, state, graph, budget, lambdas as train reads them
  at::ScalarType dtype = at::kBFloat16;
  int64_t batch = 1, seq = 4096;  // one micro-batch per step (per rank)
  bool checkpointing = true;
  int warmup = 2, iters = 5;
  bool profile = false;  // add model::profile_kernels of one more step
  // Data parallel: every rank runs its own batch and the logit gradients are
  // summed as in training; tokens/s counts all ranks. nullptr: one process.
  dist::Group* group = nullptr;
};

// The step options of a benchmark: one micro-batch of `batch` sequences per
// rank; throws core::ConfigError where `world` ranks cannot run that step.
StepOptions bench_step_options(StepOptions step, int64_t batch, int world);

// Median step ms, tokens/s and peak GiB of MaskLearner::step on the shape
// (tile mode's 2:4 patterns from the magnitude prior).
nlohmann::json bench_mask_step(const io::ModelConfig& shape, const MaskBenchOptions& opts);

}  // namespace patch::train

#pragma once
// Benchmark of one mask-learning step (not a test): a random-weight model of a
// real model's shape, the masks of a mode, loss + regularizer backward and the
// AdamW update, timed beside nothing else.
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>
#include <string>

#include "io/model_config.h"

namespace patch::dist {
class Group;
}

namespace patch::train {

struct MaskBenchOptions {
  std::string mode = "joint";  // joint | tile | maskllm
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kBFloat16;
  int64_t batch = 1, seq = 4096;
  int64_t tile_rows = 128, tile_cols = 128;
  double target_sparsity = 0.45;
  bool checkpointing = true;
  bool fused = true;     // mask.kernel
  bool compact = false;  // train.state
  int warmup = 2, iters = 5;
  bool profile = false;  // add model::profile_kernels of one more step
  bool cuda_graph = false;  // train.cuda_graph: the step replayed as a CUDA graph
  // Data parallel: every rank runs its own batch and the logit gradients are
  // summed as in training; tokens/s counts all ranks. nullptr: one process.
  dist::Group* group = nullptr;
};

// Median step ms, tokens/s and peak GiB of the mode (the step as the trainer
// runs it: loss and density regularizer backward, clipping, AdamW).
nlohmann::json bench_mask_step(const io::ModelConfig& shape, const MaskBenchOptions& opts);

}  // namespace patch::train

#pragma once
// Mask learning (PATCH-Joint, PATCH-Tile, MaskLLM): the training loop with its
// schedules, regularizers, evaluation, checkpoints, resume and hardening.
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"

namespace patch::sparsity {
class MaskSet;
}

namespace patch::train {

// Runs (or with output.resume continues) the run configured by `cfg` in
// `out_dir`: metrics.jsonl, checkpoint.safetensors, masks.safetensors,
// report.json. Returns the process exit status (0 done, 130 stopped by a
// signal after writing a checkpoint); throws core::Error on failure (a NaN loss
// among them, keeping the last good checkpoint). `on_validated` runs once the
// configuration, the model and the data have passed every check, before
// anything is written into out_dir (the caller claims the folder there).
int run_training(const config::Config& cfg, const std::string& out_dir,
                 const std::function<void()>& on_validated = {});

// Throws core::ConfigError unless the run can be split over `world` ranks
// (a step's micro-batches, global_batch / micro_batch, a multiple of `world`,
// and full optimizer state: compact state updates inside each backward) and,
// with train.cuda_graph, unless its steps can be replayed (one process, a
// CUDA device, fused masks, lambda_weight 0); compact state needs the fused
// kernel, one micro-batch per step and lambda_weight 0.
void check_run_setup(const config::Config& cfg, int world);

// The configuration keys a resumed run may change (evaluation and logging
// cadence, devices, caches, kernels that compute the same function); every
// other key of model.*, data.*, mask.*, train.* and prune.* is part of what the
// checkpoint means.
const std::vector<std::string>& resume_mutable_keys();
// Throws core::ConfigError naming the first key whose value differs from the
// one stored in out_dir's checkpoint (nothing to check without a checkpoint).
void check_resume_config(const config::Config& cfg, const std::string& out_dir);
// The same for any checkpoint whose metadata holds the run's configuration
// ("config"), with the keys that run may change.
void check_same_run(const config::Config& cfg, const std::string& checkpoint,
                    const std::vector<std::string>& mutable_keys);

// SIGINT/SIGTERM handlers that make the loop checkpoint and stop at the next
// step boundary; a second signal kills the process as usual.
void install_stop_handlers();
// The signal received since install_stop_handlers (0: none).
int stop_signal();

}  // namespace patch::train

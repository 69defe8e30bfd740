#pragma once
// A sweep: PATCH at several target sparsities beside the dense model and the
// baselines (MaskLLM; magnitude/Wanda/SparseGPT 2:4, mask only or with
// SparseGPT's updated weights; the one-shot hybrid prunes and other learned
// modes at the sweep's targets), each trained or pruned, then evaluated, with
// the same data and steps. A learned point's result also gives its steps,
// tokens, wall time, median tokens/s and peak memory.
#include <string>

#include "config/config.h"

namespace patch::sweep {

// Runs every point of `cfg` (sweep.targets, sweep.baselines) under
// out_dir/points/<name>/, each finished by an atomic result.json; a point with
// a result is skipped and an interrupted training point resumes from its
// checkpoint, so rerunning with output.resume continues a stopped sweep
// (output.overwrite alone starts every point afresh). All points share the
// token and prior caches (core::cache_dir). Writes sweep.json and
// sweep.csv (name, method, target, sparsity, perplexity). Returns the exit
// status: 0, or 130 when a SIGINT/SIGTERM stopped it (train::install_stop_handlers).
int run_sweep(const config::Config& cfg, const std::string& out_dir);

// The checks run_sweep makes before any point (evaluation and training text
// given, every baseline known, no point twice): a ConfigError naming the key.
void check_sweep(const config::Config& cfg);

}  // namespace patch::sweep

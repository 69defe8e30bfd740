#pragma once
// One-shot pruning of a whole model, block by block as SparseGPT and Wanda do:
// the calibration hidden states go through decoder block i, its layers'
// input statistics are taken and the layers pruned, and the inputs of block
// i + 1 are block i's outputs with the pruned weights. Beside the model, memory
// holds the calibration hidden states (two copies), one block's statistics and
// the masks as bits (SparseGPT's updated weights when they are kept).
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/token_file.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "prune/methods.h"
#include "sparsity/budget.h"
#include "sparsity/prior.h"
#include "text/tokenizer.h"

namespace patch::prune {

struct CalibrationOptions {
  int64_t samples = 128;
  int64_t seq_len = 2048;
  uint64_t seed = 0;
};

// `samples` distinct windows of seq_len tokens (non-overlapping, in a seeded
// order) -> int64 [n, seq_len] on the CPU; n < samples (with a warning) when the
// stream is short. Throws core::Error when it holds no window at all.
at::Tensor calibration_ids(const data::TokenStream& tokens, const CalibrationOptions& opts);

// Throws core::ConfigError naming data.train when no calibration text is given.
void require_calibration_data(const config::Config& cfg);

// Calibration windows from the first data.train file (prune.calib_* keys);
// core::ConfigError when data.train is empty.
at::Tensor calibration_from_config(const config::Config& cfg, const text::Tokenizer& tok);

struct PruneOptions {
  Method method = Method::kWanda;
  Structure structure = Structure::k24;
  double target_sparsity = 0.5;  // unstructured and hybrid (2:4 is 0.5 by definition)
  int64_t tile_rows = 128, tile_cols = 128;
  sparsity::BudgetKind budget = sparsity::BudgetKind::kGlobal;
  std::vector<std::string> include = {"*"}, exclude;
  SparseGPTOptions sparsegpt;  // update_weights: keep SparseGPT's updated weights
  // Reconstruction under given masks: every layer of the file keeps its mask
  // as it is (structure, tiles and target come from the file; layers the file
  // lacks stay dense) and SparseGPT only updates the kept weights.
  std::shared_ptr<const maskfile::MaskFile> fixed_masks;
  int64_t micro_batch = 4;     // calibration sequences per block forward
};

struct PruneResult {
  maskfile::MaskFile masks;  // hybrid (2:4, hybrid) or unstructured, mode "oneshot"
  // SparseGPT with update_weights: the pruned, updated weight of every masked
  // layer under "<name>.weight", on the CPU in float32 (float64 for a float64
  // model), so that export rounds once, to the checkpoint's dtype.
  std::map<std::string, at::Tensor> weights;
  std::map<std::string, double> percdamp;  // SparseGPT: the dampening each layer needed
  int calibration_passes = 0;
};

// Prunes the selected linears of `decoder` (weights are never written: each
// pruned layer gets a provider, its mask as bits or SparseGPT's updated weight,
// so the decoder computes the pruned model afterwards). calib: int64 [n, seq] token ids (unused by
// magnitude). Hybrid runs two passes: an unstructured prune at the target gives
// each tile's survivor fraction, the exact budget picks the dense tiles, and a
// second pass prunes 2:4 inside the other tiles.
PruneResult prune_model(model::Decoder& decoder, const at::Tensor& calib, const PruneOptions& opts);

// PATCH priors from a one-shot method, for every selected layer: the 2:4
// pattern of a 2:4 prune and, as tile scores, each tile's survivor fraction of
// an unstructured prune at the target (mask only, two calibration passes;
// magnitude needs none). Leaves the decoder dense.
std::map<std::string, sparsity::Prior> oneshot_priors(model::Decoder& decoder, const at::Tensor& calib,
                                                      const PruneOptions& opts);

// Priors as safetensors (<layer>.pattern uint8, <layer>.tile_score float32),
// written atomically, so that a sweep computes each one once.
void save_priors(const std::string& path, const std::map<std::string, sparsity::Prior>& priors);
std::map<std::string, sparsity::Prior> load_priors(const std::string& path);

// The prune.* / mask.* keys of a resolved configuration.
PruneOptions prune_options(const config::Config& cfg);
CalibrationOptions calibration_options(const config::Config& cfg);

}  // namespace patch::prune

#pragma once
// masks.safetensors: the hardened masks of a run (docs/mask_format.md). Per
// masked layer `<hf name>.tile_dense` (uint8 [rows, cols], 1 = dense) and
// `<hf name>.pattern_2_4` (uint8 [out, in/4], 2:4 pattern 0-5 used in sparse
// tiles), plus string metadata.
#include <ATen/ATen.h>

#include <limits>
#include <map>
#include <string>
#include <vector>

#include "sparsity/budget.h"
#include "sparsity/prior.h"

namespace patch::maskfile {

inline constexpr const char* kFormat = "patch-masks";
inline constexpr const char* kFormatVersion = "1";

// One layer's hard mask; mask() rebuilds the [out, in] 0/1 mask.
using LayerMask = sparsity::HardenedLayer;

struct MaskFileMeta {
  std::string mode = "joint";  // joint | tile | maskllm
  int64_t tile_rows = 128, tile_cols = 128;
  double target_sparsity = std::numeric_limits<double>::quiet_NaN();    // NaN: not recorded
  double achieved_sparsity = std::numeric_limits<double>::quiet_NaN();  // NaN: not recorded
  std::string model_config_hash, model_source;
  std::string training_config;  // JSON text of the resolved configuration
  std::string created_by;       // empty: "patch-train <version>" when written
};

struct MaskFile {
  std::string path;  // where it was read from (error messages); empty when built in memory
  MaskFileMeta meta;
  std::vector<LayerMask> layers;

  const LayerMask* find(const std::string& name) const;  // nullptr if absent
  int64_t total_weights() const;
  double sparsity() const;  // recomputed from the masks: zeros / masked weights
};

// A mask file of hardened masks: mode, tile size, target and achieved sparsity
// come from `hard`; the other fields from `meta`.
MaskFile from_hardened(const sparsity::Hardened& hard, MaskFileMeta meta = {});

// Validates `file` (as the loader would) and writes it atomically.
void write_mask_file(const std::string& path, const MaskFile& file);
// Reads and validates: format/format_version known, tile "RxC" (cols a multiple
// of 4), mode known, every layer has both tensors as uint8 with consistent
// shapes, tile_dense 0/1, pattern_2_4 0-5. Throws core::Error (one line naming
// the file and the layer) otherwise. Tensors view the mapped file.
MaskFile read_mask_file(const std::string& path);

// Throws core::Error unless the layer's mask fits a weight [out, in].
void check_layer_shape(const MaskFile& file, const LayerMask& layer, int64_t out, int64_t in);

// A mask file as a prior: the file's pattern and tile_dense as the tile score.
sparsity::Prior prior_from_layer(const LayerMask& layer);
std::map<std::string, sparsity::Prior> priors_from_file(const MaskFile& file);

}  // namespace patch::maskfile

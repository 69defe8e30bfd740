#pragma once
// masks.safetensors: the hardened masks of a run (docs/mask_format.md). Hybrid
// files hold per masked layer `<hf name>.tile_dense` (uint8 [rows, cols], 1 =
// dense) and `<hf name>.pattern_2_4` (uint8 [out, in/4], 2:4 pattern 0-5 used in
// sparse tiles); unstructured files (one-shot baselines) hold `<hf name>.keep`,
// a bitmask; plus string metadata.
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

// An unstructured mask: bit (j % 8) of byte [i, j / 8] (least significant
// first, numpy's bitorder="little") is 1 when weight [i, j] is kept.
struct BitmaskLayer {
  std::string name;
  int64_t out = 0, in = 0;
  at::Tensor bits;  // uint8 [out, in / 8]

  at::Tensor mask(at::ScalarType dtype = at::kFloat) const;  // 0/1 [out, in], on bits' device
  int64_t zero_weights() const;
};
// keep [out, in] (nonzero = kept, in a multiple of 8) -> uint8 [out, in / 8].
at::Tensor pack_bits(const at::Tensor& keep);

struct MaskFileMeta {
  std::string structure = "hybrid";  // hybrid (tiles + 2:4) | unstructured (bitmask)
  // How the masks were made: joint | tile | maskllm (learned), oneshot (patch-train prune).
  std::string mode = "joint";
  std::string method;  // oneshot: magnitude | wanda | sparsegpt; empty otherwise
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
  std::vector<LayerMask> layers;       // structure hybrid
  std::vector<BitmaskLayer> bitmasks;  // structure unstructured

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
// of 4), mode and structure known, every layer has both tensors as uint8 with
// consistent shapes, tile_dense 0/1, pattern_2_4 0-5 (unstructured: one uint8
// `.keep` [out, in/8] per layer). Throws core::Error (one line naming
// the file and the layer) otherwise. Tensors view the mapped file.
MaskFile read_mask_file(const std::string& path);

// Throws core::Error unless the layer's mask fits a weight [out, in].
void check_layer_shape(const MaskFile& file, const LayerMask& layer, int64_t out, int64_t in);

// The [out, in] 0/1 mask of a layer of either structure; undefined when the
// file has no such layer.
at::Tensor layer_mask(const MaskFile& file, const std::string& name, at::ScalarType dtype = at::kFloat);

// Kept fraction per layer, per decoder block and in total, with the dense tile
// count of hybrid layers: a fixed-width table, one row per line.
std::string density_table(const MaskFile& file);

// A hybrid mask file as a prior: the file's pattern and tile_dense as the tile score.
sparsity::Prior prior_from_layer(const LayerMask& layer);
std::map<std::string, sparsity::Prior> priors_from_file(const MaskFile& file);

}  // namespace patch::maskfile

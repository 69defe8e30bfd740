#pragma once
// The packed hybrid format (packed.safetensors, docs/mask_format.md): each
// masked layer stored the way it is deployed. Dense tiles keep all their
// weights; 2:4 tiles keep only the two kept values of every group of four plus
// their 2-bit positions, so a sparse tile costs 9/16 of a dense one's bytes.
// Per layer:
//   <name>.shape       int64 [2]         out, in
//   <name>.tile_dense  uint8 [rows, cols] 1 = dense tile (tiles as in the mask file)
//   <name>.dense       bf16  [n]         dense tiles in row-major tile order, each tile row-major
//   <name>.values      bf16  [m]         kept values of the sparse tiles, same order, per group
//                                        the lower position first
//   <name>.indices     uint8 [ceil(m/4)] per group (i0 | i1 << 2), i0 < i1 the kept positions
//                                        0-3; two groups per byte, the first in the low nibble
// All weights are bfloat16, the deployment dtype of the kernels.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "maskfile/mask_file.h"
#include "sparsity/tile_grid.h"

namespace patch::deploy {

inline constexpr const char* kPackedFormat = "patch-packed";
inline constexpr const char* kPackedFormatVersion = "1";

struct PackedLayer {
  std::string name;
  sparsity::TileGrid grid;
  at::Tensor tile_dense;  // uint8 [rows, cols] (CPU)
  at::Tensor dense;       // bf16 [weights in dense tiles]
  at::Tensor values;      // bf16 [weights in sparse tiles / 2]
  at::Tensor indices;     // uint8 [ceil(sparse groups / 2)]

  int64_t dense_tiles() const;
  double sparse_tile_fraction() const;  // 2:4 tiles / tiles
  int64_t bytes() const;    // of the four weight tensors
  double sparsity() const;  // zeros / weights
};

// Packs W ⊙ M of one layer (weight [out, in], any floating dtype, cast to
// bfloat16). Throws core::Error when the mask does not fit the weight.
PackedLayer pack_layer(const at::Tensor& weight, const maskfile::LayerMask& mask);
// W ⊙ M back as bfloat16 [out, in] on the CPU: the reference every deployed
// kernel is checked against.
at::Tensor unpack_layer(const PackedLayer& layer);
// Per group of the layer's [out, in/4] groups, its nibble (i0 | i1 << 2) as
// uint8; dense tiles' groups get 0. The CUDA formats are built from it.
at::Tensor group_nibbles(const PackedLayer& layer);
// Per group, its two kept values (the lower position first) as bfloat16
// [out, in/4, 2]; dense tiles' groups get zeros.
at::Tensor kept_values(const PackedLayer& layer);

struct PackedModel {
  std::string path;  // where it was read from; empty when built in memory
  std::string model_source, created_by;
  int64_t tile_rows = 128, tile_cols = 128;
  std::vector<PackedLayer> layers;

  const PackedLayer* find(const std::string& name) const;  // nullptr if absent
  double sparsity() const;
  int64_t bytes() const;
};

// Packs every hybrid layer of `masks` with its weight from `ckpt`. Throws
// core::Error for an unstructured mask file, a layer the checkpoint lacks or a
// shape that does not fit.
PackedModel pack_model(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks);
// Atomic write (temporary file + rename).
void write_packed(const std::string& path, const PackedModel& model);
// Reads and validates (format, version, per-layer tensors, dtypes and sizes
// consistent with the shape and tile map, indices valid 2:4 positions); throws
// core::Error with one line naming the file and the layer otherwise.
PackedModel read_packed(const std::string& path);

}  // namespace patch::deploy

#pragma once
// The mask files the PATCH and MaskLLM authors release, in and out
// (docs/mask_format.md, "Other formats"):
//   PATCH `mask.npz`: per decoder linear, `<hf name>.weight` = np.packbits of
//     the row-major flattened boolean keep-mask (numpy's big-endian bit order),
//     `<hf name>.weight.__shape__` = its [out, in], and one `__meta__` JSON
//     string (base_model, sparsity, pattern, tile_size, ...);
//   MaskLLM `mask_compressed.npz`: `<hf name>.mask` = the same packbits, no
//     shape (the model gives it).
// A flat mask becomes a hybrid one tile by tile: all kept = dense, exactly two
// of every four kept = 2:4 with that pattern; any other tile is refused, or
// repaired when asked.
#include <ATen/ATen.h>

#include <map>
#include <string>

#include "maskfile/mask_file.h"

namespace patch::maskfile {

enum class NpzLayout { kPatch, kMaskLLM };

// "patch-npz" | "maskllm-npz" -> layout; throws core::ConfigError naming `key` otherwise.
NpzLayout parse_npz_layout(const std::string& name, const std::string& key);
const char* npz_layout_name(NpzLayout layout);

struct NpzImportOptions {
  // The tile size: from the PATCH file's __meta__ when it names one, else this.
  // A size given explicitly (tile_given) must divide the one __meta__ claims.
  int64_t tile_rows = 128, tile_cols = 128;
  bool tile_given = false;
  // The model's decoder linears by our name (weights [out, in]): their shapes
  // are checked (and are the only source of shapes for a MaskLLM file), names
  // unknown to the model are refused. Empty: no model given.
  std::map<std::string, at::Tensor> weights;
  std::string model_source, model_config_hash;
  // Tiles that are neither dense nor 2:4 become whichever of the two changes
  // fewer of their bits; a 2:4 group keeps the two weights of largest
  // magnitude among those the file kept (then among the rest). Needs weights.
  bool repair = false;
};

struct NpzImportReport {
  NpzLayout layout = NpzLayout::kPatch;
  int64_t dense_tiles = 0, sparse_tiles = 0;
  int64_t repaired_tiles = 0, changed_weights = 0;  // repair only
  std::vector<std::string> absent;  // model linears the file has no mask for (left dense)
};

// Reads either layout (told apart by its keys) into a hybrid mask file.
// Throws core::Error naming the file and the entry: a mask of the wrong size,
// a non-uint8/bool array, a missing __shape__, an unknown layer, a tile that
// fits neither dense nor 2:4 (unless repair), a tile size that does not divide
// the __meta__'s.
MaskFile import_npz(const std::string& path, const NpzImportOptions& opts, NpzImportReport* report = nullptr);

// Writes a mask file of either structure in the given layout, atomically.
void export_npz(const MaskFile& file, const std::string& path, NpzLayout layout);

// np.packbits(keep.flatten()) of a [out, in] 0/1 mask (any dtype), and back.
std::string packbits_big_endian(const at::Tensor& keep);
at::Tensor unpackbits_big_endian(const std::string& bits, int64_t out, int64_t in);  // uint8 0/1

}  // namespace patch::maskfile

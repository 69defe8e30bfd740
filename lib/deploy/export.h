#pragma once
// Deployment outputs. export_checkpoint writes a pruned Hugging Face checkpoint
// that transformers loads as it is.
#include <ATen/ATen.h>

#include <map>
#include <string>

#include "io/checkpoint.h"
#include "maskfile/mask_file.h"

namespace patch::deploy {

// Writes `out_dir` from a Hugging Face safetensors checkpoint: the same shard
// files, tensor names, order and dtypes; each weight in `replace`
// ("<layer>.weight" -> tensor, e.g. SparseGPT's updated weights) cast to the
// stored dtype; then every weight of a layer in `masks` multiplied by its mask
// (zeros exactly where the mask says). Every other file of the input directory
// (tokenizer, generation config, index) is copied, config.json gains
// "patch_masks": "masks.safetensors" and the mask file is copied beside it. The
// directory is written under a temporary name and renamed into place; an
// existing out_dir is replaced. Throws core::Error for a GGUF input, a layer the
// checkpoint lacks or a shape that does not fit.
void export_checkpoint(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks,
                       const std::map<std::string, at::Tensor>& replace, const std::string& out_dir);

}  // namespace patch::deploy

#pragma once
// Deployment outputs. export_checkpoint writes a pruned Hugging Face checkpoint
// that transformers loads as it is.
#include <ATen/ATen.h>

#include <map>
#include <nlohmann/json.hpp>
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
// "patch_masks": "masks.safetensors" and the mask file is copied beside it,
// into out_dir (created if missing): callers give it a staging folder of a
// core::OutputSet, which publishes the whole set at once. A GGUF input becomes
// one model.safetensors under Hugging Face names in its stored dtype (float32
// for quantized tensors) with a config.json made from its metadata; its
// tokenizer is not converted (tokenizer files are not written). Throws
// core::Error for a layer the checkpoint lacks or a shape that does not fit.
void export_checkpoint(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks,
                       const std::map<std::string, at::Tensor>& replace, const std::string& out_dir);

// The Hugging Face config.json of a model (what transformers needs to load a
// GGUF-derived checkpoint as LlamaForCausalLM / Qwen2 / Qwen3 / Mistral).
nlohmann::ordered_json hf_config_json(const io::ModelConfig& cfg);

}  // namespace patch::deploy

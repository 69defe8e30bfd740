#pragma once
// One entry point for every checkpoint a user has: a Hugging Face directory
// (config.json + model.safetensors or a sharded index) or a .gguf file.
// Tensors come back under Hugging Face names on the CPU in the stored dtype
// (GGUF quantized tensors dequantized, one at a time, into `dequant_dtype`, the
// compute dtype, so no float32 copy of a quantized file is ever held), and
// GGUF's rotary convention is undone so the same decoder computes the same
// function for both formats.
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/model_config.h"

namespace patch::io {

class GgufFile;

struct Checkpoint {
  std::string source;  // the path given
  std::string format;  // "safetensors" | "gguf"
  ModelConfig config;
  // Hugging Face name -> tensor. A tied lm_head/embedding appears under both
  // names (same storage).
  std::map<std::string, at::Tensor> tensors;
  // safetensors: the file each tensor came from (for sharded export).
  std::map<std::string, std::string> tensor_file;
  std::shared_ptr<GgufFile> gguf;  // set for GGUF inputs (tokenizer lives there)
};

Checkpoint load_checkpoint(const std::string& path, at::ScalarType dequant_dtype = at::kFloat);

// GGUF name -> Hugging Face name ("blk.7.attn_q.weight" ->
// "model.layers.7.self_attn.q_proj.weight"); empty when unknown.
std::string gguf_to_hf_name(const std::string& gguf_name);

}  // namespace patch::io

#include "deploy/export.h"

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "io/safetensors.h"

namespace patch::deploy {
namespace {

namespace fs = std::filesystem;

std::string layer_of(const std::string& tensor) {
  const std::string suffix = ".weight";
  if (tensor.size() <= suffix.size() || tensor.compare(tensor.size() - suffix.size(), suffix.size(), suffix) != 0)
    return {};
  return tensor.substr(0, tensor.size() - suffix.size());
}

bool has_layer(const maskfile::MaskFile& masks, const std::string& name) {
  if (masks.find(name)) return true;
  for (const auto& b : masks.bitmasks)
    if (b.name == name) return true;
  return false;
}

// The tensor as written: replaced, then masked, in `dtype`.
at::Tensor output_tensor(const std::string& name, at::Tensor t, at::ScalarType dtype, const maskfile::MaskFile& masks,
                         const std::map<std::string, at::Tensor>& replace) {
  auto rep = replace.find(name);
  if (rep != replace.end()) t = rep->second;
  t = t.to(at::kCPU, dtype);
  const std::string layer = layer_of(name);
  if (!layer.empty() && has_layer(masks, layer)) t = t * maskfile::layer_mask(masks, layer, at::kFloat).to(dtype);
  return t;
}

}  // namespace

nlohmann::ordered_json hf_config_json(const io::ModelConfig& c) {
  static const std::map<std::string, std::string> kArch = {{"llama", "LlamaForCausalLM"},
                                                           {"mistral", "MistralForCausalLM"},
                                                           {"qwen2", "Qwen2ForCausalLM"},
                                                           {"qwen3", "Qwen3ForCausalLM"}};
  auto arch = kArch.find(c.model_type);
  if (arch == kArch.end()) throw core::Error(core::str("export: no Hugging Face architecture for '", c.model_type, "'"));
  nlohmann::ordered_json j;
  j["architectures"] = {arch->second};
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling)
    j["rope_scaling"] = {{"rope_type", c.rope_scaling->type},
                         {"factor", c.rope_scaling->factor},
                         {"low_freq_factor", c.rope_scaling->low_freq_factor},
                         {"high_freq_factor", c.rope_scaling->high_freq_factor},
                         {"original_max_position_embeddings", c.rope_scaling->original_max_position_embeddings}};
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["hidden_act"] = "silu";
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  j["torch_dtype"] = c.torch_dtype;
  return j;
}

void export_checkpoint(const io::Checkpoint& ckpt, const maskfile::MaskFile& masks,
                       const std::map<std::string, at::Tensor>& replace, const std::string& out_dir) {
  const fs::path src(ckpt.source);
  // Every masked layer and replaced weight must exist with the right shape.
  auto check_layer = [&](const std::string& name, int64_t out, int64_t in) {
    auto it = ckpt.tensors.find(name + ".weight");
    if (it == ckpt.tensors.end())
      throw core::Error(core::str(masks.path.empty() ? "masks" : masks.path, ": layer '", name, "' is not in ", ckpt.source));
    if (it->second.dim() != 2 || it->second.size(0) != out || it->second.size(1) != in)
      throw core::Error(core::str(masks.path.empty() ? "masks" : masks.path, ": layer '", name, "' is [", out, ", ", in,
                            "] but the checkpoint's weight is ", it->second.sizes()));
  };
  for (const auto& l : masks.layers) check_layer(l.name, l.grid.out(), l.grid.in());
  for (const auto& b : masks.bitmasks) check_layer(b.name, b.out, b.in);
  for (const auto& [name, t] : replace) {
    auto it = ckpt.tensors.find(name);
    if (it == ckpt.tensors.end() || !it->second.sizes().equals(t.sizes()))
      throw core::Error(core::str("export: replacement '", name, "' ", t.sizes(), " does not match a tensor of ", ckpt.source));
  }

  const std::string tmp = out_dir;
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec) throw core::Error(core::str("export: cannot create '", tmp, "': ", ec.message()));

  at::NoGradGuard no_grad;
  if (ckpt.format == "gguf") {
    // One file under Hugging Face names; a tied lm_head is left to tie_word_embeddings.
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& [name, t] : ckpt.tensors) {
      if (name == "lm_head.weight" && ckpt.config.tie_word_embeddings) continue;
      tensors.emplace_back(name, output_tensor(name, t, t.scalar_type(), masks, replace));
    }
    io::write_safetensors((fs::path(tmp) / "model.safetensors").string(), tensors, {{"format", "pt"}});
    auto config = hf_config_json(ckpt.config);
    config["patch_masks"] = "masks.safetensors";
    config["patch_source"] = ckpt.source;
    core::write_file_atomic((fs::path(tmp) / "config.json").string(), config.dump(2) + "\n");
  } else {
    std::set<std::string> shards;
    for (const auto& [name, file] : ckpt.tensor_file) shards.insert(file);
    for (const auto& shard : shards) {
      io::SafetensorsFile in(shard);
      auto entries = in.entries();
      std::stable_sort(entries.begin(), entries.end(),
                       [](const io::SafetensorsEntry& a, const io::SafetensorsEntry& b) { return a.begin < b.begin; });
      std::vector<std::pair<std::string, at::Tensor>> tensors;
      for (const auto& e : entries)
        tensors.emplace_back(e.name, output_tensor(e.name, in.tensor(e.name), e.dtype, masks, replace));
      io::write_safetensors((fs::path(tmp) / fs::path(shard).filename()).string(), tensors, in.metadata());
      core::log::info(core::str("export: wrote ", fs::path(shard).filename().string(), " (", tensors.size(), " tensors)"));
    }
    // Everything else of the input directory, config.json with the mask reference.
    for (const auto& entry : fs::directory_iterator(src)) {
      if (!entry.is_regular_file()) continue;
      const auto name = entry.path().filename().string();
      if (name == "config.json" || entry.path().extension() == ".safetensors") continue;
      fs::copy_file(entry.path(), fs::path(tmp) / name, fs::copy_options::overwrite_existing, ec);
      if (ec) throw core::Error(core::str("export: cannot copy '", entry.path().string(), "': ", ec.message()));
    }
    auto config = nlohmann::ordered_json::parse(core::read_file((src / "config.json").string()));
    config["patch_masks"] = "masks.safetensors";
    core::write_file_atomic((fs::path(tmp) / "config.json").string(), config.dump(2) + "\n");
  }
  maskfile::write_mask_file((fs::path(tmp) / "masks.safetensors").string(), masks);
}

}  // namespace patch::deploy

#pragma once
// The decoder's hyper-parameters, read from a Hugging Face config.json or from
// GGUF metadata. One struct for the whole LLaMA family.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace patch::io {

struct RopeScaling {
  std::string type;  // "llama3" (the only supported type)
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string model_type;  // llama | mistral | qwen2 | qwen3
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // hidden_size / num_heads unless the config says otherwise
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm of q and k (Qwen3)
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  std::string torch_dtype = "float32";  // dtype the checkpoint stores
  nlohmann::json raw;  // config.json as read (empty for GGUF), for export
};

// Throws core::Error naming `source` and the key for a missing key, an
// unsupported model_type/architecture or an unsupported feature.
ModelConfig parse_hf_config(const nlohmann::json& j, const std::string& source);
ModelConfig load_hf_config(const std::string& config_json_path);
// Canonical JSON of the fields above (for hashing a model's shape into mask files).
std::string config_fingerprint(const ModelConfig& c);
// A short hash of the fingerprint, as mask files record it (model_config_hash).
std::string config_hash(const ModelConfig& c);

}  // namespace patch::io

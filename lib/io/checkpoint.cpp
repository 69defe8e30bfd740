// Checkpoint loading (HF directories and GGUF) and the HF config.json parser.
#include "io/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <set>

#include "core/strings.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "io/gguf.h"
#include "io/model_config.h"
#include "io/safetensors.h"

namespace patch::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* const kEmbed = "model.embed_tokens.weight";
const char* const kLmHead = "lm_head.weight";

// Typed access to config.json keys; null counts as absent (HF writes nulls for
// unset optionals). Every error names the config file and the key.
class ConfigKeys {
 public:
  ConfigKeys(const json& j, const std::string& source) : j_(j), source_(source) {}

  core::Error error(const std::string& key, const std::string& what) const {
    return core::Error(core::str(source_, ": key '", key, "': ", what));
  }
  const json* find(const std::string& key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const std::string& key) const {
    const json* v = find(key);
    if (!v) throw core::Error(core::str(source_, ": missing required key '", key, "'"));
    return as_int(*v, key);
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    const json* v = find(key);
    return v ? as_int(*v, key) : fallback;
  }
  int64_t positive(const std::string& key) const {
    const int64_t v = integer(key);
    if (v <= 0) throw error(key, core::str("must be positive, got ", v));
    return v;
  }
  double number(const std::string& key, double fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_number()) throw error(key, "expected a number, got " + v->dump());
    return v->get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_boolean()) throw error(key, "expected true or false, got " + v->dump());
    return v->get<bool>();
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    if (!v->is_string()) throw error(key, "expected a string, got " + v->dump());
    return v->get<std::string>();
  }
  // A token id, or a list of them (the first is taken); -1 when unset.
  int64_t token_id(const std::string& key) const {
    const json* v = find(key);
    if (!v) return -1;
    if (v->is_array()) return v->empty() ? -1 : as_int((*v)[0], key);
    return as_int(*v, key);
  }

 private:
  int64_t as_int(const json& v, const std::string& key) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float() &&
        v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>())))
      return static_cast<int64_t>(v.get<double>());
    throw error(key, "expected an integer, got " + v.dump());
  }

  const json& j_;
  const std::string& source_;
};

std::string model_type_of(const ConfigKeys& keys, const json& j, const std::string& source) {
  std::string type = keys.string("model_type", "");
  if (type.empty() && j.contains("architectures") && j["architectures"].is_array() &&
      !j["architectures"].empty() && j["architectures"][0].is_string()) {
    static const std::map<std::string, std::string> kArch = {{"LlamaForCausalLM", "llama"},
                                                             {"MistralForCausalLM", "mistral"},
                                                             {"Qwen2ForCausalLM", "qwen2"},
                                                             {"Qwen3ForCausalLM", "qwen3"}};
    const std::string arch = j["architectures"][0].get<std::string>();
    auto it = kArch.find(arch);
    if (it == kArch.end())
      throw core::Error(core::str(source, ": unsupported architecture '", arch,
                                  "' (supported: llama, mistral, qwen2, qwen3)"));
    type = it->second;
  }
  if (type.empty()) throw core::Error(core::str(source, ": missing required key 'model_type'"));
  if (type != "llama" && type != "mistral" && type != "qwen2" && type != "qwen3")
    throw core::Error(core::str(source, ": unsupported model_type '", type,
                                "' (supported: llama, mistral, qwen2, qwen3)"));
  return type;
}

// rope_scaling (transformers 4) or rope_parameters (transformers 5).
void parse_rope(const ConfigKeys& keys, const std::string& source, ModelConfig& c) {
  const json* params = keys.find("rope_parameters");
  if (params && !params->is_object())
    throw keys.error("rope_parameters", "expected an object, got " + params->dump());
  c.rope_theta = keys.number("rope_theta", 10000.0);
  if (!keys.find("rope_theta") && params)
    c.rope_theta = ConfigKeys(*params, source).number("rope_theta", 10000.0);

  std::string key = "rope_scaling";
  const json* scaling = keys.find(key);
  if (!scaling) {
    scaling = params;
    key = "rope_parameters";
  }
  if (!scaling) return;
  if (!scaling->is_object()) throw keys.error(key, "expected an object, got " + scaling->dump());
  const ConfigKeys s(*scaling, source);
  std::string type = s.string("rope_type", s.string("type", "default"));
  if (type == "default") return;
  if (type != "llama3")
    throw keys.error(
        key, core::str("rope type '", type, "' is unsupported (supported: default, llama3)"));
  auto required = [&](const std::string& k) {
    if (!s.find(k)) throw keys.error(key, core::str("llama3 rope scaling needs '", k, "'"));
    return s.number(k, 0.0);
  };
  RopeScaling r;
  r.type = type;
  r.factor = required("factor");
  r.low_freq_factor = required("low_freq_factor");
  r.high_freq_factor = required("high_freq_factor");
  r.original_max_position_embeddings =
      static_cast<int64_t>(required("original_max_position_embeddings"));
  c.rope_scaling = r;
}

}  // namespace

ModelConfig parse_hf_config(const json& j, const std::string& source) {
  if (!j.is_object()) throw core::Error(core::str(source, ": config is not a JSON object"));
  const ConfigKeys keys(j, source);
  ModelConfig c;
  c.model_type = model_type_of(keys, j, source);
  c.hidden_size = keys.positive("hidden_size");
  c.intermediate_size = keys.positive("intermediate_size");
  c.num_layers = keys.positive("num_hidden_layers");
  c.num_heads = keys.positive("num_attention_heads");
  c.vocab_size = keys.positive("vocab_size");
  c.num_kv_heads = keys.integer("num_key_value_heads", c.num_heads);
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw keys.error(
        "num_key_value_heads",
        core::str(c.num_kv_heads, " does not divide num_attention_heads ", c.num_heads));
  if (keys.find("head_dim")) {
    c.head_dim = keys.integer("head_dim");
  } else {
    if (c.hidden_size % c.num_heads != 0)
      throw keys.error("num_attention_heads",
                       core::str(c.num_heads, " does not divide hidden_size ", c.hidden_size));
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    throw keys.error("head_dim", core::str("must be positive and even, got ", c.head_dim));
  c.max_position_embeddings = keys.integer("max_position_embeddings", c.max_position_embeddings);
  c.rms_norm_eps = keys.number("rms_norm_eps", c.rms_norm_eps);
  parse_rope(keys, source, c);
  c.tie_word_embeddings = keys.boolean("tie_word_embeddings", false);
  c.bos_token_id = keys.token_id("bos_token_id");
  c.eos_token_id = keys.token_id("eos_token_id");
  c.torch_dtype = keys.string("torch_dtype", keys.string("dtype", c.torch_dtype));

  const std::string act = keys.string("hidden_act", "silu");
  if (act != "silu")
    throw keys.error("hidden_act", "activation '" + act + "' is unsupported (supported: silu)");
  if (keys.boolean("mlp_bias", false)) throw keys.error("mlp_bias", "MLP biases are unsupported");
  if (c.model_type == "qwen2") {
    c.attention_bias = true;  // Qwen2 always has q/k/v biases
  } else {
    c.attention_bias = keys.boolean("attention_bias", false);
  }
  c.qk_norm = c.model_type == "qwen3";
  if (c.model_type == "mistral") {
    const int64_t window = keys.integer("sliding_window", -1);
    if (window >= 0 && window < c.max_position_embeddings)
      throw keys.error("sliding_window",
                       core::str("sliding window attention not supported (window ", window,
                                 " < max_position_embeddings ", c.max_position_embeddings, ")"));
  }
  if ((c.model_type == "qwen2" || c.model_type == "qwen3") &&
      keys.boolean("use_sliding_window", false))
    throw keys.error("use_sliding_window", "sliding window attention not supported");
  if (const json* layers = keys.find("layer_types")) {
    for (const auto& t : *layers)
      if (t != "full_attention")
        throw keys.error("layer_types",
                         "sliding window attention not supported (layer type " + t.dump() + ")");
  }
  c.raw = j;
  return c;
}

ModelConfig load_hf_config(const std::string& config_json_path) {
  const std::string text = core::read_file(config_json_path);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw core::Error(core::str(config_json_path, ": not valid JSON"));
  return parse_hf_config(j, config_json_path);
}

std::string config_fingerprint(const ModelConfig& c) {
  json rope = nullptr;
  if (c.rope_scaling)
    rope = {{"type", c.rope_scaling->type},
            {"factor", c.rope_scaling->factor},
            {"low_freq_factor", c.rope_scaling->low_freq_factor},
            {"high_freq_factor", c.rope_scaling->high_freq_factor},
            {"original_max_position_embeddings", c.rope_scaling->original_max_position_embeddings}};
  // nlohmann::json keeps keys sorted, so the dump is canonical.
  const json j = {{"model_type", c.model_type},
                  {"vocab_size", c.vocab_size},
                  {"hidden_size", c.hidden_size},
                  {"intermediate_size", c.intermediate_size},
                  {"num_layers", c.num_layers},
                  {"num_heads", c.num_heads},
                  {"num_kv_heads", c.num_kv_heads},
                  {"head_dim", c.head_dim},
                  {"max_position_embeddings", c.max_position_embeddings},
                  {"rms_norm_eps", c.rms_norm_eps},
                  {"rope_theta", c.rope_theta},
                  {"rope_scaling", rope},
                  {"tie_word_embeddings", c.tie_word_embeddings},
                  {"attention_bias", c.attention_bias},
                  {"qk_norm", c.qk_norm},
                  {"bos_token_id", c.bos_token_id},
                  {"eos_token_id", c.eos_token_id},
                  {"torch_dtype", c.torch_dtype}};
  return j.dump();
}

std::string config_hash(const ModelConfig& c) { return std::to_string(std::hash<std::string>{}(config_fingerprint(c))); }

std::string gguf_to_hf_name(const std::string& gguf_name) {
  static const std::map<std::string, std::string> kTop = {
      {"token_embd.weight", kEmbed},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", kLmHead}};
  static const std::map<std::string, std::string> kBlock = {
      {"attn_q", "self_attn.q_proj"},   {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},   {"attn_output", "self_attn.o_proj"},
      {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"},
      {"ffn_gate", "mlp.gate_proj"},    {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"}};
  if (auto it = kTop.find(gguf_name); it != kTop.end()) return it->second;
  // blk.<N>.<part>.<weight|bias>
  if (gguf_name.rfind("blk.", 0) != 0) return "";
  const size_t num_end = gguf_name.find('.', 4);
  const size_t part_end = gguf_name.rfind('.');
  if (num_end == std::string::npos || num_end == 4 || part_end <= num_end) return "";
  const std::string num = gguf_name.substr(4, num_end - 4);
  const std::string part = gguf_name.substr(num_end + 1, part_end - num_end - 1);
  const std::string suffix = gguf_name.substr(part_end + 1);
  if (num.find_first_not_of("0123456789") != std::string::npos) return "";
  if (suffix != "weight" && suffix != "bias") return "";
  auto it = kBlock.find(part);
  if (it == kBlock.end()) return "";
  return "model.layers." + num + "." + it->second + "." + suffix;
}

namespace {

// GGUF metadata -> ModelConfig for the llama architecture.
ModelConfig config_from_gguf(const GgufFile& g) {
  const json& m = g.metadata();
  const std::string& path = g.path();
  const std::string arch =
      m.contains("general.architecture") && m["general.architecture"].is_string()
          ? m["general.architecture"].get<std::string>()
          : "";
  if (arch != "llama")
    throw core::Error(
        core::str(path, ": general.architecture '", arch, "' is not supported (supported: llama)"));
  const ConfigKeys keys(m, path);
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = keys.positive("llama.embedding_length");
  c.intermediate_size = keys.positive("llama.feed_forward_length");
  c.num_layers = keys.positive("llama.block_count");
  c.num_heads = keys.positive("llama.attention.head_count");
  c.num_kv_heads = keys.integer("llama.attention.head_count_kv", c.num_heads);
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw keys.error("llama.attention.head_count_kv",
                     core::str(c.num_kv_heads, " does not divide the head count ", c.num_heads));
  if (keys.integer("llama.expert_count", 0) > 0)
    throw keys.error("llama.expert_count", "mixture-of-experts models are unsupported");
  c.head_dim = keys.integer("llama.attention.key_length", c.hidden_size / c.num_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 ||
      (!keys.find("llama.attention.key_length") && c.hidden_size % c.num_heads != 0))
    throw keys.error(
        "llama.attention.head_count",
        core::str("gives no even head dimension for embedding length ", c.hidden_size));
  const int64_t rope_dims = keys.integer("llama.rope.dimension_count", c.head_dim);
  if (rope_dims != c.head_dim)
    throw keys.error("llama.rope.dimension_count",
                     core::str("partial rotary (", rope_dims, " of ", c.head_dim,
                               " dimensions) is unsupported"));
  const std::string scaling = keys.string("llama.rope.scaling.type", "none");
  if (scaling != "none")
    throw keys.error("llama.rope.scaling.type", "rope scaling '" + scaling + "' is unsupported");
  c.rope_theta = keys.number("llama.rope.freq_base", 10000.0);
  c.rms_norm_eps = keys.number("llama.attention.layer_norm_rms_epsilon", 1e-5);
  c.max_position_embeddings = keys.integer("llama.context_length", c.max_position_embeddings);

  if (m.contains("tokenizer.ggml.tokens") && m["tokenizer.ggml.tokens"].is_array()) {
    c.vocab_size = static_cast<int64_t>(m["tokenizer.ggml.tokens"].size());
  } else {
    for (const auto& t : g.tensors())
      if (t.name == "token_embd.weight" && t.dims.size() == 2) c.vocab_size = t.dims[1];
  }
  if (c.vocab_size <= 0)
    throw core::Error(
        core::str(path, ": no vocabulary size (no tokenizer.ggml.tokens, no token_embd.weight)"));
  c.bos_token_id = keys.integer("tokenizer.ggml.bos_token_id", -1);
  c.eos_token_id = keys.integer("tokenizer.ggml.eos_token_id", -1);
  c.tie_word_embeddings = !g.contains("output.weight");
  c.attention_bias = g.contains("blk.0.attn_q.bias");
  for (const auto& t : g.tensors())
    if (t.name == "token_embd.weight")
      c.torch_dtype = t.ggml_type == 1 ? "float16" : t.ggml_type == 30 ? "bfloat16" : "float32";
  return c;
}

// llama.cpp's converter permutes q/k rows so that its adjacent-pair RoPE
// computes the HF rotate-half function; this is the inverse (transformers'
// `permute` in convert_llama_weights_to_hf.py): rows [h, d/2, 2] -> [h, 2, d/2].
at::Tensor undo_rope_permutation(const at::Tensor& w, int64_t n_heads, int64_t head_dim,
                                 const std::string& context) {
  if (w.dim() < 1 || w.size(0) != n_heads * head_dim)
    throw core::Error(core::str(context, ": expected ", n_heads * head_dim, " rows (", n_heads,
                                " heads of ", head_dim, "), got shape ", w.sizes()));
  std::vector<int64_t> split = {n_heads, head_dim / 2, 2};
  for (int64_t d = 1; d < w.dim(); ++d) split.push_back(w.size(d));
  return w.reshape(split).transpose(1, 2).reshape(w.sizes()).contiguous();
}

Checkpoint load_gguf(const std::string& path, at::ScalarType dequant_dtype) {
  Checkpoint ck;
  ck.source = path;
  ck.format = "gguf";
  ck.gguf = std::make_shared<GgufFile>(path);
  const GgufFile& g = *ck.gguf;
  ck.config = config_from_gguf(g);
  for (const auto& info : g.tensors()) {
    const std::string name = gguf_to_hf_name(info.name);
    if (name.empty())
      throw core::Error(core::str(path, ": tensor '", info.name,
                                  "' has no Hugging Face llama counterpart (unsupported)"));
    at::Tensor t = g.tensor(info.name, dequant_dtype);
    const std::string context = core::str(path, ": tensor '", info.name, "'");
    if (name.find(".q_proj.") != std::string::npos)
      t = undo_rope_permutation(t, ck.config.num_heads, ck.config.head_dim, context);
    else if (name.find(".k_proj.") != std::string::npos)
      t = undo_rope_permutation(t, ck.config.num_kv_heads, ck.config.head_dim, context);
    ck.tensors[name] = t;
  }
  return ck;
}

void check_weight_dtype(const SafetensorsFile& f, const SafetensorsEntry& e) {
  if (e.dtype != at::kFloat && e.dtype != at::kHalf && e.dtype != at::kBFloat16)
    throw core::Error(core::str(f.path(), ": tensor '", e.name, "' has dtype ",
                                safetensors_dtype(e.dtype),
                                "; checkpoint weights must be F32, F16 or BF16"));
}

Checkpoint load_safetensors_dir(const std::string& dir) {
  Checkpoint ck;
  ck.source = dir;
  ck.format = "safetensors";
  const fs::path root(dir);
  if (!fs::exists(root / "config.json"))
    throw core::Error(core::str(dir, ": no config.json in the checkpoint directory"));
  ck.config = load_hf_config((root / "config.json").string());

  // shard file -> the names it must provide (all of them for a single file)
  std::map<std::string, std::set<std::string>> shards;
  const fs::path single = root / "model.safetensors";
  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(single)) {
    shards[single.string()];
  } else if (fs::exists(index_path)) {
    const std::string ipath = index_path.string();
    json index = json::parse(core::read_file(ipath), nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object())
      throw core::Error(core::str(ipath, ": not a safetensors index (no 'weight_map' object)"));
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it->is_string() || it->get<std::string>().empty() ||
          it->get<std::string>().find('/') != std::string::npos)
        throw core::Error(core::str(ipath, ": weight_map entry '", it.key(),
                                    "' does not name a file in the checkpoint directory"));
      shards[(root / it->get<std::string>()).string()].insert(it.key());
    }
  } else {
    throw core::Error(
        core::str(dir, ": neither model.safetensors nor model.safetensors.index.json found"));
  }

  std::map<std::string, std::string> aliases;  // removed name -> kept name
  for (const auto& [file, names] : shards) {
    SafetensorsFile f(file);
    for (const auto& name : names)
      if (!f.contains(name))
        throw core::Error(
            core::str(file, ": tensor '", name, "' listed in the index's weight_map is missing"));
    for (const auto& e : f.entries()) {
      if (!names.empty() && !names.count(e.name)) continue;
      check_weight_dtype(f, e);
      ck.tensors[e.name] = f.tensor(e.name);
      ck.tensor_file[e.name] = file;
    }
    // safetensors' save_model drops shared tensors and records them as
    // __metadata__[removed] = kept.
    for (const auto& [key, value] : f.metadata())
      if (core::ends_with(key, ".weight") || core::ends_with(key, ".bias")) aliases[key] = value;
  }
  for (const auto& [removed, kept] : aliases) {
    if (ck.tensors.count(removed) || !ck.tensors.count(kept)) continue;
    ck.tensors[removed] = ck.tensors[kept];
    ck.tensor_file[removed] = ck.tensor_file[kept];
  }
  return ck;
}

// Ties lm_head and the embedding when only one is stored, and checks both exist.
void resolve_embeddings(Checkpoint& ck) {
  auto has = [&](const char* n) { return ck.tensors.count(n) > 0; };
  auto alias = [&](const char* to, const char* from) {
    ck.tensors[to] = ck.tensors[from];
    if (ck.tensor_file.count(from)) ck.tensor_file[to] = ck.tensor_file[from];
  };
  if (ck.config.tie_word_embeddings && has(kEmbed) && !has(kLmHead)) alias(kLmHead, kEmbed);
  if (ck.config.tie_word_embeddings && has(kLmHead) && !has(kEmbed)) alias(kEmbed, kLmHead);
  if (!has(kEmbed)) throw core::Error(core::str(ck.source, ": no tensor '", kEmbed, "'"));
  if (!has(kLmHead))
    throw core::Error(
        core::str(ck.source, ": no tensor '", kLmHead, "' and the embeddings are not tied"));
}

}  // namespace

Checkpoint load_checkpoint(const std::string& path, at::ScalarType dequant_dtype) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  Checkpoint ck;
  if (fs::is_directory(status)) {
    ck = load_safetensors_dir(path);
  } else if (fs::is_regular_file(status)) {
    char magic[4] = {};
    std::ifstream(path, std::ios::binary).read(magic, 4);
    if (std::memcmp(magic, "GGUF", 4) != 0)
      throw core::Error(core::str(path, ": neither a GGUF file nor a Hugging Face checkpoint ",
                                  "directory (config.json + model.safetensors)"));
    ck = load_gguf(path, dequant_dtype);
  } else {
    throw core::Error(core::str(path, ": no such checkpoint file or directory"));
  }
  resolve_embeddings(ck);
  return ck;
}

}  // namespace patch::io

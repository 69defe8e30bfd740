#pragma once
// The Hugging Face tokenizers pipeline (lib/text/hf_tokenizer.cpp) for
// tokenizer descriptions that do not come from a tokenizer.json file: a GGUF
// `gpt2` vocabulary is turned into the tokenizer.json it stands for and run
// through the same code.
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "text/tokenizer.h"

namespace patch::text {

// `tokenizer_json` has tokenizer.json's structure; `context` names the source
// in errors; `tokenizer_config` / `model_config` stand for tokenizer_config.json
// and config.json (null when absent). The fingerprint is `fingerprint_prefix`
// followed by the sha256 of `identity` and the special-token ids.
std::unique_ptr<Tokenizer> tokenizer_from_json(const nlohmann::json& tokenizer_json,
                                               const std::string& context,
                                               const nlohmann::json& tokenizer_config,
                                               const nlohmann::json& model_config,
                                               const std::string& identity,
                                               const std::string& fingerprint_prefix);

// GPT-2's byte-to-character alphabet (bytes_to_unicode): whether every
// character of `token` is in it, and the spelling of arbitrary bytes in it.
bool is_byte_level_spelled(std::string_view token);
std::string byte_level_spell(std::string_view bytes);

}  // namespace patch::text

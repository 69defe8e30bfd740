#pragma once
// Models named as on the Hugging Face hub ("org/name", "org/name@revision")
// resolve to their snapshot in the local hub cache, never over the network:
// the tool runs where nothing can be downloaded, and a download is the user's
// own `huggingface-cli download`.
#include <string>

namespace patch::core {

// $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
// ~/.cache/huggingface/hub: the order huggingface_hub itself uses.
std::string hf_hub_cache_dir();

// Whether `spec` has the form of a hub name: "org/name" or "org/name@revision",
// each part of letters, digits, '-', '_' and '.', not starting with '.'.
bool is_hub_name(const std::string& spec);

// The checkpoint that model.path names. A path that exists (or an "@data/",
// "@assets/" path) is returned as core::resolve_path gives it. A hub name not
// on disk resolves to its snapshot folder in the cache (refs/<revision>, by
// default refs/main); a snapshot holding no config.json but exactly one .gguf
// resolves to that file. Otherwise a ConfigError naming the key, the cache
// folder and the download command.
std::string resolve_model_path(const std::string& spec);

}  // namespace patch::core

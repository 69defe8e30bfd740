#include "text/tokenizer.h"

#include <filesystem>

#include "core/error.h"
#include "io/gguf.h"

namespace patch::text {

std::unique_ptr<Tokenizer> load_tokenizer_for(const std::string& model_path) {
  namespace fs = std::filesystem;
  const fs::path p(model_path);
  if (fs::is_directory(p)) {
    const fs::path json = p / "tokenizer.json";
    if (!fs::exists(json))
      throw core::Error(core::str(model_path, ": no tokenizer.json in the model directory"));
    return load_hf_tokenizer(json.string());
  }
  if (!fs::exists(p)) throw core::Error(core::str(model_path, ": no such file or directory"));
  if (p.extension() == ".gguf") return load_gguf_tokenizer(io::GgufFile(model_path));
  if (p.extension() == ".json") return load_hf_tokenizer(model_path);
  throw core::Error(
      core::str(model_path,
                ": cannot tell the tokenizer (expected a model directory with tokenizer.json, "
                "a tokenizer.json or a .gguf file)"));
}

}  // namespace patch::text

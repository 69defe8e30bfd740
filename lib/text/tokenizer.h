#pragma once
// Tokenizers of the LLaMA family, without ICU or PCRE2 (the GPU machine has
// neither): Hugging Face tokenizer.json BPE (byte-level, as GPT-2, LLaMA-3,
// Qwen2, SmolLM; or SentencePiece-style with byte fallback, as LLaMA-2,
// Mistral, TinyStories-656K) and GGUF-embedded `llama` vocabularies with
// scores (stories260K, Llama-2). Encodings equal those of Hugging Face
// `tokenizers` and llama.cpp respectively. Thread-safe.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace patch::io {
class GgufFile;
}

namespace patch::text {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Text (UTF-8; invalid bytes pass through as bytes) to ids. add_special adds
  // what the tokenizer adds around a sequence (HF: the post-processor, e.g.
  // LLaMA's BOS; GGUF: BOS/EOS per tokenizer.ggml.add_{bos,eos}_token).
  // Special/added token strings in the text are always matched as tokens.
  virtual std::vector<int32_t> encode(const std::string& text, bool add_special) const = 0;
  // Ids to text. skip_special drops special tokens (GGUF: control and unknown
  // tokens). Unknown ids are skipped.
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special) const = 0;
  // One past the largest id (model vocabulary and added tokens).
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when none
  virtual int32_t eos_id() const = 0;  // -1 when none
  // Stable identity of the vocabulary and rules (for cache keys): "hf-bpe:<sha256>"
  // or "gguf-spm:<sha256>".
  virtual std::string fingerprint() const = 0;
};

// tokenizer.json (BPE model). BOS/EOS come from tokenizer_config.json beside it
// (bos_token / eos_token), else config.json (bos_token_id / eos_token_id), else
// BOS is the template's first special token. Unsupported components throw
// core::Error naming the file and the component.
std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json_path);
// tokenizer.ggml.* metadata of a GGUF file (tokenizer.ggml.model "llama").
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const io::GgufFile& gguf);
// The tokenizer that belongs to a checkpoint path: a HF model directory (its
// tokenizer.json), a tokenizer.json, or a .gguf file.
std::unique_ptr<Tokenizer> load_tokenizer_for(const std::string& model_path);

}  // namespace patch::text

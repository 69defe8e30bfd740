#pragma once
// Corpus files to token streams: plain text (documents separated by a marker
// line, or the whole file), JSONL (one document per line, field configurable)
// and .bin token files. Text is tokenized document by document while the file
// streams past, into a .bin cache keyed by tokenizer fingerprint, options and
// the file's sha256, written atomically and memory-mapped afterwards, so
// corpora larger than memory work.
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/token_file.h"
#include "text/tokenizer.h"

namespace patch::data {

struct DataOptions {
  // auto: by extension (.jsonl/.json -> jsonl, .bin -> bin, anything else text).
  std::string format = "auto";  // auto | text | jsonl | bin
  std::string jsonl_field = "text";
  // text: a line equal to this (ignoring a trailing '\r') ends a document, e.g.
  // "<|endoftext|>" for TinyStories; empty: the whole file is one document.
  std::string document_separator;
  // Directory of the token cache; empty: tokenize into memory on every call.
  std::string cache_dir;
};

// The data.* keys (format, jsonl_field, document_separator, cache_dir as given).
DataOptions data_options(const config::Config& cfg);

// All documents of `path` as one stream, each document's ids (no BOS) followed
// by the tokenizer's EOS (BOS when it has no EOS; nothing when it has neither).
// Empty documents are skipped. A .bin file is mapped as is; its ids are checked
// against the tokenizer's vocabulary. Errors name file:line (JSONL: invalid
// JSON, missing or non-string field).
TokenStream load_tokens(const std::string& path, const text::Tokenizer& tok,
                        const DataOptions& opts);

// The files a config key names (e.g. data.train) as one stream, in order, at
// most `cap` tokens (0: all): paths resolved as the command line's are, the
// data.* options, the token cache <cache>/tokens unless data.cache_dir says
// otherwise. One file within the cap stays memory-mapped; several are joined
// in memory. Errors name the key and a file with no tokens.
TokenStream load_config_tokens(const config::Config& cfg, const std::string& key, const text::Tokenizer& tok,
                               int64_t cap = 0);

// The evaluation protocol of WikiText-2 perplexity: the whole file as one
// string, tokenized without special tokens (.xz read decompressed; a JSONL
// file's documents joined by a blank line, each line checked as JSON).
// Errors name the file: a directory, a missing file, no text.
std::vector<int32_t> tokenize_eval_text(const std::string& path, const text::Tokenizer& tok);

}  // namespace patch::data

#pragma once
// Token streams for training and evaluation: plain text, JSONL (field
// configurable) and pre-tokenized .bin files; tokenization cached on disk keyed
// by tokenizer fingerprint and file hash; packing into seq_len blocks with EOS
// between documents; deterministic shuffling; a train/validation split.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace patch::data {

struct DataOptions {
  std::string format = "auto";     // auto | text | jsonl | bin
  std::string jsonl_field = "text";
  std::string cache_dir;           // empty: no cache
  // text files: documents are separated by this line (empty: the whole file is
  // one document) -- "<|endoftext|>" for TinyStories.
  std::string document_separator;
};

// All tokens of `path` as one stream: each document's ids followed by EOS
// (when the tokenizer has one). Streams the file; caches the result.
std::vector<int32_t> tokenize_file(const std::string& path, const text::Tokenizer& tok,
                                   const DataOptions& opts);

// The evaluation protocol of WikiText-2 perplexity: the whole text tokenized as
// one string without special tokens.
std::vector<int32_t> tokenize_eval_text(const std::string& path, const text::Tokenizer& tok,
                                        const DataOptions& opts);

// Fixed-length blocks of seq_len + 1 tokens (input and shifted target) cut from
// a stream, split into train/validation and served in a seeded order.
class BlockDataset {
 public:
  BlockDataset(std::vector<int32_t> tokens, int64_t seq_len);
  int64_t num_blocks() const;
  int64_t seq_len() const { return seq_len_; }
  // [n, seq_len + 1] int64 tensor of the given block indices.
  at::Tensor blocks(const std::vector<int64_t>& indices) const;

 private:
  std::vector<int32_t> tokens_;
  int64_t seq_len_;
};

// Deterministic split and order: valid gets the last `valid_blocks` of a
// seeded permutation, train the rest; train_order(epoch) is reshuffled per epoch.
struct Split {
  std::vector<int64_t> train, valid;
};
Split split_blocks(int64_t num_blocks, int64_t valid_blocks, uint64_t seed);
std::vector<int64_t> epoch_order(const std::vector<int64_t>& train, uint64_t seed, int64_t epoch);

}  // namespace patch::data

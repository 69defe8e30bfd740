#pragma once
// Training blocks from a token stream: seq_len + 1 windows with the shift,
// a train/validation split and a seeded order that is identical on every
// platform. See data/corpus.h for turning files into token streams.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "data/corpus.h"
#include "data/token_file.h"

namespace patch::data {

// Block i is tokens[i * seq_len, i * seq_len + seq_len + 1): inputs are its
// first seq_len tokens, targets the last seq_len (shift by one), and
// consecutive blocks share one token so every token after the first is a
// target exactly once.
class BlockDataset {
 public:
  BlockDataset(TokenStream tokens, int64_t seq_len);
  int64_t num_blocks() const { return num_blocks_; }
  int64_t seq_len() const { return seq_len_; }
  // [indices.size(), seq_len + 1] int64 CPU tensor.
  at::Tensor blocks(const std::vector<int64_t>& indices) const;
  const TokenStream& tokens() const { return tokens_; }

 private:
  TokenStream tokens_;
  int64_t seq_len_;
  int64_t num_blocks_;
};

// Train/validation split of block indices: validation is the last
// `valid_blocks` blocks (a contiguous tail, so documents do not leak between
// the two except at the one boundary), training all before them.
struct Split {
  std::vector<int64_t> train, valid;
};
Split split_blocks(int64_t num_blocks, int64_t valid_blocks);

// `indices` in a seeded order for one epoch (Fisher-Yates over splitmix64):
// the same seed and epoch give the same order on every platform.
std::vector<int64_t> epoch_order(const std::vector<int64_t>& indices, uint64_t seed, int64_t epoch);

}  // namespace patch::data

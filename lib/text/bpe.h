#pragma once
// The BPE model of Hugging Face tokenizers (models/bpe): merges applied by rank
// with the same priority queue and tie-breaking (lowest rank, then leftmost),
// byte fallback to <0xNN> tokens, unknown-token fusing, ignore_merges. Results
// are cached per word.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "text/word_cache.h"

namespace patch::text {

class BpeModel {
 public:
  struct Options {
    bool byte_fallback = false;
    bool fuse_unk = false;
    bool ignore_merges = false;
    std::string unk_token;  // empty: none
    std::string continuing_subword_prefix;
    std::string end_of_word_suffix;
  };
  // `merges` are pairs of token strings in rank order. Throws core::Error
  // (with `context` prefixed) when a merge names a missing token.
  BpeModel(std::unordered_map<std::string, int32_t> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, Options options,
           const std::string& context);

  // Appends the ids of one pre-tokenized word.
  void encode(std::string_view word, std::vector<int32_t>& out) const;
  // The token string of an id; nullptr when the id is not in the vocabulary.
  const std::string* token(int32_t id) const;
  int32_t id(const std::string& token) const;  // -1 when absent
  int64_t max_id() const { return static_cast<int64_t>(id_to_token_.size()) - 1; }

 private:
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  template <typename Symbols, typename Queue>
  void merge_all(Symbols& symbols, Queue& queue) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) -> (rank, new id)
  size_t num_ranks_ = 0;
  Options opt_;
  int32_t unk_id_ = -1;
  int32_t byte_ids_[256];

  WordCache cache_;
};

}  // namespace patch::text

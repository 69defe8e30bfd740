#pragma once
// Leftmost-longest matching of a fixed set of strings in text: how added and
// special tokens are split out of raw text before normalization (as the
// aho-corasick LeftmostLongest matcher of Hugging Face tokenizers does).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace patch::text {

class TokenMatcher {
 public:
  // `tag` is returned with a match (e.g. an index into the caller's table).
  void add(const std::string& s, int32_t tag);
  bool empty() const { return count_ == 0; }
  // The leftmost match at or after `from`, longest among those starting there.
  bool find(std::string_view text, size_t from, size_t& begin, size_t& end, int32_t& tag) const;

 private:
  struct Entry {
    std::string s;
    int32_t tag;
  };
  std::vector<Entry> by_first_byte_[256];  // each sorted by length, longest first
  size_t count_ = 0;
};

}  // namespace patch::text

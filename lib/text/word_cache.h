#pragma once
// A tokenizer's word -> ids memo, shared by the threads that encode a corpus:
// natural text repeats a small set of words, so most words are merged once.
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace patch::text {

class WordCache {
 public:
  // Appends encode(word)'s ids to out, computing them only for a word not seen
  // before. Long words (a tokenizer without pre-tokenization sees a whole
  // document as one word) are not kept; a full cache starts afresh.
  template <typename Encode>
  void encode(std::string_view word, std::vector<int32_t>& out, Encode&& encode) const {
    if (word.size() > kMaxWordBytes) {
      encode(word, out);
      return;
    }
    std::string key(word);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = map_.find(key);
      if (it != map_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids;
    encode(word, ids);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= kMaxEntries) map_.clear();
    map_.emplace(std::move(key), std::move(ids));
  }

 private:
  static constexpr size_t kMaxWordBytes = 256;
  static constexpr size_t kMaxEntries = size_t{1} << 18;

  mutable std::mutex mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> map_;
};

}  // namespace patch::text

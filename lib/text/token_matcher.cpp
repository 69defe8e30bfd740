#include "text/token_matcher.h"

#include <algorithm>

namespace patch::text {

void TokenMatcher::add(const std::string& s, int32_t tag) {
  if (s.empty()) return;
  auto& bucket = by_first_byte_[static_cast<unsigned char>(s[0])];
  const auto pos = std::find_if(bucket.begin(), bucket.end(),
                                [&](const Entry& e) { return e.s.size() < s.size(); });
  bucket.insert(pos, Entry{s, tag});
  ++count_;
}

bool TokenMatcher::find(std::string_view text, size_t from, size_t& begin, size_t& end,
                        int32_t& tag) const {
  if (count_ == 0) return false;
  for (size_t i = from; i < text.size(); ++i) {
    const auto& bucket = by_first_byte_[static_cast<unsigned char>(text[i])];
    for (const Entry& e : bucket) {
      if (text.compare(i, e.s.size(), e.s) == 0) {
        begin = i;
        end = i + e.s.size();
        tag = e.tag;
        return true;
      }
    }
  }
  return false;
}

}  // namespace patch::text

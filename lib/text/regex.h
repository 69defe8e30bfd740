#pragma once
// A small backtracking regex engine over code points for the pre-tokenizer
// patterns of Hugging Face tokenizers (std::regex has no \p{..}; the GPU
// machine has no PCRE2/ICU). Semantics follow Oniguruma: leftmost-first
// alternation, greedy quantifiers unless marked lazy, Unicode \s \d \w.
// Supported: literals and escapes (\r \n \t \f \v \e \0 \xHH \x{H..} \uHHHH,
// escaped punctuation), . (any but \n), classes [..] / [^..] with ranges,
// \s \S \d \D \w \W \p{..} \P{..} (general categories: L Lu Ll Lt Lm Lo M Mn
// Mc Me N Nd Nl No P* S* Z* C* and their long names), groups (..) (?:..),
// (?i:..) (?i) (?-i:..), lookahead (?=..) (?!..), quantifiers * + ? {n}
// {n,} {n,m} and their lazy forms. Anything else is rejected at construction.
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace patch::text {

class Regex {
 public:
  // Throws core::Error("regex '<pattern>': ...") for syntax outside the subset.
  explicit Regex(const std::string& pattern);

  // Leftmost match at or after `from` in text[0..n); sets [begin, end).
  bool search(const char32_t* text, size_t n, size_t from, size_t& begin, size_t& end) const;
  // Non-overlapping matches left to right (an empty match advances one code point).
  std::vector<std::pair<size_t, size_t>> find_all(const std::u32string& text) const;
  const std::string& pattern() const { return pattern_; }

  struct ClassItem {
    enum Kind : uint8_t { kRange, kCategories, kWhiteSpace } kind;
    bool negated = false;
    char32_t lo = 0, hi = 0;  // kRange
    uint32_t categories = 0;  // kCategories: bit mask of unicode::Category
  };
  struct CharClass {
    std::vector<ClassItem> items;
    bool negated = false;
    bool fold = false;           // case-insensitive
    uint64_t ascii[2] = {0, 0};  // precomputed membership of U+0000..U+007F
    bool contains(char32_t c) const;
    bool contains_slow(char32_t c) const;
  };
  enum class Op : uint8_t { kChar, kCharFold, kAny, kClass, kSplit, kJump, kLook, kMatch };
  struct Inst {
    Op op;
    bool negate = false;  // kLook: (?!..)
    char32_t c = 0;       // kChar / kCharFold
    int32_t
        x = 0,
        y = 0;  // kSplit: try x then y; kJump: x; kClass: class index; kLook: body x, continue y
  };

 private:
  bool match_at(int32_t pc, const char32_t* text, size_t n, size_t pos, size_t& end) const;

  std::string pattern_;
  std::vector<Inst> prog_;
  std::vector<CharClass> classes_;
};

}  // namespace patch::text

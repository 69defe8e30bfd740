// Hugging Face tokenizer.json with a BPE model: the pipeline of the
// `tokenizers` library (added tokens -> normalizer -> pre-tokenizer -> BPE ->
// post-processor; decoders for the way back), for the components LLaMA-family
// checkpoints use. Everything else is refused with an error naming the file
// and the component.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <functional>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "text/bpe.h"
#include "text/hf_pipeline.h"
#include "text/json_checked.h"
#include "text/regex.h"
#include "core/sha256.h"
#include "text/token_matcher.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace patch::text {

namespace {

using json = nlohmann::json;
namespace uc = unicode;

// A piece of text on its way through the pre-tokenizers; `at_start` tells
// whether it begins at offset 0 of the input (Metaspace prepend_scheme "first").
struct Piece {
  std::string text;
  bool at_start;
};

using NormalizeFn = std::function<void(std::string&)>;
using PreTokenizeFn = std::function<void(std::vector<Piece>&)>;
using DecodeFn = std::function<void(std::vector<std::string>&)>;

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to
// U+0100 upwards.
struct ByteLevelTables {
  std::string byte_str[256];
  std::unordered_map<char32_t, uint8_t> char_byte;
  ByteLevelTables() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    char32_t cp[256];
    for (int b : bs) cp[b] = static_cast<char32_t>(b);
    int n = 0;
    for (int b = 0; b < 256; ++b)
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) cp[b] = static_cast<char32_t>(256 + n++);
    for (int b = 0; b < 256; ++b) {
      uc::append_utf8(byte_str[b], cp[b]);
      char_byte[cp[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelTables& byte_level() {
  static const ByteLevelTables tables;
  return tables;
}

// The GPT-2 pre-tokenizer regex of ByteLevel(use_regex=true).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- pattern matching shared by Split, Replace, Digits, Metaspace ----------

struct Span {
  size_t begin, end;
  bool is_match;
};

// A Hugging Face "pattern": a literal string, a regex, or a per-character
// predicate; find_matches returns the text cut into matching and non-matching
// spans (pattern.rs).
class Pattern {
 public:
  static Pattern literal(std::string s) {
    Pattern p;
    p.literal_ = std::move(s);
    return p;
  }
  static Pattern regex(const std::string& re) {
    Pattern p;
    p.regex_ = std::make_shared<Regex>(re);
    return p;
  }
  static Pattern predicate(std::function<bool(char32_t)> f) {
    Pattern p;
    p.pred_ = std::move(f);
    return p;
  }

  std::vector<Span> find_matches(const std::string& s) const {
    if (s.empty()) return {{0, 0, false}};
    std::vector<Span> out;
    size_t prev = 0;
    auto emit = [&](size_t b, size_t e) {
      if (prev != b) out.push_back({prev, b, false});
      out.push_back({b, e, true});
      prev = e;
    };
    if (regex_ || pred_) {
      const std::u32string u = uc::decode_utf8(s);
      std::vector<size_t> offs(u.size() + 1, 0);  // byte offset of each code point
      for (size_t i = 0; i < u.size(); ++i) offs[i + 1] = offs[i] + uc::encoded_length(u[i]);
      if (regex_) {
        for (const auto& [b, e] : regex_->find_all(u)) emit(offs[b], offs[e]);
      } else {
        for (size_t i = 0; i < u.size(); ++i)
          if (pred_(u[i])) emit(offs[i], offs[i + 1]);
      }
    } else if (!literal_.empty()) {
      for (size_t pos = s.find(literal_); pos != std::string::npos; pos = s.find(literal_, prev))
        emit(pos, pos + literal_.size());
    }
    if (prev != s.size()) out.push_back({prev, s.size(), false});
    return out;
  }

  // Every match replaced by `content`.
  std::string replace(const std::string& s, const std::string& content) const {
    std::string out;
    for (const Span& sp : find_matches(s))
      out += sp.is_match ? content : s.substr(sp.begin, sp.end - sp.begin);
    return out;
  }

 private:
  std::string literal_;
  std::shared_ptr<Regex> regex_;
  std::function<bool(char32_t)> pred_;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// NormalizedString::split: which spans survive under each delimiter behavior.
std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<Span>& m, Behavior b) {
  std::vector<std::pair<size_t, size_t>> keep;
  switch (b) {
    case Behavior::kIsolated:
      for (const Span& s : m) keep.emplace_back(s.begin, s.end);
      break;
    case Behavior::kRemoved:
      for (const Span& s : m)
        if (!s.is_match) keep.emplace_back(s.begin, s.end);
      break;
    case Behavior::kContiguous: {
      bool prev_match = false;
      for (const Span& s : m) {
        if (s.is_match == prev_match && !keep.empty())
          keep.back().second = s.end;
        else
          keep.emplace_back(s.begin, s.end);
        prev_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const Span& s : m) {
        if (s.is_match && !prev_match && !keep.empty())
          keep.back().second = s.end;
        else
          keep.emplace_back(s.begin, s.end);
        prev_match = s.is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev_match = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->is_match && !prev_match && !keep.empty())
          keep.back().first = it->begin;
        else
          keep.emplace_back(it->begin, it->end);
        prev_match = it->is_match;
      }
      std::reverse(keep.begin(), keep.end());
      break;
    }
  }
  return keep;
}

// Splits every piece; empty results are dropped as PreTokenizedString::split does.
void split_pieces(std::vector<Piece>& pieces, const Pattern& pattern, Behavior behavior,
                  bool invert = false) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  for (Piece& p : pieces) {
    std::vector<Span> m = pattern.find_matches(p.text);
    if (invert)
      for (Span& s : m) s.is_match = !s.is_match;
    for (const auto& [b, e] : apply_behavior(m, behavior))
      if (e > b) out.push_back(Piece{p.text.substr(b, e - b), p.at_start && b == 0});
  }
  pieces = std::move(out);
}

// ---- tokenizer.json parsing --------------------------------------------------

class Loader {
 public:
  explicit Loader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw core::Error(core::str(path_, ": ", where, ": ", what));
  }
  const json& member(const json& j, const char* key, const std::string& where) const {
    if (!j.is_object() || !j.contains(key)) fail(where, core::str("missing key '", key, "'"));
    return j.at(key);
  }
  std::string get_string(const json& j, const char* key, const std::string& where) const {
    const json& v = member(j, key, where);
    if (!v.is_string()) fail(where, core::str("'", key, "' must be a string"));
    return v.get<std::string>();
  }
  // A token id or index: a JSON integer in [0, T's maximum].
  template <typename T>
  T index(const json& v, const std::string& where, const char* what) const {
    const auto x = json_integer<T>(v);
    if (!x || *x < 0) fail(where, core::str("'", what, "' must be a non-negative integer, got ", v.dump()));
    return *x;
  }
  std::string opt_string(const json& j, const char* key, const std::string& fallback) const {
    return j.is_object() && j.contains(key) && j.at(key).is_string() ? j.at(key).get<std::string>()
                                                                     : fallback;
  }
  bool opt_bool(const json& j, const char* key, bool fallback) const {
    return j.is_object() && j.contains(key) && j.at(key).is_boolean() ? j.at(key).get<bool>()
                                                                      : fallback;
  }
  std::string type_of(const json& j, const std::string& where) const {
    return get_string(j, "type", where);
  }

  // {"String": s} or {"Regex": r}
  Pattern pattern(const json& j, const std::string& where) const {
    if (j.is_object() && j.contains("String") && j.at("String").is_string())
      return Pattern::literal(j.at("String").get<std::string>());
    if (j.is_object() && j.contains("Regex") && j.at("Regex").is_string()) {
      try {
        return Pattern::regex(j.at("Regex").get<std::string>());
      } catch (const core::Error& e) {
        fail(where, e.what());
      }
    }
    fail(where, "pattern must be {\"String\": ..} or {\"Regex\": ..}");
  }

  // A single-character string option (Metaspace replacement, Strip content).
  char32_t single_char(const json& j, const char* key, const std::string& where,
                       const std::string& fallback) const {
    const std::u32string u = uc::decode_utf8(opt_string(j, key, fallback));
    if (u.size() != 1) fail(where, core::str("'", key, "' must be one character"));
    return u[0];
  }

  NormalizeFn normalizer(const json& j, const std::string& where) const {
    const std::string type = type_of(j, where);
    const std::string w = where + " " + type;
    if (type == "Sequence") {
      std::vector<NormalizeFn> fs;
      size_t i = 0;
      for (const json& n : member(j, "normalizers", w))
        fs.push_back(normalizer(n, core::str(w, "[", i++, "]")));
      return [fs](std::string& s) {
        for (const auto& f : fs) f(s);
      };
    }
    if (type == "Prepend") {
      const std::string prepend = get_string(j, "prepend", w);
      return [prepend](std::string& s) {
        if (!s.empty()) s.insert(0, prepend);
      };
    }
    if (type == "Replace") {
      const Pattern p = pattern(member(j, "pattern", w), w);
      const std::string content = get_string(j, "content", w);
      return [p, content](std::string& s) { s = p.replace(s, content); };
    }
    if (type == "NFC")
      return [](std::string& s) { s = uc::encode_utf8(uc::nfc(uc::decode_utf8(s))); };
    if (type == "NFD")
      return [](std::string& s) { s = uc::encode_utf8(uc::nfd(uc::decode_utf8(s))); };
    if (type == "Strip") {
      const bool left = opt_bool(j, "strip_left", true), right = opt_bool(j, "strip_right", true);
      return [left, right](std::string& s) {
        std::u32string u = uc::decode_utf8(s);
        size_t b = 0, e = u.size();
        while (left && b < e && uc::is_white_space(u[b])) ++b;
        while (right && e > b && uc::is_white_space(u[e - 1])) --e;
        s = uc::encode_utf8(std::u32string_view(u).substr(b, e - b));
      };
    }
    fail(where,
         core::str("normalizer '", type,
                   "' is not supported (supported: Sequence, Prepend, Replace, NFC, NFD, Strip)"));
  }

  PreTokenizeFn pre_tokenizer(const json& j, const std::string& where) const {
    const std::string type = type_of(j, where);
    const std::string w = where + " " + type;
    if (type == "Sequence") {
      std::vector<PreTokenizeFn> fs;
      size_t i = 0;
      for (const json& p : member(j, "pretokenizers", w))
        fs.push_back(pre_tokenizer(p, core::str(w, "[", i++, "]")));
      return [fs](std::vector<Piece>& pieces) {
        for (const auto& f : fs) f(pieces);
      };
    }
    if (type == "Split") {
      const Pattern p = pattern(member(j, "pattern", w), w);
      const Behavior b = behavior(get_string(j, "behavior", w), w);
      const bool invert = opt_bool(j, "invert", false);
      return [p, b, invert](std::vector<Piece>& pieces) { split_pieces(pieces, p, b, invert); };
    }
    if (type == "ByteLevel") {
      const bool add_prefix_space = opt_bool(j, "add_prefix_space", true);
      const bool use_regex = opt_bool(j, "use_regex", true);
      const Pattern gpt2 = Pattern::regex(kGpt2Pattern);
      return [add_prefix_space, use_regex, gpt2](std::vector<Piece>& pieces) {
        if (add_prefix_space)
          for (Piece& p : pieces)
            if (p.text.empty() || p.text[0] != ' ') p.text.insert(0, " ");
        if (use_regex) split_pieces(pieces, gpt2, Behavior::kIsolated);
        const ByteLevelTables& t = byte_level();
        for (Piece& p : pieces) {
          std::string mapped;
          mapped.reserve(p.text.size() * 2);
          for (unsigned char c : p.text) mapped += t.byte_str[c];
          p.text = std::move(mapped);
        }
      };
    }
    if (type == "Digits") {
      const bool individual = opt_bool(j, "individual_digits", false);
      const Pattern digit = Pattern::predicate([](char32_t c) { return uc::in(c, uc::kNumber); });
      return [individual, digit](std::vector<Piece>& pieces) {
        split_pieces(pieces, digit, individual ? Behavior::kIsolated : Behavior::kContiguous);
      };
    }
    if (type == "Metaspace") {
      const char32_t rep = single_char(j, "replacement", w, "\xE2\x96\x81");
      std::string rep_str;
      uc::append_utf8(rep_str, rep);
      // Older files have add_prefix_space instead of prepend_scheme.
      std::string scheme = opt_string(j, "prepend_scheme", "");
      if (scheme.empty()) scheme = opt_bool(j, "add_prefix_space", true) ? "always" : "never";
      if (scheme != "always" && scheme != "first" && scheme != "never")
        fail(w, core::str("prepend_scheme '", scheme, "' is not one of always, first, never"));
      const bool split = opt_bool(j, "split", true);
      const Pattern rep_pattern = Pattern::literal(rep_str);
      const Pattern space = Pattern::literal(" ");
      return [rep_str, scheme, split, rep_pattern, space](std::vector<Piece>& pieces) {
        for (Piece& p : pieces) {
          p.text = space.replace(p.text, rep_str);
          const bool starts = p.text.compare(0, rep_str.size(), rep_str) == 0;
          if (!starts && (scheme == "always" || (scheme == "first" && p.at_start)))
            p.text.insert(0, rep_str);
        }
        if (split) split_pieces(pieces, rep_pattern, Behavior::kMergedWithNext);
      };
    }
    if (type == "Whitespace") {
      const Pattern words = Pattern::regex(R"(\w+|[^\w\s]+)");
      return [words](std::vector<Piece>& pieces) {
        split_pieces(pieces, words, Behavior::kRemoved, /*invert=*/true);
      };
    }
    if (type == "WhitespaceSplit") {
      const Pattern ws = Pattern::predicate([](char32_t c) { return uc::is_white_space(c); });
      return [ws](std::vector<Piece>& pieces) { split_pieces(pieces, ws, Behavior::kRemoved); };
    }
    fail(where, core::str("pre_tokenizer '", type,
                          "' is not supported (supported: Sequence, Split, ByteLevel, Digits, "
                          "Metaspace, Whitespace, WhitespaceSplit)"));
  }

  Behavior behavior(const std::string& b, const std::string& where) const {
    if (b == "Removed") return Behavior::kRemoved;
    if (b == "Isolated") return Behavior::kIsolated;
    if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
    if (b == "MergedWithNext") return Behavior::kMergedWithNext;
    if (b == "Contiguous") return Behavior::kContiguous;
    fail(where, core::str("unknown split behavior '", b, "'"));
  }

  DecodeFn decoder(const json& j, const std::string& where) const {
    const std::string type = type_of(j, where);
    const std::string w = where + " " + type;
    if (type == "Sequence") {
      std::vector<DecodeFn> fs;
      size_t i = 0;
      for (const json& d : member(j, "decoders", w))
        fs.push_back(decoder(d, core::str(w, "[", i++, "]")));
      return [fs](std::vector<std::string>& toks) {
        for (const auto& f : fs) f(toks);
      };
    }
    if (type == "ByteLevel") {
      return [](std::vector<std::string>& toks) {
        const ByteLevelTables& t = byte_level();
        std::string bytes;
        for (const std::string& tok : toks) {
          const std::u32string u = uc::decode_utf8(tok);
          std::string mapped;
          bool all = true;
          for (char32_t c : u) {
            const auto it = t.char_byte.find(c);
            if (it == t.char_byte.end()) {
              all = false;
              break;
            }
            mapped.push_back(static_cast<char>(it->second));
          }
          bytes += all ? mapped : tok;
        }
        toks.assign(1, uc::utf8_lossy(bytes));
      };
    }
    if (type == "Replace") {
      const Pattern p = pattern(member(j, "pattern", w), w);
      const std::string content = get_string(j, "content", w);
      return [p, content](std::vector<std::string>& toks) {
        for (std::string& t : toks) t = p.replace(t, content);
      };
    }
    if (type == "ByteFallback") {
      return [](std::vector<std::string>& toks) {
        std::vector<std::string> out;
        std::string bytes;
        auto flush = [&] {
          if (bytes.empty()) return;
          if (uc::is_valid_utf8(bytes))
            out.push_back(bytes);
          else
            out.insert(out.end(), bytes.size(), "\xEF\xBF\xBD");
          bytes.clear();
        };
        for (std::string& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4]))) {
            bytes.push_back(static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
            continue;
          }
          flush();
          out.push_back(std::move(t));
        }
        flush();
        toks = std::move(out);
      };
    }
    if (type == "Fuse") {
      return [](std::vector<std::string>& toks) {
        std::string all;
        for (const std::string& t : toks) all += t;
        toks.assign(1, all);
      };
    }
    if (type == "Strip") {
      const char32_t content = single_char(j, "content", w, " ");
      const size_t start = index<size_t>(member(j, "start", w), w, "start"),
                   stop = index<size_t>(member(j, "stop", w), w, "stop");
      return [content, start, stop](std::vector<std::string>& toks) {
        for (std::string& t : toks) {
          const std::u32string u = uc::decode_utf8(t);
          size_t b = 0, e = u.size();
          for (size_t i = 0; i < start && b < e && u[b] == content; ++i) ++b;
          for (size_t i = 0; i < stop && e > b && u[e - 1] == content; ++i) --e;
          t = uc::encode_utf8(std::u32string_view(u).substr(b, e - b));
        }
      };
    }
    if (type == "Metaspace") {
      const char32_t rep = single_char(j, "replacement", w, "\xE2\x96\x81");
      std::string scheme = opt_string(j, "prepend_scheme", "");
      if (scheme.empty()) scheme = opt_bool(j, "add_prefix_space", true) ? "always" : "never";
      const bool strip_first = scheme != "never";
      return [rep, strip_first](std::vector<std::string>& toks) {
        for (size_t i = 0; i < toks.size(); ++i) {
          std::u32string u = uc::decode_utf8(toks[i]);
          std::u32string out;
          for (char32_t c : u) {
            if (c != rep)
              out.push_back(c);
            else if (!(i == 0 && strip_first))
              out.push_back(' ');
          }
          toks[i] = uc::encode_utf8(out);
        }
      };
    }
    fail(where,
         core::str("decoder '", type,
                   "' is not supported (supported: Sequence, ByteLevel, Replace, ByteFallback, "
                   "Fuse, Strip, Metaspace)"));
  }

  // Ids a post-processor puts before and after a single sequence.
  void post_processor(const json& j, const std::string& where, std::vector<int32_t>& prefix,
                      std::vector<int32_t>& suffix) const {
    const std::string type = type_of(j, where);
    const std::string w = where + " " + type;
    if (type == "Sequence") {
      size_t i = 0;
      for (const json& p : member(j, "processors", w))
        post_processor(p, core::str(w, "[", i++, "]"), prefix, suffix);
      return;
    }
    if (type == "ByteLevel") return;  // only trims offsets
    if (type == "TemplateProcessing") {
      const json& specials = member(j, "special_tokens", w);
      std::vector<int32_t> pre, post;
      bool seen_a = false;
      for (const json& item : member(j, "single", w)) {
        if (item.contains("Sequence")) {
          seen_a = true;
          continue;
        }
        const std::string name = get_string(member(item, "SpecialToken", w), "id", w);
        if (!specials.contains(name))
          fail(w, core::str("special token '", name, "' missing from special_tokens"));
        for (const json& id : member(specials.at(name), "ids", w))
          (seen_a ? post : pre).push_back(index<int32_t>(id, w, "ids"));
      }
      prefix.insert(prefix.begin(), pre.begin(), pre.end());
      suffix.insert(suffix.end(), post.begin(), post.end());
      return;
    }
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      const json& cls = member(j, "cls", w);
      const json& sep = member(j, "sep", w);
      if (!cls.is_array() || cls.size() != 2 || !sep.is_array() || sep.size() != 2)
        fail(w, "'cls' and 'sep' must be [token, id]");
      prefix.insert(prefix.begin(), index<int32_t>(cls[1], w, "cls"));
      suffix.push_back(index<int32_t>(sep[1], w, "sep"));
      return;
    }
    fail(where, core::str("post_processor '", type,
                          "' is not supported (supported: TemplateProcessing, ByteLevel, Sequence, "
                          "BertProcessing, RobertaProcessing)"));
  }

 private:
  std::string path_;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, single_word, normalized;
  std::string decoded;  // content, normalized when `normalized`
};

// The code point starting at byte `pos` (pos < s.size()) and its length.
std::pair<char32_t, size_t> cp_at(const std::string& s, size_t pos) {
  if (pos >= s.size()) return {0, 0};
  const size_t len =
      std::min<size_t>(uc::utf8_length(static_cast<unsigned char>(s[pos])), s.size() - pos);
  const std::u32string u = uc::decode_utf8(std::string_view(s).substr(pos, len));
  return {u[0], u.size() == 1 ? len : 1};
}

// The code point ending at byte `pos` (pos > 0) and its length.
std::pair<char32_t, size_t> cp_before(const std::string& s, size_t pos) {
  if (pos == 0) return {0, 0};
  size_t start = pos - 1;
  while (start > 0 && pos - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80)
    --start;
  const std::u32string u = uc::decode_utf8(std::string_view(s).substr(start, pos - start));
  return {u.back(), u.size() == 1 ? pos - start : 1};
}

bool is_word_char(char32_t c) {
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  return uc::in(c, uc::kLetter | uc::kMark | uc::kNumber | uc::bit(uc::Category::Pc));
}

class HfTokenizer final : public Tokenizer {
 public:
  // `j` is tokenizer.json's content; `context` names its source in errors;
  // `tcfg` and `mcfg` are tokenizer_config.json and config.json (null when
  // absent); `fingerprint_prefix` + sha256 of `identity` and the special ids
  // make the fingerprint.
  HfTokenizer(const json& j, const std::string& context, const json& tcfg, const json& mcfg,
              const std::string& identity, const std::string& fingerprint_prefix) {
    build(j, context, tcfg, mcfg, identity, fingerprint_prefix);
  }

  std::vector<int32_t> encode(const std::string& text, bool add_special) const override {
    std::vector<int32_t> ids;
    if (add_special) ids = prefix_;
    std::vector<Piece> pieces;
    for (const Segment& raw : split_added(text, raw_matcher_, /*at_start=*/true)) {
      if (raw.id >= 0) {
        ids.push_back(raw.id);
        continue;
      }
      std::string norm = raw.text;
      if (normalizer_) normalizer_(norm);
      for (const Segment& seg : split_added(norm, normalized_matcher_, raw.at_start)) {
        if (seg.id >= 0) {
          ids.push_back(seg.id);
          continue;
        }
        pieces.assign(1, Piece{seg.text, seg.at_start});
        if (pre_tokenizer_) pre_tokenizer_(pieces);
        for (const Piece& p : pieces) model_->encode(p.text, ids);
      }
    }
    if (add_special) ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    // As tokenizers 0.23: an added token decodes to its content as normalized
    // (so TinyStories' "<|start_story|>" comes back as "▁<|start_story|>"), and
    // skip_special drops tokens whose string is a special token's content.
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      const std::string* t = nullptr;
      const auto added = added_by_id_.find(id);
      if (added != added_by_id_.end())
        t = &added_tokens_[added->second].decoded;
      else
        t = model_->token(id);
      if (!t || (skip_special && special_contents_.count(*t))) continue;
      toks.push_back(*t);
    }
    if (!decoder_) {
      std::string out;
      for (size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
      return out;
    }
    decoder_(toks);
    std::string out;
    for (const std::string& t : toks) out += t;
    return out;
  }

  int64_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  std::string fingerprint() const override { return fingerprint_; }

 private:
  struct Segment {
    std::string text;
    int32_t id;  // -1: text
    bool at_start;
  };

  // AddedVocabulary::split_with_indices: added tokens cut out of `s`, honouring
  // lstrip / rstrip / single_word.
  std::vector<Segment> split_added(const std::string& s, const TokenMatcher& m,
                                   bool at_start) const {
    std::vector<Segment> out;
    size_t start_offset = 0, search = 0;
    size_t b, e;
    int32_t tag;
    while (search < s.size() && m.find(s, search, b, e, tag)) {
      const AddedToken& t = added_tokens_[static_cast<size_t>(tag)];
      search = e;
      if (t.single_word) {
        const bool start_space = b == 0 || !is_word_char(cp_before(s, b).first);
        const bool stop_space = e == s.size() || !is_word_char(cp_at(s, e).first);
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        size_t nb = b;
        for (auto c = cp_before(s, nb); nb > start_offset && uc::is_white_space(c.first);
             c = cp_before(s, nb))
          nb -= c.second;
        b = std::max(nb, start_offset);
      }
      if (t.rstrip) {
        for (auto c = cp_at(s, e); e < s.size() && uc::is_white_space(c.first); c = cp_at(s, e))
          e += c.second;
        search = e;
      }
      if (start_offset < b)
        out.push_back(
            Segment{s.substr(start_offset, b - start_offset), -1, at_start && start_offset == 0});
      out.push_back(Segment{"", t.id, false});
      start_offset = e;
    }
    if (start_offset < s.size())
      out.push_back(Segment{s.substr(start_offset), -1, at_start && start_offset == 0});
    return out;
  }

  void build(const json& j, const std::string& context, const json& tcfg, const json& mcfg,
             const std::string& identity, const std::string& fingerprint_prefix);

  std::unique_ptr<BpeModel> model_;
  std::vector<AddedToken> added_tokens_;
  std::unordered_map<int32_t, size_t> added_by_id_;
  std::unordered_set<std::string> special_contents_;
  TokenMatcher raw_matcher_, normalized_matcher_;
  NormalizeFn normalizer_;
  PreTokenizeFn pre_tokenizer_;
  DecodeFn decoder_;
  std::vector<int32_t> prefix_, suffix_;
  int64_t vocab_size_ = 0;
  int32_t bos_ = -1, eos_ = -1;
  std::string fingerprint_;
};

// tokenizer_config.json's bos_token / eos_token: a string or {"content": ..}.
std::string config_token(const json& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key)) return "";
  const json& v = cfg.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string())
    return v.at("content").get<std::string>();
  return "";
}

json read_json_if_exists(const std::filesystem::path& p) {
  if (!std::filesystem::exists(p)) return json();
  try {
    return json::parse(core::read_file(p.string()));
  } catch (const json::exception& e) {
    throw core::Error(core::str(p.string(), ": invalid JSON: ", e.what()));
  }
}

void HfTokenizer::build(const json& j, const std::string& path, const json& tcfg,
                        const json& mcfg, const std::string& identity,
                        const std::string& fingerprint_prefix) {
  const Loader L(path);
  const json& model = L.member(j, "model", "top level");
  const std::string model_type = L.opt_string(model, "type", "BPE");
  if (model_type != "BPE")
    L.fail("model", core::str("model type '", model_type, "' is not supported (only BPE)"));
  if (model.contains("dropout") && model.at("dropout").is_number() &&
      model.at("dropout").get<double>() > 0)
    L.fail("model", "BPE dropout is not supported");

  // Model vocabulary and merges ("a b" strings, or [a, b] pairs since tokenizers 0.20).
  std::unordered_map<std::string, int32_t> vocab;
  for (const auto& [tok, id] : L.member(model, "vocab", "model").items())
    vocab[tok] = L.index<int32_t>(id, "model.vocab", tok.c_str());
  std::vector<std::pair<std::string, std::string>> merges;
  for (const json& m : L.member(model, "merges", "model")) {
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        L.fail("model.merges",
               core::str("merge '", s, "' is not two tokens separated by one space"));
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      L.fail("model.merges", "each merge must be \"a b\" or [\"a\", \"b\"]");
    }
  }
  BpeModel::Options opt;
  opt.byte_fallback = L.opt_bool(model, "byte_fallback", false);
  opt.fuse_unk = L.opt_bool(model, "fuse_unk", false);
  opt.ignore_merges = L.opt_bool(model, "ignore_merges", false);
  opt.unk_token = L.opt_string(model, "unk_token", "");
  opt.continuing_subword_prefix = L.opt_string(model, "continuing_subword_prefix", "");
  opt.end_of_word_suffix = L.opt_string(model, "end_of_word_suffix", "");
  model_ = std::make_unique<BpeModel>(std::move(vocab), merges, opt, path + ": model");
  vocab_size_ = model_->max_id() + 1;

  if (j.contains("normalizer") && !j.at("normalizer").is_null())
    normalizer_ = L.normalizer(j.at("normalizer"), "normalizer");
  if (j.contains("pre_tokenizer") && !j.at("pre_tokenizer").is_null())
    pre_tokenizer_ = L.pre_tokenizer(j.at("pre_tokenizer"), "pre_tokenizer");
  if (j.contains("decoder") && !j.at("decoder").is_null())
    decoder_ = L.decoder(j.at("decoder"), "decoder");

  // Added tokens: those with normalized=false are matched in the raw text, the
  // others in the normalized text, with their content normalized the same way.
  if (j.contains("added_tokens") && j.at("added_tokens").is_array()) {
    for (const json& a : j.at("added_tokens")) {
      AddedToken t;
      t.content = L.get_string(a, "content", "added_tokens");
      t.id = L.index<int32_t>(L.member(a, "id", "added_tokens"), "added_tokens", "id");
      t.special = L.opt_bool(a, "special", false);
      t.lstrip = L.opt_bool(a, "lstrip", false);
      t.rstrip = L.opt_bool(a, "rstrip", false);
      t.single_word = L.opt_bool(a, "single_word", false);
      t.normalized = L.opt_bool(a, "normalized", !t.special);
      added_by_id_[t.id] = added_tokens_.size();
      added_tokens_.push_back(t);
      vocab_size_ = std::max<int64_t>(vocab_size_, t.id + 1);
    }
  }
  for (size_t i = 0; i < added_tokens_.size(); ++i) {
    AddedToken& t = added_tokens_[i];
    t.decoded = t.content;
    if (t.normalized && normalizer_) normalizer_(t.decoded);
    (t.normalized ? normalized_matcher_ : raw_matcher_).add(t.decoded, static_cast<int32_t>(i));
    if (t.special) special_contents_.insert(t.content);
  }

  auto id_of = [&](const std::string& tok) -> int32_t {
    for (const AddedToken& t : added_tokens_)
      if (t.content == tok) return t.id;
    return model_->id(tok);
  };
  if (j.contains("post_processor") && !j.at("post_processor").is_null())
    L.post_processor(j.at("post_processor"), "post_processor", prefix_, suffix_);

  // BOS/EOS: tokenizer_config.json, else config.json, else the template's first special.
  const std::string bos_tok = config_token(tcfg, "bos_token"),
                    eos_tok = config_token(tcfg, "eos_token");
  if (!bos_tok.empty()) bos_ = id_of(bos_tok);
  if (!eos_tok.empty()) eos_ = id_of(eos_tok);
  if (bos_ < 0 || eos_ < 0) {
    auto cfg_id = [&](const char* key) -> int32_t {
      if (!mcfg.is_object() || !mcfg.contains(key)) return -1;
      const json& v = mcfg.at(key);
      const json& first = v.is_array() && !v.empty() ? v[0] : v;
      return json_integer<int32_t>(first).value_or(-1);
    };
    if (bos_ < 0) bos_ = cfg_id("bos_token_id");
    if (eos_ < 0) eos_ = cfg_id("eos_token_id");
  }
  if (bos_ < 0 && !prefix_.empty()) bos_ = prefix_.front();
  // transformers rebuilds the post-processor of Llama tokenizers from these flags.
  const bool has_post = j.contains("post_processor") && !j.at("post_processor").is_null();
  if (!has_post && tcfg.is_object()) {
    if (L.opt_bool(tcfg, "add_bos_token", false) && bos_ >= 0) prefix_.push_back(bos_);
    if (L.opt_bool(tcfg, "add_eos_token", false) && eos_ >= 0) suffix_.push_back(eos_);
  }

  std::string key = core::str(identity, "\nbos ", bos_, " eos ", eos_, " prefix");
  for (int32_t id : prefix_) key += core::str(" ", id);
  key += " suffix";
  for (int32_t id : suffix_) key += core::str(" ", id);
  fingerprint_ = fingerprint_prefix + core::sha256_hex(key);
}

}  // namespace

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& tokenizer_json_path) {
  const std::string bytes = core::read_file(tokenizer_json_path);
  json j;
  try {
    j = json::parse(bytes);
  } catch (const json::exception& e) {
    throw core::Error(core::str(tokenizer_json_path, ": invalid JSON: ", e.what()));
  }
  const std::filesystem::path dir = std::filesystem::path(tokenizer_json_path).parent_path();
  const json tcfg = read_json_if_exists(dir / "tokenizer_config.json");
  const json mcfg = read_json_if_exists(dir / "config.json");
  return tokenizer_from_json(j, tokenizer_json_path, tcfg, mcfg, bytes, "hf-bpe:");
}

std::unique_ptr<Tokenizer> tokenizer_from_json(const nlohmann::json& tokenizer_json,
                                               const std::string& context,
                                               const nlohmann::json& tokenizer_config,
                                               const nlohmann::json& model_config,
                                               const std::string& identity,
                                               const std::string& fingerprint_prefix) {
  try {
    return std::make_unique<HfTokenizer>(tokenizer_json, context, tokenizer_config, model_config,
                                         identity, fingerprint_prefix);
  } catch (const nlohmann::json::exception& e) {  // a value of the wrong JSON type
    throw core::Error(core::str(context, ": unexpected structure (", e.what(), ")"));
  }
}

bool is_byte_level_spelled(std::string_view token) {
  const ByteLevelTables& t = byte_level();
  for (char32_t c : uc::decode_utf8(token))
    if (!t.char_byte.count(c)) return false;
  return true;
}

std::string byte_level_spell(std::string_view bytes) {
  const ByteLevelTables& t = byte_level();
  std::string out;
  for (unsigned char c : bytes) out += t.byte_str[c];
  return out;
}

}  // namespace patch::text

// GGUF-embedded vocabularies.
// `llama` (SentencePiece with scores): llama.cpp's llm_tokenizer_spm. Adjacent
// symbols are merged greedily by the score of the merged token (highest first,
// leftmost on ties); what never forms a token falls back to <0xNN> byte tokens.
// `gpt2` (byte-level BPE with merges): the tokenizer.json the vocabulary stands
// for, with the pre-tokenizer that tokenizer.ggml.pre names, run through the
// Hugging Face pipeline of hf_tokenizer.cpp.
#include <cstdio>
#include <functional>
#include <queue>
#include <string_view>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/gguf.h"
#include "text/hf_pipeline.h"
#include "text/json_checked.h"
#include "core/sha256.h"
#include "text/token_matcher.h"
#include "text/tokenizer.h"
#include "text/unicode.h"
#include "text/word_cache.h"

namespace patch::text {

namespace {

using json = nlohmann::json;

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// llama_token_type / llama_vocab token types stored in tokenizer.ggml.token_type.
enum TokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

// A token type as stored; a value that is no integer counts as normal, as an
// unknown type does in llama.cpp.
int32_t token_type(const json& v) { return json_integer<int32_t>(v).value_or(kNormal); }

// llama.cpp's unicode_len_utf8: by the high nibble of the lead byte.
size_t spm_char_len(unsigned char lead) {
  static const size_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lookup[lead >> 4];
}

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(const io::GgufFile& gguf);

  std::vector<int32_t> encode(const std::string& text, bool add_special) const override {
    std::vector<int32_t> ids;
    if (add_special && add_bos_ && bos_ >= 0) ids.push_back(bos_);
    bool prev_special = true;  // the text start counts as after a special token
    size_t pos = 0, b, e;
    int32_t id;
    auto raw = [&](std::string_view frag) {
      std::string s;
      if (add_space_prefix_ && prev_special) s = " ";
      s += frag;
      std::string escaped;
      escaped.reserve(s.size() + s.size() / 4);
      for (char c : s) {
        if (c == ' ')
          escaped += kSpace;
        else
          escaped.push_back(c);
      }
      encode_escaped(escaped, ids);
      prev_special = false;
    };
    while (special_.find(text, pos, b, e, id)) {
      if (b > pos) raw(std::string_view(text).substr(pos, b - pos));
      ids.push_back(id);
      prev_special = true;
      pos = e;
    }
    if (pos < text.size()) raw(std::string_view(text).substr(pos));
    if (add_special && add_eos_ && eos_ >= 0) ids.push_back(eos_);
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    size_t first = 0, last = ids.size();
    if (skip_special && add_bos_ && first < last && ids[first] == bos_) ++first;
    if (skip_special && add_eos_ && first < last && ids[last - 1] == eos_) --last;
    std::string out;
    bool strip = add_space_prefix_;  // llama.cpp strips one space from the first piece
    for (size_t i = first; i < last; ++i) {
      const int32_t id = ids[i];
      std::string piece;
      if (id >= 0 && static_cast<size_t>(id) < tokens_.size()) {
        const std::string& t = tokens_[static_cast<size_t>(id)];
        switch (types_[static_cast<size_t>(id)]) {
          case kNormal:
            for (size_t k = 0; k < t.size();) {
              if (t.compare(k, kSpace.size(), kSpace) == 0) {
                piece.push_back(' ');
                k += kSpace.size();
              } else {
                piece.push_back(t[k++]);
              }
            }
            break;
          case kByte:
            piece.push_back(static_cast<char>(byte_value_[static_cast<size_t>(id)]));
            break;
          case kUserDefined:
            piece = t;
            break;
          case kControl:
          case kUnknown:
            if (!skip_special) piece = t;
            break;
          default:
            break;  // unused tokens render as nothing
        }
      }
      if (strip && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
      strip = false;
      out += piece;
    }
    return out;
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(tokens_.size()); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  std::string fingerprint() const override { return fingerprint_; }

 private:
  int32_t lookup(std::string_view s) const {
    const auto it = index_.find(s);
    return it == index_.end() ? -1 : it->second;
  }

  // Splits text (spaces already escaped) into words when merges cannot cross
  // word starts, caching each word's ids; otherwise one session for all.
  void encode_escaped(const std::string& text, std::vector<int32_t>& out) const {
    if (!word_safe_) {
      session(text, out);
      return;
    }
    size_t start = 0;
    for (size_t i = 1; i <= text.size(); ++i) {
      const bool boundary =
          i == text.size() ||
          (text.compare(i, kSpace.size(), kSpace) == 0 &&
           !(i >= kSpace.size() && text.compare(i - kSpace.size(), kSpace.size(), kSpace) == 0));
      if (!boundary) continue;
      encode_word(std::string_view(text).substr(start, i - start), out);
      start = i;
    }
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    cache_.encode(word, out,
                  [this](std::string_view w, std::vector<int32_t>& ids) { session(w, ids); });
  }

  // llm_tokenizer_spm_session::tokenize.
  void session(std::string_view text, std::vector<int32_t>& out) const {
    struct Symbol {
      int prev, next;
      size_t offset, n;
    };
    struct Bigram {
      int left, right;
      float score;
      size_t size;
    };
    struct Worse {
      bool operator()(const Bigram& l, const Bigram& r) const {
        return l.score < r.score || (l.score == r.score && l.left > r.left);
      }
    };
    std::vector<Symbol> symbols;
    for (size_t offs = 0; offs < text.size();) {
      const size_t n =
          std::min(spm_char_len(static_cast<unsigned char>(text[offs])), text.size() - offs);
      const int index = static_cast<int>(symbols.size());
      symbols.push_back(Symbol{index - 1, offs + n == text.size() ? -1 : index + 1, offs, n});
      offs += n;
    }
    std::priority_queue<Bigram, std::vector<Bigram>, Worse> queue;
    std::unordered_map<std::string_view, std::pair<int, int>> rev_merge;
    auto try_add = [&](int left, int right) {
      if (left == -1 || right == -1) return;
      const std::string_view s =
          text.substr(symbols[static_cast<size_t>(left)].offset,
                      symbols[static_cast<size_t>(left)].n + symbols[static_cast<size_t>(right)].n);
      const int32_t id = lookup(s);
      if (id < 0) return;
      queue.push(Bigram{left, right, scores_[static_cast<size_t>(id)], s.size()});
      rev_merge[s] = {left, right};
    };
    for (size_t i = 1; i < symbols.size(); ++i)
      try_add(static_cast<int>(i) - 1, static_cast<int>(i));
    while (!queue.empty()) {
      const Bigram bg = queue.top();
      queue.pop();
      Symbol& l = symbols[static_cast<size_t>(bg.left)];
      Symbol& r = symbols[static_cast<size_t>(bg.right)];
      if (l.n == 0 || r.n == 0 || l.n + r.n != bg.size) continue;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = bg.left;
      try_add(l.prev, bg.left);
      try_add(bg.left, l.next);
    }
    // resegment: a symbol that is not a token is split back along the merges
    // that built it, and what is left falls back to bytes.
    std::function<void(const Symbol&)> resegment = [&](const Symbol& sym) {
      const std::string_view s = text.substr(sym.offset, sym.n);
      const int32_t id = lookup(s);
      if (id >= 0) {
        out.push_back(id);
        return;
      }
      const auto p = rev_merge.find(s);
      if (p == rev_merge.end()) {
        for (unsigned char c : s) out.push_back(byte_token_[c]);
        return;
      }
      resegment(symbols[static_cast<size_t>(p->second.first)]);
      resegment(symbols[static_cast<size_t>(p->second.second)]);
    };
    if (symbols.empty()) return;
    for (int i = 0; i != -1; i = symbols[static_cast<size_t>(i)].next)
      resegment(symbols[static_cast<size_t>(i)]);
  }

  std::vector<std::string> tokens_;
  std::vector<float> scores_;
  std::vector<int32_t> types_;
  std::vector<int> byte_value_;
  std::unordered_map<std::string_view, int32_t> index_;  // views into tokens_
  int32_t byte_token_[256];
  TokenMatcher special_;
  int32_t bos_ = -1, eos_ = -1, unk_ = -1;
  bool add_bos_ = true, add_eos_ = false, add_space_prefix_ = true;
  bool word_safe_ = true;
  std::string fingerprint_;

  WordCache cache_;
};

SpmTokenizer::SpmTokenizer(const io::GgufFile& gguf) {
  const json& m = gguf.metadata();
  const std::string& path = gguf.path();
  auto fail = [&](const std::string& what) -> void {
    throw core::Error(core::str(path, ": ", what));
  };
  auto array = [&](const char* key, bool required) -> const json* {
    if (!m.contains(key)) {
      if (required) fail(core::str("missing metadata key '", key, "'"));
      return nullptr;
    }
    if (!m.at(key).is_array()) fail(core::str("metadata '", key, "' must be an array"));
    return &m.at(key);
  };
  const json& tokens = *array("tokenizer.ggml.tokens", true);
  const size_t n = tokens.size();
  tokens_.reserve(n);
  for (const json& t : tokens) {
    if (!t.is_string()) fail("metadata 'tokenizer.ggml.tokens' must hold strings");
    tokens_.push_back(t.get<std::string>());
  }
  scores_.assign(n, 0.0f);
  if (const json* s = array("tokenizer.ggml.scores", false)) {
    if (s->size() != n)
      fail(core::str("'tokenizer.ggml.scores' has ", s->size(), " entries, expected ", n));
    for (size_t i = 0; i < n; ++i) {
      if (!(*s)[i].is_number()) fail("metadata 'tokenizer.ggml.scores' must hold numbers");
      scores_[i] = (*s)[i].get<float>();
    }
  }
  types_.assign(n, kNormal);
  if (const json* t = array("tokenizer.ggml.token_type", false)) {
    if (t->size() != n)
      fail(core::str("'tokenizer.ggml.token_type' has ", t->size(), " entries, expected ", n));
    for (size_t i = 0; i < n; ++i) types_[i] = token_type((*t)[i]);
  }
  auto opt_id = [&](const char* key, int32_t fallback) {
    if (!m.contains(key)) return fallback;
    const int64_t v = json_integer<int64_t>(m.at(key)).value_or(-1);
    if (v < 0 || v >= static_cast<int64_t>(n))
      fail(core::str("'", key, "' = ", v, " is outside the vocabulary"));
    return static_cast<int32_t>(v);
  };
  auto opt_bool = [&](const char* key, bool fallback) {
    return m.contains(key) && m.at(key).is_boolean() ? m.at(key).get<bool>() : fallback;
  };
  // llama.cpp's defaults for SentencePiece vocabularies.
  bos_ = opt_id("tokenizer.ggml.bos_token_id", n > 1 ? 1 : -1);
  eos_ = opt_id("tokenizer.ggml.eos_token_id", n > 2 ? 2 : -1);
  unk_ = opt_id("tokenizer.ggml.unknown_token_id", n > 0 ? 0 : -1);
  add_bos_ = opt_bool("tokenizer.ggml.add_bos_token", true);
  add_eos_ = opt_bool("tokenizer.ggml.add_eos_token", false);
  add_space_prefix_ = opt_bool("tokenizer.ggml.add_space_prefix", true);

  index_.reserve(n);
  byte_value_.assign(n, -1);
  for (size_t i = 0; i < n; ++i) {
    const std::string& t = tokens_[i];
    index_.emplace(std::string_view(t), static_cast<int32_t>(i));
    const int type = types_[i];
    if ((type == kUnknown || type == kControl || type == kUserDefined) && !t.empty())
      special_.add(t, static_cast<int32_t>(i));
    if (type == kByte) {
      unsigned v;
      if (t.size() != 6 || std::sscanf(t.c_str(), "<0x%02X>", &v) != 1)
        fail(core::str("byte token ", i, " '", t, "' is not <0xNN>"));
      byte_value_[i] = static_cast<int>(v);
    }
    // Words can be tokenized separately only if no token has a non-space
    // character followed by U+2581 (which would merge across a word start).
    if (word_safe_ && t.find(kSpace, 1) != std::string::npos) {
      const std::u32string u = unicode::decode_utf8(t);
      for (size_t k = 1; k < u.size(); ++k)
        if (u[k] == 0x2581 && u[k - 1] != 0x2581) word_safe_ = false;
    }
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    int32_t id = lookup(name);
    if (id < 0) id = lookup(std::string(1, static_cast<char>(b)));
    byte_token_[b] = id >= 0 ? id : unk_;
  }

  core::Sha256 h;
  for (size_t i = 0; i < n; ++i) {
    h.update(tokens_[i]);
    h.update(core::str("\t", scores_[i], "\t", types_[i], "\n"));
  }
  h.update(core::str("bos ", bos_, " eos ", eos_, " unk ", unk_, " add_bos ", add_bos_, " add_eos ",
                     add_eos_, " space_prefix ", add_space_prefix_));
  fingerprint_ = "gguf-spm:" + h.hex_digest();
}

// The pre-tokenizer regexes of llama.cpp's llama_vocab pre types, as the
// models' own tokenizer.json files spell them.
constexpr const char* kLlama3Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+|\s+(?!\S)|\s+)";

json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}

json split_then_bytes(const char* regex) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           json::array({{{"type", "Split"},
                         {"pattern", {{"Regex", regex}}},
                         {"behavior", "Isolated"},
                         {"invert", false}},
                        byte_level(false)})}};
}

// What a tokenizer.json of the model family that `pre` names has: normalizer,
// pre-tokenizer, and whether words in the vocabulary skip the merges
// (llama.cpp's tokenizer_ignore_merges). Unknown names are refused: a wrong
// split would silently give other ids.
struct PreTokenization {
  json normalizer;
  json pre_tokenizer;
  bool ignore_merges = false;
};

PreTokenization pre_tokenization(const std::string& pre, const std::string& path) {
  PreTokenization p;
  if (pre == "default" || pre == "gpt-2" || pre == "gpt2") {
    p.pre_tokenizer = byte_level(true);
  } else if (pre == "smollm") {
    // SmolLM's tokenizer.json: each digit alone, then GPT-2's split.
    p.pre_tokenizer = {
        {"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})}};
  } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
    p.pre_tokenizer = split_then_bytes(kLlama3Split);
    p.ignore_merges = true;
  } else if (pre == "qwen2") {
    p.normalizer = {{"type", "NFC"}};
    p.pre_tokenizer = split_then_bytes(kQwen2Split);
  } else {
    throw core::Error(core::str(path, ": tokenizer.ggml.pre '", pre,
                                "' is not supported (supported: default, gpt-2, smollm, llama-bpe, "
                                "llama3, llama-v3, qwen2)"));
  }
  return p;
}

// A `gpt2` vocabulary as the tokenizer.json it stands for: tokens outside
// GPT-2's byte alphabet are respelled in it, control tokens become special
// added tokens and user-defined ones plain added tokens (both matched in the
// raw text), and BOS is added when tokenizer.ggml.add_bos_token says so.
std::unique_ptr<Tokenizer> load_gguf_bpe(const io::GgufFile& gguf) {
  const json& m = gguf.metadata();
  const std::string& path = gguf.path();
  auto fail = [&](const std::string& what) { throw core::Error(core::str(path, ": ", what)); };
  auto array = [&](const char* key) -> const json& {
    if (!m.contains(key)) fail(core::str("missing metadata key '", key, "'"));
    if (!m.at(key).is_array()) fail(core::str("metadata '", key, "' must be an array"));
    return m.at(key);
  };
  const json& tokens = array("tokenizer.ggml.tokens");
  const json& merges = array("tokenizer.ggml.merges");
  if (merges.empty()) fail("metadata 'tokenizer.ggml.merges' is empty (a gpt2 vocabulary needs merges)");
  const size_t n = tokens.size();
  std::vector<int32_t> types(n, kNormal);
  if (m.contains("tokenizer.ggml.token_type")) {
    const json& t = array("tokenizer.ggml.token_type");
    if (t.size() != n)
      fail(core::str("'tokenizer.ggml.token_type' has ", t.size(), " entries, expected ", n));
    for (size_t i = 0; i < n; ++i) types[i] = token_type(t[i]);
  }
  const std::string pre = m.contains("tokenizer.ggml.pre") && m.at("tokenizer.ggml.pre").is_string()
                              ? m.at("tokenizer.ggml.pre").get<std::string>()
                              : "default";
  PreTokenization p = pre_tokenization(pre, path);

  json vocab = json::object();
  json added = json::array();
  for (size_t i = 0; i < n; ++i) {
    if (!tokens[i].is_string()) fail("metadata 'tokenizer.ggml.tokens' must hold strings");
    const std::string t = tokens[i].get<std::string>();
    const bool spelled = is_byte_level_spelled(t);
    vocab[spelled ? t : byte_level_spell(t)] = static_cast<int32_t>(i);
    if ((types[i] == kControl && spelled) || types[i] == kUserDefined)
      added.push_back({{"id", static_cast<int32_t>(i)},
                       {"content", t},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", types[i] == kControl}});
  }
  json tj = {{"model",
              {{"type", "BPE"},
               {"vocab", std::move(vocab)},
               {"merges", merges},
               {"ignore_merges", p.ignore_merges}}},
             {"normalizer", p.normalizer},
             {"pre_tokenizer", p.pre_tokenizer},
             {"post_processor", nullptr},
             {"decoder", {{"type", "ByteLevel"}}},
             {"added_tokens", std::move(added)}};

  json tcfg = json::object();
  auto special = [&](const char* key, const char* name) {
    if (!m.contains(key)) return;
    const int64_t id = json_integer<int64_t>(m.at(key)).value_or(-1);
    if (id < 0 || id >= static_cast<int64_t>(n))
      fail(core::str("'", key, "' = ", id, " is outside the vocabulary"));
    tcfg[name] = tokens[static_cast<size_t>(id)];
  };
  special("tokenizer.ggml.bos_token_id", "bos_token");
  special("tokenizer.ggml.eos_token_id", "eos_token");
  for (const char* flag : {"add_bos_token", "add_eos_token"}) {
    const std::string key = core::str("tokenizer.ggml.", flag);
    if (m.contains(key) && m.at(key).is_boolean()) tcfg[flag] = m.at(key).get<bool>();
  }
  return tokenizer_from_json(tj, path, tcfg, json(), tj.dump() + tcfg.dump(), "gguf-bpe:");
}

}  // namespace

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const io::GgufFile& gguf) {
  const json& m = gguf.metadata();
  if (!m.contains("tokenizer.ggml.model") || !m.at("tokenizer.ggml.model").is_string())
    throw core::Error(core::str(gguf.path(), ": missing metadata key 'tokenizer.ggml.model'"));
  const std::string model = m.at("tokenizer.ggml.model").get<std::string>();
  if (model != "llama" && model != "gpt2")
    throw core::Error(core::str(gguf.path(), ": tokenizer.ggml.model '", model,
                                "' is not supported (supported: 'llama', SentencePiece with scores; "
                                "'gpt2', byte-level BPE)"));
  try {
    if (model == "gpt2") return load_gguf_bpe(gguf);
    return std::make_unique<SpmTokenizer>(gguf);
  } catch (const nlohmann::json::exception& e) {  // metadata of the wrong type
    throw core::Error(core::str(gguf.path(), ": unexpected tokenizer metadata (", e.what(), ")"));
  }
}

}  // namespace patch::text

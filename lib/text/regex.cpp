#include "text/regex.h"

#include <algorithm>
#include <cctype>
#include <string_view>

#include "core/error.h"
#include "text/unicode.h"

namespace patch::text {

namespace {

namespace uc = unicode;

// Simple case folding as far as the supported subset needs it: ASCII letters,
// plus the two non-ASCII code points that fold onto ASCII (long s, Kelvin sign).
char32_t fold_case(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c == 0x17F) return 's';
  if (c == 0x212A) return 'k';
  return c;
}

bool is_ascii_letter(char32_t c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

struct Node {
  enum Kind { kEmpty, kChar, kAny, kClass, kConcat, kAlt, kRepeat, kLook } kind = kEmpty;
  char32_t c = 0;
  bool fold = false;
  int32_t cls = 0;
  int min = 0, max = 0;  // kRepeat; max < 0: unbounded
  bool greedy = true;
  bool negate = false;  // kLook
  std::vector<Node> kids;
};

bool nullable(const Node& n) {
  switch (n.kind) {
    case Node::kEmpty:
    case Node::kLook:
      return true;
    case Node::kChar:
    case Node::kAny:
    case Node::kClass:
      return false;
    case Node::kConcat:
      return std::all_of(n.kids.begin(), n.kids.end(), [](const Node& k) { return nullable(k); });
    case Node::kAlt:
      return std::any_of(n.kids.begin(), n.kids.end(), [](const Node& k) { return nullable(k); });
    case Node::kRepeat:
      return n.min == 0 || nullable(n.kids[0]);
  }
  return false;
}

// Category bit masks of the property names \p{..} accepts, keyed by the name
// in lower case without '_', '-' and spaces (Oniguruma's loose matching).
uint32_t property_mask(const std::string& key, bool& white_space) {
  using C = uc::Category;
  using uc::bit;
  struct Entry {
    const char* short_name;
    const char* long_name;
    uint32_t mask;
  };
  static const Entry entries[] = {
      {"l", "letter", uc::kLetter},
      {"lu", "uppercaseletter", bit(C::Lu)},
      {"ll", "lowercaseletter", bit(C::Ll)},
      {"lt", "titlecaseletter", bit(C::Lt)},
      {"lm", "modifierletter", bit(C::Lm)},
      {"lo", "otherletter", bit(C::Lo)},
      {"m", "mark", uc::kMark},
      {"mn", "nonspacingmark", bit(C::Mn)},
      {"mc", "spacingmark", bit(C::Mc)},
      {"me", "enclosingmark", bit(C::Me)},
      {"n", "number", uc::kNumber},
      {"nd", "decimalnumber", bit(C::Nd)},
      {"nl", "letternumber", bit(C::Nl)},
      {"no", "othernumber", bit(C::No)},
      {"p", "punctuation",
       bit(C::Pc) | bit(C::Pd) | bit(C::Ps) | bit(C::Pe) | bit(C::Pi) | bit(C::Pf) | bit(C::Po)},
      {"pc", "connectorpunctuation", bit(C::Pc)},
      {"pd", "dashpunctuation", bit(C::Pd)},
      {"ps", "openpunctuation", bit(C::Ps)},
      {"pe", "closepunctuation", bit(C::Pe)},
      {"pi", "initialpunctuation", bit(C::Pi)},
      {"pf", "finalpunctuation", bit(C::Pf)},
      {"po", "otherpunctuation", bit(C::Po)},
      {"s", "symbol", bit(C::Sm) | bit(C::Sc) | bit(C::Sk) | bit(C::So)},
      {"sm", "mathsymbol", bit(C::Sm)},
      {"sc", "currencysymbol", bit(C::Sc)},
      {"sk", "modifiersymbol", bit(C::Sk)},
      {"so", "othersymbol", bit(C::So)},
      {"z", "separator", bit(C::Zs) | bit(C::Zl) | bit(C::Zp)},
      {"zs", "spaceseparator", bit(C::Zs)},
      {"zl", "lineseparator", bit(C::Zl)},
      {"zp", "paragraphseparator", bit(C::Zp)},
      {"c", "other", bit(C::Cc) | bit(C::Cf) | bit(C::Cs) | bit(C::Co) | bit(C::Cn)},
      {"cc", "control", bit(C::Cc)},
      {"cf", "format", bit(C::Cf)},
      {"cs", "surrogate", bit(C::Cs)},
      {"co", "privateuse", bit(C::Co)},
      {"cn", "unassigned", bit(C::Cn)},
  };
  white_space = key == "whitespace" || key == "space";
  if (white_space) return 0;
  for (const Entry& e : entries)
    if (key == e.short_name || key == e.long_name) return e.mask;
  return 0;
}

class Parser {
 public:
  Parser(const std::string& pattern, std::vector<Regex::CharClass>& classes)
      : pattern_(pattern), p_(uc::decode_utf8(pattern)), classes_(classes) {}

  Node parse() {
    Node n = parse_alt();
    if (i_ < p_.size()) fail("unbalanced ')'");
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw core::Error(core::str("regex '", pattern_, "': ", what, " at offset ", i_));
  }
  bool at_end() const { return i_ >= p_.size(); }
  char32_t peek(size_t ahead = 0) const { return i_ + ahead < p_.size() ? p_[i_ + ahead] : 0; }
  bool eat(char32_t c) {
    if (peek() != c || at_end()) return false;
    ++i_;
    return true;
  }

  Node parse_alt() {
    Node alt;
    alt.kind = Node::kAlt;
    alt.kids.push_back(parse_concat());
    while (eat('|')) alt.kids.push_back(parse_concat());
    if (alt.kids.size() == 1) return std::move(alt.kids[0]);
    return alt;
  }

  Node parse_concat() {
    Node cat;
    cat.kind = Node::kConcat;
    while (!at_end() && peek() != '|' && peek() != ')') {
      // (?i) and (?-i) switch case folding for the rest of the enclosing group.
      if (peek() == '(' && peek(1) == '?' &&
          (peek(2) == 'i' || (peek(2) == '-' && peek(3) == 'i'))) {
        const size_t flag_end = peek(2) == 'i' ? 3 : 4;
        if (peek(flag_end) == ')') {
          fold_ = peek(2) == 'i';
          i_ += flag_end + 1;
          continue;
        }
      }
      cat.kids.push_back(parse_repeat());
    }
    if (cat.kids.empty()) return Node{};
    if (cat.kids.size() == 1) return std::move(cat.kids[0]);
    return cat;
  }

  bool parse_count(int& out) {
    if (at_end() || peek() < '0' || peek() > '9') return false;
    long v = 0;
    while (!at_end() && peek() >= '0' && peek() <= '9') {
      v = v * 10 + (peek() - '0');
      if (v > 1000) fail("repetition count above 1000");
      ++i_;
    }
    out = static_cast<int>(v);
    return true;
  }

  Node parse_repeat() {
    Node atom = parse_atom();
    for (;;) {
      int min, max;
      const size_t start = i_;
      if (eat('*')) {
        min = 0, max = -1;
      } else if (eat('+')) {
        min = 1, max = -1;
      } else if (eat('?')) {
        min = 0, max = 1;
      } else if (peek() == '{' && !at_end()) {
        ++i_;
        if (!parse_count(min)) {  // Oniguruma reads a malformed {..} literally
          i_ = start;
          return atom;
        }
        max = min;
        if (eat(',')) {
          if (!parse_count(max)) max = -1;
        }
        if (!eat('}')) {
          i_ = start;
          return atom;
        }
        if (max >= 0 && max < min) fail("repetition {n,m} with m < n");
      } else {
        return atom;
      }
      Node rep;
      rep.kind = Node::kRepeat;
      rep.min = min;
      rep.max = max;
      if (eat('?'))
        rep.greedy = false;
      else if (peek() == '+' && !at_end())
        fail("possessive quantifiers are not supported");
      if (atom.kind == Node::kEmpty || atom.kind == Node::kLook) fail("nothing to repeat");
      if (max < 0 && nullable(atom)) fail("a repeated group that can match the empty string");
      rep.kids.push_back(std::move(atom));
      atom = std::move(rep);
    }
  }

  Node char_node(char32_t c) {
    Node n;
    n.kind = Node::kChar;
    if (fold_ && (is_ascii_letter(c) || c == 0x17F || c == 0x212A)) {
      n.fold = true;
      c = fold_case(c);
    } else if (fold_ && uc::in(c, uc::bit(uc::Category::Lu) | uc::bit(uc::Category::Ll) |
                                      uc::bit(uc::Category::Lt))) {
      fail("case-insensitive matching of non-ASCII letters is not supported");
    }
    n.c = c;
    return n;
  }

  Node class_node(Regex::CharClass cls) {
    cls.fold = fold_;
    for (char32_t c = 0; c < 128; ++c)
      if (cls.contains_slow(c)) cls.ascii[c >> 6] |= uint64_t{1} << (c & 63);
    Node n;
    n.kind = Node::kClass;
    n.cls = static_cast<int32_t>(classes_.size());
    classes_.push_back(std::move(cls));
    return n;
  }

  Node parse_atom() {
    if (at_end()) fail("unexpected end");
    const char32_t c = p_[i_++];
    switch (c) {
      case '(':
        return parse_group();
      case '[':
        return class_node(parse_class());
      case '.': {
        Node n;
        n.kind = Node::kAny;
        return n;
      }
      case '\\': {
        Regex::CharClass cls;
        char32_t lit;
        if (parse_escape(cls, lit, /*in_class=*/false)) return class_node(std::move(cls));
        return char_node(lit);
      }
      case '^':
      case '$':
        fail("anchors are not supported");
      case '*':
      case '+':
      case '?':
        fail("nothing to repeat");
      default:
        return char_node(c);
    }
  }

  Node parse_group() {
    Node look;
    bool is_look = false;
    const bool saved_fold = fold_;
    if (eat('?')) {
      if (eat(':')) {
      } else if (eat('=')) {
        is_look = true;
      } else if (eat('!')) {
        is_look = true;
        look.negate = true;
      } else if (peek() == 'i' && peek(1) == ':') {
        fold_ = true;
        i_ += 2;
      } else if (peek() == '-' && peek(1) == 'i' && peek(2) == ':') {
        fold_ = false;
        i_ += 3;
      } else {
        fail("unsupported group (only (?:..) (?i:..) (?=..) (?!..) are supported)");
      }
    }
    Node body = parse_alt();
    if (!eat(')')) fail("missing ')'");
    fold_ = saved_fold;
    if (!is_look) return body;
    look.kind = Node::kLook;
    look.kids.push_back(std::move(body));
    return look;
  }

  char32_t parse_hex(size_t digits, bool braced) {
    char32_t v = 0;
    size_t n = 0;
    while (!at_end() && (braced || n < digits)) {
      const char32_t h = peek();
      int d;
      if (h >= '0' && h <= '9')
        d = static_cast<int>(h - '0');
      else if (h >= 'a' && h <= 'f')
        d = static_cast<int>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F')
        d = static_cast<int>(h - 'A' + 10);
      else
        break;
      v = v * 16 + static_cast<char32_t>(d);
      ++i_;
      ++n;
    }
    if (n == 0 || (!braced && n != digits) || v >= 0x110000) fail("bad hexadecimal escape");
    if (braced && !eat('}')) fail("missing '}' in \\x{..}");
    return v;
  }

  // After a backslash. Returns true and fills `cls` for a class escape
  // (\s \d \w \p{..} and negations), else sets `lit` to the escaped character.
  bool parse_escape(Regex::CharClass& cls, char32_t& lit, bool in_class) {
    if (at_end()) fail("trailing backslash");
    const char32_t e = p_[i_++];
    Regex::ClassItem item{};
    switch (e) {
      case 's':
      case 'S':
        item.kind = Regex::ClassItem::kWhiteSpace;
        item.negated = e == 'S';
        break;
      case 'd':
      case 'D':
        item.kind = Regex::ClassItem::kCategories;
        item.categories = uc::bit(uc::Category::Nd);
        item.negated = e == 'D';
        break;
      case 'w':
      case 'W':
        item.kind = Regex::ClassItem::kCategories;
        item.categories = uc::kLetter | uc::kMark | uc::kNumber | uc::bit(uc::Category::Pc);
        item.negated = e == 'W';
        break;
      case 'p':
      case 'P': {
        std::string name;
        bool negated = e == 'P';
        if (eat('{')) {
          if (eat('^')) negated = !negated;
          while (!at_end() && peek() != '}') {
            const char32_t ch = p_[i_++];
            if (ch == '_' || ch == '-' || ch == ' ') continue;
            if (ch >= 0x80) fail("bad property name");
            name.push_back(static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch));
          }
          if (!eat('}')) fail("missing '}' in \\p{..}");
        } else if (!at_end()) {
          const char32_t ch = p_[i_++];
          name.push_back(static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch));
        }
        bool white_space = false;
        const uint32_t mask = property_mask(name, white_space);
        if (!mask && !white_space) fail("unsupported property \\p{" + name + "}");
        item.kind = white_space ? Regex::ClassItem::kWhiteSpace : Regex::ClassItem::kCategories;
        item.categories = mask;
        item.negated = negated;
        break;
      }
      case 'r':
        lit = '\r';
        return false;
      case 'n':
        lit = '\n';
        return false;
      case 't':
        lit = '\t';
        return false;
      case 'f':
        lit = '\f';
        return false;
      case 'v':
        lit = '\v';
        return false;
      case 'e':
        lit = 0x1B;
        return false;
      case 'a':
        lit = 0x07;
        return false;
      case '0':
        lit = 0;
        return false;
      case 'x':
        lit = eat('{') ? parse_hex(0, /*braced=*/true) : parse_hex(2, /*braced=*/false);
        return false;
      case 'u':
        lit = parse_hex(4, /*braced=*/false);
        return false;
      default:
        if (e < 0x80 && (std::isalnum(static_cast<int>(e)))) {
          if (in_class && e == 'b') {
            lit = 0x08;
            return false;
          }
          fail(core::str("unsupported escape \\", static_cast<char>(e)));
        }
        lit = e;
        return false;
    }
    cls.items.push_back(item);
    return true;
  }

  Regex::CharClass parse_class() {
    Regex::CharClass cls;
    if (eat('^')) cls.negated = true;
    bool first = true;
    for (;;) {
      if (at_end()) fail("missing ']'");
      char32_t c = p_[i_++];
      if (c == ']' && !first) break;
      first = false;
      if (c == '[') fail("nested classes and POSIX brackets are not supported");
      if (c == '&' && peek() == '&') fail("class intersection && is not supported");
      if (c == '\\') {
        if (parse_escape(cls, c, /*in_class=*/true)) continue;
      }
      char32_t hi = c;
      if (peek() == '-' && peek(1) != ']' && i_ + 1 < p_.size()) {
        ++i_;
        hi = p_[i_++];
        if (hi == '\\') {
          Regex::CharClass unused;
          if (parse_escape(unused, hi, /*in_class=*/true))
            fail("a class escape cannot end a range");
        } else if (hi == '[') {
          fail("nested classes are not supported");
        }
        if (hi < c) fail("empty range in class");
      }
      Regex::ClassItem item{};
      item.kind = Regex::ClassItem::kRange;
      item.lo = c;
      item.hi = hi;
      cls.items.push_back(item);
    }
    return cls;
  }

  const std::string& pattern_;
  std::u32string p_;
  size_t i_ = 0;
  bool fold_ = false;
  std::vector<Regex::CharClass>& classes_;
};

class Compiler {
 public:
  explicit Compiler(std::vector<Regex::Inst>& prog) : prog_(prog) {}

  void emit(const Node& n) {
    using Op = Regex::Op;
    switch (n.kind) {
      case Node::kEmpty:
        break;
      case Node::kChar:
        add(n.fold ? Op::kCharFold : Op::kChar).c = n.c;
        break;
      case Node::kAny:
        add(Op::kAny);
        break;
      case Node::kClass:
        add(Op::kClass).x = n.cls;
        break;
      case Node::kConcat:
        for (const Node& k : n.kids) emit(k);
        break;
      case Node::kAlt: {
        std::vector<size_t> jumps;
        for (size_t i = 0; i < n.kids.size(); ++i) {
          if (i + 1 == n.kids.size()) {
            emit(n.kids[i]);
            break;
          }
          const size_t split = prog_.size();
          add(Op::kSplit).x = static_cast<int32_t>(split + 1);
          emit(n.kids[i]);
          jumps.push_back(prog_.size());
          add(Op::kJump);
          prog_[split].y = here();
        }
        for (size_t j : jumps) prog_[j].x = here();
        break;
      }
      case Node::kRepeat: {
        for (int i = 0; i < n.min; ++i) emit(n.kids[0]);
        if (n.max < 0) {
          const size_t loop = prog_.size();
          add(Op::kSplit);
          emit(n.kids[0]);
          add(Op::kJump).x = static_cast<int32_t>(loop);
          set_split(loop, static_cast<int32_t>(loop + 1), here(), n.greedy);
        } else {
          std::vector<size_t> splits;
          for (int i = n.min; i < n.max; ++i) {
            splits.push_back(prog_.size());
            add(Op::kSplit);
            emit(n.kids[0]);
          }
          for (size_t s : splits) set_split(s, static_cast<int32_t>(s + 1), here(), n.greedy);
        }
        break;
      }
      case Node::kLook: {
        const size_t look = prog_.size();
        Regex::Inst& inst = add(Op::kLook);
        inst.negate = n.negate;
        inst.x = static_cast<int32_t>(look + 1);
        emit(n.kids[0]);
        add(Op::kMatch);
        prog_[look].y = here();
        break;
      }
    }
  }

 private:
  Regex::Inst& add(Regex::Op op) {
    prog_.push_back(Regex::Inst{op});
    return prog_.back();
  }
  int32_t here() const { return static_cast<int32_t>(prog_.size()); }
  void set_split(size_t at, int32_t body, int32_t exit, bool greedy) {
    prog_[at].x = greedy ? body : exit;
    prog_[at].y = greedy ? exit : body;
  }

  std::vector<Regex::Inst>& prog_;
};

}  // namespace

bool Regex::CharClass::contains_slow(char32_t c) const {
  auto item_has = [](const ClassItem& it, char32_t ch) {
    bool m = false;
    switch (it.kind) {
      case ClassItem::kRange:
        m = ch >= it.lo && ch <= it.hi;
        break;
      case ClassItem::kCategories:
        m = uc::in(ch, it.categories);
        break;
      case ClassItem::kWhiteSpace:
        m = uc::is_white_space(ch);
        break;
    }
    return m != it.negated;
  };
  bool m = false;
  for (const ClassItem& it : items) {
    m = item_has(it, c);
    if (!m && fold) {
      const char32_t f = fold_case(c);
      if (f != c || is_ascii_letter(c))
        m = item_has(it, f) || (is_ascii_letter(f) && item_has(it, f - 32));
    }
    if (m) break;
  }
  return m != negated;
}

bool Regex::CharClass::contains(char32_t c) const {
  if (c < 128) return (ascii[c >> 6] >> (c & 63)) & 1u;
  return contains_slow(c);
}

Regex::Regex(const std::string& pattern) : pattern_(pattern) {
  const Node root = Parser(pattern_, classes_).parse();
  Compiler(prog_).emit(root);
  prog_.push_back(Inst{Op::kMatch});
}

bool Regex::match_at(int32_t start_pc, const char32_t* text, size_t n, size_t start_pos,
                     size_t& end) const {
  // Backtracking with an explicit stack of (pc, pos) alternatives; lookaheads
  // recurse and use the part of the stack above `base`.
  thread_local std::vector<std::pair<int32_t, size_t>> stack;
  const size_t base = stack.size();
  stack.emplace_back(start_pc, start_pos);
  while (stack.size() > base) {
    auto [pc, pos] = stack.back();
    stack.pop_back();
    for (;;) {
      const Inst& in = prog_[static_cast<size_t>(pc)];
      bool ok = true;
      switch (in.op) {
        case Op::kChar:
          ok = pos < n && text[pos] == in.c;
          break;
        case Op::kCharFold:
          ok = pos < n && fold_case(text[pos]) == in.c;
          break;
        case Op::kAny:
          ok = pos < n && text[pos] != '\n';
          break;
        case Op::kClass:
          ok = pos < n && classes_[static_cast<size_t>(in.x)].contains(text[pos]);
          break;
        case Op::kSplit:
          stack.emplace_back(in.y, pos);
          pc = in.x;
          continue;
        case Op::kJump:
          pc = in.x;
          continue;
        case Op::kLook: {
          size_t unused;
          ok = match_at(in.x, text, n, pos, unused) != in.negate;
          if (ok) {
            pc = in.y;
            continue;
          }
          break;
        }
        case Op::kMatch:
          end = pos;
          stack.resize(base);
          return true;
      }
      if (!ok) break;
      ++pc;
      ++pos;
    }
  }
  return false;
}

bool Regex::search(const char32_t* text, size_t n, size_t from, size_t& begin, size_t& end) const {
  for (size_t s = from; s <= n; ++s) {
    if (match_at(0, text, n, s, end)) {
      begin = s;
      return true;
    }
  }
  return false;
}

std::vector<std::pair<size_t, size_t>> Regex::find_all(const std::u32string& text) const {
  // Oniguruma's find iterator: an empty match right after the previous match is
  // skipped by advancing one code point.
  std::vector<std::pair<size_t, size_t>> out;
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (pos <= text.size()) {
    size_t b, e;
    if (!search(text.data(), text.size(), pos, b, e)) break;
    if (b == e && have_last && last_end == e) {
      ++pos;
      continue;
    }
    out.emplace_back(b, e);
    pos = e;
    have_last = true;
    last_end = e;
  }
  return out;
}

}  // namespace patch::text

#include "text/unicode.h"

#include <algorithm>
#include <cstddef>
#include <vector>

namespace patch::text::unicode {

namespace tables {
extern const uint32_t category_runs[];
extern const size_t category_runs_entries;
extern const uint32_t combining_runs[];
extern const size_t combining_runs_entries;
extern const uint32_t decompositions[];
extern const size_t decompositions_entries;
extern const uint32_t compositions[];
extern const size_t compositions_entries;
extern const uint32_t white_space[];
extern const size_t white_space_entries;
}  // namespace tables

namespace {

// The run containing cp in a table of (first << shift) | value entries.
uint32_t run_value(const uint32_t* runs, size_t n, char32_t cp, int shift) {
  const uint32_t key = (static_cast<uint32_t>(cp) << shift) | ((1u << shift) - 1);
  const uint32_t* it = std::upper_bound(runs, runs + n, key);
  return *(it - 1) & ((1u << shift) - 1);
}

struct AsciiCategories {
  Category cat[128];
  AsciiCategories() {
    for (char32_t c = 0; c < 128; ++c)
      cat[c] = static_cast<Category>(
          run_value(tables::category_runs, tables::category_runs_entries, c, 5));
  }
};

constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

void decompose_into(char32_t cp, std::u32string& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  const uint32_t* d = tables::decompositions;
  const size_t n = tables::decompositions_entries;
  size_t lo = 0, hi = n;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (d[3 * mid] < cp)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo < n && d[3 * lo] == cp) {
    decompose_into(d[3 * lo + 1], out);
    if (d[3 * lo + 2] != 0) decompose_into(d[3 * lo + 2], out);
    return;
  }
  out.push_back(cp);
}

// The primary composite of (a, b), or 0.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const uint32_t* c = tables::compositions;
  const size_t n = tables::compositions_entries;
  size_t lo = 0, hi = n;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (c[3 * mid] < a || (c[3 * mid] == a && c[3 * mid + 1] < b))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < n && c[3 * lo] == a && c[3 * lo + 1] == b ? c[3 * lo + 2] : 0;
}

// Decodes one UTF-8 sequence at p[0..n). Returns its length when valid (cp set),
// else minus the length of the maximal invalid subpart (at least 1).
int decode_one(const unsigned char* p, size_t n, char32_t& cp) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // valid range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return -1;
  }
  for (int i = 1; i < len; ++i) {
    if (static_cast<size_t>(i) >= n) return -i;
    const unsigned char b = p[i];
    if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) return -i;
    cp = (cp << 6) | (b & 0x3F);
  }
  return len;
}

}  // namespace

Category category(char32_t cp) {
  static const AsciiCategories ascii;
  if (cp < 128) return ascii.cat[cp];
  if (cp >= 0x110000) return Category::Cn;
  return static_cast<Category>(
      run_value(tables::category_runs, tables::category_runs_entries, cp, 5));
}

bool is_white_space(char32_t cp) {
  if (cp < 128) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  for (size_t i = 0; i < tables::white_space_entries; ++i)
    if (cp >= tables::white_space[2 * i] && cp <= tables::white_space[2 * i + 1]) return true;
  return false;
}

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300 || cp >= 0x110000) return 0;
  return static_cast<uint8_t>(
      run_value(tables::combining_runs, tables::combining_runs_entries, cp, 8));
}

int utf8_length(unsigned char lead) {
  if (lead < 0xC2) return 1;
  if (lead < 0xE0) return 2;
  if (lead < 0xF0) return 3;
  if (lead < 0xF5) return 4;
  return 1;
}

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    const int len = decode_one(p + i, s.size() - i, cp);
    if (len > 0) {
      out.push_back(cp);
      i += static_cast<size_t>(len);
    } else {
      out.push_back(0xDC00 + p[i]);
      ++i;
    }
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp >= 0xDC80 && cp <= 0xDCFF) {
    out.push_back(static_cast<char>(cp - 0xDC00));  // an escaped invalid byte
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) append_utf8(out, cp);
  return out;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    const int len = decode_one(p + i, s.size() - i, cp);
    if (len > 0) {
      out.append(s.substr(i, static_cast<size_t>(len)));
      i += static_cast<size_t>(len);
    } else {
      out += "\xEF\xBF\xBD";
      i += static_cast<size_t>(-len);
    }
  }
  return out;
}

bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    const int len = decode_one(p + i, s.size() - i, cp);
    if (len < 0) return false;
    i += static_cast<size_t>(len);
  }
  return true;
}

std::u32string nfd(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (char32_t cp : s) {
    if (cp < 0xC0)
      out.push_back(cp);
    else
      decompose_into(cp, out);
  }
  // Canonical ordering: stable sort of each run of non-starters by class.
  size_t i = 0;
  while (i < out.size()) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < out.size() && combining_class(out[j]) != 0) ++j;
    std::stable_sort(
        out.begin() + static_cast<std::ptrdiff_t>(i), out.begin() + static_cast<std::ptrdiff_t>(j),
        [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  return out;
}

std::u32string nfc(std::u32string_view s) {
  // Below U+0300 nothing decomposes into or composes with anything.
  if (std::all_of(s.begin(), s.end(), [](char32_t c) { return c < 0x300; }))
    return std::u32string(s);
  std::u32string d = nfd(s);
  if (d.empty()) return d;
  // The canonical composition algorithm of UAX #15.
  size_t starter = 0, out = 1;
  bool have_starter = combining_class(d[0]) == 0;
  int last_class = have_starter ? 0 : 256;
  for (size_t i = 1; i < d.size(); ++i) {
    const char32_t ch = d[i];
    const int cls = combining_class(ch);
    const char32_t composite = have_starter ? compose(d[starter], ch) : 0;
    if (composite != 0 && (last_class < cls || last_class == 0)) {
      d[starter] = composite;
      continue;
    }
    if (cls == 0) {
      starter = out;
      have_starter = true;
    }
    last_class = cls;
    d[out++] = ch;
  }
  d.resize(out);
  return d;
}

}  // namespace patch::text::unicode

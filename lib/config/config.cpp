// Configuration pipeline: YAML/JSON loading, --set parsing, validation and the YAML dump.
#include "config/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <regex>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"

namespace patch::config {
namespace {

namespace fs = std::filesystem;
using core::ConfigError;
using core::str;

// Schema bounds at or beyond this magnitude mean "unbounded".
constexpr double kUnbounded = 1e300;

// Where each key's resolved value came from (higher rank wins), so that
// cross-key errors can name the file or option the user should fix.
using Origins = std::map<std::string, std::pair<int, std::string>>;
enum Rank { kDefaultRank = 0, kFileRank = 1, kShortcutRank = 2, kSetRank = 3 };

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

std::pair<std::string, std::string> split_key(const std::string& key) {
  const size_t dot = key.find('.');
  return {key.substr(0, dot), dot == std::string::npos ? "" : key.substr(dot + 1)};
}

const std::vector<std::string>& section_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const KeyDef& d : schema()) {
      std::string s = split_key(d.key).first;
      if (std::find(v.begin(), v.end(), s) == v.end()) v.push_back(s);
    }
    return v;
  }();
  return names;
}

const std::vector<std::string>& key_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const KeyDef& d : schema()) v.push_back(d.key);
    return v;
  }();
  return names;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), size_t{0});
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1] ? 1 : 0)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean 'x'?)" for the closest candidate, or "" when none is close.
std::string suggestion(const std::string& word, const std::vector<std::string>& candidates) {
  const std::string* best = nullptr;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_distance) best_distance = d, best = &c;
  }
  if (!best || best_distance > std::max<size_t>(2, word.size() / 3)) return "";
  return " (did you mean '" + *best + "'?)";
}

// A value as it appears in messages: JSON text, so that it always stays on one line.
std::string repr(const Json& v) {
  if (v.is_number_float() && !std::isfinite(v.get<double>()))
    return std::to_string(v.get<double>());
  return v.dump(-1, ' ', false, Json::error_handler_t::replace);
}

// Shortest decimal text that reads back as exactly x.
std::string shortest(double x) {
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  return buf;
}

std::string format_bound(double x) {
  if (x == std::trunc(x) && std::fabs(x) < 1e15) return std::to_string(static_cast<int64_t>(x));
  return shortest(x);
}

bool is_list(Type t) {
  return t == Type::kIntList || t == Type::kFloatList || t == Type::kStringList;
}

Type element_type(Type t) {
  switch (t) {
    case Type::kIntList:
      return Type::kInt;
    case Type::kFloatList:
      return Type::kFloat;
    case Type::kStringList:
      return Type::kString;
    default:
      return t;
  }
}

std::string bounds_text(const KeyDef& d) {
  const bool lo = d.min && *d.min > -kUnbounded, hi = d.max && *d.max < kUnbounded;
  if (lo && hi) return str(" in [", format_bound(*d.min), ", ", format_bound(*d.max), "]");
  if (lo) return " >= " + format_bound(*d.min);
  if (hi) return " <= " + format_bound(*d.max);
  return "";
}

// What a scalar of type t must be, e.g. "an integer >= 1" or (plural) "integers >= 1".
std::string scalar_description(Type t, const KeyDef& d, bool plural) {
  switch (t) {
    case Type::kBool:
      return plural ? "booleans" : "true or false";
    case Type::kInt:
      return (plural ? "integers" : "an integer") + bounds_text(d);
    case Type::kFloat:
      return (plural ? "numbers" : "a number") + bounds_text(d);
    default: {
      if (d.choices.empty()) return plural ? "strings" : "a string";
      std::string list;
      for (const auto& c : d.choices) list += (list.empty() ? "" : ", ") + c;
      return (plural ? "strings, each one of " : "one of ") + list;
    }
  }
}

std::string description(const KeyDef& d) {
  if (!is_list(d.type)) return scalar_description(d.type, d, /*plural=*/false);
  const std::string size = d.list_size ? std::to_string(*d.list_size) + " " : "";
  return "a list of " + size + scalar_description(element_type(d.type), d, /*plural=*/true);
}

[[noreturn]] void expected(const std::string& where, const std::string& what, const Json& got) {
  throw ConfigError(str(where, ": expected ", what, ", got ", repr(got)));
}

bool in_bounds(const KeyDef& d, double x) {  // NaN is never in bounds
  return !(d.min && !(x >= *d.min)) && !(d.max && !(x <= *d.max));
}

// Checks one scalar against type t and the key's bounds/choices; returns it normalised
// (integers as int64, numbers for float keys as double).
Json check_scalar(Type t, const KeyDef& d, const Json& v, const std::string& where) {
  const auto fail = [&] { expected(where, scalar_description(t, d, /*plural=*/false), v); };
  switch (t) {
    case Type::kBool:
      if (!v.is_boolean()) fail();
      return v;
    case Type::kInt: {
      int64_t i = 0;
      if (v.is_number_unsigned()) {
        if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) fail();
        i = static_cast<int64_t>(v.get<uint64_t>());
      } else if (v.is_number_integer()) {
        i = v.get<int64_t>();
      } else if (v.is_number_float() && v.get<double>() == std::trunc(v.get<double>()) &&
                 std::fabs(v.get<double>()) < 9e18) {
        i = static_cast<int64_t>(v.get<double>());  // 1e3 or 8.0 are whole numbers
      } else {
        fail();
      }
      if (!in_bounds(d, static_cast<double>(i))) fail();
      return i;
    }
    case Type::kFloat:
      if (!v.is_number() || !in_bounds(d, v.get<double>())) fail();
      return v.get<double>();
    default:
      if (!v.is_string()) fail();
      if (!d.choices.empty() &&
          std::find(d.choices.begin(), d.choices.end(), v.get<std::string>()) == d.choices.end())
        fail();
      return v;
  }
}

Json check_value(const KeyDef& d, const Json& v, const std::string& source) {
  const std::string where = source + ": " + d.key;
  if (v.is_null()) {
    if (d.default_value.is_null()) return v;  // keys without a default may stay unset
    expected(where, description(d), v);
  }
  if (!is_list(d.type)) return check_scalar(d.type, d, v, where);
  if (!v.is_array() || (d.list_size && v.size() != *d.list_size))
    expected(where, description(d), v);
  Json out = Json::array();
  for (size_t i = 0; i < v.size(); ++i)
    out.push_back(check_scalar(element_type(d.type), d, v[i], str(where, "[", i, "]")));
  return out;
}

// Every key of a partial tree, checked and normalised, in the tree's order.
std::vector<std::pair<const KeyDef*, Json>> check_tree(const Json& tree,
                                                       const std::string& source) {
  if (!tree.is_object())
    expected(source, "a mapping of sections (model:, data:, mask:, ...)", tree);
  std::vector<std::pair<const KeyDef*, Json>> out;
  for (auto s = tree.begin(); s != tree.end(); ++s) {
    const std::string& section = s.key();
    const auto& sections = section_names();
    if (std::find(sections.begin(), sections.end(), section) == sections.end())
      throw ConfigError(
          str(source, ": unknown section '", section, "'", suggestion(section, sections)));
    if (s.value().is_null()) continue;  // a section whose keys are all commented out
    if (!s.value().is_object())
      expected(str(source, ": ", section), "a section (a mapping of keys)", s.value());
    for (auto k = s.value().begin(); k != s.value().end(); ++k) {
      const std::string key = section + "." + k.key();
      const KeyDef* d = find_key(key);
      if (!d)
        throw ConfigError(str(source, ": unknown key '", key, "'", suggestion(key, key_names())));
      out.emplace_back(d, check_value(*d, k.value(), source));
    }
  }
  return out;
}

const Json* lookup(const Json& tree, const std::string& key) {
  const Json* node = &tree;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? dot : dot - start);
    if (!node->is_object() || !node->contains(part)) return nullptr;
    node = &(*node)[part];
    if (dot == std::string::npos) return node;
    start = dot + 1;
  }
}

void set_path(Json& tree, const std::string& key, Json value) {
  Json* node = &tree;
  size_t start = 0;
  for (size_t dot; (dot = key.find('.', start)) != std::string::npos; start = dot + 1) {
    Json& child = (*node)[key.substr(start, dot - start)];
    if (!child.is_object()) child = Json::object();
    node = &child;
  }
  (*node)[key.substr(start)] = std::move(value);
}

// YAML 1.2 core-schema resolution of an untagged plain scalar. Numbers are
// recognised here (yaml-cpp keeps scalars as text), so 5e-4 is a float.
Json plain_scalar(const std::string& s) {
  static const std::regex kInt(R"([-+]?[0-9]+)");
  static const std::regex kFloat(R"([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)");
  static const std::regex kInf(R"([-+]?\.(inf|Inf|INF))");
  static const std::regex kNan(R"(\.(nan|NaN|NAN))");
  if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
  if (s == "true" || s == "True" || s == "TRUE") return true;
  if (s == "false" || s == "False" || s == "FALSE") return false;
  if (std::regex_match(s, kInt)) {
    errno = 0;
    const long long i = std::strtoll(s.c_str(), nullptr, 10);
    if (errno != ERANGE) return static_cast<int64_t>(i);
  }
  if (std::regex_match(s, kFloat)) return std::strtod(s.c_str(), nullptr);
  if (std::regex_match(s, kInf))
    return s[0] == '-' ? -std::numeric_limits<double>::infinity()
                       : std::numeric_limits<double>::infinity();
  if (std::regex_match(s, kNan)) return std::numeric_limits<double>::quiet_NaN();
  return s;
}

Json yaml_to_json(const YAML::Node& node, const std::string& source) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      // "?" marks a plain scalar; quoted or !!str-tagged ones stay strings.
      return node.Tag() == "?" ? plain_scalar(node.Scalar()) : Json(node.Scalar());
    case YAML::NodeType::Sequence: {
      Json out = Json::array();
      for (const auto& e : node) out.push_back(yaml_to_json(e, source));
      return out;
    }
    case YAML::NodeType::Map: {
      Json out = Json::object();
      for (const auto& kv : node) {
        const YAML::Node& k = kv.first;
        if (!k.IsScalar())
          throw ConfigError(str(source, ":", k.Mark().line + 1, ": expected a plain key"));
        if (out.contains(k.Scalar()))
          throw ConfigError(
              str(source, ":", k.Mark().line + 1, ": duplicate key '", k.Scalar(), "'"));
        out[k.Scalar()] = yaml_to_json(kv.second, source);
      }
      return out;
    }
    default:
      return nullptr;
  }
}

bool is_quoted(const std::string& s) {
  return s.size() >= 2 && (s.front() == '"' || s.front() == '\'') && s.back() == s.front();
}

Json parse_yaml_value(const std::string& text, const std::string& arg) {
  try {
    return yaml_to_json(YAML::Load(text), "--set");
  } catch (const YAML::Exception& e) {
    throw ConfigError(str("--set '", arg, "': invalid YAML value: ", e.msg));
  }
}

// A string list from the command line: [a, "b, c", *.q_proj], a single item, or empty.
// Parsed by hand because glob patterns such as * are not valid plain YAML.
Json parse_string_list(const std::string& text) {
  const std::string t = trim(text);
  if (t.empty()) return Json::array();
  if (t.size() < 2 || t.front() != '[' || t.back() != ']') return Json::array({text});
  const std::string inner = trim(t.substr(1, t.size() - 2));
  Json out = Json::array();
  if (inner.empty()) return out;
  char quote = 0;
  size_t start = 0;
  for (size_t i = 0; i <= inner.size(); ++i) {
    if (i < inner.size()) {
      const char c = inner[i];
      if (quote) {
        if (c == quote) quote = 0;
        continue;
      }
      if (c == '"' || c == '\'') quote = c;
      if (c != ',') continue;
    }
    std::string item = trim(inner.substr(start, i - start));
    out.push_back(is_quoted(item) ? item.substr(1, item.size() - 2) : item);
    start = i + 1;
  }
  return out;
}

// The value of a --set as the key's type wants it: YAML scalars and flow sequences,
// strings taken literally unless quoted, a bare scalar for a list key as one element.
Json parse_set_value(const KeyDef& d, const std::string& text, const std::string& arg) {
  if (d.type == Type::kString)
    return is_quoted(trim(text)) ? parse_yaml_value(text, arg) : Json(text);
  if (d.type == Type::kStringList) return parse_string_list(text);
  Json v = parse_yaml_value(text, arg);
  if (is_list(d.type) && !v.is_array() && !v.is_null()) return Json::array({v});
  return v;
}

std::pair<const KeyDef*, Json> parse_set(const std::string& arg) {
  const size_t eq = arg.find('=');
  const std::string key = trim(arg.substr(0, eq));
  if (eq == std::string::npos || key.empty())
    throw ConfigError(str("--set '", arg, "': expected KEY=VALUE"));
  const KeyDef* d = find_key(key);
  if (!d) throw ConfigError(str("--set: unknown key '", key, "'", suggestion(key, key_names())));
  return {d, check_value(*d, parse_set_value(*d, arg.substr(eq + 1), arg), "--set")};
}

std::string shortcut_source(const std::map<std::string, std::string>& flags, const std::string& key) {
  auto it = flags.find(key);
  return it == flags.end() ? "command line" : it->second;
}

Json defaults_tree() {
  Json tree = Json::object();
  for (const KeyDef& d : schema()) set_path(tree, d.key, d.default_value);
  return tree;
}

void check_resolved(const Config& config, const std::string& subcommand, const Origins& origins,
                    const std::map<std::string, std::string>& flags) {
  check_tree(config.tree(), "config");
  for (const KeyDef& d : schema()) {
    if (std::find(d.required_by.begin(), d.required_by.end(), subcommand) == d.required_by.end())
      continue;
    const Json* v = lookup(config.tree(), d.key);
    if (v && !v->is_null() && !(v->is_string() && v->get<std::string>().empty())) continue;
    const auto option = flags.find(d.key);
    const std::string how =
        option == flags.end()
            ? "set it in the config file or with --set " + d.key + "=..."
            : str("set it in the config file, with ", option->second, ", or --set ", d.key, "=...");
    throw ConfigError(str(d.key, ": required by '", subcommand, "' (", how, ")"));
  }

  // The source that set any of `keys` last (the one the user should edit).
  const auto source_of = [&](std::initializer_list<const char*> keys) {
    std::pair<int, std::string> best{-1, "config"};
    for (const char* k : keys) {
      auto it = origins.find(k);
      if (it != origins.end() && it->second.first > best.first) best = it->second;
    }
    return best.first == kDefaultRank ? std::string("config") : best.second;
  };
  const auto tile = config.get_int_list("mask.tile");
  if (tile[1] % 4 != 0)
    throw ConfigError(
        str(source_of({"mask.tile"}), ": mask.tile: expected cols (the second element) ",
            "to be a multiple of 4 for the 2:4 groups, got [", tile[0], ", ", tile[1], "]"));
  const int64_t micro = config.get_int("train.micro_batch"),
                global = config.get_int("train.global_batch");
  if (global % micro != 0)
    throw ConfigError(str(source_of({"train.global_batch", "train.micro_batch"}),
                          ": train.global_batch: expected a multiple of train.micro_batch (", micro,
                          "), got ", global));
  if (config.get_bool("deploy.prefill_split") && config.get_bool("deploy.prefill_dense_copy"))
    throw ConfigError(str(source_of({"deploy.prefill_split", "deploy.prefill_dense_copy"}),
                          ": deploy.prefill_split: expected false when deploy.prefill_dense_copy is true (the "
                          "two prefill paths exclude each other)"));
  if (config.get_string("mask.prior") == "file" && config.get_string("mask.prior_file").empty())
    throw ConfigError(
        str(source_of({"mask.prior", "mask.prior_file"}),
            ": mask.prior_file: expected a mask file when mask.prior is 'file', got \"\""));
}

// --- YAML output ---

std::string format_float(double x) {
  if (std::isnan(x)) return ".nan";
  if (std::isinf(x)) return x < 0 ? "-.inf" : ".inf";
  // A mantissa with a dot keeps it a float on reload, for YAML 1.1 readers (PyYAML) too.
  std::string s = shortest(x);
  if (s.find('.') == std::string::npos) s.insert(std::min(s.find('e'), s.size()), ".0");
  return s;
}

// Plain only when every YAML reader (1.1 or 1.2) keeps it a string; else double-quoted.
std::string format_string(const std::string& s) {
  static const std::vector<std::string> kYaml11Words = {"y", "n", "yes", "no", "on", "off"};
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  bool plain =
      !s.empty() && plain_scalar(s).is_string() &&
      std::find(kYaml11Words.begin(), kYaml11Words.end(), lower) == kYaml11Words.end() &&
      (std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_' || s[0] == '/' || s[0] == '.');
  for (unsigned char c : s)
    plain = plain && (std::isalnum(c) || std::string("_./+-@").find(c) != std::string::npos);
  if (plain) return s;
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);  // UTF-8 passes through
    }
  }
  return out + "\"";
}

std::string format_value(const Json& v, bool as_float) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number_float() || (as_float && v.is_number())) return format_float(v.get<double>());
  if (v.is_string()) return format_string(v.get<std::string>());
  if (v.is_array()) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + format_value(v[i], as_float);
    return out + "]";
  }
  return repr(v);  // integers; JSON objects are valid YAML flow mappings too
}

}  // namespace

bool Config::has(const std::string& key) const {
  const Json* v = lookup(tree_, key);
  return v && !v->is_null();
}

const Json& Config::at(const std::string& key) const {
  const Json* v = lookup(tree_, key);
  if (!v || v->is_null()) throw ConfigError(str("config: ", key, ": not set"));
  return *v;
}

void Config::set(const std::string& key, Json value) {
  set_path(tree_, key, std::move(value));
}

bool Config::get_bool(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_boolean()) expected("config: " + key, "true or false", v);
  return v.get<bool>();
}

int64_t Config::get_int(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_number_integer()) expected("config: " + key, "an integer", v);
  return v.get<int64_t>();
}

double Config::get_float(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_number()) expected("config: " + key, "a number", v);
  return v.get<double>();
}

std::string Config::get_string(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_string()) expected("config: " + key, "a string", v);
  return v.get<std::string>();
}

std::vector<int64_t> Config::get_int_list(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_array() ||
      !std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_number_integer(); }))
    expected("config: " + key, "a list of integers", v);
  return v.get<std::vector<int64_t>>();
}

std::vector<double> Config::get_float_list(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_array() ||
      !std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_number(); }))
    expected("config: " + key, "a list of numbers", v);
  return v.get<std::vector<double>>();
}

std::vector<std::string> Config::get_string_list(const std::string& key) const {
  const Json& v = at(key);
  if (!v.is_array() ||
      !std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_string(); }))
    expected("config: " + key, "a list of strings", v);
  return v.get<std::vector<std::string>>();
}

Json load_file(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  const bool yaml = ext == ".yaml" || ext == ".yml";
  if (!yaml && ext != ".json")
    throw ConfigError(str(path, ": expected a .yaml, .yml or .json config file"));
  std::error_code ec;
  std::ifstream in(path, std::ios::binary);
  if (!in || fs::is_directory(path, ec)) throw ConfigError(str(path, ": cannot open config file"));
  std::ostringstream buf;
  buf << in.rdbuf();
  const std::string text = buf.str();

  if (yaml) {
    try {
      const YAML::Node root = YAML::Load(text);
      return root.IsNull() ? Json::object() : yaml_to_json(root, path);  // empty file: no settings
    } catch (const YAML::Exception& e) {
      throw ConfigError(str(path, ":", e.mark.line + 1, ": invalid YAML: ", e.msg));
    }
  }
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    const size_t end = std::min(e.byte > 0 ? e.byte - 1 : 0, text.size());
    const auto line =
        1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(end), '\n');
    // what() reads "[json.exception.parse_error.101] parse error at line L, column C: <reason>".
    const std::string what = e.what();
    const size_t colon = what.find(": ");
    throw ConfigError(str(path, ":", line, ": invalid JSON: ",
                          colon == std::string::npos ? what : what.substr(colon + 2)));
  }
}

void validate_tree(const Json& tree, const std::string& source) {
  check_tree(tree, source);
}

void validate_resolved(const Config& config, const std::string& subcommand) {
  check_resolved(config, subcommand, Origins{}, {});
}

Config resolve(const std::optional<std::string>& file, const Overrides& overrides,
               const std::string& subcommand) {
  Json tree = defaults_tree();
  Origins origins;
  const auto assign = [&](const KeyDef& d, Json value, Rank rank, const std::string& source) {
    set_path(tree, d.key, std::move(value));
    origins[d.key] = {rank, source};
  };
  if (file)
    for (auto& [d, value] : check_tree(load_file(*file), *file))
      assign(*d, std::move(value), kFileRank, *file);
  for (const auto& [key, value] : overrides.values) {
    const std::string source = shortcut_source(overrides.flags, key);
    const KeyDef* d = find_key(key);
    if (!d) throw ConfigError(str(source, ": unknown key '", key, "'"));
    assign(*d, check_value(*d, value, source), kShortcutRank, source);
  }
  for (const auto& arg : overrides.sets) {
    auto [d, value] = parse_set(arg);
    assign(*d, std::move(value), kSetRank, "--set");
  }
  Config config(std::move(tree));
  check_resolved(config, subcommand, origins, overrides.flags);
  return config;
}

std::string dump_yaml(const Config& config) {
  std::string out = "# patch-train configuration (defaults < config file < command line)\n";
  for (const std::string& section : section_names()) {
    out += "\n" + section + ":\n";
    for (const KeyDef& d : schema()) {
      const auto [sec, name] = split_key(d.key);
      if (sec != section) continue;
      const Json* v = lookup(config.tree(), d.key);
      out += "  # " + d.help + "\n";
      out += "  " + name + ": " +
             format_value(v ? *v : Json(), d.type == Type::kFloat || d.type == Type::kFloatList) +
             "\n";
    }
  }
  return out;
}

void write_resolved(const std::string& dir, const Config& config) {
  core::write_file_atomic(dir + "/config.resolved.yaml", dump_yaml(config));
}

}  // namespace patch::config

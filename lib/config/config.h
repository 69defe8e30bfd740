#pragma once
// The one configuration schema (key, type, default, range, help) and the
// pipeline that resolves a run's settings: defaults < config file < command line,
// then validation. Values live in a JSON tree whose layout mirrors the dotted keys.
#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace patch::config {

using Json = nlohmann::ordered_json;

enum class Type { kBool, kInt, kFloat, kString, kIntList, kFloatList, kStringList };

struct KeyDef {
  std::string key;       // dotted path, e.g. "mask.target_sparsity"
  Type type;
  Json default_value;    // null when the key has no default
  std::optional<double> min, max;  // numeric bounds (each element for lists)
  std::vector<std::string> choices;  // allowed strings; empty = any
  std::string help;
  std::vector<std::string> required_by;  // subcommands that need a value
  std::optional<size_t> list_size;       // exact length for list types
};

// Every key, in the order they are documented and dumped.
const std::vector<KeyDef>& schema();
const KeyDef* find_key(const std::string& key);

class Config {
 public:
  Config() = default;
  explicit Config(Json tree) : tree_(std::move(tree)) {}

  const Json& tree() const { return tree_; }
  Json& tree() { return tree_; }

  bool has(const std::string& key) const;   // present and not null
  const Json& at(const std::string& key) const;  // throws ConfigError when absent
  void set(const std::string& key, Json value);

  bool get_bool(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  std::vector<int64_t> get_int_list(const std::string& key) const;
  std::vector<double> get_float_list(const std::string& key) const;
  std::vector<std::string> get_string_list(const std::string& key) const;

 private:
  Json tree_;
};

// What the command line contributed, applied in this order over the file:
// shortcut options (--model, --out, ...) as key/value pairs, then --set KEY=VALUE.
struct Overrides {
  std::vector<std::pair<std::string, Json>> values;  // typed values from shortcuts
  std::vector<std::string> sets;                     // raw "key=value" strings
  // The command-line option that sets each key ("model.path" -> "--model"):
  // errors name it, and a missing required key suggests it.
  std::map<std::string, std::string> flags;
};

// Defaults < file (YAML for .yaml/.yml, JSON for .json) < overrides, then
// validate for `subcommand` (required keys). Every error is a ConfigError that
// names the file (or "--set"), the key path and what was expected.
Config resolve(const std::optional<std::string>& file, const Overrides& overrides,
               const std::string& subcommand);

// Parses a config file into a tree (no defaults, no validation of values).
Json load_file(const std::string& path);
// Checks a partial tree: unknown keys (with the closest valid key suggested),
// types and ranges. `source` prefixes error messages.
void validate_tree(const Json& tree, const std::string& source);
// Cross-key and required-key checks on a fully resolved tree.
void validate_resolved(const Config& config, const std::string& subcommand);

// YAML text of the resolved configuration (comments carry the help text).
std::string dump_yaml(const Config& config);
// <dir>/config.resolved.yaml, atomically: every run folder records what it ran with.
void write_resolved(const std::string& dir, const Config& config);

}  // namespace patch::config

// patch-train: a thin command line over the library. Parses options, resolves the
// configuration (defaults < --config file < command line) and runs a subcommand.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <map>
#include <optional>

#include "commands.h"
#include "config/config.h"
#include "core/error.h"
#include "core/log.h"
#include "core/signals.h"
#include "patch/version.h"

namespace {

using patch::config::Json;

struct Options {
  std::string config_file;
  std::vector<std::string> sets;
  bool dump_config = false;
  int verbose = 0;
  bool quiet = false;
  // What the key options (patch::app::key_options) received, by config key:
  // one argument, several (list keys), or a flag (bool keys).
  std::map<std::string, std::string> scalars;
  std::map<std::string, std::vector<std::string>> lists;
  std::map<std::string, bool> switches;
};

using patch::config::Type;

bool is_list(Type t) { return t == Type::kFloatList || t == Type::kIntList || t == Type::kStringList; }

void add_common_options(CLI::App* sub, Options& o, const patch::app::Command& cmd) {
  sub->add_option("-c,--config", o.config_file, "Configuration file (.yaml, .yml or .json)");
  sub->add_option("--set", o.sets, "Override a key: --set train.lr=5e-4 (repeatable)")
      ->type_name("KEY=VALUE");
  sub->add_flag("--dump-config", o.dump_config, "Print the resolved configuration as YAML and exit");
  for (const auto& opt : patch::app::key_options(cmd)) {
    const auto* def = patch::config::find_key(opt.key);
    const std::string help = opt.help + " (" + opt.key + ")";
    CLI::Option* added = nullptr;
    if (def && def->type == Type::kBool)
      added = sub->add_flag(opt.flag, o.switches[opt.key], help);
    else if (def && is_list(def->type))
      added = sub->add_option(opt.flag, o.lists[opt.key], help);
    else
      added = sub->add_option(opt.flag, o.scalars[opt.key], help);
    if (!opt.type_name.empty()) added->type_name(opt.type_name);
  }
  sub->add_flag("-v,--verbose", o.verbose, "More log output (debug)");
  sub->add_flag("-q,--quiet", o.quiet, "Only warnings and errors on the console");
}

// "patch-train frobnicate": CLI11 alone would say that a subcommand is required.
bool unknown_command(int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') return false;
  std::string names;
  for (const auto& cmd : patch::app::commands()) {
    if (cmd.name == argv[1]) return false;
    names += (names.empty() ? "" : ", ") + cmd.name;
  }
  std::cerr << "patch-train: unknown command '" << argv[1] << "'; the commands are " << names
            << " (patch-train --help)\n";
  return true;
}

// A key option's text as the key's type: numbers for numeric keys.
Json typed(const std::string& text, Type t) {
  if (t == Type::kInt || t == Type::kFloat || t == Type::kIntList || t == Type::kFloatList) {
    Json v = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (v.is_number()) return v;
  }
  return Json(text);  // the configuration check names the option if it is no number
}

patch::config::Overrides overrides_of(const Options& o, const patch::app::Command& cmd) {
  patch::config::Overrides ov;
  for (const auto& opt : patch::app::key_options(cmd)) {
    ov.flags[opt.key] = opt.flag;
    const auto* def = patch::config::find_key(opt.key);
    const Type type = def ? def->type : Type::kString;
    if (type == Type::kBool) {
      const auto it = o.switches.find(opt.key);
      if (it != o.switches.end() && it->second) ov.values.emplace_back(opt.key, true);
    } else if (is_list(type)) {
      const auto it = o.lists.find(opt.key);
      if (it == o.lists.end() || it->second.empty()) continue;
      Json items = Json::array();
      for (const auto& arg : it->second) {
        if (!opt.split_commas) {
          items.push_back(typed(arg, type));
          continue;
        }
        std::string item;
        for (size_t i = 0; i <= arg.size(); ++i) {
          if (i == arg.size() || arg[i] == ',') {
            if (!item.empty()) items.push_back(typed(item, type));
            item.clear();
          } else {
            item += arg[i];
          }
        }
      }
      ov.values.emplace_back(opt.key, items);
    } else {
      const auto it = o.scalars.find(opt.key);
      if (it != o.scalars.end() && !it->second.empty()) ov.values.emplace_back(opt.key, typed(it->second, type));
    }
  }
  ov.sets = o.sets;
  return ov;
}

int run(int argc, char** argv) {
  CLI::App app{"patch-train: learn hybrid dense/2:4 sparsity masks for LLaMA-family models"};
  app.set_version_flag("-V,--version", std::string("patch-train ") + PATCH_VERSION_STRING);
  app.require_subcommand(1);
  app.failure_message(CLI::FailureMessage::help);

  if (unknown_command(argc, argv)) return patch::core::kExitUsage;
  Options opts;
  std::map<CLI::App*, const patch::app::Command*> subs;
  for (const auto& cmd : patch::app::commands()) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.description);
    add_common_options(sub, opts, cmd);
    subs[sub] = &cmd;
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : patch::core::kExitUsage;
  }

  CLI::App* sub = app.get_subcommands().front();
  const patch::app::Command& cmd = *subs.at(sub);
  using patch::core::log::Level;
  patch::core::log::init(opts.quiet ? Level::kWarn : opts.verbose ? Level::kDebug : Level::kInfo);

  std::optional<std::string> file;
  if (!opts.config_file.empty()) file = opts.config_file;
  // --dump-config shows the defaults too, so keys a run requires may be unset.
  patch::config::Config cfg =
      patch::config::resolve(file, overrides_of(opts, cmd), opts.dump_config ? "" : cmd.name);
  if (opts.dump_config) {
    std::cout << patch::config::dump_yaml(cfg);
    return 0;
  }
  // SIGINT/SIGTERM stop every command at its next check with exit status 130.
  patch::core::install_stop_handlers();
  // A command that reads writes files only when --out asks for them.
  using patch::app::Output;
  const bool run_folder = cmd.output == Output::kRunFolder || cmd.output == Output::kResumable ||
                          (cmd.output == Output::kOnRequest && !opts.scalars["output.dir"].empty());
  patch::app::RunContext ctx = patch::app::start_run(cmd.name, std::move(cfg), run_folder);
  ctx.argv.assign(argv, argv + argc);
  int rc = cmd.run(ctx);
  patch::core::log::flush();
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const patch::core::Error& e) {
    patch::core::log::error(e.what());
    patch::core::log::flush();
    return e.exit_code();
  } catch (const std::exception& e) {
    // One line: LibTorch's errors carry a C++ stack trace after the message.
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    patch::core::log::error(std::string("unexpected error: ") + what);
    patch::core::log::flush();
    return patch::core::kExitFailure;
  } catch (...) {
    patch::core::log::error("unexpected error (not a std::exception)");
    patch::core::log::flush();
    return patch::core::kExitFailure;
  }
}

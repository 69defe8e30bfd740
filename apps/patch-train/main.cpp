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
  std::string model, masks, out;
  std::vector<std::string> data;
  bool overwrite = false, resume = false;
  int verbose = 0;
  bool quiet = false;
  std::map<std::string, std::string> shortcut_values;  // config key -> value
};

void add_common_options(CLI::App* sub, Options& o, const patch::app::Command& cmd) {
  using patch::app::Output;
  sub->add_option("-c,--config", o.config_file, "Configuration file (.yaml, .yml or .json)");
  sub->add_option("--set", o.sets, "Override a key: --set train.lr=5e-4 (repeatable)")
      ->type_name("KEY=VALUE");
  sub->add_flag("--dump-config", o.dump_config, "Print the resolved configuration as YAML and exit");
  if (cmd.inputs & patch::app::kModel)
    sub->add_option("--model", o.model,
                    "Checkpoint: a folder, a .gguf file or a cached hub name org/name[@rev] (model.path)")
        ->type_name("PATH");
  if (!cmd.data_key.empty())
    sub->add_option("--data", o.data, "Data file(s) (" + cmd.data_key + ")")->type_name("FILE");
  if (cmd.inputs & patch::app::kMasks)
    sub->add_option("--masks", o.masks, "Mask file (model.masks)")->type_name("FILE");
  if (cmd.output == Output::kOnRequest)
    sub->add_option("--out", o.out, "Also write the result into this folder (nothing is written without it)")
        ->type_name("DIR");
  if (cmd.output == Output::kRunFolder || cmd.output == Output::kResumable)
    sub->add_option("--out", o.out, "Output directory (output.dir)")->type_name("DIR");
  if (cmd.output != Output::kNone)
    sub->add_flag("--overwrite", o.overwrite, "Allow a non-empty output directory (one a run of this tool made)");
  if (cmd.output == Output::kResumable)
    sub->add_flag("--resume", o.resume, "Continue from the last checkpoint in the output directory");
  for (const auto& sc : cmd.shortcuts)
    sub->add_option(sc.flag, o.shortcut_values[sc.key], sc.help + " (" + sc.key + ")");
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

patch::config::Overrides overrides_of(const Options& o, const patch::app::Command& cmd) {
  patch::config::Overrides ov;
  if (!o.model.empty()) ov.values.emplace_back("model.path", o.model);
  if (!o.data.empty()) ov.values.emplace_back(cmd.data_key, Json(o.data));
  if (!o.masks.empty()) ov.values.emplace_back("model.masks", o.masks);
  if (!o.out.empty()) ov.values.emplace_back("output.dir", o.out);
  if (o.overwrite) ov.values.emplace_back("output.overwrite", true);
  if (o.resume) ov.values.emplace_back("output.resume", true);
  for (const auto& sc : cmd.shortcuts) {
    auto it = o.shortcut_values.find(sc.key);
    if (it == o.shortcut_values.end() || it->second.empty()) continue;
    // A number stays a number ("--target 0.35"); list keys take comma-separated items.
    auto typed = [](const std::string& text) {
      Json v = Json::parse(text, nullptr, /*allow_exceptions=*/false);
      return v.is_number() ? v : Json(text);
    };
    const auto* def = patch::config::find_key(sc.key);
    using T = patch::config::Type;
    if (def && (def->type == T::kFloatList || def->type == T::kIntList || def->type == T::kStringList)) {
      Json items = Json::array();
      std::string item;
      for (size_t i = 0; i <= it->second.size(); ++i) {
        if (i == it->second.size() || it->second[i] == ',') {
          if (!item.empty()) items.push_back(typed(item));
          item.clear();
        } else {
          item += it->second[i];
        }
      }
      ov.values.emplace_back(sc.key, items);
    } else {
      ov.values.emplace_back(sc.key, typed(it->second));
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
                          (cmd.output == Output::kOnRequest && !opts.out.empty());
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

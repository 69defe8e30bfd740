#include "run.h"

#include <filesystem>

#include "core/atomic_file.h"
#include "core/log.h"
#include "core/error.h"
#include "core/hf_cache.h"
#include "core/paths.h"
#include "core/run_dir.h"
#include "dist/dist.h"

namespace patch::app {
namespace {

// The keys that name a command's inputs (files or folders it reads).
const char* const kInputKeys[] = {"model.path", "model.masks", "model.packed",  "mask.prior_file",
                                  "data.train", "data.valid",  "eval.data",     "verify.pruned",
                                  "inspect.metrics", "generate.prompts"};

// The paths an input key names (a list key several), resolved; empty values left out.
std::vector<std::string> paths_of(const config::Config& cfg, const std::string& key) {
  const auto* def = config::find_key(key);
  if (!def || !cfg.has(key)) return {};
  const std::vector<std::string> raw =
      def->type == config::Type::kStringList ? cfg.get_string_list(key) : std::vector<std::string>{cfg.get_string(key)};
  std::vector<std::string> paths;
  for (const auto& r : raw)
    if (!r.empty()) paths.push_back(core::resolve_path(r));
  return paths;
}

// No command may write into, or replace, what it reads: the output folder must
// neither be an input nor hold one (--overwrite would delete it).
void check_inputs_outside(const config::Config& cfg, const std::string& out_dir) {
  for (const char* key : kInputKeys) {
    for (const auto& path : paths_of(cfg, key)) {
      if (core::path_within(path, out_dir))
        throw core::ConfigError(core::str("output.dir: '", out_dir, "' is or holds the input ", key, " '", path,
                                          "'; a command never writes into or over its own inputs: choose "
                                          "another output folder"));
    }
  }
}

// The input keys each command reads (a key set in a shared config file but
// not read by this command is not its business).
std::vector<std::string> input_keys(const config::Config& cfg, const std::string& cmd) {
  std::vector<std::string> keys;
  const auto add = [&](std::initializer_list<const char*> ks) { keys.insert(keys.end(), ks.begin(), ks.end()); };
  if (cmd == "train" || cmd == "sweep") {
    add({"model.path", "data.train", "data.valid"});
    if (cfg.get_string("mask.prior") == "file") add({"mask.prior_file"});
    if (cmd == "sweep") add({"eval.data"});
  } else if (cmd == "prune") {
    add({"model.path", "model.masks", "data.train", "eval.data"});
  } else if (cmd == "bench-deploy") {
    add({"model.packed"});
  } else if (cmd == "generate") {
    add({"model.path", "model.masks", "model.packed", "generate.prompts"});
  } else if (cmd == "eval") {
    add({"model.path", "model.masks", "model.packed", "eval.data"});
  } else if (cmd == "export" || cmd == "pack" || cmd == "verify" || cmd == "inspect" || cmd == "convert") {
    add({"model.path", "model.masks"});
    if (cmd == "verify") add({"verify.pruned"});
    if (cmd == "inspect") add({"inspect.metrics"});
  }
  return keys;
}

// Every input the command reads exists (a folder only where one is expected),
// checked before the command writes anything.
void check_inputs_exist(const config::Config& cfg, const std::string& cmd) {
  namespace fs = std::filesystem;
  for (const std::string& key : input_keys(cfg, cmd)) {
    for (const auto& path : paths_of(cfg, key)) {
      std::error_code ec;
      const auto st = fs::status(path, ec);
      if (!fs::exists(st))
        throw core::ConfigError(core::str(key, ": no such file or folder '", path, "'"));
      const bool folder_ok = key == "model.path" || key == "verify.pruned";
      if (fs::is_directory(st) && !folder_ok)
        throw core::ConfigError(core::str(key, ": '", path, "' is a folder; expected a file"));
    }
  }
}

}  // namespace

RunContext start_run(const std::string& subcommand, config::Config cfg, bool writes_outputs) {
  RunContext ctx{subcommand, std::move(cfg), "", {}};
  // A hub name becomes its cached snapshot here, once, so that every later
  // reader (and config.resolved.yaml) sees the files that were used.
  if (ctx.config.has("model.path")) {
    const std::string spec = ctx.config.get_string("model.path");
    const std::string path = core::resolve_model_path(spec);
    if (path != core::resolve_path(spec)) {
      core::log::info(core::str("model ", spec, ": ", path));
      ctx.config.set("model.path", path);
    }
  }
  check_inputs_exist(ctx.config, subcommand);
  if (!writes_outputs) return ctx;
  ctx.out_dir = ctx.config.get_string("output.dir");
  // A folder in use, or one not to be reused, is refused before any work
  // (ranks of a launched run find it held by their launcher, as they should).
  const auto env = dist::env_from_environment();
  if (!env.launched && env.rank == 0) {
    check_inputs_outside(ctx.config, ctx.out_dir);
    core::check_output_dir(ctx.out_dir, ctx.config.get_bool("output.overwrite"), ctx.config.get_bool("output.resume"));
  }
  return ctx;
}

void open_outputs(RunContext& ctx) {
  if (ctx.out_dir.empty() || ctx.outputs_open) return;
  ctx.outputs_open = true;
  const auto env = dist::env_from_environment();
  if (env.rank > 0) core::log::init(core::log::Level::kWarn);
  if (env.launched || env.rank > 0) {  // the folder is prepared already
    if (env.rank == 0) core::log::set_file(ctx.out_dir + "/run.log");
    return;
  }
  check_inputs_outside(ctx.config, ctx.out_dir);
  core::claim_output_dir(ctx.out_dir, ctx.config.get_bool("output.overwrite"),
                         ctx.config.get_bool("output.resume"));
  config::write_resolved(ctx.out_dir, ctx.config);
  // The launcher of several ranks leaves run.log to rank 0.
  if (!(ctx.subcommand == "train" && is_launcher(ctx))) core::log::set_file(ctx.out_dir + "/run.log");
  core::log::debug("patch-train " + ctx.subcommand + ": run folder " + ctx.out_dir);
}

bool is_launcher(const RunContext& ctx) {
  return ctx.config.get_int("dist.nproc") > 1 && dist::env_from_environment().world == 1;
}

}  // namespace patch::app

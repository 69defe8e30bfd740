#include "run.h"

#include "core/atomic_file.h"
#include "core/log.h"
#include "core/error.h"
#include "core/paths.h"
#include "core/run_dir.h"
#include "dist/dist.h"

namespace patch::app {
namespace {

// The keys that name a command's inputs (files or folders it reads).
const char* const kInputKeys[] = {"model.path", "model.masks", "model.packed", "mask.prior_file",
                                  "data.train",  "data.valid",  "eval.data",    "verify.pruned"};

// No command may write into, or replace, what it reads: the output folder must
// neither be an input nor hold one (--overwrite would delete it).
void check_inputs_outside(const config::Config& cfg, const std::string& out_dir) {
  for (const char* key : kInputKeys) {
    if (!config::find_key(key)) continue;
    std::vector<std::string> paths;
    const auto* def = config::find_key(key);
    if (def->type == config::Type::kStringList)
      paths = cfg.get_string_list(key);
    else
      paths = {cfg.get_string(key)};
    for (const auto& raw : paths) {
      if (raw.empty()) continue;
      const std::string path = core::resolve_path(raw);
      if (core::path_within(path, out_dir))
        throw core::ConfigError(core::str("output.dir: '", out_dir, "' is or holds the input ", key, " '", path,
                                          "'; a command never writes into or over its own inputs: choose "
                                          "another output folder"));
    }
  }
}

}  // namespace

RunContext start_run(const std::string& subcommand, config::Config cfg, bool writes_outputs) {
  RunContext ctx{subcommand, std::move(cfg), "", {}};
  if (!writes_outputs) return ctx;
  ctx.out_dir = ctx.config.get_string("output.dir");
  const auto env = dist::env_from_environment();
  if (env.rank > 0) core::log::init(core::log::Level::kWarn);
  if (env.launched || env.rank > 0) {  // the folder is prepared already
    if (env.rank == 0) core::log::set_file(ctx.out_dir + "/run.log");
    return ctx;
  }
  check_inputs_outside(ctx.config, ctx.out_dir);
  core::claim_output_dir(ctx.out_dir, ctx.config.get_bool("output.overwrite"),
                         ctx.config.get_bool("output.resume"));
  core::write_file_atomic(ctx.out_dir + "/config.resolved.yaml", config::dump_yaml(ctx.config));
  // The launcher of several ranks leaves run.log to rank 0.
  if (!(subcommand == "train" && is_launcher(ctx))) core::log::set_file(ctx.out_dir + "/run.log");
  core::log::debug("patch-train " + subcommand + ": run folder " + ctx.out_dir);
  return ctx;
}

bool is_launcher(const RunContext& ctx) {
  return ctx.config.get_int("dist.nproc") > 1 && dist::env_from_environment().world == 1;
}

}  // namespace patch::app

#include "run.h"

#include "core/atomic_file.h"
#include "core/log.h"
#include "core/paths.h"
#include "dist/dist.h"

namespace patch::app {

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
  core::prepare_output_dir(ctx.out_dir, ctx.config.get_bool("output.overwrite"),
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

#include "run.h"

#include "core/atomic_file.h"
#include "core/log.h"
#include "core/paths.h"

namespace patch::app {

RunContext start_run(const std::string& subcommand, config::Config cfg, bool writes_outputs) {
  RunContext ctx{subcommand, std::move(cfg), ""};
  if (!writes_outputs) return ctx;
  ctx.out_dir = ctx.config.get_string("output.dir");
  core::prepare_output_dir(ctx.out_dir, ctx.config.get_bool("output.overwrite"),
                           ctx.config.get_bool("output.resume"));
  core::write_file_atomic(ctx.out_dir + "/config.resolved.yaml", config::dump_yaml(ctx.config));
  core::log::set_file(ctx.out_dir + "/run.log");
  core::log::debug("patch-train " + subcommand + ": run folder " + ctx.out_dir);
  return ctx;
}

}  // namespace patch::app

#pragma once
// What every subcommand shares: the resolved configuration and its run folder.
#include <string>
#include <vector>

#include "config/config.h"

namespace patch::app {

struct RunContext {
  std::string subcommand;
  config::Config config;
  std::string out_dir;            // empty for commands that write no run folder
  std::vector<std::string> argv;  // the command line, for the data-parallel launcher
};

// Prepares output.dir (refusing a non-empty one unless output.overwrite or
// output.resume), writes config.resolved.yaml and starts run.log there. In a
// data-parallel run the launcher (or rank 0 under torchrun) prepares the
// folder; rank 0 writes run.log, the other ranks log warnings to the console.
RunContext start_run(const std::string& subcommand, config::Config config, bool writes_outputs);

// Whether this process is the launcher of `--nproc N` ranks: N > 1 and not
// itself a rank.
bool is_launcher(const RunContext& ctx);

}  // namespace patch::app

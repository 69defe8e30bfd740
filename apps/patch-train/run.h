#pragma once
// What every subcommand shares: the resolved configuration and its run folder.
#include <string>

#include "config/config.h"

namespace patch::app {

struct RunContext {
  std::string subcommand;
  config::Config config;
  std::string out_dir;  // empty for commands that write no run folder
};

// Prepares output.dir (refusing a non-empty one unless output.overwrite or
// output.resume), writes config.resolved.yaml and starts run.log there.
RunContext start_run(const std::string& subcommand, config::Config config, bool writes_outputs);

}  // namespace patch::app

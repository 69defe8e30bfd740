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
  bool outputs_open = false;
};

// Resolves model.path (a hub name becomes its cached snapshot) and checks that
// every input the command reads exists, before anything is written. The run
// folder is not touched yet: see open_outputs.
RunContext start_run(const std::string& subcommand, config::Config config, bool writes_outputs);

// Called by a command once its configuration and inputs have passed its own
// checks: claims output.dir (refusing a non-empty one unless output.overwrite
// or output.resume; locked for the run's life), writes config.resolved.yaml
// and starts run.log there (with the lines logged so far). In a data-parallel
// run the launcher (or rank 0 under torchrun) prepares the folder; rank 0
// writes run.log, the other ranks log warnings to the console. Does nothing
// for a command without a run folder, or a second time.
void open_outputs(RunContext& ctx);

// Whether this process is the launcher of `--nproc N` ranks: N > 1 and not
// itself a rank.
bool is_launcher(const RunContext& ctx);

}  // namespace patch::app

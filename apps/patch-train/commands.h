#pragma once
// The subcommands: each turns a resolved configuration into library calls.
#include <functional>
#include <string>
#include <vector>

#include "run.h"

namespace patch::app {

// A command-specific option that sets one configuration key.
struct Shortcut {
  std::string flag;  // "--method"
  std::string key;   // "prune.method"
  std::string help;
};

struct Command {
  std::string name;
  std::string description;
  std::string data_key;  // config key that --data fills ("" when the command takes no data)
  bool writes_outputs;   // has a run folder (output.dir)
  std::function<int(RunContext&)> run;
  std::vector<Shortcut> shortcuts = {};
};

const std::vector<Command>& commands();

}  // namespace patch::app

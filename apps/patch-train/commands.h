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

// What a command writes: nothing, files only when --out is given (commands
// that read), or a run folder (output.dir), which train and sweep can resume.
enum class Output { kNone, kOnRequest, kRunFolder, kResumable };

// The inputs a command reads, so that its help lists only its own options.
enum Inputs : unsigned { kNoInputs = 0, kModel = 1, kMasks = 2 };

struct Command {
  std::string name;
  std::string description;
  std::string data_key;  // config key that --data fills ("" when the command takes no data)
  Output output;
  std::function<int(RunContext&)> run;
  std::vector<Shortcut> shortcuts = {};
  unsigned inputs = kModel;
};

const std::vector<Command>& commands();

}  // namespace patch::app

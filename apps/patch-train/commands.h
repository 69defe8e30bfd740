#pragma once
// The subcommands: each turns a resolved configuration into library calls.
#include <functional>
#include <string>
#include <vector>

#include "run.h"

namespace patch::app {

// A command-line option that sets one configuration key.
struct Shortcut {
  std::string flag;  // "--method"
  std::string key;   // "prune.method"
  std::string help;
  std::string type_name = "";  // shown in --help (PATH, FILE, DIR)
  // List keys: "--targets 0.25,0.35" gives two items; false keeps each
  // argument whole (file names may hold commas).
  bool split_commas = true;
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

// Every option of `cmd` that sets a configuration key, in --help order: the
// shared ones its inputs and outputs call for (--model, --data, --masks,
// --out, --overwrite, --resume), then its own shortcuts. The one table of
// such options: the command line parses them from it, and configuration
// errors name them from it.
std::vector<Shortcut> key_options(const Command& cmd);

}  // namespace patch::app

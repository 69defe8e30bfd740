#pragma once
// Errors that reach the user: one line naming the file/key and what was expected.
#include <sstream>
#include <stdexcept>
#include <string>

namespace patch::core {

// Exit status conventions of patch-train.
enum ExitCode : int {
  kExitOk = 0,
  kExitFailure = 1,      // bad input file, failed run
  kExitUsage = 2,        // bad configuration or command line
  kExitInterrupted = 130 // SIGINT/SIGTERM after a clean checkpoint
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what, int exit_code = kExitFailure)
      : std::runtime_error(what), exit_code_(exit_code) {}
  int exit_code() const { return exit_code_; }

 private:
  int exit_code_;
};

// A configuration or command-line problem (exit status 2).
class ConfigError : public Error {
 public:
  explicit ConfigError(const std::string& what) : Error(what, kExitUsage) {}
};

// Throws Error("<context>: <message>") when cond is false.
inline void check(bool cond, const std::string& context, const std::string& message) {
  if (!cond) throw Error(context + ": " + message);
}

// Builds a string from streamable parts: str("expected ", n, " bytes").
template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace patch::core

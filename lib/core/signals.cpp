#include "core/signals.h"

#include <atomic>
#include <csignal>

namespace patch::core {
namespace {

std::atomic<int> g_stop_signal{0};

extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
  std::signal(sig, SIG_DFL);  // a second signal ends the process at once
}

}  // namespace

void install_stop_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

int stop_signal() { return g_stop_signal.load(); }

void throw_if_stopped(const std::string& during) {
  if (const int sig = g_stop_signal.load())
    throw Interrupted(str("stopped by signal ", sig, " during ", during));
}

}  // namespace patch::core

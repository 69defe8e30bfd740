#pragma once
// SIGINT/SIGTERM as a request to stop: the first one is recorded and long work
// stops at its next check (a training step boundary with a checkpoint, or any
// progress update or calibration batch, which throws Interrupted); a second
// signal ends the process at once.
#include <string>

#include "core/error.h"

namespace patch::core {

// A run stopped by a signal before finishing (exit status 130); what it
// finished is kept and --resume continues where it can.
class Interrupted : public Error {
 public:
  explicit Interrupted(const std::string& what) : Error(what, kExitInterrupted) {}
};

void install_stop_handlers();
// The signal received since install_stop_handlers (0: none).
int stop_signal();
// Throws Interrupted ("stopped by signal N during <during>") once a signal came.
void throw_if_stopped(const std::string& during);

}  // namespace patch::core

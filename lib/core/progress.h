#pragma once
// Progress of a long loop: a live line on a terminal, periodic log lines otherwise.
#include <chrono>
#include <string>

namespace patch::core {

class Progress {
 public:
  // `every_seconds` is the interval of log lines when stderr is not a terminal.
  // An interruptible progress throws core::Interrupted from update() once
  // SIGINT/SIGTERM came (core/signals.h), so every long loop stops promptly.
  Progress(std::string label, long total, double every_seconds = 10.0, bool interruptible = true);
  // Reports that `done` of `total` units are finished and `tokens` more tokens
  // were processed since the last call; `extra` is appended (e.g. "loss 2.31").
  void update(long done, long tokens = 0, const std::string& extra = "");
  // A log line (info) between progress updates: on a terminal the live line
  // is cleared first and redrawn by the next update.
  void message(const std::string& text);
  // Ends the live line.
  void finish();
  double elapsed_seconds() const;

 private:
  std::string line(long done, const std::string& extra) const;

  std::string label_;
  long total_;
  double every_;
  bool tty_;
  bool interruptible_;
  long tokens_ = 0;
  bool live_ = false;
  std::chrono::steady_clock::time_point start_;
  long last_done_ = -1;
  std::chrono::steady_clock::time_point last_print_;
};

// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);

}  // namespace patch::core

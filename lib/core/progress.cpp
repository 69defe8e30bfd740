#include "core/progress.h"

#include "core/signals.h"

#include <unistd.h>

#include <cstdio>
#include <sstream>

#include "core/log.h"

namespace patch::core {

Progress::Progress(std::string label, long total, double every_seconds, bool interruptible)
    : label_(std::move(label)),
      total_(total),
      every_(every_seconds),
      tty_(::isatty(STDERR_FILENO) == 1),
      interruptible_(interruptible),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::line(long done, const std::string& extra) const {
  double el = elapsed_seconds();
  std::ostringstream os;
  os << label_ << " " << done << "/" << total_ << " | " << format_duration(el);
  if (done > 0 && done < total_) os << " eta " << format_duration(el / done * (total_ - done));
  if (tokens_ > 0 && el > 0) os << " | " << static_cast<long>(tokens_ / el) << " tok/s";
  if (!extra.empty()) os << " | " << extra;
  return os.str();
}

void Progress::update(long done, long tokens, const std::string& extra) {
  if (interruptible_) throw_if_stopped(label_);
  tokens_ += tokens;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_print_).count();
  // The final count is shown once, however often it is reported.
  const bool final_again = done >= total_ && done == last_done_;
  last_done_ = done;
  if (tty_) {
    if (since < 0.2 && (done < total_ || final_again)) return;
    std::fprintf(stderr, "\r\033[K%s", line(done, extra).c_str());
    std::fflush(stderr);
    live_ = true;
  } else {
    if (since < every_ && (done < total_ || final_again)) return;
    log::info(line(done, extra));
  }
  last_print_ = now;
}

void Progress::message(const std::string& text) {
  if (live_) {
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    live_ = false;
    last_print_ = std::chrono::steady_clock::time_point{};  // redraw at the next update
  }
  log::info(text);
}

void Progress::finish() {
  if (live_) std::fprintf(stderr, "\n");
  live_ = false;
}

std::string format_duration(double seconds) {
  long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

}  // namespace patch::core

#include "core/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <mutex>

namespace patch::core::log {
namespace {

spdlog::level::level_enum to_spd(Level level) {
  switch (level) {
    case Level::kDebug: return spdlog::level::debug;
    case Level::kInfo: return spdlog::level::info;
    case Level::kWarn: return spdlog::level::warn;
    case Level::kError: return spdlog::level::err;
    case Level::kOff: return spdlog::level::off;
  }
  return spdlog::level::info;
}

struct State {
  std::mutex mu;
  std::shared_ptr<spdlog::logger> logger;
  std::shared_ptr<spdlog::sinks::sink> console;
  std::shared_ptr<spdlog::sinks::sink> file;
  // The lines logged before the run folder exists (a command validates its
  // inputs before it creates anything), written to the head of run.log.
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> early;
};

constexpr const char* kFilePattern = "%Y-%m-%d %H:%M:%S.%e [%l] %v";
constexpr size_t kEarlyLines = 2000;

State& state() {
  static State s;
  return s;
}

// Diagnostics go to stderr so that stdout stays clean for JSON results.
std::shared_ptr<spdlog::logger> logger() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.logger) {
    s.console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    s.console->set_level(spdlog::level::info);
    s.console->set_pattern("%^[%L]%$ %v");
    s.early = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(kEarlyLines);
    s.early->set_level(spdlog::level::debug);
    s.early->set_pattern(kFilePattern);
    s.logger = std::make_shared<spdlog::logger>("patch", spdlog::sinks_init_list{s.console, s.early});
    s.logger->set_level(spdlog::level::debug);
  }
  return s.logger;
}

}  // namespace

void init(Level console_level, const std::string& file) {
  logger();
  state().console->set_level(to_spd(console_level));
  if (!file.empty()) set_file(file);
}

void set_file(const std::string& file) {
  auto lg = logger();
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto& sinks = lg->sinks();
  if (s.file) sinks.erase(std::remove(sinks.begin(), sinks.end(), s.file), sinks.end());
  if (s.early) {
    std::ofstream head(file, std::ios::app);
    for (const auto& line : s.early->last_formatted()) head << line;
    sinks.erase(std::remove(sinks.begin(), sinks.end(), s.early), sinks.end());
    s.early.reset();
  }
  s.file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(file, /*truncate=*/false);
  s.file->set_level(spdlog::level::debug);
  s.file->set_pattern(kFilePattern);
  sinks.push_back(s.file);
  // Every line reaches the file at once: a killed run keeps its log.
  lg->flush_on(spdlog::level::debug);
}

bool enabled(Level level) {
  auto lg = logger();
  auto lvl = to_spd(level);
  if (state().file) return lvl >= spdlog::level::debug;
  return state().console->should_log(lvl);
}

void debug(const std::string& msg) { logger()->debug(msg); }
void info(const std::string& msg) { logger()->info(msg); }
void warn(const std::string& msg) { logger()->warn(msg); }
void error(const std::string& msg) { logger()->error(msg); }
void flush() { logger()->flush(); }

}  // namespace patch::core::log

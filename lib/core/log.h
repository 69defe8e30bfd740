#pragma once
// Logging facade over spdlog. Its sources include no torch header (fmt clash),
// so callers pass ready-made strings; core::str() builds them.
#include <string>

namespace patch::core::log {

enum class Level { kDebug, kInfo, kWarn, kError, kOff };

// Console at `console_level`; when `file` is non-empty, everything from debug
// up also goes to that file (the run's run.log).
void init(Level console_level, const std::string& file = "");
// Adds (or replaces) the log file once the output directory is known.
void set_file(const std::string& file);
bool enabled(Level level);

void debug(const std::string& msg);
void info(const std::string& msg);
void warn(const std::string& msg);
void error(const std::string& msg);
// Flushes all sinks (before exit or a signal-triggered stop).
void flush();

}  // namespace patch::core::log

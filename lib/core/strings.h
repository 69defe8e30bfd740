#pragma once
// Small string helpers shared by the modules (C++17 has no ends_with).
#include <string>

namespace patch::core {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace patch::core

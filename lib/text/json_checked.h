#pragma once
// Integers from untrusted JSON (tokenizer.json, GGUF metadata): nlohmann's
// get<int>() on a float, or on an integer outside the target's range, is
// undefined behaviour, so every id and index goes through this check.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <optional>

namespace patch::text {

// `v` as T when it is a JSON integer within T's range; nullopt otherwise.
template <typename T>
std::optional<T> json_integer(const nlohmann::json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<T>::max())) return std::nullopt;
    return static_cast<T>(u);
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if constexpr (std::numeric_limits<T>::is_signed) {
      if (i < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
          i > static_cast<int64_t>(std::numeric_limits<T>::max()))
        return std::nullopt;
    } else {
      if (i < 0 || static_cast<uint64_t>(i) > static_cast<uint64_t>(std::numeric_limits<T>::max()))
        return std::nullopt;
    }
    return static_cast<T>(i);
  }
  return std::nullopt;
}

}  // namespace patch::text

#pragma once
// Shared by the libFuzzer harnesses: each input is written to a file of this
// process (the loaders read files, as users' inputs are files) and handed to
// one loader. A core::Error is the expected answer to bad bytes; anything else
// escaping (another exception, a sanitizer report, a crash) is a finding.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <string>

#include "core/error.h"

namespace patch::fuzz {

inline std::string input_path(const char* suffix) {
  static const std::string dir = [] {
    const char* t = std::getenv("TMPDIR");
    return std::string(t && *t ? t : "/tmp");
  }();
  return dir + "/patch-fuzz-" + std::to_string(::getpid()) + suffix;
}

inline void write_input(const std::string& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

// Runs `fn`, accepting core::Error; aborts (a libFuzzer finding) on any other exception.
template <typename Fn>
void expect_clean(Fn&& fn) {
  try {
    fn();
  } catch (const core::Error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception (not core::Error): %s\n", e.what());
    std::abort();
  }
}

}  // namespace patch::fuzz

#pragma once
// Helpers shared by the io tests.
#include <ATen/ATen.h>

#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "test_util.h"

namespace patch::test {

inline std::string io_fixture(const std::string& name) {
  return fixtures_dir() + "/io/" + name;
}

inline nlohmann::json read_json(const std::string& path) {
  return nlohmann::json::parse(core::read_file(path));
}

// Exact comparison with the values an oracle wrote as JSON numbers.
inline void require_values(const at::Tensor& t, const nlohmann::json& expected,
                           const std::string& what) {
  INFO(what);
  at::Tensor flat = t.to(at::kDouble).contiguous().flatten();
  REQUIRE(flat.numel() == static_cast<int64_t>(expected.size()));
  const double* v = flat.data_ptr<double>();
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i);
    REQUIRE(v[i] == expected[i].get<double>());
  }
}

inline std::vector<int64_t> shape_of(const nlohmann::json& j) {
  return j.get<std::vector<int64_t>>();
}

// The message of the core::Error that `fn` throws ("" if none): one line.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const core::Error& e) {
    return e.what();
  }
  return "";
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace patch::test

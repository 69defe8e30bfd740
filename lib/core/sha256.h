#pragma once
// SHA-256 (FIPS 180-4) for cache keys and tokenizer fingerprints.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace patch::core {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t bytes);
  void update(std::string_view s) { update(s.data(), s.size()); }
  // Lower-case hex digest; the object is finished afterwards.
  std::string hex_digest();

 private:
  void block(const uint8_t* p);

  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(std::string_view data);
// Streams the file; throws core::Error naming it when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace patch::core
